"""The kernel-level timed sections of ``gpu_check.py``: the HBM bandwidth, the decode roofline,
the patched FFN latency table, the fused/unfused crossover, the launch-configuration sweep (and
what the autotuner picked) and the patch-training loss kernel.
"""

from __future__ import annotations

import torch

import gpu_common as C
from baselines import ConcatPatcher, GatedFFN, GraceCodebook, make_patches
from fastpatch import PatchedFFN
from fastpatch.ffn import detect_layout
from fastpatch.kernels import reference as R
from fastpatch.kernels.fused_ffn import _fused_ffn_split_kernel, fused_patched_ffn, split_configs_for
from fastpatch.kernels.patch_forward import _patch_fused_kernel, patch_forward
from gpu_common import (
    BIG, DEV, DRY, LOSS_N, LOW, M_LIST, P_LIST, SHAPES, _cfg_name, _split_extras, _sweep_extras, bench,
    bench_graph, close, fused_ffn_at, gated_reference, log,
)
from kernels_atomic import _fused_ffn_atomic_kernel, atomic_configs_for, atomic_patched_ffn


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
    for P in ((7, 100) if DRY else C.DECODE_P):
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
