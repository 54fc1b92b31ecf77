"""Sequential-editing metrics: the T-Patcher set and the EasyEdit-style set.

Notation. The stream is processed in order; request *i* has an edit prompt ``x_i`` with target
``y_i``, paraphrases ``P_i`` and locality pairs ``L_i = {(l, z)}``. ``f_t`` is the model after the
first *t* processed requests (``f_0`` is the unedited model). ``ok_t(x, y)`` is 1 when, teacher-forced
on ``x + y``, **every** target token of ``y`` is the model's argmax (``Editor.check``), else 0.
``tok_t(l, z)`` is the list of argmax token ids that ``f_t`` predicts at the positions of ``z``
(``Editor.predict_tokens``). ``E_t`` is the set of requests *edited* among the first *t*
(T-Patcher protocol: those ``f`` got wrong when their turn came; EasyEdit protocol: all of them),
``R_t`` the set of all requests *processed* so far (edited or skipped). A metric whose
denominator is empty is undefined (``None`` / ``null`` / empty cell), never 0.

| Metric | When | Formula | Meaning |
|---|---|---|---|
| **SR** (success rate) | after every edit (running) | ``(1/|E|) sum_{i in E} ok_{i}(x_i, y_i)`` | the edit prompt gives the target right after its own edit |
| **GR** (generalization rate) | after every edit (running) | ``(1/|E'|) sum_{i in E'} (1/|P_i|) sum_{p in P_i} ok_{i}(p, y_i)`` over ``E' = {i in E : P_i != {}}`` | paraphrases of the edit right after its edit (mean of per-edit accuracies) |
| **ER** (edit retain rate) | every K edits and at the end | ``(1/|E_t|) sum_{i in E_t} ok_t(x_i, y_i)`` | earlier edits still hold in the current model |
| **TrainR** | every K edits and at the end | ``|{j in S : ok_t(l_j, z_j)}| / |S|``, ``S = {j in A : ok_0(l_j, z_j)}`` | retain rate on locality samples the unedited model got right (normalised: the pre-edit accuracy on ``S`` is 1 by construction) |
| **TestR** | every K edits and at the end | ``acc_t(B) / acc_0(B)``, ``acc_t(B) = (1/|B|) sum_{j in B} ok_t(l_j, z_j)`` | retain rate on held-out locality samples, normalised by the pre-edit accuracy (may exceed 1) |
| **Rel.** (reliability, exact match) | every K edits and at the end | ``(1/|R_t|) sum_{i in R_t} ok_t(x_i, y_i)`` | every request seen so far, edited or not, gives its target now |
| **Gen.** (generality, exact match) | every K edits and at the end (T-Patcher protocol: at the end only) | ``(1/|R'_t|) sum_{i in R'_t} (1/|P_i|) sum_{p in P_i} ok_t(p, y_i)`` | paraphrases of every request seen so far, now |
| **Loc.** (EasyEdit locality) | every K edits and at the end | ``(1/|R''_t|) sum_{i in R''_t} (1/|L_i|) sum_{(l,z) in L_i} agree(tok_0(l,z), tok_t(l,z))`` | fraction of output tokens unchanged from the pre-edit model |

with ``agree(a, b) = (1/max(|a|,|b|)) sum_k 1[a_k = b_k]`` (a position missing on one side counts as
changed), ``R'_t``/``R''_t`` the requests of ``R_t`` that have paraphrases / locality pairs.

Rel. and Gen. count a prompt right only when *every* target token is the argmax. EasyEdit itself
(and the papers that report its numbers, e.g. WISE) averages the per-token accuracy instead,
``agree(y_i, tok_t(x_i, y_i))``: those are reported beside them as ``Rel_tok`` and ``Gen_tok``,
which equal Rel. and Gen. for one-token targets and are never below them.

Retain sets ``A`` (TrainR) and ``B`` (TestR). Both come from locality pairs ``(prompt, answer)``:
the stream's own locality pairs (or, for the built-in geography stream, every locality fact of the
disjoint locality set), de-duplicated and split into two disjoint halves by a stable hash of the
prompt (``retain_split``). ``A`` stands in for the paper's "training data the model got right
before editing": only the pairs of its half that the unedited model answers correctly are kept.
``B`` stands in for the held-out test data: its half is kept whole (right and wrong), and the
accuracy ratio to the unedited model is reported. Neither half is ever in the editor's memory set.

TrainR and TestR are n/a (``None``) when the unedited model got fewer than ``min_right`` pairs of
their set right (the runner's ``RetainOptions.min_right``, flat name ``min_retain``, default 20): on CounterFact a 135M model
knows few neighbourhood facts, and a rate over six samples or a ratio over a pre-edit accuracy of
0.01 is noise. The summary reports the counts instead.

Beside these, :mod:`fastpatch.run.scores` reports CounterFact's scores (efficacy, paraphrase and
neighbourhood scores and magnitudes, :func:`preference_score`), Rel./Gen. by free greedy generation,
and the model's general ability (perplexity on held-out text, accuracy on questions it answered
right before the stream).

Rel./Gen./Loc. evaluated with the final model over the whole stream are EasyEdit's sequential
editing numbers (WISE's "T = 1000" columns). EasyEdit averages Rel./Gen. per *token*; here they are
exact-match per prompt (all target tokens right), which is stricter. SR equals Rel. measured right
after each edit over the edited requests; ER equals Rel. over the edited requests at time t.

Evaluation cost: all checks are teacher-forced forward passes in batches (``batch_size``, pairs
sorted by length). Gen. reads every paraphrase of every request so far, the largest set, so under
the T-Patcher protocol (where GR already tracks generalization edit by edit) it is computed once,
at the end; a metric not measured at a point keeps its last value in ``edits.jsonl``.

Time per edit is the wall time of ``Editor.edit`` as the runner measures it; the summary reports
its median and 90th percentile (linear interpolation between order statistics, numpy's default).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "METRIC_NAMES",
    "EVAL_METRICS",
    "RUNNING_METRICS",
    "MetricState",
    "edit_retain_rate",
    "exact_match_rate",
    "generalization_rate",
    "locality",
    "mean",
    "percentile",
    "preference_score",
    "test_retain_rate",
    "token_agreement",
    "train_retain_rate",
]

#: Updated after every edit.
RUNNING_METRICS: tuple[str, ...] = ("SR", "GR")
#: Updated every K edits and at the end.
EVAL_METRICS: tuple[str, ...] = ("ER", "TrainR", "TestR", "Rel", "Gen", "Loc")
#: Every headline metric, in table order.
METRIC_NAMES: tuple[str, ...] = RUNNING_METRICS + EVAL_METRICS


# ---------------------------------------------------------------------------------------------
# Pure arithmetic (hand-checkable)
# ---------------------------------------------------------------------------------------------


def mean(values: Iterable[float]) -> float | None:
    """Arithmetic mean; ``None`` for no values."""
    vals = [float(v) for v in values]
    return sum(vals) / len(vals) if vals else None


def exact_match_rate(correct: Sequence[bool]) -> float | None:
    """Fraction of True values (SR, ER, Rel.): ``sum(correct) / len(correct)``; None if empty."""
    return mean(1.0 if c else 0.0 for c in correct)


def edit_retain_rate(correct_now: Sequence[bool]) -> float | None:
    """ER: fraction of the past edit examples the current model still gets right."""
    return exact_match_rate(correct_now)


def generalization_rate(per_request: Sequence[Sequence[bool]]) -> float | None:
    """GR / Gen.: mean over requests (with at least one paraphrase) of the per-request paraphrase
    accuracy. Requests with no paraphrases are left out; None if none has any."""
    return mean(sum(ps) / len(ps) for ps in per_request if len(ps) > 0)


def train_retain_rate(pre: Sequence[bool], post: Sequence[bool], min_right: int = 1) -> float | None:
    """TrainR: ``|{j : pre_j and post_j}| / |{j : pre_j}|`` -- of the samples the unedited model
    got right, the fraction the current model still gets right. None (n/a) if it got fewer than
    ``min_right`` right: a rate over a handful of samples is not reported."""
    if len(pre) != len(post):
        raise ValueError(f"pre and post differ in length ({len(pre)} != {len(post)})")
    kept = [bool(b) for a, b in zip(pre, post) if a]
    if len(kept) < max(1, min_right):
        return None
    return exact_match_rate(kept)


def test_retain_rate(pre: Sequence[bool], post: Sequence[bool], min_right: int = 1) -> float | None:
    """TestR: ``acc(post) / acc(pre)`` on held-out samples (may exceed 1 when edits fix unrelated
    samples). None (n/a) if the unedited model got fewer than ``min_right`` right: a ratio over a
    near-zero denominator is noise, not a rate."""
    if len(pre) != len(post):
        raise ValueError(f"pre and post differ in length ({len(pre)} != {len(post)})")
    if not pre or sum(map(bool, pre)) < max(1, min_right):
        return None
    return (sum(map(bool, post)) / len(post)) / (sum(map(bool, pre)) / len(pre))


test_retain_rate.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def preference_score(preferred: Sequence[float], other: Sequence[float]) -> tuple[float | None, float | None]:
    """A CounterFact score and its magnitude (ROME/MEMIT): from per-prompt mean token
    log-probabilities of the answer that should win (``preferred``) and of the other one,
    ``score = mean(1[lp_pref > lp_other])`` and ``magnitude = mean(exp(lp_pref) - exp(lp_other))``.
    Efficacy and paraphrase scores prefer ``target_new``; the neighbourhood score prefers
    ``target_true``. ``(None, None)`` for no prompts."""
    if len(preferred) != len(other):
        raise ValueError(f"preferred and other differ in length ({len(preferred)} != {len(other)})")
    score = mean(1.0 if a > b else 0.0 for a, b in zip(preferred, other))
    magnitude = mean(math.exp(a) - math.exp(b) for a, b in zip(preferred, other))
    return score, magnitude


def token_agreement(pre: Sequence[int], post: Sequence[int]) -> float:
    """Fraction of positions where two token sequences agree; a position present on one side only
    counts as a disagreement. Two empty sequences agree fully (1.0)."""
    n = max(len(pre), len(post))
    if n == 0:
        return 1.0
    return sum(1 for a, b in zip(pre, post) if a == b) / n


def locality(per_request: Sequence[Sequence[tuple[Sequence[int], Sequence[int]]]]) -> float | None:
    """Loc.: mean over requests (with locality pairs) of the mean :func:`token_agreement` of their
    pairs ``(pre_tokens, post_tokens)``."""
    return mean(
        sum(token_agreement(a, b) for a, b in pairs) / len(pairs) for pairs in per_request if len(pairs) > 0
    )


def percentile(values: Sequence[float], q: float) -> float | None:
    """q-th percentile (0..100) with linear interpolation between order statistics (numpy's
    default method); None for no values."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    xs = sorted(float(v) for v in values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# ---------------------------------------------------------------------------------------------
# Running state (what a checkpoint stores)
# ---------------------------------------------------------------------------------------------


@dataclass
class MetricState:
    """Counters of a stream run, JSON-serialisable (saved in every checkpoint).

    ``position`` is the number of stream records processed (edited or skipped); ``edited`` lists
    the stream indices of edited records, in order; ``evals`` is the history of evaluation points.
    """

    position: int = 0
    n_edits: int = 0
    n_skipped: int = 0
    n_success: int = 0
    n_editor_success: int = 0
    n_already_correct: int = 0
    gr_sum: float = 0.0
    gr_count: int = 0
    n_neurons: int = 0
    edited: list[int] = field(default_factory=list)
    edit_seconds: list[float] = field(default_factory=list)
    eval_seconds: float = 0.0  #: evaluation points (ER, TrainR, ...)
    check_seconds: float = 0.0  #: the post-edit checks of SR/GR
    evals: list[dict[str, Any]] = field(default_factory=list)
    last_eval: dict[str, Any] = field(default_factory=dict)

    # -- updates --------------------------------------------------------------------------

    def record_skip(self) -> None:
        """Count a request the T-Patcher protocol skipped (already right)."""
        self.position += 1
        self.n_skipped += 1

    def record_edit(
        self,
        index: int,
        success: bool,
        paraphrases: Sequence[bool],
        seconds: float,
        n_neurons: int = 0,
        editor_success: bool | None = None,
        already_correct: bool = False,
    ) -> None:
        """One edited record: ``success`` is the post-edit check of its prompt, ``paraphrases``
        the post-edit checks of its paraphrases."""
        self.position += 1
        self.n_edits += 1
        self.edited.append(index)
        self.n_success += int(bool(success))
        self.n_editor_success += int(bool(success if editor_success is None else editor_success))
        self.n_already_correct += int(bool(already_correct))
        if len(paraphrases) > 0:
            self.gr_sum += sum(map(bool, paraphrases)) / len(paraphrases)
            self.gr_count += 1
        self.edit_seconds.append(float(seconds))
        self.n_neurons += int(n_neurons)

    def record_eval(self, values: dict[str, Any]) -> dict[str, Any]:
        """Append an evaluation point (``values`` holds ER, TrainR, ... and eval details)."""
        point = {"edits": self.n_edits, "position": self.position, **values}
        self.evals.append(point)
        self.last_eval = {**self.last_eval, **point}  # a metric not measured now keeps its last value
        return point

    # -- reads ---------------------------------------------------------------------------

    @property
    def sr(self) -> float | None:
        return self.n_success / self.n_edits if self.n_edits else None

    @property
    def gr(self) -> float | None:
        return self.gr_sum / self.gr_count if self.gr_count else None

    def running(self) -> dict[str, float | None]:
        """SR and GR so far."""
        return {"SR": self.sr, "GR": self.gr}

    def current(self) -> dict[str, float | None]:
        """Every headline metric: SR/GR so far, the rest from the latest evaluation point."""
        out: dict[str, float | None] = dict(self.running())
        for name in EVAL_METRICS:
            out[name] = self.last_eval.get(name)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The state as JSON-able data (a checkpoint's ``metrics``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MetricState":
        """A state saved by :meth:`to_dict`."""
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})
