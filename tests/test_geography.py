"""Geography facts and streams (fastpatch.app.geography), checked against the package files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastpatch.app import geography as geo
from fastpatch.data.formats import load_stream


@pytest.fixture(scope="module")
def files() -> dict:
    """Raw package files, read independently of the module under test."""
    base = geo.geography_dir()
    en = base / "locale" / "en-us"
    read = lambda p: json.loads(Path(p).read_text(encoding="utf-8"))  # noqa: E731
    return {
        "countries": read(base / "data" / "countries.json"),
        "names": read(en / "country_names.json"),
        "currencies": read(en / "currency_names.json"),
        "capital_intents": [ln.strip() for ln in (en / "capital_of.intent").read_text().splitlines() if ln.strip()],
        "fanout": {s: read(geo.fanoutqa_dir() / "data" / f"fanout-final-{s}.json") for s in ("dev", "test")},
    }


@pytest.fixture(scope="module")
def facts() -> list[geo.CountryFact]:
    return geo.load_country_facts()


def test_facts_match_package_files(facts, files) -> None:
    with_capital = [c for c in files["countries"] if c["capital"]]
    assert len(facts) == len(with_capital) > 150
    by_code = {c["cca3"]: c for c in files["countries"]}
    assert len({f.country for f in facts}) == len(facts)
    for f in facts:
        raw = by_code[f.code]
        assert f.capital and f.capital.strip() == f.capital
        assert f.capital == raw["capital"][0]  # several capitals -> the first
        assert f.capitals == tuple(raw["capital"])
        assert f.country == files["names"][f.code]
        assert f.region == raw["region"] and f.subregion == raw["subregion"]
        if f.currency is not None:
            assert f.currency in {files["currencies"][c] for c in raw["currencies"]}
        if len(raw["currencies"]) == 1 and files["currencies"][raw["currencies"][0]] != raw["currencies"][0]:
            assert f.currency == files["currencies"][raw["currencies"][0]]
    multi = [f for f in facts if len(f.capitals) > 1]
    assert multi and all(f.capital == f.capitals[0] for f in multi)
    assert {f.continent for f in facts} >= {"Africa", "Asia", "Europe", "Oceania", "North America", "South America"}


def test_capital_prompts_and_paraphrases(facts, files) -> None:
    n_intents = len(files["capital_intents"])
    assert n_intents >= 2
    for f in facts:
        prompt = geo.capital_prompt(f)
        assert prompt.startswith("The capital of ") and prompt.endswith(" is") and f.country in prompt
        paras = geo.capital_paraphrases(f)
        assert len(paras) >= 3 and len(set(paras)) == len(paras) and prompt not in paras
        assert all(f.country in p for p in paras)
        # one question per intent template, answered with the dialog template's opening
        qa = [p for p in paras if "? " in p]
        assert len(qa) == n_intents and all(p.endswith(prompt) for p in qa)
    france = geo.capital_paraphrases("France")
    assert "What is the capital of France? The capital of France is" in france
    assert "The capital city of France is" in france
    assert geo.capital_prompt("France") == "The capital of France is"


def test_currency_and_region_prompts(facts) -> None:
    cur = geo.currency_prompts(facts)
    reg = geo.region_prompts(facts)
    assert len(reg) == len(facts)
    assert len(cur) == sum(1 for f in facts if f.currency) > 150
    for (p, a), f in zip(cur, [f for f in facts if f.currency]):
        assert f.country in p and a == " " + f.currency
    for (p, a), f in zip(reg, facts):
        assert p.endswith("located in the continent of") and a == " " + f.continent
    assert geo.currency_prompts(facts, leading_space=False)[0][1] == cur[0][1].lstrip()


def test_fanoutqa_questions(files) -> None:
    expected = [q["question"].strip() for s in ("dev", "test") for q in files["fanout"][s]]
    qs = geo.load_fanoutqa_questions()
    assert qs == list(dict.fromkeys(expected)) and len(qs) > 1000
    assert geo.load_fanoutqa_questions(limit=7) == qs[:7]
    assert len(geo.load_fanoutqa_questions(subquestions=True)) > len(qs)


def test_memory_and_locality_disjoint(facts) -> None:
    memory, locality = geo.split_memory_and_locality()
    loc_prompts = {p for p, _ in locality}
    assert memory and locality
    assert set(memory).isdisjoint(loc_prompts)
    assert len(set(memory)) == len(memory)
    edit = {geo.capital_prompt(f) for f in facts} | {p for f in facts for p in geo.capital_paraphrases(f)}
    assert set(memory).isdisjoint(edit) and loc_prompts.isdisjoint(edit)
    assert set(geo.load_fanoutqa_questions()) <= set(memory)
    assert {p for p, _ in geo.currency_prompts()} <= set(memory)
    assert set(locality) == set(geo.region_prompts())


def test_geography_stream_is_fastpatch_jsonl(tmp_path: Path, facts) -> None:
    stream = geo.geography_stream()
    _, locality = geo.split_memory_and_locality()
    loc_pairs = set(locality)
    assert len(stream) == len(facts)
    assert len({r["id"] for r in stream}) == len(stream)
    for rec, f in zip(stream, facts):
        assert rec["input"] == geo.capital_prompt(f) and rec["target"] == " " + f.capital
        assert rec["rephrases"] == geo.capital_paraphrases(f)
        assert len(rec["locality"]) == 2
        for item in rec["locality"]:
            assert (item["prompt"], item["target"]) in loc_pairs
        own = {p for p, _ in geo.region_prompts([f])}
        assert own.isdisjoint(item["prompt"] for item in rec["locality"])  # other countries only
    assert geo.geography_stream(seed=3) == geo.geography_stream(seed=3)
    assert len(geo.geography_stream(n=5, shuffle=True, seed=1)) == 5

    path = tmp_path / "geo.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in stream), encoding="utf-8")
    load = load_stream(path)
    assert load.format == "fastpatch" and not load.skipped
    assert [r.prompt for r in load.records] == [r["input"] for r in stream]
    assert load.records == geo.geography_records()
