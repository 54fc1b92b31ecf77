"""CounterFact scores, free-generation Rel/Gen and the general-ability scores with hand-computed
answers (issue 14), on the lookup-table editor of ``test_metric_wiring``.

Two CounterFact-style requests (true object ``T``, new target ``N``, one paraphrase and one
neighbourhood prompt each): c0's edit holds on its prompt only and breaks its neighbour; c1's
edit holds on its prompt and paraphrase, and breaks a general-ability question. Log-probabilities
are -0.1 for the table's answer and -2 for anything else, so every score is computable by hand.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import fastpatch
from fastpatch.data.formats import EditRecord
from fastpatch.editor import EditRequest, EditResult
from fastpatch.run.scores import is_counterfact, neighbourhood

from .test_metric_wiring import TableEditor

WORLD = {"c0": "T0", "c0p": "T0", "n0": "T0", "c1": "T1", "c1p": "T1", "n1": "T1",
         "q1": "Q1", "q2": "Q2", "q3": "Q3"}
SCRIPT = {"c0": {"c0": "N0", "n0": "N0"}, "c1": {"c1": "N1", "c1p": "N1", "q2": "broken"}}
RECORDS = [
    EditRecord("c0", "c0", "N0", "T0", ["c0p"], [("n0", "T0")], subject="s0", source_row=0),
    EditRecord("c1", "c1", "N1", "T1", ["c1p"], [("n1", "T1")], subject="s1", source_row=1),
]
RIGHT, WRONG = -0.1, -2.0


class ScoringTable(TableEditor):
    """The table editor plus the scoring methods the CounterFact, generation and ability scores use."""

    def __init__(self) -> None:
        super().__init__()
        self.world = dict(WORLD)
        self.subjects_seen: list[str | None] = []
        self.truths_seen: list[str | None] = []

    def edit(self, req: EditRequest) -> EditResult:
        self.subjects_seen.append(req.subject)
        self.truths_seen.append(req.ground_truth)
        self.world.update(SCRIPT[req.prompt])
        pid = self.num_patches
        self.num_patches += 1
        self.edits[req.edit_id] = {"patch_ids": [pid]}
        return EditResult(req.edit_id, True, 1, 0.0, [pid], {}, 1)

    def target_logprobs(self, prompts, targets, batch_size: int = 32):
        return [RIGHT if self.world[p] == t else WRONG for p, t in zip(prompts, targets)]

    def generates(self, prompts, targets, batch_size: int = 32):
        return [self.world[p] == t for p, t in zip(prompts, targets)]

    def perplexity(self, texts, batch_size: int = 16):
        return 10.0 + self.num_patches


def test_counterfact_generation_and_ability_scores_have_known_values(tmp_path: Path) -> None:
    ed = ScoringTable()
    summary = fastpatch.run_stream(
        ed, RECORDS, tmp_path / "cf", protocol="easyedit", eval_every=0, progress=False, plots=False,
        retain_sets=([], []), ability_texts=["some text"], ability_pairs=[("q1", "Q1"), ("q2", "Q2"), ("q3", "no")])
    s = summary["scores"]
    e = math.exp
    assert s["pre"] == pytest.approx({"ES": 0.0, "PS": 0.0, "NS": 1.0, "EM": e(WRONG) - e(RIGHT),
                                      "PM": e(WRONG) - e(RIGHT), "NM": e(RIGHT) - e(WRONG), "PPL": 10.0})
    assert s["ES"] == 1.0 and s["EM"] == pytest.approx(e(RIGHT) - e(WRONG))
    assert s["PS"] == 0.5 and s["PM"] == pytest.approx(0.0, abs=1e-12)  # c0p still prefers T0
    assert s["NS"] == 0.5 and s["NM"] == pytest.approx(0.0, abs=1e-12)  # n0 now prefers N0
    assert s["Rel_gen"] == 1.0 and s["Gen_gen"] == 0.5
    assert s["PPL"] == 12.0  # 10 + two patches
    assert s["Ability"] == 0.5  # q1, q2 right before (q3 never was); c1 broke q2
    assert s["ability_set"] == {"questions_right_before": 2, "candidates": 3, "texts": 1}
    # the runner hands each request its subject and true object (the editor's hard negatives)
    assert ed.subjects_seen == ["s0", "s1"] and ed.truths_seen == ["T0", "T1"]


@pytest.mark.parametrize("protocol", ["easyedit", "tpatcher"])
def test_which_scores_each_evaluation_point_has(tmp_path: Path, protocol: str) -> None:
    """CounterFact scores where Gen is measured (every point under EasyEdit, the end under
    T-Patcher), generation scores at the end only, general ability at every point."""
    import json

    out = tmp_path / protocol
    fastpatch.run_stream(ScoringTable(), RECORDS, out, protocol=protocol, eval_every=1, progress=False,
                         plots=False, retain_sets=([], []), ability_texts=["t"], ability_pairs=[("q2", "Q2")])
    evals = [json.loads(x) for x in (out / "evals.jsonl").read_text().splitlines()]
    points = [e for e in evals if e.get("position")]  # the edits' points (not the zero point)
    assert [e["position"] for e in points] == [1, 2]
    first, last = points
    assert first["PPL"] == 11.0 and first["Ability"] == 1.0 and last["PPL"] == 12.0 and last["Ability"] == 0.0
    assert "Rel_gen" not in first and last["Rel_gen"] == 1.0 and last["Gen_gen"] == 0.5
    if protocol == "easyedit":
        assert first["ES"] == 1.0 and first["NS"] == 0.0  # after c0 only: n0 broken
    else:
        assert "ES" not in first
    assert last["ES"] == 1.0 and last["NS"] == 0.5


def test_scores_are_absent_where_they_do_not_apply(tmp_path: Path) -> None:
    # no neighbourhood prompts (locality answers are not the true object): no CounterFact scores
    recs = [EditRecord("c0", "c0", "N0", "T0", ["c0p"], [("q1", "Q1")], source_row=0)]
    assert not is_counterfact(recs) and neighbourhood(recs[0]) == []
    summary = fastpatch.run_stream(ScoringTable(), recs, tmp_path / "z", protocol="easyedit", eval_every=0,
                                   progress=False, plots=False, retain_sets=([], []), generation_metrics=False)
    # only the token accuracies, which every generative stream has
    assert set(summary["scores"]) == {"Rel_tok", "Gen_tok"}
    # a record whose true object is its new target has no neighbourhood either
    assert neighbourhood(EditRecord("x", "c0", "T0", "T0", [], [("n0", "T0")])) == []


def test_the_last_point_of_a_stream_is_its_final_one_and_an_older_run_gets_it_on_resume(tmp_path: Path) -> None:
    """eval_every dividing the stream: the evaluation at its end is the final one (generation
    scores, per_request.jsonl), not a regular point followed by nothing. A run written before
    points were marked final gets its final point when resumed, without editing anything again."""
    import json

    from fastpatch.run import latest_checkpoint

    ed, out = ScoringTable(), tmp_path / "run"
    kw = dict(protocol="easyedit", eval_every=2, progress=False, plots=False, retain_sets=([], []))
    summary = fastpatch.run_stream(ed, RECORDS, out, **kw)
    evals = [json.loads(x) for x in (out / "evals.jsonl").read_text().splitlines()]
    assert [(e["position"], e.get("final")) for e in evals] == [(0, None), (2, True)]
    assert summary["scores"]["Rel_gen"] == 1.0
    per = [json.loads(x) for x in (out / "per_request.jsonl").read_text().splitlines()]
    # c0's paraphrase still gets T0 and its neighbour is broken; c1's paraphrase and neighbour hold
    assert [(r["id"], r["rel"], r["gen"], r["loc"]) for r in per] == [("c0", True, [False], [0.0]),
                                                                    ("c1", True, [True], [1.0])]

    # the same run as an older version wrote it: its last point not marked final, no per_request.jsonl
    state_path = latest_checkpoint(out) / "state.json"
    state = json.loads(state_path.read_text())
    for point in (state["metrics"]["evals"][-1], state["metrics"]["last_eval"]):
        for k in ("final", "Rel_gen", "Gen_gen"):
            point.pop(k, None)
    state_path.write_text(json.dumps(state))
    (out / "per_request.jsonl").unlink()
    resumed = fastpatch.run_stream(ed, RECORDS, out, **kw, resume=True)
    assert ed.subjects_seen == ["s0", "s1"]  # nothing edited again
    assert resumed["scores"]["Rel_gen"] == 1.0 and (out / "per_request.jsonl").is_file()
    evals = [json.loads(x) for x in (out / "evals.jsonl").read_text().splitlines()]
    assert [(e["position"], e.get("final")) for e in evals] == [(0, None), (2, True), (2, True)]


def test_the_summary_reports_the_scores_of_its_last_point_only(tmp_path: Path) -> None:
    """A finished run resumed for a new final point without the free-generation scores: its summary
    has none, rather than the earlier final point's values."""
    import json

    from fastpatch.run import latest_checkpoint

    ed, out = ScoringTable(), tmp_path / "run"
    kw = dict(protocol="easyedit", eval_every=2, progress=False, plots=False, retain_sets=([], []),
              ability_texts=["t"])
    assert fastpatch.run_stream(ed, RECORDS, out, **kw)["scores"]["Rel_gen"] == 1.0
    state_path = latest_checkpoint(out) / "state.json"
    state = json.loads(state_path.read_text())
    state["metrics"]["evals"][-1].pop("final")  # as an older version wrote it: a final point is due
    state_path.write_text(json.dumps(state))
    resumed = fastpatch.run_stream(ed, RECORDS, out, **kw, resume=True, generation_metrics=False)
    evals = [json.loads(x) for x in (out / "evals.jsonl").read_text().splitlines()]
    assert "Rel_gen" in evals[1] and "Rel_gen" not in evals[-1] and evals[-1].get("final")
    assert "Rel_gen" not in resumed["scores"] and "Gen_gen" not in resumed["scores"]
    assert resumed["scores"]["PPL"] == 12.0 and resumed["scores"]["ES"] == 1.0  # measured again at the end
