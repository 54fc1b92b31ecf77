"""fastpatch: fast, trustworthy sequential model editing (Transformer-Patcher).

Public API:

- :class:`PatchedFFN`: wraps a model's FFN in place and carries patch neurons.
- :class:`PatchBank`: the growable storage of patches (safetensors persistence).
"""

from .bank import PatchBank, PatchFileError, PatchRecord
from .ffn import FFNLayout, UnknownLayoutError, detect_layout
from .patched_ffn import PatchedFFN

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
