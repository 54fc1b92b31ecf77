"""SmolLM2 served by a real vLLM engine (CPU) with patches made by the fastpatch editor: the edited
capitals, answers identical to the Hugging Face ``PatchedFFN`` model, hot updates and rollback."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here: `make test-vllm` installs it in .venv-vllm")

from safetensors.torch import save_file  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

from fastpatch import PatchBank, PatchFileError  # noqa: E402
from fastpatch.integrations.vllm import PatchUpdater, llm_kwargs  # noqa: E402

from .conftest import N_EDITS, generate_texts, shutdown  # noqa: E402

ENGINE = dict(dtype="float32", max_model_len=512, enforce_eager=True)


@pytest.fixture(scope="module")
def plain(edited) -> list[str]:
    """vLLM's own (unpatched) answers: stock LlamaForCausalLM, no plugin architecture."""
    llm = LLM(model=edited.made.model_dir, **ENGINE)
    try:
        return generate_texts(llm, edited.prompts)
    finally:
        shutdown(llm)


@pytest.fixture(scope="module")
def served(edited, plain):
    """A fastpatch engine serving the editor's patch file from the start."""
    llm = LLM(**llm_kwargs(edited.made.model_dir, patches=[edited.made.patch_file]), **ENGINE)
    yield llm
    shutdown(llm)


def test_served_edits_equal_the_hf_patched_model(served, edited) -> None:
    got = generate_texts(served, edited.prompts)
    assert got == edited.hf_all
    for prompt, target, text in zip(edited.made.prompts, edited.made.targets, got):
        assert text.strip().startswith(target.strip()), (prompt, target, text)
    n = len(edited.made.prompts)
    assert got[:n] != edited.hf_none[:n]  # the edits change the capitals ...
    assert got[-4:] == edited.hf_none[-4:]  # ... and not the unrelated prompts


def test_without_patches_equals_plain_vllm(served, edited, plain) -> None:
    upd = PatchUpdater(served)
    upd.clear()
    try:
        assert generate_texts(served, edited.prompts) == plain
        assert plain == edited.hf_none  # and vLLM's fp32 answers are transformers' answers
    finally:
        upd.rollback()
    assert generate_texts(served, edited.prompts) == edited.hf_all


def test_hot_update_and_rollback(served, edited) -> None:
    upd = PatchUpdater(served)
    (before,) = upd.status()
    layer = before["layers"]["model.layers.29.mlp"]
    assert layer["total"] == edited.n_all and layer["source"] == edited.made.patch_file
    (after,) = upd.load(edited.fewer)
    assert after["layers"]["model.layers.29.mlp"]["total"] == edited.n_fewer < edited.n_all
    got = generate_texts(served, edited.prompts)
    assert got == edited.hf_fewer
    assert not got[0].strip().startswith(edited.made.targets[0].strip())  # the rolled-back edit is gone
    for target, text in zip(edited.made.targets[1:N_EDITS], got[1:N_EDITS]):
        assert text.strip().startswith(target.strip())  # the others stay
    upd.rollback()
    assert generate_texts(served, edited.prompts) == edited.hf_all
    assert upd.status()[0]["layers"] == before["layers"]


def _tampered(edited, name: str, **meta: str) -> str:
    tensors, md = PatchBank.read_file(edited.made.patch_file)
    md.update(meta)
    path = edited.dir / name
    save_file(tensors, str(path), metadata=md)
    return str(path)


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"fingerprint": "0" * 24}, "different FFN weights"),
        ({"module_path": "model.layers.3.mlp"}, r"this engine patches \['model.layers.29.mlp'\]"),
        ({"d_in": "64"}, "disagree with its metadata"),
    ],
)
def test_a_file_for_another_model_is_refused_and_nothing_changes(served, edited, meta, message) -> None:
    upd = PatchUpdater(served)
    before = upd.status()
    bad = _tampered(edited, "bad-" + "-".join(meta) + ".safetensors", **meta)
    with pytest.raises(PatchFileError, match=message):
        upd.load(bad)
    assert upd.status() == before
    assert generate_texts(served, edited.prompts[:N_EDITS]) == edited.hf_all[:N_EDITS]


def test_updates_wait_for_requests_in_flight(served, edited) -> None:
    """A request that started with one patch set must not finish with another."""
    engine = served.llm_engine
    engine.add_request("in-flight", edited.prompts[0], SamplingParams(temperature=0.0, max_tokens=4))
    try:
        with pytest.raises(RuntimeError, match="in flight"):
            PatchUpdater(served).load(edited.fewer)
    finally:
        engine.abort_request(["in-flight"])
    assert PatchUpdater(served).status()[0]["layers"]["model.layers.29.mlp"]["total"] == edited.n_all


def test_a_foreign_start_file_is_refused_before_the_engine_starts(edited) -> None:
    bad = _tampered(edited, "foreign.safetensors", fingerprint="f" * 24)
    with pytest.raises(PatchFileError, match="different FFN weights"):
        llm_kwargs(edited.made.model_dir, patches=[bad])
    llm_kwargs(edited.made.model_dir, patches=[edited.made.patch_file])  # the real one passes


def test_status_is_json(served) -> None:
    json.dumps(PatchUpdater(served).status())
