"""Render benchmark results to Markdown tables and plots. Figures are never edited by hand.

    python benchmarks/render.py [--results benchmarks/results]

Reads every result file under ``benchmarks/results/``:

- ``**/bench.json``: pytest-benchmark JSON of ``pytest --benchmark`` (CPU, one folder per machine);
- ``**/gpu_check.json``: the JSON that ``benchmarks/gpu_check.py`` writes (one folder per card).

and writes, next to each file:

- ``README.md``: the environment, the measured bandwidth, issue 2's CPU criterion, latency tables
  per shape (median and ratio against the unpatched FFN of the same run), the whole-model and
  patch-storage tables, and the plots;
- ``table.md`` (CPU): every benchmark with median, IQR, stddev, rounds, both ratios, bytes,
  GB/s, % of the measured bandwidth and the other processes' CPU load during it;
- ``ffn_latency.png``: latency against P, one line per method, one panel per shape (rows: M);
- ``model_latency.png`` (when there are whole-model results).

and ``benchmarks/results/README.md``, an index of the machines.

The work is split by concern: ``render_common.py`` (formatting, tables), ``render_cpu.py`` (CPU
``bench.json``), ``render_gpu.py`` (GPU ``gpu_check.json``) and ``render_plots.py`` (the plots); this
module walks the results folder, writes the files and the index, and re-exports their names.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastpatch.atomic import write_atomic

# The public names of the split modules stay reachable as render.<name> (the tests import benchmarks.render).
if __package__:  # imported as benchmarks.render (the tests)
    from .render_common import GENERATED, METHOD_ORDER, env_table, ffn_pivot, fmt, method_key, ms, table
    from .render_cpu import cpu_readme, cpu_table, load_cpu
    from .render_gpu import ISSUE16_SECTIONS, gpu_goals, gpu_readme, load_gpu
    from .render_plots import STYLE, plot_ffn, plot_model, style
else:  # run as python benchmarks/render.py: the script's folder is on sys.path
    from render_common import GENERATED, METHOD_ORDER, env_table, ffn_pivot, fmt, method_key, ms, table  # type: ignore[no-redef]
    from render_cpu import cpu_readme, cpu_table, load_cpu  # type: ignore[no-redef]
    from render_gpu import ISSUE16_SECTIONS, gpu_goals, gpu_readme, load_gpu  # type: ignore[no-redef]
    from render_plots import STYLE, plot_ffn, plot_model, style  # type: ignore[no-redef]

__all__ = ["GENERATED", "ISSUE16_SECTIONS", "METHOD_ORDER", "ROOT", "STYLE", "cpu_readme", "cpu_table", "env_table",
           "ffn_pivot", "fmt", "gpu_goals", "gpu_readme", "load_cpu", "load_gpu", "main", "method_key", "ms",
           "plot_ffn", "plot_model", "render", "style", "table"]

ROOT = Path(__file__).resolve().parent / "results"


def render(root: Path) -> list[Path]:
    """Render every ``bench.json`` and ``gpu_check.json`` under ``root`` (not the raw runs under a card's
    ``runs/``) into its folder, and the index ``root/README.md``; returns the files written."""
    written: list[Path] = []
    index = []
    for path in sorted(root.rglob("bench.json")):
        res = load_cpu(path)
        folder = path.parent
        th = res["env"].get("torch_threads", "?")
        title = f"CPU: {res['env'].get('cpu', '?')}, {th} thread{'' if th == 1 else 's'}, fp32"
        has_ffn = plot_ffn(res["rows"], folder / "ffn_latency.png", title, "interquartile range")
        has_model = plot_model(res["rows"], folder / "model_latency.png", f"SmolLM2-135M architecture, {title}")
        write_atomic(folder / "README.md", cpu_readme(res, folder, has_ffn, has_model))
        write_atomic(folder / "table.md", cpu_table(res))
        written += [folder / "README.md", folder / "table.md"] + [folder / f for f, ok in
                                                                  (("ffn_latency.png", has_ffn), ("model_latency.png", has_model)) if ok]
        index.append((folder, f"CPU: {res['env'].get('cpu', '?')}", res["env"].get("date")))
    for path in sorted(root.rglob("gpu_check.json")):
        if "runs" in path.relative_to(root).parts[:-1]:  # raw runs, merged into their parent's file
            continue
        res = load_gpu(path)
        folder = path.parent
        title = f"GPU: {res['env'].get('gpu', folder.name)}"
        has_png = plot_ffn(res["rows"], folder / "ffn_latency.png", title, "20th-80th percentile")
        write_atomic(folder / "README.md", gpu_readme(res, folder, has_png))
        written += [folder / "README.md"] + ([folder / "ffn_latency.png"] if has_png else [])
        index.append((folder, title, res["env"].get("date")))
    if index:
        L = [GENERATED.format(src="the JSON files below"), "", "# Benchmark results", "",
             "One folder per machine; each README is rendered from that folder's JSON by `benchmarks/render.py`.", ""]
        L.append(table(["machine", "folder", "date"], [[t, f"[{f.relative_to(root)}]({f.relative_to(root)}/README.md)", d or "?"]
                                                      for f, t, d in index]))
        write_atomic(root / "README.md", "\n".join(L) + "\n")
        written.append(root / "README.md")
    return written


def main() -> int:
    """The command line: ``--results`` (default benchmarks/results); 1 when there is nothing to render."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=ROOT, help="folder to scan (default: benchmarks/results)")
    args = ap.parse_args()
    written = render(args.results)
    if not written:
        print(f"no bench.json or gpu_check.json under {args.results}; run `pytest --benchmark benchmarks` first")
        return 1
    for p in written:
        print("wrote", p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
