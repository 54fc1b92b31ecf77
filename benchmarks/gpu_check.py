"""One prepared GPU check: CUDA correctness of every kernel, then the benchmark table.

    python benchmarks/gpu_check.py --out benchmarks/results/<card>

Fits a 15-minute lease with room to rerun (target: under 5 minutes). Sections:

0. precompile: every launch configuration the run will use, compiled in 16 worker processes
   (Triton's disk cache then serves the tuner and the checks);
1. environment and the measured HBM bandwidth (a large device-to-device copy);
2. correctness: every Triton kernel against its float64 reference, fp32 and bf16, odd shapes;
3. the decode roofline: Llama-7B FFN, bf16, P = 1,000 / 10,000, M = 1 / 16 tokens: PatchedFFN,
   the fused kernel alone, cuBLAS + patch kernel and the authors' concatenation, timed eagerly
   and as CUDA-graph replays, against the bytes each must read (% of HBM, speed-up);
3a. patched FFN latency: fastpatch (fused / unfused) against the unpatched FFN, the authors'
   concatenated-Linear T-Patcher and a GRACE-style codebook, at SmolLM2, BERT-base and Llama-7B
   FFN shapes, P in {0, 100, 1k, 10k, 50k}, M in {1, 16, 512}, with bytes, GB/s and % of HBM;
4. the fused/unfused crossover in tokens (sets FUSED_FFN_MAX_TOKENS / FUSED_MAX_TOKENS), with the
   three large-batch strategies (fused, compact, gemm);
4b. the launch-configuration sweep: every autotune candidate of the fused FFN timed on its own at
   Llama-7B shapes, P = 10,000, M = 1 and 16, beside what the autotuner picked;
5. the patch-training loss kernel at N = 40,000 memory vectors, d = 4096, with % of HBM;
6. SmolLM2-architecture whole-model prefill/decode with 0 / 1k / 10k patches;
7. memory: patch storage bytes against P*(2d+1), peak allocation;
8. editing: milliseconds per edit (SmolLM2 architecture, 40,000-vector memory; goal < 20 ms);
9. issue 16 (``gpu_issue16.py``): prefill at M = 512 / 2,048 against the merged concatenation,
   P = 1k / 10k / 100k at M = 1 / 16, the split kernel's default against every candidate under
   CUDA-graph timing (1-16 tokens), 200 edits with Triton compilations counted after the first,
   and ``torch.compile(fullgraph=True, mode="reduce-overhead")`` of a patched model.

Issue 16's sections alone (about 5 minutes on an H200):
    python benchmarks/gpu_check.py --skip-correctness --no-precompile \
        --sections prefill,scale,split_tuning,gpu_editing,compiled --out benchmarks/results/<card>/runs/<date>-issue16

``--sections a,b`` runs a subset of the timed sections (correctness always runs first).
Writes ``gpu_check.json``, ``ffn_latency.csv`` and prints a Markdown table. Every timed method is
checked against the reference first: a fast wrong kernel fails the check.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

# The script's own folder is on sys.path: import the baselines from there, and fastpatch from the
# installed package (the repo root is deliberately not on the path: kernels/ is installed as
# fastpatch.kernels, which a source checkout does not have at that name).
sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

import fastpatch  # noqa: E402
import gpu_issue16 as I16  # noqa: E402
import gpu_specialization as GS  # noqa: E402
from baselines import ConcatPatcher, GatedFFN, GraceCodebook, make_patches  # noqa: E402
from fastpatch import PatchedFFN  # noqa: E402
from fastpatch.atomic import atomic_file, write_atomic  # noqa: E402
from fastpatch.ffn import detect_layout  # noqa: E402
from fastpatch.kernels import reference as R  # noqa: E402
from fastpatch.kernels import fused_ffn as FF  # noqa: E402
from fastpatch.kernels.fused_ffn import (  # noqa: E402
    _fused_ffn_split_kernel, default_split_config, fused_patched_ffn, split_configs_for,
)
from kernels_atomic import (  # noqa: E402
    _fused_ffn_atomic_kernel, atomic_configs_for, atomic_patched_ffn, default_atomic_config,
)
from fastpatch.kernels.patch_forward import _patch_fused_kernel, patch_configs_for, patch_forward  # noqa: E402
from fastpatch.kernels.testing import TOLERANCES  # noqa: E402

#: FASTPATCH_GPU_CHECK_DRYRUN=1 runs every section on the CPU through TRITON_INTERPRET=1 at toy
#: sizes, to validate this script before spending lease time on it.
DRY = os.environ.get("FASTPATCH_GPU_CHECK_DRYRUN") == "1"
DEV = "cpu" if DRY else "cuda"
SHAPES = {"tiny": (64, 96 + 17)} if DRY else {"llama-7b": (4096, 11008), "smollm2": (576, 1536), "bert-base": (768, 3072)}
P_LIST = (0, 100) if DRY else (0, 100, 1000, 10000, 50000)
M_LIST = (1, 5) if DRY else (1, 16, 512)
BIG = (64, 113, 100) if DRY else (4096, 11008, 10000)  # d, F, P of the Llama-7B cases
LOSS_N = 1000 if DRY else 40000
DTYPES = (torch.float32, torch.float16) if DRY else (torch.float32, torch.bfloat16)  # no bf16 in the interpreter
LOW = torch.float16 if DRY else torch.bfloat16
DECODE_P = (1000, 10000)  # banks of the decode roofline (--decode-p)
RESULTS: dict = {"sections": {}, "failures": []}
T0 = time.time()


def log(*a) -> None:
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def bench(fn, rep: int = 40) -> dict:
    if DRY:
        t = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t) * 1e3
        return {"ms": ms, "p20_ms": ms, "p80_ms": ms}
    fn()
    torch.cuda.synchronize()
    med, lo, hi = do_bench(fn, warmup=10, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return {"ms": med, "p20_ms": lo, "p80_ms": hi}


def bench_graph(fn, rep: int = 50) -> dict:
    """Median of CUDA-graph replays of ``fn``: the device time alone, without the Python and launch
    overhead between calls (how a serving stack runs decode steps). Autotuning happens in the
    warm-up call, before capture."""
    if DRY:
        return bench(fn)
    fn()
    torch.cuda.synchronize()
    med, lo, hi = do_bench_cudagraph(fn, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return {"ms": med, "p20_ms": lo, "p80_ms": hi}


def fused_ffn_at(config, *args, **kwargs) -> torch.Tensor:
    """The fused FFN at launch configuration ``config``: the library's kernel for its own
    configurations (and ``None``), the atomic schedule (``kernels_atomic.py``) for its."""
    run = atomic_patched_ffn if config is not None and "ROTATE_N" in config.kwargs else fused_patched_ffn
    return run(*args, config=config, **kwargs)


def gated_reference(x: torch.Tensor, layout, keys=None, biases=None, values=None) -> torch.Tensor:
    """The float64 reference of a gated (SiLU) FFN ``layout`` (``detect_layout``) plus patches."""
    D = lambda t: None if t is None else t.double()  # noqa: E731
    return R.patched_ffn_reference(D(x), D(layout.w_up), D(layout.w_down), R.ACT_SILU, w_gate=D(layout.w_gate),
                                   keys=D(keys), bias=D(biases), values=D(values))


def smollm2_config(**overrides):
    """SmolLM2-135M's architecture as a ``LlamaConfig`` (random weights: latency does not depend on
    them); 2 layers and 1,000 words in the dry run."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True, **overrides)
    if DRY:
        cfg.num_hidden_layers, cfg.vocab_size = 2, 1000
    return cfg


@contextlib.contextmanager
def env_var(name: str, value: str):
    """``os.environ[name] = value`` inside the block, the old value (or none) after it."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> float:
    atol, rtol = TOLERANCES[dtype]
    out, ref = out.detach(), ref.detach()
    scale = max(1.0, float(ref.abs().max()))
    err = float((out.double() - ref.double()).abs().max())
    ok = torch.allclose(out.double(), ref.double(), atol=atol * scale, rtol=rtol)
    if not ok:
        RESULTS["failures"].append(f"{what}: max abs err {err:.3g} (atol {atol * scale:.3g})")
    return err


# ------------------------------------------------------------------------- 0. precompile
def _split_extras(M: int) -> list:
    """Split-schedule configurations timed in the sweep beside its candidates: other group sizes,
    output slices, pipeline depths and programs per SM."""
    if DRY:
        return []
    tiles = [(64, 128, 256, 4, 4, 2, 1024), (64, 128, 512, 4, 3, 2, 512), (64, 128, 256, 4, 3, 2, 256),
             (64, 128, 256, 4, 5, 2, 256), (32, 128, 256, 4, 4, 4, 256), (64, 128, 256, 8, 4, 2, 256),
             (64, 64, 256, 4, 6, 2, 256), (128, 128, 256, 8, 3, 1, 512)]
    return [triton.Config({"BLOCK_M": 16, "BLOCK_F": f, "BLOCK_D": bd, "BLOCK_N": bn, "PROGRAMS_PER_SM": pps,
                           "GROUP_F": g}, num_warps=w, num_stages=st)
            for (f, bd, bn, w, st, pps, g) in tiles]



def _sweep_extras(M: int) -> list:
    """Atomic-schedule configurations timed in the sweep beside its candidates (not candidates
    themselves): the same tiles without the rotated column order, a 2-stage pipeline, other output
    tiles, deeper pipelines and a 128-register cap."""
    if DRY:
        return []
    bm = 1 if M == 1 else 16
    tiles = [
        (16, 64, 128, 128, 4, 3, 0, 0), (16, 64, 128, 128, 4, 3, 2, 0), (16, 64, 128, 128, 4, 2, 0, 1),
        (16, 64, 128, 64, 4, 4, 0, 1), (16, 64, 128, 256, 4, 3, 0, 1), (16, 128, 64, 128, 4, 4, 1, 1),
        (16, 64, 128, 128, 4, 5, 0, 1), (16, 64, 128, 128, 4, 4, 0, 0),
        # capped at 128 registers (a few spilled): 3-4 programs per SM instead of 2
        (16, 64, 128, 128, 4, 3, 0, 1, 128), (16, 64, 64, 128, 4, 4, 3, 1, 128),
    ]
    if bm == 1:
        tiles.append((1, 32, 256, 128, 8, 2, 2, 0))
    return [triton.Config({"BLOCK_M": m, "BLOCK_F": f, "BLOCK_D": bd, "BLOCK_N": bn, "PROGRAMS_PER_SM": pps,
                           "ROTATE_N": rot}, num_warps=w, num_stages=st, maxnreg=(reg or [None])[0])
            for (m, f, bd, bn, w, st, pps, rot, *reg) in tiles]


def _precompile_one(job: tuple) -> str:
    """Worker: launch one fused-FFN / patch configuration on small tensors whose specialisation
    (dtype, flags, which integers are 1 or divisible by 16) matches a case of the main process,
    so that Triton's on-disk cache holds the compiled kernel when the main process asks for it.

    ``job``: (kind, M, P, which, odd, gated, dtype name); kind ``split`` (the library's fused
    FFN), ``atomic`` (its comparison schedule) or ``patch``; ``which`` is a candidate's index,
    ``("extra", i)`` for a sweep extra, or ``"default"``; ``odd``: sizes not divisible by 16 (the
    correctness cases), else divisible (the timed Llama/SmolLM2/BERT shapes)."""
    kind, M, P, which, odd, gated, dname = job
    try:
        dtype = getattr(torch, dname)
        d, Fdim = (65, 97) if odd else (64, 96)
        x = torch.randn(M, d, device=DEV, dtype=dtype)
        w = torch.randn(Fdim, d, device=DEV, dtype=dtype)
        down = torch.randn(d, Fdim, device=DEV, dtype=dtype)
        keys, bias, values = (torch.randn(P, d, device=DEV, dtype=dtype), torch.zeros(P, device=DEV, dtype=dtype),
                              torch.randn(P, d, device=DEV, dtype=dtype))
        if kind in ("atomic", "split"):
            if which == "default":
                c = (default_split_config if kind == "split" else default_atomic_config)(M, dtype, gated)
            elif isinstance(which, tuple):
                c = (_split_extras if kind == "split" else _sweep_extras)(M)[which[1]]
            else:
                c = (split_configs_for if kind == "split" else atomic_configs_for)(M)[which]
            # the flags of _ffn_case: gated = SiLU without biases, two-matrix = tanh-GELU with biases
            extra_args = {"w_gate": w} if gated else {"b_up": torch.zeros(Fdim, device=DEV, dtype=dtype),
                                                    "b_down": torch.zeros(d, device=DEV, dtype=dtype)}
            fused_ffn_at(c, x, w, down.t(), R.ACT_SILU if gated else R.ACT_GELU_TANH, keys=keys, bias=bias,
                         values=values, **extra_args)
        else:
            c = patch_configs_for(M)[0 if which == "default" else which]
            patch_forward(x, keys, bias, values, torch.randn(M, d, device=DEV, dtype=dtype), backend="triton",
                          strategy="fused", config=c)
        if not DRY:
            torch.cuda.synchronize()
        return "ok"
    except Exception as e:  # the main process compiles (and reports) it again
        return f"{type(e).__name__}: {e}"[:160]


#: Longest wait for the compile workers (seconds).
PRECOMPILE_TIMEOUT_S = 150


def precompile(p_sizes: tuple[int, ...] = (48, 40), correctness_cases: bool = True) -> dict:
    """Compile the launch configurations this run will use, in parallel worker processes.

    Tuning compiles every candidate of every specialisation one after the other (2-3 s each, over
    a hundred in this script); 16 processes fill the disk cache in a fraction of that. ``p_sizes``:
    bank sizes standing for the timed ones (48: divisible by 16, like 10,000; 40: not, like 1,000).
    ``correctness_cases``: also section 2's odd shapes (every candidate in bf16, the defaults in
    fp32)."""
    import concurrent.futures as cf
    import multiprocessing as mp

    low = str(LOW).split(".")[1]
    jobs = []
    # M = 1 and 16 are their own specialisations; 5 stands for 2..15 (not divisible by 16),
    # 32 and 64 for the larger buckets.
    for M in (1, 5, 16, 32, 64):
        for P in p_sizes:
            jobs += [("atomic", M, P, i, False, True, low) for i in range(len(atomic_configs_for(M)))]
            jobs += [("split", M, P, i, False, True, low) for i in range(len(split_configs_for(M)))]
            jobs += [("patch", M, P, i, False, True, low) for i in range(len(patch_configs_for(M)))]
            if M in (1, 16):
                jobs += [("atomic", M, P, ("extra", i), False, True, low) for i in range(len(_sweep_extras(M)))]
                jobs += [("split", M, P, ("extra", i), False, True, low) for i in range(len(_split_extras(M)))]
    if correctness_cases:
        for M in (1, 5, 33):  # config_correctness: odd sizes, every candidate, both FFN forms
            for gated in (True, False):
                jobs += [("atomic", M, 41, i, True, gated, low) for i in range(len(atomic_configs_for(M)))]
                jobs += [("split", M, 41, i, True, gated, low) for i in range(len(split_configs_for(M)))]
            jobs += [("patch", M, 41, i, True, True, low) for i in range(len(patch_configs_for(M)))]
        for dname in ("float32", low):  # correctness(): each dtype's defaults at its cases' sizes
            for gated in (True, False):
                for kind in ("atomic", "split"):
                    jobs += [(kind, 1, 7, "default", True, gated, dname), (kind, 16, 40, "default", False, gated, dname),
                             (kind, 5, 41, "default", False, gated, dname)]
            jobs += [("patch", M, P, "default", odd, True, dname)
                     for (M, P, odd) in ((1, 7, True), (5, 40, False), (130, 40, True), (16, 41, False))]
    workers = 2 if DRY else min(16, os.cpu_count() or 4)
    if DRY:
        jobs = jobs[::7]
    t0 = time.time()
    ex = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
    try:  # a bounded wait: whatever is not compiled by then is compiled by the main process
        results = list(ex.map(_precompile_one, jobs, timeout=PRECOMPILE_TIMEOUT_S))
    except cf.TimeoutError:
        results = ["timed out"] * len(jobs)
    finally:
        ex.shutdown(wait=False, cancel_futures=True)
    bad = [f"{j}: {r}" for j, r in zip(jobs, results) if r != "ok"]
    return {"jobs": len(jobs), "workers": workers, "seconds": round(time.time() - t0, 1), "failed": bad[:20]}


# ----------------------------------------------------------------------------- 1. bandwidth
def measure_bandwidth() -> float:
    n = (1 << 20) if DRY else (1 << 30)  # 2 GiB of bf16 each way: far beyond L2, so this is HBM
    a = torch.empty(n, dtype=torch.bfloat16, device=DEV).normal_()
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a), rep=100)
    gbs = 2 * a.numel() * a.element_size() / (t["ms"] * 1e-3) / 1e9
    del a, b
    torch.cuda.empty_cache()
    return gbs


# --------------------------------------------------------------------------- 2. correctness
def correctness() -> list[dict]:
    rows = []
    for dtype in DTYPES:
        for (M, P, d, d_out) in [(1, 7, 113, 113), (5, 1000, 576, 576), (130, 1000, 113, 77), (16, 10017, 4096, 4096)][: 2 if DRY else 4]:
            x = torch.randn(M, d, device=DEV, dtype=dtype)
            keys, bias, values, _ = make_patches(x, P, d_out, active_per_token=3)
            base = torch.randn(M, d_out, device=DEV, dtype=dtype)
            ref = R.patch_forward_reference(x.double(), keys.double(), bias.double(), values.double(), base.double())
            for strategy in ("fused", "compact", "gemm"):
                # default launch configurations here (no tuning in fp32); every candidate is checked
                # in config_correctness, and the tuned paths in the timed sections
                cfg = patch_configs_for(M)[0] if strategy == "fused" else None
                out = patch_forward(x, keys, bias, values, base, backend="triton", strategy=strategy, config=cfg)
                err = close(out, ref, dtype, f"patch_forward[{strategy}] M={M} P={P} d={d} {dtype}")
                rows.append({"kernel": f"patch_forward/{strategy}", "dtype": str(dtype), "M": M, "P": P, "d": d, "max_err": err})
        for gated in (True, False):
            for (M, d, Fdim, P) in [(1, 113, 96 + 17, 7), (16, 576, 1536, 1000), (5, 4096, 11008, 10017)][: 1 if DRY else 3]:
                x, args, ref = _ffn_case(M, d, Fdim, d, P, gated, dtype)
                for sched, cfg in (("atomic", default_atomic_config(M, dtype, gated)),
                                   ("split", default_split_config(M, dtype, gated))):
                    out = fused_ffn_at(cfg, x, **args)
                    err = close(out, ref, dtype, f"fused_ffn/{sched} gated={gated} M={M} d={d} P={P} {dtype}")
                    rows.append({"kernel": f"fused_ffn/{sched}/{'gated' if gated else 'dense'}", "dtype": str(dtype),
                                 "M": M, "P": P, "d": d, "max_err": err})
        log(f"correctness {dtype}: patch_forward and fused FFN defaults done")
    rows += config_correctness()
    log("correctness: every candidate configuration done")
    rows += loss_correctness()
    log("correctness: loss kernels done")
    return rows


def _ffn_case(M: int, d: int, Fdim: int, d_out: int, P: int, gated: bool, dtype: torch.dtype):
    """Random inputs of ``fused_patched_ffn`` (gated, or two-matrix with biases) and the float64
    reference output: ``(x, keyword arguments, ref)``."""
    act = R.ACT_SILU if gated else R.ACT_GELU_TANH
    x = torch.randn(M, d, device=DEV, dtype=dtype)
    w_up = (torch.randn(Fdim, d, device=DEV) / d**0.5).to(dtype)
    w_gate = (torch.randn(Fdim, d, device=DEV) / d**0.5).to(dtype) if gated else None
    down = (torch.randn(d_out, Fdim, device=DEV) / Fdim**0.5).to(dtype)
    b_up = None if gated else torch.randn(Fdim, device=DEV).to(dtype)
    b_down = None if gated else torch.randn(d_out, device=DEV).to(dtype)
    keys, bias, values, _ = make_patches(x, P, d_out, active_per_token=3)
    args = dict(w_up=w_up, w_down=down.t(), act=act, w_gate=w_gate, b_up=b_up, b_down=b_down,
                keys=keys, bias=bias, values=values)
    D = lambda t: None if t is None else t.double()  # noqa: E731
    ref = R.patched_ffn_reference(D(x), D(w_up), D(down).t(), act, w_gate=D(w_gate), b_up=D(b_up),
                                  b_down=D(b_down), keys=D(keys), bias=D(bias), values=D(values))
    return x, args, ref


_SHORT = {"PROGRAMS_PER_SM": "pps", "ROTATE_N": "rot", "GROUP_F": "grp"}


def _cfg_name(c) -> str:
    k = c.kwargs
    return ("split " if "GROUP_F" in k else "") + ("gemv " if k["BLOCK_M"] == 1 else f"dot{k['BLOCK_M']} ") + " ".join(
        f"{_SHORT.get(n, n.split('_')[-1])}{v}" for n, v in k.items() if n != "BLOCK_M") + \
        f" w{c.num_warps} s{c.num_stages}" + (f" r{c.maxnreg}" if getattr(c, "maxnreg", None) else "")


def config_correctness() -> list[dict]:
    """Every candidate the autotuner may pick, on its own, in the low-precision dtype."""
    rows = []
    dtype = LOW
    d, Fdim, d_out, P = (113, 96 + 17, 113, 7) if DRY else (576 + 17, 1536 + 17, 576 + 17, 1000 + 17)
    # one token (GEMV and 16-row tiles), a decode batch (16-row tiles), and 64-row tiles; the
    # 32-row bucket shares its tiles with the 16-row one and is covered under the interpreter
    for M in (1, 5, 17) if DRY else (1, 5, 33):
        for gated in (True, False):
            x, args, ref = _ffn_case(M, d, Fdim, d_out, P, gated, dtype)
            for c in [*atomic_configs_for(M), *split_configs_for(M)]:
                rows.append(_config_row(f"fused_ffn[{_cfg_name(c)}]", lambda c=c: fused_ffn_at(c, x, **args), ref,
                                        f" gated={gated}", M, P, d))
        keys, bias, values = args["keys"], args["bias"], args["values"]
        base = torch.randn(M, d_out, device=DEV, dtype=dtype)
        ref = R.patch_forward_reference(x.double(), keys.double(), bias.double(), values.double(), base.double())
        for c in patch_configs_for(M):
            run = lambda c=c: patch_forward(x, keys, bias, values, base, backend="triton", strategy="fused", config=c)  # noqa: E731
            rows.append(_config_row(f"patch_forward[{_cfg_name(c)}]", run, ref, "", M, P, d))
    return rows


def _config_row(kernel: str, run, ref: torch.Tensor, what: str, M: int, P: int, d: int) -> dict:
    """One candidate configuration checked against ``ref`` in the low-precision dtype: its row."""
    try:
        out = run()
    except OutOfResources as e:  # the autotuner skips such a candidate too
        return {"kernel": kernel, "M": M, "max_err": f"skipped: {e}"[:120]}
    err = close(out, ref, LOW, f"{kernel} config{what} M={M} {LOW}")
    return {"kernel": kernel, "dtype": str(LOW), "M": M, "P": P, "d": d, "max_err": err}


def loss_correctness() -> list[dict]:
    try:
        from fastpatch.kernels import patch_loss as PL
    except Exception as e:  # the loss kernel is optional for this script's first sections
        RESULTS["failures"].append(f"patch_loss import: {e}")
        return []
    rows = []
    for dtype in DTYPES:
        for (N, d, n, k) in [(37, 113, 1, 5), (1000 + 17, 576, 5, 1000), (40000, 4096, 17, 1000)][: 2 if DRY else 3]:
            mem = torch.randn(N, d, device=DEV).to(dtype)
            keys = (torch.randn(n, d, device=DEV) / d).to(dtype).requires_grad_(True)
            bias = torch.randn(n, device=DEV).to(dtype).requires_grad_(True)
            a_e = torch.randn(n, device=DEV).requires_grad_(True)
            m1, m2 = PL.patch_memory_loss(mem, keys, bias, a_e, topk=k, backend="triton")
            g = torch.autograd.grad((m1 + m2).sum(), (keys, bias, a_e))
            kd, bd, ad = (t.detach().double().requires_grad_(True) for t in (keys, bias, a_e))
            r1, r2 = PL.patch_memory_loss_reference(mem.double(), kd, bd, ad, topk=k)
            gr = torch.autograd.grad((r1 + r2).sum(), (kd, bd, ad))
            errs = [close(m1, r1, dtype, f"patch_loss L_m1 N={N} d={d} n={n} {dtype}"),
                    close(m2, r2, dtype, f"patch_loss L_m2 N={N} d={d} n={n} {dtype}")]
            for name, a, b in zip(("d_keys", "d_bias", "d_a_edit"), g, gr):
                errs.append(close(a, b, dtype, f"patch_loss {name} N={N} d={d} n={n} {dtype}"))
            rows.append({"kernel": "patch_loss", "dtype": str(dtype), "N": N, "d": d, "n": n, "max_err": max(errs)})
    return rows


# ------------------------------------------------------------------------ 3. FFN latency
def ffn_latency(hbm_gbs: float) -> list[dict]:
    rows = []
    dtype = LOW
    for shape, (d, Fdim) in SHAPES.items():
        ffn_mod = GatedFFN(d, Fdim, dtype=dtype, device=DEV).eval()
        for M in M_LIST:
            x = torch.randn(M, d, device=DEV, dtype=dtype)
            base_ms = None
            for P in P_LIST:
                holder = torch.nn.Module()
                holder.mlp = GatedFFN(d, Fdim, dtype=dtype, device=DEV)
                holder.mlp.load_state_dict(ffn_mod.state_dict())
                pffn = PatchedFFN.wrap(holder, "mlp")
                n_active = 0
                if P:
                    keys, biases, values, n_active = make_patches(x, P, d)
                    pffn.add_patches(keys, biases, values)
                layout = detect_layout(ffn_mod)
                methods = {"unpatched": ffn_mod}
                methods["fastpatch"] = pffn
                if P:
                    methods["concat (authors)"] = ConcatPatcher(layout, keys, biases, values)
                    methods["grace codebook"] = GraceCodebook(ffn_mod, keys, values, radius=1e-3)
                with torch.no_grad():
                    ref = gated_reference(x, layout, *((keys, biases, values) if P else ()))
                    for name, fn in methods.items():
                        if name != "grace codebook":  # GRACE computes a different function
                            want = ref if name != "unpatched" else gated_reference(x, layout)
                            close(fn(x), want, dtype, f"latency check {name} {shape} M={M} P={P}")
                        t = bench(lambda fn=fn: fn(x))
                        w_bytes = 3 * d * Fdim * 2
                        if name == "fastpatch":
                            nbytes = w_bytes + P * (d + 1) * 2 + n_active * d * 2
                        elif name == "concat (authors)":
                            nbytes = w_bytes + P * (2 * d + 1) * 2
                        elif name == "grace codebook":
                            nbytes = w_bytes + P * d * 2 * 2  # keys read (as fp32 copy) + values gather
                        else:
                            nbytes = w_bytes
                        nbytes += 2 * M * d * 2
                        gbs = nbytes / (t["ms"] * 1e-3) / 1e9
                        if name == "unpatched" and P == 0:
                            base_ms = t["ms"]
                        rows.append({"shape": shape, "d": d, "F": Fdim, "M": M, "P": P, "active": n_active,
                                     "method": name, **t, "bytes": nbytes, "GB/s": gbs,
                                     "pct_hbm": 100 * gbs / hbm_gbs,
                                     "vs_unpatched": t["ms"] / base_ms if base_ms else None})
                del methods, pffn, holder
                torch.cuda.empty_cache()
            log(f"latency {shape} M={M} done")
    return rows


# ------------------------------------------------------------------ 3b. decode roofline
def decode_roofline(hbm_gbs: float) -> list[dict]:
    """The issue's GPU goal, measured directly: Llama-7B FFN, bf16, P patches, M <= 16 tokens.

    Each method is timed twice: eagerly (``do_bench``: Python and launch overhead between calls
    included) and as CUDA-graph replays (device time alone). ``must_read`` counts the bytes the
    method cannot avoid: the base weights, x, the output, and for fastpatch the keys, biases and
    the value rows of the patches that fire; for the concatenated baseline every value row.
    """
    rows = []
    d, Fdim, _ = BIG
    dtype = LOW
    holder = torch.nn.Module()
    holder.mlp = GatedFFN(d, Fdim, dtype=dtype, device=DEV).eval()
    layout = detect_layout(holder.mlp)
    w_bytes = 3 * d * Fdim * 2
    for P in ((7, 100) if DRY else DECODE_P):
        for M in ((1, 5) if DRY else (1, 16)):
            x = torch.randn(M, d, device=DEV, dtype=dtype)
            keys, biases, values, n_active = make_patches(x, P, d)
            pffn = PatchedFFN.wrap(holder, "mlp")
            pffn.add_patches(keys, biases, values)
            concat = ConcatPatcher(layout, keys, biases, values)
            concat_each = ConcatPatcher(layout, keys, biases, values, cat_every_forward=True)
            kernel = lambda run=fused_patched_ffn: run(  # noqa: E731
                x, layout.w_up, layout.w_down, R.ACT_SILU, w_gate=layout.w_gate, keys=keys, bias=biases, values=values)
            unfused = lambda: patch_forward(x, keys, biases, values, pffn.ffn(x), backend="triton")  # noqa: E731
            io = 2 * M * d * 2
            methods = {
                "unpatched": (pffn.ffn, w_bytes + io),
                "fastpatch (PatchedFFN)": (pffn, w_bytes + P * (d + 1) * 2 + n_active * d * 2 + io),
                "fused kernel alone": (kernel, w_bytes + P * (d + 1) * 2 + n_active * d * 2 + io),
                "fused kernel, atomic schedule": (lambda: kernel(atomic_patched_ffn), w_bytes + P * (d + 1) * 2 + n_active * d * 2 + io),
                "cuBLAS FFN + patch kernel": (unfused, w_bytes + P * (d + 1) * 2 + n_active * d * 2 + io),
                "concat (authors)": (concat, w_bytes + P * (2 * d + 1) * 2 + io),
                # the authors' code re-concatenates on every forward: read F + P rows, write them
                "concat per forward (authors' code)": (concat_each, w_bytes + P * (2 * d + 1) * 2
                                                       + 2 * (Fdim + P) * d * 2 + io),
            }
            with torch.no_grad():
                ref = gated_reference(x, layout, keys, biases, values)
                times = {}
                for name, (fn, nbytes) in methods.items():
                    call = (lambda fn=fn: fn(x)) if isinstance(fn, torch.nn.Module) else fn
                    if name != "unpatched":
                        close(call(), ref, dtype, f"decode check {name} M={M} P={P}")
                    eager, graph = bench(call, rep=100), bench_graph(call)
                    times[name] = graph["ms"]
                    for mode, t in (("eager", eager), ("cuda graph", graph)):
                        gbs = nbytes / (t["ms"] * 1e-3) / 1e9
                        rows.append({"M": M, "P": P, "active": n_active, "method": name, "timing": mode, **t,
                                     "must_read_MB": nbytes / 1e6, "GB/s": gbs, "pct_hbm": 100 * gbs / hbm_gbs})
                mine = rows[-2 * len(methods):]
                for r in mine:
                    for col, base in (("speedup_vs_concat", "concat (authors)"),
                                      ("speedup_vs_concat_each", "concat per forward (authors' code)")):
                        ref_ms = [q["ms"] for q in mine if q["method"] == base and q["timing"] == r["timing"]][0]
                        r[col] = ref_ms / r["ms"]
            pffn.unwrap()
            del concat, concat_each, keys, biases, values
            torch.cuda.empty_cache()
            each_ms = times["concat per forward (authors' code)"]
            log(f"decode roofline P={P} M={M}: fastpatch {times['fastpatch (PatchedFFN)']:.4f} ms, "
                f"kernel {times['fused kernel alone']:.4f} ms, concat {times['concat (authors)']:.4f} ms, "
                f"concat per forward {each_ms:.4f} ms (graphs)")
    return rows


# --------------------------------------------------------------------------- 4. crossover
def crossover() -> list[dict]:
    """Fused one-launch FFN against cuBLAS FFN + patch kernel, by tokens (Llama-7B, P = 10,000).

    CUDA-graph replays (device time; eager timings at these sizes measure Python), so the
    crossover is the kernels' own. A strategy that cannot be captured is timed eagerly and marked.
    """
    rows = []
    d, Fdim, P = BIG
    dtype = LOW
    ffn = GatedFFN(d, Fdim, dtype=dtype, device=DEV).eval()
    lay = detect_layout(ffn)
    for M in ((1, 17) if DRY else (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)):
        x = torch.randn(M, d, device=DEV, dtype=dtype)
        keys, biases, values, _ = make_patches(x, P, d)
        row: dict = {"M": M}
        with torch.no_grad():
            methods = {
                "unpatched": lambda: ffn(x),
                "fused_ffn": (lambda: fused_patched_ffn(x, lay.w_up, lay.w_down, R.ACT_SILU, w_gate=lay.w_gate,
                                                        keys=keys, bias=biases, values=values)) if M <= 64 else None,
                "fused_atomic": (lambda: atomic_patched_ffn(x, lay.w_up, lay.w_down, R.ACT_SILU, w_gate=lay.w_gate,
                                                            keys=keys, bias=biases, values=values))
                if M <= 64 else None,
                "cublas+patch_fused": lambda: patch_forward(x, keys, biases, values, ffn(x), backend="triton", strategy="fused"),
                "cublas+patch_compact": lambda: patch_forward(x, keys, biases, values, ffn(x), backend="triton", strategy="compact"),
                "cublas+patch_gemm": lambda: patch_forward(x, keys, biases, values, ffn(x), backend="triton", strategy="gemm"),
            }
            for name, fn in methods.items():
                if fn is None:
                    continue
                try:
                    row[f"{name}_ms"] = bench_graph(fn)["ms"]
                except Exception as e:  # not capturable (a host sync): time it eagerly instead
                    row[f"{name}_ms"] = bench(fn)["ms"]
                    row.setdefault("eager", []).append(name)
                    log(f"crossover M={M} {name}: timed eagerly ({type(e).__name__})")
        rows.append(row)
    return rows


# ----------------------------------------------------------------- 4b. configuration sweep
def config_sweep(hbm_gbs: float) -> list[dict]:
    """Each autotune candidate of the fused FFN timed alone (Llama-7B shapes, P = 10,000)."""
    rows = []
    d, Fdim, P = BIG
    dtype = LOW
    ffn = GatedFFN(d, Fdim, dtype=dtype, device=DEV).eval()
    lay = detect_layout(ffn)
    for M in (1, 16) if not DRY else (1, 5):
        x = torch.randn(M, d, device=DEV, dtype=dtype)
        keys, biases, values, n_active = make_patches(x, P, d)
        nbytes = 3 * d * Fdim * 2 + P * (d + 1) * 2 + n_active * d * 2 + 2 * M * d * 2
        call = lambda c: fused_ffn_at(c, x, lay.w_up, lay.w_down, R.ACT_SILU, w_gate=lay.w_gate,  # noqa: E731
                                      keys=keys, bias=biases, values=values)
        ref = gated_reference(x, lay, keys, biases, values)
        with torch.no_grad():
            for c in [None, *atomic_configs_for(M), *_sweep_extras(M), *split_configs_for(M), *_split_extras(M)]:
                try:
                    if c is not None:
                        close(call(c), ref, dtype, f"config sweep [{_cfg_name(c)}] M={M}")
                    t = bench_graph(lambda c=c: call(c))
                except Exception as e:  # a candidate that does not fit this card (shared memory)
                    rows.append({"M": M, "config": "autotuned" if c is None else _cfg_name(c),
                                 "error": f"{type(e).__name__}: {e}"[:200]})
                    continue
                tuned = _fused_ffn_split_kernel
                name = "autotuned: " + _cfg_name(tuned.best_config) if c is None and hasattr(
                    tuned, "best_config") else ("default" if c is None else _cfg_name(c))
                if c is not None and all(c is not q for q in [*atomic_configs_for(M), *split_configs_for(M)]):
                    name = "extra: " + name
                gbs = nbytes / (t["ms"] * 1e-3) / 1e9
                rows.append({"M": M, "config": name, **t, "GB/s": gbs, "pct_hbm": 100 * gbs / hbm_gbs})
        log(f"config sweep M={M} done")
    return rows


def autotune_choices() -> dict:
    """What the autotuner picked for each key it saw in this run."""
    out = {}
    for name, k in (("fused_ffn_atomic", _fused_ffn_atomic_kernel), ("fused_ffn_split", _fused_ffn_split_kernel),
                    ("patch_fused", _patch_fused_kernel)):
        cache = getattr(k, "cache", {}) or {}
        out[name] = {str(key): _cfg_name(c) for key, c in cache.items()}
    return out


# -------------------------------------------------------------------------- 5. loss kernel
def loss_kernel(hbm_gbs: float) -> list[dict]:
    try:
        from fastpatch.kernels import patch_loss as PL
    except Exception:
        return []
    rows = []
    N, d = LOSS_N, BIG[0]
    for dtype in (LOW, torch.float32):
        mem = torch.randn(N, d, device=DEV).to(dtype)
        for n in (1, 5, 17):
            keys = (torch.randn(n, d, device=DEV) / d).to(dtype).requires_grad_(True)
            bias = torch.zeros(n, device=DEV, dtype=dtype, requires_grad=True)
            a_e = torch.ones(n, device=DEV, requires_grad=True)
            k = 1000

            def fwd():
                with torch.no_grad():
                    return PL.patch_memory_loss(mem, keys, bias, a_e, topk=k, backend="triton")

            def step():
                m1, m2 = PL.patch_memory_loss(mem, keys, bias, a_e, topk=k, backend="triton")
                torch.autograd.grad((m1 + m2).sum(), (keys, bias, a_e))

            def naive_step():
                A = mem @ keys.t() + bias
                top = A.float().topk(k, dim=0).values
                m1 = torch.exp(top - a_e + 3).mean(0)
                m2 = torch.exp(top + 3).mean(0)
                torch.autograd.grad((m1 + m2).sum(), (keys, bias, a_e))

            nbytes = PL.memory_loss_bytes(N, d, n, k, dtype)
            tf, ts, tn = bench(fwd), bench(step), bench(naive_step)
            pre_bytes = N * d * mem.element_size()
            t_pre = bench(lambda: PL.patch_preactivations(mem, keys.detach(), bias.detach(), backend="triton"))
            rows.append({"dtype": str(dtype), "N": N, "d": d, "n": n, "topk": k,
                         "preact_ms": t_pre["ms"], "preact_pct_hbm": 100 * pre_bytes / (t_pre["ms"] * 1e-3) / 1e9 / hbm_gbs,
                         "fwd_ms": tf["ms"], "step_ms": ts["ms"], "naive_torch_step_ms": tn["ms"],
                         "bytes": nbytes, "step_GB/s": nbytes / (ts["ms"] * 1e-3) / 1e9,
                         "step_pct_hbm": 100 * nbytes / (ts["ms"] * 1e-3) / 1e9 / hbm_gbs})
        del mem
    return rows


# --------------------------------------------------------------------- 6. whole model
def whole_model() -> list[dict]:
    from transformers import LlamaForCausalLM

    cfg = smollm2_config(rms_norm_eps=1e-5)
    rows = []
    for dtype in (LOW if not DRY else torch.float32,):
        model = LlamaForCausalLM(cfg).to(DEV, dtype).eval()
        ids = torch.randint(0, cfg.vocab_size, (1, 128), device=DEV)
        pffn = PatchedFFN.wrap(model, "model.layers.-1.mlp")
        captured = {}
        h = pffn.ffn.register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0].reshape(-1, 576)))
        with torch.no_grad():
            model(ids)
        h.remove()
        base_prefill = base_decode = None
        for P in ((0, 100) if DRY else (0, 1000, 10000)):
            pffn.bank.clear()
            if P:
                k_, b_, v_, _ = make_patches(captured["x"][-8:], P, 576)
                pffn.add_patches(k_, b_, v_)
            with torch.no_grad():
                prefill = bench(lambda: model(ids, use_cache=False), rep=40)
                out = model(ids, use_cache=True)
                cache = out.past_key_values
                nxt = ids[:, -1:]

                def decode():
                    model(nxt, past_key_values=cache, use_cache=True)
                    cache.crop(-1)  # drop the token just added: every call decodes at 128

                dec = bench(decode, rep=40)
            base_prefill = base_prefill or prefill["ms"]
            base_decode = base_decode or dec["ms"]
            rows.append({"model": "SmolLM2-135M architecture (random weights)", "dtype": str(dtype), "P": P,
                         "prefill128_ms": prefill["ms"], "decode_ms": dec["ms"],
                         "prefill_vs_unpatched": prefill["ms"] / base_prefill, "decode_vs_unpatched": dec["ms"] / base_decode})
        del model
        torch.cuda.empty_cache()
    return rows


def editing() -> list[dict]:
    """Seconds per edit on the GPU: SmolLM2-135M architecture (random weights, fp32), a
    40,000-vector memory, single-token targets the model gets wrong; default editor and the
    authors' init, same requests. Kernels run at their default launch configurations
    (``FASTPATCH_AUTOTUNE=0``): tuning every fp32 candidate would cost more lease time than the
    edits themselves."""
    with env_var("FASTPATCH_AUTOTUNE", "0"):
        return _editing()


def _editing() -> list[dict]:
    import statistics

    from transformers import LlamaForCausalLM

    from fastpatch.editor import Editor, EditorConfig, EditRequest

    cfg = smollm2_config()
    n_mem, n_edits = (2000, 3) if DRY else (40000, 20)

    tok = _id_tokenizer(cfg.vocab_size)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(DEV).eval()
    rows = []
    for name, ecfg in (("fastpatch", EditorConfig()), ("fastpatch, authors' init", EditorConfig.authors(max_steps=300))):
        ed = Editor(model, tok, ecfg)
        ed.memory.add(torch.randn(n_mem, 576, device=DEV) * 0.5)
        g = torch.Generator().manual_seed(1)
        secs, steps = [], []
        for i in range(n_edits + 2):  # the first two warm up kernels and caches
            ids = torch.randint(3, cfg.vocab_size, (8,), generator=g).tolist()
            prompt = " ".join(map(str, ids))
            with torch.no_grad():
                pred = int(model(torch.tensor([ids], device=DEV)).logits[0, -1].argmax())
            target = 3 + (pred + 1 + i) % (cfg.vocab_size - 3)
            torch.cuda.synchronize() if not DRY else None
            res = ed.edit(EditRequest(prompt, str(target), edit_id=f"g{name}{i}"))
            if i >= 2:
                secs.append(res.seconds)
                steps.append(res.steps)
        rows.append({"method": name, "edits": len(secs), "memory_vectors": len(ed.memory),
                     "median_ms_per_edit": 1e3 * statistics.median(secs), "p90_ms_per_edit": 1e3 * sorted(secs)[int(0.9 * (len(secs) - 1))],
                     "median_steps": statistics.median(steps)})
        ed.ffn.unwrap()
    return rows


def _id_tokenizer(vocab_size: int):
    """A real (word-level) Hugging Face tokenizer whose words are the token ids themselves:
    "17 4093 5" encodes to [17, 4093, 5]. Ids 0-2 are [PAD], [UNK] and </s>. The lease machine
    has no hub access, and the editing cost does not depend on the vocabulary's spelling."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "</s>": 2, **{str(i): i for i in range(3, vocab_size)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>")


def memory() -> dict:
    d, Fdim, P = BIG
    holder = torch.nn.Module()
    holder.mlp = GatedFFN(d, Fdim, dtype=LOW, device=DEV)
    w_ptrs = {p.data_ptr() for p in holder.mlp.parameters()}
    cuda = torch.cuda.is_available() and not DRY
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    pffn = PatchedFFN.wrap(holder, "mlp", capacity=16)
    x = torch.randn(16, d, device=DEV, dtype=LOW)
    for _ in range(10):  # grow by appends, as an edit stream does
        k_, b_, v_, _ = make_patches(x, P // 10, d)
        pffn.add_patches(k_, b_, v_)
    with torch.no_grad():
        pffn(x)
    storage = pffn.bank.storage_bytes()
    formula = P * (2 * d + 1) * 2
    still_same = {p.data_ptr() for p in pffn.ffn.parameters()} == w_ptrs
    return {"P": P, "d": d, "storage_bytes": storage, "formula_bytes": formula, "slack_ratio": storage / formula,
            "allocated_delta_bytes": (torch.cuda.memory_allocated() - before) if cuda else None,
            "peak_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "base_weights_not_copied": still_same}


OUT_DIR: Path | None = None


def section(name: str, fn, *args):
    log(f"== {name}")
    try:
        out = fn(*args)
    except Exception as e:
        traceback.print_exc()
        RESULTS["failures"].append(f"section {name} crashed: {e!r}")
        out = None
    RESULTS["sections"][name] = out
    if OUT_DIR is not None:  # after every section: a run cut short by the lease keeps what it measured
        RESULTS["wall_s"] = time.time() - T0
        write_atomic(OUT_DIR / "gpu_check.json", json.dumps(RESULTS, indent=1, default=str))
    return out


def md_table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


#: Columns of each section's table in ``gpu_check.md``, in the order the tables appear.
REPORT_COLUMNS = [
    ("correctness", ["kernel", "dtype", "M", "N", "P", "d", "n", "max_err"]),
    ("decode_roofline", ["M", "P", "active", "method", "timing", "ms", "p20_ms", "p80_ms", "must_read_MB", "GB/s", "pct_hbm", "speedup_vs_concat", "speedup_vs_concat_each"]),
    ("ffn_latency", ["shape", "M", "P", "active", "method", "ms", "p20_ms", "p80_ms", "GB/s", "pct_hbm", "vs_unpatched"]),
    ("crossover", ["M", "unpatched_ms", "fused_ffn_ms", "fused_atomic_ms", "cublas+patch_fused_ms", "cublas+patch_compact_ms", "cublas+patch_gemm_ms", "eager"]),
    ("config_sweep", ["M", "config", "ms", "p20_ms", "p80_ms", "GB/s", "pct_hbm", "error"]),
    ("loss_kernel", ["dtype", "N", "d", "n", "preact_ms", "preact_pct_hbm", "fwd_ms", "step_ms", "naive_torch_step_ms", "step_GB/s", "step_pct_hbm"]),
    ("whole_model", ["model", "dtype", "P", "prefill128_ms", "decode_ms", "prefill_vs_unpatched", "decode_vs_unpatched"]),
    ("editing", ["method", "edits", "memory_vectors", "median_ms_per_edit", "p90_ms_per_edit", "median_steps"]),
    ("prefill", ["shape", "M", "P", "active", "timing", "unpatched_ms", "fastpatch_ms", "concat_ms", "speedup_vs_concat", "vs_unpatched"]),
    ("scale", ["P", "M", "active", "timing", "unpatched_ms", "fastpatch_ms", "concat_ms", "speedup_vs_concat", "patch_overhead_ms", "key_scan_floor_ms", "bytes_per_key_element", "pct_hbm"]),
    ("split_tuning", ["M", "default_config", "default_ms", "best_config", "best_ms", "default_vs_best", "candidates", "patchedffn_default_ms", "config", "error"]),
    ("gpu_editing", ["edits", "memory_vectors", "first_edit_s", "median_ms_per_edit", "p90_ms_per_edit", "max_ms_per_edit", "median_steps", "success_rate", "compilations_first_edit", "compilations_after_first_edit", "tuned_keys_after_first_edit"]),
    ("split_specialization", ["P", "M", "variant", "ms", "vs_shipped", "error"]),
    ("compiled", ["mode", "dtype", "first_call_s", "max_abs_err", "compiled_ms", "eager_ms", "speedup", "frames_compiled", "dynamo_unique_graphs", "graph_breaks"]),
]


def timed_sections() -> list[tuple]:
    """(name, function, whether it takes the measured HBM bandwidth) of every timed section, in
    the order they run. Issue 16's (``gpu_issue16.py``) take this module as their first argument."""
    me = sys.modules[__name__]
    return [("decode_roofline", decode_roofline, True), ("config_sweep", config_sweep, True),
            ("ffn_latency", ffn_latency, True), ("loss_kernel", loss_kernel, True),
            ("crossover", crossover, False), ("whole_model", whole_model, False), ("memory", memory, False),
            ("editing", editing, False),
            ("prefill", lambda *a: I16.prefill(me, *a), True),
            ("scale", lambda *a: I16.scale(me, *a), True),
            ("split_tuning", lambda *a: I16.split_tuning(me, *a), True),
            ("gpu_editing", lambda: I16.gpu_editing(me), False),
            ("compiled", lambda: I16.compiled(me), False),
            ("split_specialization", lambda *a: GS.split_specialization(me, *a), True)]


def parse_args(names: list[str]) -> argparse.Namespace:
    """The command line; ``names``: the timed sections ``--sections`` may choose from."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/gpu"))
    ap.add_argument("--quick", action="store_true", help="correctness only")
    ap.add_argument("--skip-correctness", action="store_true",
                    help="skip section 2 (the timed sections still check each method they time)")
    ap.add_argument("--no-precompile", action="store_true", help="compile serially, as tuning asks")
    ap.add_argument("--sections", default="all",
                    help="comma-separated subset of the timed sections to run (after correctness), e.g. "
                         "decode_roofline,config_sweep; default all")
    ap.add_argument("--decode-p", default=",".join(map(str, DECODE_P)), help="bank sizes of the decode roofline")
    args = ap.parse_args()
    args.wanted = set(names) if args.sections == "all" else set(args.sections.split(","))
    unknown = args.wanted - set(names)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {names}")
    return args


def environment() -> dict:
    """The card, its multiprocessors and the versions this run measured with."""
    if DRY:
        os.environ.setdefault("FASTPATCH_BACKEND", "triton")
        name, sms = "dry-run (CPU, TRITON_INTERPRET=1)", 0
    else:
        props = torch.cuda.get_device_properties(0)
        name, sms = props.name, props.multi_processor_count
    return {"gpu": name, "sms": sms, "torch": torch.__version__, "triton": triton.__version__,
            "fastpatch": fastpatch.__version__, "python": platform.python_version(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "cpu_threads": torch.get_num_threads()}


def write_report(out: Path, hbm: float) -> None:
    """``gpu_check.json``, ``ffn_latency.csv`` and ``gpu_check.md`` (also printed)."""
    write_atomic(out / "gpu_check.json", json.dumps(RESULTS, indent=1, default=str))
    lat = RESULTS["sections"].get("ffn_latency") or []
    if lat:
        with atomic_file(out / "ffn_latency.csv", "w") as f:
            w = csv.DictWriter(f, fieldnames=list(lat[0]))
            w.writeheader()
            w.writerows(lat)
    report = [f"# GPU check on {RESULTS['env']['gpu']}", f"HBM copy bandwidth: {hbm:.0f} GB/s", ""]
    for name, cols in REPORT_COLUMNS:
        rows = RESULTS["sections"].get(name) or []
        if rows:
            report += [f"## {name}", md_table(rows, [c for c in cols if any(c in r for r in rows)]), ""]
    if RESULTS.get("autotune"):
        report += ["## autotune choices", "```", json.dumps(RESULTS["autotune"], indent=1), "```", ""]
    if RESULTS["sections"].get("memory"):
        report += ["## memory", "```", json.dumps(RESULTS["sections"]["memory"], indent=1), "```", ""]
    report += ["## failures", *(f"- {f}" for f in RESULTS["failures"] or ["none"])]
    write_atomic(out / "gpu_check.md", "\n".join(report))
    print("\n".join(report))


def main() -> int:
    global OUT_DIR, DECODE_P
    timed = timed_sections()
    args = parse_args([n for n, _, _ in timed])
    DECODE_P = tuple(int(v) for v in args.decode_p.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    OUT_DIR = out
    RESULTS["env"] = environment()
    log(RESULTS["env"])
    fast = {"decode_roofline", "config_sweep", "crossover"}
    p_sizes = (48,) if (args.skip_correctness and args.wanted <= fast and all(p % 16 == 0 for p in DECODE_P)) else (48, 40)
    if not args.no_precompile:  # in the dry run: checks the worker processes' plumbing
        section("precompile", precompile, p_sizes, not args.skip_correctness)
        log(f"precompiled: {RESULTS['sections']['precompile']}")
    hbm = section("hbm_bandwidth_GBps", measure_bandwidth)
    log(f"HBM copy bandwidth: {hbm:.0f} GB/s")
    if not args.skip_correctness:
        FF.CHECK_SPLIT_FLAGS = True  # the kernel's error flags, read after every launch
        section("correctness", correctness)
        FF.CHECK_SPLIT_FLAGS = False
    log(f"correctness failures so far: {len(RESULTS['failures'])}")
    if not args.quick:
        for name, fn, takes_hbm in timed:
            if name in args.wanted:
                section(name, fn, *((hbm,) if takes_hbm else ()))
        RESULTS["autotune"] = autotune_choices()
    RESULTS["wall_s"] = time.time() - T0
    write_report(out, hbm)
    log(f"done in {time.time() - T0:.0f}s; failures: {len(RESULTS['failures'])}")
    return 1 if RESULTS["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
