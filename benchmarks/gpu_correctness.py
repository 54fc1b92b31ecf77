"""Sections 0 and 2 of ``gpu_check.py``: ``precompile`` (every launch configuration the run will
use, compiled in worker processes) and ``correctness`` (every Triton kernel against its float64
reference: the defaults, every autotune candidate, the patch-training loss kernels).
"""

from __future__ import annotations

import os
import time

import torch
from triton.runtime.errors import OutOfResources

from baselines import make_patches
from fastpatch.kernels import reference as R
from fastpatch.kernels.fused_ffn import default_split_config, split_configs_for
from fastpatch.kernels.patch_forward import patch_configs_for, patch_forward
from gpu_common import (
    DEV, DRY, DTYPES, LOW, RESULTS, _cfg_name, _split_extras, _sweep_extras, close, fused_ffn_at, log,
)
from kernels_atomic import atomic_configs_for, default_atomic_config


# ------------------------------------------------------------------------- 0. precompile
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

