"""Triton building blocks shared by the patch kernels: activations, row projections, and the
sparse accumulation of value rows into an fp32 workspace.

All offsets are int64: ``P * d`` passes 2^31 at P = 500k patches of d = 4096.
"""

from __future__ import annotations

from ._triton import tl, triton

# Activation codes (kept in sync with reference.ACT_*; asserted in tests).
_RELU: tl.constexpr = 0
_SILU: tl.constexpr = 1
_GELU: tl.constexpr = 2
_GELU_TANH: tl.constexpr = 3


@triton.jit
def act_fn(h, ACT: tl.constexpr):
    """Elementwise activation ``ACT`` on an fp32 tile."""
    if ACT == 0:
        return tl.maximum(h, 0.0)
    elif ACT == 1:
        return h * tl.sigmoid(h)
    elif ACT == 2:
        return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    elif ACT == 3:
        z = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        return 0.5 * h * (2.0 * tl.sigmoid(2.0 * z))  # 1 + tanh(z) == 2 * sigmoid(2z)
    else:
        return h


@triton.jit
def project_rows(
    x_ptr, w_ptr, offs_m, m_mask, offs_r, r_mask, D,
    stride_xm, stride_xd, stride_wr, stride_wd,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """``x[offs_m] @ W[offs_r]^T`` as a (BLOCK_M, BLOCK_R) fp32 tile, looping over ``D``."""
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        d_mask = offs_d < D
        xt = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_d[None, :] * stride_xd,
            mask=m_mask[:, None] & d_mask[None, :], other=0.0,
        )
        wt = tl.load(
            w_ptr + offs_r[None, :] * stride_wr + offs_d[:, None] * stride_wd,
            mask=r_mask[None, :] & d_mask[:, None], other=0.0,
        )
        acc = tl.dot(xt, wt, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def accumulate_rows(
    h, w_ptr, offs_r, r_mask, ws_ptr, offs_m, m_mask, D_OUT,
    stride_wr, stride_wn, stride_sm, stride_sn,
    BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """``ws[offs_m] += h @ W[offs_r]`` over all ``D_OUT`` columns, with fp32 atomics.

    ``h`` is (BLOCK_M, BLOCK_R) and already zero on masked rows/columns.
    """
    hv = h.to(w_ptr.dtype.element_ty)
    for n0 in range(0, D_OUT, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        n_mask = offs_n < D_OUT
        wt = tl.load(
            w_ptr + offs_r[:, None] * stride_wr + offs_n[None, :] * stride_wn,
            mask=r_mask[:, None] & n_mask[None, :], other=0.0,
        )
        contrib = tl.dot(hv, wt, input_precision=INPUT_PRECISION)
        tl.atomic_add(
            ws_ptr + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn,
            contrib, mask=m_mask[:, None] & n_mask[None, :], sem="relaxed",
        )
