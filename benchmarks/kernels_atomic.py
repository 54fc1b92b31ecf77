"""The fused FFN's atomic schedule: the comparison the library's schedule is measured against.

Not part of the library (``fastpatch.kernels.fused_ffn`` runs one schedule, for every input).
Each program takes a range of neurons and adds its neurons' contribution into every column of
the fp32 output (``programs * M * d_out`` atomic adds, where the library's down tasks add each
output slice once per neuron group). ``gpu_check.py`` times it beside the library's kernel
(decode roofline, crossover, configuration sweep) and ``compile_check.py`` compiles it; it
shares the library's activation blocks, argument checks and launch arguments, and its own
tests (``tests/test_fused_ffn_atomic.py``) check it against ``reference.patched_ffn_reference``.

Schedules of programs (``PROGRAMS_PER_SM``): ``0`` gives each program one unit (``BLOCK_F``
original neurons, or 2-3x as many patch neurons: the same bytes) and leaves the balance to the
hardware scheduler; ``k > 0`` runs k programs per multiprocessor, each with an equal share of the
bytes. ``ROTATE_N = 1``: each program starts its pass over the output columns at its own block,
so the atomics of concurrent programs land on different addresses. A single token may run as a
GEMV (``BLOCK_M = 1``: broadcast multiply and sum, no ``tl.dot`` padding to 16 rows).
"""

from __future__ import annotations

import functools

import torch

from fastpatch.kernels import fused_ffn as FF
from fastpatch.kernels._blocks import accumulate_rows, candidate_configs, configs_for, token_bucket
from fastpatch.kernels._triton import autotune, autotune_enabled, launch, stream_jit, tl, triton
from fastpatch.kernels.dispatch import num_sms
from fastpatch.kernels.fused_ffn import neuron_activations, patch_activations, work_ranges
from fastpatch.kernels.reference import ACT_RELU

__all__ = ["ATOMIC_CONFIGS", "atomic_configs_for", "default_atomic_config", "atomic_patched_ffn"]

#: (BLOCK_F, BLOCK_D, BLOCK_N, warps, stages, {PROGRAMS_PER_SM, ROTATE_N}) candidates of the
#: ``tl.dot`` tiles (BLOCK_M >= 16), the measured best first; 32-neuron tiles serve small FFNs
#: (SmolLM2, BERT-base), whose few thousand neurons make too few 64-neuron units.
_DOT_TILES = [
    (64, 128, 128, 4, 4, {"PROGRAMS_PER_SM": 0, "ROTATE_N": 1}),
    (64, 128, 128, 4, 3, {"PROGRAMS_PER_SM": 2, "ROTATE_N": 1}),
    (64, 128, 128, 4, 3, {"PROGRAMS_PER_SM": 0, "ROTATE_N": 1}),
    (64, 64, 128, 4, 6, {"PROGRAMS_PER_SM": 0, "ROTATE_N": 1}),
    (64, 64, 128, 4, 4, {"PROGRAMS_PER_SM": 0, "ROTATE_N": 1}),
    (32, 256, 128, 4, 3, {"PROGRAMS_PER_SM": 0, "ROTATE_N": 1}),
    (32, 128, 128, 4, 3, {"PROGRAMS_PER_SM": 4, "ROTATE_N": 1}),
]
#: Single-token GEMV tiles: up to 2 x 4 K weights accumulate products in 2-D fp32 registers and
#: reduce once (``_blocks.GEMV_ACC2_MAX``); the 8-warp one reduces every iteration but keeps more
#: weights in flight per program.
_GEMV_TILES = [
    (32, 128, 128, 4, 2, {"PROGRAMS_PER_SM": 2, "ROTATE_N": 1}),
    (32, 256, 128, 8, 2, {"PROGRAMS_PER_SM": 2, "ROTATE_N": 1}),
]
#: Every candidate, in order; within a token bucket the first one is the default.
ATOMIC_CONFIGS = candidate_configs("BLOCK_F", _DOT_TILES, _GEMV_TILES, {32: 4, 64: 3})
#: Meta-parameters a launch configuration must set.
ATOMIC_CONFIG_KEYS = frozenset({"BLOCK_M", "BLOCK_F", "BLOCK_D", "BLOCK_N", "PROGRAMS_PER_SM", "ROTATE_N"})


def atomic_configs_for(M: int) -> list:
    """The candidate launch configurations for ``M`` tokens; the first is the default."""
    return configs_for(ATOMIC_CONFIGS, M)


def default_atomic_config(M: int, dtype: torch.dtype, gated: bool = True) -> "triton.Config":
    """The bucket's first candidate that fits the library's shared-memory budget at this size."""
    return _default(token_bucket(M), dtype, gated)


@functools.lru_cache(maxsize=None)
def _default(bucket: int, dtype: torch.dtype, gated: bool) -> "triton.Config":
    return FF.first_fitting(atomic_configs_for(bucket), dtype, gated)


@autotune(
    configs=ATOMIC_CONFIGS,
    key=["M_BUCKET", "P_BUCKET", "D", "D_OUT", "F"],
    prune_configs_by={"early_config_prune": FF._prune},
    restore_value=["ws_ptr"],  # the kernel accumulates into ws: each timing run starts from a copy
)
@stream_jit(varying=("M_BUCKET", "P_BUCKET", "P"), tokens=("M",))
def _fused_ffn_atomic_kernel(
    x_ptr, wg_ptr, wu_ptr, wd_ptr, bg_ptr, bu_ptr, k_ptr, kb_ptr, v_ptr, ws_ptr,
    M, M_BUCKET, P_BUCKET, D, D_OUT, F, P,
    stride_xm, stride_xd,
    stride_gf, stride_gd, stride_uf, stride_ud, stride_df, stride_dn,
    stride_kp, stride_kd, stride_vp, stride_vn, stride_sm, stride_sn,
    GATED: tl.constexpr, HAS_BG: tl.constexpr, HAS_BU: tl.constexpr,
    ACT: tl.constexpr, PATCH_ACT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr, GRAN: tl.constexpr, ROTATE_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    num_progs = tl.num_programs(0).to(tl.int64)
    rot = pid * ROTATE_N  # where this program starts its pass over the output columns
    pid_m = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    m_mask = offs_m < M
    # The work: granules of GRAN neurons, original ones first (each reads 3 (gated) or 2 weight
    # rows) then patch ones (one key row; value rows only where a patch fires). This program takes
    # the granules whose cost-position falls in [start, end).
    if GATED:
        cost_b = 3
    else:
        cost_b = 2
    total = tl.cdiv(F, GRAN) * cost_b + tl.cdiv(P, GRAN)
    if PROGRAMS_PER_SM > 0:  # persistent: an equal share of the cost for each program
        start = pid * total // num_progs
        end = (pid + 1) * total // num_progs
    else:  # one unit per program: BLOCK_F original neurons, or cost_b * BLOCK_F patch neurons
        start = pid * (cost_b * (BLOCK_F // GRAN))
        end = tl.minimum(start + cost_b * (BLOCK_F // GRAN), total)
    f_lo, f_hi, _, _ = work_ranges(start, end, F, P, cost_b, GRAN)
    for f0 in range(f_lo, f_hi, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F).to(tl.int64)
        f_mask = offs_f < f_hi
        h = neuron_activations(x_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, offs_m, m_mask, offs_f, f_mask, D,
                               stride_xm, stride_xd, stride_gf, stride_gd, stride_uf, stride_ud,
                               GATED, HAS_BG, HAS_BU, ACT, BLOCK_M, BLOCK_F, BLOCK_D, INPUT_PRECISION)
        h = tl.where(m_mask[:, None] & f_mask[None, :], h, 0.0)
        accumulate_rows(h, wd_ptr, offs_f, f_mask, ws_ptr, offs_m, m_mask, D_OUT, rot,
                        stride_df, stride_dn, stride_sm, stride_sn, BLOCK_M, BLOCK_N, INPUT_PRECISION)
    _, _, p_lo, p_hi = work_ranges(start, end, F, P, cost_b, GRAN)  # after the loop: fewer live registers
    for p0 in range(p_lo, p_hi, BLOCK_F):
        offs_p = p0 + tl.arange(0, BLOCK_F).to(tl.int64)
        p_mask = offs_p < p_hi
        h = patch_activations(x_ptr, k_ptr, kb_ptr, offs_m, m_mask, offs_p, p_mask, D,
                              stride_xm, stride_xd, stride_kp, stride_kd,
                              PATCH_ACT, BLOCK_M, BLOCK_F, BLOCK_D, INPUT_PRECISION)
        h = tl.where(m_mask[:, None] & p_mask[None, :], h, 0.0)
        if PATCH_ACT == 0:
            run = tl.max(tl.max(h, axis=1), axis=0) > 0.0
        else:
            run = True
        if run:
            accumulate_rows(h, v_ptr, offs_p, p_mask, ws_ptr, offs_m, m_mask, D_OUT, rot,
                            stride_vp, stride_vn, stride_sm, stride_sn, BLOCK_M, BLOCK_N, INPUT_PRECISION)




def atomic_patched_ffn(
    x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, act: int, *,
    w_gate: torch.Tensor | None = None, b_up: torch.Tensor | None = None, b_gate: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None, keys: torch.Tensor | None = None, bias: torch.Tensor | None = None,
    values: torch.Tensor | None = None, patch_act: int = ACT_RELU, config: "triton.Config | None" = None,
) -> torch.Tensor:
    """``fastpatch.kernels.fused_ffn.fused_patched_ffn`` (same arguments and checks) on the atomic
    schedule. ``config``: one of ``atomic_configs_for(M)`` or any configuration with the same tile
    height and constants; by default tuned where tuning is on, else the bucket's default."""
    FF.check_ffn_args(x, w_up, w_down, w_gate, b_up, b_gate, b_down, keys, bias, values)
    M = x.shape[0]
    if config is not None:
        FF.check_config(config, M, atomic_configs_for(M), ATOMIC_CONFIG_KEYS)
    Fdim, D_OUT = w_down.shape
    P = 0 if keys is None else keys.shape[0]
    gated = w_gate is not None
    if b_down is not None:  # the kernel adds into ws, which starts from the output bias (one copy)
        ws = torch.empty(M, D_OUT, device=x.device, dtype=torch.float32)
        ws.copy_(b_down.float().expand(M, D_OUT))
    else:
        ws = torch.zeros(M, D_OUT, device=x.device, dtype=torch.float32)
    if M == 0:
        return ws.to(x.dtype)
    if config is None and not autotune_enabled():
        config = default_atomic_config(M, x.dtype, gated)
    a = FF.launch_args(x, w_up, w_down, act, w_gate, b_up, b_gate, keys, bias, values, patch_act, ws)
    sms = num_sms(x.device, FF.INTERPRETER_SMS)
    rows = 3 if gated else 2  # an original neuron reads its gate, up and down rows (patch: a key row)

    def grid(meta):
        return (FF.ffn_grid_size(meta, Fdim, P, gated, sms, rows), triton.cdiv(M, meta["BLOCK_M"]))

    args = (*a.weights, *a.patches, ws, *a.sizes, *a.strides, ws.stride(0), ws.stride(1))
    launch(_fused_ffn_atomic_kernel, grid, args, a.meta, config, tune_key=a.tune_key)
    return ws.to(x.dtype)
