"""Run reports (fastpatch.report) from a hand-written run directory: no model needed."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from fastpatch.report import flatten, format_table, load_run, render_plots, report, write_summary

SUMMARY = {
    "complete": True, "model": "tiny", "data": "s.jsonl", "protocol": "easyedit", "requests": 3,
    "requests_total": 3, "edits": 2, "skipped_correct": 1, "patches": 3, "neurons_per_edit": 1.5,
    "metrics": {"SR": 1.0, "GR": 0.5, "ER": 1.0, "TrainR": 0.9, "TestR": 1.0, "Rel": 1.0, "Gen": 0.5, "Loc": 0.875},
    "time": {"edit_seconds_median": 0.25, "edit_seconds_p90": 0.5, "wall_seconds": 3.0},
    "memory_set": {"texts": 10, "vectors": 120}, "peak_memory": {"rss_mib": 512.0, "cuda_mib": None},
    "skipped_rows": [[4, "target", "empty string"]], "run": {"cli": {"out": "x"}},
}


def _edit(i: int, action: str = "edit", seconds: float = 0.25) -> dict:
    return {"i": i, "id": str(i), "action": action, "seconds": seconds, "edits": i, "patches": i,
            "metrics": {"SR": 1.0, "GR": 0.5}}


def _run_dir(tmp_path: Path, summary: dict | None = SUMMARY) -> Path:
    out = tmp_path / "run"
    out.mkdir()
    lines = [_edit(0), _edit(1, "skip"), _edit(2, seconds=0.5)]
    (out / "edits.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    evals = [{"edits": 0, "position": 0, "TrainR": 1.0, "patches": 0},
             {"edits": 2, "position": 3, "ER": 1.0, "TrainR": 0.9, "TestR": 1.0, "Loc": 0.875, "patches": 3}]
    (out / "evals.jsonl").write_text("".join(json.dumps(x) + "\n" for x in evals))
    if summary is not None:
        write_summary(out, summary)
    return out


def test_flatten_nests_with_dots_and_lists_as_json() -> None:
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": 1, "a.c": "[1, 2]", "d": None}


def test_write_summary_writes_json_and_one_row_csv(tmp_path: Path) -> None:
    out = _run_dir(tmp_path)
    assert json.loads((out / "summary.json").read_text()) == SUMMARY
    rows = list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))
    assert len(rows) == 1 and rows[0]["metrics.Loc"] == "0.875" and rows[0]["peak_memory.cuda_mib"] == ""
    assert "run.cli.out" not in rows[0]  # the run's options stay in summary.json only
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_format_table_shows_metrics_and_the_run() -> None:
    table = format_table(SUMMARY)
    assert "| Loc. (EasyEdit locality) | 0.875 |" in table
    assert "| status | complete |" in table and "| requests processed | 3/3 |" in table
    assert "| memory set (texts -> vectors) | 10 -> 120 |" in table
    assert "| malformed rows skipped | 1 |" in table and "CUDA" not in table
    assert "INTERRUPTED" in format_table({**SUMMARY, "complete": False})


def test_load_run_counts_lines_beyond_the_checkpoint_and_ignores_a_torn_line(tmp_path: Path) -> None:
    out = _run_dir(tmp_path, {**SUMMARY, "requests": 2, "complete": False})
    with open(out / "edits.jsonl", "a") as fh:
        fh.write('{"i": 3, "act')  # a kill mid-write
    run = load_run(out)
    assert len(run["edits"]) == 3 and len(run["evals"]) == 2
    assert run["beyond_checkpoint"] == 1


def test_load_run_without_summary_rebuilds_one_from_edits(tmp_path: Path) -> None:
    run = load_run(_run_dir(tmp_path, summary=None))
    s = run["summary"]
    assert (s["complete"], s["requests"], s["edits"], s["skipped_correct"]) == (False, 3, 2, 1)
    assert s["time"]["edit_seconds_median"] == pytest.approx(0.375)
    with pytest.raises(FileNotFoundError, match="holds no fastpatch run"):
        load_run(tmp_path)
    (tmp_path / "run" / "summary.json").write_text('{"complete": tr')
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_run(tmp_path / "run")


def test_render_plots_and_report(tmp_path: Path) -> None:
    out = _run_dir(tmp_path)
    made = render_plots(out)
    assert [p.name for p in made] == ["metrics.png", "latency.png"]  # no activations: no heatmap
    np.savez_compressed(out / "activations.npz", activations=np.eye(2, 3, dtype=np.float32), rows=np.arange(2),
                        ids=np.asarray(["0", "2"]))
    buf = io.StringIO()
    summary = report(out, plots=True, file=buf)
    assert summary == SUMMARY
    text = buf.getvalue()
    assert "| SR (success rate) | 1.000 |" in text and "heatmap.png" in text
    for name in ("metrics.png", "heatmap.png", "latency.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
