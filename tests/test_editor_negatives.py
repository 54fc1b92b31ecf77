"""Hard negatives, memory growth and the scoring methods of the editor, on a tiny Llama with a
real word-level tokenizer."""

from __future__ import annotations

import math

import pytest
import torch

from fastpatch.editor import EditError, EditorConfig, EditRequest
from fastpatch.editor.scoring import answer_starts

from .test_editor import _editor


def _req(subject: str, target: str = "lima", edit_id: str | None = None) -> EditRequest:
    return EditRequest(f"the capital of {subject} is", target, edit_id=edit_id or subject, subject=subject,
                       ground_truth="oslo")


def test_negatives_are_the_prompt_about_other_subjects_from_the_pool() -> None:
    ed = _editor("llama", negatives=2, augment=0)
    assert ed._negatives([_req("peru")]) is None  # empty pool: nothing to swap in
    ed.subjects = ["norway", "italy", "france"]
    neg = ed._negatives([_req("peru")])
    # two negatives, each read from its last prompt token on: "the capital of X is" + " oslo"
    # (the ground truth) -> rows at "is" and "oslo"
    assert neg is not None and neg.shape == (4, ed.ffn.bank.d_in)
    texts = [f"the capital of {s} is oslo" for s in ("norway", "italy", "france")]
    rows = [x[-2:] for x in ed.ffn_inputs(texts)]
    assert all(any(torch.allclose(neg[i : i + 2], r.float()) for r in rows) for i in (0, 2))
    # a request whose subject is not in its prompt, or without one, gets none
    assert ed._negatives([EditRequest("the capital of peru is", "lima", subject="rome")]) is None
    assert ed._negatives([EditRequest("the capital of peru is", "lima")]) is None


def test_negatives_join_the_memory_loss_and_the_patch_stays_silent_on_them() -> None:
    ed = _editor("llama", negatives=3, augment=0)
    for s in ("norway", "italy", "france"):
        ed.subjects.append(s)
    before = ed.activations(["the capital of norway is oslo"]).shape[1]
    res = ed.edit(_req("peru"))
    assert res.success and before == 0
    # silent where the negatives were read: from the last prompt token on
    rows = torch.cat([x[-2:] for x in ed.ffn_inputs([f"the capital of {s} is oslo" for s in ("norway", "italy", "france")])])
    act = ed.ffn.patch_activations(rows)
    assert act.shape == (6, res.n_neurons) and float(act.max()) <= 0.0
    assert ed.subjects[-1] == "peru"  # the pool grows with every request naming its subject
    # without negatives the same edit's patch is not asked to stay silent there (memory only)
    plain = _editor("llama", negatives=0, augment=0)
    plain.subjects = list(ed.subjects[:-1])
    assert plain._negatives([_req("peru")]) is None


def test_memory_growth_policies() -> None:
    sizes = {}
    for growth in ("all", "labels", "none"):
        ed = _editor("llama", memory_growth=growth, augment=0)
        n0 = len(ed.memory)
        res = ed.edit(_req("peru"))
        assert res.success
        sizes[growth] = len(ed.memory) - n0
    prompt_len = len(_editor("llama").tokenizer("the capital of peru is lima")["input_ids"]) - 1
    assert sizes == {"all": prompt_len, "labels": 1, "none": 0}
    with pytest.raises(EditError, match="memory_growth"):
        EditorConfig(memory_growth="some")


def test_subject_pool_is_saved_and_restored(tmp_path) -> None:
    from fastpatch.editor import Editor

    from .test_editor import word_tokenizer
    from .tiny_models import TINY

    ed = _editor("llama", negatives=2, augment=0)
    ed.subjects = ["norway", "italy"]
    assert ed.edit(_req("peru")).success
    ed.save(tmp_path / "ed")
    torch.manual_seed(0)
    back = Editor.load(tmp_path / "ed", TINY["llama"][0](), word_tokenizer())
    assert back.subjects == ["norway", "italy", "peru"]
    assert back.config.negatives == 2


def test_target_logprobs_and_perplexity_match_a_plain_forward() -> None:
    ed = _editor("llama")
    tok = ed.tokenizer
    got = ed.target_logprobs(["the capital of peru is", "who is in"], ["lima city", "rome"], batch_size=2)
    for (p, t), lp in zip([("the capital of peru is", "lima city"), ("who is in", "rome")], got):
        p_ids = tok(p)["input_ids"]
        t_ids = tok(" " + t, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + t_ids])
        with torch.no_grad():
            logp = torch.log_softmax(ed.model(input_ids=ids).logits[0].float(), -1)
        want = sum(float(logp[len(p_ids) - 1 + k, t_ids[k]]) for k in range(len(t_ids))) / len(t_ids)
        assert lp == pytest.approx(want, abs=1e-5)
    texts = ["the river of norway is red", "two three four"]
    nll, n = 0.0, 0
    for t in texts:
        ids = torch.tensor([tok(t)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(ed.model(input_ids=ids).logits[0].float(), -1)
        nll -= float(logp[:-1].gather(-1, ids[0, 1:, None]).sum())
        n += ids.shape[1] - 1
    assert ed.perplexity(texts, batch_size=2) == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_generates_agrees_with_greedy_decoding() -> None:
    ed = _editor("llama", augment=0)
    prompts = ["the capital of peru is", "who is in"]
    gen = [ed.tokenizer.decode(ids, skip_special_tokens=True) for ids in ed.greedy(prompts, max_new_tokens=3)]
    first = [g.split()[0] if g.split() else "" for g in gen]
    assert ed.generates(prompts, first) == [bool(f) for f in first]
    assert ed.edit(_req("peru")).success
    assert ed.generates(["the capital of peru is"], ["lima"]) == [True]


@pytest.mark.parametrize("generated, target, want", [
    (" Paris, France", "Paris", True), ("Paris", " Paris ", True), (" Parisian food", "Paris", False),
    (" paris", "Paris", False), ("", "Paris", False), (" New York City", "New York", True), (" x", "", False),
])
def test_answer_starts_needs_the_target_then_a_word_boundary(generated: str, target: str, want: bool) -> None:
    assert answer_starts(generated, target) is want
