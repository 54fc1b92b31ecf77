"""Where a finished run's perplexity increase on held-out text comes from, token by token.

    python benchmarks/ppl_damage.py runs/zsre [--texts 200] [--out benchmarks/results/zsre/ppl_damage.json]

The run's final checkpoint is loaded. Each held-out text of the general-ability set
(``app.geography.general_ability_sets``: FanOutQA sub-questions, as the runner's PPL) is scored
teacher-forced twice, with the patches and with them disabled (``PatchedFFN.patches_disabled``),
and each predicted token's negative log-likelihood increase is set beside how many patches fire
at the position that predicts it. Reported: the perplexity both ways; the share of the total NLL
increase that comes from positions where some patch fires; how many positions those are; and the
worst positions. A patch that fires nowhere changes nothing, so the share is 100% up to float
noise; what the numbers tell is how concentrated the damage is.

With ``--data STREAM`` (the run's edit stream) it also asks whether a misfire could be told from a
paraphrase by its strength: each patch's activation on its own edit (the largest over the
positions that predict the target) against its activation where it misfires, and against the
edit's patches' activation on the edit's first paraphrase. A cap or threshold on the activation
relative to the edit's own (a bounded patch output) can only remove the misfires without the
paraphrases if the two ratios separate.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from fastpatch.atomic import write_json_atomic


def measure(run: Path, model: str = "smollm2", n_texts: int = 200, worst: int = 15) -> dict[str, Any]:
    """Per-token NLL with and without the patches over ``n_texts`` held-out texts."""
    from fastpatch.app.geography import general_ability_sets
    from fastpatch.app.registry import resolve_model
    from fastpatch.editor import Editor
    from fastpatch.run import latest_checkpoint

    mdl, tok = resolve_model(model)
    ed = Editor.load(latest_checkpoint(run, strict=True) / "editor", mdl, tok)
    texts = general_ability_sets(n_texts)[0]
    captured: dict[str, torch.Tensor] = {}
    hook = ed.ffn.register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0].detach()))
    positions: list[dict[str, Any]] = []
    try:
        for t_i, text in enumerate(texts):
            ids = tok(text, return_tensors="pt").input_ids
            if ids.shape[1] < 2:
                continue
            with torch.no_grad():
                logp = mdl(ids).logits[0, :-1].float().log_softmax(-1)
                acts = ed.ffn.patch_activations(captured["x"].reshape(ids.shape[1], -1))[:-1]
                with ed.ffn.patches_disabled():
                    logp0 = mdl(ids).logits[0, :-1].float().log_softmax(-1)
            nxt = ids[0, 1:]
            nll = -logp.gather(1, nxt[:, None])[:, 0]
            nll0 = -logp0.gather(1, nxt[:, None])[:, 0]
            for j in range(nxt.shape[0]):
                firing = (acts[j] > 0).nonzero().flatten()
                positions.append({"text": t_i, "pos": j, "context": tok.decode(ids[0, max(0, j - 6): j + 1]),
                                  "next": tok.decode(nxt[j: j + 1]), "nll": float(nll[j]), "nll0": float(nll0[j]),
                                  "firing": int(firing.numel()),
                                  "max_act": float(acts[j].max()) if acts.shape[1] else 0.0})
    finally:
        hook.remove()
    n = len(positions)
    total = sum(p["nll"] - p["nll0"] for p in positions)
    fired = [p for p in positions if p["firing"]]
    from_fired = sum(p["nll"] - p["nll0"] for p in fired)
    texts_hit = len({p["text"] for p in fired})
    ranked = sorted(positions, key=lambda p: p["nll0"] - p["nll"])
    return {
        "run": str(run), "texts": len(texts), "tokens": n, "patches": ed.ffn.num_patches,
        "ppl_patched": math.exp(sum(p["nll"] for p in positions) / n),
        "ppl_unpatched": math.exp(sum(p["nll0"] for p in positions) / n),
        "nll_increase_total": total, "nll_increase_from_firing_positions": from_fired,
        "firing_positions": len(fired), "texts_with_a_firing_position": texts_hit,
        "top10_share_of_increase": sum(p["nll"] - p["nll0"] for p in ranked[:10]) / total if total else None,
        "worst": ranked[:worst],
    }


def _quantiles(xs: list[float]) -> dict[str, float] | None:
    xs = sorted(xs)
    return {f"q{int(q * 100)}": xs[int(q * (len(xs) - 1))] for q in (0.1, 0.25, 0.5, 0.75, 0.9)} if xs else None


def activation_ratios(run: Path, data: Path, model: str = "smollm2", n_texts: int = 200) -> dict[str, Any]:
    """Misfire and paraphrase activations of each patch relative to its activation on its own edit."""
    from fastpatch.app.geography import general_ability_sets
    from fastpatch.app.registry import resolve_model
    from fastpatch.data.formats import load_stream
    from fastpatch.editor import Editor
    from fastpatch.run import latest_checkpoint
    from misfire_threshold import ActivationProbe, edited_columns

    mdl, tok = resolve_model(model)
    ed = Editor.load(latest_checkpoint(run, strict=True) / "editor", mdl, tok)
    edits = [json.loads(x) for x in (run / "edits.jsonl").read_text().splitlines() if x.strip()]
    recs = load_stream(data, limit=max((e["i"] for e in edits), default=-1) + 1).records
    own: dict[int, float] = {}  # a column -> the largest activation of its edit's patches on the edit
    para: list[float] = []
    with ActivationProbe(ed, tok, mdl) as probe:
        for e, cols in edited_columns(ed, edits):
            r = recs[e["i"]]
            a_edit = float(probe.on_target(r.prompt, r.target)[:, cols].max())
            own.update({c: a_edit for c in cols})
            if r.rephrases and a_edit > 0:
                para.append(float(probe.on_target(r.rephrases[0], r.target)[:, cols].max()) / a_edit)
        mis = []
        for text in general_ability_sets(n_texts)[0]:
            a = probe.acts(tok(text).input_ids)[:-1]
            mis += [float(a[j, c]) / own[c] for j, c in (a > 0).nonzero().tolist() if own.get(c)]
    firing = [x for x in para if x > 0]
    return {"patches": len(own), "paraphrases": len(para), "paraphrase_ratio": _quantiles(para),
            "paraphrases_where_the_patch_fires": len(firing) / len(para) if para else None,
            "paraphrase_ratio_when_firing": _quantiles(firing), "misfire_ratios": sorted(mis)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--texts", type=int, default=200)
    ap.add_argument("--out", type=Path, default=None, help="JSON output (default: <run>/ppl_damage.json)")
    ap.add_argument("--data", type=Path, default=None,
                    help="the run's edit stream: also compare misfire and paraphrase activations")
    args = ap.parse_args(argv)
    res = measure(args.run, args.model, args.texts)
    if args.data is not None:
        res["activation_ratios"] = activation_ratios(args.run, args.data, args.model, args.texts)
        print(json.dumps(res["activation_ratios"], indent=1))
    write_json_atomic(args.out or args.run / "ppl_damage.json", res)
    print(json.dumps({k: v for k, v in res.items() if k != "worst"}, indent=1))
    for p in res["worst"]:
        print(f"  +{p['nll'] - p['nll0']:.2f} nats  firing={p['firing']:3d}  {p['context']!r} -> {p['next']!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
