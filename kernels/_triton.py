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

__all__ = ["HAS_TRITON", "triton", "tl", "interpret_mode", "autotune", "autotune_enabled", "AUTOTUNE_ENV", "launch",
           "stream_jit"]


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

    class _Config:
        """Stands in for ``triton.Config``: keeps the launch parameters the modules' tables read."""

        def __init__(self, kwargs: dict[str, Any], num_warps: int = 4, num_stages: int = 2, **extra: Any) -> None:
            self.kwargs, self.num_warps, self.num_stages = dict(kwargs), num_warps, num_stages
            self.__dict__.update(extra)

    class _Placeholder(types.SimpleNamespace):
        def __getattr__(self, name: str) -> Any:  # tl.constexpr, tl.float32, ...
            return object

    triton = types.SimpleNamespace(  # type: ignore[assignment]
        jit=_passthrough,
        autotune=_passthrough,
        heuristics=_passthrough,
        Config=_Config,
        cdiv=lambda a, b: -(-a // b),
        next_power_of_2=lambda n: 1 << max(0, (int(n) - 1).bit_length()),
    )
    tl = _Placeholder()  # type: ignore[assignment]


def stream_jit(varying: tuple[str, ...] = (), tokens: tuple[str, ...] = ()) -> Callable:
    """``triton.jit`` for kernels called with sizes that change from one call to the next.

    Triton compiles a separate variant of a kernel for each integer argument that equals 1 or is
    divisible by 16. In a stream of edits the bank size, the memory's rows and the number of new
    neurons change on every edit, so each of them would compile a new variant the first time it
    turns 1 or a multiple of 16: seconds of compilation in the middle of a stream, and in a
    serving process after a hot fix. ``varying`` names the arguments Triton must not specialise
    on at all; ``tokens`` the ones that keep only the ``== 1`` case (the token count: one token is
    the decode step, worth its own variant; otherwise its divisibility is chance). Where this
    Triton predates ``do_not_specialize_on_alignment``, ``tokens`` are not specialised at all.
    """
    if not HAS_TRITON:
        return lambda fn: fn
    import inspect

    if "do_not_specialize_on_alignment" in inspect.signature(triton.jit).parameters:
        return triton.jit(do_not_specialize=list(varying), do_not_specialize_on_alignment=list(tokens))
    return triton.jit(do_not_specialize=[*varying, *tokens])


#: ``FASTPATCH_AUTOTUNE=0`` runs every kernel at its first (default) configuration instead of
#: benchmarking the candidates at the first call of each shape. The interpreter never tunes: it
#: is numpy, and timing it means nothing.
AUTOTUNE_ENV = "FASTPATCH_AUTOTUNE"


def autotune_enabled() -> bool:
    """Whether kernels pick their launch configuration by measurement (read at import)."""
    return HAS_TRITON and not interpret_mode() and os.environ.get(AUTOTUNE_ENV, "1") != "0"


def autotune(configs: list, key: list[str], **kwargs: Any) -> Callable:
    """``triton.autotune`` that caches its choice on disk where this Triton can.

    Triton >= 3.2 stores the winning configuration next to the compiled kernels, so a serving
    process pays the tuning cost once per machine rather than once per start.
    """
    if not HAS_TRITON:
        return lambda fn: fn
    import inspect

    params = inspect.signature(triton.autotune).parameters
    if "cache_results" in params:
        kwargs.setdefault("cache_results", True)
    if "do_bench" in params:
        # Triton's default times each candidate for 25 + 100 ms; these kernels take 0.01-1 ms,
        # so 5 + 25 ms is still >= 25 repetitions and keeps a first call with ~10 candidates
        # well under a second of measuring.
        kwargs.setdefault("do_bench", _quick_bench)
    return triton.autotune(configs=configs, key=key, **kwargs)


def _quick_bench(fn: Callable, quantiles: Any = None) -> Any:
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


#: The autotuner's choice per (kernel, key), remembered here so that later calls launch at that
#: configuration directly: ``Autotuner.run`` rebuilds its key from every argument on each call,
#: which costs tens of microseconds of Python per decode step.
_TUNED: dict[tuple[int, tuple], Any] = {}


def launch(kernel: Any, grid: Any, args: tuple, kwargs: dict, config: Any = None, tune_key: tuple | None = None) -> None:
    """Launch ``kernel`` (an autotuned Triton kernel) with ``args``/``kwargs``.

    With ``config`` given, or where tuning is off (``autotune_enabled()``), the tuner is bypassed
    and the kernel runs at exactly that configuration (the default when ``config`` is None is the
    caller's job: pass it). Otherwise the tuner measures its candidates at the first call per key;
    with ``tune_key`` (which must determine the tuner's own key) its choice is remembered and
    later calls with the same ``tune_key`` skip the tuner.
    """
    if config is None and tune_key is not None:
        config = _TUNED.get((id(kernel), tune_key))
        if config is None:
            kernel[grid](*args, **kwargs)
            _TUNED[(id(kernel), tune_key)] = kernel.best_config
            return
    if config is None:
        kernel[grid](*args, **kwargs)
        return
    fn = getattr(kernel, "fn", kernel)
    opts = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if getattr(config, "maxnreg", None):
        opts["maxnreg"] = config.maxnreg
    fn[grid](*args, **kwargs, **config.kwargs, **opts)
