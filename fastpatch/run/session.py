"""The options of a run and the state one invocation of :func:`fastpatch.run.run_stream` shares."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic import json_default
from ..metrics import MetricState
from .rundir import RunPaths

if TYPE_CHECKING:  # pragma: no cover
    from ..data.formats import EditRecord

__all__ = ["PROTOCOLS", "RetainSets", "RunOptions", "RunSession", "fmt"]

PROTOCOLS: tuple[str, ...] = ("tpatcher", "easyedit")

#: ``(A, B)``: the TrainR candidates and the TestR set.
RetainSets = tuple[Sequence[tuple[str, str]], Sequence[tuple[str, str]]]


@dataclass
class RunOptions:
    """How a stream is run (everything but the editor, the stream and the directory).

    Attributes:
        protocol: ``"tpatcher"`` (edit only what the current model gets wrong) or ``"easyedit"``
            (edit every request).
        eval_every: evaluate ER/TrainR/TestR/Rel/Gen/Loc every this many edits (0: only at the end).
        checkpoint_every: checkpoint every this many edits (default: ``eval_every``, or 50 when that
            is 0). A checkpoint is always written at the end.
        limit: process only the first ``limit`` requests.
        resume: continue the run in the directory from its latest checkpoint.
        overwrite: delete a run already in the directory and start over (see
            :func:`fastpatch.run.rundir.plan_start` for the whole policy).
        memory_texts: the T-Patcher memory corpus, passed to ``editor.build_memory`` on a fresh
            start (a resumed editor carries its memory in the checkpoint).
        retain_pairs: ``(prompt, answer)`` pairs for TrainR/TestR (default: every locality pair of
            the stream), split by :func:`fastpatch.run.evaluation.retain_split`, at most
            ``retain_size`` per half.
        retain_sets: ``(A, B)`` given explicitly instead of splitting ``retain_pairs``; each keeps
            its first ``retain_size`` distinct pairs.
        retain_size: most pairs per TrainR/TestR set.
        min_retain: TrainR and TestR are reported (not n/a) only when the unedited model got at
            least this many pairs of their set right: a rate over a handful of samples, or a ratio
            over a near-zero pre-edit accuracy, is noise.
        ability_texts: held-out texts whose perplexity (``PPL``) is measured before the stream
            and at every evaluation point (:mod:`fastpatch.run.scores`).
        ability_pairs: ``(question, answer)`` pairs unrelated to the stream; those the unedited
            model answers right are the set ``Ability`` is measured on.
        generation_metrics: at the end, also score every prompt and paraphrase by free greedy
            generation (``Rel_gen``, ``Gen_gen``).
        batch_size: evaluation batch size.
        model_id: what identifies the model for resume (see
            :func:`fastpatch.run.identity.model_fingerprint`; default: derived from ``editor.model``).
        data_id: extra data identity stored in run.json (e.g. ``file_fingerprint``); the refusal to
            resume on other data is based on the stream's own fingerprint.
        run_info: extra JSON-able facts stored in run.json and the summary (e.g. CLI options).
        progress: show a tqdm progress bar (rate and ETA).
        plots: render the PNG plots at the end.
        heatmap_max_edits: compute patch activations for at most this many edit prompts.
        on_record: called with each edits.jsonl line after it is written.
    """

    protocol: str = "tpatcher"
    eval_every: int = 50
    checkpoint_every: int | None = None
    limit: int | None = None
    resume: bool = False
    overwrite: bool = False
    memory_texts: Sequence[str] | None = None
    retain_pairs: Sequence[tuple[str, str]] | None = None
    retain_sets: RetainSets | None = None
    retain_size: int | None = 200
    min_retain: int = 20
    ability_texts: Sequence[str] | None = None
    ability_pairs: Sequence[tuple[str, str]] | None = None
    generation_metrics: bool = True
    batch_size: int = 32
    model_id: dict[str, Any] | str | None = None
    data_id: dict[str, Any] | None = None
    run_info: dict[str, Any] | None = None
    progress: bool = True
    plots: bool = True
    heatmap_max_edits: int = 2000
    on_record: Callable[[dict[str, Any]], None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.checkpoint_every is not None and self.checkpoint_every <= 0:
            raise ValueError(f"checkpoint_every must be > 0, got {self.checkpoint_every}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")

    @property
    def checkpoint_interval(self) -> int:
        """``checkpoint_every``, or its default: ``eval_every``, or 50 when that is 0."""
        return self.checkpoint_every if self.checkpoint_every is not None else (self.eval_every or 50)


class RunSession:
    """One invocation of :func:`fastpatch.run.run_stream`: the editor, the records, the options and
    the state the loop, the evaluation and the checkpoints share."""

    def __init__(self, editor: Any, records: Sequence[EditRecord], out_dir: Path, options: RunOptions) -> None:
        self.ed = editor
        self.records = records
        self.paths = RunPaths(out_dir)
        self.options = options
        self.protocol = options.protocol
        self.n_total = len(records) if options.limit is None else min(options.limit, len(records))
        self.state = MetricState()
        self.baseline: dict[str, Any] = {}
        self.session_start = time.perf_counter()
        self.wall_before = 0.0  # wall seconds of earlier sessions (resume)
        self.peak_rss_before = 0.0
        self.edits_fh: Any = None
        self.evals_fh: Any = None
        self.last_ckpt_edits = -1
        self.memory: dict[str, Any] = {}  # memory corpus: texts, vectors, seconds
        #: classifiers: target text -> class index (see :func:`fastpatch.run.evaluation.classification_labels`)
        self.labels: dict[str, int] | None = None

    def num_patches(self) -> int:
        """The editor's patch count (-1 when it cannot say)."""
        try:
            return int(self.ed.num_patches)
        except Exception:  # noqa: BLE001
            return -1

    @staticmethod
    def write_line(fh: Any, obj: dict[str, Any]) -> None:
        """Append one JSON line to an open JSONL file and flush it."""
        fh.write(json.dumps(obj, ensure_ascii=False, default=json_default) + "\n")
        fh.flush()

    def wall_seconds(self) -> float:
        """Wall seconds of the run so far, earlier sessions included."""
        return self.wall_before + (time.perf_counter() - self.session_start)


def fmt(v: Any) -> str:
    """A metric for a log line: ``-`` for None, three decimals for floats."""
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
