"""Which records of a finished stream run fail, and a first look at why: reads the run's
``per_request.jsonl`` (the final evaluation per request) and the stream file, and breaks the
failures of Gen. and Loc. down by how close the evaluated prompt is to the edit prompt.

    python benchmarks/failure_analysis.py runs/zsre --data ../shared/data/zsre/zsre_mend_eval_portability_gpt4.json

Closeness is the word overlap (Jaccard over lower-cased words, the subject's words removed) of the
paraphrase, or the locality prompt, with the edit prompt: a patch keyed on the question's wording
fires where the wording is shared. Output: ``<run>/failures.md`` (and printed), with the worst
examples of each kind.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from fastpatch.atomic import write_atomic
from fastpatch.data.formats import load_stream

BINS = ((0.0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 1.01))


def words(text: str, drop: str = "") -> set[str]:
    """Lower-cased words of ``text`` without those of ``drop`` (the subject)."""
    gone = set(re.findall(r"\w+", drop.lower()))
    return {w for w in re.findall(r"\w+", text.lower()) if w not in gone}


def jaccard(a: set[str], b: set[str]) -> float:
    """|a & b| / |a | b| (0 for two empty sets)."""
    return len(a & b) / len(a | b) if a | b else 0.0


def analyse(run: Path, data: Path, examples: int = 8) -> str:
    """The Markdown breakdown of a run's failures."""
    rows = [json.loads(x) for x in (run / "per_request.jsonl").read_text().splitlines() if x.strip()]
    recs = {str(r.id): r for r in load_stream(data).records}
    gen_items, loc_items = [], []
    for row in rows:
        r = recs[str(row["id"])]
        base = words(r.prompt, r.subject or "")
        for p, ok in zip(r.rephrases, row.get("gen") or []):
            gen_items.append((jaccard(base, words(p, r.subject or "")), bool(ok), r, p))
        for (p, _), agree in zip(r.locality, row.get("loc") or []):
            loc_items.append((jaccard(base, words(p)), agree, r, p))
    out = [f"# Failures of {run.name}", "", f"{len(rows)} requests; Rel. fails on "
           f"{sum(not x['rel'] for x in rows)}.", ""]
    out += ["## Gen.: paraphrase accuracy by word overlap with the edit prompt (subject words removed)", "",
            "| overlap | paraphrases | right |", "|---|---|---|"]
    for lo, hi in BINS:
        sel = [ok for j, ok, *_ in gen_items if lo <= j < hi]
        out.append(f"| {lo:.1f}-{min(hi, 1):.1f} | {len(sel)} | {sum(sel) / len(sel):.3f} |" if sel
                   else f"| {lo:.1f}-{min(hi, 1):.1f} | 0 | - |")
    out += ["", "## Loc.: token agreement of locality prompts by word overlap with the edit prompt", "",
            "| overlap | prompts | mean agreement | changed |", "|---|---|---|---|"]
    for lo, hi in BINS:
        sel = [a for j, a, *_ in loc_items if lo <= j < hi]
        out.append(f"| {lo:.1f}-{min(hi, 1):.1f} | {len(sel)} | {sum(sel) / len(sel):.3f} | {sum(a < 1 for a in sel)} |"
                   if sel else f"| {lo:.1f}-{min(hi, 1):.1f} | 0 | - | - |")
    bad_gen = sorted((x for x in gen_items if not x[1]), key=lambda x: -x[0])[:examples]
    out += ["", "## Paraphrases that fail although they share the most wording", ""]
    out += [f"- `{r.prompt}` -> `{r.target}`; paraphrase `{p}` (overlap {j:.2f})" for j, _, r, p in bad_gen]
    bad_loc = sorted((x for x in loc_items if x[1] < 1), key=lambda x: -x[0])[:examples]
    out += ["", "## Locality prompts the edits changed, most similar first", ""]
    out += [f"- `{r.prompt}` -> `{r.target}` changed `{p}` (overlap {j:.2f}, agreement {a:.2f})"
            for j, a, r, p in bad_loc]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write and print ``<run>/failures.md``."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a finished run directory (with per_request.jsonl)")
    ap.add_argument("--data", type=Path, required=True, help="the stream file the run edited")
    ap.add_argument("--out", type=Path, default=None, help="where failures.md goes (default: the run directory)")
    args = ap.parse_args(argv)
    md = analyse(args.run, args.data)
    write_atomic((args.out or args.run) / "failures.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
