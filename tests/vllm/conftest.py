"""vLLM engine tests (``make test-vllm``, their own venv). vLLM on this CPU: one OpenMP thread per
worker, no thread binding (one NUMA node cannot host several TP workers otherwise), a 1 GiB KV
cache."""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

MAX_TOKENS = 8
N_EDITS = 3


def generate_texts(llm: Any, prompts: list[str], max_tokens: int = MAX_TOKENS) -> list[str]:
    """Greedy continuations from a vLLM engine."""
    from vllm import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    return [o.outputs[0].text for o in outs]


def shutdown(llm: Any) -> None:
    """Stop the engine's processes now (not at garbage collection)."""
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def edited(tmp_path_factory) -> SimpleNamespace:
    """SmolLM2 with N_EDITS wrong capitals fixed by the fastpatch editor (saved), and the Hugging
    Face model's greedy answers with all edits, with none, and with all but the first edit."""
    pytest.importorskip("vllm", reason="vLLM is not installed here: `make test-vllm` installs it in .venv-vllm")
    import torch

    from fastpatch.app.serve_demo import UNRELATED_PROMPTS, edit_capitals, hf_greedy

    torch.set_num_threads(1)
    out = Path(tmp_path_factory.mktemp("edits"))
    made, ed = edit_capitals(out / "all", N_EDITS)
    prompts = made.prompts + made.paraphrases + list(UNRELATED_PROMPTS)
    greedy = lambda: hf_greedy(ed.model, ed.tokenizer, prompts, MAX_TOKENS)  # noqa: E731
    hf_all = greedy()
    with ed.ffn.patches_disabled():
        hf_none = greedy()
    first = next(iter(ed.edits))
    n_all = ed.num_patches
    ed.rollback(first)  # a second patch set: the same editor after rolling back one edit
    fewer = out / "fewer.safetensors"
    ed.ffn.save(fewer)
    hf_fewer = greedy()
    return SimpleNamespace(made=made, prompts=prompts, hf_all=hf_all, hf_none=hf_none, hf_fewer=hf_fewer,
                           fewer=str(fewer), n_all=n_all, n_fewer=ed.num_patches, dir=out)
