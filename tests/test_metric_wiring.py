"""Run-level metrics with hand-computed answers (issue 18, point 1).

The "model" here is a lookup table: every prompt has one answer, and each edit is scripted to
succeed or fail and to change a known set of answers (its own prompt, some paraphrases, a
locality prompt it should not touch, a retain pair, an earlier edit's prompt). ``run_stream`` then
drives this editor exactly as it drives :class:`fastpatch.editor.Editor` (``edit``, ``check``,
``predict_tokens``, ``target_ids``), and every metric SR, GR, ER, TrainR, TestR, Rel, Gen, Loc has
a value computed by hand below from the script, never with the code under test.

What the script exercises (and which wiring bug each value catches):

* r1 is right before editing: under ``tpatcher`` it is a skip, so ER (edited requests only) and
  Rel (every request) differ; ER over all requests would be 4/6, not 3/5.
* r2's edit fails (nothing changes): SR < 1, GR gets a 0.
* r3's edit changes one of the two tokens of a locality prompt: Loc < 1. Loc against the current
  model instead of the pre-edit baseline would be 1.0.
* r0's locality prompt is *wrong* before editing and stays so: Loc counts agreement with the
  pre-edit prediction, not correctness.
* r5's edit breaks r4's prompt (ER, Rel drop), breaks a TrainR pair (0.5) and fixes a TestR pair the
  unedited model got wrong (TestR 1.5 > 1, normalised by the pre-edit accuracy).
"""

from __future__ import annotations

import hashlib
import json
from fractions import Fraction as F
from pathlib import Path
from typing import Any

import pytest

import fastpatch
from fastpatch.data.formats import EditRecord
from fastpatch.editor import EditError, EditRequest, EditResult

#: The unedited model: prompt -> answer (words; each word is one token).
WORLD0: dict[str, str] = {
    "p0": "W", "p0a": "W", "p0b": "W",
    "p1": "A1", "p1a": "A1",
    "p2": "W", "p2a": "W",
    "p3": "W V", "p3a": "W V",
    "p4": "W",
    "p5": "W", "p5a": "W", "p5b": "W", "p5c": "W",
    "l0": "zz",  # its locality answer is "z0": wrong before and after, unchanged
    "l3": "x y", "l3b": "m", "l4": "n",
    "t1": "T1", "t2": "T2", "t3": "no",  # TrainR candidates: t1, t2 right before editing
    "u1": "U1", "u2": "no", "u3": "U3",  # TestR set: 2 of 3 right before editing
}

#: prompt -> (edit succeeds, answers it changes when it does)
SCRIPT: dict[str, tuple[bool, dict[str, str]]] = {
    "p0": (True, {"p0": "A0", "p0a": "A0"}),
    "p1": (True, {}),  # already right
    "p2": (False, {"p2": "A2", "p2a": "A2"}),  # fails: none of it happens
    "p3": (True, {"p3": "A3 B3", "p3a": "A3 B3", "l3": "x q"}),
    "p4": (True, {"p4": "A4"}),
    "p5": (True, {"p5": "A5", "p5a": "A5", "p4": "W", "t1": "broken", "u2": "U2"}),
}

RECORDS = [
    EditRecord("r0", "p0", "A0", None, ["p0a", "p0b"], [("l0", "z0")], source_row=0),
    EditRecord("r1", "p1", "A1", None, ["p1a"], [], source_row=1),
    EditRecord("r2", "p2", "A2", None, ["p2a"], [], source_row=2),
    EditRecord("r3", "p3", "A3 B3", None, ["p3a"], [("l3", "x y"), ("l3b", "m")], source_row=3),
    EditRecord("r4", "p4", "A4", None, [], [("l4", "n")], source_row=4),
    EditRecord("r5", "p5", "A5", None, ["p5a", "p5b", "p5c"], [("l0", "z0")], source_row=5),
]
RETAIN_A = [("t1", "T1"), ("t2", "T2"), ("t3", "T3")]
RETAIN_B = [("u1", "U1"), ("u2", "U2"), ("u3", "U3")]


class TableEditor:
    """The editor interface ``run_stream`` uses, over a prompt -> answer table."""

    model = None
    task = None  # generative

    def __init__(self) -> None:
        self.world = dict(WORLD0)
        self.vocab: dict[str, int] = {"<pad>": 0}
        self.edits: dict[str, Any] = {}
        self.num_patches = 0
        self.calls: list[str] = []
        self.requests: list[tuple] = []  # what the runner asked to edit
        self.batch_sizes: set[int] = set()

    def _ids(self, text: str) -> list[int]:
        return [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]

    def target_ids(self, prompts, targets):
        for p in prompts:
            if p.startswith("LONG"):
                raise EditError(f"{p!r} is longer than the model's context")
        return [self._ids(t) for t in targets]

    def predict_tokens(self, prompts, targets, batch_size: int = 32):
        self.batch_sizes.add(batch_size)
        return self._predict(prompts, targets)

    def _predict(self, prompts, targets):
        out = []
        for p, t in zip(prompts, targets):
            n = len(self._ids(t))  # teacher forcing: one prediction per target position
            pred = self._ids(self.world[p])[:n]
            out.append(pred + [0] * (n - len(pred)))
        return out

    def check(self, prompts, targets, batch_size: int = 32):
        return [a == b for a, b in zip(self.predict_tokens(prompts, targets, batch_size),
                                       self.target_ids(prompts, targets))]

    def edit(self, req: EditRequest) -> EditResult:
        self.calls.append(req.prompt)
        self.requests.append((req.prompt, req.target, req.label, req.edit_id, list(req.rephrases)))
        if self._predict([req.prompt], [req.target]) == [self._ids(req.target)]:
            return EditResult(req.edit_id, True, 0, 0.0, [], {}, 0, already_correct=True)
        ok, changes = SCRIPT[req.prompt]
        pids: list[int] = []
        if ok:
            self.world.update(changes)
            pids = [self.num_patches]
            self.num_patches += 1
            self.edits[req.edit_id] = {"patch_ids": pids}
        return EditResult(req.edit_id, ok, 3, 0.0, pids, {"loss": 0.0}, 1)

    def save(self, directory) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "world.json").write_text(json.dumps(self.world))

    def activations(self, texts, batch_size: int = 16):
        import torch

        return torch.zeros(len(texts), self.num_patches)


class TwoPassEditor(TableEditor):
    """An editor without ``target_ids``: the runner checks and predicts in two passes."""

    target_ids = None  # type: ignore[assignment]

    def check(self, prompts, targets, batch_size: int = 32):
        return [a == TableEditor.target_ids(self, [p], [t])[0]
                for a, p, t in zip(self.predict_tokens(prompts, targets, batch_size), prompts, targets)]


def _run(tmp_path: Path, protocol: str, eval_every: int, editor: type = TableEditor,
         **kw: Any) -> tuple[dict, list[dict], list[dict], TableEditor]:
    ed = editor()
    out = tmp_path / protocol
    kw.setdefault("retain_sets", (RETAIN_A, RETAIN_B))
    kw.setdefault("min_retain", 1)  # the hand-built retain sets hold a few pairs
    summary = fastpatch.run_stream(ed, RECORDS, out, protocol=protocol, eval_every=eval_every, progress=False,
                                   plots=False, batch_size=4, **kw)
    lines = [json.loads(x) for x in (out / "edits.jsonl").read_text().splitlines()]
    evals = [json.loads(x) for x in (out / "evals.jsonl").read_text().splitlines()]
    return summary, lines, evals, ed


def _exact(got: dict, want: dict) -> None:
    for name, value in want.items():
        assert got[name] == pytest.approx(float(value), abs=1e-12), (name, got[name], value)


# Hand-computed, request by request (see the module docstring):
#   per-request paraphrase accuracy right after the edit: r0 1/2, r1 1, r2 0, r3 1, r5 1/3
#   final prompt checks: p0 ok, p1 ok, p2 wrong (failed), p3 ok, p4 wrong (broken by r5), p5 ok
#   Loc per request with locality pairs: r0 1, r3 (1/2 + 1)/2, r4 1, r5 1
LOC = (1 + F(3, 4) + 1 + 1) / 4
GEN = (F(1, 2) + 1 + 0 + 1 + F(1, 3)) / 5  # every request with paraphrases, final model
TRAIN_R = F(1, 2)  # S = {t1, t2}; t1 broken
TEST_R = F(3, 3) / F(2, 3)


@pytest.mark.parametrize("editor", [TableEditor, TwoPassEditor])
def test_tpatcher_protocol_metrics_have_known_values(tmp_path: Path, editor: type) -> None:
    summary, lines, evals, ed = _run(tmp_path, "tpatcher", eval_every=2, editor=editor)
    assert [ln["action"] for ln in lines] == ["edit", "skip", "edit", "edit", "edit", "edit"]
    assert [ln.get("success") for ln in lines] == [True, None, False, True, True, True]
    assert summary["edits"] == 5 and summary["skipped_correct"] == 1 and summary["successes"] == 4
    _exact(summary["metrics"], {
        "SR": F(4, 5),
        "GR": (F(1, 2) + 0 + 1 + F(1, 3)) / 4,  # r0, r2, r3, r5 (r4 has none; r1 not edited)
        "ER": F(3, 5),  # edited: r0 ok, r2 wrong, r3 ok, r4 wrong, r5 ok
        "Rel": F(4, 6),  # all six requests: p1 (skipped, right) counts here
        "Gen": GEN,
        "Loc": LOC,
        "TrainR": TRAIN_R,
        "TestR": TEST_R,
    })
    # evaluation points: before editing, after 2 edits (3 requests), 4 edits (5 requests), the end
    assert [(e["edits"], e["position"]) for e in evals] == [(0, 0), (2, 3), (4, 5), (5, 6)]
    _exact(evals[0], {"TrainR": 1, "TestR": 1})
    _exact(evals[1], {"ER": F(1, 2), "Rel": F(2, 3), "Loc": 1, "TrainR": 1, "TestR": 1})
    assert "Gen" not in evals[1]  # T-Patcher protocol: Gen only at the end
    _exact(evals[2], {"ER": F(3, 4), "Rel": F(4, 5), "Loc": (1 + F(3, 4) + 1) / 3, "TrainR": 1, "TestR": 1})
    # the running metrics of each edit line
    _exact(lines[0]["metrics"], {"SR": 1, "GR": F(1, 2)})
    _exact(lines[2]["metrics"], {"SR": F(1, 2), "GR": F(1, 4)})
    assert lines[0]["gr"] == 0.5 and lines[2]["gr"] == 0.0 and lines[4]["gr"] is None
    # what reached the editor: every request as given (r1 too: the editor decides it is right)
    assert ed.requests == [(r.prompt, r.target, None, r.id, list(r.rephrases)) for r in RECORDS]
    assert ed.batch_sizes == {4}
    # the lines themselves
    skip = lines[1]
    assert 0 <= skip.pop("seconds") < 60
    assert skip == {"i": 1, "id": "r1", "action": "skip", "reason": "already_correct", "edits": 1,
                    "metrics": lines[0]["metrics"]}
    edit = dict(lines[0])
    assert 0 <= edit.pop("seconds") < 60 and 0 <= edit.pop("editor_seconds") < 60
    del edit["metrics"]
    assert edit == {"i": 0, "id": "r0", "action": "edit", "success": True, "gr": 0.5, "editor_success": True,
                    "steps": 3, "patch_ids": [0], "n_neurons": 1, "already_correct": False, "kept_failed": False,
                    "losses": {"loss": 0.0}, "edits": 1, "patches": 1}
    assert lines[2]["editor_success"] is False and lines[2]["patch_ids"] == [] and lines[5]["patches"] == 4
    # evaluation lines carry SR, GR and the patch count of their moment, and how many prompts were read:
    # (prompts + paraphrases when Gen is measured + TrainR + TestR pairs) + distinct locality pairs
    assert [(e.get("SR"), e.get("GR"), e["patches"]) for e in evals[1:]] == [
        (0.5, 0.25, 1), (0.75, pytest.approx(0.5), 3), (0.8, pytest.approx(11 / 24), 4)]
    assert [e["n_eval_prompts"] for e in evals[1:]] == [3 + 2 + 3 + 1, 5 + 2 + 3 + 4, 6 + 8 + 2 + 3 + 4]
    assert all(0 <= e["eval_seconds"] < 60 for e in evals[1:])
    assert summary["time"]["eval_seconds_total"] == pytest.approx(sum(e["eval_seconds"] for e in evals[1:]), abs=0.01)


def test_easyedit_protocol_metrics_have_known_values(tmp_path: Path) -> None:
    summary, lines, evals, ed = _run(tmp_path, "easyedit", eval_every=3)
    assert [ln["action"] for ln in lines] == ["edit"] * 6
    assert lines[1]["already_correct"] is True and lines[1]["patch_ids"] == []
    assert summary["edits"] == 6 and summary["skipped_correct"] == 0 and summary["successes"] == 5
    _exact(summary["metrics"], {
        "SR": F(5, 6),
        "GR": (F(1, 2) + 1 + 0 + 1 + F(1, 3)) / 5,  # r1 is an edit now
        "ER": F(4, 6),
        "Rel": F(4, 6),
        "Gen": GEN,
        "Loc": LOC,
        "TrainR": TRAIN_R,
        "TestR": TEST_R,
    })
    assert [(e["edits"], e["position"]) for e in evals] == [(0, 0), (3, 3), (6, 6)]
    # EasyEdit protocol: Gen at every point; after r0..r2: r0 1/2, r1 1, r2 0
    _exact(evals[1], {"ER": F(2, 3), "Rel": F(2, 3), "Gen": F(1, 2), "Loc": 1, "TrainR": 1, "TestR": 1})


def test_loc_compares_with_the_pre_edit_model_not_the_answers(tmp_path: Path) -> None:
    """Loc is agreement with the unedited model's tokens: a locality prompt the unedited model got
    wrong and still gets wrong scores 1; the changed token of l3 scores 1/2."""
    summary, _, _, ed = _run(tmp_path, "easyedit", eval_every=0)
    base = json.loads((tmp_path / "easyedit" / "baseline.json").read_text())
    # baseline tokens are the unedited table's, for every request (empty lists where none)
    assert base["loc_tokens"][0] == [ed._ids("zz")]
    assert base["loc_tokens"][3] == [ed._ids("x y"), ed._ids("m")]
    assert base["train"] == [["t1", "T1"], ["t2", "T2"]]
    assert (base["n_records"], base["train_candidates"]) == (6, 3)
    assert base["train_accuracy"] == pytest.approx(2 / 3) and base["test_accuracy"] == pytest.approx(2 / 3)
    assert [c for *_, c in base["test"]] == [True, False, True]
    assert summary["metrics"]["Loc"] == pytest.approx(float(LOC))


def test_summary_counts_of_both_protocols(tmp_path: Path) -> None:
    tp, *_ = _run(tmp_path / "a", "tpatcher", eval_every=0)
    ee, *_ = _run(tmp_path / "b", "easyedit", eval_every=0)
    # the editor reports r2 as failed; every scripted edit trains one neuron, r1 none
    assert tp["editor_success_rate"] == pytest.approx(4 / 5) and tp["neurons_per_edit"] == pytest.approx(1.0)
    assert ee["editor_success_rate"] == pytest.approx(5 / 6) and ee["neurons_per_edit"] == pytest.approx(5 / 6)
    assert tp["patches"] == ee["patches"] == 4
    assert (tp["requests"], tp["requests_total"], ee["requests"]) == (6, 6, 6)
    assert tp["retain_sets"] == {"train": 2, "train_candidates": 3, "test": 3, "test_right_before": 2,
                                 "test_pre_accuracy": pytest.approx(2 / 3), "min_right": 1}


def test_retain_rates_are_na_below_min_retain(tmp_path: Path) -> None:
    """TrainR/TestR over fewer than ``min_retain`` pairs the unedited model got right are n/a
    (None), at every evaluation point including the first; the counts stay in the summary."""
    summary, _, evals, _ = _run(tmp_path / "na", "easyedit", eval_every=2, min_retain=3)
    assert summary["metrics"]["TrainR"] is None and summary["metrics"]["TestR"] is None
    assert all(e.get("TrainR") is None and e.get("TestR") is None for e in evals)
    assert summary["retain_sets"]["train"] == 2 and summary["retain_sets"]["test_right_before"] == 2
    at_two, *_ = _run(tmp_path / "two", "easyedit", eval_every=2, min_retain=2)
    assert at_two["metrics"]["TrainR"] is not None and at_two["metrics"]["TestR"] is not None


def test_metric_state_counters() -> None:
    """Every counter of MetricState, by hand (what summary.json and the checkpoints carry)."""
    from fastpatch.metrics import MetricState

    st = MetricState()
    st.record_skip()
    st.record_skip()
    st.record_edit(2, True, [True, False], 0.5, n_neurons=2, editor_success=False)
    st.record_edit(3, False, [], 0.25, n_neurons=3)  # editor_success defaults to the check
    st.record_edit(4, True, [True], 1.0, already_correct=True)
    st.record_edit(5, True, [False, False, True, True], 2.0)  # n_neurons 0, already_correct False
    got = (st.position, st.n_edits, st.n_skipped, st.n_success, st.n_editor_success, st.n_already_correct,
           st.n_neurons, st.gr_count)
    assert got == (6, 4, 2, 3, 2, 1, 5, 3)
    assert st.edited == [2, 3, 4, 5] and st.edit_seconds == [0.5, 0.25, 1.0, 2.0]
    assert st.sr == pytest.approx(3 / 4) and st.gr == pytest.approx((0.5 + 1 + 0.5) / 3)
    back = MetricState.from_dict(json.loads(json.dumps(st.to_dict())))
    assert back == st and back.current() == st.current()


def test_metric_errors_name_the_problem() -> None:
    from fastpatch import metrics as M

    for fn in (M.train_retain_rate, M.test_retain_rate):
        with pytest.raises(ValueError, match=r"pre and post differ in length \(1 != 2\)"):
            fn([True], [True, False])
    with pytest.raises(ValueError, match=r"q must be in \[0, 100\], got 101"):
        M.percentile([1.0], 101)


def _half(prompt: str) -> str:
    """The documented rule of ``retain_split``: parity of the first byte of sha256(prompt)."""
    return "A" if hashlib.sha256(prompt.encode("utf-8")).digest()[0] % 2 == 0 else "B"


def test_retain_pairs_are_split_by_the_documented_hash() -> None:
    from fastpatch.run import retain_split  # noqa: PLC0415

    prompts = [f"q{i}" for i in range(12)]
    pairs = [(p, "a") for p in prompts[:6]] + [("q2", "dup")] + [(p, "a") for p in prompts[6:]]
    a, b = retain_split(pairs)
    assert [p for p, _ in a] == [p for p in prompts if _half(p) == "A"]
    assert [p for p, _ in b] == [p for p in prompts if _half(p) == "B"]
    assert ("q2", "dup") not in a + b and ("q2", "a") in a + b  # first answer kept
    a1, b1 = retain_split(pairs, size=1)
    assert (a1, b1) == (a[:1], b[:1])


def test_retain_pairs_path_of_the_runner(tmp_path: Path) -> None:
    pairs = RETAIN_A + RETAIN_B
    summary, _, _, _ = _run(tmp_path, "easyedit", eval_every=0, retain_sets=None, retain_pairs=pairs, retain_size=2)
    base = json.loads((tmp_path / "easyedit" / "baseline.json").read_text())
    want_a = [p for p in pairs if _half(p[0]) == "A"][:2]
    want_b = [p for p in pairs if _half(p[0]) == "B"][:2]
    right = {"t1", "t2", "u1", "u3"}  # what the unedited table answers right
    assert base["train_candidates"] == len(want_a)
    assert base["train"] == [[p, t] for p, t in want_a if p in right]
    assert base["test"] == [[p, t, p in right] for p, t in want_b]


def test_retain_sets_are_cut_to_retain_size(tmp_path: Path) -> None:
    _run(tmp_path / "a", "easyedit", eval_every=0, retain_size=2)
    base = json.loads((tmp_path / "a" / "easyedit" / "baseline.json").read_text())
    assert base["train_candidates"] == 2 and base["train"] == [["t1", "T1"], ["t2", "T2"]]
    assert base["test"] == [["u1", "U1", True], ["u2", "U2", False]]
    summary, *_ = _run(tmp_path / "b", "easyedit", eval_every=0, retain_sets=([], RETAIN_B))
    base = json.loads((tmp_path / "b" / "easyedit" / "baseline.json").read_text())
    assert base["train_accuracy"] is None and base["train"] == [] and summary["metrics"]["TrainR"] is None


def test_a_retain_pair_the_editor_cannot_score_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"retain pair 'LONG one'.*longer than the model's context"):
        _run(tmp_path, "easyedit", eval_every=0, retain_sets=([("LONG one", "x")], RETAIN_B))


class RaisingEditor(TableEditor):
    def edit(self, req: EditRequest) -> EditResult:
        if req.prompt == "p2":
            raise EditError("cannot edit p2")
        return super().edit(req)


def test_an_edit_error_is_a_failed_edit(tmp_path: Path) -> None:
    summary, lines, _, _ = _run(tmp_path, "tpatcher", eval_every=0, editor=RaisingEditor)
    line = lines[2]
    assert line["action"] == "edit" and line["success"] is False and line["error"] == "cannot edit p2"
    assert (line["editor_success"], line["steps"], line["patch_ids"], line["n_neurons"]) == (False, 0, [], 0)
    # the same numbers as a failed edit, and no neuron, no editor success, not "already correct"
    _exact(summary["metrics"], {"SR": F(4, 5), "ER": F(3, 5), "Rel": F(4, 6), "Loc": LOC})
    assert summary["editor_success_rate"] == pytest.approx(4 / 5) and summary["neurons_per_edit"] == pytest.approx(4 / 5)
    out = tmp_path / "tpatcher" / "checkpoint"
    state = json.loads((out / (out / "LATEST").read_text().strip() / "state.json").read_text())
    assert state["metrics"]["n_already_correct"] == 0 and state["metrics"]["n_neurons"] == 4
    assert summary["time"]["eval_seconds_total"] > 0 and 0 <= summary["time"]["check_seconds_total"] < 60


class ClassifierTable(TableEditor):
    """A classifier over a prompt -> class table: targets name classes ("true" -> 1)."""

    task = "cls"

    def __init__(self) -> None:
        super().__init__()
        from types import SimpleNamespace

        self.model = SimpleNamespace(config=SimpleNamespace(num_labels=2, label2id={"false": 0, "true": 1}))
        self.world = {"x0": 0, "x0a": 0, "x1": 0, "x2": 0, "y0": 0}

    def target_ids(self, prompts, targets):
        return [[int(t)] for t in targets]

    def _predict(self, prompts, targets):
        return [[self.world[p]] for p in prompts]

    def edit(self, req: EditRequest) -> EditResult:
        self.requests.append((req.prompt, req.target, req.label, req.edit_id, list(req.rephrases)))
        self.subjects.append(req.subject)
        if self.world[req.prompt] == req.label:
            return EditResult(req.edit_id, True, 0, 0.0, [], {}, 0, already_correct=True)
        if req.prompt == "x2":  # fails
            return EditResult(req.edit_id, False, 3, 0.0, [], {}, 1)
        self.world.update({req.prompt: req.label, req.prompt + "a": req.label})
        self.num_patches += 1
        return EditResult(req.edit_id, True, 3, 0.0, [self.num_patches - 1], {}, 1)


def test_classifier_requests_are_edited_by_label(tmp_path: Path) -> None:
    records = [
        EditRecord("c0", "x0", "true", None, ["x0a"], [("y0", "false")], subject="s0", source_row=0),
        EditRecord("c1", "x1", "false", None, [], [], source_row=1),
        EditRecord("c2", "x2", "true", None, [], [], subject="s2", source_row=2),
    ]
    ed = ClassifierTable()
    ed.subjects = []
    summary = fastpatch.run_stream(ed, records, tmp_path / "cls", protocol="tpatcher", eval_every=0, progress=False,
                                   plots=False, retain_sets=([("y0", "false")], [("x1", "false")]), min_retain=1)
    lines = [json.loads(x) for x in (tmp_path / "cls" / "edits.jsonl").read_text().splitlines()]
    assert ed.requests == [("x0", None, 1, "c0", ["x0a"]), ("x1", None, 0, "c1", []), ("x2", None, 1, "c2", [])]
    assert ed.subjects == ["s0", None, "s2"]  # a classifier request carries its record's subject too
    assert [ln["action"] for ln in lines] == ["edit", "skip", "edit"]
    assert [ln.get("label") for ln in lines] == [1, None, 1]
    _exact(summary["metrics"], {"SR": F(1, 2), "GR": 1, "ER": F(1, 2), "Rel": F(2, 3), "Gen": 1, "Loc": 1,
                                "TrainR": 1, "TestR": 1})


def test_sampled_evaluation_points_score_their_sample_and_the_final_point_everything(tmp_path: Path) -> None:
    """eval_sample: an intermediate point scores a fixed random sample of the requests so far (the
    values are those of the sampled requests alone), the final point scores every request."""
    from fastpatch.run.evaluation import eval_indices

    summary, _, evals, _ = _run(tmp_path, "easyedit", eval_every=3, eval_sample=2)
    idx = eval_indices(3, 2)
    assert len(idx) == 2 and set(idx) < {0, 1, 2} and idx == eval_indices(3, 2)
    # after r0..r2 (see test_easyedit_...): prompt right r0, r1 (already), not r2 (failed);
    # paraphrases r0 1/2, r1 1, r2 0; r0 is the only one with a locality prompt, unchanged
    right, gen = {0: 1, 1: 1, 2: 0}, {0: F(1, 2), 1: F(1), 2: F(0)}
    assert evals[1]["sampled_requests"] == 2
    _exact(evals[1], {"Rel": F(sum(right[i] for i in idx), 2), "ER": F(sum(right[i] for i in idx), 2),
                      "Gen": sum(gen[i] for i in idx) / 2})
    assert (evals[1]["Loc"] == 1) if 0 in idx else (evals[1]["Loc"] is None)
    assert "sampled_requests" not in evals[2] and evals[2]["final"] is True
    _exact(summary["metrics"], {"Rel": F(4, 6), "Gen": GEN, "Loc": LOC})
    assert eval_indices(5, 0) == eval_indices(5, 9) == [0, 1, 2, 3, 4]


class HalfRightEditor(TableEditor):
    """r3's edit gets its paraphrase half right ("A3 Q" for "A3 B3")."""

    def edit(self, req: EditRequest) -> EditResult:
        res = super().edit(req)
        if req.prompt == "p3" and res.success:
            self.world["p3a"] = "A3 Q"
        return res


def test_token_accuracy_scores_are_easyedit_s_rel_and_gen(tmp_path: Path) -> None:
    """Rel_tok/Gen_tok average the per-token accuracy (EasyEdit's definition); Rel/Gen need every
    token right. Only r3's paraphrase differs between the two: 1 of its 2 tokens right."""
    summary, _, evals, _ = _run(tmp_path, "easyedit", eval_every=3, editor=HalfRightEditor)
    gen_exact = (F(1, 2) + 1 + 0 + 0 + F(1, 3)) / 5
    _exact(summary["metrics"], {"Rel": F(4, 6), "Gen": gen_exact})
    _exact(summary["scores"], {"Rel_tok": F(4, 6), "Gen_tok": gen_exact + F(1, 2) / 5})
    _exact(evals[1], {"Rel_tok": F(2, 3), "Gen_tok": F(1, 2)})  # r0..r2: one-token targets, no difference
    # an editor without target ids cannot give token accuracy: not reported rather than guessed
    summary2, _, _, _ = _run(tmp_path / "two", "easyedit", eval_every=3, editor=TwoPassEditor)
    assert "Rel_tok" not in summary2["scores"] and summary2["metrics"]["Gen"] is not None
