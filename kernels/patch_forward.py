"""Patch forward: ``out = base + act(x K^T + b) V`` for thousands of patch neurons.

Three Triton kernels, one PyTorch path, one ``autograd.Function``:

``_patch_fused_kernel`` (few tokens, M <= ``FUSED_MAX_TOKENS``)
    Grid (token blocks, patch splits). Each program walks its share of the patch bank in blocks of
    ``BLOCK_P`` patches, computes the (BLOCK_M, BLOCK_P) activation tile in registers from the
    keys, and, if any entry of the tile is non-zero (ReLU), multiplies it into the value rows and
    adds the result into an fp32 workspace with atomics. The M x P activation matrix is never
    written to memory and the value tiles of inactive patches are never read: with ReLU patches
    the bytes moved are ``P*d`` (keys) + ``active_blocks*BLOCK_P*d_out`` (values).

``_compact_value_kernel`` (many tokens, ReLU: strategy ``compact``)
    Here the ``x K^T`` product is compute-bound and cuBLAS does it best. The patches that fire on
    any token are then listed on the device (a column max, a prefix sum and a scatter: no host
    sync, so it can be captured in a CUDA graph), and this kernel multiplies only their
    pre-activation columns into their value rows. The cost beyond the key GEMM is that of the
    firing patches alone; the (M, P) pre-activations are read once, by the column max. No atomics,
    and the list is in patch order: deterministic.

``_sparse_value_kernel`` (many tokens: strategy ``gemm``; the path for non-ReLU activations)
    After the same cuBLAS GEMM this kernel reads the (M, P) pre-activations tile by tile, once
    per output block, applies the activation, and skips value tiles whose activation tile is all
    zero. No atomics: deterministic.

Launch configurations of ``_patch_fused_kernel`` are tuned on the device among
``PATCH_FUSED_CONFIGS`` (see ``fused_ffn``; ``FASTPATCH_AUTOTUNE=0`` pins the defaults).

PyTorch path (CPU, or ``FASTPATCH_BACKEND=torch``)
    ``addmm`` for the pre-activations, then only the active value rows are gathered
    (``index_select``) when fewer than half of the patches fire anywhere in the batch.

Backward (``PatchForward``): recomputes the pre-activations and differentiates with cuBLAS GEMMs.
The backward is five GEMMs with nothing to fuse between them that would save a read of the
bank, so a Triton backward does not pay; it exists for the training of few new patches.
"""

from __future__ import annotations

import torch

from ._blocks import (
    accumulate_rows, act_fn, block_range, candidate_configs, configs_for, load_tile, project_rows,
    prune_by_tokens, store_plus_base, token_bucket, work_bucket,
)
from ._triton import autotune, autotune_enabled, launch, stream_jit, tl, triton
from .dispatch import num_sms, use_triton
from .reference import ACT_RELU, activation_reference

__all__ = [
    "patch_forward", "patch_forward_torch", "PatchForward", "FUSED_MAX_TOKENS", "STRATEGIES",
    "PATCH_FUSED_CONFIGS", "patch_configs_for", "check_patch_args", "active_patch_list",
]

#: Token count up to which the fully fused kernel is used; above it the pre-activations come from
#: a cuBLAS GEMM (compute-bound at that size) and a value kernel does the rest.
#: The bound is the measured crossover of the two paths (the "crossover" section of
#: ``benchmarks/gpu_check.py``; figures in ``benchmarks/results/nvidia-h200/``).
FUSED_MAX_TOKENS = 32
#: ``strategy`` values of ``patch_forward``.
STRATEGIES = ("auto", "fused", "compact", "gemm")
BLOCK_N = 128
#: Firing patches per step of the compact value kernel: 64 columns of pre-activations and 64
#: value rows (16 KB in bf16 at BLOCK_N = 128).
BLOCK_A = 64


#: (BLOCK_P, BLOCK_D, BLOCK_N, warps, stages). The first is the default, the fastest in the GPU
#: sweeps (``benchmarks/results/nvidia-h200/``): 64 patches per tile, a 64 x 128 bf16 key tile is 16 KB.
_DOT_TILES = [
    (64, 128, 128, 4, 2),
    (64, 128, 128, 4, 3),
    (32, 128, 128, 4, 3),
    (64, 256, 128, 8, 3),
    (128, 128, 64, 8, 3),
]
#: Single-token GEMV candidates: the (BLOCK_D, BLOCK_P) key tile lives in registers.
_GEMV_TILES = [
    (32, 128, 128, 4, 2),
    (16, 256, 128, 4, 2),
    (64, 64, 128, 4, 2),
    (32, 256, 64, 8, 2),
]
#: Every candidate, in order; within a token bucket the first is the default.
PATCH_FUSED_CONFIGS = candidate_configs("BLOCK_P", _DOT_TILES, _GEMV_TILES, {32: 3, 64: 3})


def patch_configs_for(M: int) -> list:
    """The candidate launch configurations of the fused patch kernel for ``M`` tokens."""
    return configs_for(PATCH_FUSED_CONFIGS, M)


#: Below this fraction of active patches the CPU path gathers active value rows instead of
#: multiplying the whole bank. 1.0: whenever any patch is silent on the whole batch, so the value
#: row of a silent patch is never read (at 0.5, 0 * NaN from such a row reached the output when
#: half the patches fired; the bank refuses NaN, but the sparsity contract is that of the kernels).
_GATHER_BELOW = 1.0


@autotune(
    configs=PATCH_FUSED_CONFIGS,
    key=["M_BUCKET", "P_BUCKET", "D", "D_OUT"],
    prune_configs_by={"early_config_prune": prune_by_tokens},
    restore_value=["ws_ptr"],  # accumulates into ws: each timing run starts from a copy
)
@stream_jit(varying=("M_BUCKET", "P_BUCKET", "P"), tokens=("M",))
def _patch_fused_kernel(
    x_ptr, k_ptr, b_ptr, v_ptr, ws_ptr,
    M, M_BUCKET, P_BUCKET, D, D_OUT, P,
    stride_xm, stride_xd, stride_kp, stride_kd, stride_vp, stride_vn, stride_sm, stride_sn,
    ACT: tl.constexpr, SKIP_INACTIVE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    m_mask = offs_m < M
    # The bank is cut into as many contiguous runs of whole tiles as the grid has splits.
    blocks_per_split = tl.cdiv(tl.cdiv(P, BLOCK_P), tl.num_programs(1))
    p_start = pid_s * blocks_per_split * BLOCK_P
    p_end = tl.minimum(p_start + blocks_per_split * BLOCK_P, P)
    for p0 in range(p_start, p_end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        p_mask = offs_p < p_end
        acc = project_rows(
            x_ptr, k_ptr, offs_m, m_mask, offs_p, p_mask, D,
            stride_xm, stride_xd, stride_kp, stride_kd,
            BLOCK_M, BLOCK_P, BLOCK_D, INPUT_PRECISION,
        )
        b = tl.load(b_ptr + offs_p, mask=p_mask, other=0.0).to(tl.float32)
        h = act_fn(acc + b[None, :], ACT)
        h = tl.where(m_mask[:, None] & p_mask[None, :], h, 0.0)
        if SKIP_INACTIVE:
            run = tl.max(tl.max(h, axis=1), axis=0) > 0.0
        else:
            run = True
        if run:
            accumulate_rows(
                h, v_ptr, offs_p, p_mask, ws_ptr, offs_m, m_mask, D_OUT, 0,
                stride_vp, stride_vn, stride_sm, stride_sn, BLOCK_M, BLOCK_N, INPUT_PRECISION,
            )


# The pre-activations' row stride is the bank size; the count is the last element of a (P,) tensor.
@stream_jit(varying=("stride_hm", "count_ptr"), tokens=("M",))
def _compact_value_kernel(
    pre_ptr, idx_ptr, count_ptr, v_ptr, base_ptr, out_ptr,
    M, D_OUT,
    stride_hm, stride_hp, stride_vp, stride_vn, stride_bm, stride_bn, stride_om, stride_on,
    ACT: tl.constexpr, HAS_BASE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_m, m_mask = block_range(tl.program_id(0).to(tl.int64), BLOCK_M, M)
    offs_n, n_mask = block_range(tl.program_id(1).to(tl.int64), BLOCK_N, D_OUT)
    n_active = tl.load(count_ptr).to(tl.int64)  # on the device: no host sync
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for a0 in range(0, n_active, BLOCK_A):
        offs_a = a0 + tl.arange(0, BLOCK_A).to(tl.int64)
        a_mask = offs_a < n_active
        ids = tl.load(idx_ptr + offs_a, mask=a_mask, other=0).to(tl.int64)
        pre = load_tile(pre_ptr, offs_m, m_mask, stride_hm, ids, a_mask, stride_hp).to(tl.float32)
        h = tl.where(m_mask[:, None] & a_mask[None, :], act_fn(pre, ACT), 0.0)
        vt = load_tile(v_ptr, ids, a_mask, stride_vp, offs_n, n_mask, stride_vn)
        acc = tl.dot(h.to(v_ptr.dtype.element_ty), vt, acc, input_precision=INPUT_PRECISION)
    store_plus_base(acc, base_ptr, out_ptr, offs_m, offs_n, m_mask, n_mask,
                    stride_bm, stride_bn, stride_om, stride_on, HAS_BASE)


@stream_jit(varying=("P", "stride_hm"), tokens=("M",))
def _sparse_value_kernel(
    h_ptr, v_ptr, base_ptr, out_ptr,
    M, P, D_OUT,
    stride_hm, stride_hp, stride_vp, stride_vn, stride_bm, stride_bn, stride_om, stride_on,
    ACT: tl.constexpr, SKIP_INACTIVE: tl.constexpr, HAS_BASE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_m, m_mask = block_range(tl.program_id(0).to(tl.int64), BLOCK_M, M)
    offs_n, n_mask = block_range(tl.program_id(1).to(tl.int64), BLOCK_N, D_OUT)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        p_mask = offs_p < P
        pre = load_tile(h_ptr, offs_m, m_mask, stride_hm, offs_p, p_mask, stride_hp).to(tl.float32)
        h = act_fn(pre, ACT)
        h = tl.where(m_mask[:, None] & p_mask[None, :], h, 0.0)
        if SKIP_INACTIVE:
            run = tl.max(tl.max(h, axis=1), axis=0) > 0.0
        else:
            run = True
        if run:  # value rows of patches silent on every token of the tile are not read
            live = p_mask & (tl.max(tl.abs(h), axis=0) > 0.0)
            vt = load_tile(v_ptr, offs_p, live, stride_vp, offs_n, n_mask, stride_vn)
            acc = tl.dot(h.to(v_ptr.dtype.element_ty), vt, acc, input_precision=INPUT_PRECISION)
    store_plus_base(acc, base_ptr, out_ptr, offs_m, offs_n, m_mask, n_mask,
                    stride_bm, stride_bn, stride_om, stride_on, HAS_BASE)


def check_patch_args(
    x: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor, values: torch.Tensor,
    base: torch.Tensor | None = None,
) -> None:
    """Validate shapes, dtypes and devices of a patch forward; raise with the problem named."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (tokens, d), got shape {tuple(x.shape)}")
    if keys.dim() != 2 or keys.shape[1] != x.shape[1]:
        raise ValueError(f"keys must be (P, d={x.shape[1]}), got {tuple(keys.shape)}")
    P = keys.shape[0]
    if bias.shape != (P,):
        raise ValueError(f"bias must be (P={P},), got {tuple(bias.shape)}")
    if values.dim() != 2 or values.shape[0] != P:
        raise ValueError(f"values must be (P={P}, d_out), got {tuple(values.shape)}")
    if base is not None and base.shape != (x.shape[0], values.shape[1]):
        raise ValueError(f"base must be (M={x.shape[0]}, d_out={values.shape[1]}), got {tuple(base.shape)}")
    for name, t in (("keys", keys), ("bias", bias), ("values", values), ("base", base)):
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if keys.dtype != x.dtype or values.dtype != x.dtype:
        raise TypeError(f"x, keys and values must share a dtype; got {x.dtype}, {keys.dtype}, {values.dtype}")


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not be silently rounded to tf32 (10-bit mantissa) inside tl.dot.
    return "ieee" if dtype == torch.float32 else "tf32"


#: Programs-per-split sizing off the GPU: few programs, each as large as possible.
_INTERPRETER_SMS = 4


#: Token tile of the (non-tuned) value kernels after the cuBLAS GEMM; 16 is tl.dot's smallest.
def _block_m(M: int) -> int:
    return min(64, max(16, triton.next_power_of_2(M)))


#: Patches per tile of ``_sparse_value_kernel``: a 64 x 128 bf16 value tile is 16 KB.
_GEMM_BLOCK_P = 64


def _patch_forward_fused(x, keys, bias, values, base, act, out_dtype, config=None):
    M, D = x.shape
    P, D_OUT = values.shape
    ws = base.float().clone() if base is not None else torch.zeros(M, D_OUT, device=x.device, dtype=torch.float32)
    if config is not None and all(config is not c for c in patch_configs_for(M)):
        raise ValueError(f"config {config} is not a candidate for M={M}; pick one of patch_configs_for({M})")
    if config is None and not autotune_enabled():
        config = patch_configs_for(M)[0]
    sms = num_sms(x.device, _INTERPRETER_SMS)

    def grid(meta):
        m_blocks = triton.cdiv(M, meta["BLOCK_M"])
        # ~4 programs per SM keep every SM streaming keys while atomics of one program drain.
        return (m_blocks, max(1, min(triton.cdiv(P, meta["BLOCK_P"]), (4 * sms) // m_blocks)))

    launch(
        _patch_fused_kernel, grid,
        (x, keys, bias, values, ws, M, token_bucket(M), work_bucket(P), D, D_OUT, P,
         x.stride(0), x.stride(1), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
         ws.stride(0), ws.stride(1)),
        dict(ACT=act, SKIP_INACTIVE=act == ACT_RELU, INPUT_PRECISION=_input_precision(x.dtype)),
        config,
        tune_key=(token_bucket(M), work_bucket(P), D, D_OUT, x.dtype, keys.dtype, bias.dtype, values.dtype),
    )
    return ws.to(out_dtype)


def active_patch_list(pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The patches whose ReLU fires on any row of ``pre`` (M, P), listed on the device.

    Returns ``(idx, count)``: ``idx[:count]`` are the firing patches in increasing order, as
    int32; ``count`` is a one-element device tensor. No host synchronisation (unlike
    ``nonzero``): a column max, a prefix sum and one scatter whose targets are all distinct
    (firing patches to their rank, the others behind them), so the result is deterministic.
    """
    P = pre.shape[1]
    active = pre.amax(dim=0) > 0
    rank = torch.cumsum(active, 0, dtype=torch.int32)  # inclusive: firing patches so far
    arange = torch.arange(P, device=pre.device, dtype=torch.int32)
    slot = torch.where(active, rank - 1, rank[-1] + arange - rank)  # a permutation of 0..P-1
    idx = torch.empty(P, device=pre.device, dtype=torch.int32).scatter_(0, slot.long(), arange)
    return idx, rank[-1:]


def _patch_forward_compact(x, keys, bias, values, base, act, out_dtype):
    M = x.shape[0]
    D_OUT = values.shape[1]
    pre = torch.addmm(bias.to(x.dtype), x, keys.t())  # cuBLAS: compute-bound at large M
    idx, count = active_patch_list(pre)
    out = torch.empty(M, D_OUT, device=x.device, dtype=out_dtype)
    block_m = _block_m(M)
    b = base if base is not None else out
    _compact_value_kernel[(triton.cdiv(M, block_m), triton.cdiv(D_OUT, BLOCK_N))](
        pre, idx, count, values, b, out, M, D_OUT,
        pre.stride(0), pre.stride(1), values.stride(0), values.stride(1),
        b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        ACT=act, HAS_BASE=base is not None, INPUT_PRECISION=_input_precision(x.dtype),
        BLOCK_M=block_m, BLOCK_A=BLOCK_A, BLOCK_N=BLOCK_N, num_warps=4, num_stages=2,
    )
    return out


def _patch_forward_gemm(x, keys, bias, values, base, act, out_dtype):
    M = x.shape[0]
    P, D_OUT = values.shape
    pre = torch.addmm(bias.to(x.dtype), x, keys.t())  # cuBLAS: compute-bound at large M
    out = torch.empty(M, D_OUT, device=x.device, dtype=out_dtype)
    block_m = _block_m(M)
    grid = (triton.cdiv(M, block_m), triton.cdiv(D_OUT, BLOCK_N))
    b = base if base is not None else out
    _sparse_value_kernel[grid](
        pre, values, b, out, M, P, D_OUT,
        pre.stride(0), pre.stride(1), values.stride(0), values.stride(1),
        b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        ACT=act, SKIP_INACTIVE=act == ACT_RELU, HAS_BASE=base is not None,
        INPUT_PRECISION=_input_precision(x.dtype),
        BLOCK_M=block_m, BLOCK_P=_GEMM_BLOCK_P, BLOCK_N=BLOCK_N, num_warps=4, num_stages=2,
    )
    return out


def patch_forward_torch(
    x: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor, values: torch.Tensor,
    base: torch.Tensor | None = None, act: int = ACT_RELU,
) -> torch.Tensor:
    """Efficient PyTorch path: ``addmm``, then only the value rows of patches that fire."""
    pre = torch.addmm(bias.to(x.dtype), x, keys.t())
    h = activation_reference(pre, act)
    if act == ACT_RELU:
        active = (h > 0).any(dim=0)
        n_active = int(active.sum())
        if n_active == 0:
            return base.clone() if base is not None else x.new_zeros(x.shape[0], values.shape[1])
        if n_active < _GATHER_BELOW * keys.shape[0]:
            idx = active.nonzero().squeeze(1)
            h = h.index_select(1, idx)
            values = values.index_select(0, idx)
    if base is None:
        return h @ values
    return torch.addmm(base, h, values)


def patch_forward(
    x: torch.Tensor,
    keys: torch.Tensor,
    bias: torch.Tensor,
    values: torch.Tensor,
    base: torch.Tensor | None = None,
    act: int = ACT_RELU,
    backend: str | None = None,
    strategy: str = "auto",
    config: "triton.Config | None" = None,
) -> torch.Tensor:
    """``base + act(x K^T + b) V`` without autograd (see ``PatchForward`` for gradients).

    Args:
        x: (M, d) FFN inputs.
        keys: (P, d) patch keys; bias: (P,); values: (P, d_out).
        base: optional (M, d_out) to add to (the original FFN output).
        act: activation code (``reference.ACT_*``); ReLU enables skipping inactive patches.
        backend: ``auto``/``triton``/``torch``; default from ``FASTPATCH_BACKEND``.
        strategy: Triton backend only. ``fused`` (activations in registers, atomics),
            ``compact`` (cuBLAS pre-activations, then only the firing patches; ReLU only,
            deterministic), ``gemm`` (cuBLAS, then every value tile whose activations are not
            all zero; deterministic) or ``auto``: ``fused`` up to ``FUSED_MAX_TOKENS`` tokens,
            else ``compact`` for ReLU and ``gemm`` for other activations.
        config: pins the launch configuration of the ``fused`` kernel (one of
            ``patch_configs_for(M)``); tuned on the device by default.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "compact" and act != ACT_RELU:
        raise ValueError("strategy 'compact' needs ReLU patches: only ReLU gives the exact zeros it skips")
    check_patch_args(x, keys, bias, values, base)
    out_dtype = x.dtype
    if keys.shape[0] == 0:
        return base.clone() if base is not None else x.new_zeros(x.shape[0], values.shape[1])
    if x.shape[0] == 0:
        return x.new_zeros(0, values.shape[1])
    if not use_triton(x, backend):
        return patch_forward_torch(x, keys, bias, values, base, act)
    if strategy == "auto":
        if x.shape[0] <= FUSED_MAX_TOKENS:
            strategy = "fused"
        else:
            strategy = "compact" if act == ACT_RELU else "gemm"
    if strategy == "fused":
        return _patch_forward_fused(x, keys, bias, values, base, act, out_dtype, config)
    if strategy == "compact":
        return _patch_forward_compact(x, keys, bias, values, base, act, out_dtype)
    return _patch_forward_gemm(x, keys, bias, values, base, act, out_dtype)


class PatchForward(torch.autograd.Function):
    """Differentiable ``act(x K^T + b) V`` (the patch contribution, without the base)."""

    @staticmethod
    def forward(ctx, x, keys, bias, values, act, backend):  # type: ignore[override]
        ctx.save_for_backward(x, keys, bias, values)
        ctx.act = act
        return patch_forward(x, keys, bias, values, None, act, backend)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, keys, bias, values = ctx.saved_tensors
        pre = torch.addmm(bias.to(x.dtype), x, keys.t())
        with torch.enable_grad():
            pre_ = pre.detach().requires_grad_(True)
            h = activation_reference(pre_, ctx.act)
            (d_pre,) = torch.autograd.grad(h, pre_, grad_out @ values.t())
        grad_x = d_pre @ keys if ctx.needs_input_grad[0] else None
        grad_k = d_pre.t() @ x if ctx.needs_input_grad[1] else None
        grad_b = d_pre.sum(0).to(bias.dtype) if ctx.needs_input_grad[2] else None
        grad_v = h.detach().t() @ grad_out if ctx.needs_input_grad[3] else None
        return grad_x, grad_k, grad_b, grad_v, None, None
