"""Fused patched FFN: the original FFN and its patch neurons in one launch (decode-sized inputs).

The patch neurons are extra neurons of the FFN's intermediate dimension:

- original neurons: ``h = act(x Wg^T + bg) * (x Wu^T + bu)`` (gated: Llama, Qwen, Mistral,
  Gemma, T5 v1.1) or ``h = act(x Wu^T + bu)`` (two-matrix: GPT-2, BERT, T5, BART), times ``Wd``;
- patch neurons: ``h = patch_act(x K^T + b)``, times ``V``; the value rows of ReLU patches that
  fire on none of the tokens are never read.

Why one launch: at decode sizes the FFN is memory-bound, and its ideal cost is one read of
``Wg, Wu, Wd``, the keys and the active value rows. The unfused path pays four to six launches
and an (M, F) intermediate round trip. The kernel reads the base weights in their stored layout
through strides (Conv1D's transposed weights included): no copy. Above ``fused_ffn_max_tokens``
tokens cuBLAS GEMMs for the base FFN plus ``patch_forward`` are faster, and ``PatchedFFN``
dispatches there.

The schedule (``_fused_ffn_split_kernel``, see the comment above ``_SPLIT_TILES``): up shares
write the activations of equal byte shares of the neurons to a scratch buffer; down tasks (one
neuron group by one output slice) add each slice of the output once. The adds are fp32 atomics,
so results can differ from run to run in the last fp32 bit: under
``torch.use_deterministic_algorithms(True)`` ``PatchedFFN`` does not take this path.

Launch configuration: the token bucket's first candidate of ``SPLIT_CONFIGS`` that fits shared
memory (``default_split_config``); ``FASTPATCH_SPLIT_AUTOTUNE=1`` lets ``triton.autotune`` pick
among them. The schedule it replaced (every program adds into the whole output) is kept for
comparison in ``benchmarks/kernels_atomic.py``; what every choice here measured is in
``benchmarks/results/``.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch

from ._blocks import (
    act_fn, candidate_configs, configs_for, load_tile, mm, project_rows, project_rows_pair, prune_by_tokens, token_bucket,
    work_bucket,
)
from ._triton import autotune, autotune_enabled, interpret_mode, launch, tl, triton
from .dispatch import num_sms
from .reference import ACT_RELU

__all__ = ["fused_patched_ffn", "fused_ffn_launch", "FUSED_FFN_MAX_TOKENS", "fused_ffn_max_tokens", "ffn_grid_size",
           "SPLIT_CONFIGS", "split_configs_for", "default_split_config", "smem_estimate", "first_fitting",
           "check_ffn_args", "check_config", "launch_args"]

#: Above this many tokens the base FFN goes to cuBLAS (+ ``patch_forward``): the largest token
#: count at which this kernel was measured to beat that path (128 was not timed, so the bound
#: stays at the last measured win).
FUSED_FFN_MAX_TOKENS = 64
#: fp32 inputs keep the smaller bound: fp32 tiles spill registers (the 64-row tiles,
#: ``benchmarks/compile_check.py``) and fp32 was not timed at 32-64 tokens.
FUSED_FFN_MAX_TOKENS_FP32 = 16


def fused_ffn_max_tokens(dtype: torch.dtype) -> int:
    """Most tokens a call in ``dtype`` sends to the one-launch kernel (above: cuBLAS + patches)."""
    return FUSED_FFN_MAX_TOKENS_FP32 if dtype == torch.float32 else FUSED_FFN_MAX_TOKENS


#: Neurons are handed to programs in granules of 16: 32 bytes of a bf16 row of the neuron-major
#: down weight (``Wd^T``, stride F), the smallest unit a memory transaction reads whole.
GRANULE = 16
#: Interpreter stand-in for the number of multiprocessors, so that the work is split over several
#: programs (and their boundaries are tested) on the CPU.
INTERPRETER_SMS = 3

#: Shared memory a configuration may plan for: sm_90 gives a program up to 227 KB; the margin
#: covers the down-projection tiles and the compiler's own scratch.
SMEM_BUDGET = 200 * 1024


def smem_estimate(config: "triton.Config", elem_bytes: int, gated: bool = True) -> int:
    """Shared memory of a configuration's software pipelines, in bytes. The two loops run one
    after the other, so the larger of them: the up-projection stages the x tile and the 2 (gated)
    or 1 weight tiles, the down-projection a weight tile of ``Wd`` and the activation tile;
    ``num_stages - 1`` buffers of them, one more where 16-bit tiles of 64 or more rows go to
    Hopper's asynchronous MMA (wgmma) with a pipeline of 3 stages or more. ``benchmarks/
    compile_check.py`` checks it against what the compiler allots. GEMV tiles stay in registers."""
    k = config.kwargs
    if k["BLOCK_M"] == 1:
        return 0
    up = k["BLOCK_M"] * k["BLOCK_D"] + (2 if gated else 1) * k["BLOCK_D"] * k["BLOCK_F"]
    down = k["BLOCK_F"] * k["BLOCK_N"] + k["BLOCK_M"] * k["BLOCK_F"]
    buffers = max(1, config.num_stages - 1)
    if k["BLOCK_M"] >= 64 and elem_bytes == 2 and config.num_stages >= 3:
        buffers += 1
    return buffers * elem_bytes * max(up, down)


def first_fitting(configs: list, dtype: torch.dtype, gated: bool) -> "triton.Config":
    """The first of ``configs`` (one token bucket's candidates) that fits ``SMEM_BUDGET`` at this
    element size (deep bf16 pipelines do not fit in fp32), else the last."""
    return next((c for c in configs if smem_estimate(c, dtype.itemsize, gated) <= SMEM_BUDGET), configs[-1])


def _prune(configs: list, named_args: dict, **kwargs) -> list:
    """``triton.autotune`` early prune: the token bucket's candidates that fit in shared memory
    (compiling one that does not costs seconds before it fails)."""
    out = prune_by_tokens(configs, named_args)
    dtype = getattr(named_args.get("x_ptr"), "dtype", None)
    if dtype is None:
        return out
    fits = [c for c in out if smem_estimate(c, dtype.itemsize, bool(kwargs.get("GATED", True))) <= SMEM_BUDGET]
    return fits or out[-1:]


@triton.jit
def neuron_activations(
    x_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, offs_m, m_mask, offs_f, f_mask, D,
    stride_xm, stride_xd, stride_gf, stride_gd, stride_uf, stride_ud,
    GATED: tl.constexpr, HAS_BG: tl.constexpr, HAS_BU: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """The (BLOCK_M, BLOCK_F) fp32 activations of original neurons ``offs_f``: ``act(x Wg^T + bg) *
    (x Wu^T + bu)`` (gated) or ``act(x Wu^T + bu)``."""
    if GATED:
        gate, up = project_rows_pair(x_ptr, wg_ptr, wu_ptr, offs_m, m_mask, offs_f, f_mask, D,
                                     stride_xm, stride_xd, stride_gf, stride_gd, stride_uf, stride_ud,
                                     BLOCK_M, BLOCK_F, BLOCK_D, INPUT_PRECISION)
        if HAS_BG:
            gate += tl.load(bg_ptr + offs_f, mask=f_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_BU:
            up += tl.load(bu_ptr + offs_f, mask=f_mask, other=0.0).to(tl.float32)[None, :]
        return act_fn(gate, ACT) * up
    else:
        up = project_rows(x_ptr, wu_ptr, offs_m, m_mask, offs_f, f_mask, D,
                          stride_xm, stride_xd, stride_uf, stride_ud,
                          BLOCK_M, BLOCK_F, BLOCK_D, INPUT_PRECISION)
        if HAS_BU:
            up += tl.load(bu_ptr + offs_f, mask=f_mask, other=0.0).to(tl.float32)[None, :]
        return act_fn(up, ACT)


@triton.jit
def patch_activations(
    x_ptr, k_ptr, kb_ptr, offs_m, m_mask, offs_p, p_mask, D, stride_xm, stride_xd, stride_kp, stride_kd,
    PATCH_ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """The (BLOCK_M, BLOCK_F) fp32 activations ``patch_act(x K^T + b)`` of patches ``offs_p``."""
    pre = project_rows(x_ptr, k_ptr, offs_m, m_mask, offs_p, p_mask, D,
                       stride_xm, stride_xd, stride_kp, stride_kd,
                       BLOCK_M, BLOCK_F, BLOCK_D, INPUT_PRECISION)
    kb = tl.load(kb_ptr + offs_p, mask=p_mask, other=0.0).to(tl.float32)
    return act_fn(pre + kb[None, :], PATCH_ACT)


@triton.jit
def work_ranges(start, end, F, P, cost_b, GRAN: tl.constexpr):
    """The original neurons ``[f_lo, f_hi)`` and patches ``[p_lo, p_hi)`` at work positions
    ``[start, end)``: granules of ``GRAN`` original neurons first, ``cost_b`` positions each (the
    weight rows one reads), then granules of patches, one position each (a key row)."""
    nb = tl.cdiv(F, GRAN)
    base_cost = nb * cost_b
    f_lo = tl.minimum(tl.cdiv(start, cost_b), nb) * GRAN
    f_hi = tl.minimum(tl.minimum(tl.cdiv(end, cost_b), nb) * GRAN, F)
    p_lo = tl.minimum(tl.maximum(start - base_cost, 0), tl.cdiv(P, GRAN)) * GRAN
    p_hi = tl.minimum(tl.maximum(end - base_cost, 0) * GRAN, P)
    return f_lo, f_hi, p_lo, p_hi


# ----------------------------------------------------------------------------- the schedule
#: One launch, two phases. A program's queue of tasks holds
#:
#: - ``up`` shares: equal byte shares of the neurons (a granule of original neurons costs its 2
#:   (gated) or 1 weight rows, one of patch neurons its key row); a share writes its activations
#:   ``h`` (M x neurons, in the weights' dtype) to a scratch buffer and counts its granules into
#:   the ``done`` counter of every neuron group (``GROUP_F`` neurons) it touched (release);
#: - ``down`` tasks, one per (neuron group, output slice of ``BLOCK_N`` columns): wait until the
#:   group's counter holds all its granules (acquire), multiply the group's activations into its
#:   down rows (or the active value rows of a patch group) in registers, and add the slice with
#:   one atomic per element: ``groups * M * d_out`` adds in all, where a schedule in which every
#:   program adds its neurons into the whole output pays ``programs * M * d_out``.
#:
#: Deadlock freedom without assuming that every program is resident: programs claim task indices
#: from one atomic counter, and every up share precedes every down task in that order, so when a
#: down task is claimed all shares were claimed already, by programs that are running and never
#: wait themselves. (The interpreter runs one program at a time: the first claims every task in
#: order and never waits.) A wait that exceeds ``SPIN_LIMIT`` polls (a counting bug, never a
#: schedule) sets the token block's error flag, which the launcher checks where it is free
#: (the interpreter).
#:
#: (BLOCK_F, BLOCK_D, BLOCK_N = output slice, warps, stages, {PROGRAMS_PER_SM, GROUP_F}): the
#: down tile is BLOCK_F x BLOCK_N, as many bytes as the up pair's two BLOCK_D x BLOCK_F tiles at
#: BLOCK_N = 2 BLOCK_D, so one pipeline depth fits both loops. The first candidate is the default
#: (the fastest measured at 1 and 16 tokens); the others are the runners-up that the tuner may
#: pick elsewhere: larger neuron groups, other depths, programs per SM, slice widths and warps.
_SPLIT_TILES = [
    (64, 128, 256, 4, 4, {"PROGRAMS_PER_SM": 2, "GROUP_F": 256}),
    (64, 128, 256, 4, 4, {"PROGRAMS_PER_SM": 2, "GROUP_F": 512}),
    (64, 128, 128, 4, 4, {"PROGRAMS_PER_SM": 2, "GROUP_F": 256}),
    (64, 128, 256, 4, 3, {"PROGRAMS_PER_SM": 3, "GROUP_F": 256}),
    (64, 128, 256, 4, 4, {"PROGRAMS_PER_SM": 4, "GROUP_F": 256}),
    (32, 256, 256, 4, 3, {"PROGRAMS_PER_SM": 2, "GROUP_F": 128}),
    (64, 128, 256, 8, 4, {"PROGRAMS_PER_SM": 1, "GROUP_F": 256}),
]
#: Tiles of the 32- and 64-token buckets: a 64 x 256 fp32 slice accumulator would spill, so
#: 128-column slices.
_SPLIT_TILES_LARGE = [
    (64, 64, 128, 4, 3, {"PROGRAMS_PER_SM": 2, "GROUP_F": 256}),
    (32, 128, 128, 4, 3, {"PROGRAMS_PER_SM": 2, "GROUP_F": 128}),
]
#: Every candidate; the 16-row tile serves 1 to 16 tokens.
SPLIT_CONFIGS = candidate_configs("BLOCK_F", _SPLIT_TILES, [], {}) + [
    c for c in candidate_configs("BLOCK_F", _SPLIT_TILES_LARGE, [], {32: 2, 64: 2}) if c.kwargs["BLOCK_M"] > 16]
#: Smallest neuron group of any candidate: the launcher sizes the ``done`` counters by it.
_MIN_GROUP_F = min(c.kwargs["GROUP_F"] for c in SPLIT_CONFIGS)
#: Polls of a group counter before a down task gives up and flags the error (about a second on a
#: GPU; a correct schedule waits at most for one up share, tens of microseconds).
SPIN_LIMIT = 1 << 20
#: Read the kernel's error flags after each launch (a device sync; always on in the interpreter,
#: where it is free). ``benchmarks/gpu_check.py`` sets it for its correctness checks.
CHECK_SPLIT_FLAGS = False


def split_configs_for(M: int) -> list:
    """The candidate launch configurations for ``M`` tokens; the first is the default."""
    return configs_for(SPLIT_CONFIGS, M)


@triton.jit
def release_granules(done_ptr, lo, hi, GROUP_F: tl.constexpr, GRAN: tl.constexpr):
    """Add the granules of neurons ``[lo, hi)`` to the ``done`` counters of the groups of
    ``GROUP_F`` neurons they fall in (release: the activations stored before are visible to a
    down task that reads the count with acquire)."""
    if hi > lo:
        for g in range(lo // GROUP_F, tl.cdiv(hi, GROUP_F)):
            g_lo = tl.maximum(lo, g * GROUP_F)
            g_hi = tl.minimum(hi, (g + 1) * GROUP_F)
            tl.atomic_add(done_ptr + g, tl.cdiv(g_hi - g_lo, GRAN).to(tl.int32), sem="release")


@autotune(
    configs=SPLIT_CONFIGS,
    key=["M_BUCKET", "P_BUCKET", "D", "D_OUT", "F"],
    prune_configs_by={"early_config_prune": _prune},
    restore_value=["ws_ptr", "sync_ptr"],  # accumulates into ws, counts in sync
)
# Still specialised on the bank size (see tests/test_specialization.py): opted out as the others
# are, its decode step slowed on the H200 for a reason not yet found (run 2026-12-04T1750 in
# benchmarks/results/nvidia-h200).
@triton.jit
def _fused_ffn_split_kernel(
    x_ptr, wg_ptr, wu_ptr, wd_ptr, bg_ptr, bu_ptr, bd_ptr, k_ptr, kb_ptr, v_ptr, h_ptr, ws_ptr, sync_ptr,
    M, M_BUCKET, P_BUCKET, D, D_OUT, F, P, NG_MAX, SPIN,
    stride_xm, stride_xd,
    stride_gf, stride_gd, stride_uf, stride_ud, stride_df, stride_dn,
    stride_kp, stride_kd, stride_vp, stride_vn, stride_hm, stride_hf, stride_sm, stride_sn,
    GATED: tl.constexpr, HAS_BG: tl.constexpr, HAS_BU: tl.constexpr, HAS_BD: tl.constexpr,
    ACT: tl.constexpr, PATCH_ACT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr, GROUP_F: tl.constexpr, GRAN: tl.constexpr,
):
    pid_m = tl.program_id(1).to(tl.int64)
    n_blocks_m = tl.num_programs(1).to(tl.int64)
    n_shares = tl.num_programs(0).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    m_mask = offs_m < M
    # sync: [claim counter per token block][error flag per token block][done per (block, group)]
    claim_ptr = sync_ptr + pid_m
    err_ptr = sync_ptr + n_blocks_m + pid_m
    done_ptr = sync_ptr + 2 * n_blocks_m + pid_m * NG_MAX
    # Up-phase cost of a granule: 2 weight rows (gate and up) or 1 per original neuron, 1 per patch.
    if GATED:
        cost_b = 2
    else:
        cost_b = 1
    total = tl.cdiv(F, GRAN) * cost_b + tl.cdiv(P, GRAN)
    ngb = tl.cdiv(F, GROUP_F)
    n_groups = ngb + tl.cdiv(P, GROUP_F)
    n_slices = tl.cdiv(D_OUT, BLOCK_N)
    n_tasks = n_shares + n_groups * n_slices
    t = tl.atomic_add(claim_ptr, 1, sem="relaxed").to(tl.int64)
    while t < n_tasks:
        if t < n_shares:
            # ---- up share t: activations of its neurons into the scratch buffer
            start = t * total // n_shares
            end = (t + 1) * total // n_shares
            f_lo, f_hi, _, _ = work_ranges(start, end, F, P, cost_b, GRAN)
            for f0 in range(f_lo, f_hi, BLOCK_F):
                offs_f = f0 + tl.arange(0, BLOCK_F).to(tl.int64)
                f_mask = offs_f < f_hi
                h = neuron_activations(x_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, offs_m, m_mask, offs_f, f_mask, D,
                                       stride_xm, stride_xd, stride_gf, stride_gd, stride_uf, stride_ud,
                                       GATED, HAS_BG, HAS_BU, ACT, BLOCK_M, BLOCK_F, BLOCK_D, INPUT_PRECISION)
                tl.store(h_ptr + offs_m[:, None] * stride_hm + offs_f[None, :] * stride_hf,
                         h.to(h_ptr.dtype.element_ty), mask=m_mask[:, None] & f_mask[None, :])
            _, _, p_lo, p_hi = work_ranges(start, end, F, P, cost_b, GRAN)  # after the loop: fewer live registers
            for p0 in range(p_lo, p_hi, BLOCK_F):
                offs_p = p0 + tl.arange(0, BLOCK_F).to(tl.int64)
                p_mask = offs_p < p_hi
                h = patch_activations(x_ptr, k_ptr, kb_ptr, offs_m, m_mask, offs_p, p_mask, D,
                                      stride_xm, stride_xd, stride_kp, stride_kd,
                                      PATCH_ACT, BLOCK_M, BLOCK_F, BLOCK_D, INPUT_PRECISION)
                tl.store(h_ptr + offs_m[:, None] * stride_hm + (F + offs_p)[None, :] * stride_hf,
                         h.to(h_ptr.dtype.element_ty), mask=m_mask[:, None] & p_mask[None, :])
            # Every thread's stores are issued before the counts are released.
            tl.debug_barrier()
            release_granules(done_ptr, f_lo, f_hi, GROUP_F, GRAN)
            release_granules(done_ptr + ngb, p_lo, p_hi, GROUP_F, GRAN)  # patch groups follow the FFN's
        else:
            # ---- down task: (neuron group g, output slice c)
            j = t - n_shares
            g = j // n_slices
            c = j - g * n_slices
            is_base = g < ngb
            if is_base:
                n_lo = g * GROUP_F
                n_hi = tl.minimum(n_lo + GROUP_F, F)
            else:
                n_lo = (g - ngb) * GROUP_F
                n_hi = tl.minimum(n_lo + GROUP_F, P)
            need = tl.cdiv(n_hi - n_lo, GRAN)
            seen = tl.atomic_add(done_ptr + g, 0, sem="acquire").to(tl.int64)
            polls = 0
            while (seen < need) & (polls < SPIN):
                seen = tl.atomic_add(done_ptr + g, 0, sem="acquire").to(tl.int64)
                polls += 1
            if seen < need:
                tl.atomic_max(err_ptr, 1)
            tl.debug_barrier()
            offs_n = c * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
            n_mask = offs_n < D_OUT
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if is_base:
                for f0 in range(n_lo, n_hi, BLOCK_F):
                    offs_f = f0 + tl.arange(0, BLOCK_F).to(tl.int64)
                    f_mask = offs_f < n_hi
                    hv = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_f[None, :] * stride_hf,
                                 mask=m_mask[:, None] & f_mask[None, :], other=0.0, cache_modifier=".cg")
                    wt = load_tile(wd_ptr, offs_f, f_mask, stride_df, offs_n, n_mask, stride_dn)
                    acc = mm(hv, wt, acc, BLOCK_M, INPUT_PRECISION)
                if HAS_BD:
                    if g == 0:
                        acc += tl.load(bd_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
                tl.atomic_add(ws_ptr + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn,
                              acc, mask=m_mask[:, None] & n_mask[None, :], sem="relaxed")
            else:
                fired = 0
                for p0 in range(n_lo, n_hi, BLOCK_F):
                    offs_p = p0 + tl.arange(0, BLOCK_F).to(tl.int64)
                    p_mask = offs_p < n_hi
                    hv = tl.load(h_ptr + offs_m[:, None] * stride_hm + (F + offs_p)[None, :] * stride_hf,
                                 mask=m_mask[:, None] & p_mask[None, :], other=0.0, cache_modifier=".cg")
                    if PATCH_ACT == 0:
                        run = tl.max(tl.max(hv.to(tl.float32), axis=1), axis=0) > 0.0
                    else:
                        run = True
                    if run:  # ReLU patches: value rows of a silent block (or patch) are never read
                        live = p_mask & (tl.max(tl.abs(hv.to(tl.float32)), axis=0) > 0.0)
                        wt = load_tile(v_ptr, offs_p, live, stride_vp, offs_n, n_mask, stride_vn)
                        acc = mm(hv, wt, acc, BLOCK_M, INPUT_PRECISION)
                        fired += 1
                if fired > 0:
                    tl.atomic_add(ws_ptr + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn,
                                  acc, mask=m_mask[:, None] & n_mask[None, :], sem="relaxed")
        t = tl.atomic_add(claim_ptr, 1, sem="relaxed").to(tl.int64)


def ffn_grid_size(meta: dict, F: int, P: int, gated: bool, num_sms: int, rows_per_neuron: int | None = None) -> int:
    """Programs along the neuron axis for launch configuration ``meta``: ``PROGRAMS_PER_SM``
    programs per multiprocessor (at most one per granule of work), or with ``PROGRAMS_PER_SM = 0``
    one program per ``BLOCK_F`` original neurons' worth of bytes. ``rows_per_neuron``: weight rows
    an original neuron costs; by default what the up shares read (2 gated, 1 two-matrix: the down
    rows are read by the down tasks)."""
    cost_b = rows_per_neuron or (2 if gated else 1)
    total = triton.cdiv(F, GRANULE) * cost_b + triton.cdiv(P, GRANULE)
    if meta["PROGRAMS_PER_SM"] > 0:
        return max(1, min(meta["PROGRAMS_PER_SM"] * num_sms, total))
    return triton.cdiv(total, cost_b * (meta["BLOCK_F"] // GRANULE))


def _check(name: str, t: torch.Tensor | None, shape: tuple[int, ...], x: torch.Tensor) -> None:
    if t is None:
        return
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def check_ffn_args(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, w_gate: torch.Tensor | None,
                   b_up: torch.Tensor | None, b_gate: torch.Tensor | None, b_down: torch.Tensor | None,
                   keys: torch.Tensor | None, bias: torch.Tensor | None, values: torch.Tensor | None) -> None:
    """Shapes, devices and dtypes of a fused-FFN call, each refused by name."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (tokens, d), got shape {tuple(x.shape)}")
    D = x.shape[1]
    Fdim, D_OUT = w_up.shape[0], w_down.shape[1]
    _check("w_up", w_up, (Fdim, D), x)
    _check("w_gate", w_gate, (Fdim, D), x)
    _check("w_down", w_down, (Fdim, D_OUT), x)
    _check("b_up", b_up, (Fdim,), x)
    _check("b_gate", b_gate, (Fdim,), x)
    _check("b_down", b_down, (D_OUT,), x)
    P = 0 if keys is None else keys.shape[0]
    if P:
        _check("keys", keys, (P, D), x)
        _check("bias", bias, (P,), x)
        _check("values", values, (P, D_OUT), x)
    for name, t in (("w_up", w_up), ("w_gate", w_gate), ("w_down", w_down), ("keys", keys), ("values", values)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}")


#: Meta-parameters a launch configuration must set (the kernel's tile and schedule constants).
SPLIT_CONFIG_KEYS = frozenset({"BLOCK_M", "BLOCK_F", "BLOCK_D", "BLOCK_N", "PROGRAMS_PER_SM", "GROUP_F"})
#: ``FASTPATCH_SPLIT_AUTOTUNE=1`` lets the kernel be tuned like the others; by default it launches
#: at ``default_split_config``: on the H200 the tuner (eager timing) picked, for 16 tokens, a
#: candidate slower than the default measured under CUDA graphs beside it.
SPLIT_AUTOTUNE_ENV = "FASTPATCH_SPLIT_AUTOTUNE"


def split_autotune_enabled() -> bool:
    """Whether the kernel picks its configuration by measurement (off by default: see
    ``SPLIT_AUTOTUNE_ENV``)."""
    return autotune_enabled() and os.environ.get(SPLIT_AUTOTUNE_ENV, "0") == "1"


def check_config(config: "triton.Config", M: int, candidates: list, keys: frozenset) -> None:
    """A pinned configuration must use the tile height of ``M``'s bucket (that of ``candidates``)
    and set every constant in ``keys``."""
    heights = {c.kwargs["BLOCK_M"] for c in candidates}
    if config.kwargs.get("BLOCK_M") not in heights:
        raise ValueError(f"config {config} is not a candidate for M={M}: BLOCK_M must be one of {sorted(heights)}")
    missing = keys - set(config.kwargs)
    if missing:
        raise ValueError(f"config {config} does not set {sorted(missing)}")


def fused_patched_ffn(
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    act: int,
    *,
    w_gate: torch.Tensor | None = None,
    b_up: torch.Tensor | None = None,
    b_gate: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    patch_act: int = ACT_RELU,
    config: "triton.Config | None" = None,
) -> torch.Tensor:
    """One-launch patched FFN (Triton). Same contract as ``reference.patched_ffn_reference``.

    Weights are neuron-major views of any strides (``w_up``/``w_gate`` (F, d), ``w_down``
    (F, d_out)): pass ``linear.weight`` for up/gate and ``down.weight.t()`` for down. ``config``
    pins one launch configuration (one of ``split_configs_for(M)``, or any ``triton.Config`` with
    the same tile height and constants, for sweeps); by default the bucket's default, or the
    tuner's choice where ``FASTPATCH_SPLIT_AUTOTUNE=1``.
    """
    check_ffn_args(x, w_up, w_down, w_gate, b_up, b_gate, b_down, keys, bias, values)
    if config is not None:
        check_config(config, x.shape[0], split_configs_for(x.shape[0]), SPLIT_CONFIG_KEYS)
    return fused_ffn_launch(x, w_up, w_down, act, w_gate, b_up, b_gate, b_down, keys, bias, values, patch_act, config)


class LaunchArgs(NamedTuple):
    """What every fused-FFN kernel takes, in its argument order (see ``launch_args``)."""

    weights: tuple  # x, Wg, Wu, Wd, bg, bu (absent biases: any tensor; the flags say absent)
    patches: tuple  # K, b, V (no patches: stand-ins of the right strides, never read)
    sizes: tuple  # M, M_BUCKET, P_BUCKET, D, D_OUT, F, P
    strides: tuple  # x, Wg, Wu, Wd, K, V: (rows, columns) each
    meta: dict  # the constexpr flags
    tune_key: tuple  # everything the tuner's key holds (buckets, sizes, dtypes of the tensors)


def launch_args(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, act: int, w_gate: torch.Tensor | None,
                b_up: torch.Tensor | None, b_gate: torch.Tensor | None, keys: torch.Tensor | None,
                bias: torch.Tensor | None, values: torch.Tensor | None, patch_act: int,
                filler: torch.Tensor) -> LaunchArgs:
    """The arguments a fused-FFN kernel shares with any other schedule of it: absent tensors are
    replaced by ``filler`` or the weights (the kernel never reads them)."""
    M, D = x.shape
    Fdim, D_OUT = w_down.shape
    P = 0 if keys is None else keys.shape[0]
    wg = w_gate if w_gate is not None else w_up
    k, kb, v = (keys, bias, values) if P else (w_up, filler, w_down)
    weights = (x, wg, w_up, w_down, b_gate if b_gate is not None else filler, b_up if b_up is not None else filler)
    sizes = (M, token_bucket(M), work_bucket(P, Fdim), D, D_OUT, Fdim, P)
    strides = (x.stride(0), x.stride(1), wg.stride(0), wg.stride(1), w_up.stride(0), w_up.stride(1),
               w_down.stride(0), w_down.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1))
    meta = dict(GATED=w_gate is not None, GRAN=GRANULE, HAS_BG=b_gate is not None, HAS_BU=b_up is not None, ACT=act,
                PATCH_ACT=patch_act, INPUT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
    tune_key = (sizes[1], sizes[2], D, D_OUT, Fdim, x.dtype, kb.dtype,
                None if b_gate is None else b_gate.dtype, None if b_up is None else b_up.dtype)
    return LaunchArgs(weights, (k, kb, v), sizes, strides, meta, tune_key)


def fused_ffn_launch(
    x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, act: int,
    w_gate: torch.Tensor | None, b_up: torch.Tensor | None, b_gate: torch.Tensor | None,
    b_down: torch.Tensor | None, keys: torch.Tensor | None, bias: torch.Tensor | None,
    values: torch.Tensor | None, patch_act: int = ACT_RELU, config: "triton.Config | None" = None,
) -> torch.Tensor:
    """``fused_patched_ffn`` without its argument checks, for callers whose tensors are
    consistent by construction (``PatchedFFN``: its bank and layout are validated when they
    change, not on every decode step, where the checks cost more Python than the launch)."""
    M = x.shape[0]
    Fdim, D_OUT = w_down.shape
    P = 0 if keys is None else keys.shape[0]
    if M == 0:
        out = torch.zeros(M, D_OUT, device=x.device, dtype=x.dtype)
        return out if b_down is None else out + b_down
    gated = w_gate is not None
    if config is None and not split_autotune_enabled():
        config = default_split_config(M, x.dtype, gated)
    # One zeroed int32 buffer, one memset: the fp32 output workspace (zero bits are 0.0) and the
    # schedule's counters. The down tasks of neuron group 0 add the output bias; an FFN without
    # neurons has no such group, so its workspace starts from the bias instead.
    blocks, ng_max = split_sync_size(M, Fdim, P)
    buf = torch.zeros(M * D_OUT + blocks * (2 + ng_max), device=x.device, dtype=torch.int32)
    ws = buf[: M * D_OUT].view(torch.float32).view(M, D_OUT)
    sync = buf[M * D_OUT:]
    bias_in_kernel = b_down is not None and Fdim > 0
    if b_down is not None and not bias_in_kernel:
        ws += b_down.float()
    h = torch.empty(M, Fdim + P, device=x.device, dtype=x.dtype)  # activations: written before read
    a = launch_args(x, w_up, w_down, act, w_gate, b_up, b_gate, keys, bias, values, patch_act, ws)
    sms = num_sms(x.device, INTERPRETER_SMS)
    interp = interpret_mode()

    def grid(meta):
        return (ffn_grid_size(meta, Fdim, P, gated, sms), triton.cdiv(M, meta["BLOCK_M"]))

    k, kb, v = a.patches
    args = (*a.weights, b_down if bias_in_kernel else ws, k, kb, v, h, ws, sync, *a.sizes, ng_max,
            0 if interp else SPIN_LIMIT, *a.strides, h.stride(0), h.stride(1), ws.stride(0), ws.stride(1))
    launch(_fused_ffn_split_kernel, grid, args, dict(a.meta, HAS_BD=bias_in_kernel), config,
           tune_key=(*a.tune_key, b_down.dtype if bias_in_kernel else None))
    if interp or CHECK_SPLIT_FLAGS:  # a down task that found its group incomplete: a counting bug
        if int(sync[blocks: 2 * blocks].max()) != 0:
            raise RuntimeError("fused FFN: a down task ran before its neuron group was complete")
    return ws.to(x.dtype)


def default_split_config(M: int, dtype: torch.dtype, gated: bool = True) -> "triton.Config":
    """The configuration where tuning is off: the bucket's first candidate that fits
    ``SMEM_BUDGET`` at this element size."""
    return _default_split_config(token_bucket(M), dtype, gated)


@functools.lru_cache(maxsize=None)
def _default_split_config(bucket: int, dtype: torch.dtype, gated: bool) -> "triton.Config":
    return first_fitting(split_configs_for(bucket), dtype, gated)


def split_sync_size(M: int, F: int, P: int) -> tuple[int, int]:
    """(token blocks, neuron groups per token block) the kernel's sync area has room for, for
    every candidate configuration of ``M``'s bucket (they share its tile height): a claim counter
    and an error flag per token block, then one ``done`` counter per (token block, neuron group)
    at the smallest ``GROUP_F``: ``blocks * (2 + groups)`` int32 words."""
    blocks = triton.cdiv(M, split_configs_for(M)[0].kwargs["BLOCK_M"])
    groups = triton.cdiv(F, _MIN_GROUP_F) + triton.cdiv(P, _MIN_GROUP_F)
    return blocks, groups
