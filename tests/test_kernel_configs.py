"""Every launch configuration a kernel may be tuned to, and the compact large-batch path.

On a GPU ``triton.autotune`` may pick among ``SPLIT_CONFIGS`` / ``PATCH_FUSED_CONFIGS`` by
measurement, so each candidate must compute the same function: they are checked here one by one
against the float64 reference under TRITON_INTERPRET=1, at odd shapes. (The benchmarks' atomic
schedule has its own file, ``test_fused_ffn_atomic.py``.)
"""

from __future__ import annotations

import pytest
import torch

from fastpatch.kernels import _triton
from fastpatch.kernels._triton import triton
from fastpatch.kernels import reference as R
from fastpatch.kernels._blocks import configs_for, token_bucket
from fastpatch.kernels.fused_ffn import SPLIT_CONFIGS, fused_patched_ffn, split_configs_for
from fastpatch.kernels.patch_forward import (
    PATCH_FUSED_CONFIGS,
    active_patch_list,
    patch_configs_for,
    patch_forward,
)
from fastpatch.kernels.testing import assert_close_to_ref

from .conftest import requires_triton


def _bank(P: int, d: int, d_out: int, dtype: torch.dtype, fire: float = 0.2):
    keys = torch.randn(P, d) / d**0.5
    bias = torch.where(torch.rand(P) < fire, torch.zeros(P), torch.full((P,), -100.0))
    values = torch.randn(P, d_out) / max(1, P) ** 0.5
    return keys.to(dtype), bias.to(dtype), values.to(dtype)


def _label(c) -> str:
    return "-".join(f"{v}" for v in c.kwargs.values()) + f"-w{c.num_warps}-s{c.num_stages}"


def test_token_buckets_and_candidates() -> None:
    assert [token_bucket(m) for m in (1, 2, 16, 17, 32, 33, 64, 65, 500)] == [1, 16, 16, 32, 32, 64, 64, 64, 64]
    for configs in (SPLIT_CONFIGS, PATCH_FUSED_CONFIGS):
        one = configs_for(configs, 1)
        # a single token: the padded tl.dot tile first (the measured default), then any GEMVs
        assert one[0].kwargs["BLOCK_M"] == 16
        for M in (2, 16, 17, 40, 130):
            assert {c.kwargs["BLOCK_M"] for c in configs_for(configs, M)} == {token_bucket(M)}
        assert len({_label(c) for c in configs}) == len(configs), "duplicate candidates"
    assert any(c.kwargs["BLOCK_M"] == 1 for c in configs_for(PATCH_FUSED_CONFIGS, 1))


def test_interpreter_never_autotunes(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not _triton.autotune_enabled()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(_triton.AUTOTUNE_ENV, "0")
    assert not _triton.autotune_enabled()


#: Odd sizes (d, F, d_out, P) with several neuron groups of the split schedule (128-512 neurons
#: each), output slices (128-256 columns) and patch groups.
SPLIT_SIZES = (33, 4 * 128 + 9, 2 * 256 + 19, 2 * 128 + 35)


def _ffn_case(M: int, gated: bool, sizes: tuple[int, int, int, int] = SPLIT_SIZES, fire_all: bool = False):
    """Inputs of ``fused_patched_ffn`` at ``sizes`` = (d, F, d_out, P) (two-matrix FFNs with an up
    bias), and the float64 reference: ``(x, w_up, w_down, act, keyword arguments, ref)``."""
    d, Fdim, d_out, P = sizes
    act = R.ACT_SILU if gated else R.ACT_GELU_TANH
    x = torch.randn(M, d)
    w_up = torch.randn(Fdim, d) / d**0.5
    w_gate = torch.randn(Fdim, d) / d**0.5 if gated else None
    down = torch.randn(d_out, Fdim) / Fdim**0.5
    b_up = None if gated else torch.randn(Fdim)
    b_down = torch.randn(d_out)
    keys, bias, values = _bank(P, d, d_out, torch.float32)
    if fire_all:
        bias = torch.full((P,), 50.0)
    D = lambda t: None if t is None else t.double()  # noqa: E731
    ref = R.patched_ffn_reference(D(x), D(w_up), D(down).t(), act, w_gate=D(w_gate), b_up=D(b_up),
                                  b_down=D(b_down), keys=D(keys), bias=D(bias), values=D(values))
    args = dict(w_gate=w_gate, b_up=b_up, b_down=b_down, keys=keys, bias=bias, values=values)
    return x, w_up, down.t(), act, args, ref


@requires_triton
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("M", [1, 5, 17, 33])
def test_every_split_config_matches_reference(M: int, gated: bool) -> None:
    """The split schedule (up shares, then down tasks per neuron group and output slice, in one
    launch): every candidate, including the output bias that only group 0's down tasks add."""
    torch.manual_seed(M)
    x, w_up, w_down, act, args, ref = _ffn_case(M, gated)
    configs = split_configs_for(M)
    assert configs and all("GROUP_F" in c.kwargs for c in configs)
    for c in configs:
        out = fused_patched_ffn(x, w_up, w_down, act, config=c, **args)
        assert_close_to_ref(out, ref, torch.float32, max(1.0, float(ref.abs().max())))


@requires_triton
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("sms", [1, 4, 97])
def test_split_schedule_counts_every_granule(monkeypatch, sms: int, gated: bool) -> None:
    """Up shares of every size against groups of every size: with one "SM" a share spans all
    groups, with 97 most shares are a granule or empty. Every patch fires, so every value row and
    every activation counts; a granule missing from a group's count would fail the launcher's
    error-flag check (a down task ran before its group was complete), one counted twice, the
    output."""
    from fastpatch.kernels import fused_ffn as FF

    monkeypatch.setattr(FF, "INTERPRETER_SMS", sms)
    x, w_up, w_down, act, args, ref = _ffn_case(3, gated, fire_all=True)
    for c in split_configs_for(3):
        grid = FF.ffn_grid_size(c.kwargs, w_up.shape[0], args["keys"].shape[0], gated, sms)
        cost = FF.triton.cdiv(w_up.shape[0], FF.GRANULE) * (2 if gated else 1) + FF.triton.cdiv(
            args["keys"].shape[0], FF.GRANULE)
        assert grid == min(c.kwargs["PROGRAMS_PER_SM"] * sms, cost)
        out = fused_patched_ffn(x, w_up, w_down, act, config=c, **args)
        assert_close_to_ref(out, ref, torch.float32, max(1.0, float(ref.abs().max())))


@requires_triton
def test_split_kernel_launches_its_measured_default_unless_tuning_is_asked(monkeypatch) -> None:
    """Where tuning is on, the split kernel still launches at ``default_split_config`` (the H200's
    tuner mis-picked for it) unless ``FASTPATCH_SPLIT_AUTOTUNE=1``; then the launch goes to the tuner."""
    from fastpatch.kernels import fused_ffn as FF

    seen = []
    monkeypatch.setattr(FF, "launch", lambda kernel, grid, args, kwargs, config=None, tune_key=None: seen.append(config))
    monkeypatch.setattr(FF, "autotune_enabled", lambda: True)  # as on a GPU
    x, w_up, w_down, act, args, _ = _ffn_case(5, True)
    monkeypatch.delenv(FF.SPLIT_AUTOTUNE_ENV, raising=False)
    fused_patched_ffn(x, w_up, w_down, act, **args)
    monkeypatch.setenv(FF.SPLIT_AUTOTUNE_ENV, "1")
    fused_patched_ffn(x, w_up, w_down, act, **args)
    assert seen == [FF.default_split_config(5, torch.float32, True), None]


@requires_triton
@pytest.mark.parametrize("P", [0, 7, 300])
@pytest.mark.parametrize("with_bias", [True, False])
def test_an_ffn_without_neurons_is_its_bias_plus_its_patches(P: int, with_bias: bool) -> None:
    """F == 0: no neuron group of the FFN exists to add the output bias, so the launcher starts
    the workspace from it; the patches' groups still run (none at all when P == 0)."""
    torch.manual_seed(P)
    d, d_out = 33, 21
    x = torch.randn(5, d)
    w_up, w_gate, w_down = torch.randn(0, d), torch.randn(0, d), torch.randn(0, d_out)
    b_down = torch.randn(d_out) if with_bias else None
    keys, bias, values = _bank(P, d, d_out, torch.float32, fire=0.5)
    out = fused_patched_ffn(x, w_up, w_down, R.ACT_SILU, w_gate=w_gate, b_down=b_down, keys=keys, bias=bias,
                            values=values)
    D = lambda t: None if t is None else t.double()  # noqa: E731
    ref = R.patched_ffn_reference(D(x), D(w_up), D(w_down), R.ACT_SILU, w_gate=D(w_gate), b_down=D(b_down),
                                  keys=D(keys), bias=D(bias), values=D(values))
    assert_close_to_ref(out, ref, torch.float32, max(1.0, float(ref.abs().max())))


@requires_triton
@pytest.mark.parametrize("M", [1, 5, 17, 65])
def test_every_patch_fused_config_matches_reference(M: int) -> None:
    torch.manual_seed(M)
    d, d_out, P = 96 + 17, 77, 3 * 64 + 17
    x = torch.randn(M, d)
    base = torch.randn(M, d_out)
    keys, bias, values = _bank(P, d, d_out, torch.float32)
    ref = R.patch_forward_reference(x.double(), keys.double(), bias.double(), values.double(), base.double())
    for c in patch_configs_for(M):
        out = patch_forward(x, keys, bias, values, base, backend="triton", strategy="fused", config=c)
        assert_close_to_ref(out, ref, torch.float32, max(1.0, float(ref.abs().max())))


@requires_triton
def test_a_config_from_another_bucket_is_refused() -> None:
    x = torch.randn(5, 64)
    keys, bias, values = _bank(7, 64, 8, torch.float32)
    gemv = next(c for c in PATCH_FUSED_CONFIGS if c.kwargs["BLOCK_M"] == 1)
    with pytest.raises(ValueError, match="not a candidate for M=5"):
        patch_forward(x, keys, bias, values, backend="triton", strategy="fused", config=gemv)
    w_up, w_down = torch.randn(9, 64), torch.randn(9, 8)
    with pytest.raises(ValueError, match="not a candidate for M=5: BLOCK_M must be one of"):
        fused_patched_ffn(x, w_up, w_down, R.ACT_SILU, config=split_configs_for(40)[0])
    other = triton.Config({k: v for k, v in split_configs_for(5)[0].kwargs.items() if k != "GROUP_F"})
    with pytest.raises(ValueError, match="GROUP_F"):  # a configuration of another schedule
        fused_patched_ffn(x, w_up, w_down, R.ACT_SILU, config=other)


@pytest.mark.parametrize("M,P", [(1, 1), (7, 113), (130, 1000)])
def test_active_patch_list_matches_nonzero(M: int, P: int) -> None:
    torch.manual_seed(P)
    pre = torch.where(torch.rand(M, P) < 0.01, torch.rand(M, P), -torch.rand(M, P))
    pre[:, :1] = 0.0  # exactly zero does not fire
    idx, count = active_patch_list(pre)
    want = ((pre > 0).any(0)).nonzero().squeeze(1)
    assert count.shape == (1,) and int(count) == want.numel()
    assert torch.equal(idx[: int(count)].long(), want)
    assert torch.equal(idx.sort().values.long(), torch.arange(P))  # a permutation: all targets distinct


def test_compact_strategy_needs_relu() -> None:
    x = torch.randn(5, 64)
    keys, bias, values = _bank(7, 64, 8, torch.float32)
    with pytest.raises(ValueError, match="needs ReLU"):
        patch_forward(x, keys, bias, values, act=R.ACT_SILU, backend="torch", strategy="compact")
    with pytest.raises(ValueError, match="strategy must be one of"):
        patch_forward(x, keys, bias, values, backend="torch", strategy="sparse")


@requires_triton
def test_auto_strategy_picks_compact_for_large_relu_batches(monkeypatch) -> None:
    from fastpatch.kernels import patch_forward as PF

    calls: list[str] = []
    for name in ("_patch_forward_fused", "_patch_forward_compact", "_patch_forward_gemm"):
        real = getattr(PF, name)
        monkeypatch.setattr(PF, name, lambda *a, _n=name, _r=real, **k: (calls.append(_n), _r(*a, **k))[1])
    keys, bias, values = _bank(33, 64, 8, torch.float32)
    M = PF.FUSED_MAX_TOKENS + 1
    x = torch.randn(M, 64)
    patch_forward(x, keys, bias, values, backend="triton")
    patch_forward(x, keys, bias, values, act=R.ACT_GELU, backend="triton")
    patch_forward(x[:3], keys, bias, values, backend="triton")
    assert calls == ["_patch_forward_compact", "_patch_forward_gemm", "_patch_forward_fused"]


def assert_tuner_names_real_arguments(kernel, configs: list, restore: list[str]) -> None:
    """A misspelt key or restore name only fails at the first tuned call on a GPU: check here."""
    assert set(kernel.keys) <= set(kernel.arg_names)
    assert kernel.restore_value == restore  # what the kernel accumulates or counts into
    assert kernel.configs == configs
    for c in configs:
        assert set(c.kwargs) <= set(kernel.arg_names)
    # the prune hook sees the positional arguments by name, as the autotuner passes them
    named = dict(zip(kernel.arg_names, range(len(kernel.arg_names))))
    named["M"] = 5
    pruned = kernel.early_config_prune(configs, named)
    assert pruned and {c.kwargs["BLOCK_M"] for c in pruned} == {16}


@requires_triton
def test_autotuners_name_real_kernel_arguments() -> None:
    from fastpatch.kernels.fused_ffn import _fused_ffn_split_kernel
    from fastpatch.kernels.patch_forward import _patch_fused_kernel

    assert_tuner_names_real_arguments(_patch_fused_kernel, PATCH_FUSED_CONFIGS, ["ws_ptr"])
    assert_tuner_names_real_arguments(_fused_ffn_split_kernel, SPLIT_CONFIGS, ["ws_ptr", "sync_ptr"])


def test_launch_remembers_the_tuners_choice_per_key() -> None:
    """``launch(tune_key=...)`` goes through the tuner once per key, then launches its choice
    directly (what a decode loop pays per step). A stand-in object plays the tuned kernel."""
    from types import SimpleNamespace

    log: list[tuple] = []

    class Direct:  # ``kernel.fn[grid](...)``: the JIT function at a pinned configuration
        def __getitem__(self, grid):
            return lambda *a, **k: log.append(("direct", grid, k.get("BLOCK_M"), k.get("num_warps")))

    class Tuned:  # ``kernel[grid](...)``: the autotuner, which records its pick in best_config
        fn = Direct()
        best_config = None

        def __getitem__(self, grid):
            def run(*a, **k):
                log.append(("tuner", grid))
                self.best_config = SimpleNamespace(kwargs={"BLOCK_M": 16}, num_warps=8, num_stages=3)
            return run

    kernel = Tuned()
    for _ in range(3):
        _triton.launch(kernel, (7,), (), {}, tune_key=("k", 1))
    _triton.launch(kernel, (7,), (), {}, tune_key=("k", 2))
    assert log == [("tuner", (7,)), ("direct", (7,), 16, 8), ("direct", (7,), 16, 8), ("tuner", (7,))]


def test_defaults_and_tuning_skip_tiles_that_do_not_fit_shared_memory() -> None:
    """The 4-stage bf16 default would need ~216 KB of shared memory in fp32: where tuning is off,
    fp32 falls back to the next candidate that fits; the tuner never compiles one that cannot."""
    from fastpatch.kernels.fused_ffn import SMEM_BUDGET, _prune, default_split_config, smem_estimate

    for M in (1, 5, 16):
        first = split_configs_for(M)[0]
        assert default_split_config(M, torch.bfloat16) is first
        assert smem_estimate(first, 4) > SMEM_BUDGET  # the premise: deep bf16 pipelines do not fit fp32
        fp32 = default_split_config(M, torch.float32)
        assert fp32 is not first and smem_estimate(fp32, 4) <= SMEM_BUDGET
        named = {"M": M, "x_ptr": torch.empty(1, dtype=torch.float32)}
        kept = _prune(SPLIT_CONFIGS, named, GATED=True)
        assert kept and all(smem_estimate(c, 4) <= SMEM_BUDGET for c in kept)
        assert first not in kept and fp32 in kept
        named["x_ptr"] = torch.empty(1, dtype=torch.bfloat16)
        assert _prune(SPLIT_CONFIGS, named, GATED=True) == split_configs_for(M)  # all fit in bf16
