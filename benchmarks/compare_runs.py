"""Compare stream runs of the same requests made by two versions of the code (an A/B of a speed-up
that must not change what the editor does).

    python benchmarks/compare_runs.py --pair capitals /tmp/ab-geo-base /tmp/ab-geo-new \\
        --pair zsre /tmp/ab-zsre-base /tmp/ab-zsre-new --out benchmarks/results/cpu/<tag> --note "..."

Each ``--pair NAME A B`` names two ``fastpatch run`` directories (A: the baseline, B: the
change). Per pair: the median, mean and p90 editor seconds of the edits made (``editor_seconds``
in ``edits.jsonl``, requests the model already got right excluded), whether every request took
the same action with the same number of steps and the same success, and the final metrics of
each run. Writes ``compare.json`` and ``compare.md``; run the two sides one after the other on an
otherwise idle machine, and say so in ``--note``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import env as benv  # noqa: E402
from benchmarks.publish_run import _p90  # noqa: E402


def _edits(run: Path) -> list[dict[str, Any]]:
    path = run / "edits.jsonl"
    if not path.is_file():
        raise SystemExit(f"{run}: no edits.jsonl (not a fastpatch run directory)")
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def side(run: Path) -> dict[str, Any]:
    """The timing and metrics of one run directory."""
    rows = _edits(run)
    secs = [r["editor_seconds"] for r in rows if r.get("action") == "edit" and r.get("editor_seconds") is not None]
    if not secs:
        raise SystemExit(f"{run}: no edits were made")
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    return {"run": str(run), "edits": len(secs), "median_s": statistics.median(secs), "mean_s": statistics.fmean(secs),
            "p90_s": _p90(secs), "metrics": summary.get("metrics", {}),
            "trace": [(r.get("id"), r.get("action"), r.get("steps"), r.get("success")) for r in rows]}


def compare(name: str, a: Path, b: Path) -> dict[str, Any]:
    """Both sides of one pair and whether they made the same edits."""
    sa, sb = side(a), side(b)
    same = sa["trace"] == sb["trace"]
    diff = [i for i, (x, y) in enumerate(zip(sa["trace"], sb["trace"])) if x != y]
    return {"name": name, "a": {k: v for k, v in sa.items() if k != "trace"}, "b": {k: v for k, v in sb.items() if k != "trace"},
            "same_edits": same and len(sa["trace"]) == len(sb["trace"]), "requests": len(sa["trace"]),
            "differing_requests": diff[:20], "median_ratio": sb["median_s"] / sa["median_s"],
            "mean_ratio": sb["mean_s"] / sa["mean_s"]}


def render(res: dict[str, Any]) -> str:
    """The markdown table of :func:`main`'s results."""
    env = res["env"]
    lines = [f"# A/B of stream runs: {res['title']}", "",
             f"{env.get('date')}, {env.get('cpu')}, torch {env.get('torch')}. {res['note']}".rstrip(), "",
             "| stream | requests | edits | same steps and outcomes | median s/edit A -> B | mean A -> B | p90 A -> B "
             "| median B/A | metrics A | metrics B |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in res["pairs"]:
        a, b = p["a"], p["b"]

        def m(x: dict[str, Any]) -> str:
            return ", ".join(f"{k} {v:.3f}" for k, v in x["metrics"].items() if isinstance(v, (int, float)))

        lines.append(f"| {p['name']} | {p['requests']} | {a['edits']} / {b['edits']} | "
                     f"{'yes' if p['same_edits'] else 'no: ' + str(p['differing_requests'])} | "
                     f"{a['median_s']:.3f} -> {b['median_s']:.3f} | {a['mean_s']:.3f} -> {b['mean_s']:.3f} | "
                     f"{a['p90_s']:.3f} -> {b['p90_s']:.3f} | {p['median_ratio']:.2f} | {m(a)} | {m(b)} |")
    lines += ["", "Seconds are the editor's own per edit (`editor_seconds`), over the requests it edited; "
              "A is the baseline, B the change."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", nargs=3, action="append", metavar=("NAME", "A", "B"), required=True)
    ap.add_argument("--title", default="baseline (A) against the change (B)")
    ap.add_argument("--note", default="")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    e = benv.environment()
    res = {"title": args.title, "note": args.note, "env": {"date": e.get("date"), "cpu": e.get("cpu"), "torch": e.get("torch")},
           "pairs": [compare(n, Path(a), Path(b)) for n, a, b in args.pair]}
    md = render(res)
    print(md)
    if args.out:
        benv.save_results(args.out, "compare", res, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
