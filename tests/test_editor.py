"""The T-Patcher editor on tiny models built from configs (random weights, real code paths)."""

from __future__ import annotations

import copy

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

from fastpatch.editor import Editor, EditError, EditorConfig, EditRequest
from fastpatch.editor.init import init_params
from fastpatch.editor.objective import final, losses
from fastpatch.ffn import UnknownLayoutError

from .tiny_models import TINY

WORDS = ("the capital of is a an in on city country river paris rome lima oslo peru norway france italy "
         "what who where which language currency spoken river mountain red green blue one two three four "
         "five six seven eight nine ten").split()


def word_tokenizer(mask: bool = False) -> PreTrainedTokenizerFast:
    """A real word-level tokenizer over a small vocabulary (ids < 97, the tiny models' vocab)."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", eos_token="</s>")


CORPUS = ["the river of norway is red", "what language is spoken in peru", "the currency of italy is one",
          "who is in rome", "two three four five six", "the mountain in france is blue", "a city on a river"]


def _editor(name: str = "llama", **cfg) -> Editor:
    torch.manual_seed(0)
    model = TINY[name][0]()
    cfg.setdefault("max_steps", 300)
    ed = Editor(model, word_tokenizer(), EditorConfig(**cfg))
    ed.build_memory(CORPUS)
    return ed


def _logits(ed: Editor, text: str) -> torch.Tensor:
    ids = ed.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return ed.model(input_ids=ids).logits


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_edit_fixes_the_mistake_and_keeps_memory_silent(name: str) -> None:
    ed = _editor(name)
    req = EditRequest("the capital of peru is", "lima", edit_id="peru")
    assert ed.check([req.prompt], [req.target]) == [False]
    before_other = {t: _logits(ed, t) for t in CORPUS}
    res = ed.edit(req)
    assert res.success and res.n_neurons == 1 and len(res.patch_ids) == 1
    assert ed.check([req.prompt], [req.target]) == [True]
    # the patch is exactly silent on the memory corpus: those outputs are bit for bit unchanged
    for t, lg in before_other.items():
        assert torch.equal(_logits(ed, t), lg)
    assert ed.activations(CORPUS).max() == 0
    assert ed.activations([req.prompt])[0, 0] > 0


def test_multi_token_target_gets_one_neuron_per_wrong_position_capped() -> None:
    ed = _editor("llama", max_neurons=2)
    res = ed.edit(EditRequest("the capital of norway is", "oslo city river red", edit_id="n"))
    assert res.n_neurons == 2  # 4 target tokens, the model gets (nearly) all wrong; cap is 2
    ed2 = _editor("llama", max_neurons=5)
    res2 = ed2.edit(EditRequest("the capital of norway is", "oslo city river", edit_id="n"))
    assert res2.success and ed2.check(["the capital of norway is"], ["oslo city river"]) == [True]
    assert res2.n_neurons == len(ed2.ffn.bank.ids_for_edit("n")) >= 2


def test_sequential_edits_rollback_and_retention() -> None:
    ed = _editor("llama")
    reqs = [EditRequest("the capital of peru is", "lima", edit_id="a"),
            EditRequest("the capital of norway is", "oslo", edit_id="b"),
            EditRequest("the capital of italy is", "rome", edit_id="c")]
    for r in reqs:
        assert ed.edit(r).success
    assert ed.check([r.prompt for r in reqs], [r.target for r in reqs]) == [True, True, True]
    n_mem = len(ed.memory)
    ed.rollback("b")
    assert ed.check([r.prompt for r in reqs], [r.target for r in reqs]) == [True, False, True]
    assert len(ed.memory) < n_mem and "b" not in ed.edits
    with pytest.raises(KeyError, match="unknown edit id"):
        ed.rollback("b")


def test_edit_batch_trains_requests_jointly_each_with_own_neurons() -> None:
    ed = _editor("gpt2")
    reqs = [EditRequest("the capital of peru is", "lima", edit_id="p"),
            EditRequest("the capital of norway is", "oslo", edit_id="n")]
    res = ed.edit_batch(reqs)
    assert [r.success for r in res] == [True, True]
    assert set(ed.ffn.bank.ids_for_edit("p")).isdisjoint(ed.ffn.bank.ids_for_edit("n"))
    assert ed.check([r.prompt for r in reqs], [r.target for r in reqs]) == [True, True]


def _state(ed: Editor):
    return (ed.ffn.bank.keys.clone(), ed.ffn.bank.ids, len(ed.memory), dict(ed.edits),
            [p.detach().clone() for p in ed.model.parameters()])


def _same_state(a, b) -> bool:
    return (torch.equal(a[0], b[0]) and a[1:4] == b[1:4] and all(torch.equal(x, y) for x, y in zip(a[4], b[4])))


def test_failed_edit_leaves_model_untouched_unless_kept() -> None:
    ed = _editor("llama", max_steps=1, init="authors")
    before = _state(ed)
    res = ed.edit(EditRequest("the capital of peru is", "lima", edit_id="x"))
    assert not res.success and res.patch_ids == []
    assert _same_state(_state(ed), before)
    ed_keep = _editor("llama", max_steps=1, init="authors", keep_failed=True)
    res = ed_keep.edit(EditRequest("the capital of peru is", "lima", edit_id="x"))
    assert not res.success and res.kept_failed and len(res.patch_ids) == 1


def test_exception_mid_edit_leaves_model_untouched(monkeypatch) -> None:
    ed = _editor("llama", init="authors", value_init="random")  # trains for many steps
    ed.edit(EditRequest("the capital of italy is", "rome", edit_id="ok"))
    before = _state(ed)
    calls = {"n": 0}
    real = torch.optim.Adam.step

    def exploding_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash in the middle of training")
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", exploding_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ed.edit(EditRequest("the capital of peru is", "lima", edit_id="boom"))
    assert _same_state(_state(ed), before)
    assert ed.ffn._trainable is None


def test_exception_while_committing_a_batch_rolls_back_the_committed_part(monkeypatch) -> None:
    ed = _editor("gpt2")
    before = _state(ed)
    real_add = type(ed.ffn).add_patches
    calls = {"n": 0}

    def failing_add(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk full while committing")
        return real_add(self, *a, **k)

    monkeypatch.setattr(type(ed.ffn), "add_patches", failing_add)
    with pytest.raises(RuntimeError, match="disk full"):
        ed.edit_batch([EditRequest("the capital of peru is", "lima", edit_id="p"),
                       EditRequest("the capital of norway is", "oslo", edit_id="n")])
    assert calls["n"] == 2  # the first request had been committed, then undone
    assert _same_state(_state(ed), before)


@pytest.mark.parametrize(
    "req,match",
    [
        (EditRequest("", "lima"), "empty prompt"),
        (EditRequest("   ", "lima"), "empty prompt"),
        (EditRequest("the capital of peru is", ""), "empty target"),
        (EditRequest("the capital of peru is", None), "empty target"),
        (EditRequest(" ".join(["the"] * 80), "lima"), "longer than the model's context"),
    ],
)
def test_bad_requests_rejected_before_touching_anything(req: EditRequest, match: str) -> None:
    ed = _editor("llama")
    before = _state(ed)
    with pytest.raises(EditError, match=match):
        ed.edit(req)
    assert _same_state(_state(ed), before)


def test_target_that_tokenizes_to_nothing_is_rejected() -> None:
    ed = _editor("llama")
    # like many real tokenizers, this one's normalizer drops zero-width characters
    ed.tokenizer.backend_tokenizer.normalizer = normalizers.Replace("\u200b", "")
    before = _state(ed)
    with pytest.raises(EditError, match="tokenizes to no tokens"):
        ed.edit(EditRequest("the capital of peru is", "\u200b"))
    assert _same_state(_state(ed), before)


@pytest.mark.parametrize(
    "kw,match",
    [({"alc": -1.0}, "alc"), ({"mlc": float("nan")}, "NaN"), ({"lr": 0.0}, "lr"), ({"init": "magic"}, "init"),
     ({"value_init": "zeros"}, "value_init"), ({"augment": 99}, "augment"), ({"augment": -1}, "augment")],
)
def test_bad_config_rejected(kw, match: str) -> None:
    with pytest.raises(EditError, match=match):
        EditorConfig(**kw)


def test_empty_memory_corpus_rejected() -> None:
    ed = Editor(TINY["llama"][0](), word_tokenizer())
    with pytest.raises(EditError, match="memory corpus is empty"):
        ed.build_memory(["", "  "])


def test_unknown_model_layout_lists_families() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(UnknownLayoutError, match="Supported families: llama"):
        Editor(model, word_tokenizer())


def test_classifier_label_out_of_range_and_cls_edit() -> None:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=113,
                     max_position_embeddings=64, num_labels=2)
    model = BertForSequenceClassification(cfg).eval()
    ed = Editor(model, word_tokenizer(), EditorConfig(mlc=5.0, max_steps=300))
    ed.build_memory(CORPUS)
    with pytest.raises(EditError, match="out of range"):
        ed.edit(EditRequest("the capital of peru is lima", label=2))
    text = "the capital of peru is lima"
    wrong = 1 - ed.predict_tokens([text], [0])[0][0]
    res = ed.edit(EditRequest(text, label=wrong, edit_id="c"))
    assert res.success and res.n_neurons == 1
    assert ed.check([text], [wrong]) == [True]


@pytest.mark.parametrize("name,augment", [("llama", 0), ("llama", 3), ("gpt2", 2), ("bert", 0), ("t5", 0), ("bart", 0)])
def test_fast_path_equals_full_forward_losses_and_gradients(name: str, augment: int) -> None:
    """The fast path (tail only) and the generic path (full forward) compute the same step,
    with context-prefixed views too."""
    torch.manual_seed(0)
    model = TINY[name][0]().double()
    tok = word_tokenizer()
    ed = Editor(model, tok, EditorConfig(augment=augment, augment_tokens=4))
    ed.build_memory(CORPUS)
    ed.edit(EditRequest(*(("the capital of [MASK] is", "peru") if name == "bert" else ("the capital of italy is", "rome")),
                        edit_id="first"))  # an existing patch must be part of s0 too
    assert ed.adapter.fast_path
    req = EditRequest("the capital of [MASK] is" if name == "bert" else "the capital of peru is",
                      "norway" if name == "bert" else "lima oslo")
    batch = ed._prepare([req])
    assert len(batch.views) == 1 + augment
    batch.neurons = [(0, j) for j in range(len(batch.views[0].labels))]
    params = init_params(ed.handle, ed.config, ed.memory, batch, len(ed.edits))
    fast, info_f, *_ = losses(ed.handle, ed.config, ed.memory, batch, params, full_forward=False)
    full, info_s, *_ = losses(ed.handle, ed.config, ed.memory, batch, params, full_forward=True)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)  # params train in fp32
    g_fast = torch.autograd.grad(fast, list(params.values()))
    g_full = torch.autograd.grad(full, list(params.values()))
    for a, b in zip(g_fast, g_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_batched_capture_matches_one_forward_per_view(name: str) -> None:
    """The right-padded capture that stops at the tail records what a full forward per view does."""
    torch.manual_seed(0)
    ed = Editor(TINY[name][0]().double(), word_tokenizer(), EditorConfig(augment=3, augment_tokens=5))
    views = [ed._encode(EditRequest(p, t)) for p, t in
             [("the capital of peru is", "lima oslo"), ("rome", "paris"), ("the king of norway is a", "man")]]
    views += ed._augmented(EditRequest("the capital of peru is", "lima"))
    assert len(views) == 6 and len({v.inputs["input_ids"].shape[1] for v in views}) > 1  # padding happens
    offsets, _ = ed.capturer.prefix_offsets(views)
    assert all(c > 0 for c in offsets[3:])  # the prefixed views run from the prefix cache
    batched = ed.capturer.capture_all(views, ed.config.loss_vocab)
    assert ed.capturer.cache_ok is True  # checked against a plain forward on first use
    for v, got in zip(views, batched):
        one = ed.capturer.capture_one(v)
        torch.testing.assert_close(got["x"], one["x"])
        torch.testing.assert_close(got["s0"], one["s0"])
        assert torch.equal(got["pred"], one["pred"])


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_prefix_cache_that_disagrees_with_a_plain_forward_is_dropped(name: str, caplog) -> None:
    torch.manual_seed(0)
    ed = Editor(TINY[name][0](), word_tokenizer(), EditorConfig(augment=2, augment_tokens=4))
    req = EditRequest("the capital of peru is", "lima")
    views = [ed._encode(req)] + ed._augmented(req)
    plain = ed.capturer.capture_plain(views, [v.inputs["input_ids"][0] for v in views])
    _, states = ed.capturer.prefix_offsets(views)
    for st in {id(s): s for s in states if s is not None}.values():  # a cache gone wrong
        st.kv = [(k + 1.0, v) for k, v in st.kv]
    with caplog.at_level("WARNING", logger="fastpatch.editor"):
        got = ed.capturer.capture_all(views, ed.config.loss_vocab)
    assert ed.capturer.cache_ok is False and "prefix cache disagrees" in caplog.text
    for c, x, s0 in zip(got, *plain):
        assert torch.equal(c["x"], x) and torch.equal(c["s0"], s0)
    assert ed.capturer.prefix_offsets(views)[0] == [0] * len(views)  # no longer used


def test_prefix_cache_is_independent_of_the_patches() -> None:
    """Cached prefix states stay valid across edits: the patched FFN is the last layer's."""
    torch.manual_seed(0)
    ed = Editor(TINY["llama"][0]().double(), word_tokenizer(), EditorConfig(augment=2, augment_tokens=4, max_steps=300))
    ed.build_memory(CORPUS)
    assert ed.edit(EditRequest("the capital of peru is", "lima", edit_id="p")).success
    assert ed.capturer.states and ed.capturer.cache_ok is True
    assert ed.ffn.num_patches > 0
    req = EditRequest("the capital of italy is", "rome")
    views = [ed._encode(req)] + ed._augmented(req)
    cached = ed.capturer.capture_all(views, ed.config.loss_vocab)
    for v, got in zip(views, cached):
        one = ed.capturer.capture_one(v)  # a full forward through the patched model
        torch.testing.assert_close(got["x"], one["x"])
        torch.testing.assert_close(got["s0"], one["s0"])
        assert torch.equal(got["pred"], one["pred"])


def test_context_prefixes_are_generated_once_and_saved(tmp_path) -> None:
    torch.manual_seed(0)
    base = TINY["llama"][0]()
    clean = copy.deepcopy(base)
    ed = Editor(base, word_tokenizer(), EditorConfig(augment=2, augment_tokens=3, max_steps=300))
    assert Editor(copy.deepcopy(clean), word_tokenizer(), EditorConfig(augment=0)).context_prefixes() == []
    prefixes = ed.context_prefixes()
    assert len(prefixes) == 2 and all(p.endswith(". ") for p in prefixes)
    assert prefixes[0].startswith("The") and prefixes[1].startswith("Therefore")
    ed.build_memory(CORPUS)
    res = ed.edit(EditRequest("the capital of peru is", "lima", edit_id="p"))
    assert res.success
    assert ed.context_prefixes() is not None and ed.context_prefixes() == prefixes  # not regenerated
    ed.save(tmp_path / "ed")
    ed2 = Editor.load(tmp_path / "ed", clean, word_tokenizer())
    assert ed2.prefixes == prefixes


def test_save_load_restores_edits_in_a_fresh_model(tmp_path) -> None:
    ed = _editor("llama")
    fresh = copy.deepcopy(ed.ffn.ffn)  # keep base FFN weights to rebuild an identical fresh model
    del fresh
    torch.manual_seed(0)
    base = TINY["llama"][0]()
    clean = copy.deepcopy(base)
    ed = Editor(base, word_tokenizer(), EditorConfig(max_steps=300))
    ed.build_memory(CORPUS)
    ed.edit(EditRequest("the capital of peru is", "lima", edit_id="p"))
    ed.save(tmp_path / "ed")
    ed2 = Editor.load(tmp_path / "ed", clean, word_tokenizer())
    assert ed2.check(["the capital of peru is"], ["lima"]) == [True]
    assert len(ed2.memory) == len(ed.memory) and ed2.edits.keys() == ed.edits.keys()
    with torch.no_grad():
        ids = ed.tokenizer("the capital of peru is", return_tensors="pt")["input_ids"]
        assert torch.equal(ed.model(input_ids=ids).logits, ed2.model(input_ids=ids).logits)
    ed2.rollback("p")
    assert ed2.check(["the capital of peru is"], ["lima"]) == [False]
    with pytest.raises(EditError, match="not a saved fastpatch editor"):
        Editor.load(tmp_path / "missing", copy.deepcopy(clean), word_tokenizer())


def test_edit_inside_no_grad_context_still_trains() -> None:
    ed = _editor("llama", init="authors", value_init="random")
    with torch.no_grad():
        res = ed.edit(EditRequest("the capital of peru is", "lima", edit_id="ng"))
    assert res.success and res.steps > 0


@pytest.mark.parametrize("value_init", ["unembed", "gradient"])
def test_augmented_edit_holds_behind_every_context_prefix(value_init: str) -> None:
    """With context variants (and patience to make them all right), the edit holds behind every
    generated prefix, not only on the prompt as given; without them it need not."""
    prompt, target = "the capital of peru is", "lima"
    ed = _editor(augment=3, augment_tokens=4, augment_patience=300, value_init=value_init)
    variants = [p + prompt for p in ed.context_prefixes()]
    assert ed.check(variants, [target] * 3) != [True] * 3  # the model does not know it yet
    res = ed.edit(EditRequest(prompt, target, edit_id="p"))
    assert res.success and ed.check([prompt], [target]) == [True]
    assert ed.check(variants, [target] * 3) == [True] * 3
    # memory margins still hold for the new neurons
    pids = res.patch_ids
    acts = ed.activations(CORPUS)[:, [ed.ffn.bank.ids.index(p) for p in pids]]
    assert float(acts.max()) == 0.0


def test_gradient_value_init_points_the_value_downhill() -> None:
    """The "gradient" value direction lowers the edit loss to first order, for every neuron."""
    assert_value_points_downhill(_editor(augment=2, augment_tokens=4, value_init="gradient"))


def assert_value_points_downhill(ed: Editor) -> None:
    """The value init of an edit of "lima oslo" lowers its edit loss to first order (shared with
    tests/test_deep_tail.py)."""
    batch = ed._prepare([EditRequest("the capital of peru is", "lima oslo")])
    assert batch.neurons
    params = init_params(ed.handle, ed.config, ed.memory, batch, len(ed.edits))
    k, b, v = final({k: t.detach() for k, t in params.items()})
    zero = {"keys": k, "bias": b, "v_dir": torch.zeros_like(v), "amp": params["amp"].detach()}
    base, *_ = losses(ed.handle, ed.config, ed.memory, batch, zero, False, with_memory=False)
    small = {"keys": k, "bias": b, "v_dir": params["v_dir"].detach(), "amp": torch.full_like(params["amp"], 1e-3)}
    nudged, *_ = losses(ed.handle, ed.config, ed.memory, batch, small, False, with_memory=False)
    assert float(nudged.detach()) < float(base.detach())


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5", "bart"])
def test_adapter_head_split_matches_tail(name: str) -> None:
    """``head(features(s), idx)`` is the tail's logits, restricted to the rows ``idx``."""
    torch.manual_seed(0)
    ed = Editor(TINY[name][0]().double(), word_tokenizer(), EditorConfig())
    s = torch.randn(5, ed.ffn.bank.d_out, dtype=torch.float64)
    full = ed.adapter.tail(s)
    torch.testing.assert_close(ed.adapter.head(ed.adapter.features(s), None), full)
    idx = torch.tensor([3, 17, 18, 96])
    torch.testing.assert_close(ed.adapter.head(ed.adapter.features(s), idx), full[:, idx])


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_candidate_loss_is_the_full_loss_when_it_covers_the_vocabulary(name: str) -> None:
    torch.manual_seed(0)
    ed = Editor(TINY[name][0]().double(), word_tokenizer(), EditorConfig(loss_vocab=16, augment=0))
    ed.build_memory(CORPUS)
    batch = ed._prepare([EditRequest("the capital of peru is", "lima oslo")])
    assert batch.cand is not None and 0 < len(batch.cand) < 97  # a real subset
    params = init_params(ed.handle, ed.config, ed.memory, batch, len(ed.edits))
    sub, *_ = losses(ed.handle, ed.config, ed.memory, batch, params, False)
    batch.set_candidates(torch.arange(97))
    whole, *_ = losses(ed.handle, ed.config, ed.memory, batch, params, False)
    batch.cand = None
    ref, *_ = losses(ed.handle, ed.config, ed.memory, batch, params, False)
    torch.testing.assert_close(whole, ref)
    assert not torch.allclose(sub, ref)  # the subset softmax is a different (cheaper) loss


def test_candidate_loss_success_is_decided_over_the_whole_vocabulary() -> None:
    """Every reported success is a real one: the edit's target is the full-vocabulary argmax."""
    ed = _editor("llama", loss_vocab=16, augment=0)
    pairs = [("the capital of peru is", "lima oslo"), ("the king of norway is", "rome"),
             ("a b c d", "peru lima"), ("oslo is in", "italy")]
    for k, (p, t) in enumerate(pairs):
        res = ed.edit(EditRequest(p, t, edit_id=f"e{k}"))
        assert res.success == ed.check([p], [t])[0]
    assert sum(ed.check([p for p, _ in pairs], [t for _, t in pairs])) >= 3
