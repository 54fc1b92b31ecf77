"""Fused memory loss of Transformer-Patcher patch training: pass 1 GEMM, exact top-k, pass 2 gather.

What it computes
----------------
During one edit, ``n`` new patch neurons (keys ``K`` (n, d), biases ``b`` (n,)) are trained against
the memory matrix ``Mem`` (N, d) of FFN inputs on unrelated examples. With the pre-activations
``A = Mem K^T + b`` (N, n) and ``k = min(topk, N)``, per neuron ``j``::

    L_m1_j = mean over the top-k rows i of column j of exp(A_ij - a_e_j + margin)
    L_m2_j = mean over the top-k rows i of column j of exp(A_ij + margin)

``exp`` is monotonic, so both terms use the same rows: the top-k of ``A[:, j]``. The gradients are
``w_ij = dL/dA_ij = (g1_j exp(A_ij - a_e_j + m) + g2_j exp(A_ij + m)) / k`` on the selected rows
(zero elsewhere), ``dL/dK_j = sum_i w_ij Mem_i``, ``dL/db_j = sum_i w_ij``,
``dL/da_e_j = -g1_j L_m1_j``. ``memory`` is a constant of the training step: it gets no gradient.

How (Triton path, one training step)
------------------------------------
1. Pass 1, ``_preact_kernel``: a skinny GEMM that streams ``Mem`` once in tiles of
   ``BLOCK_N`` rows x ``BLOCK_D`` columns against the (tiny, L2-resident) keys padded to
   ``BLOCK_J`` >= 16 columns for ``tl.dot``, fp32 accumulation (fp64 when an input is fp64), bias
   added in the epilogue; writes A fp32, which is small (N * n * 4 bytes, 3.2 MB for 40k x 20).
   Precision: for fp16/bf16 memory the keys are split in registers into ``hi + lo`` halves in the
   memory dtype (``lo`` scaled by 2^(mantissa+1) so it does not underflow): two tensor-core dots;
   fp32 memory uses ``input_precision="tf32x3"``. Either way A is accurate to ~fp32, not to the
   8-10 bits that rounding the fp32 keys to the memory dtype (or plain tf32) would give.
2. Exact top-k per column with ``torch.topk(A^T, k, dim=1)`` on the small matrix (pass 1 writes A
   transposed, (n, N), for the loss: top-k along the contiguous last dim, and the (n, k) indices
   come out in the layout pass 2 reads, with no copies). Why torch.topk and not a kernel: it is
   exact (no approximate selection) and it is the reference's own selection, ties included. The
   loss value does not depend on how ties are broken; the gradient is computed for exactly the rows
   ``torch.topk`` returned, and that set equals ``torch.topk(A, k, dim=0)``'s (the reference's
   call), checked with tied data on the CPU and on an H200. On CUDA ``sorted=False`` (the set is
   chosen before the optional sort of the k results; saves ~20 us); on the CPU ``sorted=True``,
   since there sorted=False switches algorithm (nth_element) and can break ties otherwise.
   Cost: A is only 4*N*n bytes (~1% of the step's traffic), but the multi-block radix select takes
   about as long as pass 1 on a GPU at N = 40,000, k = 1000. A fused selection kernel
   is the next speed-up; it would have to reproduce torch's tie-breaking to keep the guarantee.
3. Losses and the weights ``w`` (n, k) in torch (elementwise on k*n values).
4. Pass 2 (backward), ``_gather_rows_kernel``: ``dL/dK_j = sum_t w_jt Mem[idx_jt]``, a gather-GEMV
   over only the k selected rows per neuron (k*n rows, not N), int64 row offsets, split over the k
   rows into ``splits`` partial sums (deterministic: written to a (splits, n, d) buffer then summed,
   no atomics) so that small ``n * d`` still fills the GPU.

Bytes read per step (the roofline): ``N*d*elem`` (pass 1) + ``k*n*d*elem`` (pass 2) plus
O(N*n + k*n) for A, the top-k and the weights; see :func:`memory_loss_bytes`.

The PyTorch path (``backend="torch"`` or CPU tensors) computes the same thing: a chunked matmul for
A, ``torch.topk``, and ``index_select`` of the selected rows for the keys' gradient; it never builds
an autograd graph over the full (N, n) matrix.

An eager step is many small launches plus autograd, so it is CPU-bound on a fast GPU: benchmark it
with CUDA graphs or kernel times, not the wall time of single eager steps. Measured bandwidths are
in ``benchmarks/results/nvidia-h200/``.
"""

from __future__ import annotations

from typing import Any

import torch

from ._triton import stream_jit, tl, triton
from .dispatch import num_sms, use_triton

__all__ = [
    "PatchMemoryLoss",
    "patch_memory_loss",
    "patch_memory_loss_reference",
    "patch_preactivations",
    "memory_loss_bytes",
]

# ---------------------------------------------------------------------------------------------
# Block sizes (why they have their value)
# ---------------------------------------------------------------------------------------------
# Picked by a GPU sweep of BLOCK_N {64, 128}, BLOCK_D {64..256}, num_stages {3, 4}, num_warps {4, 8}
# (results in benchmarks/results/nvidia-h200/).
#: Pass 1, fp16/bf16 memory, n <= 16 (BLOCK_J = 16, the common case: 1-5 neurons per edit):
#: 64 rows x 128 columns = a 16 KB tile, 256 B (two whole cache lines) per row, K = 128 a multiple
#: of every tensor-core instruction's K; 3 stages of tile + fp32 keys tile fit in shared memory
#: (4 stages at BLOCK_D = 256 do not). N = 40,000 gives 625 programs, ~4.7 waves on 132 SMs.
#: The faster of the two at n = 1 and 5 (128 rows / 8 warps read about 8% slower).
PREACT_BLOCK_N_HALF = 64
PREACT_BLOCK_D_HALF = 128
PREACT_WARPS_HALF = 4
#: ... and n > 16 (BLOCK_J >= 32): 128 rows and 8 warps for the larger hi and lo accumulators.
#: Measured 2.87 TB/s at n = 20, against 2.54 for 64 rows / 4 warps.
PREACT_BLOCK_N_HALF_WIDE = 128
PREACT_WARPS_HALF_WIDE = 8
#: Pass 1, fp32 memory: 64 x 64 x 4 B = 16 KB tile, 256 B per row. Bigger tiles ran out of shared
#: memory at 4 stages and were slower at 3 (3xTF32 triples the dots). ~2.9-3.2 TB/s.
PREACT_BLOCK_N_FP32 = 64
PREACT_BLOCK_D_FP32 = 64
PREACT_WARPS_FP32 = 4
#: fp64 (gradchecks only): small tiles, fp64 dots have no fast path and use many registers.
PREACT_BLOCK_N_FP64 = 32
PREACT_BLOCK_D_FP64 = 32
PREACT_WARPS_FP64 = 4
#: Pass 1 software pipelining depth (loads of the next tiles in flight during the dots).
PREACT_STAGES = 3
#: tl.dot needs every dimension >= 16, so n is padded to a power of two >= 16 ...
MIN_BLOCK_J = 16
#: ... and at most 64 neurons per program (the accumulators stay in registers). More neurons than
#: that re-read memory once per 64 (the method uses n <= ~20).
MAX_BLOCK_J = 64
#: Pass 2 selected rows gathered per loop step: 64 independent scattered row loads in flight per
#: program hide the latency better than 32 (measured 1.6-2x faster at every n).
GATHER_BLOCK_K = 64
#: Pass 2 columns of d per program: 64 columns = 128 B (one cache line) of a 2-byte row; more
#: programs per neuron. Measured best or within 5% at n = 1, 5, 20 for bf16 and fp32.
GATHER_BLOCK_D = 64
#: Each pass-2 split sums at least this many rows, so its fp32 partial (d * 4 bytes) costs <= 1/32
#: of the rows it read (2-byte memory); lets n = 1 use ~15 splits (k = 1000): 566 vs 275 GB/s.
GATHER_MIN_ROWS_PER_SPLIT = 64
#: Pass 2 aims for this many programs per SM (latency hiding for scattered loads).
GATHER_PROGRAMS_PER_SM = 16
GATHER_WARPS = 4
#: Torch path: rows of memory converted and multiplied at once (bounds the temporary copy).
TORCH_CHUNK_ROWS = 8192

_MEMORY_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF_LO_SCALE = {torch.float16: 2.0**11, torch.bfloat16: 2.0**8}


def memory_loss_bytes(N: int, d: int, n: int, k: int, dtype: torch.dtype | int) -> int:
    """Bytes one training step must read from memory: ``N*d*elem + min(k, N)*n*d*elem``.

    ``dtype`` is the memory matrix's dtype (or its element size in bytes). Pass 1 reads the whole
    matrix once; pass 2 reads the ``min(k, N)`` selected rows of each of the ``n`` neurons. The
    O(N*n) traffic of A, the top-k and the weights is left out (under 2% at the paper's shapes).
    """
    elem = dtype if isinstance(dtype, int) else torch.empty((), dtype=dtype).element_size()
    kk = min(int(k), int(N))
    return int(N) * int(d) * elem + kk * int(n) * int(d) * elem


# ---------------------------------------------------------------------------------------------
# Triton kernels. TRITON_INTERPRET=1 must be set before triton is first imported (triton's own
# library functions such as tl.zeros are jit-decorated at its import), as `make test` does.
# ---------------------------------------------------------------------------------------------
#: Sizes that change from one edit to the next (the memory grows by the edit's own vectors; the
#: number of new neurons varies) are not specialised on: Triton would otherwise compile a new
#: kernel whenever one of them turns divisible by 16 or equal to 1, in the middle of a stream.
@stream_jit(varying=("N", "NJ", "stride_on", "stride_oj"))
def _preact_kernel(
    mem_ptr, keys_ptr, bias_ptr, out_ptr,
    N, D, NJ,
    stride_mn, stride_kn, stride_kd, stride_b, stride_on, stride_oj,
    SPLIT_KEYS: tl.constexpr, LO_SCALE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """A[rows, cols] = Mem[rows] @ K[cols]^T + b[cols] for one BLOCK_N x BLOCK_J tile; the output
    strides choose the layout, (N, n) or transposed (n, N).

    SPLIT_KEYS (fp16/bf16 memory): the keys, read in their own dtype, are split in registers into
    hi + lo / LO_SCALE, both in the memory dtype, for two tensor-core dots. Otherwise both operands
    are cast to ACC (fp32 with PRECISION, or fp64)."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_j = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    row_mask = rows < N
    col_mask = cols < NJ
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_N, BLOCK_J), dtype=ACC)
    acc_lo = tl.zeros((BLOCK_N, BLOCK_J), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        d_mask = dd < D
        m = tl.load(
            mem_ptr + rows[:, None] * stride_mn + dd[None, :],
            mask=row_mask[:, None] & d_mask[None, :], other=0.0,
        )
        kt = tl.load(  # (BLOCK_D, BLOCK_J): K^T, tiny and L2-resident
            keys_ptr + cols[None, :] * stride_kn + dd[:, None] * stride_kd,
            mask=col_mask[None, :] & d_mask[:, None], other=0.0,
        )
        if SPLIT_KEYS:
            kf = kt.to(tl.float32)
            khi = kf.to(m.dtype)
            klo = ((kf - khi.to(tl.float32)) * LO_SCALE).to(m.dtype)
            acc = tl.dot(m, khi, acc, out_dtype=ACC)
            acc_lo = tl.dot(m, klo, acc_lo, out_dtype=ACC)
        else:
            acc = tl.dot(m.to(ACC), kt.to(ACC), acc, input_precision=PRECISION, out_dtype=ACC)
    if SPLIT_KEYS:
        acc = acc + acc_lo * (1.0 / LO_SCALE)
    b = tl.load(bias_ptr + cols * stride_b, mask=col_mask, other=0.0).to(ACC)
    acc = acc + b[None, :]
    tl.store(
        out_ptr + rows[:, None] * stride_on + cols[None, :] * stride_oj, acc,
        mask=row_mask[:, None] & col_mask[None, :],
    )


@stream_jit(varying=("K", "NJ", "stride_ij", "stride_wj", "rows_per_split"))
def _gather_rows_kernel(
    mem_ptr, idx_ptr, w_ptr, part_ptr,
    K, D, NJ,
    stride_mn, stride_ij, stride_wj,
    rows_per_split,
    ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """part[s, j, dd] = sum over t in split s of w[j, t] * Mem[idx[j, t], dd]."""
    j = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2).to(tl.int64)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = dd < D
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    start = s * rows_per_split
    for t0 in range(0, rows_per_split, BLOCK_K):
        t = start + t0 + tl.arange(0, BLOCK_K)
        t_mask = t < K
        idx = tl.load(idx_ptr + j * stride_ij + t, mask=t_mask, other=0).to(tl.int64)
        w = tl.load(w_ptr + j * stride_wj + t, mask=t_mask, other=0.0).to(ACC)
        m = tl.load(
            mem_ptr + idx[:, None] * stride_mn + dd[None, :],
            mask=t_mask[:, None] & d_mask[None, :], other=0.0,
        ).to(ACC)
        acc += tl.sum(w[:, None] * m, axis=0)
    tl.store(part_ptr + (s * NJ + j) * D + dd, acc, mask=d_mask)


def _tl_dtype(dtype: torch.dtype) -> Any:
    return tl.float64 if dtype == torch.float64 else tl.float32


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------
def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (the accumulation dtype)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_inputs(
    memory: torch.Tensor,
    keys: torch.Tensor,
    bias: torch.Tensor,
    a_edit: torch.Tensor | None = None,
    topk: int | None = None,
) -> None:
    named = [("memory", memory), ("keys", keys), ("bias", bias)]
    if a_edit is not None:
        named.append(("a_edit", a_edit))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if memory.dim() != 2:
        raise ValueError(f"memory must be 2-D (N, d), got shape {tuple(memory.shape)}")
    N, d = memory.shape
    if N < 1:
        raise ValueError(f"memory must have N >= 1 rows, got shape {tuple(memory.shape)}")
    if d < 1:
        raise ValueError(f"memory must have d >= 1 columns, got shape {tuple(memory.shape)}")
    if keys.dim() != 2 or keys.shape[1] != d:
        raise ValueError(
            f"keys must have shape (n, d) with d = memory.shape[1] = {d}, got {tuple(keys.shape)}"
        )
    n = keys.shape[0]
    if n < 1:
        raise ValueError(f"keys must have n >= 1 neurons, got shape {tuple(keys.shape)}")
    if tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape (n,) = ({n},) like keys, got {tuple(bias.shape)}")
    if a_edit is not None and tuple(a_edit.shape) != (n,):
        raise ValueError(f"a_edit must have shape (n,) = ({n},) like keys, got {tuple(a_edit.shape)}")
    for name, t in named[1:]:
        if t.device != memory.device:
            raise ValueError(f"{name} is on {t.device} but memory is on {memory.device}; same device needed")
    if memory.dtype not in _MEMORY_DTYPES:
        raise TypeError(f"memory dtype must be one of {_MEMORY_DTYPES}, got {memory.dtype}")
    for name, t in named[1:]:
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
        raise ValueError(f"topk must be an int >= 1, got {topk!r}")


# ---------------------------------------------------------------------------------------------
# Pass 1: pre-activations
# ---------------------------------------------------------------------------------------------
def _preact_triton(
    memory: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor, cd: torch.dtype, transposed: bool
) -> torch.Tensor:
    if memory.stride(1) != 1:
        raise ValueError(
            f"memory must have a contiguous last dim (stride 1), got strides {memory.stride()}; "
            "call .contiguous() once when building the memory set"
        )
    N, d = memory.shape
    n = keys.shape[0]
    out = torch.empty((n, N) if transposed else (N, n), dtype=cd, device=memory.device)
    stride_on, stride_oj = (out.stride(1), out.stride(0)) if transposed else out.stride()
    split = cd == torch.float32 and memory.dtype in _HALF_LO_SCALE
    block_j = min(MAX_BLOCK_J, max(MIN_BLOCK_J, triton.next_power_of_2(n)))
    if cd == torch.float64:
        block_n, block_d, warps = PREACT_BLOCK_N_FP64, PREACT_BLOCK_D_FP64, PREACT_WARPS_FP64
    elif split:  # keys = hi + lo / scale in the memory dtype: two tensor-core dots, ~fp32 accuracy
        block_d = PREACT_BLOCK_D_HALF
        if block_j > MIN_BLOCK_J:
            block_n, warps = PREACT_BLOCK_N_HALF_WIDE, PREACT_WARPS_HALF_WIDE
        else:
            block_n, warps = PREACT_BLOCK_N_HALF, PREACT_WARPS_HALF
    else:  # fp32 memory: 3xTF32 on tensor cores, ~fp32 accuracy (plain tf32 has 10 bits)
        block_n, block_d, warps = PREACT_BLOCK_N_FP32, PREACT_BLOCK_D_FP32, PREACT_WARPS_FP32
    precision = "tf32x3" if memory.is_cuda and cd == torch.float32 else "ieee"
    grid = (triton.cdiv(N, block_n), triton.cdiv(n, block_j))
    keys, bias = keys.detach(), bias.detach()
    _preact_kernel[grid](
        memory, keys, bias, out,
        N, d, n,
        memory.stride(0), keys.stride(0), keys.stride(1), bias.stride(0), stride_on, stride_oj,
        SPLIT_KEYS=split, LO_SCALE=_HALF_LO_SCALE.get(memory.dtype, 1.0), ACC=_tl_dtype(cd),
        PRECISION=precision, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_J=block_j,
        num_warps=warps, num_stages=PREACT_STAGES,
    )
    return out


def _preact_torch(
    memory: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor, cd: torch.dtype, transposed: bool
) -> torch.Tensor:
    N, n = memory.shape[0], keys.shape[0]
    k_cd = keys.detach().to(cd)
    b = bias.detach().to(cd)
    out = torch.empty((n, N) if transposed else (N, n), dtype=cd, device=memory.device)
    for s in range(0, N, TORCH_CHUNK_ROWS):  # bounded temporary for the dtype conversion
        e = min(N, s + TORCH_CHUNK_ROWS)
        chunk = memory[s:e].detach().to(cd)
        if transposed:
            torch.addmm(b[:, None], k_cd, chunk.t(), out=out[:, s:e])
        else:
            torch.addmm(b, chunk, k_cd.t(), out=out[s:e])
    return out


def _preact(memory, keys, bias, cd, triton_path: bool, transposed: bool = False) -> torch.Tensor:
    """A (N, n), or A^T (n, N) with ``transposed`` (the loss's layout: top-k along the last dim)."""
    with torch.no_grad():
        if triton_path:
            return _preact_triton(memory, keys, bias, cd, transposed)
        return _preact_torch(memory, keys, bias, cd, transposed)


def patch_preactivations(
    memory: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor, backend: str | None = None
) -> torch.Tensor:
    """Pass 1 alone: ``A = memory @ keys.T + bias``, (N, n), fp32 (fp64 if an input is fp64).

    Not differentiable (computed without autograd); meant for initialising biases.
    """
    _check_inputs(memory, keys, bias)
    cd = _compute_dtype(memory, keys, bias)
    return _preact(memory, keys, bias, cd, use_triton(memory, backend))


# ---------------------------------------------------------------------------------------------
# Pass 2: gather of the selected rows (the keys' gradient)
# ---------------------------------------------------------------------------------------------
def _gather_triton(memory: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(n, d): row j = sum_t w[j, t] * memory[idx[j, t]]; idx, w are (n, k), contiguous."""
    if memory.stride(1) != 1:
        raise ValueError(f"memory must have a contiguous last dim (stride 1), got strides {memory.stride()}")
    n, k = idx.shape
    d = memory.shape[1]
    cd = w.dtype
    idx_t = idx.contiguous()  # already contiguous (topk along the last dim): no copies
    w_t = w.contiguous()
    d_blocks = triton.cdiv(d, GATHER_BLOCK_D)
    if memory.is_cuda:
        target = GATHER_PROGRAMS_PER_SM * num_sms(memory.device, 1)
    else:  # interpreter: a few splits, so the split path is exercised by the CPU tests
        target = 8
    splits = max(1, min(triton.cdiv(target, n * d_blocks), k // GATHER_MIN_ROWS_PER_SPLIT))
    rows_per_split = triton.cdiv(triton.cdiv(k, splits), GATHER_BLOCK_K) * GATHER_BLOCK_K
    splits = triton.cdiv(k, rows_per_split)
    part = torch.empty((splits, n, d), dtype=cd, device=memory.device)
    _gather_rows_kernel[(n, d_blocks, splits)](
        memory, idx_t, w_t, part,
        k, d, n,
        memory.stride(0), idx_t.stride(0), w_t.stride(0),
        rows_per_split,
        ACC=_tl_dtype(cd), BLOCK_K=GATHER_BLOCK_K, BLOCK_D=GATHER_BLOCK_D,
        num_warps=GATHER_WARPS,
    )
    return part[0] if splits == 1 else part.sum(0)


def _gather_torch(memory: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    n = idx.shape[0]
    out = torch.empty((n, memory.shape[1]), dtype=w.dtype, device=memory.device)
    for j in range(n):  # one (k, d) gather at a time: bounded temporary, n is small
        rows = memory.index_select(0, idx[j]).to(w.dtype)
        torch.mv(rows.t(), w[j], out=out[j])
    return out


# ---------------------------------------------------------------------------------------------
# autograd Function and public API
# ---------------------------------------------------------------------------------------------
class PatchMemoryLoss(torch.autograd.Function):
    """``(l_m1, l_m2) = PatchMemoryLoss.apply(memory, keys, bias, a_edit, topk, margin[, backend])``.

    Gradients for keys, bias and a_edit; memory is a constant (no gradient).
    """

    @staticmethod
    def forward(ctx, memory, keys, bias, a_edit, topk, margin, backend=None, stats=None):  # type: ignore[override]
        _check_inputs(memory, keys, bias, a_edit, topk)
        triton_path = use_triton(memory, backend)
        cd = _compute_dtype(memory, keys, bias, a_edit)
        At = _preact(memory, keys, bias, cd, triton_path, transposed=True)  # (n, N)
        k = min(int(topk), memory.shape[0])
        # Exact, (n, k). On CUDA the selected set does not depend on `sorted` (selection, then an
        # optional sort of the k results), so skip the sort; on the CPU sorted=False can take
        # another algorithm (nth_element) and break ties otherwise, so keep the reference's call.
        vals, idx = torch.topk(At, k, dim=1, sorted=not At.is_cuda)
        z = vals + float(margin)
        e1 = torch.exp(z - a_edit.detach().to(cd)[:, None])
        e2 = torch.exp(z)
        l1 = e1.mean(1)
        l2 = e2.mean(1)
        if stats is not None:  # the largest memory pre-activation per neuron: free here
            stats["mem_max"] = vals.max(dim=1).values.detach()
        ctx.save_for_backward(memory, idx, e1, e2, l1)
        ctx.triton_path = triton_path
        ctx.dtypes = (keys.dtype, bias.dtype, a_edit.dtype)
        return l1, l2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g1, g2):  # type: ignore[override]
        memory, idx, e1, e2, l1 = ctx.saved_tensors
        n, k = idx.shape
        cd = e1.dtype
        g1 = torch.zeros(n, dtype=cd, device=e1.device) if g1 is None else g1.to(cd)
        g2 = torch.zeros(n, dtype=cd, device=e1.device) if g2 is None else g2.to(cd)
        w = (e1 * g1[:, None] + e2 * g2[:, None]) / k  # dL/dA^T on the selected rows, (n, k)
        grad_keys = grad_bias = grad_a = None
        kd, bd, ad = ctx.dtypes
        if ctx.needs_input_grad[1]:
            gather = _gather_triton if ctx.triton_path else _gather_torch
            grad_keys = gather(memory, idx, w).to(kd)
        if ctx.needs_input_grad[2]:
            grad_bias = w.sum(1).to(bd)
        if ctx.needs_input_grad[3]:
            grad_a = (-g1 * l1).to(ad)
        return None, grad_keys, grad_bias, grad_a, None, None, None, None


def patch_memory_loss(
    memory: torch.Tensor,
    keys: torch.Tensor,
    bias: torch.Tensor,
    a_edit: torch.Tensor,
    topk: int = 1000,
    margin: float = 3.0,
    backend: str | None = None,
    stats: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-neuron memory losses ``(l_m1, l_m2)``, each (n,), fp32 (fp64 if an input is fp64).

    ``backend``: None/"auto" (Triton on CUDA), "triton" or "torch"; see ``dispatch.use_triton``.
    ``memory`` (N, d) is treated as a constant; keys (n, d), bias (n,), a_edit (n,) get gradients.
    ``stats``: if a dict is given, ``stats["mem_max"]`` receives each neuron's largest memory
    pre-activation (n,), which the editor's stopping rule needs (is the patch silent on memory?).
    """
    _check_inputs(memory, keys, bias, a_edit, topk)
    return PatchMemoryLoss.apply(memory.detach(), keys, bias, a_edit, int(topk), float(margin), backend, stats)


def patch_memory_loss_reference(
    memory: torch.Tensor,
    keys: torch.Tensor,
    bias: torch.Tensor,
    a_edit: torch.Tensor,
    topk: int = 1000,
    margin: float = 3.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch (matmul, topk, exp, mean), differentiable by autograd. Computes in the
    promoted dtype of the inputs, at least fp32."""
    cd = torch.promote_types(
        torch.promote_types(memory.dtype, keys.dtype),
        torch.promote_types(torch.promote_types(bias.dtype, a_edit.dtype), torch.float32),
    )
    A = memory.to(cd) @ keys.to(cd).t() + bias.to(cd)
    k = min(int(topk), A.shape[0])
    top = torch.topk(A, k, dim=0).values
    l_m1 = torch.exp(top - a_edit.to(cd) + margin).mean(0)
    l_m2 = torch.exp(top + margin).mean(0)
    return l_m1, l_m2
