"""Edit-stream formats on synthetic rows, and a fuzz of rows and files (issue 18, point 3).

No external files: every format and field mapping of :mod:`fastpatch.data.formats` (zsRE,
CounterFact in the ROME format and in EasyEdit's format, EasyEdit with nested and flat locality,
fastpatch JSONL) is checked on rows written here, through every container (.json, .jsonl,
.parquet). The fuzz then breaks rows (missing fields, wrong types, empty strings, unicode) and
files (truncated JSON / JSONL / parquet, bytes that are not UTF-8): the only outcomes allowed are
records or a :class:`StreamFormatError` naming the row and a field broken in it, never another
exception.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastpatch.data.formats import EditRecord, StreamFormatError, load_stream, parse_rows

from .test_formats import _write

FAST = settings(max_examples=150, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
#: File loads go through ``datasets``: a few dozen per test keep them well under a few seconds.
FILES = settings(max_examples=25, derandomize=True, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])




# ---------------------------------------------------------------------------------------------
# One synthetic row per format and field mapping, with the record it must become
# ---------------------------------------------------------------------------------------------

ZSRE_ROW = {
    "subject": "IAAF Combined Events Challenge", "src": "When was the inception of IAAF Combined Events Challenge?",
    "pred": "2011", "rephrase": "When was the IAAF Combined Events Challenge launched?", "alt": "2006",
    "answers": ["1998", "1999"], "loc": "nq question: who sang the song", "loc_ans": "The String",
}
ZSRE_REC = EditRecord(
    id="0", prompt=ZSRE_ROW["src"], target="2006", ground_truth="1998", rephrases=[ZSRE_ROW["rephrase"]],
    locality=[("nq question: who sang the song", "The String")], subject="IAAF Combined Events Challenge")

CF_ROME_ROW = {
    "case_id": 20952,
    "requested_rewrite": {"prompt": "{} is located in", "relation_id": "P30", "subject": "Angola",
                          "target_new": {"str": "Antarctica", "id": "Q51"}, "target_true": {"str": "Africa", "id": "Q15"}},
    "paraphrase_prompts": ["Angola belongs to the continent of", "Angola is a part of the continent of"],
    "neighborhood_prompts": ["Ghana is in", "Côte d'Ivoire is located in"],
    "attribute_prompts": ["Ross Island is located in"],
}
CF_ROME_REC = EditRecord(
    id="20952", prompt="Angola is located in", target="Antarctica", ground_truth="Africa",
    rephrases=["Angola belongs to the continent of", "Angola is a part of the continent of"],
    locality=[("Ghana is in", "Africa"), ("Côte d'Ivoire is located in", "Africa")], subject="Angola")

CF_EASY_ROW = {  # EasyEdit's counterfact-edit.json: the flat locality variant
    "case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
    "subject": "Danielle Darrieux", "ground_truth": "French",
    "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
    "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French",
}
CF_EASY_REC = EditRecord(
    id="0", prompt="The mother tongue of Danielle Darrieux is", target="English", ground_truth="French",
    rephrases=["Where Danielle Darrieux is from, people speak the language of"],
    locality=[("Michel Rocard is a native speaker of", "French")], subject="Danielle Darrieux")

EASY_NESTED_ROW = {  # EasyEdit's nested locality: {name: {prompt (str or list), ground_truth}}
    "prompt": "Who is the CEO of Acme?", "target_new": "Ada", "ground_truth": ["Bob", "Rob"],
    "rephrase_prompt": ["Acme's chief executive is", "The head of Acme is"],
    "locality": {
        "Relation_Specificity": {"prompt": ["Acme was founded in", "Acme is based in"],
                                 "ground_truth": [["1990", "1991"], "Oslo"]},
        "Forgetfulness": {"prompt": "Ada studied at", "ground_truth": "MIT"},
    },
}
EASY_NESTED_REC = EditRecord(
    id="0", prompt="Who is the CEO of Acme?", target="Ada", ground_truth="Bob",
    rephrases=["Acme's chief executive is", "The head of Acme is"],
    locality=[("Acme was founded in", "1990"), ("Acme is based in", "Oslo"), ("Ada studied at", "MIT")])

FASTPATCH_ROW = {
    "id": "fix-1", "input": "The capital of Peru is", "target": " Lima", "ground_truth": " Cusco",
    "subject": "Peru", "rephrases": ["Q: capital of Peru?\nA:"],
    "locality": [{"prompt": "The currency of Japan is the", "target": " yen"}],
}
FASTPATCH_REC = EditRecord(
    id="fix-1", prompt="The capital of Peru is", target=" Lima", ground_truth=" Cusco",
    rephrases=["Q: capital of Peru?\nA:"], locality=[("The currency of Japan is the", " yen")], subject="Peru")

#: (format, its aliases, a row, the record)
CASES = [
    ("zsre", ("mend",), ZSRE_ROW, ZSRE_REC),
    ("counterfact", ("rome", "cf"), CF_ROME_ROW, CF_ROME_REC),
    ("easyedit", (), CF_EASY_ROW, CF_EASY_REC),
    ("easyedit", (), EASY_NESTED_ROW, EASY_NESTED_REC),
    ("fastpatch", ("jsonl",), FASTPATCH_ROW, FASTPATCH_REC),
]
IDS = ["zsre", "counterfact-rome", "counterfact-easyedit", "easyedit-nested", "fastpatch"]


def _numbered(row: dict[str, Any], i: int, fmt: str) -> dict[str, Any]:
    """Row ``i`` of a stream: the texts made distinct, ids unique."""
    r = json.loads(json.dumps(row))
    if fmt == "zsre":
        r["src"] += f" #{i}"
    elif fmt == "counterfact":
        r["case_id"] += i
        r["requested_rewrite"]["prompt"] += f" #{i}"
    elif fmt == "easyedit":
        r["prompt"] += f" #{i}"
        if "case_id" in r:
            r["case_id"] += i
    else:
        r["id"] += f"-{i}"
        r["input"] += f" #{i}"
    return r


def _numbered_record(rec: EditRecord, i: int, fmt: str) -> EditRecord:
    d = dict(vars(rec))
    d["source_row"] = i
    d["prompt"] += f" #{i}"
    d["id"] = str(i) if fmt == "zsre" else f"{rec.id}-{i}" if fmt == "fastpatch" else str(int(rec.id) + i)
    return EditRecord(**d)


@pytest.mark.parametrize("fmt, aliases, row, rec", CASES, ids=IDS)
def test_mapping_of_rows(fmt: str, aliases: tuple[str, ...], row: dict, rec: EditRecord) -> None:
    rows = [_numbered(row, i, fmt) for i in range(3)]
    want = [_numbered_record(rec, i, fmt) for i in range(3)]
    for name in ("auto", fmt, *aliases):
        load = parse_rows(rows, fmt=name)
        assert load.format == fmt and load.skipped == []
        assert load.records == want, name


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
@pytest.mark.parametrize("fmt, aliases, row, rec", CASES, ids=IDS)
def test_mapping_through_every_container(tmp_path: Path, suffix: str, fmt: str, aliases: tuple[str, ...],
                                         row: dict, rec: EditRecord) -> None:
    if suffix == ".parquet" and row is EASY_NESTED_ROW:
        pytest.skip("a ground_truth list mixing strings and lists has no parquet type")
    rows = [_numbered(row, i, fmt) for i in range(3)]
    load = load_stream(_write(rows, tmp_path / f"s{suffix}"))
    assert load.format == fmt and load.skipped == []
    assert load.records == [_numbered_record(rec, i, fmt) for i in range(3)]


def test_field_variants() -> None:
    """The optional and alternative spellings each mapping accepts."""
    # zsRE: answers as a string; no subject; case_id names the id; the loc prefix is kept verbatim
    z = parse_rows([dict(ZSRE_ROW, answers="1998", subject=None, case_id=7)]).records[0]
    assert (z.id, z.ground_truth, z.subject, z.locality[0][0]) == ("7", "1998", None, "nq question: who sang the song")
    assert parse_rows([dict(ZSRE_ROW, answers=[])]).records[0].ground_truth is None
    # CounterFact: every "{}" takes the subject; no neighbours -> no locality
    cf = json.loads(json.dumps(CF_ROME_ROW))
    cf["requested_rewrite"]["prompt"] = "{}, or {}, is in"
    del cf["neighborhood_prompts"]
    c = parse_rows([cf]).records[0]
    assert (c.prompt, c.locality, c.rephrases) == ("Angola, or Angola, is in", [], CF_ROME_REC.rephrases)
    # EasyEdit: rephrase_prompt as one string or a list; ground_truth may be absent; a locality
    # name that is null (present in other rows only) is ignored
    e = parse_rows([{"prompt": "p", "target_new": "t", "rephrase_prompt": "r",
                     "locality": {"a": None, "b": {"prompt": "lp", "ground_truth": ["la"]}}}]).records[0]
    assert (e.rephrases, e.ground_truth, e.locality, e.id) == (["r"], None, [("lp", "la")], "0")
    # flat and nested locality together: flat first
    both = parse_rows([dict(CF_EASY_ROW, locality={"x": {"prompt": "q", "ground_truth": "a"}})]).records[0]
    assert both.locality == [("Michel Rocard is a native speaker of", "French"), ("q", "a")]
    # fastpatch: integral float and int ids; label alone -> target is the index as text
    f = parse_rows([{"id": 3.0, "input": "i", "label": 1}, {"id": 4, "input": "j", "target": "t"}]).records
    assert [(r.id, r.target, r.label) for r in f] == [("3", "1", 1), ("4", "t", None)]
    # targets verbatim: spaces kept
    assert parse_rows([{"input": "a", "target": "  two  spaces "}]).records[0].target == "  two  spaces "


REQUIRED = {  # format -> its required fields (dotted paths), each named by the error when missing
    "zsre": ["src", "alt", "rephrase", "answers", "loc", "loc_ans"],
    "counterfact": ["requested_rewrite", "requested_rewrite.prompt", "requested_rewrite.subject",
                    "requested_rewrite.target_new", "requested_rewrite.target_true",
                    "requested_rewrite.target_new.str", "requested_rewrite.target_true.str"],
    "easyedit": ["prompt", "target_new"],
    "fastpatch": ["input", "target"],
}
BASE = {"zsre": ZSRE_ROW, "counterfact": CF_ROME_ROW, "easyedit": CF_EASY_ROW, "fastpatch": FASTPATCH_ROW}


def _delete(row: dict, dotted: str) -> dict:
    r = json.loads(json.dumps(row))
    *parents, last = dotted.split(".")
    obj = r
    for p in parents:
        obj = obj[p]
    del obj[last]
    return r


@pytest.mark.parametrize("fmt, field", [(f, x) for f, xs in REQUIRED.items() for x in xs])
def test_every_required_field_is_named_when_missing(fmt: str, field: str) -> None:
    good = _numbered(BASE[fmt], 0, fmt)
    bad = _delete(_numbered(BASE[fmt], 1, fmt), field)
    with pytest.raises(StreamFormatError) as err:
        parse_rows([good, bad], fmt=fmt)
    assert (err.value.row, err.value.field) == (1, field)
    assert f"row 1 (0-based), field {field!r}" in str(err.value)
    load = parse_rows([good, bad], fmt=fmt, skip_bad=True)
    assert [r.source_row for r in load.records] == [0] and [(r, f) for r, f, _ in load.skipped] == [(1, field)]


# ---------------------------------------------------------------------------------------------
# Fuzz: rows
# ---------------------------------------------------------------------------------------------

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**70), st.floats(allow_nan=True),
                         _text, st.sampled_from(["", " ", "\n", "é", "日本", "{}", "\u200b"]))
_json = st.recursive(_json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                           st.dictionaries(_text, inner, max_size=3)),
                     max_leaves=6)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into nested dicts/lists of a row."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append(prefix + (k,))
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.append(prefix + (i,))
            out += _paths(v, prefix + (i,))
    return out


def _dotted(path: tuple) -> str:
    """A key path as the errors spell a field: ``locality[0].prompt``, ``requested_rewrite.subject``."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


@st.composite
def broken_row(draw: st.DrawFn, row: dict) -> tuple[dict, set[str]]:
    """``row`` with a few fields deleted or replaced by any JSON value (wrong types, empty or
    unicode strings, nested junk), and the fields broken (dotted, as errors name them)."""
    r = json.loads(json.dumps(row))
    broken: set[str] = set()
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(r)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = r
        for p in path[:-1]:
            parent = parent[p]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(_json)
        broken.add(_dotted(path))
    return r, broken


#: Fields an error may name for a break in the other one: a locality prompt and its answer(s)
#: are checked against each other (a list of prompts needs a parallel list of answers).
_PAIRED = {"prompt": "ground_truth", "ground_truth": "prompt", "locality_prompt": "locality_ground_truth",
           "locality_ground_truth": "locality_prompt"}


def _names_a_broken_field(field: str, broken: set[str]) -> bool:
    """Whether an error's ``field`` is a broken field, inside one, or holds one (a broken value
    inside a list or object is reported at that list or object, or at the item within it)."""

    def within(inner: str, outer: str) -> bool:
        return outer == "" or inner == outer or inner.startswith((outer + ".", outer + "["))

    for b in broken:
        if within(field, b) or within(b, field):
            return True
        head, _, last = b.rpartition(".")
        if last in _PAIRED and within(field, f"{head}.{_PAIRED[last]}" if head else _PAIRED[last]):
            return True
    return False


def _check_outcome(rows: list[Any], fmt: str, bad: dict[int, set[str]]) -> None:
    """Records, or a StreamFormatError naming a broken row and a field broken in it; skip_bad
    skips broken rows only, each with such a field."""
    try:
        load = parse_rows(rows, fmt=fmt)
    except StreamFormatError as err:
        assert err.row in bad, (err.row, bad, str(err))
        assert f"row {err.row} (0-based)" in str(err)
        assert _names_a_broken_field(err.field, bad[err.row]), (err.field, bad[err.row], str(err))
        assert (f", field {err.field!r}: " if err.field else " (0-based): ") in str(err)
    else:
        assert len(load.records) == len(rows)
        for r in load.records:
            assert isinstance(r.prompt, str) and r.prompt.strip() and isinstance(r.target, str) and r.target.strip()
            assert all(isinstance(p, str) and p.strip() for p in r.rephrases)
            assert all(isinstance(p, str) and isinstance(a, str) for p, a in r.locality)
            assert isinstance(r.id, str) and r.id
    load = parse_rows(rows, fmt=fmt, skip_bad=True)
    assert {row for row, _, _ in load.skipped} <= set(bad)
    assert all(_names_a_broken_field(field, bad[row]) for row, field, _ in load.skipped), load.skipped
    assert sorted([r.source_row for r in load.records] + [row for row, _, _ in load.skipped]) == list(range(len(rows)))


@pytest.mark.parametrize("fmt, aliases, row, rec", CASES, ids=IDS)
@FAST
@given(data=st.data())
def test_fuzz_rows(fmt: str, aliases: tuple, row: dict, rec: EditRecord, data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 4))
    rows: list[Any] = [_numbered(row, i, fmt) for i in range(n)]
    bad: dict[int, set[str]] = {}
    for i in data.draw(st.lists(st.integers(0, n - 1), max_size=2, unique=True)):
        if data.draw(st.booleans()):
            rows[i], bad[i] = data.draw(broken_row(rows[i]))
        else:  # not a row at all (or a row of junk): any field may be named
            rows[i], bad[i] = data.draw(_json), {""}
    _check_outcome(rows, fmt, bad)
    if 0 not in bad:  # auto-detection reads row 0
        _check_outcome(rows, "auto", bad)


# ---------------------------------------------------------------------------------------------
# Fuzz: files
# ---------------------------------------------------------------------------------------------


def _load_outcome(path: Path, n_rows: int) -> None:
    try:
        load = load_stream(path, skip_bad=True)
    except StreamFormatError as err:
        assert 0 <= err.row <= n_rows, str(err)
        assert str(path) in str(err) and f"row {err.row} (0-based)" in str(err)
    else:
        assert len(load.records) + len(load.skipped) <= n_rows


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
@FILES
@given(data=st.data())
def test_fuzz_truncated_and_corrupt_files(tmp_path: Path, suffix: str, data: st.DataObject) -> None:
    fmt = data.draw(st.sampled_from(["zsre", "counterfact", "fastpatch"]))
    n = data.draw(st.integers(1, 3))
    rows = [_numbered(BASE[fmt], i, fmt) for i in range(n)]
    if data.draw(st.booleans()):  # unicode in the texts (multi-byte UTF-8 to cut through)
        key = {"zsre": "alt", "counterfact": "paraphrase_prompts", "fastpatch": "target"}[fmt]
        rows[0][key] = ["日本語のテキスト é"] if key == "paraphrase_prompts" else "日本語のテキスト é"
    path = _write(rows, tmp_path / f"f{suffix}")
    raw = path.read_bytes()
    how = data.draw(st.sampled_from(["cut", "cut", "flip", "garbage"]))
    if how == "cut":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "flip":
        i = data.draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([data.draw(st.sampled_from([0x00, 0x80, 0xFF, 0x22, 0x7B, 0x5D]))]) + raw[i + 1:]
    else:
        raw = raw + data.draw(st.binary(min_size=1, max_size=8))
    path.write_bytes(raw)
    _load_outcome(path, n)


def test_truncated_jsonl_names_the_row(tmp_path: Path) -> None:
    rows = [_numbered(FASTPATCH_ROW, i, "fastpatch") for i in range(3)]
    path = _write(rows, tmp_path / "cut.jsonl")
    text = path.read_text(encoding="utf-8")
    path.write_text(text[: text.rindex("{") + 10], encoding="utf-8")  # row 2 cut mid-object
    with pytest.raises(StreamFormatError) as err:
        load_stream(path)
    assert err.value.row == 2 and "not valid JSON" in str(err.value)


def test_truncated_json_list_names_the_row(tmp_path: Path) -> None:
    rows = [_numbered(ZSRE_ROW, i, "zsre") for i in range(3)]
    path = _write(rows, tmp_path / "cut.json")
    text = path.read_text(encoding="utf-8")
    path.write_text(text[: text.rindex('"src"')], encoding="utf-8")  # inside row 2
    with pytest.raises(StreamFormatError) as err:
        load_stream(path)
    assert err.value.row == 2 and str(path) in str(err.value)


def test_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({"input": "caf\u00e9", "target": " x"}, ensure_ascii=False).encode("latin-1") + b"\n")
    with pytest.raises(StreamFormatError) as err:
        load_stream(path)
    assert err.value.row == 0 and "UTF-8" in str(err.value)


def test_truncated_parquet(tmp_path: Path) -> None:
    path = _write([_numbered(FASTPATCH_ROW, i, "fastpatch") for i in range(3)], tmp_path / "cut.parquet")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(StreamFormatError) as err:
        load_stream(path)
    assert str(path) in str(err.value)


def test_top_level_not_a_list(tmp_path: Path) -> None:
    for i, top in enumerate(["42", '"rows"', "null"]):
        path = tmp_path / f"top{i}.json"
        path.write_text(top, encoding="utf-8")
        with pytest.raises(StreamFormatError, match="expected a JSON list of rows"):
            load_stream(path)


def test_truncated_json_list_names_the_line(tmp_path: Path) -> None:
    rows = [_numbered(FASTPATCH_ROW, i, "fastpatch") for i in range(3)]
    text = "[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n"  # row i on line i + 2
    path = tmp_path / "lines.json"
    path.write_text(text[: text.rindex('"input"')], encoding="utf-8")  # inside row 2, line 4
    with pytest.raises(StreamFormatError, match=r"row 2 \(0-based\): not valid JSON .* at line 4;"):
        load_stream(path)


def test_bytes_that_are_not_utf8_name_their_row(tmp_path: Path) -> None:
    good = [json.dumps(_numbered(FASTPATCH_ROW, i, "fastpatch")).encode() for i in range(2)]
    bad = json.dumps({"input": "caf\u00e9", "target": " x"}, ensure_ascii=False).encode("latin-1")
    (tmp_path / "l.jsonl").write_bytes(good[0] + b"\n\n" + good[1] + b"\n" + bad + b"\n")
    with pytest.raises(StreamFormatError) as err:
        load_stream(tmp_path / "l.jsonl")
    assert err.value.row == 2  # blank lines are not rows
    (tmp_path / "l.json").write_bytes(b"[" + good[0] + b",\n" + bad + b"]")
    with pytest.raises(StreamFormatError) as err:
        load_stream(tmp_path / "l.json")
    assert err.value.row == 1


def test_content_fingerprint_is_sha256_of_sorted_json_lines() -> None:
    import hashlib

    from fastpatch.data.formats import content_fingerprint

    rows = [{"b": 1, "a": "caf\u00e9"}, {"x": [1, 2]}]
    h = hashlib.sha256()
    for line in ('{"a": "caf\u00e9", "b": 1}', '{"x": [1, 2]}'):
        h.update(line.encode("utf-8") + b"\n")
    assert content_fingerprint(rows) == h.hexdigest()
    assert content_fingerprint([{"a": "caf\u00e9", "b": 1}, {"x": [1, 2]}]) == h.hexdigest()  # key order
    assert content_fingerprint(rows[::-1]) != h.hexdigest()  # row order counts


def test_save_stream_jsonl_writes_utf8_into_new_folders(tmp_path: Path) -> None:
    from fastpatch.data.formats import save_stream_jsonl

    rec = EditRecord("r", "Où est Paris ?", " France", None, [], [])
    out = save_stream_jsonl([rec], tmp_path / "a" / "b" / "s.jsonl")
    raw = out.read_bytes()
    assert "Où".encode("utf-8") in raw and raw.endswith(b"\n") and raw.count(b"\n") == 1
    assert load_stream(out).records == [EditRecord("r", "Où est Paris ?", " France", None, [], [], source_row=0)]
    assert sorted(p.name for p in out.parent.iterdir()) == ["s.jsonl"]
