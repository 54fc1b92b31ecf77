"""Streams: edits per minute over a 200-request zsRE stream, the end-to-end runner included.

``run_stream`` with the EasyEdit protocol (every request edited) on SmolLM2-135M-Instruct:
editing, SR/GR after every edit, ER/Rel/Gen/Loc every 50 edits and at the end, checkpoints,
``edits.jsonl`` and the summary (plots off: they are rendered once and are not per edit).
Reported: edits per minute of the whole stream, and the share of the time spent editing.
``--benchmark``: 200 requests; smoke: 3. Needs the zsRE subset in ../shared/data (skipped
without it).
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import SHARED_DATA

ZSRE = SHARED_DATA / "zsre" / "zsre_mend_eval_portability_gpt4.json"


@pytest.mark.skipif(not ZSRE.exists(), reason="../shared/data/zsre is not present")
def test_stream_edits_per_minute(benchmark, full, tmp_path) -> None:
    from fastpatch.app.geography import load_fanoutqa_questions
    from fastpatch.data import load_stream
    from fastpatch.editor import Editor, EditorConfig
    from fastpatch.app.models import load_smollm2
    from fastpatch.run import run_stream

    n = 200 if full else 3
    model, tok = load_smollm2()
    stream = load_stream(ZSRE, limit=n)
    memory = load_fanoutqa_questions()[: 400 if full else 20]
    benchmark.group = "stream: zsRE, SmolLM2, runner end to end"
    out = {}

    def run():
        ed = Editor(model, tok, EditorConfig())
        t0 = time.perf_counter()
        out["summary"] = run_stream(ed, stream, tmp_path / "run", protocol="easyedit", eval_every=50,
                                    memory_texts=memory, progress=False, plots=False)
        out["seconds"] = time.perf_counter() - t0
        ed.ffn.unwrap()

    benchmark.pedantic(run, rounds=1, iterations=1)
    s = out["summary"]
    n_edits = s.get("edits") or s.get("n_edits") or n
    benchmark.extra_info.update({
        "requests": n,
        "edits_per_minute": 60 * n / out["seconds"],
        "stream_seconds": out["seconds"],
        "summary_metrics": s.get("metrics"),
        "edits_reported": n_edits,
    })
    assert out["seconds"] > 0 and (tmp_path / "run" / "edits.jsonl").exists()
    assert len((tmp_path / "run" / "edits.jsonl").read_text().splitlines()) == n
