"""Sparsity: value rows of patches that do not fire are never read (issue 18, point 4).

With ReLU patches a patch whose pre-activation is negative on every token contributes exactly
nothing, and the kernels claim not to read its value row. NaN in those rows makes the claim
testable: if any path reads them, ``0 * NaN = NaN`` reaches the output. Every path is checked
against a float64 reference over the firing patches alone, with the silent patches laid out two
ways: whole tiles of silent patches, and silent patches interleaved one by one with firing ones
(in the same tile). Paths: the PyTorch path (both its gather and its dense regime), the Triton
patch kernels (``fused``, ``compact``, ``gemm``) and the one-launch FFN under ``TRITON_INTERPRET=1``,
and ``PatchedFFN`` end to end on each backend. (The benchmarks' atomic schedule:
``test_fused_ffn_atomic.py``.)
"""

from __future__ import annotations

import pytest
import torch

from fastpatch import PatchedFFN
from fastpatch.kernels import reference as R
from fastpatch.kernels.fused_ffn import fused_patched_ffn
from fastpatch.kernels.patch_forward import patch_forward, patch_forward_torch
from fastpatch.kernels.testing import assert_close_to_ref

from .conftest import requires_triton
from .tiny_models import tiny_llama

D, D_OUT = 64, 77


def _bank(P: int, layout: str, n_fire: int | None = None, dtype=torch.float32, seed: int = 0):
    """Keys, biases, values and the firing mask of P patches; silent ones hold NaN values.

    ``interleaved``: every other patch is silent (firing and silent share every tile);
    ``blocks``: the second half is silent (whole silent tiles); ``n_fire`` fires the first
    ``n_fire`` patches only.
    """
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(P, D, generator=g) / D**0.5
    idx = torch.arange(P)
    if n_fire is not None:
        fire = idx < n_fire
    elif layout == "interleaved":
        fire = idx % 2 == 0
    else:
        fire = idx < P // 2
    bias = torch.where(fire, torch.full((P,), 8.0), torch.full((P,), -100.0))  # fires on every token / never
    values = torch.randn(P, D_OUT, generator=g) / P**0.5
    values[~fire] = float("nan")
    return keys.to(dtype), bias.to(dtype), values.to(dtype), fire


def _ref(x, keys, bias, values, fire, base=None):
    return R.patch_forward_reference(x.double(), keys[fire].double(), bias[fire].double(), values[fire].double(),
                                     None if base is None else base.double())


def _check(out, ref, dtype=torch.float32) -> None:
    assert bool(torch.isfinite(out).all()), "NaN from a silent patch's value row reached the output"
    assert_close_to_ref(out, ref, dtype, max(1.0, float(ref.abs().max())))


@pytest.mark.parametrize("layout", ["interleaved", "blocks"])
@pytest.mark.parametrize("n_fire", [None, 3])  # None: half fire (dense regime); 3: the gather regime
def test_torch_path(layout: str, n_fire: int | None) -> None:
    x = torch.randn(9, D)
    keys, bias, values, fire = _bank(64, layout, n_fire)
    base = torch.randn(9, D_OUT)
    for b in (None, base):
        _check(patch_forward_torch(x, keys, bias, values, b), _ref(x, keys, bias, values, fire, b))
        _check(patch_forward(x, keys, bias, values, b, backend="torch"), _ref(x, keys, bias, values, fire, b))


@requires_triton
@pytest.mark.parametrize("layout", ["interleaved", "blocks"])
@pytest.mark.parametrize("strategy", ["fused", "compact", "gemm"])
@pytest.mark.parametrize("M", [1, 5, 70])
def test_patch_kernels(strategy: str, M: int, layout: str) -> None:
    if strategy == "fused" and M > 64:
        pytest.skip("the fused strategy is for decode-sized inputs")
    x = torch.randn(M, D)
    keys, bias, values, fire = _bank(256, layout)
    base = torch.randn(M, D_OUT)
    for b in (None, base):
        out = patch_forward(x, keys, bias, values, b, backend="triton", strategy=strategy)
        _check(out, _ref(x, keys, bias, values, fire, b))


@requires_triton
@pytest.mark.parametrize("layout", ["interleaved", "blocks"])
@pytest.mark.parametrize("M", [1, 5])
def test_fused_ffn(M: int, layout: str) -> None:
    g = torch.Generator().manual_seed(3)
    Fdim = 96
    x = torch.randn(M, D, generator=g)
    w_up = torch.randn(Fdim, D, generator=g) / D**0.5
    w_gate = torch.randn(Fdim, D, generator=g) / D**0.5
    w_down = torch.randn(Fdim, D_OUT, generator=g) / Fdim**0.5
    keys, bias, values, fire = _bank(256, layout)
    out = fused_patched_ffn(x, w_up, w_down, R.ACT_SILU, w_gate=w_gate, keys=keys, bias=bias, values=values)
    ref = R.patched_ffn_reference(x.double(), w_up.double(), w_down.double(), R.ACT_SILU, w_gate=w_gate.double(),
                                  keys=keys[fire].double(), bias=bias[fire].double(), values=values[fire].double())
    _check(out, ref)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
@pytest.mark.parametrize("tokens", [1, 6, 80])  # decode (one-launch FFN on triton), prefill
def test_patched_ffn_end_to_end(backend: str, tokens: int) -> None:
    torch.manual_seed(0)
    model = tiny_llama()
    ffn = PatchedFFN.wrap(model, "model.layers.-1.mlp", backend=backend)
    keys, bias, values, fire = _bank(64, "interleaved")
    d_out = ffn.bank.d_out
    values = values[:, :d_out].contiguous()
    ffn.add_patches(keys, bias, torch.nan_to_num(values))  # the bank refuses NaN: put it in afterwards
    with torch.no_grad():
        ffn.bank._values[: len(fire)][~fire] = float("nan")
        x = torch.randn(1, tokens, D)
        out = ffn(x)
        with ffn.patches_disabled():
            base = ffn(x)
    ref = R.patch_forward_reference(x[0].double(), keys[fire].double(), bias[fire].double(),
                                    values[fire].double(), base[0].double())
    _check(out[0], ref)
