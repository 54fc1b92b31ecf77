"""fastpatch: fast, trustworthy sequential model editing (Transformer-Patcher).

Public API:

- :class:`PatchedFFN`: wraps a model's FFN in place and carries patch neurons.
- :class:`PatchBank`: the growable storage of patches (safetensors persistence).
"""

from .bank import PatchBank, PatchFileError, PatchRecord
from .ffn import FFNLayout, UnknownLayoutError, detect_layout
from .patched_ffn import PatchedFFN

__version__ = "0.1.0"

__all__ = ["PatchedFFN", "PatchBank", "PatchRecord", "PatchFileError", "FFNLayout", "UnknownLayoutError",
           "detect_layout", "__version__"]
