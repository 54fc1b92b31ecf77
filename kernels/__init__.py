"""Triton kernels of fastpatch, each with a PyTorch reference (``reference.py``).

Installed as ``fastpatch.kernels``. Every module imports without Triton or a GPU.
"""

from ._triton import HAS_TRITON
from .dispatch import requested_backend, use_triton

__all__ = ["HAS_TRITON", "requested_backend", "use_triton"]
