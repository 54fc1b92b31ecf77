"""Phrasing views: the relation phrasings a bank learns from other requests, put to a new subject,
trained on beside the edit prompt; an evaluated paraphrase is never among them."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from fastpatch.editor import EditRequest
from fastpatch.editor.phrasings import SLOT, PhrasingBank, template_of

from .test_editor import _editor


def test_template_cuts_out_every_occurrence_of_the_subject() -> None:
    assert template_of("Which family does Ramalinaceae belong to?", "Ramalinaceae") == f"Which family does {SLOT} belong to?"
    assert template_of("x of y, y", " y ") == f"x of {SLOT}, {SLOT}"
    assert template_of("What company made Volvo?", "Saab") is None
    assert template_of("anything", "") is None and template_of("anything", None) is None


def test_views_put_the_subject_into_the_relation_s_other_phrasings() -> None:
    bank = PhrasingBank()
    assert bank.add("Which family does Ramalinaceae belong to?", "Ramalinaceae",
                    ["What family are Ramalinaceae?", "Ramalinaceae is in which family?", "no subject here"]) == 2
    assert bank.add("Which family does Ramalinaceae belong to?", "Ramalinaceae", ["What family are Ramalinaceae?"]) == 0
    bank.add("Which family does Lecanora belong to?", "Lecanora", ["Lecanora is a member of what family?",
                                                                  "Which family does Lecanora belong to?"])
    assert len(bank) == 3  # the prompt's own template is not a phrasing of itself
    got = bank.views("Which family does Pinus belong to?", "Pinus", k=10)
    assert got == ["What family are Pinus?", "Pinus is in which family?", "Pinus is a member of what family?"]
    # another relation, or a subject missing from the prompt, gets nothing
    assert bank.views("What company made Pinus?", "Pinus", k=10) == []
    assert bank.views("Which family does Pinus belong to?", "Abies", k=10) == []
    assert bank.views("Which family does Pinus belong to?", "Pinus", k=0) == []


def test_the_request_s_own_paraphrases_are_never_views() -> None:
    bank = PhrasingBank()
    bank.add("The mother tongue of A is", "A", ["A is a native speaker of", "Where A is from, people speak"])
    own = ["  pinus   IS a native speaker of"]  # equal up to case and spacing: still excluded
    got = bank.views("The mother tongue of Pinus is", "Pinus", k=5, exclude=own)
    assert got == ["Where Pinus is from, people speak"]


def test_the_draw_is_fixed_per_seed_and_bounded() -> None:
    bank = PhrasingBank(per_relation=6)
    bank.add("Q about S?", "S", [f"S phrasing {i}?" for i in range(10)])
    assert len(bank.templates[template_of("Q about S?", "S")]) == 6
    a = bank.views("Q about T?", "T", k=3, seed=7)
    assert len(a) == 3 and a == bank.views("Q about T?", "T", k=3, seed=7)
    assert len({tuple(bank.views("Q about T?", "T", k=3, seed=s)) for s in range(8)}) > 1
    back = PhrasingBank()
    back.load_state(bank.state())
    assert back.views("Q about T?", "T", k=3, seed=7) == a


def test_add_records_reads_prompt_subject_and_rephrases() -> None:
    recs = [SimpleNamespace(prompt="The capital of peru is", subject="peru", rephrases=["peru has its capital in"]),
            SimpleNamespace(prompt="no subject", subject=None, rephrases=["x"])]
    bank = PhrasingBank()
    assert bank.add_records(recs) == 1
    assert bank.views("The capital of chile is", "chile", k=2) == ["chile has its capital in"]


def _req(subject: str, rephrases: list[str] | None = None) -> EditRequest:
    return EditRequest(f"the capital of {subject} is", "lima", edit_id=subject, subject=subject,
                       ground_truth="oslo", rephrases=rephrases or [])


def test_editor_trains_on_phrasing_views_learnt_after_each_edit(tmp_path) -> None:
    from fastpatch.editor import Editor

    from .test_editor import word_tokenizer
    from .tiny_models import TINY

    ed = _editor("llama", phrasings=2, augment=0, negatives=0)
    first = _req("norway", ["what capital is in norway"])
    assert ed._phrased(first) == []  # nothing learnt yet
    assert ed.edit(first).success
    # the first request's paraphrase became a phrasing of its relation, for later requests only
    req = _req("peru", ["the city of peru is"])
    assert ed.phrasings.views(req.prompt, "peru", k=2, exclude=req.rephrases) == ["what capital is in peru"]
    assert len(ed._phrased(req)) == 1
    batch = ed._prepare([req])
    assert len(batch.groups[0]) == 2  # the prompt and its one phrasing view
    # a target the first patch does not already give: the view then needs a neuron of its own
    res = ed.edit(EditRequest(req.prompt, "rome", edit_id="peru2", subject="peru", rephrases=req.rephrases))
    assert res.success and res.n_neurons == 1
    x = ed.ffn_inputs(["what capital is in peru rome"])[0]  # the view, read at its last prompt token
    assert float(ed.ffn.patch_activations(x[-2:-1])[0, -1]) > 0
    assert ed.check(["what capital is in peru"], ["rome"]) == [True]
    # without phrasing views the same two edits leave that wording alone
    plain = _editor("llama", phrasings=0, augment=0, negatives=0)
    assert plain.edit(first).success
    assert plain.edit(EditRequest(req.prompt, "rome", edit_id="peru2", subject="peru", rephrases=req.rephrases)).success
    assert plain.check(["what capital is in peru"], ["rome"]) == [False]
    # a paraphrase given with a request is never its own view, even once the bank holds it
    assert ed.phrasings.views("the capital of italy is", "italy", k=2,
                              exclude=["what capital is in italy"]) == ["the city of italy is"]
    ed.save(tmp_path / "ed")
    torch.manual_seed(0)
    back = Editor.load(tmp_path / "ed", TINY["llama"][0](), word_tokenizer())
    assert back.phrasings.state() == ed.phrasings.state() and len(back.phrasings) == 2


def test_negative_views_put_other_subjects_into_the_phrasing_views_too() -> None:
    ed = _editor("llama", negatives=2, augment=0, phrasings=1, negative_views=True)
    ed.subjects = ["norway", "italy"]
    req = _req("peru")
    neg = ed._negatives([req], [["what capital is in peru"]])
    # two negatives, the first in the prompt's wording, the second in the view's, each read from
    # its last prompt token on (the token before "oslo", then "oslo")
    assert neg is not None and neg.shape == (4, ed.ffn.bank.d_in)

    def rows(*texts: str) -> torch.Tensor:  # one batch, as the editor reads its negatives
        return torch.cat([x[-2:] for x in ed.ffn_inputs(list(texts))]).float()

    orders = [("norway", "italy"), ("italy", "norway")]
    want = [rows(f"the capital of {a} is oslo", f"what capital is in {b} oslo") for a, b in orders]
    assert any(torch.allclose(neg, w, rtol=1e-4, atol=1e-5) for w in want)
    # without views (or negative_views off) every negative is the prompt's wording
    plain = ed._negatives([req])
    only_prompt = [rows(f"the capital of {a} is oslo", f"the capital of {b} is oslo") for a, b in orders]
    assert any(torch.allclose(plain, w, rtol=1e-4, atol=1e-5) for w in only_prompt)
    # a subject that appears in a view is not swapped in
    ed.subjects = ["norway", "rome"]
    neg = ed._negatives([req], [["what capital is rome in peru"]])
    assert neg.shape == (2, ed.ffn.bank.d_in)
