"""Import Triton without requiring it.

Kernel modules import ``triton``/``tl`` from here. Where Triton is missing (macOS, Windows, a
minimal container) the names resolve to a small placeholder whose ``jit``/``autotune``/``heuristics``
decorators return the plain Python function, so every kernel module stays importable and the
PyTorch reference path keeps working. Same idea as vLLM's ``triton_utils/importing.py``.
"""

from __future__ import annotations

import os
import types
from typing import Any, Callable

__all__ = ["HAS_TRITON", "triton", "tl", "interpret_mode"]


def interpret_mode() -> bool:
    """True when kernels run on the CPU through Triton's numpy interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


try:  # pragma: no branch - depends on the machine
    import triton  # type: ignore[import-not-found]
    import triton.language as tl  # type: ignore[import-not-found]

    HAS_TRITON = True
except Exception:  # ImportError, or a broken install that fails while loading its driver
    HAS_TRITON = False

    def _passthrough(*args: Any, **kwargs: Any) -> Callable:
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return lambda fn: fn

    class _Placeholder(types.SimpleNamespace):
        def __getattr__(self, name: str) -> Any:  # tl.constexpr, tl.float32, ...
            return object

    triton = types.SimpleNamespace(  # type: ignore[assignment]
        jit=_passthrough,
        autotune=_passthrough,
        heuristics=_passthrough,
        Config=lambda *a, **k: None,
        cdiv=lambda a, b: -(-a // b),
        next_power_of_2=lambda n: 1 << max(0, (int(n) - 1).bit_length()),
    )
    tl = _Placeholder()  # type: ignore[assignment]
