"""``run_stream`` in-process with the real Editor on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastpatch.data.formats import load_stream
from fastpatch.editor import Editor, EditorConfig
from fastpatch.metrics import METRIC_NAMES
from fastpatch.run import (
    RunError, RunExistsError, RunMismatchError, latest_checkpoint, retain_split, run_stream,
)
from tests.test_cli import _one_thread, make_tiny_model, read_lines, stream_rows, tiny, write_stream  # noqa: F401 (fixtures)

CFG = dict(max_steps=30)




def _editor(model_dir: Path, ckpt: Path | None = None) -> Editor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if ckpt is not None:
        return Editor.load(ckpt / "editor", model, tok)
    return Editor(model, tok, config=EditorConfig(**CFG))


def _records(tmp_path: Path, n: int):
    return load_stream(write_stream(tmp_path / "stream.jsonl", n=n)).records


class Crash(Exception):
    pass


def test_retain_split_is_stable_and_disjoint() -> None:
    pairs = [(f"prompt {i}", f"a{i}") for i in range(40)] + [("prompt 3", "dup")]
    a, b = retain_split(pairs)
    assert {p for p, _ in a}.isdisjoint({p for p, _ in b})
    assert len(a) + len(b) == 40  # de-duplicated by prompt
    a2, b2 = retain_split(list(reversed(pairs[:40])))
    assert {p for p, _ in a2} == {p for p, _ in a} and {p for p, _ in b2} == {p for p, _ in b}
    a3, b3 = retain_split(pairs, size=3)
    assert len(a3) == 3 and len(b3) == 3


def test_run_stream_outputs_and_eval_schedule(tiny: Path, tmp_path: Path) -> None:
    records = _records(tmp_path, 7)
    seen: list[dict] = []
    out = tmp_path / "run"
    summary = run_stream(_editor(tiny), records, out, protocol="easyedit", eval_every=2, checkpoint_every=3,
                         progress=False, plots=False, on_record=seen.append, memory_texts=["Some unrelated text."])
    assert summary["complete"] and summary["edits"] == 7
    assert [ln["id"] for ln in seen] == [r.id for r in records]
    assert read_lines(out / "edits.jsonl") == json.loads(json.dumps(seen))
    evals = read_lines(out / "evals.jsonl")
    assert [e["edits"] for e in evals] == [0, 2, 4, 6, 7]
    assert set(METRIC_NAMES) <= set(summary["metrics"])
    # SR is the running mean of the per-edit post-edit checks
    assert summary["metrics"]["SR"] == pytest.approx(sum(ln["success"] for ln in seen) / 7)
    # the final checkpoint is at the end of the stream
    ckpt = latest_checkpoint(out)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["position"] == 7 and state["edits_bytes"] == (out / "edits.jsonl").stat().st_size
    assert (out / "activations.npz").is_file() == (summary["patches"] > 0)


def test_crash_then_resume_edits_each_request_once(tiny: Path, tmp_path: Path) -> None:
    records = _records(tmp_path, 9)
    out = tmp_path / "run"

    def crash_at_eight(line: dict) -> None:
        if line["i"] == 7:  # edits.jsonl has 2 lines past the last checkpoint (at 6)
            raise Crash

    with pytest.raises(Crash):
        run_stream(_editor(tiny), records, out, protocol="easyedit", eval_every=3, progress=False, plots=False,
                   on_record=crash_at_eight)
    assert len(read_lines(out / "edits.jsonl")) == 8
    ckpt = latest_checkpoint(out)
    assert json.loads((ckpt / "state.json").read_text())["position"] == 6

    # a fresh editor (not holding the checkpoint) is refused
    with pytest.raises(RunError, match="does not hold checkpoint"):
        run_stream(_editor(tiny), records, out, protocol="easyedit", eval_every=3, resume=True, progress=False,
                   plots=False)
    # not resuming and not overwriting is refused
    with pytest.raises(RunExistsError):
        run_stream(_editor(tiny), records, out, protocol="easyedit", eval_every=3, progress=False, plots=False)
    # other data / protocol are refused
    with pytest.raises(RunMismatchError, match="edit stream differs"):
        run_stream(_editor(tiny, ckpt), records[:-1], out, protocol="easyedit", resume=True, progress=False)
    with pytest.raises(RunMismatchError, match="protocol"):
        run_stream(_editor(tiny, ckpt), records, out, protocol="tpatcher", resume=True, progress=False)

    summary = run_stream(_editor(tiny, ckpt), records, out, protocol="easyedit", eval_every=3, resume=True,
                         progress=False, plots=False)
    lines = read_lines(out / "edits.jsonl")
    ids = [ln["id"] for ln in lines]
    assert ids == [r.id for r in records]  # each once, in order
    assert summary["complete"] and summary["requests"] == 9 and summary["edits"] == 9
    assert [e["edits"] for e in read_lines(out / "evals.jsonl")] == [0, 3, 6, 9]
    assert summary["patches"] == sum(len(ln["patch_ids"]) for ln in lines)
    assert summary["run"]["sessions"] == 2


def test_limit_then_extend_computes_the_baseline_with_patches_disabled(tiny: Path, tmp_path: Path,
                                                                       monkeypatch) -> None:
    records = _records(tmp_path, 5)
    out = tmp_path / "run"
    s = run_stream(_editor(tiny), records, out, protocol="easyedit", eval_every=0, limit=2, progress=False,
                   plots=False)
    assert s["complete"] and s["requests"] == 2 and s["requests_total"] == 2
    # an editor that cannot run the unedited model cannot extend the baseline
    import fastpatch.run.loop as loop

    with monkeypatch.context() as m:
        m.setattr(loop, "_unedited", lambda editor: None)
        with pytest.raises(RunError, match="baseline covers 2"):
            run_stream(_editor(tiny, latest_checkpoint(out)), records, out, protocol="easyedit", eval_every=0,
                       limit=5, resume=True, progress=False, plots=False)
    # the editor's patches switched off give the unedited model: the extended baseline is the one a
    # fresh run over all five requests computes
    s = run_stream(_editor(tiny, latest_checkpoint(out)), records, out, protocol="easyedit", eval_every=0,
                   limit=5, resume=True, progress=False, plots=False)
    assert s["complete"] and s["requests"] == 5 and s["edits"] == 5
    fresh = tmp_path / "fresh"
    run_stream(_editor(tiny), records, fresh, protocol="easyedit", eval_every=0, limit=5, progress=False, plots=False)
    got, want = (json.loads((d / "baseline.json").read_text()) for d in (out, fresh))
    assert got["n_records"] == 5
    for key in ("loc_tokens", "train", "test", "train_candidates", "counterfact", "ability"):
        assert got[key] == want[key], key
    assert [ln["id"] for ln in read_lines(out / "edits.jsonl")] == [r.id for r in records]


def test_tpatcher_protocol_counts_only_edits(tiny: Path, tmp_path: Path) -> None:
    rows = stream_rows(2)
    rows += [dict(rows[0], id="dup-0"), dict(rows[1], id="dup-1")]
    records = load_stream(write_stream(tmp_path / "s.jsonl", rows=rows)).records
    out = tmp_path / "run"
    s = run_stream(_editor(tiny), records, out, protocol="tpatcher", eval_every=1, progress=False, plots=False)
    lines = read_lines(out / "edits.jsonl")
    for first, dup in ((lines[0], lines[2]), (lines[1], lines[3])):
        if first["success"]:
            assert dup["action"] == "skip"
    assert s["edits"] == sum(ln["action"] == "edit" for ln in lines)
    assert s["skipped_correct"] == 4 - s["edits"]
    # ER covers the edited requests only; Rel. every request processed
    assert s["metrics"]["SR"] == pytest.approx(
        sum(ln["success"] for ln in lines if ln["action"] == "edit") / s["edits"])


def _crashed_run(tiny: Path, tmp_path: Path, n: int = 6, crash_at: int = 5):
    """A run killed (an exception from on_record) after its checkpoint at 4 requests."""
    records = _records(tmp_path, n)
    out = tmp_path / "run"

    def crash(line: dict) -> None:
        if line["i"] == crash_at:
            raise Crash

    with pytest.raises(Crash):
        run_stream(_editor(tiny), records, out, protocol="easyedit", eval_every=2, progress=False, plots=False,
                   on_record=crash)
    return records, out, latest_checkpoint(out)


def test_resume_refuses_a_damaged_checkpoint(tiny: Path, tmp_path: Path) -> None:
    records, out, ckpt = _crashed_run(tiny, tmp_path)
    edits_before = (out / "edits.jsonl").read_bytes()
    kw = dict(protocol="easyedit", eval_every=2, resume=True, progress=False, plots=False)

    # LATEST names a checkpoint that is gone: refused, nothing deleted (not a silent restart from 0)
    (ckpt / "state.json").rename(ckpt / "state.json.bak")
    with pytest.raises(RunError, match="LATEST names checkpoint .*state.json is missing"):
        run_stream(_editor(tiny), records, out, **kw)
    assert (out / "edits.jsonl").read_bytes() == edits_before
    # a truncated state.json: the error names the file
    (ckpt / "state.json").write_text('{"version": 1, "posi')
    with pytest.raises(RunError, match=r"state\.json is corrupt or truncated"):
        run_stream(_editor(tiny, ckpt), records, out, **kw)
    # a state.json of another version
    state = json.loads((ckpt / "state.json.bak").read_text())
    (ckpt / "state.json").write_text(json.dumps(dict(state, version=99)))
    with pytest.raises(RunError, match="state version 99"):
        run_stream(_editor(tiny, ckpt), records, out, **kw)
    # a corrupt run.json: named
    (ckpt / "state.json.bak").rename(ckpt / "state.json")
    run_json = (out / "run.json").read_text()
    (out / "run.json").write_text(run_json[: len(run_json) // 2])
    with pytest.raises(RunError, match=r"run\.json is corrupt or truncated"):
        run_stream(_editor(tiny, ckpt), records, out, **kw)
    assert (out / "edits.jsonl").read_bytes() == edits_before
    # ... which --overwrite replaces
    s = run_stream(_editor(tiny), records, out, protocol="easyedit", eval_every=2, overwrite=True, progress=False,
                   plots=False)
    assert s["complete"] and [ln["id"] for ln in read_lines(out / "edits.jsonl")] == [r.id for r in records]


def test_resume_refuses_a_limit_below_the_checkpoint(tiny: Path, tmp_path: Path) -> None:
    records, out, ckpt = _crashed_run(tiny, tmp_path)
    assert json.loads((ckpt / "state.json").read_text())["position"] == 4
    with pytest.raises(RunError, match="already processed 4 requests, more than the 3"):
        run_stream(_editor(tiny, ckpt), records, out, protocol="easyedit", eval_every=2, limit=3, resume=True,
                   progress=False, plots=False)
    s = run_stream(_editor(tiny, ckpt), records, out, protocol="easyedit", eval_every=2, limit=4, resume=True,
                   progress=False, plots=False)
    assert s["complete"] and s["requests"] == s["requests_total"] == 4


def test_unscorable_request_is_refused_up_front(tiny: Path, tmp_path: Path) -> None:
    # A text longer than the model's context (128 tokens) would stop the run when its request comes
    # up (the post-edit check, the baseline or an evaluation raises), at every resume again.
    long = "Q: " + " ".join(["capital"] * 200) + "?"
    for field, row in (("paraphrase", {"rephrases": [long]}),
                       ("locality prompt", {"locality": [{"prompt": long, "target": " coin"}]}),
                       ("prompt", {"input": long})):
        rows = stream_rows(3)
        rows[1].update(row)
        records = load_stream(write_stream(tmp_path / f"{field}.jsonl", rows=rows)).records
        out = tmp_path / field.replace(" ", "-")
        with pytest.raises(RunError, match=rf"request 'req-1' \(row 1\), {field} 'Q: capital.*longer than the "
                                           rf"model's context"):
            run_stream(_editor(tiny), records, out, protocol="easyedit", progress=False, plots=False)
        assert not out.exists() or not any(out.iterdir())  # refused before anything was written
    # a bad retain pair (TrainR/TestR) is named too
    with pytest.raises(RunError, match=r"retain pair 'Q: capital"):
        run_stream(_editor(tiny), _records(tmp_path, 2), tmp_path / "retain", protocol="easyedit", progress=False,
                   plots=False, retain_pairs=[(long, " coin")])
