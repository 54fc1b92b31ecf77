"""The float64 references, the backend choice and the tolerances the kernel tests rest on (issue 18).

Every kernel test compares against ``kernels/reference.py`` with ``kernels/testing.py``'s
tolerances, so a wrong reference (a dropped bias, a sign) would make kernel and reference agree on
the wrong answer. Here they are checked against the formulas written out with plain tensor ops.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastpatch.kernels import dispatch
from fastpatch.kernels import reference as R
from fastpatch.kernels.testing import TOLERANCES, tolerance


def test_activation_reference() -> None:
    h = torch.linspace(-3, 3, 13, dtype=torch.float64)
    want = {R.ACT_RELU: h.clamp_min(0), R.ACT_SILU: h * torch.sigmoid(h),
            R.ACT_GELU: 0.5 * h * (1 + torch.erf(h / 2**0.5)),
            R.ACT_GELU_TANH: 0.5 * h * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (h + 0.044715 * h**3))),
            R.ACT_IDENTITY: h}
    for code, w in want.items():
        torch.testing.assert_close(R.activation_reference(h, code), w)
    with pytest.raises(ValueError, match="unknown activation code 9"):
        R.activation_reference(h, 9)
    assert R.ACT_NAMES[R.ACT_GELU_TANH] == "gelu_tanh" and R.ACT_CODES["identity"] == R.ACT_IDENTITY


def test_patched_ffn_reference_written_out() -> None:
    g = torch.Generator().manual_seed(0)
    d, f, d_out, p, m = 6, 5, 4, 3, 7

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x, w_up, w_gate, w_down = r(m, d), r(f, d), r(f, d), r(f, d_out)
    b_up, b_gate, b_down = r(f), r(f), r(d_out)
    keys, bias, values = r(p, d), r(p), r(p, d_out)
    patches = (x @ keys.T + bias).clamp_min(0) @ values
    gated = (F.silu(x @ w_gate.T + b_gate) * (x @ w_up.T + b_up)) @ w_down + b_down
    got = R.patched_ffn_reference(x, w_up, w_down, R.ACT_SILU, w_gate=w_gate, b_up=b_up, b_gate=b_gate,
                                  b_down=b_down, keys=keys, bias=bias, values=values)
    torch.testing.assert_close(got, gated + patches)
    dense = F.gelu(x @ w_up.T + b_up) @ w_down + b_down
    torch.testing.assert_close(R.patched_ffn_reference(x, w_up, w_down, R.ACT_GELU, b_up=b_up, b_down=b_down), dense)
    # one patch counts; none adds nothing; the patches' own activation is used
    torch.testing.assert_close(
        R.patched_ffn_reference(x, w_up, w_down, R.ACT_GELU, b_up=b_up, b_down=b_down, keys=keys[:1], bias=bias[:1],
                                values=values[:1]),
        dense + (x @ keys[:1].T + bias[:1]).clamp_min(0) @ values[:1])
    torch.testing.assert_close(
        R.patched_ffn_reference(x, w_up, w_down, R.ACT_GELU, b_up=b_up, b_down=b_down, keys=keys[:0], bias=bias[:0],
                                values=values[:0]), dense)
    torch.testing.assert_close(
        R.patched_ffn_reference(x, w_up, w_down, R.ACT_GELU, b_up=b_up, b_down=b_down, keys=keys, bias=bias,
                                values=values, patch_act=R.ACT_IDENTITY),
        dense + (x @ keys.T + bias) @ values)
    torch.testing.assert_close(R.patch_forward_reference(x, keys, bias, values), patches)


def test_requested_backend_and_use_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.requested_backend() == "auto"
    monkeypatch.setenv(dispatch.ENV_VAR, " Torch ")
    assert dispatch.requested_backend() == "torch" and dispatch.requested_backend("triton") == "triton"
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=r"FASTPATCH_BACKEND='cuda' is not a backend"):
        dispatch.requested_backend()
    monkeypatch.delenv(dispatch.ENV_VAR)
    cpu = torch.zeros(2)
    assert dispatch.use_triton(cpu, "torch") is False
    assert dispatch.use_triton(cpu) is False  # auto: CUDA tensors only
    monkeypatch.setattr(dispatch, "HAS_TRITON", True)
    monkeypatch.setattr(dispatch, "interpret_mode", lambda: True)
    assert dispatch.use_triton(cpu, "triton") is True
    monkeypatch.setattr(dispatch, "interpret_mode", lambda: False)
    with pytest.raises(RuntimeError, match=r"FASTPATCH_BACKEND=triton needs a CUDA tensor \(got cpu\); set "
                                           r"TRITON_INTERPRET=1 to run the kernels on the CPU through the interpreter"):
        dispatch.use_triton(cpu, "triton")
    from types import SimpleNamespace

    cuda_like = SimpleNamespace(is_cuda=True)  # all use_triton reads of a tensor
    assert dispatch.use_triton(cuda_like, "torch") is False and dispatch.use_triton(cuda_like, "auto") is True
    monkeypatch.setattr(dispatch, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="FASTPATCH_BACKEND=triton but Triton is not importable"):
        dispatch.use_triton(cpu, "triton")
    assert dispatch.use_triton(cpu, "auto") is False
    assert dispatch.num_sms(torch.device("cpu"), 7) == 7


def test_tolerances() -> None:
    assert tolerance(torch.float16) == {"atol": 2e-2, "rtol": 1e-2}
    assert tolerance(torch.float32) == {"atol": 1e-4, "rtol": 1e-4}
    assert set(TOLERANCES) == {torch.float64, torch.float32, torch.float16, torch.bfloat16}


def test_assert_close_to_ref_scales_only_when_asked() -> None:
    from fastpatch.kernels.testing import assert_close_to_ref

    ref = torch.zeros(3, dtype=torch.float64)
    out = torch.full((3,), 1.5e-4)  # 1.5 x the float32 absolute tolerance
    with pytest.raises(AssertionError):
        assert_close_to_ref(out, ref, torch.float32)
    assert_close_to_ref(out, ref, torch.float32, scale=2.0)
