"""The benchmarks' copy of the fused FFN's atomic schedule (``benchmarks/kernels_atomic.py``).

The library runs one schedule; ``gpu_check.py`` times this one beside it, so it must still
compute the same function: every candidate against the float64 reference under
TRITON_INTERPRET=1 at small odd shapes, its program split over neurons, and its claim that the
value rows of silent patches are never read.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.kernels_atomic import (
    ATOMIC_CONFIGS, _fused_ffn_atomic_kernel, atomic_configs_for, atomic_patched_ffn, default_atomic_config,
)
from fastpatch.kernels import fused_ffn as FF
from fastpatch.kernels import reference as R
from fastpatch.kernels.testing import assert_close_to_ref

from .conftest import requires_triton
from .test_kernel_configs import _bank, _ffn_case, assert_tuner_names_real_arguments
from .test_sparsity import D as SD
from .test_sparsity import _bank as _silent_bank
from .test_sparsity import _check as _check_finite

SMALL = (96 + 17, 2 * 64 + 17, 77, 2 * 64 + 17)  # d, F, d_out, P


@requires_triton
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("M", [1, 5, 33])
def test_every_atomic_config_matches_reference(M: int, gated: bool) -> None:
    torch.manual_seed(M)
    x, w_up, w_down, act, args, ref = _ffn_case(M, gated, SMALL)
    configs = atomic_configs_for(M)
    assert configs and (M != 1 or any(c.kwargs["BLOCK_M"] == 1 for c in configs))  # GEMV tiles at one token
    for c in [None, *configs]:
        out = atomic_patched_ffn(x, w_up, w_down, act, config=c, **args)
        assert_close_to_ref(out, ref, torch.float32, max(1.0, float(ref.abs().max())))


@requires_triton
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("sms", [1, 4, 97])
def test_every_neuron_is_computed_once(monkeypatch, sms: int, gated: bool) -> None:
    """``PROGRAMS_PER_SM = k`` splits the original and patch neurons over ``k * SMs`` programs by
    cost; ``0`` gives each program one block. A granule dropped or done twice would change the
    output: every patch fires here, so each value row counts. With 97 "SMs" most programs get an
    empty range, with 1 a program spans both kinds of neurons. Three output column blocks (of
    128): programs start their pass at different blocks (``ROTATE_N``)."""
    monkeypatch.setattr(FF, "INTERPRETER_SMS", sms)
    torch.manual_seed(sms)
    M, Fdim, P = 3, 5 * 16 + 7, 7 * 16 + 3
    x, w_up, w_down, act, args, ref = _ffn_case(M, gated, (33, Fdim, 2 * 128 + 19, P), fire_all=True)
    programs = set()
    for c in atomic_configs_for(M):
        if c.kwargs["PROGRAMS_PER_SM"]:
            cost = FF.triton.cdiv(Fdim, FF.GRANULE) * (3 if gated else 2) + FF.triton.cdiv(P, FF.GRANULE)
            grid = FF.ffn_grid_size(c.kwargs, Fdim, P, gated, sms, 3 if gated else 2)
            assert grid == min(c.kwargs["PROGRAMS_PER_SM"] * sms, cost)
        programs.add(c.kwargs["PROGRAMS_PER_SM"])
        out = atomic_patched_ffn(x, w_up, w_down, act, config=c, **args)
        assert_close_to_ref(out, ref, torch.float32, max(1.0, float(ref.abs().max())))
    assert 0 in programs and len(programs) > 1  # both program schedules were exercised
    assert any(c.kwargs["ROTATE_N"] and c.kwargs["BLOCK_N"] < w_down.shape[1] for c in atomic_configs_for(M))


@requires_triton
@pytest.mark.parametrize("layout", ["interleaved", "blocks"])
@pytest.mark.parametrize("M", [1, 5])
def test_silent_value_rows_are_never_read(M: int, layout: str) -> None:
    g = torch.Generator().manual_seed(3)
    Fdim, d_out = 96, 77
    x = torch.randn(M, SD, generator=g)
    w_up, w_gate = (torch.randn(Fdim, SD, generator=g) / SD**0.5 for _ in range(2))
    w_down = torch.randn(Fdim, d_out, generator=g) / Fdim**0.5
    keys, bias, values, fire = _silent_bank(256, layout)  # silent patches hold NaN values
    out = atomic_patched_ffn(x, w_up, w_down, R.ACT_SILU, w_gate=w_gate, keys=keys, bias=bias, values=values)
    ref = R.patched_ffn_reference(x.double(), w_up.double(), w_down.double(), R.ACT_SILU, w_gate=w_gate.double(),
                                  keys=keys[fire].double(), bias=bias[fire].double(), values=values[fire].double())
    _check_finite(out, ref)


@requires_triton
def test_tuner_defaults_and_refused_configs() -> None:
    assert_tuner_names_real_arguments(_fused_ffn_atomic_kernel, ATOMIC_CONFIGS, ["ws_ptr"])
    assert default_atomic_config(5, torch.bfloat16) is atomic_configs_for(5)[0]
    assert FF.smem_estimate(default_atomic_config(5, torch.float32), 4) <= FF.SMEM_BUDGET
    x = torch.randn(5, 64)
    w_up, w_down = torch.randn(9, 64), torch.randn(9, 8)
    with pytest.raises(ValueError, match="ROTATE_N"):  # a configuration of the library's schedule
        atomic_patched_ffn(x, w_up, w_down, R.ACT_SILU, config=FF.split_configs_for(5)[0])
    with pytest.raises(ValueError, match="BLOCK_M must be one of"):
        atomic_patched_ffn(x, w_up, w_down, R.ACT_SILU, config=atomic_configs_for(40)[0])
    keys, bias, values = _bank(3, 64, 7, torch.float32)
    with pytest.raises(ValueError, match="values must have shape"):  # the library's checks
        atomic_patched_ffn(x, w_up, w_down, R.ACT_SILU, keys=keys, bias=bias, values=values)
