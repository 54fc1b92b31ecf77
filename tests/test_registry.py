"""The demo app's registry (fastpatch.app.registry): names -> typed models and streams, and the
run directory's start/resume/overwrite policy (fastpatch.run.plan_start). No model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastpatch.app import registry
from fastpatch.run import RunExistsError, RunMismatchError, plan_start


def test_names_and_pairings() -> None:
    assert registry.find_model(" SmolLM2-135M-Instruct ").name == "smollm2"
    assert registry.find_model("MiniLM").task == registry.CLASSIFICATION
    assert registry.find_model("/some/dir") is None and registry.find_stream("Geography").name == "geography"
    assert registry.default_data("minilm") == "claims"
    with pytest.raises(registry.RegistryError, match="--data is required"):
        registry.default_data("smollm2")
    registry.check_pairing("smollm2", "geography")
    registry.check_pairing("some/dir", "claims")  # a path: its task is unknown here
    with pytest.raises(registry.RegistryError, match="claim classifier"):
        registry.check_pairing("minilm", "geography")
    with pytest.raises(registry.RegistryError, match="classification stream"):
        registry.check_pairing("smollm2", "claims")
    assert registry.model_identity("smollm2-135m") == {"name": "smollm2"}


def test_load_data_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"prompt": "The capital of Peru is", "target": " Lima"}) + "\n")
    stream = registry.load_data(str(path))
    assert [r.target for r in stream.edit_records] == [" Lima"]
    assert stream.data_id["format"] == "fastpatch" and stream.memory is None and stream.task is None
    with pytest.raises(registry.RegistryError, match="no such file"):
        registry.load_data(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(registry.RegistryError, match="no edit requests"):
        registry.load_data(str(tmp_path / "empty.jsonl"))


def _run(out: Path, complete: bool | None, fingerprints: dict | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps({"fingerprints": fingerprints or FP, "retain_size": 7}))
    if complete is not None:
        (out / "summary.json").write_text(json.dumps({"complete": complete}))


FP = {"model": {"name": "m"}, "data": "d" * 64, "protocol": "tpatcher"}


def test_start_policy(tmp_path: Path) -> None:
    fresh = plan_start(tmp_path / "none", resume=False, overwrite=False)
    assert (fresh.existing, fresh.checkpoint, fresh.replace) == (None, None, False)
    assert plan_start(tmp_path / "none", resume=True, overwrite=False).existing is None
    _run(tmp_path / "done", complete=True)
    assert plan_start(tmp_path / "done", resume=False, overwrite=False).replace  # a finished run is replaced
    _run(tmp_path / "half", complete=False)
    _run(tmp_path / "early", complete=None)  # no checkpoint (no summary) yet
    for name in ("half", "early"):
        with pytest.raises(RunExistsError, match="--resume"):
            plan_start(tmp_path / name, resume=False, overwrite=False)
        assert plan_start(tmp_path / name, resume=False, overwrite=True).replace
        plan = plan_start(tmp_path / name, resume=True, overwrite=False, fingerprints=FP)
        assert plan.existing["retain_size"] == 7 and plan.checkpoint is None and not plan.replace
    with pytest.raises(RunMismatchError, match="protocol"):
        plan_start(tmp_path / "half", resume=True, overwrite=False, fingerprints={**FP, "protocol": "easyedit"})
