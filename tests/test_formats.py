"""Edit-stream formats (fastpatch.data.formats) on real rows from ../shared/data.

Tests that need the real benchmark files skip cleanly when ``../shared/data`` (beside the repo
root) is absent; the synthetic tests at the end always run.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastpatch.data.formats import (
    EditRecord,
    StreamFormatError,
    load_stream,
    parse_rows,
    save_stream_jsonl,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ZSRE = SHARED / "zsre" / "zsre_mend_eval_portability_gpt4.json"
CF_ROME = SHARED / "counterfact" / "counterfact_rome_100.json"
CF_EASY = SHARED / "counterfact" / "easyedit_format" / "counterfact-edit.json"
SOURCES = {"zsre": ZSRE, "counterfact": CF_ROME, "easyedit": CF_EASY}
N_ROWS = 40

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent")


def _rows(fmt: str, n: int = N_ROWS) -> list[dict[str, Any]]:
    path = SOURCES[fmt]
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)[:n]


def _write(rows: list[Any], path: Path) -> Path:
    """Write rows as .json (a list), .jsonl or .parquet, chosen by the suffix."""
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _expected(fmt: str, row: dict[str, Any], index: int) -> EditRecord:
    """The record a raw row must become, derived from the row itself (the documented mapping)."""
    if fmt == "zsre":
        return EditRecord(
            id=str(index), prompt=row["src"], target=row["alt"], ground_truth=row["answers"][0],
            rephrases=[row["rephrase"]], locality=[(row["loc"], row["loc_ans"])],
            subject=row["subject"], source_row=index,
        )
    if fmt == "counterfact":
        rw = row["requested_rewrite"]
        truth = rw["target_true"]["str"]
        return EditRecord(
            id=str(row["case_id"]), prompt=rw["prompt"].format(rw["subject"]),
            target=rw["target_new"]["str"], ground_truth=truth,
            rephrases=list(row["paraphrase_prompts"]),
            locality=[(p, truth) for p in row["neighborhood_prompts"]],
            subject=rw["subject"], source_row=index,
        )
    return EditRecord(
        id=str(row["case_id"]), prompt=row["prompt"], target=row["target_new"],
        ground_truth=row["ground_truth"], rephrases=[row["rephrase_prompt"]],
        locality=[(row["locality_prompt"], row["locality_ground_truth"])],
        subject=row["subject"], source_row=index,
    )


# ---------------------------------------------------------------------------------------------
# Real rows: every container, auto-detected and forced
# ---------------------------------------------------------------------------------------------


@needs_shared
@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
@pytest.mark.parametrize("fmt", ["zsre", "counterfact", "easyedit"])
def test_real_rows_every_container(tmp_path: Path, fmt: str, suffix: str) -> None:
    rows = _rows(fmt)
    path = _write(rows, tmp_path / f"stream{suffix}")
    before = sorted(p.name for p in tmp_path.iterdir())

    auto = load_stream(path)
    forced = load_stream(path, fmt=fmt)

    assert auto.format == forced.format == fmt
    assert auto.loader == "datasets"  # homogeneous real rows need no fallback
    assert auto.skipped == [] and forced.skipped == []
    assert auto.records == forced.records == [_expected(fmt, r, i) for i, r in enumerate(rows)]
    # Nothing written beside the data (datasets cache goes to a throw-away directory).
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@needs_shared
def test_real_field_details(tmp_path: Path) -> None:
    z = load_stream(_write(_rows("zsre"), tmp_path / "z.json")).records
    raw = _rows("zsre")
    # zsRE locality keeps its NQ prefix; targets stay verbatim (string, no added/stripped space).
    assert all(r.locality[0][0].startswith("nq question:") for r in z)
    assert z[0].target == raw[0]["alt"] and isinstance(z[0].target, str)

    cf_raw = _rows("counterfact")
    cf = load_stream(_write(cf_raw, tmp_path / "cf.jsonl")).records
    first = cf_raw[0]["requested_rewrite"]
    assert cf[0].id == str(cf_raw[0]["case_id"])
    assert cf[0].subject == first["subject"] and first["subject"] in cf[0].prompt
    assert "{}" not in cf[0].prompt
    assert not cf[0].target.startswith(" ")
    assert len(cf[0].locality) == len(cf_raw[0]["neighborhood_prompts"])
    assert {a for _, a in cf[0].locality} == {first["target_true"]["str"]}


@needs_shared
@pytest.mark.parametrize("path", [ZSRE, CF_ROME, CF_EASY], ids=["zsre", "counterfact", "easyedit"])
def test_whole_real_files(path: Path) -> None:
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    before = sorted(p.name for p in path.parent.iterdir())
    with open(path, encoding="utf-8") as fh:
        raw = json.load(fh)
    load = load_stream(path)
    assert len(load.records) == len(raw) and load.skipped == []
    assert len({r.id for r in load.records}) == len(raw)
    assert sorted(p.name for p in path.parent.iterdir()) == before


@needs_shared
def test_easyedit_nested_locality(tmp_path: Path) -> None:
    """The nested EasyEdit variant, ground truths as lists, different locality names per row."""
    rows = _rows("easyedit", 12)
    nested = []
    for i, r in enumerate(rows):
        n = {k: v for k, v in r.items() if not k.startswith("locality")}
        n["ground_truth"] = [r["ground_truth"]]
        name = "neighborhood" if i % 2 else "relation_specificity"
        n["locality"] = {name: {"prompt": r["locality_prompt"], "ground_truth": [r["locality_ground_truth"]]}}
        nested.append(n)
    for suffix in (".json", ".jsonl"):
        load = load_stream(_write(nested, tmp_path / f"nested{suffix}"))
        assert load.format == "easyedit"
        assert load.records == [_expected("easyedit", r, i) for i, r in enumerate(rows)]


@needs_shared
def test_limit_and_forced_wrong_format(tmp_path: Path) -> None:
    path = _write(_rows("counterfact"), tmp_path / "cf.json")
    assert len(load_stream(path, limit=5).records) == 5
    assert load_stream(path, fmt="rome", limit=1).format == "counterfact"
    with pytest.raises(StreamFormatError) as err:
        load_stream(path, fmt="zsre")
    assert err.value.row == 0 and err.value.field == "src"
    with pytest.raises(ValueError, match="unknown stream format"):
        load_stream(path, fmt="nope")


@needs_shared
def test_round_trip_through_fastpatch_jsonl(tmp_path: Path) -> None:
    for fmt in ("zsre", "counterfact", "easyedit"):
        records = load_stream(_write(_rows(fmt), tmp_path / f"{fmt}.json")).records
        out = save_stream_jsonl(records, tmp_path / "out" / f"{fmt}.jsonl")
        back = load_stream(out)
        assert back.format == "fastpatch"
        assert back.records == records


# ---------------------------------------------------------------------------------------------
# Malformed real rows
# ---------------------------------------------------------------------------------------------


def _zsre_broken() -> tuple[list[dict[str, Any]], dict[int, str]]:
    rows = copy.deepcopy(_rows("zsre", 12))
    del rows[3]["alt"]  # missing field
    rows[5]["alt"] = 123  # wrong type
    rows[7]["alt"] = "   "  # empty target
    rows[9]["answers"] = "x"  # a bare string is accepted as the only answer
    return rows, {3: "alt", 5: "alt", 7: "alt"}


@needs_shared
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_malformed_rows_raise_or_skip(tmp_path: Path, suffix: str) -> None:
    rows, bad = _zsre_broken()
    path = _write(rows, tmp_path / f"bad{suffix}")

    with pytest.raises(StreamFormatError) as err:
        load_stream(path)
    assert err.value.row == 3 and err.value.field == "alt"
    message = str(err.value)
    assert "row 3" in message and "0-based" in message and "'alt'" in message and str(path) in message

    load = load_stream(path, skip_bad=True)
    assert [(row, f) for row, f, _ in load.skipped] == sorted(bad.items())
    reasons = {row: reason for row, _, reason in load.skipped}
    assert "missing" in reasons[3] and "int" in reasons[5] and "empty" in reasons[7]
    assert len(load.records) == len(rows) - len(bad)
    assert [r.source_row for r in load.records] == [i for i in range(len(rows)) if i not in bad]
    # Mixed str/int "alt" made datasets use its lossy Json type: the json fallback keeps the
    # string targets of the good rows (e.g. "2006") as strings.
    assert load.loader == "json"
    good = {r.source_row: r for r in load.records}
    assert all(good[i].target == rows[i]["alt"] for i in good)
    assert good[9].ground_truth == "x"
    # limit counts kept records only
    assert [r.source_row for r in load_stream(path, skip_bad=True, limit=5).records] == [0, 1, 2, 4, 6]


@needs_shared
def test_malformed_parquet_and_counterfact(tmp_path: Path) -> None:
    rows = copy.deepcopy(_rows("zsre", 8))
    rows[2]["alt"] = ""
    rows[4]["src"] = None
    load = load_stream(_write(rows, tmp_path / "bad.parquet"), skip_bad=True)
    assert [(r, f) for r, f, _ in load.skipped] == [(2, "alt"), (4, "src")]

    cf = copy.deepcopy(_rows("counterfact", 6))
    del cf[1]["requested_rewrite"]["target_new"]["str"]
    cf[2]["requested_rewrite"]["prompt"] = "no placeholder here"
    cf[3]["paraphrase_prompts"] = "not a list"
    cf[4]["case_id"] = cf[0]["case_id"]
    load = load_stream(_write(cf, tmp_path / "cf.json"), skip_bad=True)
    assert [(r, f) for r, f, _ in load.skipped] == [
        (1, "requested_rewrite.target_new.str"),
        (2, "requested_rewrite.prompt"),
        (3, "paraphrase_prompts"),
        (4, "case_id"),
    ]
    with pytest.raises(StreamFormatError, match=r"row 1 \(0-based\), field 'requested_rewrite.target_new.str'"):
        load_stream(tmp_path / "cf.json")


# ---------------------------------------------------------------------------------------------
# Synthetic (no shared data needed)
# ---------------------------------------------------------------------------------------------


def test_fastpatch_format_synthetic(tmp_path: Path) -> None:
    rows = [
        {"input": "The capital of France is", "target": " Paris", "rephrases": ["Q: France?\nA:"],
         "locality": [{"prompt": "The currency of Japan is the", "target": " Japanese Yen"}]},
        {"id": "b", "input": "x", "target": "1990"},
        {"input": "y", "target": 1990},
        {"input": "z", "target": "t", "locality": [{"prompt": "p"}]},
        {"input": "w", "target": "t", "rephrases": [""]},
    ]
    path = _write(rows, tmp_path / "s.jsonl")
    load = load_stream(path, skip_bad=True)
    assert load.format == "fastpatch"
    assert [(r, f) for r, f, _ in load.skipped] == [(2, "target"), (3, "locality[0].target"), (4, "rephrases[0]")]
    a, b = load.records
    assert (a.id, a.target, a.locality) == ("0", " Paris", [("The currency of Japan is the", " Japanese Yen")])
    assert (b.id, b.target, b.rephrases, b.locality) == ("b", "1990", [], [])


def test_fastpatch_rows_take_prompt_as_well_as_input(tmp_path: Path) -> None:
    """``prompt`` (the Python API's word) is the same field as ``input``; giving both is refused."""
    rows = [{"prompt": "The capital of France is", "target": " Paris", "rephrases": ["Q: France?\nA:"]},
            {"prompt": "The capital of Peru is", "target": " Lima"}]
    for suffix in (".jsonl", ".json"):
        load = load_stream(_write(rows, tmp_path / f"p{suffix}"))
        assert load.format == "fastpatch"
        assert [(r.prompt, r.target) for r in load.records] == [("The capital of France is", " Paris"),
                                                                ("The capital of Peru is", " Lima")]
        assert load.records[0].rephrases == ["Q: France?\nA:"]
    same = load_stream(_write([{"input": r["prompt"], "target": r["target"]} for r in rows], tmp_path / "i.jsonl"))
    assert [(r.prompt, r.target) for r in same.records] == [(r.prompt, r.target) for r in load.records]
    both = [{"input": "a", "prompt": "b", "target": "c"}]
    with pytest.raises(StreamFormatError, match="not both"):
        load_stream(_write(both, tmp_path / "both.jsonl"))
    # easyedit rows (prompt + target_new) are still easyedit
    assert parse_rows([{"prompt": "p", "target_new": "t", "ground_truth": "g"}]).format == "easyedit"


def test_undetectable_and_empty(tmp_path: Path) -> None:
    with pytest.raises(StreamFormatError, match="cannot detect"):
        load_stream(_write([{"question": "q", "answer": "a"}], tmp_path / "q.json"))
    empty = load_stream(_write([], tmp_path / "e.json"))
    assert empty.records == [] and empty.skipped == []
    with pytest.raises(StreamFormatError) as err:
        parse_rows([{"input": "a", "target": "b"}, "not an object"])
    assert err.value.row == 1


def test_truncated_json_file_names_the_file(tmp_path: Path) -> None:
    # A .json list cut off mid-write (an interrupted download): the error names the file.
    path = tmp_path / "cut.json"
    path.write_text('[{"input": "The capital of Peru is", "target": " Lima"}, {"input"', encoding="utf-8")
    # (a StreamFormatError, a ValueError, naming the row where the file breaks)
    with pytest.raises(StreamFormatError, match=r"cut\.json: row 1 \(0-based\): not valid JSON \(truncated or corrupt\?\)"):
        load_stream(path)


# ---------------------------------------------------------------------------------------------
# Classification records (label field / class-name targets)
# ---------------------------------------------------------------------------------------------


def test_fastpatch_classification_rows(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "input": "Paris is the capital of France.", "target": "true",
         "rephrases": ["The capital of France is Paris."], "locality": [{"prompt": "Japan is in Asia.", "label": 1}]},
        {"id": "b", "input": "Oslo is the capital of Peru.", "label": 0},
        {"id": "c", "input": "Lima is the capital of Peru.", "target": "true", "label": 1},
        {"id": "d", "input": "The capital of Peru is", "target": " Lima"},  # generative: label None
    ]
    records = parse_rows(rows).records
    assert [(r.target, r.label) for r in records] == [("true", None), ("0", 0), ("true", 1), (" Lima", None)]
    assert records[0].locality == [("Japan is in Asia.", "1")]
    # written and read back unchanged (through datasets, which unifies the differing keys)
    back = load_stream(save_stream_jsonl(records, tmp_path / "cls.jsonl"))
    assert back.format == "fastpatch" and back.records == records

    for bad, field in [({"input": "x", "label": True}, "label"), ({"input": "x", "label": -1}, "label"),
                       ({"input": "x", "label": "true"}, "label"), ({"input": "x"}, "target"),
                       ({"input": "x", "label": 1, "locality": [{"prompt": "p", "label": 1.5}]}, "locality[0].label"),
                       ({"input": "x", "target": "t", "locality": [{"prompt": "p"}]}, "locality[0].target")]:
        with pytest.raises(StreamFormatError) as err:
            parse_rows([bad], fmt="fastpatch")
        assert err.value.field == field, (bad, err.value)
    assert parse_rows([{"input": "x", "label": 2.0}]).records[0].label == 2  # an integral float column


def test_resolve_label() -> None:
    from fastpatch.data.formats import resolve_label

    names = {"false": 0, "true": 1}
    assert [resolve_label(v, names, 2) for v in ("true", "False", " TRUE ", "0", "1", 1)] == [1, 0, 1, 0, 1, 1]
    assert resolve_label("LABEL_1", {"LABEL_0": 0, "LABEL_1": 1}, 2) == 1
    with pytest.raises(ValueError, match=r"out of range: this classifier has 2 labels: 0='false', 1='true'"):
        resolve_label(2, names, 2)
    with pytest.raises(ValueError, match="out of range"):
        resolve_label("-1", names, 2)
    with pytest.raises(ValueError, match="not a class"):
        resolve_label(" Paris", names, 2)
    with pytest.raises(ValueError, match="not a class index or name"):
        resolve_label(True, names, 2)
