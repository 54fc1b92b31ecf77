"""The plots of the benchmark rendering (``render.py``): FFN latency against P (CPU and GPU runs)
and whole-model latency against P (CPU runs), written as PNG files."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fastpatch.atomic import atomic_file  # noqa: E402

if __package__:  # imported as benchmarks.render_* (the tests)
    from .render_common import method_key
else:  # run as python benchmarks/render.py: the script's folder is on sys.path
    from render_common import method_key  # type: ignore[no-redef]

#: Line styles of the methods that appear in most plots.
STYLE = {"unpatched": dict(color="black", ls="--", marker="o"), "fastpatch": dict(color="tab:blue", marker="o"),
         "concat (authors)": dict(color="tab:red", marker="s"), "grace codebook": dict(color="tab:green", marker="^")}


def style(m: str) -> dict:
    """Matplotlib line style of a method (:data:`STYLE`, else a marker by family)."""
    if m in STYLE:
        return STYLE[m]
    if m.startswith("fastpatch"):
        return dict(marker="o")
    return dict(marker="x")


def plot_ffn(rows: list[dict], out: Path, title: str, spread: str) -> bool:
    """FFN latency against P, one line per method, one panel per shape (rows: M), bars: ``spread``.
    Writes ``out``; False (and nothing written) when ``rows`` have no FFN results."""
    ffn = [r for r in rows if r.get("kind") == "ffn" and r.get("median_ms")]
    if not ffn:
        return False
    shapes = sorted({r["shape"] for r in ffn}, key=lambda s: min(r.get("d") or 0 for r in ffn if r["shape"] == s) or s)
    Ms = sorted({r["M"] for r in ffn})
    fig, axes = plt.subplots(len(Ms), len(shapes), figsize=(4.6 * len(shapes), 3.2 * len(Ms)), squeeze=False)
    for i, M in enumerate(Ms):
        for k, shape in enumerate(shapes):
            ax = axes[i][k]
            sel = [r for r in ffn if r["shape"] == shape and r["M"] == M]
            if not sel:
                ax.set_visible(False)
                continue
            by = defaultdict(list)
            for r in sel:
                by[r["method"]].append(r)
            for m in sorted(by, key=method_key):
                pts = defaultdict(list)
                for r in by[m]:
                    pts[r["P"]].append(r)
                Ps = sorted(pts)
                # several rows per P (the unpatched FFN is timed in every group): take the median
                med = [sorted(x["median_ms"] for x in pts[p])[len(pts[p]) // 2] for p in Ps]
                lo = [min(x.get("q1_ms") or x["median_ms"] for x in pts[p]) for p in Ps]
                hi = [max(x.get("q3_ms") or x["median_ms"] for x in pts[p]) for p in Ps]
                yerr = [[max(0, a - b) for a, b in zip(med, lo)], [max(0, b - a) for a, b in zip(med, hi)]]
                ax.errorbar(Ps, med, yerr=yerr, label=m, capsize=2, lw=1.4, ms=4, **style(m))
            ax.set_xscale("symlog", linthresh=100, linscale=0.4)
            ax.set_yscale("log")
            ax.set_xlim(left=-10)
            ax.set_title(f"{shape}, M={M}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if i == len(Ms) - 1:
                ax.set_xlabel("patches P")
            if k == 0:
                ax.set_ylabel("latency (ms)")
    handles, labels = [], []
    for ax in axes.flat:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    fig.suptitle(f"{title}; median, bars: {spread}", fontsize=10)
    fig.tight_layout(rect=(0, 0.035 if len(Ms) > 2 else 0.07, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False, bbox_to_anchor=(0.5, 0.0))
    with atomic_file(out, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_model(rows: list[dict], out: Path, title: str) -> bool:
    """Whole-model latency against P, one panel per phase (prefill, decode). Writes ``out``; False
    (and nothing written) when ``rows`` have no whole-model results."""
    mod = [r for r in rows if r.get("kind") == "model"]
    if not mod:
        return False
    phases = [p for p in ("prefill", "decode") if any(r["phase"] == p for r in mod)]
    fig, axes = plt.subplots(1, len(phases), figsize=(5 * len(phases), 3.4), squeeze=False)
    for ax, ph in zip(axes[0], phases):
        sel = [r for r in mod if r["phase"] == ph]
        base = [r for r in sel if r["method"] == "unpatched"]
        for m in sorted({r["method"] for r in sel} - {"unpatched"}, key=method_key):
            pts = sorted((r["P"], r) for r in sel if r["method"] == m)
            Ps = [p for p, _ in pts]
            med = [r["median_ms"] for _, r in pts]
            yerr = [[r["median_ms"] - r["q1_ms"] for _, r in pts], [r["q3_ms"] - r["median_ms"] for _, r in pts]]
            ax.errorbar(Ps, med, yerr=yerr, label=m, capsize=2, **style(m))
        if base:
            b = base[0]
            ax.axhline(b["median_ms"], color="black", ls="--", lw=1, label="unpatched")
            ax.axhspan(b["q1_ms"], b["q3_ms"], color="black", alpha=0.08)
        ax.set_xscale("symlog", linthresh=1000, linscale=0.4)
        ticks = sorted({r["P"] for r in sel} | {0})
        ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
        ax.set_xlim(left=-100)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("patches P at the last MLP")
        ax.set_ylabel("latency (ms)")
        desc = sel[0].get("tokens") or sel[0].get("kv_cache")
        ax.set_title(f"{ph} ({desc} tokens)" if ph == "prefill" else f"decode (1 token, KV cache {desc})", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_file(out, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True
