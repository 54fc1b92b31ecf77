"""Recompilations of a ``torch.compile``d patched model over a stream of real edits.

    python benchmarks/compile_recompiles.py [--edits 100] [--out benchmarks/results/cpu/<tag>-compile]

The ``Editor`` edits a tiny Llama (built from a config, random weights, a word-level tokenizer:
the real editing code path, seconds per hundred edits) while a compiled copy of the same model
(``torch.compile(model, fullgraph=True)``, shared weights and bank) serves a batch after every
edit; every tenth edit is rolled back, as an edit stream has. Compilations are counted by the
backend (``CompileCounterWithBackend``: one call per (re)compilation of a frame); Dynamo's own
``counters`` and the recompile reasons are recorded beside them. Two banks: the default initial
capacity (grows by doubling as edits arrive) and one preallocated for the stream.

Recompiles are decided by Dynamo's guards, before any backend: ``aot_eager`` (AOTAutograd with
the operators' fake implementations) counts the same recompilations Inductor would, in a
fraction of the time. Writes ``recompiles.json`` and ``recompiles.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import env as benv  # noqa: E402


def run_stream(n_edits: int, capacity: int | None, seed: int = 0) -> dict:
    """Edit ``n_edits`` times with a compiled copy serving after each edit; count compilations."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    from fastpatch.editor import Editor, EditorConfig, EditRequest
    from tests.test_editor import CORPUS, WORDS, word_tokenizer
    from tests.tiny_models import tiny_llama

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(seed)
    model = tiny_llama()
    ed = Editor(model, word_tokenizer(), EditorConfig(max_steps=300))
    if capacity is not None:  # preallocate: grow the (empty) bank once, before anything compiles
        ed.ffn.bank._grow(capacity)
    ed.build_memory(CORPUS)
    cap0 = ed.ffn.bank.capacity
    tok = ed.tokenizer
    probe = tok(["the capital of peru is", "what language is spoken in norway"], return_tensors="pt", padding=True)
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=cnt, fullgraph=True)
    g = torch.Generator().manual_seed(seed + 1)
    words = [w for w in WORDS if w not in ("the", "of", "is")]
    rows, edits, max_err = [], [], 0.0
    t0 = time.perf_counter()
    for i in range(n_edits):
        if i % 10 == 9 and edits:
            ed.rollback(edits.pop(0))
        subj = " ".join(words[int(j)] for j in torch.randint(0, len(words), (2,), generator=g))
        target = words[int(torch.randint(0, len(words), (1,), generator=g))]
        eid = f"e{i}"
        res = ed.edit(EditRequest(f"the capital of {subj} is", target, edit_id=eid))
        if eid in ed.edits:
            edits.append(eid)
        with torch.no_grad():
            out = compiled(**probe).logits
            ref = model(**probe).logits
        max_err = max(max_err, float((out - ref).abs().max()))
        rows.append({"edit": i, "patches": ed.ffn.num_patches, "capacity": ed.ffn.bank.capacity,
                     "compilations": cnt.frame_count, "success": res.success})
    first = rows[0]["compilations"]
    return {
        "edits": n_edits, "initial_capacity": cap0, "final_capacity": ed.ffn.bank.capacity,
        "final_patches": ed.ffn.num_patches, "rollbacks": n_edits // 10,
        "compilations_total": cnt.frame_count, "compilations_after_first_edit": cnt.frame_count - first,
        "capacity_changes": len({r["capacity"] for r in rows}) - 1 + (rows[0]["capacity"] != cap0),
        "dynamo_unique_graphs": counters["stats"].get("unique_graphs"),
        "dynamo_calls_captured": counters["stats"].get("calls_captured"),
        "graph_breaks": sum(counters["graph_break"].values()),
        "max_abs_diff_compiled_vs_eager": max_err, "success_rate": sum(r["success"] for r in rows) / len(rows),
        "seconds": time.perf_counter() - t0, "per_edit": rows,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", type=int, default=100)
    ap.add_argument("--out", default=None, help="folder for recompiles.json/.md (default: print only)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    res = {"torch": torch.__version__, "backend": "aot_eager", "model": "tiny Llama (tests/tiny_models.py)",
           "runs": {"default capacity": run_stream(args.edits, None),
                    "preallocated": run_stream(args.edits, 1024)}}
    lines = ["# Recompilations over an edit stream (torch.compile, fullgraph=True)", "",
             f"torch {res['torch']}, backend {res['backend']}, {res['model']}; {args.edits} edits, every "
             "tenth rolled back; the compiled model serves a 2-prompt batch after every edit.", "",
             "| bank | capacity first -> last | patches at the end | compilations | after the first edit | "
             "graph breaks | max abs diff, compiled vs eager | SR |", "|---|---|---|---|---|---|---|---|"]
    for name, r in res["runs"].items():
        lines.append(f"| {name} | {r['initial_capacity']} -> {r['final_capacity']} | {r['final_patches']} | "
                     f"{r['compilations_total']} | {r['compilations_after_first_edit']} | {r['graph_breaks']} | "
                     f"{r['max_abs_diff_compiled_vs_eager']:.2e} | {r['success_rate']:.2f} |")
    lines += ["", "Each compilation after the first is a doubling of the bank's capacity (Dynamo keeps module "
              "buffers' shapes static); adds and removes within the capacity reuse the graph."]
    md = "\n".join(lines)
    print(md)
    if args.out:
        benv.save_results(args.out, "recompiles", res, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
