"""The state one invocation of :func:`fastpatch.run.run_stream` shares."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic import json_default
from ..metrics import MetricState
from .options import RunOptions
from .rundir import RunPaths

if TYPE_CHECKING:  # pragma: no cover
    from ..data.formats import EditRecord

__all__ = ["RunSession", "fmt"]


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
