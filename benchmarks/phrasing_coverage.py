"""Where the phrasing views can help: Gen. of finished runs split by whether each request had a
phrasing view when it was edited.

    python benchmarks/phrasing_coverage.py runs/zsre-phrasings0 runs/zsre \\
        --data ../shared/data/zsre/zsre_mend_eval_portability_gpt4.json [--held-out split.json]

The bank is replayed as the editor fills it (:class:`fastpatch.editor.phrasings.PhrasingBank`):
from the held-out split first, when given, then from each request once it is edited; a request
"has views" when the bank offered it one (never its own evaluated paraphrase). Each run's final
``per_request.jsonl`` gives the paraphrase results. Output: printed, and ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fastpatch.atomic import write_json_atomic
from fastpatch.data.formats import load_stream
from fastpatch.editor.phrasings import PhrasingBank


def coverage(data: Path, n: int, held_out: Path | None = None, k: int = 4) -> list[bool]:
    """Per request of the stream's first ``n``: whether the bank offered it a view."""
    bank = PhrasingBank()
    if held_out is not None:
        bank.add_records(load_stream(held_out).records)
    has = []
    for r in load_stream(data).records[:n]:
        has.append(bool(bank.views(r.prompt, r.subject, k, exclude=list(r.rephrases))))
        bank.add(r.prompt, r.subject, list(r.rephrases))
    return has


def split_gen(run: Path, has: list[bool]) -> dict[str, Any]:
    """Gen. (exact match) of the requests with and without views."""
    rows = [json.loads(x) for x in (run / "per_request.jsonl").read_text().splitlines() if x]
    out: dict[str, Any] = {}
    for flag, name in ((True, "with_views"), (False, "without_views")):
        g = [sum(r["gen"]) / len(r["gen"]) for r, h in zip(rows, has) if h == flag and r.get("gen")]
        out[name] = {"requests": len(g), "Gen": sum(g) / len(g) if g else None}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--held-out", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    n = max(len((r / "per_request.jsonl").read_text().splitlines()) for r in args.runs)
    has = coverage(args.data, n, args.held_out)
    result = {"requests": n, "with_views": sum(has), "runs": {str(r): split_gen(r, has) for r in args.runs}}
    if args.out:
        write_json_atomic(args.out, result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
