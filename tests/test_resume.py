"""Crash safety: ``kill -9`` a real ``fastpatch run`` subprocess mid-stream, then ``--resume``.

Every request id must appear exactly once in edits.jsonl, in stream order, and the final counts
must be those of the whole stream.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastpatch.cli import main
from fastpatch.run import latest_checkpoint
from tests.test_cli import FAST, make_tiny_model, read_lines, write_stream

N = 12


def _cmd(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fastpatch.cli", "run", "--model", str(model), "--data", str(data),
            "--out", str(out), "--protocol", "easyedit", "--eval-every", "4", "--checkpoint-every", "2",
            "--memory", "none", "--no-progress", "--no-plots", "-q", *FAST, *extra]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def _checkpointed(out: Path) -> int:
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        return -1
    try:
        return json.loads((ckpt / "state.json").read_text())["position"]
    except (OSError, ValueError, KeyError):
        return -1


def _run_and_kill(cmd: list[str], out: Path, min_position: int, timeout: float = 120.0) -> int:
    """Start ``cmd``; once a checkpoint at >= min_position exists and edits.jsonl holds a line past it
    (or 3 s later), ``kill -9`` it. Returns the checkpointed position at the kill."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        seen_at = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(f"the run ended (rc {proc.returncode}) before it could be killed:\n{err[-3000:]}")
            pos = _checkpointed(out)
            if pos >= min_position:
                seen_at = seen_at or time.monotonic()
                if _lines(out / "edits.jsonl") > pos or time.monotonic() - seen_at > 3:
                    break
            time.sleep(0.01)
        else:
            pytest.fail("no checkpoint appeared in time")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        pos = _checkpointed(out)
        print(f"killed at checkpoint {pos}, {_lines(out / 'edits.jsonl')} lines in edits.jsonl")
        return pos
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def test_kill9_then_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_tiny_model(tmp_path / "model")
    data = write_stream(tmp_path / "stream.jsonl", n=N)
    out = tmp_path / "run"

    pos1 = _run_and_kill(_cmd(model, data, out), out, min_position=2)
    assert 2 <= pos1 < N
    assert (out / "run.json").is_file()

    # `fastpatch report` works on the interrupted run (from the checkpointed summary)
    assert main(["report", str(out), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "INTERRUPTED" in printed and f"| requests processed | {pos1}/{N} |" in printed

    # resume, and kill again further on
    pos2 = _run_and_kill(_cmd(model, data, out, "--resume"), out, min_position=pos1 + 2)
    assert pos1 < pos2 < N

    done = subprocess.run(_cmd(model, data, out, "--resume"), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    lines = read_lines(out / "edits.jsonl")
    ids = [ln["id"] for ln in lines]
    assert ids == [f"req-{i}" for i in range(N)]  # every request exactly once, in order
    assert [ln["edits"] for ln in lines] == list(range(1, N + 1))  # counters continue across sessions
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is True
    assert summary["requests"] == summary["edits"] == N
    assert summary["run"]["sessions"] == 3
    assert summary["patches"] == sum(len(ln["patch_ids"]) for ln in lines)
    evals = [e["edits"] for e in read_lines(out / "evals.jsonl")]
    assert evals == sorted(set(evals)) and evals[-1] == N  # no duplicated evaluation points
    assert summary["metrics"]["SR"] == pytest.approx(sum(ln["success"] for ln in lines) / N)
    # only the latest checkpoint is kept, and no temporary directory is left behind
    entries = sorted(p.name for p in (out / "checkpoint").iterdir())
    assert entries == sorted(["LATEST", latest_checkpoint(out).name])
