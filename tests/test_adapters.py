"""Family adapters (fastpatch.editor.adapters) and the per-task encoders they own
(fastpatch.editor.encoding): where the FFN is, that the tail is exactly what the model computes
after the patched FFN, and how each task turns a request into inputs and label positions."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from fastpatch.editor import EditError, EditRequest, find_adapter
from fastpatch.editor.encoding import CausalEncoder, encoder_for
from fastpatch.ffn import UnknownLayoutError, resolve_module

from .tiny_models import TINY, model_inputs

TASKS = {"llama": "causal", "gpt2": "causal", "bert": "mlm", "t5": "seq2seq", "bart": "seq2seq"}


def _tiny_classifier() -> torch.nn.Module:
    cfg = BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=113, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("name", sorted(TINY))
def test_adapter_finds_the_last_ffn_and_its_task(name: str) -> None:
    model = TINY[name][0]()
    ad = find_adapter(model)
    assert ad.task == TASKS[name] and ad.fast_path
    assert resolve_module(model, ad.ffn_path)[1] == resolve_module(model, TINY[name][1])[1]
    assert ad.encoder is encoder_for(ad.task) and ad.encoder.task == ad.task


@pytest.mark.parametrize("name", sorted(TINY))
def test_tail_is_what_the_model_computes_after_the_ffn(name: str) -> None:
    torch.manual_seed(0)
    model = TINY[name][0]().double()
    ad = find_adapter(model)
    got = {}
    hook = resolve_module(model, ad.tail_input)[0].register_forward_pre_hook(lambda m, a: got.update(s0=a[0]))
    try:
        with torch.no_grad():
            logits = model(**model_inputs(name)).logits
    finally:
        hook.remove()
    with torch.no_grad():
        torch.testing.assert_close(ad.tail(got["s0"]), logits)


def test_classifier_adapter_reads_the_cls_position() -> None:
    torch.manual_seed(0)
    model = _tiny_classifier().double()
    ad = find_adapter(model)
    assert (ad.family, ad.task, ad.fast_path) == ("bert", "cls", True)
    got = {}
    hook = resolve_module(model, ad.tail_input)[0].register_forward_pre_hook(lambda m, a: got.update(s0=a[0]))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
    hook.remove()
    torch.testing.assert_close(ad.tail(got["s0"][:, 0]), logits)


def test_unknown_family_and_other_ffn_paths() -> None:
    model = TINY["llama"][0]()
    model.config.model_type = "mystery"
    with pytest.raises(UnknownLayoutError, match="Supported families"):
        find_adapter(model)
    generic = find_adapter(model, "model.layers.-1.mlp")  # a path: the generic, full-forward adapter
    assert (generic.family, generic.task, generic.fast_path) == ("mystery", "causal", False)
    # a known family, but not its last FFN: the tail no longer starts right after it. A Llama-like
    # model gets the deep tail (tests/test_deep_tail.py), GPT-2 the full forward.
    other = find_adapter(TINY["llama"][0](), "model.layers.0.mlp")
    assert other.ffn_path == "model.layers.0.mlp" and other.deep and other.tail is None
    other = find_adapter(TINY["gpt2"][0](), "transformer.h.0.mlp")
    assert other.ffn_path == "transformer.h.0.mlp" and not other.fast_path


def test_encoders_per_task() -> None:
    assert CausalEncoder.target_text("The capital is", "Lima") == " Lima"
    assert CausalEncoder.target_text("The capital is ", "Lima") == "Lima"
    assert CausalEncoder.target_text("The capital is", " Lima") == " Lima"
    assert encoder_for("cls").request("a claim", "1") == EditRequest("a claim", label=1)
    assert encoder_for("causal").request("p", " t") == EditRequest("p", target=" t")
    assert [encoder_for(t).generative for t in ("causal", "seq2seq", "mlm", "cls")] == [True, True, False, False]
    assert [encoder_for(t).augments for t in ("causal", "seq2seq", "mlm", "cls")] == [True, False, False, False]
    assert encoder_for("cls").label_smoothing(0.1) == 0.0 and encoder_for("causal").label_smoothing(0.1) == 0.1
    logits = torch.randn(5, 7)
    assert encoder_for("cls").rows(logits[0], None).shape == (1, 7)
    with pytest.raises(EditError, match="unsupported task"):
        encoder_for("vision")
