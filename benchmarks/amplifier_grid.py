"""What the amplifier search sees: for every edit of a stream, the request's loss and whether it is
right at each doubling of the value's amplifier (deep tail only).

    python benchmarks/amplifier_grid.py --out benchmarks/results/cpu/<tag> -- \\
        --model smollm2 --data geography --limit 60 --no-generation-metrics

Everything after ``--`` is ``fastpatch run``'s arguments (its ``--out`` defaults to a temporary
directory). The editor runs as it ships; each call of ``search_amplifier`` is observed first: the
requests' own views are re-run at every doubling ``k = 0 .. 9`` of the starting amplifier
(``_doubling_logits``, the search's own batched evaluation) and the whole-vocabulary
cross-entropy of the targets and their exactness are recorded, then the search runs unchanged.
Writes ``grid.jsonl`` (one row per search) and ``grid.md``: how many searches find an amplifier,
where the loss is lowest, and the loss at the first right doubling and at the fallback
(``2**10`` times the start, where none is right).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import env as benv  # noqa: E402

MAX = 10


def observe(rows: list[dict[str, Any]]) -> None:
    """Wrap ``fastpatch.editor.init.search_amplifier`` so that each call appends its grid to ``rows``."""
    import fastpatch.editor.init as init

    orig = init.search_amplifier

    def observed(h: Any, cfg: Any, memory: Any, batch: Any, params: Any, max_doublings: int = MAX) -> Any:
        if h.adapter.deep:
            own = batch.as_given()
            with torch.no_grad():
                grid = init._doubling_logits(h, own, params, MAX)
            if grid is not None:
                labels = own.tail_rows()["labels"]
                ce = [float(F.cross_entropy(grid[k].float(), labels)) for k in range(MAX)]
                right = [bool((grid[k].argmax(-1) == labels).all()) for k in range(MAX)]
                rows.append({"ce": ce, "right": right})
        return orig(h, cfg, memory, batch, params, max_doublings)

    init.search_amplifier = observed


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts and medians over the observed searches."""
    found = [r["right"].index(True) for r in rows if any(r["right"])]
    lowest = [min(range(MAX), key=lambda k: r["ce"][k]) for r in rows]
    failed = [r for r in rows if not any(r["right"])]
    def med(xs: list[float]) -> float | None:
        return round(statistics.median(xs), 3) if xs else None

    return {"searches": len(rows), "found": len(found), "median_first_right": med(found),
            "median_lowest_loss_doubling": med(lowest),
            "failed_median_loss_lowest": med([min(r["ce"]) for r in failed]),
            "failed_median_loss_last": med([r["ce"][-1] for r in failed])}


def render(rows: list[dict[str, Any]], run_args: list[str], cpu: str) -> str:
    """The markdown of one stream's grid."""
    s = summarise(rows)
    return "\n".join([
        "# The amplifier search's grid", "", f"`fastpatch run {' '.join(run_args)}`, {cpu}.", "",
        f"{s['found']} of {s['searches']} searches find a doubling (k < {MAX}) that makes the request right "
        f"(median first right k: {s['median_first_right']}); the loss is lowest at a median k of "
        f"{s['median_lowest_loss_doubling']}. Where none is right, the search leaves the amplifier at 2^{MAX} times "
        f"its start (amplifier_fallback='max'), past the grid's last doubling (2^{MAX - 1}), whose median loss is "
        f"{s['failed_median_loss_last']} against a lowest {s['failed_median_loss_lowest']} on the grid.", "",
        "| search | right at k = 0..9 | loss at k = 0..9 |", "|---|---|---|",
        *[f"| {i} | {''.join('1' if x else '0' for x in r['right'])} | {' '.join(f'{c:.2f}' for c in r['ce'])} |"
          for i, r in enumerate(rows)]])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--render-only", action="store_true", help="re-render --out's grid.jsonl/grid.json")
    ap.add_argument("run_args", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    out = Path(args.out)
    if args.render_only:
        saved = json.loads((out / "grid.json").read_text())
        rows = [json.loads(x) for x in (out / "grid.jsonl").read_text().splitlines() if x.strip()]
        saved["summary"] = summarise(rows)
        benv.save_results(out, "grid", saved, render(rows, saved["run_args"], saved["env"].get("cpu", "")))
        return 0
    run_args = [a for a in args.run_args if a != "--"]
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    observe(rows)
    from fastpatch.cli import main as cli

    with tempfile.TemporaryDirectory() as tmp:
        extra = [] if "--out" in run_args else ["--out", str(Path(tmp) / "run")]
        code = cli(["run", *run_args, *extra, "--no-plots", "--no-progress", "-q"])
    from fastpatch.atomic import write_atomic

    env = benv.environment()
    benv.save_results(out, "grid", {"summary": summarise(rows), "run_args": run_args, "env": env},
                      render(rows, run_args, env.get("cpu", "")))
    write_atomic(out / "grid.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
