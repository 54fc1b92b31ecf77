"""Tensor parallelism in a real vLLM engine (CPU backend, one process per rank).

SmolLM2-135M has 9 attention heads, so vLLM can shard it over 1, 3 or 9 ranks, not 2. Two ranks
are tested on a small random Llama saved as a Hugging Face directory (token ids in and out, no
tokenizer), compiled with torch.compile as vLLM does by default; three ranks on SmolLM2 with the
editor's real patches. Each rank holds a slice of the patches and adds it before the MLP's
single all-reduce; the answers must equal the single-device Hugging Face ``PatchedFFN`` model's.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here: `make test-vllm` installs it in .venv-vllm")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

from fastpatch import PatchedFFN, PatchFileError  # noqa: E402
from fastpatch.integrations.vllm import PatchUpdater, llm_kwargs  # noqa: E402

from .conftest import generate_texts, shutdown  # noqa: E402

PROMPTS = [[1, 17, 99, 4, 230], [1, 250, 3], [1, 42, 42, 42, 7, 8, 9], [1, 128]]
NEW_TOKENS = 8
LAYER = "model.layers.1.mlp"


def _hf_greedy(model: torch.nn.Module, prompts: list[list[int]]) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            for _ in range(NEW_TOKENS):
                nxt = model(ids).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            out.append(ids[0, len(p):].tolist())
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> SimpleNamespace:
    """A random 2-layer Llama on disk, a patch file with 7 patches for its last MLP (4 + 3 per
    rank), one with 4 of them, and the HF model's greedy tokens with each set and with none."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # well-separated logits: no greedy near-ties
    root = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(root / "model")
    base = _hf_greedy(model, PROMPTS)
    ffn = PatchedFFN.wrap(model, LAYER)
    ffn.add_patches(torch.randn(7, 256) / 16, torch.rand(7) * 0.2, torch.randn(7, 256) * 0.5)
    ffn.save(root / "seven.safetensors")
    seven = _hf_greedy(model, PROMPTS)
    ffn.remove(ffn.bank.ids[4:])
    ffn.save(root / "four.safetensors")
    four = _hf_greedy(model, PROMPTS)
    assert base != seven != four  # each patch set changes the answers
    return SimpleNamespace(dir=root / "model", seven=str(root / "seven.safetensors"), four=str(root / "four.safetensors"),
                           hf_base=base, hf_seven=seven, hf_four=four)


@pytest.fixture(scope="module")
def tp2(tiny):
    llm = LLM(**llm_kwargs(tiny.dir, patches=[tiny.seven]), tensor_parallel_size=2, dtype="float32",
              max_model_len=128, skip_tokenizer_init=True)
    yield llm
    shutdown(llm)


def _tokens(llm) -> list[list[int]]:
    sp = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_two_ranks_equal_the_single_device_patched_model(tp2, tiny) -> None:
    assert _tokens(tp2) == tiny.hf_seven


def test_each_rank_holds_its_slice_of_the_patches(tp2) -> None:
    ranks = PatchUpdater(tp2).status()
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    layers = [r["layers"][LAYER] for r in ranks]
    assert [x["local"] for x in layers] == [4, 3] and all(x["total"] == 7 for x in layers)
    row = (256 + 1 + 256) * 4  # key, bias, value in fp32
    assert [x["bytes"] for x in layers] == [4 * row, 3 * row]


def test_hot_update_and_rollback_on_two_ranks(tp2, tiny) -> None:
    upd = PatchUpdater(tp2)
    upd.load(tiny.four)
    assert [r["layers"][LAYER]["local"] for r in upd.status()] == [2, 2]
    assert _tokens(tp2) == tiny.hf_four
    upd.clear()
    assert _tokens(tp2) == tiny.hf_base
    upd.rollback()
    assert _tokens(tp2) == tiny.hf_four
    upd.rollback()
    assert _tokens(tp2) == tiny.hf_seven


def test_a_bad_file_changes_no_rank(tp2, tiny, tmp_path) -> None:
    from safetensors.torch import save_file

    from fastpatch import PatchBank

    tensors, meta = PatchBank.read_file(tiny.four)
    meta["fingerprint"] = "1" * 24
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    upd = PatchUpdater(tp2)
    before = upd.status()
    with pytest.raises(PatchFileError, match="different FFN weights"):
        upd.load(bad)
    assert upd.status() == before
    assert _tokens(tp2) == tiny.hf_seven


def test_smollm2_on_three_ranks_serves_the_real_edits(edited) -> None:
    llm = LLM(**llm_kwargs(edited.made.model_dir, patches=[edited.made.patch_file]), tensor_parallel_size=3,
              dtype="float32", max_model_len=512, enforce_eager=True)
    try:
        assert generate_texts(llm, edited.prompts) == edited.hf_all
        ranks = PatchUpdater(llm).status()
        locals_ = [r["layers"]["model.layers.29.mlp"]["local"] for r in ranks]
        assert sum(locals_) == edited.n_all and max(locals_) - min(locals_) <= 1
        PatchUpdater(llm).load(edited.fewer)
        assert generate_texts(llm, edited.prompts) == edited.hf_fewer
    finally:
        shutdown(llm)
