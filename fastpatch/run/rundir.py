"""The run directory: its files, how they are read back, and the one start/resume/overwrite policy.

Policy (:func:`plan_start`, used by :func:`fastpatch.run.run_stream` and by the CLI before it
loads the model, so both decide alike):

* ``resume``: continue the run in the directory from its latest checkpoint (a fresh start when it
  holds no run); another model, data or protocol is refused (:class:`RunMismatchError`), and so is
  a damaged checkpoint (:class:`RunError`).
* ``overwrite``: delete whatever the directory holds and start over.
* neither: a *finished* run (``summary.json`` says ``complete``) is replaced, with a warning; an
  unfinished one is refused with :class:`RunExistsError` (it may be worth resuming).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RunError, RunExistsError
from .identity import check_resume

__all__ = [
    "STATE_VERSION",
    "RunPaths",
    "StartPlan",
    "clear_run",
    "latest_checkpoint",
    "plan_start",
    "read_json",
    "read_run_info",
    "read_state",
    "truncate",
]

log = logging.getLogger("fastpatch.run")

#: Version of a checkpoint's state.json.
STATE_VERSION = 1
_START_OVER = "start over with --overwrite (or another --out)"


@dataclass(frozen=True)
class RunPaths:
    """Where a run's files live."""

    root: Path

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def baseline(self) -> Path:
        return self.root / "baseline.json"

    @property
    def edits(self) -> Path:
        return self.root / "edits.jsonl"

    @property
    def evals(self) -> Path:
        return self.root / "evals.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoint"

    @property
    def latest(self) -> Path:
        return self.checkpoints / "LATEST"

    @property
    def summary_json(self) -> Path:
        return self.root / "summary.json"

    @property
    def summary_csv(self) -> Path:
        return self.root / "summary.csv"

    @property
    def activations(self) -> Path:
        return self.root / "activations.npz"

    @property
    def per_request(self) -> Path:
        """The final evaluation per request (which records fail, and where)."""
        return self.root / "per_request.jsonl"

    def outputs(self) -> tuple[Path, ...]:
        """The files a fresh start removes (run.json and the checkpoints aside)."""
        return (self.edits, self.evals, self.summary_json, self.summary_csv, self.activations, self.per_request)


def read_json(path: Path) -> Any:
    """A run file's JSON; a corrupt or truncated file is a :class:`RunError` naming it."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise RunError(f"{path} is corrupt or truncated (not valid JSON: {err}); {_START_OVER}") from None


def latest_checkpoint(out_dir: str | os.PathLike[str], strict: bool = False) -> Path | None:
    """The directory of the run's latest complete checkpoint (holding ``editor/`` and
    ``state.json``), or None if there is none.

    Args:
        out_dir: the run directory.
        strict: raise :class:`RunError` when ``checkpoint/LATEST`` exists but names no complete
            checkpoint (a damaged run directory: ``LATEST`` is only written once its checkpoint is
            complete), instead of returning None as for a run that has no checkpoint yet.
    """
    paths = RunPaths(Path(out_dir))
    try:
        name = paths.latest.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    ckpt = paths.checkpoints / name
    if not name or not (ckpt / "state.json").is_file():
        if strict:
            raise RunError(
                f"{paths.latest} names checkpoint {name!r}, but {ckpt / 'state.json'} is missing: the checkpoint "
                f"is damaged, so the run cannot resume; {_START_OVER}")
        return None
    return ckpt


def read_state(ckpt: Path) -> dict[str, Any]:
    """A checkpoint's state.json, checked for its version and the fields a resume reads."""
    state = read_json(ckpt / "state.json")
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        version = state.get("version") if isinstance(state, dict) else None
        raise RunError(f"{ckpt / 'state.json'}: checkpoint state version {version!r} is not {STATE_VERSION} "
                       f"(written by another fastpatch version?); {_START_OVER}")
    missing = [k for k in ("position", "n_edits", "edits_bytes", "evals_bytes", "metrics") if k not in state]
    if missing:
        raise RunError(f"{ckpt / 'state.json'} lacks {', '.join(missing)}: the checkpoint is damaged; {_START_OVER}")
    return state


def checkpoint_position(out: Path) -> int | None:
    """The stream position of the latest checkpoint, or None without one."""
    ck = latest_checkpoint(out)
    if ck is None:
        return None
    return int(read_json(ck / "state.json").get("position", -1))


def read_run_info(out_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``run.json`` of a run directory, or None (:class:`RunError` if it is corrupt)."""
    p = RunPaths(Path(out_dir)).run_json
    return read_json(p) if p.is_file() else None


def truncate(path: Path, size: int) -> None:
    """Cut a JSONL file back to the ``size`` bytes a checkpoint recorded (lines written after it)."""
    if not path.exists():
        if size:
            raise RunError(f"{path} is missing but the checkpoint expects {size} bytes of it")
        path.touch()
        return
    actual = path.stat().st_size
    if actual < size:
        raise RunError(f"{path} holds {actual} bytes, fewer than the {size} the checkpoint recorded")
    if actual > size:
        with open(path, "r+b") as fh:
            fh.truncate(size)
            fh.flush()
            os.fsync(fh.fileno())


def clear_run(paths: RunPaths) -> None:
    """Delete a run's files (for a fresh start in the same directory)."""
    for p in (paths.run_json, paths.baseline, *paths.outputs()):
        p.unlink(missing_ok=True)
    shutil.rmtree(paths.checkpoints, ignore_errors=True)


def _finished(paths: RunPaths) -> bool:
    try:
        return bool(json.loads(paths.summary_json.read_text(encoding="utf-8")).get("complete"))
    except (OSError, ValueError, AttributeError):
        return False


@dataclass(frozen=True)
class StartPlan:
    """What :func:`plan_start` decided: the run to resume (its run.json and latest checkpoint),
    or a fresh start, clearing what the directory holds when ``replace``."""

    existing: dict[str, Any] | None
    checkpoint: Path | None
    replace: bool


def plan_start(
    out_dir: str | os.PathLike[str], *, resume: bool, overwrite: bool, fingerprints: dict[str, Any] | None = None
) -> StartPlan:
    """Apply the start/resume/overwrite policy (module docstring) to ``out_dir``; nothing is changed.

    Args:
        fingerprints: the new run's (see :func:`fastpatch.run.identity.check_resume`); a resume
            with other fingerprints is refused. None: not checked here.

    Raises:
        RunExistsError: an unfinished run, and neither ``resume`` nor ``overwrite``.
        RunMismatchError: ``resume`` with another model, data or protocol.
        RunError: a corrupt run.json or a damaged checkpoint on ``resume``.
    """
    out = Path(out_dir)
    paths = RunPaths(out)
    if not paths.run_json.is_file():
        if resume:
            log.info("%s holds no run yet: starting a new one", out)
        return StartPlan(None, None, replace=False)
    if overwrite and not resume:  # whatever it holds, even a corrupt run.json
        return StartPlan(None, None, replace=True)
    existing = read_run_info(out)
    if not resume:
        if not _finished(paths):
            raise RunExistsError(f"{out} holds an unfinished run: pass --resume (resume=True) to continue it, or "
                                 f"--overwrite (overwrite=True) to start over")
        log.warning("%s holds a finished run: replacing it (pass another --out to keep it)", out)
        return StartPlan(None, None, replace=True)
    if fingerprints is not None:
        check_resume(existing or {}, fingerprints)
    return StartPlan(existing, latest_checkpoint(out, strict=True), replace=False)
