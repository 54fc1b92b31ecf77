"""Triton kernels against their float64 PyTorch references (TRITON_INTERPRET=1 on the CPU)."""

from __future__ import annotations

import itertools

import pytest
import torch

from fastpatch.kernels import reference as R
from fastpatch.kernels.fused_ffn import fused_patched_ffn
from fastpatch.kernels.patch_forward import PatchForward, patch_forward, patch_forward_torch
from fastpatch.kernels.testing import TOLERANCES, assert_close_to_ref

from .conftest import ODD_D, requires_triton

DTYPES = [torch.float32, torch.float16]
REGIMES = ["inactive", "active", "mixed"]


def _patches(P: int, d: int, d_out: int, regime: str, dtype: torch.dtype):
    keys = torch.randn(P, d) / d**0.5
    if regime == "inactive":
        bias = torch.full((P,), -100.0)
    elif regime == "active":
        bias = torch.full((P,), 100.0)
    else:  # a few patches fire on some tokens, most never do
        bias = torch.where(torch.rand(P) < 0.05, torch.zeros(P), torch.full((P,), -100.0))
    values = torch.randn(P, d_out) / max(1, P) ** 0.5
    return keys.to(dtype), bias.to(dtype), values.to(dtype)


def _ref(x, keys, bias, values, base, act=R.ACT_RELU):
    return R.patch_forward_reference(x.double(), keys.double(), bias.double(), values.double(),
                                     None if base is None else base.double(), act)


def _scale(ref: torch.Tensor) -> float:
    return max(1.0, float(ref.abs().max())) if ref.numel() else 1.0


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", ODD_D)
@pytest.mark.parametrize("P", [0, 1, 7, 1000])
@pytest.mark.parametrize("M", [1, 5, 130])
def test_patch_forward_fused_kernel(M: int, P: int, d: int, dtype: torch.dtype) -> None:
    d_out = d + 3 if d != 576 else d
    x = torch.randn(M, d).to(dtype)
    base = torch.randn(M, d_out).to(dtype)
    for regime in REGIMES:
        keys, bias, values = _patches(P, d, d_out, regime, dtype)
        out = patch_forward(x, keys, bias, values, base, backend="triton", strategy="fused")
        ref = _ref(x, keys, bias, values, base)
        assert out.dtype == dtype and out.shape == (M, d_out)
        assert_close_to_ref(out, ref, dtype, _scale(ref))
        if regime == "inactive":
            assert torch.equal(out, base)  # exact zeros outside every patch's region


@requires_triton
@pytest.mark.parametrize("strategy", ["gemm", "compact"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,P,d", [(1, 7, 64), (5, 1000, 113), (130, 1000, 113), (130, 7, 576)])
def test_patch_forward_gemm_and_compact_strategies(M: int, P: int, d: int, dtype: torch.dtype, strategy: str) -> None:
    x = torch.randn(M, d).to(dtype)
    for regime in REGIMES:
        keys, bias, values = _patches(P, d, 77, regime, dtype)
        for base in (None, torch.randn(M, 77).to(dtype)):
            out = patch_forward(x, keys, bias, values, base, backend="triton", strategy=strategy)
            ref = _ref(x, keys, bias, values, base)
            assert_close_to_ref(out, ref, dtype, _scale(ref))
            if regime == "inactive" and base is not None:
                assert torch.equal(out, base)


@requires_triton
@pytest.mark.parametrize("act", [R.ACT_SILU, R.ACT_GELU, R.ACT_GELU_TANH])
@pytest.mark.parametrize("strategy", ["fused", "gemm"])
def test_patch_forward_host_activations(act: int, strategy: str) -> None:
    x, (keys, bias, values) = torch.randn(5, 113), _patches(33, 113, 64, "mixed", torch.float32)
    out = patch_forward(x, keys, bias, values, None, act, backend="triton", strategy=strategy)
    assert_close_to_ref(out, _ref(x, keys, bias, values, None, act), torch.float32)


@pytest.mark.parametrize("regime", REGIMES)
def test_torch_path_matches_reference_and_gathers_active_rows(regime: str) -> None:
    x = torch.randn(9, 113, dtype=torch.float64)
    keys, bias, values = (t.double() for t in _patches(1000, 113, 64, regime, torch.float64))
    base = torch.randn(9, 64, dtype=torch.float64)
    out = patch_forward_torch(x, keys, bias, values, base)
    torch.testing.assert_close(out, _ref(x, keys, bias, values, base), **_tol64())


def _tol64() -> dict[str, float]:
    atol, rtol = TOLERANCES[torch.float64]
    return {"atol": atol, "rtol": rtol}


GATED_CASES = list(itertools.product([True, False], [True, False], [1, 5, 16], [0, 1, 7, 1000]))


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gated,with_bias,M,P", GATED_CASES)
def test_fused_ffn_kernel(gated: bool, with_bias: bool, M: int, P: int, dtype: torch.dtype) -> None:
    d, Fdim, d_out = 113, 96 + 17, 113
    act = R.ACT_SILU if gated else R.ACT_GELU_TANH
    x = torch.randn(M, d).to(dtype)
    w_up = (torch.randn(Fdim, d) / d**0.5).to(dtype)
    w_gate = (torch.randn(Fdim, d) / d**0.5).to(dtype) if gated else None
    down_linear = (torch.randn(d_out, Fdim) / Fdim**0.5).to(dtype)  # nn.Linear layout
    b_up = torch.randn(Fdim).to(dtype) if with_bias else None
    b_gate = torch.randn(Fdim).to(dtype) if with_bias and gated else None
    b_down = torch.randn(d_out).to(dtype) if with_bias else None
    for regime in REGIMES:
        keys, bias, values = _patches(P, d, d_out, regime, dtype)
        out = fused_patched_ffn(x, w_up, down_linear.t(), act, w_gate=w_gate, b_up=b_up, b_gate=b_gate,
                                b_down=b_down, keys=keys, bias=bias, values=values)
        D = lambda t: None if t is None else t.double()  # noqa: E731
        ref = R.patched_ffn_reference(D(x), D(w_up), D(down_linear).t(), act, w_gate=D(w_gate), b_up=D(b_up),
                                      b_gate=D(b_gate), b_down=D(b_down), keys=D(keys), bias=D(bias),
                                      values=D(values))
        assert out.shape == (M, d_out) and out.dtype == dtype
        assert_close_to_ref(out, ref, dtype, _scale(ref))


@requires_triton
def test_fused_ffn_reads_transposed_conv1d_weights_without_copy() -> None:
    """GPT-2's Conv1D stores (in, out); the kernel reads its transpose through strides."""
    d, Fdim = 64, 113
    c_fc = torch.randn(d, Fdim) / d**0.5  # Conv1D layout
    c_proj = torch.randn(Fdim, d) / Fdim**0.5
    x = torch.randn(3, d)
    out = fused_patched_ffn(x, c_fc.t(), c_proj, R.ACT_GELU_TANH)
    ref = R.patched_ffn_reference(x.double(), c_fc.t().double(), c_proj.double(), R.ACT_GELU_TANH)
    assert_close_to_ref(out, ref, torch.float32)


def test_activation_codes_match_kernel_constants() -> None:
    from fastpatch.kernels import _blocks

    assert (_blocks._RELU, _blocks._SILU, _blocks._GELU, _blocks._GELU_TANH) == (
        R.ACT_RELU, R.ACT_SILU, R.ACT_GELU, R.ACT_GELU_TANH)


@pytest.mark.parametrize("act", [R.ACT_RELU, R.ACT_SILU, R.ACT_GELU])
def test_gradcheck_patch_forward(act: int) -> None:
    torch.manual_seed(3)
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    values = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    fn = lambda *a: PatchForward.apply(*a, act, "torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, keys, bias, values))
    # and the Function's gradients equal autograd through the reference
    out = fn(x, keys, bias, values)
    ref = R.patch_forward_reference(x, keys, bias, values, None, act)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, keys, bias, values), g)
    want = torch.autograd.grad(ref, (x, keys, bias, values), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **_tol64())


@requires_triton
def test_patch_forward_function_uses_triton_forward_with_correct_grads() -> None:
    x = torch.randn(5, 113, requires_grad=True)
    keys, bias, values = (t.clone().requires_grad_(True) for t in _patches(7, 113, 64, "mixed", torch.float32))
    out = PatchForward.apply(x, keys, bias, values, R.ACT_RELU, "triton")
    ref = R.patch_forward_reference(x, keys, bias, values)
    torch.testing.assert_close(out, ref, **_tol(torch.float32))
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (x, keys, bias, values), g),
                    torch.autograd.grad(ref, (x, keys, bias, values), g)):
        torch.testing.assert_close(a, b, **_tol(torch.float32))


def _tol(dtype: torch.dtype) -> dict[str, float]:
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(x=torch.randn(5)), "2-D"),
        (lambda a: a.update(keys=torch.randn(7, 60)), "keys must be"),
        (lambda a: a.update(bias=torch.randn(6)), "bias must be"),
        (lambda a: a.update(values=torch.randn(6, 8)), "values must be"),
        (lambda a: a.update(keys=torch.randn(7, 64, dtype=torch.float64)), "share a dtype"),
        (lambda a: a.update(base=torch.randn(5, 9)), "base must be"),
        (lambda a: a.update(bias=torch.ones(7, dtype=torch.int64)), "floating point"),
        (lambda a: a.update(keys=torch.randn(7, 64, device="meta")), "is on meta"),
    ],
)
def test_bad_arguments_name_the_problem(mutate, match: str) -> None:
    args = dict(x=torch.randn(5, 64), keys=torch.randn(7, 64), bias=torch.randn(7), values=torch.randn(7, 8),
                base=torch.randn(5, 8))
    mutate(args)
    with pytest.raises((ValueError, TypeError), match=match):
        patch_forward(**args, backend="torch")


def test_backend_env_is_validated(monkeypatch) -> None:
    from fastpatch.kernels.dispatch import use_triton

    monkeypatch.setenv("FASTPATCH_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="not a backend"):
        use_triton(torch.zeros(1))
    monkeypatch.setenv("FASTPATCH_BACKEND", "torch")
    assert use_triton(torch.zeros(1)) is False
