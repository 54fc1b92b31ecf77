"""The GPU side of the benchmark rendering (``render.py``): loading a ``gpu_check.json`` (one card,
possibly merged from several runs) and writing its folder's ``README.md`` (environment, runs,
issue 2 and 5 goals, decode roofline, FFN latency, and every other measured section)."""

from __future__ import annotations

import json
from pathlib import Path

if __package__:  # imported as benchmarks.render_* (the tests)
    from .render_common import GENERATED, env_table, ffn_pivot, fmt, ms, table
else:  # run as python benchmarks/render.py: the script's folder is on sys.path
    from render_common import GENERATED, env_table, ffn_pivot, fmt, ms, table  # type: ignore[no-redef]


def load_gpu(path: Path) -> dict:
    """A ``gpu_check.json`` with its FFN latency rows in the CPU rows' format, ratios recomputed
    against the unpatched FFN of the same shape and M."""
    j = json.loads(path.read_text())
    sec = j.get("sections", {})
    rows = []
    for r in sec.get("ffn_latency") or []:
        rows.append({"kind": "ffn", "shape": r.get("shape"), "d": r.get("d"), "F": r.get("F"), "M": r.get("M"), "P": r.get("P"),
                     "method": r.get("method"), "active_patches": r.get("active"),
                     "median_ms": r.get("ms"), "q1_ms": r.get("p20_ms"), "q3_ms": r.get("p80_ms"),
                     "bytes": r.get("bytes"), "GBps": r.get("GB/s"), "pct_of_bandwidth": r.get("pct_hbm"),
                     "vs_unpatched": r.get("vs_unpatched")})
    # gpu_check's vs_unpatched is against unpatched at P=0; recompute within each (shape, M, P).
    base = {(r["shape"], r["M"]): r["median_ms"] for r in rows if r["method"] == "unpatched" and r["P"] == 0}
    for r in rows:
        b = base.get((r["shape"], r["M"]))
        if b and r["median_ms"]:
            r["vs_unpatched"] = r["median_ms"] / b
    return {"path": path, "env": j.get("env", {}), "rows": rows, "sections": sec,
            "bandwidth": {"GBps": sec.get("hbm_bandwidth_GBps")}, "failures": j.get("failures", []),
            "autotune": j.get("autotune") or {}, "runs": j.get("runs") or {}, "provenance": j.get("provenance") or {}}


def gpu_goals(res: dict) -> list[list]:
    """Issue 2's GPU goals at Llama-7B shapes, P = 10,000, M <= 16: >= 80% of HBM for the bytes
    it must read and >= 1.5x over the naive concatenated-Linear T-Patcher; issue 5's >= 1.2x at
    M = 512. From the decode roofline (CUDA-graph replays) where the run has it, else from the
    eager latency table. Both concatenation baselines are shown: merged once (kinder), and
    re-concatenated on every forward (what the authors' code does)."""
    out = []
    dec = [r for r in res["sections"].get("decode_roofline") or [] if r.get("P") == 10000 and r.get("timing") == "cuda graph"]
    for M in sorted({r["M"] for r in dec}):
        by = {r["method"]: r for r in dec if r["M"] == M}
        f, c, e = by.get("fastpatch (PatchedFFN)"), by.get("concat (authors)"), by.get("concat per forward (authors' code)")
        if not f or not c:
            continue
        shipped = [r for r in res["sections"].get("config_sweep") or []
                   if r.get("M") == M and "ms" in r and str(r.get("shipped", "")).startswith("split default")]
        label = "CUDA graph, PatchedFFN" + (" as run" if shipped else "")
        out.append(_goal_row(M, f["ms"], f["pct_hbm"], c["ms"], e["ms"] if e else None, label))
        for r in shipped:  # the same kernel at the configuration the submitted code launches
            out.append(_goal_row(M, r["ms"], r["pct_hbm"], c["ms"], e["ms"] if e else None,
                                 "CUDA graph, kernel at the shipped default (sweep)"))
    done = {row[0] for row in out}
    sel = [r for r in res["rows"] if r["shape"] == "llama-7b" and r["P"] == 10000 and r["M"] not in done]
    for M in sorted({r["M"] for r in sel}):
        fp = [r for r in sel if r["M"] == M and r["method"].startswith("fastpatch") and r.get("median_ms")]
        cc = [r for r in sel if r["M"] == M and r["method"] == "concat (authors)" and r.get("median_ms")]
        if fp and cc:
            f = min(fp, key=lambda r: r["median_ms"])
            out.append(_goal_row(M, f["median_ms"], f.get("pct_of_bandwidth"), cc[0]["median_ms"], None, "eager"))
    return out


def _goal_row(M: int, f_ms: float, pct: float | None, c_ms: float, e_ms: float | None, timing: str) -> list:
    want_speed = 1.5 if M <= 16 else 1.2
    want_pct = 80.0 if M <= 16 else None
    speed = c_ms / f_ms
    miss = []
    if want_pct is not None and (pct or 0) < want_pct:
        miss.append(f"{pct:.0f}% < {want_pct:.0f}% of HBM")
    # The speed goal's baseline is the issue's naive T-Patcher, "patches concatenated into bigger
    # dense Linear layers, as the authors' code does": their code concatenates on every forward.
    # Where a run has no such row (issue 5's eager M = 512 case), the merged concatenation.
    if e_ms is not None:
        if e_ms / f_ms < want_speed:
            miss.append(f"{e_ms / f_ms:.2f}x < {want_speed}x over the authors' code")
    elif speed < want_speed:
        miss.append(f"{speed:.2f}x < {want_speed}x over the merged concatenation")
    return [M, timing, ms(f_ms), f"{pct:.1f}" if pct is not None else "–", f">= {want_pct:.0f}%" if want_pct else "–",
            ms(c_ms), f"{speed:.2f}x", ms(e_ms) if e_ms else "–", f"{e_ms / f_ms:.2f}x" if e_ms else "–",
            f">= {want_speed}x", "yes" if not miss else "NO: " + "; ".join(miss)]


#: The sections of ``benchmarks/gpu_issue16.py``, each with the one line that says what it measures.
ISSUE16_SECTIONS = {
    "prefill": "Prefill-sized calls (bf16, P = 10,000): PatchedFFN against the merged concatenation and the "
               "unpatched FFN, eager and CUDA-graph timing (issue 16's target: >= 1.2x over the concatenation).",
    "scale": "Llama-7B FFN, bf16, CUDA graphs: bank sizes 1k / 10k / 100k at 1 and 16 tokens, and the patch "
             "overhead against the floor of reading the keys once.",
    "split_tuning": "The split fused-FFN kernel's default launch configuration against every candidate "
                    "(CUDA-graph timing; every candidate is checked against the float64 reference first).",
    "gpu_editing": "200 edits of a SmolLM2-architecture model (random weights, fp32, 40,000 memory vectors) with "
                   "the tuner as shipped: time per edit and Triton compilations after the first edit "
                   "(issue 16's targets: median <= 10 ms, p90 <= 3x median, no compilation after the first edit).",
    "split_specialization": "The split fused-FFN kernel with one opt-out from Triton's specialisation at a time "
                            "(benchmarks/gpu_specialization.py), CUDA graphs, Llama-7B FFN, bf16.",
    "compiled": "`torch.compile(fullgraph=True, mode=\"reduce-overhead\")` of a patched SmolLM2-architecture "
                "model (bf16): logits against eager, decode time, graph breaks.",
}


def gpu_readme(res: dict, folder: Path, has_png: bool) -> str:
    """The README of a GPU results folder: environment, runs, goals, then a section per measured result."""
    env, sec = res["env"], res["sections"]
    L = [GENERATED.format(src=res["path"].name), "", f"# GPU benchmarks: {env.get('gpu', folder.name)}", "",
         f"`python benchmarks/gpu_check.py` on {env.get('date', '?')}; raw data: [{res['path'].name}]({res['path'].name}).",
         "Times are `triton.testing.do_bench` medians; bars/brackets: 20th-80th percentiles. Ratios are against "
         "the unpatched FFN of the same shape and M in the same run.", ""]
    extra = {}
    if res["bandwidth"].get("GBps"):
        extra["measured HBM copy bandwidth"] = f"{res['bandwidth']['GBps']:.0f} GB/s"
    if res["failures"]:
        extra["failures"] = "; ".join(res["failures"])
    L += ["## Environment", "", env_table(env, extra), ""]
    runs = res.get("runs") or {}
    if runs:
        prov = res.get("provenance") or {}
        L += ["## Runs", "", "This folder merges the runs below (raw output of each under `runs/`); each section "
              "comes from one run.", "",
              table(["run", "commit", "date", "what", "sections", "HBM GB/s", "failures"],
                    [[k, v.get("commit"), v.get("date"), v.get("what"), ", ".join(s_ for s_, r in prov.items() if r == k),
                      fmt(v.get("hbm_GBps"), 4), "; ".join(v.get("failures") or []) or "none"] for k, v in runs.items()]), ""]
    goals = gpu_goals(res)
    if goals:
        L += ["## Goals (issues 2 and 5): Llama-7B FFN shapes, P = 10,000", "",
              "fastpatch's share of the measured HBM bandwidth for the bytes it must read, and its speed-up over "
              "the concatenated-Linear T-Patcher: merged once (`concat`, kinder than the authors' code) and "
              "re-concatenated on every forward (`authors' code`, what their implementation does). The speed goal "
              "is judged against the authors' code, the issue's naive baseline (\"as the authors' code does\"); the "
              "speed-up over the merged layers is shown beside it and is not a goal. Decode sizes "
              "are timed as CUDA-graph replays (device time; eager calls at these sizes measure Python).", "",
              table(["M", "timing", "fastpatch ms", "% of HBM", "goal", "concat ms", "speed-up", "authors' code ms",
                     "speed-up", "goal", "met"], goals), ""]
    dec = sec.get("decode_roofline") or []
    if dec:
        cols = ["M", "P", "active", "method", "timing", "ms", "must_read_MB", "GB/s", "pct_hbm", "speedup_vs_concat",
                "speedup_vs_concat_each"]
        L += ["## Decode roofline (Llama-7B FFN, bf16)", "",
              "`must_read_MB`: the bytes a method cannot avoid (fastpatch: base weights, keys, biases and the value rows "
              "of firing patches; the concatenations: every value row, and for the authors' code the concatenation's "
              "own read and write).", "",
              table(cols, [[fmt(r.get(c)) for c in cols] for r in dec]), ""]
    if res["rows"]:
        L += ["## Patched FFN forward", "", "Median latency in ms (ratio against the unpatched FFN).", ""]
        if has_png:
            L += ["![latency against P](ffn_latency.png)", ""]
        L += ffn_pivot(res["rows"], paired=False)
        body = [[r["shape"], r["M"], f"{r['P']:,}", r["method"], ms(r["median_ms"]),
                 fmt(r.get("GBps")), f"{r['pct_of_bandwidth']:.1f}" if r.get("pct_of_bandwidth") is not None else "–"]
                for r in res["rows"]]
        L += ["### Roofline", "", table(["shape", "M", "P", "method", "median ms", "GB/s", "% of HBM"], body), ""]
    for name in ("crossover", "config_sweep", "loss_kernel", "whole_model", "editing", *ISSUE16_SECTIONS):
        rws = sec.get(name) or []
        if rws:
            cols = list(dict.fromkeys(c for r in rws for c in r))
            intro = [ISSUE16_SECTIONS[name], ""] if name in ISSUE16_SECTIONS else []
            L += [f"## {name}", "", *intro, table(cols, [[fmt(r.get(c)) for c in cols] for r in rws]), ""]
    picks = [[kernel, key, cfg] for kernel, m in res.get("autotune", {}).items() for key, cfg in m.items()]
    if picks:
        L += ["## Autotune choices", "", table(["kernel", "key", "configuration"], picks), ""]
    if sec.get("memory"):
        L += ["## memory", "", table(["", "value"], [[k, fmt(v)] for k, v in sec["memory"].items()]), ""]
    return "\n".join(L) + "\n"
