"""Triton building blocks shared by the patch kernels: activations, row projections, and the
sparse accumulation of value rows into an fp32 workspace.

All offsets are int64: ``P * d`` passes 2^31 at P = 500k patches of d = 4096.
"""

from __future__ import annotations

from ._triton import HAS_TRITON, tl, triton

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


#: Most fp32 accumulator elements a single-token projection keeps as 2-D tiles of products
#: (BLOCK_D * BLOCK_R, twice that for the gate/up pair): 8 K are 64 registers a thread at 4 warps,
#: which leaves room for the loaded tiles. Larger tiles reduce over D each iteration instead.
GEMV_ACC2_MAX = tl.constexpr(8192) if HAS_TRITON else 8192


@triton.jit
def mm(a, b, acc, BLOCK_M: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``acc + a @ b`` for an (BLOCK_M, K) by (K, N) tile pair, fp32 accumulation.

    ``tl.dot`` needs at least 16 rows; a single row (batch-1 decode) is a broadcast multiply and a
    sum over K instead, so the weight tile stays in registers rather than being staged through
    shared memory for 15 rows of padding.
    """
    if BLOCK_M == 1:
        return acc + tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    else:
        return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def block_range(pid, BLOCK: tl.constexpr, n):
    """Offsets (int64) of block ``pid`` of size ``BLOCK`` along a dimension of ``n``, and their mask."""
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    return offs, offs < n


@triton.jit
def load_tile(ptr, offs_r, r_mask, stride_r, offs_c, c_mask, stride_c):
    """The (rows, cols) tile ``ptr[offs_r, offs_c]`` of a strided matrix, zero outside the masks."""
    return tl.load(ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c,
                   mask=r_mask[:, None] & c_mask[None, :], other=0.0)


@triton.jit
def project_rows(
    x_ptr, w_ptr, offs_m, m_mask, offs_r, r_mask, D,
    stride_xm, stride_xd, stride_wr, stride_wd,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """``x[offs_m] @ W[offs_r]^T`` as a (BLOCK_M, BLOCK_R) fp32 tile, looping over ``D``.

    A single token (``BLOCK_M == 1``) with a tile of at most ``GEMV_ACC2_MAX`` elements keeps a
    (BLOCK_D, BLOCK_R) fp32 accumulator of products and reduces it over ``D`` once after the
    loop: no cross-thread reduction per iteration, only FMAs between the loads. Larger GEMV tiles
    reduce each iteration instead (the 2-D accumulator would spill registers).
    """
    if BLOCK_M == 1 and BLOCK_D * BLOCK_R <= GEMV_ACC2_MAX:
        acc2 = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            d_mask = offs_d < D
            xc = load_tile(x_ptr, offs_d, d_mask, stride_xd, offs_m, m_mask, stride_xm)  # (BLOCK_D, 1)
            wt = load_tile(w_ptr, offs_d, d_mask, stride_wd, offs_r, r_mask, stride_wr)
            acc2 += xc.to(tl.float32) * wt.to(tl.float32)
        return tl.sum(acc2, axis=0)[None, :]
    else:  # ``mm``: tl.dot for 16+ rows, a per-iteration reduction for a large single-token tile
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            d_mask = offs_d < D
            xt = load_tile(x_ptr, offs_m, m_mask, stride_xm, offs_d, d_mask, stride_xd)
            wt = load_tile(w_ptr, offs_d, d_mask, stride_wd, offs_r, r_mask, stride_wr)
            acc = mm(xt, wt, acc, BLOCK_M, INPUT_PRECISION)
        return acc


@triton.jit
def project_rows_pair(
    x_ptr, wa_ptr, wb_ptr, offs_m, m_mask, offs_r, r_mask, D,
    stride_xm, stride_xd, stride_ar, stride_ad, stride_br, stride_bd,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """``(x Wa[offs_r]^T, x Wb[offs_r]^T)`` in one pass over ``D`` (gate and up of a gated MLP).

    One loop instead of two shares each ``x`` tile and keeps twice the weight bytes in flight per
    iteration, which is what a memory-bound decode step needs. One token accumulates products
    and reduces after the loop where the two accumulators fit, as in ``project_rows``.
    """
    if BLOCK_M == 1 and 2 * BLOCK_D * BLOCK_R <= GEMV_ACC2_MAX:
        acc_a2 = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
        acc_b2 = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            d_mask = offs_d < D
            xc = load_tile(x_ptr, offs_d, d_mask, stride_xd, offs_m, m_mask, stride_xm).to(tl.float32)
            wa = load_tile(wa_ptr, offs_d, d_mask, stride_ad, offs_r, r_mask, stride_ar)
            wb = load_tile(wb_ptr, offs_d, d_mask, stride_bd, offs_r, r_mask, stride_br)
            acc_a2 += xc * wa.to(tl.float32)
            acc_b2 += xc * wb.to(tl.float32)
        return tl.sum(acc_a2, axis=0)[None, :], tl.sum(acc_b2, axis=0)[None, :]
    else:  # ``mm``: tl.dot for 16+ rows, a per-iteration reduction for a large single-token tile
        acc_a = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            d_mask = offs_d < D
            xt = load_tile(x_ptr, offs_m, m_mask, stride_xm, offs_d, d_mask, stride_xd)
            wa = load_tile(wa_ptr, offs_d, d_mask, stride_ad, offs_r, r_mask, stride_ar)
            wb = load_tile(wb_ptr, offs_d, d_mask, stride_bd, offs_r, r_mask, stride_br)
            acc_a = mm(xt, wa, acc_a, BLOCK_M, INPUT_PRECISION)
            acc_b = mm(xt, wb, acc_b, BLOCK_M, INPUT_PRECISION)
        return acc_a, acc_b


@triton.jit
def accumulate_rows(
    h, w_ptr, offs_r, r_mask, ws_ptr, offs_m, m_mask, D_OUT, rot,
    stride_wr, stride_wn, stride_sm, stride_sn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """``ws[offs_m] += h @ W[offs_r]`` over all ``D_OUT`` columns, with fp32 atomics.

    ``h`` is (BLOCK_M, BLOCK_R) and already zero on masked rows/columns. The column blocks are
    visited starting at block ``rot`` (mod their count): programs that pass their own id spread
    their atomics over the workspace instead of all adding into the same addresses at once.
    Rows of ``W`` whose column of ``h`` is all zero (ReLU patches that fire on none of these
    tokens) are never read: they add nothing, and whatever they hold (even NaN) stays out.
    """
    r_mask = r_mask & (tl.max(tl.abs(h), axis=0) > 0.0)
    hv = h.to(w_ptr.dtype.element_ty)
    num_nb = tl.cdiv(D_OUT, BLOCK_N)
    first = rot % num_nb
    for i in range(0, num_nb):
        nb = first + i
        nb = tl.where(nb >= num_nb, nb - num_nb, nb)
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        n_mask = offs_n < D_OUT
        wt = load_tile(w_ptr, offs_r, r_mask, stride_wr, offs_n, n_mask, stride_wn)
        contrib = mm(hv, wt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), BLOCK_M, INPUT_PRECISION)
        tl.atomic_add(
            ws_ptr + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn,
            contrib, mask=m_mask[:, None] & n_mask[None, :], sem="relaxed",
        )


@triton.jit
def store_plus_base(
    acc, base_ptr, out_ptr, offs_m, offs_n, m_mask, n_mask,
    stride_bm, stride_bn, stride_om, stride_on, HAS_BASE: tl.constexpr,
):
    """``out[offs_m, offs_n] = acc (+ base)`` in the output's dtype."""
    if HAS_BASE:
        acc += load_tile(base_ptr, offs_m, m_mask, stride_bm, offs_n, n_mask, stride_bn).to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------- launch helpers
#: Token buckets: a kernel's BLOCK_M. Decode batches up to 16 tokens share one 16-row tile (the
#: smallest ``tl.dot`` tile); one token may also run as a GEMV (BLOCK_M = 1).
TOKEN_BUCKETS = (1, 16, 32, 64)


def token_bucket(M: int) -> int:
    """The token bucket of an ``M``-token input: its tile height and its autotune key."""
    return 1 if M == 1 else next((b for b in TOKEN_BUCKETS[1:] if M <= b), TOKEN_BUCKETS[-1])


def candidate_configs(block_name: str, dot_tiles: list[tuple], gemv_tiles: list[tuple], larger: dict[int, int]) -> list:
    """``triton.Config`` candidates of a kernel tiled over tokens and over ``block_name``.

    Tiles are ``(BLOCK_<rows>, BLOCK_D, BLOCK_N, warps, stages)``, optionally followed by a dict
    of further meta-parameters of the kernel. The 16-token bucket gets every ``tl.dot`` tile, a
    single token every GEMV tile, and bucket ``b`` of ``larger`` the first ``larger[b]`` dot
    tiles. Within a bucket the first candidate is the default.
    """
    def cfg(block_m: int, tile: tuple):
        rows, block_d, block_n, warps, stages, *extra = tile
        kwargs = {"BLOCK_M": block_m, block_name: rows, "BLOCK_D": block_d, "BLOCK_N": block_n}
        for more in extra:
            kwargs.update(more)
        return triton.Config(kwargs, num_warps=warps, num_stages=stages)

    out = [cfg(16, t) for t in dot_tiles] + [cfg(1, t) for t in gemv_tiles]
    for bucket, n in larger.items():
        out += [cfg(bucket, t) for t in dot_tiles[:n]]
    return out


def configs_for(configs: list, M: int) -> list:
    """The candidates among ``configs`` (each with a ``BLOCK_M``) for ``M`` tokens, default first.

    One token may run padded to a 16-row ``tl.dot`` tile (the default: what was measured first)
    or as a GEMV; more tokens run at their bucket's tile height.
    """
    bucket = token_bucket(M)
    memo = _CANDIDATES.get((id(configs), bucket))  # launchers call this on every forward
    if memo is None or memo[0] is not configs:
        allowed = (16, 1) if bucket == 1 else (bucket,)
        memo = (configs, [c for b in allowed for c in configs if c.kwargs["BLOCK_M"] == b])
        _CANDIDATES[(id(configs), bucket)] = memo
    return memo[1]


_CANDIDATES: dict[tuple[int, int], tuple[list, list]] = {}


def prune_by_tokens(configs: list, named_args: dict, **kwargs) -> list:
    """``triton.autotune`` early prune: keep the candidates of the call's token bucket."""
    return configs_for(configs, named_args["M"])


def work_bucket(P: int, F: int = 0) -> int:
    """A coarse size class of a patch bank, for autotune keys: a bank grows one edit at a time,
    and retuning at every size would stall the caller. With ``F`` (fused FFN), the class is the
    bank's size relative to the FFN's own neurons in powers of 4 (0 patches, < F/16, < F/4, < F,
    < 4F, more); without, powers of 4 of ``P`` itself.
    """
    if P <= 0:
        return 0
    if F > 0:
        ratio_edges = (F / 16, F / 4, F, 4 * F)
        return 1 + sum(P >= e for e in ratio_edges)
    return 1 + (P.bit_length() - 1) // 2
