"""T-Patcher editing of Hugging Face models.

:class:`Editor` orchestrates the pieces: :mod:`.encoding` (per task, through the family
:mod:`.adapters`), :mod:`.capture`, :mod:`.batch`, :mod:`.init`, :mod:`.objective`,
:mod:`.training` and :mod:`.persistence`, all on a shared :class:`~.handle.ModelHandle`.
"""

from .adapters import SUPPORTED_FAMILIES, FamilyAdapter, find_adapter
from .editor import Editor
from .types import EditError, EditorConfig, EditRequest, EditResult, MethodSettings, RuntimeOptions

__all__ = ["Editor", "EditorConfig", "EditRequest", "EditResult", "EditError", "FamilyAdapter", "find_adapter",
           "MethodSettings", "RuntimeOptions", "SUPPORTED_FAMILIES"]
