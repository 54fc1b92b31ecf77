"""Numerical tolerances for comparing kernels with their float64 references: the one place.

Values follow FlagGems' per-dtype table. The reference runs in float64; the kernel runs in the
listed dtype with fp32 accumulation, so the error is dominated by the input/output rounding of
that dtype (fp16: 2^-11 ~ 4.9e-4 relative; bf16: 2^-8 ~ 3.9e-3) times the reduction depth.
"""

from __future__ import annotations

import torch

#: (atol, rtol) per dtype, for outputs of magnitude ~1 after reductions of depth <= ~4k.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 1e-2),
    torch.bfloat16: (8e-2, 5e-2),
}


def specialisation(value: object, opt_out: bool = False, opt_out_alignment: bool = False) -> tuple[bool, bool]:
    """``(is the constant 1, is divisible by 16)`` as Triton specialises a launch argument: an
    integer equal to 1 becomes a constant, and an integer or a pointer's address (in bytes)
    divisible by 16 carries that fact; ``opt_out`` (``do_not_specialize``) drops both,
    ``opt_out_alignment`` (``do_not_specialize_on_alignment``) the second. Anything else: both
    False. The one statement of the rule, for the tests and ``benchmarks/compile_check.py``."""
    if opt_out:
        return False, False
    if isinstance(value, torch.Tensor):
        return False, not opt_out_alignment and value.data_ptr() % 16 == 0
    if isinstance(value, int) and not isinstance(value, bool):
        return value == 1, not opt_out_alignment and value % 16 == 0
    return False, False


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """``torch.testing.assert_close`` keyword arguments for ``dtype``."""
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


def assert_close_to_ref(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    """Compare a kernel output with a float64 reference at ``dtype``'s tolerance.

    ``scale`` widens the absolute tolerance for outputs whose magnitude is larger than ~1.
    """
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), ref.double(), atol=atol * scale, rtol=rtol)
