"""The CPU side of the benchmark rendering (``render.py``): loading a pytest-benchmark ``bench.json``
and writing its folder's ``README.md`` (environment, issue 2's CPU criterion, FFN, whole-model and
patch-storage tables) and ``table.md`` (every benchmark)."""

from __future__ import annotations

import json
from pathlib import Path

if __package__:  # imported as benchmarks.render_* (the tests)
    from .render_common import GENERATED, env_table, ffn_pivot, fmt, method_key, ms, table
else:  # run as python benchmarks/render.py: the script's folder is on sys.path
    from render_common import GENERATED, env_table, ffn_pivot, fmt, method_key, ms, table  # type: ignore[no-redef]


def load_cpu(path: Path) -> dict:
    """A pytest-benchmark JSON as one row per benchmark (its extra_info plus times in ms), with the
    environment, measured bandwidth and fastpatch's own sections."""
    j = json.loads(path.read_text())
    mi = j.get("machine_info", {})
    rows = []
    for b in j["benchmarks"]:
        s, e = b.get("stats") or {}, dict(b.get("extra_info") or {})
        if not s:
            continue
        r = {**e, "name": b["name"], "group": b.get("group"),
             "median_ms": s["median"] * 1e3, "q1_ms": s["q1"] * 1e3, "q3_ms": s["q3"] * 1e3,
             "iqr_ms": s["iqr"] * 1e3, "stddev_ms": s["stddev"] * 1e3, "min_ms": s["min"] * 1e3,
             "rounds": s["rounds"]}
        rows.append(r)
    return {"path": path, "machine_info": mi, "env": mi.get("fastpatch_env", {}), "rows": rows,
            "bandwidth": mi.get("mem_bandwidth") or {}, "fastpatch": j.get("fastpatch", {}),
            "datetime": j.get("datetime"), "commit": j.get("commit_info", {})}


def cpu_readme(res: dict, folder: Path, has_ffn_png: bool, has_model_png: bool) -> str:
    """The README of a CPU results folder: its environment, then a section per kind of result."""
    rows = res["rows"]
    L = _cpu_header(res, folder)
    L += _cpu_acceptance((res["fastpatch"] or {}).get("acceptance_issue2_cpu") or [])
    if any(r.get("kind") == "ffn" for r in rows):
        L += _cpu_ffn(rows, has_ffn_png)
    L += _cpu_model([r for r in rows if r.get("kind") == "model"], has_model_png)
    L += _cpu_storage([r for r in rows if r.get("kind") == "storage"])
    return "\n".join(L) + "\n"


def _cpu_header(res: dict, folder: Path) -> list[str]:
    """Title, what the numbers are, and the environment table."""
    env, bw, rows = res["env"], res["bandwidth"], res["rows"]
    mi = res["machine_info"]
    src = res["path"].name
    L = [GENERATED.format(src=src), "",
         f"# CPU benchmarks: {env.get('cpu', '?')} ({mi.get('machine_tag', folder.name)})", "",
         f"`pytest --benchmark benchmarks` on {env.get('date', res.get('datetime'))}; raw data: [{src}]({src}), "
         "every benchmark: [table.md](table.md). fp32, fastpatch's PyTorch backend (what `auto` picks on a CPU).",
         "Ratios are taken between methods timed in the same process on the same machine: `xA` is the ratio "
         "of medians against the unpatched FFN of the same group; `; xB` (when present) is the median of "
         "per-pair ratios from interleaved calls of the method and the unpatched FFN, which is steadier "
         "when other processes share the machine.", ""]
    extra = {}
    if bw.get("GBps"):
        extra["measured copy bandwidth"] = f"{bw['GBps']:.1f} GB/s ({bw.get('method', '')})"
    if mi.get("peak_rss_bytes"):
        extra["peak RSS of the run"] = f"{mi['peak_rss_bytes'] / 2**20:,.0f} MiB"
    busy = [r["other_cpu_pct"] for r in rows if r.get("other_cpu_pct") is not None]
    if busy:
        busy.sort()
        extra["other processes' CPU load"] = (f"median {busy[len(busy) // 2]:.0f}%, max {busy[-1]:.0f}% of the cores "
                                              f"({sum(b > 10 for b in busy)} of {len(busy)} benchmarks above 10%)")
    timing = (res["fastpatch"] or {}).get("timing")
    if timing:
        extra["timing"] = f"pytest-benchmark, max_time {timing['max_time_s']} s, min_rounds {timing['min_rounds']}"
    return L + ["## Environment", "", env_table(env, extra), ""]


def _cpu_acceptance(acc: list[dict]) -> list[str]:
    if not acc:
        return []
    L = ["## Issue 2, CPU criterion", "",
         "SmolLM2 FFN shapes (d=576, F=1536), P = 10,000 patches of which a few fire: fastpatch's "
         "patched/unpatched latency ratio must be below the concatenated-Linear baseline's. The ratio of "
         "medians compares against an unpatched FFN timed in a loop, whose weights stay cache-hot; in the "
         "interleaved pairs the patch bank evicts them, as the other layers of a real model do, so the "
         "paired ratio is closer to what a patched model sees.", ""]
    body = []
    for a in acc:
        body.append([a["M"], ms(a["unpatched_ms"]), ms(a["fastpatch_ms"]), ms(a["concat_ms"]),
                     f"x{a['fastpatch_ratio']:.2f}", f"x{a['concat_ratio']:.2f}",
                     f"x{a['fastpatch_ratio_paired']:.2f}" if "fastpatch_ratio_paired" in a else "–",
                     f"x{a['concat_ratio_paired']:.2f}" if "concat_ratio_paired" in a else "–",
                     "pass" if a["passes"] and a.get("passes_paired", True) else "FAIL"])
    return L + [table(["M", "unpatched ms", "fastpatch ms", "concat ms", "fastpatch ratio", "concat ratio",
                       "fastpatch ratio (paired)", "concat ratio (paired)", "criterion"], body), ""]


def _cpu_ffn(rows: list[dict], has_png: bool) -> list[str]:
    L = ["## Patched FFN forward", "",
         "Median latency in ms (ratio against the unpatched FFN). `firing`: patches that fire on at "
         "least one token (`make_patches`: 2 per edited token; all tokens up to 8, then one in 8). The "
         "GRACE codebook holds one key per edit (P keys), a few tokens within the radius. The FFN weights "
         "alone (SmolLM2 10.6 MB, BERT-base 18.9 MB in fp32) can stay in the CPU's last-level cache between "
         "calls, so at M=1 the unpatched FFN may exceed 100% of the DRAM copy bandwidth (see table.md).", ""]
    if has_png:
        L += ["![latency against P](ffn_latency.png)", ""]
    return L + ffn_pivot(rows, paired=True)


def _cpu_model(mod: list[dict], has_png: bool) -> list[str]:
    if not mod:
        return []
    r0 = mod[0]
    L = ["## Whole model: SmolLM2-135M architecture", "",
         f"`LlamaForCausalLM` with SmolLM2-135M's shapes ({r0.get('layers')} layers, vocab {r0.get('vocab')}) and "
         "**random weights** (latency does not depend on the weight values); patches at the last MLP, "
         "built with `make_patches` from the MLP's captured inputs so only a few fire.", ""]
    if has_png:
        L += ["![whole-model latency](model_latency.png)", ""]
    body = []
    for r in sorted(mod, key=lambda r: (r["phase"] != "prefill", method_key(r["method"]), r["P"])):
        body.append([r["phase"], r["method"], f"{r['P']:,}", ms(r["median_ms"]), ms(r["iqr_ms"]),
                     f"x{r['vs_unpatched']:.3f}" if r.get("vs_unpatched") else "–",
                     f"x{r['vs_unpatched_paired']:.3f}" if r.get("vs_unpatched_paired") else "–",
                     fmt(r.get("firing_patches")), fmt(r.get("firing_pairs")), fmt(r.get("other_cpu_pct")), r["rounds"]])
    return L + [table(["phase", "method", "P", "median ms", "IQR ms", "vs unpatched", "vs unpatched (paired)",
                       "firing patches", "firing (token, patch) pairs", "other CPU %", "rounds"], body), ""]


def _cpu_storage(st: list[dict]) -> list[str]:
    if not st:
        return []
    L = ["## Patch storage", "",
         "A bank grown from empty to P patches by appends of 5 (an edit stream); storage against the "
         "formula P*(2d+1)*4 bytes (fp32); growth slack must stay within 2x; the base FFN weights are "
         "never copied.", ""]
    body = [[r["shape"], f"{r['P']:,}", f"{r['storage_bytes']:,}", f"{r['formula_bytes']:,}",
             f"{r['bytes_per_patch']:,.0f}", f"{r['formula_bytes_per_patch']:,}", f"{r['slack_ratio']:.2f}",
             fmt(r.get("per_add_us")), "no" if not r.get("base_weights_copied") else "YES"] for r in st]
    return L + [table(["shape", "P", "storage bytes", "formula bytes", "bytes/patch", "formula bytes/patch",
                       "slack", "us per append", "base weights copied"], body), ""]


def cpu_table(res: dict) -> str:
    """``table.md`` of a CPU results folder: every benchmark, one row each."""
    rows = res["rows"]
    L = [GENERATED.format(src=res["path"].name), "", f"# Every benchmark ({res['env'].get('cpu', '?')})", "",
         "Times in ms. `ratio`: median / median of the unpatched FFN (or model) of the same group; "
         "`paired`: median of interleaved per-pair ratios [q1-q3]. `bytes`: what the method must read and "
         "write; `% bw`: achieved GB/s against the measured copy bandwidth. `other CPU`: load of other "
         "processes on the cores during the benchmark.", ""]
    body = []
    for r in rows:
        pr = r.get("vs_unpatched_paired")
        label = r.get("method", r["name"])
        if r.get("kind") in ("model", "storage"):
            label += f" P={r.get('P', 0):,}" + (f" {r['shape']}" if r.get("shape") else "")
        body.append([r.get("group"), label, ms(r["median_ms"]), ms(r["iqr_ms"]),
                     ms(r["stddev_ms"]), ms(r["min_ms"]), r["rounds"],
                     f"{r['vs_unpatched']:.3f}" if r.get("vs_unpatched") else "–",
                     f"{pr:.3f} [{r['vs_unpatched_paired_q1']:.2f}-{r['vs_unpatched_paired_q3']:.2f}]" if pr else "–",
                     f"{r['bytes'] / 1e6:,.2f} MB" if r.get("bytes") else "–", fmt(r.get("GBps")),
                     f"{r['pct_of_bandwidth']:.1f}" if r.get("pct_of_bandwidth") is not None else "–",
                     fmt(r.get("GFLOPs")), fmt(r.get("other_cpu_pct"))])
    L.append(table(["group", "method", "median", "IQR", "stddev", "min", "rounds", "ratio", "paired",
                    "bytes", "GB/s", "% bw", "GFLOP/s", "other CPU %"], body))
    return "\n".join(L) + "\n"
