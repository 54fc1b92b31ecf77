"""Can a bounded patch output remove the misfires that cost zsRE its perplexity, without the paraphrases?

    python benchmarks/misfire_threshold.py runs/zsre --data zsre.json [--tau 0,0.3,0.5]
        [--out benchmarks/results/zsre/misfire_threshold.json]

``benchmarks/ppl_damage.py`` finds the whole perplexity increase of the zsRE T = 1,000 run at a
handful of positions where a patch fires inside a name, and that a misfire's activation is
0.2-0.9 of the patch's activation on its own edit. This tries the obvious cure on the run's final
checkpoint, with no retraining: raise every patch's threshold to ``tau`` times its activation on
its own edit (the largest over the positions that predict the target) and scale its value by
``1 / (1 - tau)``, so that on its edit the patch adds exactly what it added before (a subject key's
activation on its edit is read at every position of the prompt, the subject's included), while an input
that drives it to less than ``tau`` of that adds nothing and one between adds less. Patches that
do not fire on their own edit's prompt are left as they are.

For each ``tau`` it reports Rel. and Gen. (exact match, the first paraphrase) over the edited
requests, Loc. (token agreement with the unedited model on each request's first locality
prompt) and the held-out perplexity of the runner's general-ability texts. ``tau = 0`` is the run
as it is and reproduces its published figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from fastpatch.atomic import write_json_atomic


class ActivationProbe:
    """Every bank patch's activation at every position of a text, read from the patched FFN's
    input (a forward pre-hook, removed by :meth:`close` or on leaving a ``with`` block)."""

    def __init__(self, ed: Any, tok: Any, model: torch.nn.Module) -> None:
        self.ed, self.tok, self.model = ed, tok, model
        self._x: torch.Tensor | None = None
        self._hook = ed.ffn.register_forward_pre_hook(lambda m, a: setattr(self, "_x", a[0].detach()))

    def __enter__(self) -> "ActivationProbe":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hook."""
        self._hook.remove()

    def acts(self, ids: list[int]) -> torch.Tensor:
        """(len(ids), P): the patches' activations at each position of the token ids."""
        with torch.no_grad():
            self.model(torch.tensor([ids]))
        return self.ed.ffn.patch_activations(self._x.reshape(len(ids), -1))

    def on_target(self, prompt: str, target: str, whole: bool = False) -> torch.Tensor:
        """(positions, P): the activations at the positions that predict ``target`` after
        ``prompt`` (``whole``: at every position of the prompt too, where a subject key reads)."""
        p, t = self.tok(prompt).input_ids, self.tok(target, add_special_tokens=False).input_ids
        return self.acts(p + t)[0 if whole else len(p) - 1: len(p) + len(t) - 1]


def edited_columns(ed: Any, edits: list[dict[str, Any]]) -> list[tuple[dict[str, Any], list[int]]]:
    """``(edit line, bank columns of its patches)`` for each edit (``edits.jsonl``) whose patches
    are still in the bank."""
    col = {pid: c for c, pid in enumerate(ed.ffn.bank.ids)}
    out = []
    for e in edits:
        cols = [col[i] for i in e.get("patch_ids") or [] if i in col]
        if e.get("action") == "edit" and cols:
            out.append((e, cols))
    return out


def own_activations(ed: Any, tok: Any, model: torch.nn.Module, edits: list[dict[str, Any]],
                    records: list[Any]) -> tuple[torch.Tensor, list[Any]]:
    """Each bank column's activation on its own edit (0 where it does not fire there) and the
    records of the edits that made patches. A last-token key is read where the target is
    predicted; a subject key (``key_position`` ``subject``/``both``) anywhere in the prompt too."""
    own = torch.zeros(ed.ffn.bank.num_patches)
    edited = []
    whole = ed.config.key_position != "last"
    with ActivationProbe(ed, tok, model) as probe:
        for e, cols in edited_columns(ed, edits):
            r = records[e["i"]]
            edited.append(r)
            own[cols] = probe.on_target(r.prompt, r.target, whole)[:, cols].max(0).values.float()
    return own, edited


def measure(run: Path, data: Path, taus: list[float], model: str = "smollm2", n_texts: int = 200) -> dict[str, Any]:
    """Rel./Gen./Loc./PPL of the run's final patches at each threshold ``tau``."""
    from fastpatch.app.geography import general_ability_sets
    from fastpatch.app.registry import resolve_model
    from fastpatch.data.formats import load_stream
    from fastpatch.editor import Editor
    from fastpatch.metrics import token_agreement
    from fastpatch.run import latest_checkpoint

    mdl, tok = resolve_model(model)
    ed = Editor.load(latest_checkpoint(run, strict=True) / "editor", mdl, tok)
    edits = [json.loads(x) for x in (run / "edits.jsonl").read_text().splitlines() if x.strip()]
    records = load_stream(data, limit=max((e["i"] for e in edits), default=-1) + 1).records
    own, edited = own_activations(ed, tok, mdl, edits, records)
    texts = general_ability_sets(n_texts)[0]
    loc = [r.locality[0] for r in edited if r.locality]
    with ed.ffn.patches_disabled():
        loc0 = ed.predict_tokens([p for p, _ in loc], [t for _, t in loc])
        ppl0 = ed.perplexity(texts)
    bank = ed.ffn.bank
    b0, v0 = bank.biases.detach().clone(), bank.values.detach().clone()
    out: dict[str, Any] = {"run": str(run), "edited_requests": len(edited), "patches": int(own.numel()),
                           "patches_firing_on_their_edit": int((own > 0).sum()), "ppl_unpatched": ppl0, "taus": {}}
    try:
        for tau in taus:
            t0 = time.perf_counter()
            with torch.no_grad():
                bank.biases.copy_(b0 - tau * own.to(b0.dtype))
                scale = torch.where(own > 0, 1.0 / (1.0 - tau), 1.0).to(v0.dtype)
                bank.values.copy_(v0 * scale[:, None])
            rel = ed.check([r.prompt for r in edited], [r.target for r in edited])
            para = [r for r in edited if r.rephrases]
            gen = ed.check([r.rephrases[0] for r in para], [r.target for r in para])
            post = ed.predict_tokens([p for p, _ in loc], [t for _, t in loc])
            out["taus"][str(tau)] = {
                "Rel": sum(rel) / len(rel), "Gen": sum(gen) / len(gen),
                "Loc": sum(token_agreement(a, b) for a, b in zip(loc0, post)) / len(loc),
                "PPL": ed.perplexity(texts), "seconds": time.perf_counter() - t0}
            print(tau, out["taus"][str(tau)], flush=True)
    finally:
        with torch.no_grad():
            bank.biases.copy_(b0)
            bank.values.copy_(v0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--data", type=Path, required=True, help="the run's edit stream")
    ap.add_argument("--tau", default="0,0.3,0.5", help="thresholds, comma-separated, each in [0, 1)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", type=Path, default=None, help="JSON output (default: <run>/misfire_threshold.json)")
    args = ap.parse_args(argv)
    taus = [float(x) for x in args.tau.split(",")]
    if any(not 0.0 <= t < 1.0 for t in taus):
        ap.error(f"--tau: every threshold must be in [0, 1), got {taus}")
    res = measure(args.run, args.data, taus, args.model)
    write_json_atomic(args.out or args.run / "misfire_threshold.json", res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
