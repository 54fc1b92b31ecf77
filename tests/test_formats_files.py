"""Reading stream files that are damaged, or not quite what ``datasets`` reads (issue 18): where
the error points (row, line, byte) and what it says, for JSON lists, JSON lines and parquet; and
which reader a file goes through.

The JSON-list parser is also called directly on text: it is what names the row of a damaged
``.json`` file, so its details (white space, separators, line numbers) are pinned here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fastpatch.data.formats import StreamFormatError, load_stream
from fastpatch.data.formats import _has_json_feature, _json_list_rows, _read_rows  # noqa: PLC2701

ROW = {"input": "a", "target": "t"}
_TAIL = "; expected a JSON list of rows, or one JSON object per line"


def _rows(n: int) -> list[dict[str, Any]]:
    return [{"input": f"p{i}", "target": "t"} for i in range(n)]


# ---------------------------------------------------------------------------------------------
# The JSON-list parser
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, rows", [
    ("[]", []),
    (" \t\r\n[ \r\n\t]\n ", []),
    ('[{"a":1},{"b":2}]', [{"a": 1}, {"b": 2}]),  # no space after the comma
    ('\n[\t{"a": 1} ,\r\n {"b": [2, 3]}\n]\r\n', [{"a": 1}, {"b": [2, 3]}]),
    ('[1,"x",null]', [1, "x", None]),  # any JSON values (the rows are checked later)
])
def test_json_list_rows_reads_lists(text: str, rows: list) -> None:
    assert _json_list_rows(text, Path("s.json")) == rows


@pytest.mark.parametrize("text, row, what, line", [
    ('[{"a": 1}', 1, "the list is not closed", 1),
    ('[{"a": 1} \n', 1, "the list is not closed", 2),
    ('[\n{"a": 1},\n{"a": 2}\n{"a": 3}]', 2, "expected ',' or ']' after a row", 4),
    ('[{"a": 1}X]', 1, "expected ',' or ']' after a row", 1),  # a stray character is not white space
    ('[{"a": 1} {"a": 2}]', 1, "expected ',' or ']' after a row", 1),
    ('[{"a": 1}]x', 1, "extra data after the list", 1),
    ("[]x", 0, "extra data after the list", 1),
    ('[{"a": 1}]\n\n]', 1, "extra data after the list", 1),  # the line where the list ends
    ('[{"a": 1}]\x0c', 1, "extra data after the list", 1),  # JSON white space is space, tab, CR, LF only
    ('[{"a": 1}, ]', 1, "Expecting value", 1),
    ('\n[{"a": 1},\n{"a": ', 1, "Expecting value", 3),
    ('\n\n[{"a": 1},', 1, "Expecting value", 3),
    ('[{"a": 1, }]', 0, "Expecting property name enclosed in double quotes", 1),
])
def test_json_list_rows_names_row_and_line(text: str, row: int, what: str, line: int) -> None:
    with pytest.raises(StreamFormatError) as err:
        _json_list_rows(text, Path("d") / "s.json")
    assert (err.value.row, err.value.field, err.value.path) == (row, "", str(Path("d") / "s.json"))
    assert err.value.reason == f"not valid JSON (truncated or corrupt?): {what} at line {line}{_TAIL}"


# ---------------------------------------------------------------------------------------------
# Damaged files through load_stream
# ---------------------------------------------------------------------------------------------


def _load_error(path: Path) -> StreamFormatError:
    with pytest.raises(StreamFormatError) as err:
        load_stream(path)
    assert err.value.field == "" and err.value.path == str(path)
    assert str(err.value) == f"{path}: row {err.value.row} (0-based): {err.value.reason}"
    return err.value


def test_damaged_json_list_after_leading_white_space(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    text = json.dumps(_rows(3))
    path.write_text("\n  " + text[: text.rindex('"t"')], encoding="utf-8")  # row 2 cut, on line 2
    err = _load_error(path)
    assert err.row == 2 and err.reason == f"not valid JSON (truncated or corrupt?): Expecting value at line 2{_TAIL}"


def test_damaged_json_lines_in_a_json_file(tmp_path: Path) -> None:
    """A ``.json`` file holding JSON lines (datasets reads those too), one line cut: the line's row."""
    path = tmp_path / "lines.json"
    path.write_text("\n" + json.dumps(ROW) + "\n\n" + json.dumps(ROW)[:9], encoding="utf-8")
    err = _load_error(path)
    assert err.row == 1 and err.reason.startswith("line 4 is not valid JSON (truncated or corrupt?): Expecting value")
    path = tmp_path / "lines.jsonl"
    path.write_text(json.dumps(ROW) + "\n" + json.dumps(ROW)[:9], encoding="utf-8")
    err = _load_error(path)
    assert err.row == 1 and err.reason.startswith("line 2 is not valid JSON (truncated or corrupt?): ")


@pytest.mark.parametrize("top, name", [("42", "int"), ('"rows"', "str"), ("null", "NoneType"), ("1.5", "float"),
                                       (" true", "bool")])
def test_top_level_value_that_is_not_rows(tmp_path: Path, top: str, name: str) -> None:
    path = tmp_path / "top.json"
    path.write_text(top, encoding="utf-8")
    err = _load_error(path)
    assert (err.row, err.reason) == (0, f"expected a JSON list of rows, got {name}")


def _bad_utf8(path: Path, raw: bytes) -> StreamFormatError:
    path.write_bytes(raw)
    err = _load_error(path)
    assert err.reason.endswith(" (the file must be UTF-8 encoded)")
    return err


def test_bytes_that_are_not_utf8_name_row_and_byte(tmp_path: Path) -> None:
    rows = [json.dumps(r).encode() for r in _rows(2)]
    bad = json.dumps({"input": "caf\u00e9", "target": "t"}, ensure_ascii=False).encode("latin-1")
    # a JSON list on one line, after white space: the row is found by parsing, not by counting lines
    raw = b"\n [" + rows[0] + b", " + rows[1] + b"," + bad + b"]"
    err = _bad_utf8(tmp_path / "one-line.json", raw)
    assert err.row == 2 and err.reason.startswith(f"bytes that are not UTF-8 at byte {raw.index(b'caf') + 3} ")
    # the bad bytes after a complete list: the row after its last one, as for any data after it
    err = _bad_utf8(tmp_path / "after.json", b"[" + rows[0] + b"," + rows[1] + b"]\xff")
    assert err.row == 2
    # JSON lines: the first byte of the file, or a line after blank ones
    err = _bad_utf8(tmp_path / "first.jsonl", b"\xff" + rows[0] + b"\n")
    assert err.row == 0 and err.reason == "bytes that are not UTF-8 at byte 0 (the file must be UTF-8 encoded)"
    err = _bad_utf8(tmp_path / "third.jsonl", rows[0] + b"\n\n" + rows[1] + b"\n" + bad + b"\n")
    assert err.row == 2
    # JSON lines in a .json file: counted as lines (parsed as a list, the rows would be misnamed)
    err = _bad_utf8(tmp_path / "lines.json", rows[0] + b"\n" + rows[1] + b"\n" + bad + b"\n")
    assert err.row == 2


def test_damaged_parquet(tmp_path: Path) -> None:
    path = tmp_path / "cut.parquet"
    path.write_bytes(b"PAR1 not really parquet")
    err = _load_error(path)
    # the reader's own error follows, with its type
    assert err.row == 0 and err.reason.startswith("not a readable parquet file (truncated or corrupt?): ArrowInvalid: ")


# ---------------------------------------------------------------------------------------------
# Which reader, and which files
# ---------------------------------------------------------------------------------------------


def test_reader_of_each_file(tmp_path: Path) -> None:
    (tmp_path / "list.json").write_text(" \n" + json.dumps(_rows(2)), encoding="utf-8")
    assert _read_rows(tmp_path / "list.json") == (_rows(2), "datasets")
    (tmp_path / "lines.JSON").write_text("".join(json.dumps(r) + "\n" for r in _rows(2)), encoding="utf-8")
    assert _read_rows(tmp_path / "lines.JSON") == (_rows(2), "datasets")
    (tmp_path / "s.ndjson").write_text(json.dumps(ROW) + "\n", encoding="utf-8")
    assert _read_rows(tmp_path / "s.ndjson") == ([ROW], "datasets")
    # values of mixed types: datasets' lossy Json column, so the json module reads the file
    mixed = [{"input": "a", "target": "1990"}, {"input": "b", "target": 5}]
    (tmp_path / "mixed.json").write_text(json.dumps(mixed), encoding="utf-8")
    assert _read_rows(tmp_path / "mixed.json") == (mixed, "json")
    load = load_stream(tmp_path / "mixed.json", skip_bad=True)
    assert load.loader == "json" and [r.target for r in load.records] == ["1990"]
    assert load.skipped == [(1, "target", "expected a string, got int 5")]
    for name in ("empty.jsonl", "empty.json"):
        (tmp_path / name).write_text("[]" if name.endswith(".json") else "", encoding="utf-8")
        assert _read_rows(tmp_path / name) == ([], "json")
    with pytest.raises(FileNotFoundError) as missing:
        load_stream(tmp_path / "absent.json")
    assert missing.value.args == (tmp_path / "absent.json",)
    with pytest.raises(ValueError) as err:
        load_stream(tmp_path / "s.csv")
    assert str(err.value) == f"{tmp_path / 's.csv'}: unsupported file type '.csv'; expected .json, .jsonl or .parquet"


def test_parquet_suffixes(tmp_path: Path) -> None:
    from .test_formats import _write

    path = _write(_rows(2), tmp_path / "s.parquet")
    assert load_stream(path).loader == "datasets"
    pq = path.rename(tmp_path / "s.PQ")
    load = load_stream(pq)
    assert (load.format, [r.prompt for r in load.records], load.loader) == ("fastpatch", ["p0", "p1"], "datasets")


def test_has_json_feature() -> None:
    import datasets

    class Holder:  # a feature wrapping another one (datasets' List, LargeList)
        def __init__(self, feature: object) -> None:
            self.feature = feature

    json_type = datasets.Json()
    value = datasets.Value("string")
    assert _has_json_feature(json_type)
    assert not _has_json_feature(value)
    assert _has_json_feature(datasets.Features({"a": value, "b": {"c": json_type}}))
    assert not _has_json_feature(datasets.Features({"a": value, "b": {"c": value}}))
    assert _has_json_feature([value, json_type]) and _has_json_feature((json_type,))
    assert not _has_json_feature([value]) and not _has_json_feature(())
    assert _has_json_feature(Holder(Holder(json_type))) and not _has_json_feature(Holder(value))
    assert not _has_json_feature(Holder(None))


@pytest.mark.parametrize("enabled", [True, False])
def test_reading_leaves_the_progress_bar_setting_alone(tmp_path: Path, enabled: bool) -> None:
    """datasets' progress bars are off while a stream is read, then as the caller had them."""
    import datasets

    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(ROW) + "\n", encoding="utf-8")
    seen = []
    real_load = datasets.load_dataset

    def load_dataset(*args: Any, **kwargs: Any) -> Any:
        seen.append(datasets.is_progress_bar_enabled())
        return real_load(*args, **kwargs)

    was = datasets.is_progress_bar_enabled()
    try:
        (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(datasets, "load_dataset", load_dataset)
            assert load_stream(path).loader == "datasets"
        assert seen == [False] and datasets.is_progress_bar_enabled() is enabled
    finally:
        (datasets.enable_progress_bars if was else datasets.disable_progress_bars)()


def test_reading_writes_nothing_to_the_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``datasets`` gets a throw-away cache: neither the user's datasets cache nor the temporary
    directory keeps anything once the rows are read."""
    import tempfile

    import datasets

    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(ROW) + "\n", encoding="utf-8")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    assert load_stream(path).loader == "datasets"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.jsonl", "tmp"]
    assert list((tmp_path / "tmp").iterdir()) == []
