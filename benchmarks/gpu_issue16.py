"""Issue 16's GPU sections of ``gpu_check.py`` (prefill, scale, split tuning, editing, compile).

Each function takes ``g``, the running ``gpu_check`` module (its ``bench``/``bench_graph``/``close``
helpers, sizes and ``RESULTS``), so the script stays one run that writes one JSON:

- ``prefill``: M = 512 and 2,048 tokens, P = 10,000, Llama-7B and SmolLM2 FFN shapes (bf16):
  PatchedFFN against the merged concatenation (the authors' patched layers, concatenated once)
  and the unpatched FFN, eager and CUDA-graph timing (target: >= 1.2x over the concatenation);
- ``scale``: P = 1k / 10k / 100k at M = 1 and 16 (Llama-7B, bf16, graphs): the key scan's share,
  bytes per key element, against the concatenation;
- ``split_tuning``: the split schedule's default launch configuration against every candidate,
  CUDA-graph timing, 1-16 tokens, and PatchedFFN at the default (tuning off);
- ``gpu_editing``: 200 edits (SmolLM2 architecture, fp32, 40,000-vector memory) with the
  autotuner as shipped: median and p90 per edit, and Triton compilations / tuner runs counted
  after every edit (target: none after the first edit);
- ``compiled``: ``torch.compile(fullgraph=True, mode="reduce-overhead")`` (CUDA graphs) of a
  patched SmolLM2-architecture model: logits against eager, decode time, recompilations over 20
  bank updates.
"""

from __future__ import annotations

import statistics
import time
from types import ModuleType

import torch


def _methods(g: ModuleType, d: int, Fdim: int, x: torch.Tensor, P: int, dtype: torch.dtype):
    """(ffn module, PatchedFFN, concatenation, active patches, float64 reference)."""
    holder = torch.nn.Module()
    holder.mlp = g.GatedFFN(d, Fdim, dtype=dtype, device=g.DEV).eval()
    layout = g.detect_layout(holder.mlp)
    keys, biases, values, n_active = g.make_patches(x, P, d)
    pffn = g.PatchedFFN.wrap(holder, "mlp")
    pffn.add_patches(keys, biases, values)
    concat = g.ConcatPatcher(layout, keys, biases, values)
    ref = g.gated_reference(x, layout, keys, biases, values)
    return pffn.ffn, pffn, concat, n_active, ref


def _time_three(g: ModuleType, x, ffn, pffn, concat, ref, dtype, what: str, graphs: bool = True) -> dict:
    out = {}
    with torch.no_grad():
        for name, fn in (("unpatched", ffn), ("fastpatch", pffn), ("concat (authors, merged)", concat)):
            if name != "unpatched":
                g.close(fn(x), ref, dtype, f"{what} {name}")
            out[name] = {"eager": g.bench(lambda fn=fn: fn(x))["ms"]}
            if graphs:
                try:
                    out[name]["graph"] = g.bench_graph(lambda fn=fn: fn(x))["ms"]
                except Exception as e:  # a host sync: not capturable
                    out[name]["graph_error"] = f"{type(e).__name__}: {e}"[:160]
    return out


def prefill(g: ModuleType, hbm_gbs: float) -> list[dict]:
    """Prefill-sized calls: PatchedFFN against the merged concatenation (issue 16, point 4)."""
    rows = []
    dtype = g.LOW
    shapes = {"tiny": (64, 113)} if g.DRY else {"llama-7b": (4096, 11008), "smollm2": (576, 1536)}
    P = 100 if g.DRY else 10000
    for shape, (d, Fdim) in shapes.items():
        for M in ((17, 40) if g.DRY else (512, 2048)):
            x = torch.randn(M, d, device=g.DEV, dtype=dtype)
            ffn, pffn, concat, n_active, ref = _methods(g, d, Fdim, x, P, dtype)
            t = _time_three(g, x, ffn, pffn, concat, ref, dtype, f"prefill {shape} M={M}")
            for timing in ("eager", "graph"):
                if not all(timing in v for v in t.values()):
                    continue
                c, f, u = (t[n][timing] for n in ("concat (authors, merged)", "fastpatch", "unpatched"))
                rows.append({"shape": shape, "M": M, "P": P, "active": n_active, "timing": timing, "unpatched_ms": u,
                             "fastpatch_ms": f, "concat_ms": c, "speedup_vs_concat": c / f, "vs_unpatched": f / u})
            g.log(f"prefill {shape} M={M}: {rows[-1]}")
            del ffn, pffn, concat
            if not g.DRY:
                torch.cuda.empty_cache()
    return rows


def scale(g: ModuleType, hbm_gbs: float) -> list[dict]:
    """P = 1k / 10k / 100k at M = 1 and 16 (Llama-7B FFN, bf16): where the key scan dominates."""
    rows = []
    dtype = g.LOW
    d, Fdim = (64, 113) if g.DRY else (4096, 11008)
    for P in ((100, 1000) if g.DRY else (1000, 10000, 100000)):
        for M in (1, 16):
            x = torch.randn(M, d, device=g.DEV, dtype=dtype)
            ffn, pffn, concat, n_active, ref = _methods(g, d, Fdim, x, P, dtype)
            t = _time_three(g, x, ffn, pffn, concat, ref, dtype, f"scale P={P} M={M}")
            timing = "graph" if all("graph" in v for v in t.values()) else "eager"
            f, c, u = (t[n][timing] for n in ("fastpatch", "concat (authors, merged)", "unpatched"))
            key_bytes = P * (d + 1) * dtype.itemsize
            nbytes = 3 * d * Fdim * dtype.itemsize + key_bytes + n_active * d * dtype.itemsize + 2 * M * d * dtype.itemsize
            rows.append({"P": P, "M": M, "active": n_active, "timing": timing, "unpatched_ms": u, "fastpatch_ms": f,
                         "concat_ms": c, "speedup_vs_concat": c / f, "patch_overhead_ms": f - u,
                         "key_bytes_MB": key_bytes / 1e6, "bytes_per_key_element": dtype.itemsize,
                         "key_scan_floor_ms": key_bytes / (hbm_gbs * 1e9) * 1e3,
                         "pct_hbm": 100 * nbytes / (f * 1e-3) / 1e9 / hbm_gbs})
            g.log(f"scale P={P} M={M}: {rows[-1]}")
            del ffn, pffn, concat
            if not g.DRY:
                torch.cuda.empty_cache()
    return rows


def split_tuning(g: ModuleType, hbm_gbs: float) -> list[dict]:
    """The split schedule's default configuration against every candidate, CUDA-graph timing."""
    R = g.R
    rows = []
    dtype = g.LOW
    d, Fdim, P = g.BIG
    ffn = g.GatedFFN(d, Fdim, dtype=dtype, device=g.DEV).eval()
    lay = g.detect_layout(ffn)
    for M in ((1, 5) if g.DRY else (1, 2, 4, 8, 16)):
        x = torch.randn(M, d, device=g.DEV, dtype=dtype)
        keys, biases, values, _ = g.make_patches(x, P, d)
        ref = g.gated_reference(x, lay, keys, biases, values)
        call = lambda c: g.fused_patched_ffn(x, lay.w_up, lay.w_down, R.ACT_SILU, w_gate=lay.w_gate,  # noqa: E731
                                             keys=keys, bias=biases, values=values, config=c)
        default = g._cfg_name(g.default_split_config(M, dtype))
        timed = []
        with torch.no_grad():
            for c in g.split_configs_for(M):
                try:
                    g.close(call(c), ref, dtype, f"split tuning [{g._cfg_name(c)}] M={M}")
                    timed.append((g.bench_graph(lambda c=c: call(c))["ms"], g._cfg_name(c), g._cfg_name(c) == default))
                except Exception as e:
                    rows.append({"M": M, "config": g._cfg_name(c), "error": f"{type(e).__name__}: {e}"[:160]})
            holder = torch.nn.Module()
            holder.mlp = ffn
            pffn = g.PatchedFFN.wrap(holder, "mlp")
            pffn.add_patches(keys, biases, values)
            with g.env_var("FASTPATCH_AUTOTUNE", "0"):  # PatchedFFN at the default configuration
                g.close(pffn(x), ref, dtype, f"split tuning PatchedFFN M={M}")
                pffn_ms = g.bench_graph(lambda: pffn(x))["ms"]
            pffn.unwrap()
        if timed:
            best = min(timed)
            dflt = next((t for t in timed if t[2]), timed[0])
            rows.append({"M": M, "default_config": dflt[1], "default_ms": dflt[0], "best_config": best[1],
                         "best_ms": best[0], "default_vs_best": dflt[0] / best[0], "candidates": len(timed),
                         "patchedffn_default_ms": pffn_ms})
            g.log(f"split tuning M={M}: {rows[-1]}")
    return rows


def _triton_counts() -> dict:
    """Compiled kernel variants and tuned keys of every fastpatch Triton kernel, summed."""
    import importlib

    compiled = tuned = 0
    for mod in ("patch_forward", "fused_ffn", "patch_loss"):
        try:
            m = importlib.import_module(f"fastpatch.kernels.{mod}")
        except Exception:
            continue
        for obj in vars(m).values():
            fn = getattr(obj, "fn", None)
            if hasattr(obj, "cache") and fn is not None and hasattr(obj, "configs"):  # an Autotuner
                tuned += len(obj.cache)
                obj = fn
            caches = getattr(obj, "device_caches", None)
            if isinstance(caches, dict):
                compiled += sum(len(c[0]) if isinstance(c, tuple) else len(c) for c in caches.values())
            elif isinstance(getattr(obj, "cache", None), dict) and hasattr(obj, "run"):
                compiled += sum(len(v) if isinstance(v, dict) else 1 for v in obj.cache.values())
    return {"compiled": compiled, "tuned": tuned}


def gpu_editing(g: ModuleType) -> list[dict]:
    """200 edits with the tuner as shipped: per-edit time, compilations after the first edit."""
    from transformers import LlamaForCausalLM

    from fastpatch.editor import Editor, EditorConfig, EditRequest

    cfg = g.smollm2_config()
    n_mem, n_edits = (2000, 3) if g.DRY else (40000, 200)
    tok = g._id_tokenizer(cfg.vocab_size)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(g.DEV).eval()
    ed = Editor(model, tok, EditorConfig())
    ed.memory.add(torch.randn(n_mem, 576, device=g.DEV) * 0.5)
    gen = torch.Generator().manual_seed(1)
    per_edit = []
    for i in range(n_edits):
        ids = torch.randint(3, cfg.vocab_size, (8,), generator=gen).tolist()
        with torch.no_grad():
            pred = int(model(torch.tensor([ids], device=g.DEV)).logits[0, -1].argmax())
        target = 3 + (pred + 1 + i) % (cfg.vocab_size - 3)
        if not g.DRY:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = ed.edit(EditRequest(" ".join(map(str, ids)), str(target), edit_id=f"ge{i}"))
        if not g.DRY:
            torch.cuda.synchronize()
        per_edit.append({"s": time.perf_counter() - t0, "steps": res.steps, "ok": res.success,
                         "patches": ed.ffn.num_patches, **_triton_counts()})
    ed.ffn.unwrap()
    secs = [p["s"] for p in per_edit[1:]]
    first = per_edit[0]
    return [{"edits": n_edits, "memory_vectors": n_mem, "first_edit_s": first["s"],
             "median_ms_per_edit": 1e3 * statistics.median(secs),
             "p90_ms_per_edit": 1e3 * sorted(secs)[int(0.9 * (len(secs) - 1))], "max_ms_per_edit": 1e3 * max(secs),
             "median_steps": statistics.median(p["steps"] for p in per_edit), "success_rate": sum(p["ok"] for p in per_edit) / n_edits,
             "compilations_first_edit": first["compiled"], "compilations_after_first_edit": per_edit[-1]["compiled"] - first["compiled"],
             "tuned_keys_after_first_edit": per_edit[-1]["tuned"] - first["tuned"],
             "edits_that_compiled": [i for i in range(1, n_edits) if per_edit[i]["compiled"] > per_edit[i - 1]["compiled"]][:50],
             "slowest_edits": sorted(range(1, n_edits), key=lambda i: -per_edit[i]["s"])[:10]}]


def compiled(g: ModuleType) -> list[dict]:
    """torch.compile (fullgraph, CUDA graphs) of a patched model: logits, decode ms, recompiles."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from transformers import LlamaForCausalLM

    cfg = g.smollm2_config()
    dtype = torch.float32 if g.DRY else g.LOW
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = LlamaForCausalLM(cfg).to(g.DEV, dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 16), device=g.DEV)
    pffn = g.PatchedFFN.wrap(model, "model.layers.-1.mlp", capacity=1024)
    cap = {}
    h = pffn.ffn.register_forward_pre_hook(lambda m, a: cap.__setitem__("x", a[0].reshape(-1, 576)))
    with torch.no_grad():
        model(ids)
    h.remove()
    k, b, v, _ = g.make_patches(cap["x"], 500, 576)
    pffn.add_patches(k, b, v)
    # Inductor with CUDA graphs on the GPU; the dry run checks the plumbing with aot_eager.
    cnt = CompileCounterWithBackend("aot_eager" if g.DRY else "inductor")
    kw = {} if g.DRY else {"mode": "reduce-overhead"}
    rows = []
    with torch.no_grad():
        fn = torch.compile(model, backend=cnt, fullgraph=True, **kw) if g.DRY else torch.compile(model, fullgraph=True, **kw)
        eager = model(ids).logits
        t0 = time.perf_counter()
        out = fn(ids).logits
        first_s = time.perf_counter() - t0
        err = g.close(out, eager, dtype, "compiled patched model vs eager")
        t_c = g.bench(lambda: fn(ids))["ms"]
        t_e = g.bench(lambda: model(ids))["ms"]
        gen = torch.Generator().manual_seed(3)
        errs = []
        for i in range(4 if g.DRY else 20):  # bank updates between calls: adds, a removal now and then
            if i % 5 == 4:
                pffn.remove(pffn.bank.ids[:3])
            else:
                q = cap["x"][torch.randint(0, cap["x"].shape[0], (3,), generator=gen)].float()
                pffn.add_patches((q / q.pow(2).sum(1, keepdim=True)).to(dtype),
                                 torch.full((3,), -0.5, device=g.DEV, dtype=dtype),
                                 (torch.randn(3, 576, device=g.DEV) / 24).to(dtype))
            errs.append(g.close(fn(ids).logits, model(ids).logits, dtype, f"compiled after update {i}"))
    frames = cnt.frame_count if g.DRY else None
    counters = torch._dynamo.utils.counters
    rows.append({"mode": kw.get("mode", "aot_eager (dry)"), "dtype": str(dtype), "P_start": 500,
                 "first_call_s": first_s, "max_abs_err": max([err, *errs]), "compiled_ms": t_c, "eager_ms": t_e,
                 "speedup": t_e / t_c, "frames_compiled": frames,
                 "dynamo_unique_graphs": counters["stats"].get("unique_graphs"),
                 "graph_breaks": sum(counters["graph_break"].values())})
    pffn.unwrap()
    return rows
