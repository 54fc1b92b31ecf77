"""Metric arithmetic on hand-computed cases (fastpatch.metrics)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastpatch import metrics as M


def test_exact_match_and_edit_retain() -> None:
    assert M.exact_match_rate([True, False, True, True]) == 0.75
    assert M.edit_retain_rate([True, True, False]) == pytest.approx(2 / 3)
    assert M.exact_match_rate([]) is None  # undefined, not 0


def test_generalization_rate_is_mean_of_per_request_accuracies() -> None:
    # request 1: 1/2 paraphrases right, request 2: 3/3, request 3: none (left out), request 4: 0/1
    per = [[True, False], [True, True, True], [], [False]]
    assert M.generalization_rate(per) == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert M.generalization_rate([[], []]) is None


def test_train_retain_rate_counts_only_pre_correct() -> None:
    pre = [True, True, False, True, False]
    post = [True, False, True, True, False]
    # pre-correct: 0, 1, 3 -> still correct: 0, 3 -> 2/3 (index 2 becoming right does not count)
    assert M.train_retain_rate(pre, post) == pytest.approx(2 / 3)
    assert M.train_retain_rate([False, False], [True, True]) is None
    with pytest.raises(ValueError):
        M.train_retain_rate([True], [True, False])


def test_test_retain_rate_is_normalised_accuracy() -> None:
    pre = [True, False, True, False]  # acc 0.5
    post = [True, False, False, False]  # acc 0.25
    assert M.test_retain_rate(pre, post) == pytest.approx(0.5)
    # edits may fix unrelated held-out samples: the ratio can exceed 1
    assert M.test_retain_rate([True, False, False, False], [True, True, False, False]) == pytest.approx(2.0)
    assert M.test_retain_rate([False, False], [False, True]) is None
    assert M.test_retain_rate([], []) is None


def test_token_agreement_and_locality() -> None:
    assert M.token_agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert M.token_agreement([1, 2, 3, 4], [1, 9, 3, 9]) == 0.5
    assert M.token_agreement([1, 2], [1, 2, 3]) == pytest.approx(2 / 3)  # missing position = changed
    assert M.token_agreement([], []) == 1.0
    per_request = [
        [([1, 2], [1, 2]), ([5, 6], [5, 0])],  # (1 + 0.5) / 2 = 0.75
        [],  # no locality pairs: left out
        [([7], [8])],  # 0
    ]
    assert M.locality(per_request) == pytest.approx((0.75 + 0.0) / 2)
    assert M.locality([[], []]) is None


@pytest.mark.parametrize("q", [0, 10, 50, 90, 99, 100])
def test_percentile_matches_numpy(q: float) -> None:
    xs = [0.3, 1.7, 0.2, 5.0, 2.2, 2.2, 0.9]
    assert M.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_percentile_hand_values() -> None:
    assert M.percentile([1, 2, 3, 4], 50) == 2.5
    assert M.percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 90) == pytest.approx(9.1)
    assert M.percentile([], 50) is None
    with pytest.raises(ValueError):
        M.percentile([1.0], 101)


def test_metric_state_running_values_and_roundtrip() -> None:
    st = M.MetricState()
    st.record_skip()
    st.record_edit(1, success=True, paraphrases=[True, False], seconds=2.0, n_neurons=2)
    st.record_edit(2, success=False, paraphrases=[], seconds=4.0, n_neurons=0, editor_success=False)
    st.record_edit(3, success=True, paraphrases=[True], seconds=3.0, n_neurons=1)
    assert st.position == 4 and st.n_edits == 3 and st.n_skipped == 1
    assert st.sr == pytest.approx(2 / 3)
    assert st.gr == pytest.approx((0.5 + 1.0) / 2)  # request 2 has no paraphrases
    assert st.edited == [1, 2, 3] and st.n_neurons == 3
    point = st.record_eval({"ER": 0.5, "TrainR": 1.0})
    assert point["edits"] == 3 and point["position"] == 4
    cur = st.current()
    assert list(cur) == list(M.METRIC_NAMES)
    assert cur["ER"] == 0.5 and cur["TestR"] is None and cur["SR"] == pytest.approx(2 / 3)
    st.record_eval({"ER": 0.25})  # a metric not measured at a point keeps its last value
    assert st.current()["ER"] == 0.25 and st.current()["TrainR"] == 1.0
    again = M.MetricState.from_dict(json.loads(json.dumps(st.to_dict())))
    assert again == st


def test_empty_state_is_undefined_not_zero() -> None:
    st = M.MetricState()
    assert st.sr is None and st.gr is None
    assert all(v is None for v in st.current().values())


def test_metrics_table_in_docstring_names_every_metric() -> None:
    doc = M.__doc__ or ""
    assert "| Metric |" in doc
    for name in ("SR", "GR", "ER", "TrainR", "TestR", "Rel.", "Gen.", "Loc."):
        assert f"**{name}**" in doc


def test_manual_metrics_table_agrees_with_the_definitions() -> None:
    """The manual's Metrics table (docs/manual.md) documents every metric, with the schedule and
    averaging of fastpatch.metrics (Gen.: at the end only under the T-Patcher protocol; Loc.: per request)."""
    from pathlib import Path

    manual = (Path(__file__).resolve().parents[1] / "docs" / "manual.md").read_text(encoding="utf-8")
    section = manual.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3:
            rows[cells[0].rstrip(".")] = cells
    assert set(M.METRIC_NAMES) <= set(rows)
    doc = M.__doc__ or ""
    assert "(T-Patcher protocol: at the end only)" in doc  # what fastpatch.run.evaluation.evaluate does
    assert "at the end only" in rows["Gen"][2]
    assert "mean over requests" in rows["Loc"][1]  # M.locality: mean over requests of per-request means
    assert M.locality([[([1], [1]), ([2], [3])], [([4], [4])]]) == pytest.approx((0.5 + 1.0) / 2)
