"""Where one CPU edit's time goes: SmolLM2-135M, the capitals and zsRE, stage by stage.

    python benchmarks/profile_edit.py [--edits 12] [--memory full|small] [--out benchmarks/results/cpu/<tag>-profile]

The editor is left as it is: its methods are wrapped, on the instance, with timers (and a few
functions it calls: the memory loss, ``torch.autograd.grad``, Adam's step, gradient clipping, the
adapter's tail/head), so the breakdown is of the code that ships. Each timer records its
inclusive time and its exclusive time (minus the timed calls inside it), so the exclusive times
add up to the edit. Stages:

- ``encode`` / ``augment``: tokenizing the request and its context variants;
- ``capture``: the forward of every view up to the tail (FFN inputs, tail inputs, predictions);
- ``init``: key (memory-whitened), value (unembedding, gradient) and the amplifier search;
- ``train``: the steps, split into the edit loss on the tail, the memory loss, the
  whole-vocabulary checks (``exact_flags``), backward, clipping and Adam;
- ``commit``: writing the patches into the bank and the edit's vectors into the memory.

Requests: the first ``--edits`` capitals SmolLM2 gets wrong (``geography_records``) and the first
``--edits`` zsRE records it gets wrong (``../shared/data/zsre``, read only if present). Memory:
``full`` is the editing benchmark's 40,000 FanOutQA and region vectors (cached under
``$TMPDIR``), ``tiled`` 40,000 rows tiled from the first 400 texts' vectors, ``small`` 40
questions (see ``fill_memory``). Writes ``profile.json`` and ``profile.md``; other
processes' CPU load is recorded beside the timings (``benchmarks/env.py``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import env as benv  # noqa: E402

ZSRE = ROOT.parent / "shared" / "data" / "zsre" / "zsre_mend_eval_portability_gpt4.json"

#: timer name -> what it is (the markdown's legend); the order is the table's.
STAGES = {
    "edit_batch": "bookkeeping of edit_batch itself (ids, results)",
    "encode": "tokenize the request",
    "augment": "tokenize the context variants",
    "capture": "forward of every view up to the tail (FFN inputs, tail inputs, predictions)",
    "init": "init bookkeeping (key = q/|q|^2, stacking the views' inputs)",
    "init.memory_key": "memory-whitened key and bias",
    "init.unembed_value": "value along the unembedding difference",
    "init.gradient_value": "value along the tail gradient (its own tail forward/backward)",
    "init.amplifier_search": "amplifier doublings (tail evaluations)",
    "train": "step loop bookkeeping",
    "train.losses": "loss assembly (L_act, flags, float() of the parts)",
    "train.edit_loss_tail": "edit loss on the tail (patch delta, final norm, candidate head)",
    "train.memory_loss": "memory loss over the memory set (top-k, exp)",
    "train.exact_flags": "whole-vocabulary checks (LM head over the full vocabulary)",
    "train.backward": "torch.autograd.grad of the loss",
    "train.clip": "gradient clipping",
    "train.adam": "Adam step",
    "adapter.tail": "(inside the above) LM tail: final norm + full-vocabulary head",
    "adapter.head": "(inside the above) candidate-vocabulary head",
    "commit.add_patches": "write the patches into the bank",
    "commit.memory_add": "append the edit's FFN inputs to the memory",
}


class StageTimer:
    """Inclusive and exclusive seconds per named wrapped callable (nesting-aware)."""

    def __init__(self) -> None:
        self.incl: dict[str, float] = defaultdict(float)
        self.excl: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[float] = []

    def wrap(self, name: str, fn: Callable[..., Any], observer: bool = False) -> Callable[..., Any]:
        """``fn`` timed under ``name``; time of timed calls inside it counts as theirs. An
        ``observer`` timer only records its inclusive time (its callers keep it as their own)."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            if observer:
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.incl[name] += time.perf_counter() - t0
                    self.calls[name] += 1
            t0 = time.perf_counter()
            self._stack.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                child = self._stack.pop()
                self.incl[name] += dt
                self.excl[name] += dt - child
                self.calls[name] += 1
                if self._stack:
                    self._stack[-1] += dt

        return timed

    def reset(self) -> None:
        self.incl.clear()
        self.excl.clear()
        self.calls.clear()


def instrument(ed: Any, timer: StageTimer) -> Callable[[], None]:
    """Wrap the editor's stages (instance attributes and a few module functions); return undo."""
    import fastpatch.editor.editor as E

    undo: list[Callable[[], None]] = []

    def on(obj: Any, attr: str, name: str) -> None:
        orig = getattr(obj, attr)
        setattr(obj, attr, timer.wrap(name, orig, observer=name.startswith("adapter.")))
        had = attr in getattr(obj, "__dict__", {})
        undo.append(lambda: setattr(obj, attr, orig) if had else delattr(obj, attr))

    for attr, name in (("edit_batch", "edit_batch"), ("_encode", "encode"), ("_augmented", "augment"),
                       ("_capture_all", "capture"), ("_init_params", "init"), ("_memory_init", "init.memory_key"),
                       ("_unembed_init", "init.unembed_value"), ("_gradient_init", "init.gradient_value"),
                       ("_search_amplifier", "init.amplifier_search"), ("_train", "train"),
                       ("_losses", "train.losses"), ("_edit_loss_tail", "train.edit_loss_tail"),
                       ("_exact_flags", "train.exact_flags")):
        on(ed, attr, name)
    on(ed.adapter, "tail", "adapter.tail")
    on(ed.adapter, "head", "adapter.head")
    on(ed.ffn, "add_patches", "commit.add_patches")
    on(ed.memory, "add", "commit.memory_add")
    on(E, "patch_memory_loss", "train.memory_loss")
    on(torch.autograd, "grad", "train.backward")
    on(torch.nn.utils, "clip_grad_norm_", "train.clip")
    orig_step = torch.optim.Adam.step
    torch.optim.Adam.step = timer.wrap("train.adam", orig_step)
    undo.append(lambda: setattr(torch.optim.Adam, "step", orig_step))
    return lambda: [u() for u in reversed(undo)]


def fill_memory(ed: Any, size: str, n_target: int = 40000) -> str:
    """Fill the editor's memory; return how (the report says it).

    ``full``: the editing benchmark's corpus (FanOutQA questions and sub-questions, region
    prompts: 40,000 vectors; cached under ``$TMPDIR``). ``tiled``: the FFN inputs of the corpus'
    first 400 texts, repeated with 1% noise up to 40,000 rows: the memory stages cost what they
    cost at N = 40,000 (their work depends on N and d only) for a tenth of the build time.
    ``small``: 40 questions.
    """
    from fastpatch.data import load_fanoutqa_questions, region_prompts

    texts = load_fanoutqa_questions(subquestions=True) + [p for p, _ in region_prompts()]
    if size == "small":
        ed.build_memory(load_fanoutqa_questions()[:40])
        return "40 FanOutQA questions"
    if size == "tiled":
        ed.build_memory(texts[:400])
        base = ed.memory.vectors.clone()
        reps = -(-n_target // len(base)) - 1
        g = torch.Generator().manual_seed(0)
        extra = base.repeat(reps, 1)[: n_target - len(base)]
        scale = 0.01 * base.float().std()
        ed.memory.add((extra.float() + scale * torch.randn(extra.shape, generator=g)).to(base.dtype))
        return (f"{len(ed.memory):,} vectors: the FFN inputs of the benchmark corpus' first 400 texts "
                f"({len(base):,} vectors), tiled with 1% noise")
    cache = Path(tempfile.gettempdir()) / "fastpatch-profile-memory-smollm2.pt"
    if cache.exists():
        ed.memory.add(torch.load(cache))
    else:
        ed.build_memory(texts)
        torch.save(ed.memory.vectors.clone(), cache)
    return f"{len(ed.memory):,} vectors: the editing benchmark's corpus (FanOutQA, region prompts)"


def _requests(ed: Any, n: int) -> dict[str, list]:
    from fastpatch.data import geography_records, load_stream

    out = {}
    recs = geography_records()
    ok = ed.check([r.prompt for r in recs], [r.target for r in recs])
    out["capitals"] = [r for r, o in zip(recs, ok) if not o][:n]
    if ZSRE.exists():
        zs = load_stream(ZSRE).records[: 8 * n]
        ok = ed.check([r.prompt for r in zs], [r.target for r in zs])
        out["zsre"] = [r for r, o in zip(zs, ok) if not o][:n]
    return out


def profile(ed: Any, records: list, timer: StageTimer) -> dict:
    """Edit every record (rolled back after: each edit sees the same bank); the breakdown."""
    from fastpatch.editor import EditRequest

    timer.reset()
    secs, steps, neurons, ok = [], [], [], []
    with benv.ForeignLoad() as load:
        for i, r in enumerate(records):
            eid = f"profile-{i}"
            res = ed.edit(EditRequest(r.prompt, r.target, edit_id=eid))
            secs.append(res.seconds)
            steps.append(res.steps)
            neurons.append(res.n_neurons)
            ok.append(res.success)
            if eid in ed.edits:
                ed.rollback(eid)
    total = timer.incl["edit_batch"]  # the edits' whole time, commit included
    stages = {name: {"seconds_per_edit": timer.excl[name] / len(records),
                     "share": timer.excl[name] / total if total else None,
                     "inclusive_seconds_per_edit": timer.incl[name] / len(records),
                     "calls_per_edit": timer.calls[name] / len(records), "what": what}
              for name, what in STAGES.items() if timer.calls.get(name)}
    return {"edits": len(records), "median_s_per_edit": statistics.median(secs), "mean_s_per_edit": sum(secs) / len(records),
            "p90_s_per_edit": sorted(secs)[min(len(secs) - 1, int(0.9 * len(secs)))],
            "median_steps": statistics.median(steps), "median_neurons": statistics.median(neurons),
            "success_rate": sum(ok) / len(ok), "other_cpu_pct": None if load.pct is None else round(load.pct, 1),
            "edit_seconds_total": total,
            "stages": stages}


def render(res: dict) -> str:
    """The markdown summary of :func:`main`'s results."""
    env = res["env"]
    lines = ["# One CPU edit, stage by stage (SmolLM2-135M-Instruct)", "",
             f"{env['date']}, {env['cpu']}, {env['torch_threads']} torch threads, torch {env['torch']}, memory "
             f"{res['memory']}, default `EditorConfig()`. Absolute times were taken on a shared "
             "2-core VM (other processes' load beside each run): read the shares, not the seconds.", ""]
    for name, r in res["datasets"].items():
        lines += [f"## {name}: {r['edits']} edits, median {r['median_s_per_edit']:.3f} s/edit (mean "
                  f"{r['mean_s_per_edit']:.3f}, p90 {r['p90_s_per_edit']:.3f}), median {r['median_steps']} steps, "
                  f"{r['median_neurons']} neurons, SR {r['success_rate']:.2f}, other processes' CPU load "
                  f"{r['other_cpu_pct']}%", "",
                  "| stage | s/edit | share of the edit | calls/edit | what |", "|---|---|---|---|---|"]
        for st, v in sorted(r["stages"].items(), key=lambda kv: -kv[1]["seconds_per_edit"]):
            share = "" if st.startswith("adapter.") else f"{100 * v['share']:.1f}%"
            secs = v["inclusive_seconds_per_edit"] if st.startswith("adapter.") else v["seconds_per_edit"]
            lines.append(f"| {st} | {secs:.4f} | {share} | {v['calls_per_edit']:.1f} | {v['what']} |")
        lines += ["", "Exclusive times add up to the whole `edit_batch` call (commit included); `adapter.*` rows are "
                  "inclusive times of calls made inside the stages above (not added).", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", type=int, default=12)
    ap.add_argument("--memory", choices=("full", "tiled", "small"), default="full")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("FASTPATCH_BENCH_THREADS", "2")))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from fastpatch.editor import Editor, EditorConfig
    from fastpatch.models import load_smollm2

    model, tok = load_smollm2()
    ed = Editor(model, tok, EditorConfig())
    memory_note = fill_memory(ed, args.memory)
    reqs = _requests(ed, args.edits)
    timer = StageTimer()
    undo = instrument(ed, timer)
    try:
        profile(ed, reqs["capitals"][:2], timer)  # warm-up: prefixes, caches, first-call costs
        data = {name: profile(ed, recs, timer) for name, recs in reqs.items()}
    finally:
        undo()
    env = benv.environment()
    res = {"env": {"date": env.get("date"), "cpu": env.get("cpu"), "torch": env.get("torch"),
                   "torch_threads": torch.get_num_threads()},
           "memory_vectors": len(ed.memory), "memory": memory_note, "config": "EditorConfig()", "datasets": data}
    md = render(res)
    print(md)
    if args.out:
        benv.save_results(args.out, "profile", res, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
