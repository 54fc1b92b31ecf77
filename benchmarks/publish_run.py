"""Copy a finished stream run into ``benchmarks/results/<name>/`` with its curve: what the README
renders (``python benchmarks/update_readme.py``) and what the failure analyses read.

    python benchmarks/publish_run.py runs/zsre zsre

Copies summary.json/.csv, evals.jsonl, per_request.jsonl and the plots (not edits.jsonl nor the
checkpoint), and writes ``curve.json``: for each evaluation point, the metrics there and the
median and p90 seconds per edit of the edits since the previous point (from edits.jsonl), so a
reader sees Rel/Gen/Loc, general ability and the time per edit against T in one table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from fastpatch.atomic import write_atomic, write_json_atomic
from fastpatch.run import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RES = ROOT / "benchmarks" / "results"
FILES = ("summary.json", "summary.csv", "evals.jsonl", "per_request.jsonl", "metrics.png", "latency.png",
         "token_accuracy.json")
#: The metrics of a curve row, when the run has them.
CURVE_METRICS = ("Rel", "Gen", "Loc", "ES", "PS", "NS", "PPL", "Ability")


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def _p90(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]


def curve(run: Path) -> list[dict[str, Any]]:
    """One row per evaluation point after the first edit: edits, patches, the metrics measured
    there and the seconds per edit of the segment that ends there."""
    edits = [e for e in _jsonl(run / "edits.jsonl") if e.get("action") == "edit"]
    rows: list[dict[str, Any]] = []
    prev = 0
    for point in _jsonl(run / "evals.jsonl"):
        n = point.get("edits", 0)
        if not n or (rows and rows[-1]["edits"] == n):  # the zero point; a repeated final point
            if rows and rows[-1]["edits"] == n:
                rows[-1].update({k: point[k] for k in CURVE_METRICS if point.get(k) is not None},
                                scored_requests=point.get("sampled_requests") or n)
            continue
        secs = [float(e["seconds"]) for e in edits[prev:n]]
        rows.append({"edits": n, "patches": point.get("patches"),
                     # an intermediate point of a long stream scores a fixed sample of the requests
                     "scored_requests": point.get("sampled_requests") or n,
                     **{k: point[k] for k in CURVE_METRICS if point.get(k) is not None},
                     "seconds_per_edit_median": statistics.median(secs) if secs else None,
                     "seconds_per_edit_p90": _p90(secs) if secs else None})
        prev = n
    return rows


def _checkpoint_memory_rows(run: Path) -> int | None:
    """Rows of the memory set saved in the run's latest checkpoint (its safetensors header only)."""
    from safetensors import safe_open

    ckpt = latest_checkpoint(run)
    path = ckpt / "editor" / "memory.safetensors" if ckpt is not None else None
    if path is None or not path.is_file():
        return None
    with safe_open(str(path), "pt") as fh:
        return int(fh.get_slice("vectors").get_shape()[0])


def publish(run: Path, name: str) -> Path:
    """Copy the run's files to ``benchmarks/results/<name>/`` and write its curve.json."""
    out = RES / name
    out.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        src = run / f
        if src.is_file():
            write_atomic(out / f, src.read_bytes())
    summary = json.loads((out / "summary.json").read_text())
    mem = summary.setdefault("memory_set", {})
    if mem.get("rows_now") is None:  # a run from before the summary recorded it: read the checkpoint
        rows = _checkpoint_memory_rows(run)
        if rows is not None:
            mem["rows_now"] = rows
            write_json_atomic(out / "summary.json", summary)
    write_json_atomic(out / "curve.json", {"run": str(run), "points": curve(run)})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("name", help="the folder under benchmarks/results/")
    args = ap.parse_args(argv)
    out = publish(args.run, args.name)
    print(f"published {args.run} -> {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
