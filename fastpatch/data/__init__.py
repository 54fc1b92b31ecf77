"""Edit streams: the file formats (:mod:`.formats`) and the :class:`EditRecord` every stream is
made of (:mod:`.records`). The package exports what :mod:`.formats` does.

The built-in streams (geography, claims) are part of the demo app: :mod:`fastpatch.app`.
Importing this package is cheap: ``datasets`` is imported only when a file is loaded.
"""

from .formats import *  # noqa: F403
from .formats import __all__  # noqa: F401
