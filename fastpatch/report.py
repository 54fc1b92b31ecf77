"""Run reports: summary files, the metrics table and the plots of a run directory.

``fastpatch report DIR`` (:func:`report`) re-renders the plots and prints the summary table of a
finished or interrupted run from its files alone (no model needed):

* ``metrics.png``: SR/GR (running, after every edit) and ER/TrainR/TestR/Rel./Gen./Loc. (at each
  evaluation point) against the number of edits, with the patch count on a second axis;
* ``heatmap.png``: the patch-activation matrix (edit prompts x patches, from ``activations.npz``):
  the T-Patcher diagonal when each patch fires on its own edit only;
* ``latency.png``: histogram of the wall time per edit, with the median and p90 marked.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

from .atomic import atomic_file, write_atomic, write_json_atomic
from .metrics import EVAL_METRICS, METRIC_NAMES, RUNNING_METRICS, percentile

__all__ = ["flatten", "format_table", "load_run", "render_plots", "report", "write_summary"]

log = logging.getLogger("fastpatch.report")

_METRIC_LABELS = {
    "SR": "SR (success rate)",
    "GR": "GR (generalization)",
    "ER": "ER (edit retain)",
    "TrainR": "TrainR (retain, seen-correct)",
    "TestR": "TestR (retain, held-out)",
    "Rel": "Rel. (reliability, every target token right)",
    "Gen": "Gen. (generality, every target token right)",
    "Loc": "Loc. (EasyEdit locality)",
}


# ---------------------------------------------------------------------------------------------
# Summary files
# ---------------------------------------------------------------------------------------------


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b": v}``; lists become JSON strings."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, (list, tuple)):
        out[prefix[:-1]] = json.dumps(obj, ensure_ascii=False)
    else:
        out[prefix[:-1]] = obj
    return out


def write_summary(out_dir: str | os.PathLike[str], summary: dict[str, Any]) -> None:
    """Write ``summary.json`` and ``summary.csv`` (one header row, one value row) atomically."""
    out = Path(out_dir)
    write_json_atomic(out / "summary.json", summary)
    row = flatten({k: v for k, v in summary.items() if k not in ("run",)})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(row), lineterminator="\n")
    writer.writeheader()
    writer.writerow({k: "" if v is None else v for k, v in row.items()})
    write_atomic(out / "summary.csv", buf.getvalue())


def _save_figure(fig: Any, path: Path, **kwargs: Any) -> None:
    """Save a matplotlib figure atomically (its format from the file's suffix)."""
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format=path.suffix.lstrip(".") or "png", **kwargs)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Lines of a JSONL file; a torn last line (a kill mid-write) is ignored."""
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s: ignoring a malformed line (interrupted write?)", path)
    return rows


def load_run(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"summary", "edits", "evals", "beyond_checkpoint"}`` of a run directory.

    ``summary`` is summary.json (written at every checkpoint and at the end), or, before the first
    checkpoint, a minimal one rebuilt from edits.jsonl. ``beyond_checkpoint`` counts edits.jsonl
    lines written after the summary (a resume redoes them).
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"{out} is not a directory")
    edits = _read_jsonl(out / "edits.jsonl")
    evals = _read_jsonl(out / "evals.jsonl")
    summary: dict[str, Any] | None = None
    if (out / "summary.json").is_file():
        try:
            with open(out / "summary.json", encoding="utf-8") as fh:
                summary = json.load(fh)
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"{out / 'summary.json'} is corrupt or truncated (not valid JSON: {err})") from None
    if summary is None:
        if not edits and not (out / "run.json").is_file():
            raise FileNotFoundError(f"{out} holds no fastpatch run (no summary.json, edits.jsonl or run.json)")
        done = [e for e in edits if e.get("action") == "edit"]
        secs = [float(e["seconds"]) for e in done if e.get("seconds") is not None]
        last = edits[-1] if edits else {}
        summary = {
            "complete": False,
            "requests": len(edits),
            "edits": len(done),
            "skipped_correct": len(edits) - len(done),
            "metrics": last.get("metrics", {}),
            "patches": last.get("patches"),
            "time": {"edit_seconds_median": percentile(secs, 50), "edit_seconds_p90": percentile(secs, 90)},
            "note": "rebuilt from edits.jsonl (no checkpoint yet)",
        }
    beyond = max(0, len(edits) - int(summary.get("requests") or 0))
    return {"summary": summary, "edits": edits, "evals": evals, "beyond_checkpoint": beyond}


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


#: Labels of the scores beside the headline metrics (:mod:`fastpatch.run.scores`).
_SCORE_LABELS: dict[str, str] = {
    "ES": "Efficacy score (CounterFact)", "PS": "Paraphrase score", "NS": "Neighbourhood score",
    "EM": "Efficacy magnitude", "PM": "Paraphrase magnitude", "NM": "Neighbourhood magnitude",
    "Rel_tok": "Rel. as EasyEdit scores it (token accuracy)", "Gen_tok": "Gen. as EasyEdit scores it (token accuracy)",
    "Rel_gen": "Rel. by free generation", "Gen_gen": "Gen. by free generation",
    "PPL": "Perplexity, held-out text", "Ability": "Accuracy, questions right before",
}


def _scores_table(scores: dict[str, Any], retain: dict[str, Any]) -> list[str]:
    """The scores beside the headline metrics, each with the unedited model's value, and why
    TrainR/TestR are n/a when their sets are too small."""
    pre = scores.get("pre") or {}
    rows = [f"| {label} | {_f(scores.get(k))} | {_f(pre.get(k)) if k in pre else ('1 (by construction)' if k == 'Ability' else '')} |"
            for k, label in _SCORE_LABELS.items() if scores.get(k) is not None]
    out = ["", "| Score | Now | Unedited |", "|---|---|---|", *rows] if rows else []
    need = retain.get("min_right")
    notes = []
    if need and retain.get("train", 0) < need:
        notes.append(f"TrainR n/a: the unedited model got {retain.get('train')} of {retain.get('train_candidates')} "
                     f"retain pairs right (fewer than {need}).")
    if need and retain.get("test_right_before") is not None and retain["test_right_before"] < need:
        notes.append(f"TestR n/a: the unedited model got {retain['test_right_before']} of {retain.get('test')} "
                     f"held-out pairs right (fewer than {need}).")
    return out + ([""] + notes if notes else [])
    return out


def format_table(summary: dict[str, Any]) -> str:
    """The summary as Markdown: a metrics table, then a run table."""
    m = summary.get("metrics", {}) or {}
    lines = ["| Metric | Value |", "|---|---|"]
    for name in METRIC_NAMES:
        lines.append(f"| {_METRIC_LABELS[name]} | {_f(m.get(name))} |")
    lines += _scores_table(summary.get("scores") or {}, summary.get("retain_sets") or {})
    t = summary.get("time", {}) or {}
    mem = summary.get("peak_memory", {}) or {}
    status = "complete" if summary.get("complete") else "INTERRUPTED (resume with --resume)"
    req = summary.get("requests")
    total = summary.get("requests_total")
    rows = [
        ("status", status),
        ("model", summary.get("model")),
        ("data", summary.get("data")),
        ("protocol", summary.get("protocol")),
        ("requests processed", f"{req}/{total}" if total is not None else req),
        ("edits (skipped: already correct)", f"{summary.get('edits')} ({summary.get('skipped_correct')})"),
        ("patches (neurons/edit)", f"{summary.get('patches')} ({_f(summary.get('neurons_per_edit'), 2)})"),
        ("time per edit, median / p90 (s)", f"{_f(t.get('edit_seconds_median'), 2)} / {_f(t.get('edit_seconds_p90'), 2)}"),
        ("memory set (texts -> vectors)",
         f"{(summary.get('memory_set') or {}).get('texts')} -> {(summary.get('memory_set') or {}).get('vectors')}"
         if (summary.get("memory_set") or {}).get("vectors") is not None else None),
        ("wall time (s)", _f(t.get("wall_seconds"), 1)),
        ("evaluation time: points / post-edit checks (s)",
         f"{_f(t.get('eval_seconds_total'), 1)} / {_f(t.get('check_seconds_total'), 1)}"),
        ("peak memory, RSS (MiB)", _f(mem.get("rss_mib"), 0)),
    ]
    if mem.get("cuda_mib") is not None:
        rows.append(("peak memory, CUDA (MiB)", _f(mem.get("cuda_mib"), 0)))
    if summary.get("skipped_rows"):
        rows.append(("malformed rows skipped", len(summary["skipped_rows"])))
    lines += ["", "| Run | |", "|---|---|"]
    lines += [f"| {k} | {_f(v)} |" for k, v in rows if v is not None]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(edits: list[dict[str, Any]], evals: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """metrics.png: SR/GR after every edit and the evaluation metrics against edits, patches on a second axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.4), dpi=110)
    done = [e for e in edits if e.get("action") == "edit"]
    top = 1.05
    for name, style in zip(RUNNING_METRICS, ("-", "--")):
        xs = [e["edits"] for e in done if (e.get("metrics") or {}).get(name) is not None]
        ys = [e["metrics"][name] for e in done if (e.get("metrics") or {}).get(name) is not None]
        if xs:
            ax.plot(xs, ys, style, lw=1.6, label=_METRIC_LABELS[name])
    markers = "os^vDx"
    for name, mk in zip(EVAL_METRICS, markers):
        pts = [(p["edits"], p[name]) for p in evals if p.get(name) is not None]
        if pts:
            xs, ys = zip(*pts)
            top = max(top, max(ys) + 0.05)
            ax.plot(xs, ys, marker=mk, ms=4, lw=1, label=_METRIC_LABELS[name])
    ax.set_xlabel("edits")
    ax.set_ylabel("rate")
    ax.set_ylim(0, top)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    patches = [(e["edits"], e["patches"]) for e in done if isinstance(e.get("patches"), int) and e["patches"] >= 0]
    if patches:
        ax2 = ax.twinx()
        xs, ys = zip(*patches)
        (line,) = ax2.plot(xs, ys, color="grey", lw=1, ls=":")
        ax2.set_ylabel("patches", color="grey")
        ax2.tick_params(axis="y", colors="grey")
        ax2.set_ylim(bottom=0)
        handles, labels = handles + [line], labels + ["patches (right axis)"]
    ax.set_title(title or "Sequential editing: metrics vs edits", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    _save_figure(fig, path)
    plt.close(fig)
    return path


def plot_heatmap(npz_path: Path, path: Path, title: str = "") -> Path | None:
    """heatmap.png from activations.npz (edit prompts x patches); None when there is none."""
    import numpy as np

    if not npz_path.is_file():
        return None
    data = np.load(npz_path, allow_pickle=False)
    act = np.asarray(data["activations"], dtype=np.float32)
    if act.ndim != 2 or act.size == 0:
        return None
    plt = _pyplot()
    n_e, n_p = act.shape
    w = min(12, max(5, 3 + n_p / 40))
    h = min(12, max(4, 2 + n_e / 40))
    fig, ax = plt.subplots(figsize=(w, h), dpi=110)
    # Scale to the patches that fire: most cells are exactly 0 (that is the point of the diagonal),
    # so a percentile over every cell would be 0 and saturate every firing patch alike.
    firing = act[act > 0]
    vmax = float(np.percentile(firing, 99)) if firing.size else 1.0
    im = ax.imshow(act, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=max(vmax, 1e-6))
    fig.colorbar(im, ax=ax, label="patch activation (max over tokens)")
    ax.set_xlabel(f"patches (creation order, {n_p})")
    ax.set_ylabel(f"edit prompts (stream order, {n_e})")
    ax.set_title(title or "Patch activations on the edit prompts", fontsize=10)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path


def plot_latency(edits: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """latency.png: histogram of the seconds per edit with median and p90; None without edits."""
    secs = [float(e["seconds"]) for e in edits if e.get("action") == "edit" and e.get("seconds") is not None]
    if not secs:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=110)
    ax.hist(secs, bins=min(50, max(5, len(secs) // 3)), color="tab:blue", alpha=0.8)
    med, p90 = percentile(secs, 50), percentile(secs, 90)
    ax.axvline(med, color="k", ls="--", lw=1, label=f"median {med:.2f}s")
    ax.axvline(p90, color="tab:red", ls=":", lw=1.2, label=f"p90 {p90:.2f}s")
    ax.set_xlabel("seconds per edit")
    ax.set_ylabel("edits")
    ax.legend(fontsize=8)
    ax.set_title(title or f"Edit latency ({len(secs)} edits)", fontsize=10)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path


def render_plots(out_dir: str | os.PathLike[str], run: dict[str, Any] | None = None) -> list[Path]:
    """Render metrics.png, heatmap.png and latency.png from the run's files; return their paths."""
    out = Path(out_dir)
    run = run or load_run(out)
    s = run["summary"]
    tag = " | ".join(str(x) for x in (s.get("model"), s.get("data"), s.get("protocol")) if x)
    made = [plot_metrics(run["edits"], run["evals"], out / "metrics.png", title=f"Metrics vs edits ({tag})" if tag else "")]
    for p in (plot_heatmap(out / "activations.npz", out / "heatmap.png"), plot_latency(run["edits"], out / "latency.png")):
        if p is not None:
            made.append(p)
    return made


def report(out_dir: str | os.PathLike[str], plots: bool = True, file: Any = None) -> dict[str, Any]:
    """Re-render the plots of a run directory and print its summary table; return the summary."""
    import sys

    file = file or sys.stdout
    run = load_run(out_dir)
    made = render_plots(out_dir, run) if plots else []
    print(format_table(run["summary"]), file=file)
    if run["beyond_checkpoint"]:
        print(f"\n({run['beyond_checkpoint']} request(s) in edits.jsonl after the last checkpoint; "
              f"--resume redoes them)", file=file)
    if made:
        print("\nplots: " + ", ".join(str(p) for p in made), file=file)
    return run["summary"]
