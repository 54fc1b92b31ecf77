"""Checkpoints: write one (crash-safe) and restore a run's state from one.

Every ``checkpoint_every`` edits (and at the end) edits.jsonl/evals.jsonl are flushed and fsynced,
the editor is saved into a fresh temporary directory together with ``state.json`` (stream
position, metric state, the byte length of the two JSONL files), the directory is renamed into
place and ``LATEST`` is replaced atomically. A checkpoint is thus either complete or invisible.
A resume restores the state and truncates the JSONL files to their checkpointed length (dropping
the lines of edits done after it): no edit is lost or repeated.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..atomic import atomic_directory, write_atomic, write_json_atomic
from ..metrics import MetricState
from .identity import editor_state_id
from .errors import RunError
from .rundir import STATE_VERSION, read_state, truncate
from .session import RunSession
from .summary import build_summary, peak_memory

__all__ = ["restore", "write_checkpoint"]

log = logging.getLogger("fastpatch.run")


def write_checkpoint(run: RunSession, run_info: dict[str, Any]) -> Path:
    """Checkpoint the run (module docstring), drop older checkpoints, and write a partial summary
    beside it (so ``fastpatch report`` works mid-run); return the checkpoint's directory."""
    st, paths = run.state, run.paths
    for fh in (run.edits_fh, run.evals_fh):
        fh.flush()
        os.fsync(fh.fileno())
    name = f"ckpt-{st.n_edits:07d}-{st.position:07d}"
    if (paths.checkpoints / name).exists():  # same position checkpointed before: never touch the current one
        name = f"{name}-{time.time_ns()}"
    final = paths.checkpoints / name
    with atomic_directory(final) as tmp:
        run.ed.save(tmp / "editor")
        mem = peak_memory()
        write_json_atomic(tmp / "state.json", {
            "version": STATE_VERSION,
            "position": st.position,
            "n_edits": st.n_edits,
            "edits_bytes": os.fstat(run.edits_fh.fileno()).st_size,  # flushed + fsynced above
            "evals_bytes": os.fstat(run.evals_fh.fileno()).st_size,
            "editor": editor_state_id(run.ed),
            "num_patches": run.num_patches(),
            "fingerprints": run_info["fingerprints"],
            "wall_seconds": run.wall_seconds(),
            "peak_rss_mib": max(run.peak_rss_before, mem["peak_rss_mib"] or 0.0),
            "memory_set": run.memory,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "metrics": st.to_dict(),
        })
    # The pointer flips atomically; until then the previous checkpoint stays current.
    write_atomic(paths.latest, name + "\n")
    for old in paths.checkpoints.iterdir():  # older checkpoints, leftovers of killed writes
        if old.name in (name, "LATEST"):
            continue
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    run.last_ckpt_edits = st.n_edits
    from ..report import write_summary

    write_summary(paths.root, build_summary(run, run_info, complete=st.position >= run.n_total))
    log.debug("checkpoint %s (%d requests, %d edits)", name, st.position, st.n_edits)
    return final


def restore(run: RunSession, ckpt: Path) -> None:
    """Continue ``run`` from checkpoint ``ckpt``: check the editor holds it, restore the metric
    state and cut the JSONL files back to their checkpointed length.

    Raises:
        RunError: the editor does not hold the checkpoint, or the checkpoint is past ``limit``.
    """
    state = read_state(ckpt)
    now = editor_state_id(run.ed)
    if state.get("editor") != now:
        was = state.get("editor", {})
        raise RunError(
            f"the editor does not hold checkpoint {ckpt.name} (it has {now['num_patches']} patches "
            f"from {now['n_edits']} edits; the checkpoint {was.get('num_patches')} from "
            f"{was.get('n_edits')}): load it with "
            f"Editor.load({str(ckpt / 'editor')!r}, model, tokenizer) before resuming"
        )
    if int(state["position"]) > run.n_total:
        raise RunError(
            f"checkpoint {ckpt.name} has already processed {state['position']} requests, more than the "
            f"{run.n_total} asked for now (limit {run.options.limit}); resume with a limit of at least "
            f"{state['position']} (or none), or start over with --overwrite (or another --out)")
    run.state = MetricState.from_dict(state["metrics"])
    run.wall_before = float(state.get("wall_seconds", 0.0))
    run.peak_rss_before = float(state.get("peak_rss_mib", 0.0))
    run.last_ckpt_edits = run.state.n_edits
    run.memory = dict(state.get("memory_set") or {})
    truncate(run.paths.edits, int(state["edits_bytes"]))
    truncate(run.paths.evals, int(state["evals_bytes"]))
    log.info("resuming %s from %s: %d requests done, %d edits, %d patches",
             run.paths.root, ckpt.name, run.state.position, run.state.n_edits, run.num_patches())
