"""Where a key init puts paraphrases: an offline simulation of the memory key init on the edits
of a finished run (no training), to see how much room the init leaves before a full ablation.

    python benchmarks/key_init_sim.py RUN DATA N RIDGES [VIEW_SCATTER]
    python benchmarks/key_init_sim.py runs/zsre-neg8 ../shared/data/zsre/zsre_mend_eval_portability_gpt4.json 200 0.01 1.0

For each of the first N requests of the run (its final checkpoint's editor: memory rows by owner,
the context prefixes), the memory is rebuilt as it was at that edit (corpus + earlier edits' rows)
with 8 subject-swapped negatives, a key is initialised along the whitened direction (ridge factor
per RIDGES, the context variants' scatter weighted by VIEW_SCATTER), calibrated to +1 on the
weakest view and -1 on the closest memory row, and the last-token pre-activation of the
paraphrases, locality prompts and 100 held-out texts is measured. ``z`` is that pre-activation in
units of the gap (0: the closest memory row, 1: the weakest view); ``frac>t`` is the share a key
whose zero sits at ``t`` of the gap (``key_boundary``) would fire on. A simplified init (the
views' mean, the first target position), not the editor's code path: a guide, not a result.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

from fastpatch.app.geography import general_ability_sets
from fastpatch.app.registry import resolve_model
from fastpatch.data.formats import load_stream
from fastpatch.editor import Editor
from fastpatch.run import latest_checkpoint


def main() -> int:  # noqa: C901 - a linear analysis script
    """Run the simulation on the command line's run and print its table."""
    run, data, N = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    ridges = [float(x) for x in sys.argv[4].split(",")]
    VS = float(sys.argv[5]) if len(sys.argv) > 5 else 1.0
    torch.manual_seed(0)
    mdl, tok = resolve_model("smollm2")
    ed = Editor.load(latest_checkpoint(run, strict=True) / "editor", mdl, tok)
    recs = load_stream(data).records[:N]
    mem, own = ed.memory.vectors.double(), ed.memory.owners
    codes = {eid: e["code"] for eid, e in ed.edits.items()}
    prefixes = ed.context_prefixes()
    texts, _ = general_ability_sets()
    held = [x.double() for x in ed.ffn_inputs(texts[:100])]
    heldcat = torch.cat(held); held_idx = torch.repeat_interleave(torch.arange(len(held)), torch.tensor([len(h) for h in held]))
    last = lambda ts: torch.stack([x[-1] for x in ed.ffn_inputs(ts)]).double()
    subjects = []
    res = {r: {"para": [], "loc": [], "neg": [], "held": []} for r in ridges}
    corpus_mask = own == -1
    for i, rec in enumerate(recs):
        code = codes.get(str(rec.id))
        if code is None:
            continue
        m = mem[corpus_mask | ((own >= 0) & (own < code))]
        views = last([p + rec.prompt for p in [""] + prefixes])
        para = last(list(rec.rephrases)) if rec.rephrases else None
        loc = last([p for p, _ in rec.locality]) if rec.locality else None
        subj = (rec.subject or "").strip()
        pool = [s for s in subjects if s != subj and s not in rec.prompt]
        rng = random.Random(i)
        negs = last([rec.prompt.replace(subj, o) for o in rng.sample(pool, min(8, len(pool)))]) if subj and pool and subj in rec.prompt else None
        if subj: subjects.append(subj)
        mu = m.mean(0); C = torch.cov(m.T, correction=0)
        q = views.mean(0)
        allmem = m if negs is None else torch.cat([m, negs])
        for r in ridges:
            lam = r * float(C.diagonal().mean())
            A = C + lam * torch.eye(C.shape[0], dtype=C.dtype)
            if VS:
                dx = views - views.mean(0)
                A = A + VS * dx.T @ dx / views.shape[0]
            u = torch.linalg.solve(A, q - mu)
            u = u / u.norm()
            aq = (views @ u).min(); mmax = (allmem @ u).max()
            gap = aq - mmax
            if gap <= 0:
                res[r]["para"] += [None] * (0 if para is None else len(para)); continue
            c = 2 / gap; b = -c * (aq + mmax) / 2
            f = lambda X: (c * (X @ u) + b)
            z = lambda X: ((X @ u) - mmax) / gap
            if para is not None: res[r].setdefault("zp", []).extend(z(para).tolist())
            if loc is not None: res[r].setdefault("zl", []).extend(z(loc).tolist())
            hz = z(heldcat); hm = torch.full((len(held),), -1e9, dtype=hz.dtype).scatter_reduce(0, held_idx, hz, "amax")
            res[r].setdefault("zh", []).extend(hm.tolist())
            if para is not None: res[r]["para"] += f(para).tolist()
            if loc is not None: res[r]["loc"] += f(loc).tolist()
            hp = f(heldcat)
            fired = torch.zeros(len(held), dtype=torch.bool); fired[held_idx[hp > 0]] = True
            res[r]["held"].append(fired.float().mean().item())
    for r in ridges:
        p = [x for x in res[r]["para"] if x is not None]
        sep = sum(x is None for x in res[r]["para"])
        print(f"ridge {r:g}: para fire {sum(x > 0 for x in p) / max(1,len(p)):.3f} >=0.5 {sum(x >= 0.5 for x in p) / max(1,len(p)):.3f} (median {sorted(p)[len(p)//2]:.2f}, no-sep {sep}); "
              f"loc fire {sum(x > 0 for x in res[r]['loc']) / max(1,len(res[r]['loc'])):.3f}; "
              f"held-out texts fired per patch {sum(res[r]['held']) / max(1,len(res[r]['held'])):.4f}", flush=True)

    for r in ridges:
        for key in ("zp", "zl", "zh"):
            xs = sorted(res[r].get(key, [])); n = len(xs)
            if n: print(r, key, n, [round(xs[int(q * (n - 1))], 2) for q in (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)],
                        "frac>t", {t: round(sum(x > t for x in xs) / n, 3) for t in (0.5, 0.35, 0.25, 0.1)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
