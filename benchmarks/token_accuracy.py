"""EasyEdit's own Rel./Gen. (token accuracy) of a finished run, from its final checkpoint.

    python benchmarks/token_accuracy.py runs/zsre --data ../shared/data/zsre/zsre_mend_eval_portability_gpt4.json

Runs evaluated before the runner reported ``Rel_tok``/``Gen_tok`` have only the exact-match
Rel./Gen. (every target token right). This scores every request of the run again with the final
checkpoint's editor, teacher-forced, and averages the per-token accuracy as EasyEdit does; the
exact-match values are recomputed beside them, so the two can be checked against the run's own
summary. Output: ``<run>/token_accuracy.json`` (and printed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fastpatch.atomic import write_json_atomic
from fastpatch.data.formats import load_stream
from fastpatch.metrics import generalization_rate, mean, token_agreement


def measure(run: Path, data: Path, model: str, batch_size: int = 32) -> dict[str, Any]:
    """Rel./Gen. by token accuracy and by exact match over the requests the run processed."""
    from fastpatch.app.registry import resolve_model
    from fastpatch.editor import Editor
    from fastpatch.run import latest_checkpoint

    summary = json.loads((run / "summary.json").read_text())
    recs = load_stream(data).records[: summary["requests"]]
    mdl, tok = resolve_model(model)
    ed = Editor.load(latest_checkpoint(run, strict=True) / "editor", mdl, tok)
    pairs = [(r.prompt, r.target) for r in recs] + [(p, r.target) for r in recs for p in r.rephrases]
    prompts, targets = [p for p, _ in pairs], [t for _, t in pairs]
    order = sorted(range(len(pairs)), key=lambda k: len(prompts[k]) + len(targets[k]))
    pred = ed.predict_tokens([prompts[k] for k in order], [targets[k] for k in order], batch_size=batch_size)
    labels = ed.target_ids([prompts[k] for k in order], [targets[k] for k in order])
    acc = [0.0] * len(pairs)
    for k, p, lab in zip(order, pred, labels):
        acc[k] = token_agreement(list(map(int, lab)), list(map(int, p)))
    n = len(recs)
    per_request, k = [], n
    for r in recs:
        per_request.append(acc[k : k + len(r.rephrases)])
        k += len(r.rephrases)
    exact = [a == 1.0 for a in acc]
    return {
        "run": str(run), "requests": n,
        "Rel_tok": mean(acc[:n]), "Gen_tok": generalization_rate(per_request),
        "Rel": mean(1.0 if e else 0.0 for e in exact[:n]),
        "Gen": generalization_rate([[1.0 if a == 1.0 else 0.0 for a in ps] for ps in per_request]),
        "summary_Rel": summary["metrics"].get("Rel"), "summary_Gen": summary["metrics"].get("Gen"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model", default="smollm2")
    args = ap.parse_args(argv)
    m = measure(args.run, args.data, args.model)
    write_json_atomic(args.run / "token_accuracy.json", m)
    print(json.dumps(m, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
