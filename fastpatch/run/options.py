"""How a stream is run: :class:`RunOptions` and its groups (everything but the editor, the stream
and the directory).

The top level says what the loop does (protocol, evaluation and checkpoint cadence, limit,
start policy, batch size, memory corpus); each concern apart from the loop is a small frozen
group, as PEFT keeps a method's config apart from its runtime options:

* :class:`RetainOptions`: the TrainR/TestR sets and when they are too small to report;
* :class:`ScoreOptions`: general ability (held-out perplexity, before-right questions) and free
  generation scores;
* :class:`OutputOptions`: progress bar, plots, heatmap size, per-line callback, extra run facts;
* :class:`RunIdentity`: what identifies the model and the data for resume.

Every group field also has a flat name (``retain_size``, ``plots``, ``model_id``: the table
:data:`FLAT_FIELDS`), so ``run_stream(..., retain_size=50, plots=False)`` and
``options.replace(plots=False)`` work without building the groups by hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FLAT_FIELDS", "PROTOCOLS", "OutputOptions", "RetainOptions", "RetainSets", "RunIdentity",
           "RunOptions", "ScoreOptions"]

PROTOCOLS: tuple[str, ...] = ("tpatcher", "easyedit")

#: ``(A, B)``: the TrainR candidates and the TestR set.
RetainSets = tuple[Sequence[tuple[str, str]], Sequence[tuple[str, str]]]


@dataclass(frozen=True)
class RetainOptions:
    """The TrainR/TestR retain sets.

    Attributes:
        pairs: ``(prompt, answer)`` pairs to draw them from (default: every locality pair of the
            stream), split by :func:`fastpatch.run.evaluation.retain_split`, at most ``size`` per
            half.
        sets: ``(A, B)`` given explicitly instead of splitting ``pairs``; each keeps its first
            ``size`` distinct pairs.
        size: most pairs per set (None: no cap).
        min_right: TrainR and TestR are reported (not n/a) only when the unedited model got at
            least this many pairs of their set right: a rate over a handful of samples, or a ratio
            over a near-zero pre-edit accuracy, is noise.
    """

    pairs: Sequence[tuple[str, str]] | None = None
    sets: RetainSets | None = None
    size: int | None = 200
    min_right: int = 20

    def __post_init__(self) -> None:
        if self.size is not None and self.size < 0:
            raise ValueError(f"retain size must be >= 0 or None, got {self.size}")
        if self.min_right < 0:
            raise ValueError(f"min_right (min_retain) must be >= 0, got {self.min_right}")


@dataclass(frozen=True)
class ScoreOptions:
    """Scores beside the stream's own metrics (:mod:`fastpatch.run.scores`).

    Attributes:
        ability_texts: held-out texts whose perplexity (``PPL``) is measured before the stream and
            at every evaluation point.
        ability_pairs: ``(question, answer)`` pairs unrelated to the stream; those the unedited
            model answers right are the set ``Ability`` is measured on.
        generation: at the end, also score every prompt and paraphrase by free greedy generation
            (``Rel_gen``, ``Gen_gen``).
    """

    ability_texts: Sequence[str] | None = None
    ability_pairs: Sequence[tuple[str, str]] | None = None
    generation: bool = True


@dataclass(frozen=True)
class OutputOptions:
    """What the run shows and writes beside its metrics.

    Attributes:
        progress: show a tqdm progress bar (rate and ETA).
        plots: render the PNG plots at the end.
        heatmap_max_edits: compute patch activations for at most this many edit prompts.
        on_record: called with each edits.jsonl line after it is written.
        run_info: extra JSON-able facts stored in run.json and the summary (e.g. CLI options).
    """

    progress: bool = True
    plots: bool = True
    heatmap_max_edits: int = 2000
    on_record: Callable[[dict[str, Any]], None] | None = field(default=None, repr=False)
    run_info: dict[str, Any] | None = None


@dataclass(frozen=True)
class RunIdentity:
    """What identifies the run's inputs (:mod:`fastpatch.run.identity`).

    Attributes:
        model: what identifies the model for resume (see
            :func:`fastpatch.run.identity.model_fingerprint`; default: derived from ``editor.model``).
        data: extra data identity stored in run.json (e.g. ``file_fingerprint``); the refusal to
            resume on other data is based on the stream's own fingerprint.
    """

    model: dict[str, Any] | str | None = None
    data: dict[str, Any] | None = None


#: flat name -> (group, field): the names ``run_stream(**fields)`` and :meth:`RunOptions.replace`
#: accept for the groups' fields.
FLAT_FIELDS: dict[str, tuple[str, str]] = {
    "retain_pairs": ("retain", "pairs"),
    "retain_sets": ("retain", "sets"),
    "retain_size": ("retain", "size"),
    "min_retain": ("retain", "min_right"),
    "ability_texts": ("scores", "ability_texts"),
    "ability_pairs": ("scores", "ability_pairs"),
    "generation_metrics": ("scores", "generation"),
    "progress": ("output", "progress"),
    "plots": ("output", "plots"),
    "heatmap_max_edits": ("output", "heatmap_max_edits"),
    "on_record": ("output", "on_record"),
    "run_info": ("output", "run_info"),
    "model_id": ("identity", "model"),
    "data_id": ("identity", "data"),
}


@dataclass(frozen=True)
class RunOptions:
    """How a stream is run.

    Attributes:
        protocol: ``"tpatcher"`` (edit only what the current model gets wrong) or ``"easyedit"``
            (edit every request).
        eval_every: evaluate ER/TrainR/TestR/Rel/Gen/Loc every this many edits (0: only at the end).
        checkpoint_every: checkpoint every this many edits (default: ``eval_every``, or 50 when that
            is 0). A checkpoint is always written at the end.
        eval_sample: score the intermediate evaluation points on a fixed random sample of this many
            of the requests so far (0: all of them), so a long stream's curve costs little; the
            final point always scores every request.
        limit: process only the first ``limit`` requests.
        resume: continue the run in the directory from its latest checkpoint.
        overwrite: delete a run already in the directory and start over (see
            :func:`fastpatch.run.rundir.plan_start` for the whole policy).
        batch_size: evaluation batch size.
        memory_texts: the T-Patcher memory corpus, passed to ``editor.build_memory`` on a fresh
            start (a resumed editor carries its memory in the checkpoint).
        retain: the TrainR/TestR sets (:class:`RetainOptions`).
        scores: general ability and generation scores (:class:`ScoreOptions`).
        output: progress, plots and callbacks (:class:`OutputOptions`).
        identity: model and data identity for resume (:class:`RunIdentity`).

    Build it directly, or with flat names for the groups' fields
    (``RunOptions.create(protocol="easyedit", retain_size=50, plots=False)``).
    """

    protocol: str = "tpatcher"
    eval_every: int = 50
    checkpoint_every: int | None = None
    eval_sample: int = 0
    limit: int | None = None
    resume: bool = False
    overwrite: bool = False
    batch_size: int = 32
    memory_texts: Sequence[str] | None = None
    retain: RetainOptions = field(default_factory=RetainOptions)
    scores: ScoreOptions = field(default_factory=ScoreOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    identity: RunIdentity = field(default_factory=RunIdentity)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.eval_sample < 0:
            raise ValueError(f"eval_sample must be >= 0, got {self.eval_sample}")
        if self.checkpoint_every is not None and self.checkpoint_every <= 0:
            raise ValueError(f"checkpoint_every must be > 0, got {self.checkpoint_every}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {self.batch_size}")

    @classmethod
    def create(cls, **fields: Any) -> RunOptions:
        """Options from top-level fields, groups, and flat names of group fields (:data:`FLAT_FIELDS`)."""
        return cls().replace(**fields)

    def replace(self, **fields: Any) -> RunOptions:
        """A copy with some fields changed: top-level names, whole groups, or flat names of
        group fields (applied on top of the groups given in the same call).

        Raises:
            TypeError: a name that is neither a field nor a flat name.
        """
        top = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(k for k in fields if k not in top and k not in FLAT_FIELDS)
        if unknown:
            raise TypeError(f"unknown run option(s) {unknown}; known: {sorted(top | set(FLAT_FIELDS))}")
        changes = {k: v for k, v in fields.items() if k in top}
        per_group: dict[str, dict[str, Any]] = {}
        for name, value in fields.items():
            if name in FLAT_FIELDS:
                group, attr = FLAT_FIELDS[name]
                per_group.setdefault(group, {})[attr] = value
        for group, attrs in per_group.items():
            changes[group] = dataclasses.replace(changes.get(group, getattr(self, group)), **attrs)
        return dataclasses.replace(self, **changes)

    @property
    def checkpoint_interval(self) -> int:
        """``checkpoint_every``, or its default: ``eval_every``, or 50 when that is 0."""
        return self.checkpoint_every if self.checkpoint_every is not None else (self.eval_every or 50)
