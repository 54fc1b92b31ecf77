"""The deep tail (fastpatch.editor.deep_tail): patching an FFN before the last layer of a
Llama-like model trains through the layers after it, re-run over every position, and computes
exactly what the model computes with the patches in place."""

from __future__ import annotations

import dataclasses
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from fastpatch.editor import Editor, EditError, EditorConfig, EditRequest, find_adapter
from fastpatch.editor.batch import SUBJECT
from fastpatch.editor.init import init_params
from fastpatch.editor.objective import final, label_logits, losses
from fastpatch.editor.training import _reconcile, _right_as_given, train_edit

from .test_editor import CORPUS, assert_value_points_downhill, word_tokenizer


def tiny_llama3() -> LlamaForCausalLM:
    """Three layers, so that layer 0's tail is two layers (layer 1's one)."""
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96 + 17, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _deep_editor(layer: int = 0, dtype: torch.dtype = torch.float64, **cfg) -> Editor:
    torch.manual_seed(0)
    ed = Editor(tiny_llama3().to(dtype), word_tokenizer(), EditorConfig(**cfg), module_path=f"model.layers.{layer}.mlp")
    ed.build_memory(CORPUS)
    return ed


def test_an_earlier_llama_mlp_gets_the_deep_tail_other_families_the_full_forward() -> None:
    model = tiny_llama3()
    ad = find_adapter(model, "model.layers.1.mlp")
    assert ad.deep and ad.fast_path and ad.tail_input == "model.layers.2" and ad.tail is None
    assert len(ad.seq_layers) == 1 and ad.seq_layers[0] is model.model.layers[2]
    assert not find_adapter(model, "model.layers.-1.mlp").deep  # the last MLP: the position-wise tail
    assert len(find_adapter(model, "model.layers.0.mlp").seq_layers) == 2
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=64))
    assert not find_adapter(gpt2, "transformer.h.0.mlp").fast_path  # no deep tail: the full forward
    # layers that attend differently (sliding window after full) cannot share one captured mask
    mixed = tiny_llama3()
    mixed.config.layer_types = ["full_attention", "full_attention", "sliding_attention"]
    assert not find_adapter(mixed, "model.layers.0.mlp").fast_path
    mixed.config.layer_types = ["sliding_attention", "full_attention", "full_attention"]
    assert find_adapter(mixed, "model.layers.0.mlp").deep


@pytest.mark.parametrize("layer,augment,loss_vocab", [(0, 0, 0), (0, 3, 0), (1, 2, 16)])
def test_deep_tail_equals_full_forward_losses_and_gradients(layer: int, augment: int, loss_vocab: int) -> None:
    """The deep tail (one capture, later layers re-run) and the generic path (a full forward per
    view and step) compute the same loss and gradients, with an earlier patch in place and
    context-prefixed views of different lengths (right padding)."""
    ed = _deep_editor(layer, augment=augment, augment_tokens=4, loss_vocab=loss_vocab)
    assert ed.handle.fast and ed.adapter.deep
    assert ed.edit(EditRequest("the capital of italy is", "rome", edit_id="first")).patch_ids
    batch = ed._prepare([EditRequest("the capital of peru is", "lima oslo")])
    assert len(batch.views) == 1 + augment
    batch.neurons = [(0, j) for j in range(len(batch.views[0].labels))]
    params = init_params(ed.handle, ed.config, ed.memory, batch, len(ed.edits))
    batch.cand = None  # the full forward scores the whole vocabulary
    deep, *_ = losses(ed.handle, ed.config, ed.memory, batch, params, full_forward=False)
    full, *_ = losses(ed.handle, ed.config, ed.memory, batch, params, full_forward=True)
    torch.testing.assert_close(deep, full, rtol=1e-5, atol=1e-6)
    g_deep = torch.autograd.grad(deep, list(params.values()))
    g_full = torch.autograd.grad(full, list(params.values()))
    for a, b in zip(g_deep, g_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_deep_tail_predictions_are_the_patched_models() -> None:
    """Logits at the label rows with trial patches equal the model's own with those patches added."""
    ed = _deep_editor(0, augment=2, augment_tokens=4)
    req = EditRequest("the capital of peru is", "lima oslo")
    batch = ed._prepare([req])
    batch.neurons = [(0, j) for j in range(len(batch.views[0].labels))]
    K, b, V = final({k: t.detach() for k, t in init_params(ed.handle, ed.config, ed.memory, batch, 0).items()})
    with torch.no_grad():
        got = label_logits(ed.handle, batch, K, b, V)
        start = 0
        for v in batch.views:
            with ed.ffn.training_patches(K, b, V):
                want = ed.model(**v.inputs).logits[0][v.label_pos]
            torch.testing.assert_close(got[start : start + len(want)], want)
            start += len(want)
        # and without new patches, the capture's own predictions
        none = label_logits(ed.handle, batch, K[:0], b[:0], V[:0]).argmax(-1)
    assert torch.equal(none.cpu(), torch.cat([c["pred"] for c in batch.cap]))


def test_deep_edits_hold_stay_silent_and_survive_save_load(tmp_path) -> None:
    ed = _deep_editor(0, dtype=torch.float32, augment=2, augment_tokens=4, max_steps=300)
    pairs = [("the capital of peru is", "lima"), ("the king of norway is", "rome"), ("oslo is in", "italy")]
    for k, (p, t) in enumerate(pairs):
        res = ed.edit(EditRequest(p, t, edit_id=f"e{k}"))
        assert res.success, res
    assert ed.check([p for p, _ in pairs], [t for _, t in pairs]) == [True] * len(pairs)
    assert float(ed.activations(CORPUS).max()) <= 0.0  # every patch silent on the memory corpus
    ed.save(tmp_path / "ed")
    torch.manual_seed(0)
    fresh = Editor.load(tmp_path / "ed", tiny_llama3(), word_tokenizer())
    assert fresh.adapter.deep and fresh.ffn.module_path == "model.layers.0.mlp"
    assert fresh.check([p for p, _ in pairs], [t for _, t in pairs]) == [True] * len(pairs)


def test_deep_gradient_value_init_points_the_value_downhill() -> None:
    assert_value_points_downhill(_deep_editor(0, augment=2, augment_tokens=4, value_init="gradient", loss_vocab=0))


def test_subject_key_reads_the_subjects_last_token_in_every_view() -> None:
    ed = _deep_editor(0, dtype=torch.float32, augment=2, augment_tokens=4, key_position="subject", max_steps=300)
    req = EditRequest("the capital of peru is", "lima", subject="peru", edit_id="p")
    batch = ed._prepare([req])
    assert batch.neurons == [(0, SUBJECT)]  # one neuron per request
    assert len(batch.views) == 3 and batch.key_pos is not None
    for k, (v, pos) in enumerate(zip(batch.views, batch.key_pos)):
        ids = v.inputs["input_ids"][0].tolist()
        assert ed.tokenizer.convert_ids_to_tokens(ids[pos]) == "peru"
        assert torch.equal(batch.neuron_inputs(0)[k], batch.cap[k]["x"][pos].float())
    two = ed._prepare([EditRequest("the capital of peru is", "lima oslo", subject="peru")])
    assert two.neurons == [(0, SUBJECT)]  # one neuron per request, however many target tokens
    res = ed.edit(req)
    assert res.success and res.n_neurons == 1
    assert ed.check(["the capital of peru is"], ["lima"]) == [True]
    # the patch reads the subject: it fires there, on the request as given, and stays silent on
    # the memory corpus
    acts = ed.ffn.patch_activations(ed.ffn_inputs(["the capital of peru is"])[0])[:, 0]
    assert float(acts[3]) > 0 and float(ed.activations(CORPUS).max()) <= 0.0
    # without the subject in the prompt, the paper's last-token key
    other = ed._prepare([EditRequest("the king of norway is", "rome", subject="oslo")])
    assert other.key_pos is None


def test_subject_key_needs_an_earlier_layer() -> None:
    torch.manual_seed(0)
    with pytest.raises(EditError, match="key_position='subject' needs"):
        Editor(tiny_llama3(), word_tokenizer(), EditorConfig(key_position="subject"))
    with pytest.raises(EditError, match="key_position must be one of"):
        EditorConfig(key_position="first")


def test_both_keys_add_a_subject_neuron_to_the_last_token_ones() -> None:
    ed = _deep_editor(0, dtype=torch.float32, augment=1, augment_tokens=4, key_position="both", max_steps=300)
    req = EditRequest("the capital of peru is", "lima oslo", subject="peru", edit_id="p")
    batch = ed._prepare([req])
    assert batch.neurons[-1] == (0, SUBJECT) and len(batch.neurons) >= 2
    assert all(j >= 0 for _, j in batch.neurons[:-1])  # the wrong target positions, read before them
    for n, (_, j) in enumerate(batch.neurons):
        for k, v in enumerate(batch.groups[0]):
            pos = batch.key_pos[v] if j == SUBJECT else int(batch.views[v].label_pos[j])
            assert torch.equal(batch.neuron_inputs(n)[k], batch.cap[v]["x"][pos].float())
    res = ed.edit(EditRequest("the capital of peru is", "lima", subject="peru", edit_id="q"))
    assert res.success and res.n_neurons == 2
    with pytest.raises(ValueError, match="no subject position"):
        batch.key_pos = None
        batch.neuron_inputs(len(batch.neurons) - 1)


def test_both_keys_each_kind_of_neuron_is_trained_to_fix_the_edit_alone() -> None:
    """With key_position="both" each kind of neuron is initialised and trained on its own: the
    subject neuron alone, and the last-token neurons alone, make the edit right."""
    ed = _deep_editor(0, dtype=torch.float32, augment=2, augment_tokens=4, key_position="both", max_steps=300)
    batch = ed._prepare([EditRequest("the capital of peru is", "lima", subject="peru")])
    params, steps, _, ok, keep = train_edit(ed.handle, ed.config, ed.memory, batch, 0)
    assert ok == [True] and all(keep) and params["keys"].shape[0] == len(batch.neurons)
    subj = torch.tensor([j == SUBJECT for _, j in batch.neurons])
    assert subj.any() and (~subj).any()
    for keep in (subj, ~subj):
        alone = dict(params, amp=params["amp"] * keep[:, None].float())
        assert losses(ed.handle, ed.config, ed.memory, batch, alone, False, with_memory=False).main_ok == [True]


def test_both_keys_a_subject_neuron_that_cannot_stay_silent_is_dropped_and_the_edit_still_succeeds() -> None:
    """When the subject kind cannot hold its memory margins (here the memory holds the very
    vectors its key reads), the request succeeds on its last-token neurons and commits only
    them; with the subject's vectors absent, both kinds are committed."""
    req = EditRequest("the capital of peru is", "lima", subject="peru")
    for blocked in (False, True):
        ed = _deep_editor(0, dtype=torch.float32, augment=2, augment_tokens=4, key_position="both", max_steps=300)
        batch = ed._prepare([req])
        if blocked:
            ed.memory.add(torch.stack([batch.cap[v]["x"][batch.key_pos[v]] for v in batch.groups[0]]))
        res = ed.edit(dataclasses.replace(req, edit_id="p"))
        assert res.success and res.n_neurons == len(batch.neurons) >= 2
        assert len(res.patch_ids) == res.n_neurons - blocked
        assert ed.model(**ed.tokenizer("the capital of peru is", return_tensors="pt")).logits[0, -1].argmax() \
            == ed.tokenizer("lima")["input_ids"][0]


def test_both_keys_kinds_that_overshoot_together_are_reconciled() -> None:
    """Two kinds each right alone can be wrong together (the tail is not linear): ``_reconcile``
    leaves a right sum alone, and where the sum is wrong (here a subject value turned round and
    scaled a hundredfold) it drops the subject neuron, restores the amplifiers and the request is right."""
    ed = _deep_editor(0, dtype=torch.float32, augment=2, augment_tokens=4, key_position="both", max_steps=300)
    batch = ed._prepare([EditRequest("the capital of peru is", "lima", subject="peru")])
    params, _, _, ok, keep = train_edit(ed.handle, ed.config, ed.memory, batch, 0)
    assert ok == [True] and all(keep)
    before = params["amp"].clone()
    _reconcile(ed.handle, ed.config, ed.memory, batch, params, keep)
    assert all(keep) and torch.equal(params["amp"], before)
    subj = torch.tensor([j == SUBJECT for _, j in batch.neurons])
    params["amp"][subj] *= -100.0
    assert _right_as_given(ed.handle, ed.config, ed.memory, batch, params, keep) == [False]
    blown = params["amp"].clone()
    _reconcile(ed.handle, ed.config, ed.memory, batch, params, keep)
    assert keep == [not s for s in subj.tolist()] and torch.equal(params["amp"], blown)
    assert _right_as_given(ed.handle, ed.config, ed.memory, batch, params, keep) == [True]
