"""Merge one raw ``gpu_check.py`` run into a card's results folder.

    python benchmarks/merge_gpu_runs.py benchmarks/results/nvidia-h200 2026-12-04T1729-issue16 \\
        --commit 81bd80a --what "issue 16's sections" [--sections prefill,scale] [--record-only]

The run's raw files must already be under ``<folder>/runs/<run>/``. Each chosen section (default:
every section the run measured) replaces the folder's copy in ``<folder>/gpu_check.json`` and
records the run as its provenance; ``--record-only`` lists the run (an experiment kept for its
evidence) without taking any section from it. Then ``python benchmarks/render.py`` renders the
folder's README.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastpatch.atomic import write_atomic


def merge_run(folder: Path, run: str, commit: str, what: str, sections: list[str] | None = None,
              record_only: bool = False) -> dict:
    """Merge ``folder/runs/run/gpu_check.json`` into ``folder/gpu_check.json``; returns the merged
    JSON. Raises ``FileNotFoundError`` if the run is missing and ``ValueError`` for a section the
    run did not measure."""
    raw = json.loads((folder / "runs" / run / "gpu_check.json").read_text())
    target = folder / "gpu_check.json"
    merged = json.loads(target.read_text()) if target.exists() else {
        "env": {}, "sections": {}, "failures": [], "provenance": {}, "runs": {}, "autotune": {}}
    measured = [k for k, v in raw.get("sections", {}).items() if v is not None and v != []]
    chosen = [] if record_only else (sections or measured)
    missing = sorted(set(chosen) - set(measured))
    if missing:
        raise ValueError(f"run {run} did not measure {missing}; it has {measured}")
    for name in chosen:
        merged["sections"][name] = raw["sections"][name]
        merged["provenance"][name] = run
    merged["runs"][run] = {"commit": commit, "what": what, "date": raw.get("env", {}).get("date"),
                           "wall_s": raw.get("wall_s"), "failures": raw.get("failures", []),
                           "hbm_GBps": raw.get("sections", {}).get("hbm_bandwidth_GBps")}
    if chosen:
        merged["env"] = raw.get("env", merged.get("env", {}))
        for kernel, picks in (raw.get("autotune") or {}).items():
            merged.setdefault("autotune", {}).setdefault(kernel, {}).update(picks)
    # The folder's failures are those of the runs its sections come from.
    sources = set(merged["provenance"].values())
    merged["failures"] = [f for r in sources for f in merged["runs"].get(r, {}).get("failures", [])]
    write_atomic(target, json.dumps(merged, indent=1, default=str))
    return merged


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="the card's results folder, e.g. benchmarks/results/nvidia-h200")
    ap.add_argument("run", help="the run's folder name under <folder>/runs/")
    ap.add_argument("--commit", required=True, help="the commit the run measured")
    ap.add_argument("--what", required=True, help="one line: what the run measured, and on which code")
    ap.add_argument("--sections", default="", help="comma-separated sections to take (default: all it measured)")
    ap.add_argument("--record-only", action="store_true", help="list the run, take none of its sections")
    args = ap.parse_args()
    merged = merge_run(args.folder, args.run, args.commit, args.what,
                       [s for s in args.sections.split(",") if s] or None, args.record_only)
    print(f"{args.folder / 'gpu_check.json'}: {len(merged['sections'])} sections from {len(set(merged['provenance'].values()))} runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
