"""fastpatch: fast, trustworthy sequential model editing (Transformer-Patcher).

Public API:

- :class:`PatchedFFN`: wraps a model's FFN in place and carries patch neurons.
- :class:`PatchBank`: the growable storage of patches (safetensors persistence).
"""

import importlib.machinery
import importlib.util
import sys
from pathlib import Path


def _map_checkout_kernels() -> None:
    """Make a source checkout's top-level ``kernels/`` folder the subpackage ``fastpatch.kernels``.

    The folder has no ``__init__.py`` on purpose. As a namespace portion it can never win the
    import name ``kernels`` from Hugging Face's regular package of that name (which transformers
    imports), even where the repository root is on ``sys.path`` (``python`` or ``pytest`` started
    there). A wheel installs the folder at ``fastpatch/kernels/``; in a checkout, neither Python
    nor setuptools' editable finder maps a namespace folder to a subpackage, so it is mapped here.
    """
    here = Path(__file__).resolve().parent
    checkout = here.parent / "kernels"
    name = f"{__name__}.kernels"
    if name in sys.modules or (here / "kernels").is_dir() or not (checkout / "_triton.py").is_file():
        return
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(checkout)]
    sys.modules[name] = importlib.util.module_from_spec(spec)


_map_checkout_kernels()

from .bank import PatchBank, PatchFileError, PatchRecord  # noqa: E402
from .ffn import FFNLayout, UnknownLayoutError, detect_layout  # noqa: E402
from .patched_ffn import PatchedFFN  # noqa: E402

__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: the runner pulls in datasets/matplotlib
    if name == "run_stream":
        from .runner import run_stream

        return run_stream
    if name in ("Editor", "EditorConfig", "EditRequest", "EditResult"):
        from . import editor

        return getattr(editor, name)
    raise AttributeError(f"module 'fastpatch' has no attribute {name!r}")


__all__ = ["PatchedFFN", "PatchBank", "PatchRecord", "PatchFileError", "FFNLayout", "UnknownLayoutError",
           "detect_layout", "run_stream", "Editor", "EditorConfig", "EditRequest", "EditResult", "__version__"]
