"""What a malformed row is reported as: every error of every format's parser, with the row, the
field and the reason the user reads (issue 18: an error must name the row *and* the field), and
the small rules around them (format names and detection, ids, labels, ``limit``).

Pure ``parse_rows`` calls on rows written here: no files, no ``datasets``; the whole file runs in
well under a second.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from fastpatch.data.formats import (
    FORMATS,
    EditRecord,
    StreamFormatError,
    StreamLoad,
    detect_format,
    parse_rows,
    record_to_fastpatch,
    resolve_label,
)

from .test_formats_synthetic import CF_EASY_ROW, CF_ROME_ROW, EASY_NESTED_ROW, FASTPATCH_ROW, ZSRE_ROW


def _with(row: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of ``row`` with the field at ``dotted`` (``a.b``) set to ``value``."""
    r = json.loads(json.dumps(row))
    *parents, last = dotted.split(".")
    obj = r
    for p in parents:
        obj = obj[p]
    obj[last] = value
    return r


def _error(row: dict[str, Any], fmt: str) -> StreamFormatError:
    """The error of ``row`` as the second row of a stream (after a good one), skipped the same way."""
    good = {"zsre": ZSRE_ROW, "counterfact": CF_ROME_ROW, "easyedit": CF_EASY_ROW, "fastpatch": FASTPATCH_ROW}[fmt]
    good = _with(good, "case_id" if fmt != "fastpatch" else "id", 100 if fmt != "fastpatch" else "good")
    with pytest.raises(StreamFormatError) as err:
        parse_rows([good, row], fmt=fmt)
    load = parse_rows([good, row], fmt=fmt, skip_bad=True)
    assert [r.source_row for r in load.records] == [0]
    assert load.skipped == [(1, err.value.field, err.value.reason)]
    return err.value


#: (format, row, field, reason): every way a row of each format is refused
ROW_ERRORS = [
    # the field helpers, through zsRE
    ("zsre", _with(ZSRE_ROW, "src", None), "src", "missing or null"),
    ("zsre", _with(ZSRE_ROW, "alt", 5), "alt", "expected a string, got int 5"),
    ("zsre", _with(ZSRE_ROW, "alt", " \n"), "alt", "empty string"),
    ("zsre", _with(ZSRE_ROW, "rephrase", ["r"]), "rephrase", "expected a string, got list ['r']"),
    ("zsre", _with(ZSRE_ROW, "answers", None), "answers", "missing or null"),
    ("zsre", _with(ZSRE_ROW, "answers", [[7]]), "answers[0][0]",
     "expected a string or a list of strings, got int 7"),
    ("zsre", _with(ZSRE_ROW, "answers", 2.5), "answers", "expected a string or a list of strings, got float 2.5"),
    ("zsre", _with(ZSRE_ROW, "loc", ""), "loc", "empty string"),
    ("zsre", _with(ZSRE_ROW, "loc_ans", {}), "loc_ans", "expected a string, got dict {}"),
    ("zsre", _with(ZSRE_ROW, "subject", 1), "subject", "expected a string, got int 1"),
    ("zsre", _with(ZSRE_ROW, "subject", " "), "subject", "empty string"),
    ("zsre", _with(ZSRE_ROW, "case_id", True), "case_id", "expected an int or string id, got bool True"),
    ("zsre", _with(ZSRE_ROW, "case_id", 1.5), "case_id", "expected an int or non-empty string id, got float 1.5"),
    ("zsre", _with(ZSRE_ROW, "case_id", float("inf")), "case_id",
     "expected an int or non-empty string id, got float inf"),
    ("zsre", _with(ZSRE_ROW, "case_id", "  "), "case_id", "expected an int or non-empty string id, got str '  '"),
    ("zsre", _with(ZSRE_ROW, "case_id", [1]), "case_id", "expected an int or non-empty string id, got list [1]"),
    ("zsre", _with(ZSRE_ROW, "case_id", 100), "case_id", "duplicate id '100' (first at row 0)"),
    # CounterFact (ROME)
    ("counterfact", _with(CF_ROME_ROW, "requested_rewrite", "x"), "requested_rewrite",
     "expected an object, got str"),
    ("counterfact", _with(CF_ROME_ROW, "requested_rewrite.prompt", "Angola is in"), "requested_rewrite.prompt",
     "no '{}' subject placeholder in 'Angola is in'"),
    ("counterfact", _with(CF_ROME_ROW, "requested_rewrite.subject", ""), "requested_rewrite.subject", "empty string"),
    ("counterfact", _with(CF_ROME_ROW, "requested_rewrite.target_new", ["Antarctica"]),
     "requested_rewrite.target_new", "expected an object, got list"),
    ("counterfact", _with(CF_ROME_ROW, "requested_rewrite.target_true.str", None),
     "requested_rewrite.target_true.str", "missing or null"),
    ("counterfact", _with(CF_ROME_ROW, "paraphrase_prompts", "one"), "paraphrase_prompts",
     "expected a list of strings, got str"),
    ("counterfact", _with(CF_ROME_ROW, "paraphrase_prompts", ["ok", 3]), "paraphrase_prompts[1]",
     "expected a string, got int 3"),
    ("counterfact", _with(CF_ROME_ROW, "neighborhood_prompts", ["ok", "ok", "\t"]), "neighborhood_prompts[2]",
     "empty string"),
    ("counterfact", _with(CF_ROME_ROW, "case_id", 100), "case_id", "duplicate id '100' (first at row 0)"),
    # EasyEdit, flat locality
    ("easyedit", _with(CF_EASY_ROW, "prompt", 0), "prompt", "expected a string, got int 0"),
    ("easyedit", _with(CF_EASY_ROW, "target_new", ""), "target_new", "empty string"),
    ("easyedit", _with(CF_EASY_ROW, "ground_truth", 3), "ground_truth",
     "expected a string or a list of strings, got int 3"),
    ("easyedit", _with(CF_EASY_ROW, "rephrase_prompt", 4), "rephrase_prompt", "expected a list of strings, got int"),
    ("easyedit", _with(CF_EASY_ROW, "subject", ""), "subject", "empty string"),
    ("easyedit", _with(CF_EASY_ROW, "locality_prompt", None), "locality_prompt",
     "missing or null (while locality_ground_truth is given)"),
    ("easyedit", _with(CF_EASY_ROW, "locality_ground_truth", None), "locality_ground_truth",
     "missing or null (while locality_prompt is given)"),
    ("easyedit", _with(CF_EASY_ROW, "locality_prompt", 7), "locality_prompt",
     "expected a string or a list of strings, got int"),
    ("easyedit", _with(CF_EASY_ROW, "locality_prompt", ""), "locality_prompt", "empty string"),
    ("easyedit", _with(CF_EASY_ROW, "locality_ground_truth", " "), "locality_ground_truth", "empty"),
    ("easyedit", _with(CF_EASY_ROW, "locality_ground_truth", 8), "locality_ground_truth",
     "expected a string or a list of strings, got int 8"),
    ("easyedit", _with(CF_EASY_ROW, "locality_prompt", ["a", "b"]), "locality_ground_truth",
     "expected a list parallel to the 2 prompts"),
    ("easyedit", _with(_with(CF_EASY_ROW, "locality_prompt", ["a", "b"]), "locality_ground_truth", ["x"]),
     "locality_ground_truth", "expected a list parallel to the 2 prompts"),
    ("easyedit", _with(_with(CF_EASY_ROW, "locality_prompt", ["a", 2]), "locality_ground_truth", ["x", "y"]),
     "locality_prompt[1]", "expected a string, got int 2"),
    ("easyedit", _with(_with(CF_EASY_ROW, "locality_prompt", ["a", " "]), "locality_ground_truth", ["x", "y"]),
     "locality_prompt[1]", "empty string"),
    ("easyedit", _with(_with(CF_EASY_ROW, "locality_prompt", ["a", "b"]), "locality_ground_truth", ["x", []]),
     "locality_ground_truth[1]", "empty"),
    # EasyEdit, nested locality
    ("easyedit", _with(EASY_NESTED_ROW, "locality", ["x"]), "locality", "expected an object, got list"),
    ("easyedit", _with(EASY_NESTED_ROW, "locality.Forgetfulness", "MIT"), "locality.Forgetfulness",
     "expected an object, got str"),
    ("easyedit", _with(EASY_NESTED_ROW, "locality.Forgetfulness", {"ground_truth": "MIT"}),
     "locality.Forgetfulness.prompt", "missing or null (while locality.Forgetfulness.ground_truth is given)"),
    ("easyedit", _with(EASY_NESTED_ROW, "locality.Forgetfulness", {"prompt": "p"}),
     "locality.Forgetfulness.ground_truth", "missing or null (while locality.Forgetfulness.prompt is given)"),
    ("easyedit", _with(EASY_NESTED_ROW, "locality.Relation_Specificity.ground_truth", "1990"),
     "locality.Relation_Specificity.ground_truth", "expected a list parallel to the 2 prompts"),
    ("easyedit", _with(EASY_NESTED_ROW, "locality.Relation_Specificity.ground_truth", [[5], "Oslo"]),
     "locality.Relation_Specificity.ground_truth[0][0]", "expected a string or a list of strings, got int 5"),
    ("easyedit", _with(EASY_NESTED_ROW, "locality.Relation_Specificity.prompt", ["", "p"]),
     "locality.Relation_Specificity.prompt[0]", "empty string"),
    ("easyedit", _with(EASY_NESTED_ROW, "locality.Forgetfulness.prompt", {"a": 1}), "locality.Forgetfulness.prompt",
     "expected a string or a list of strings, got dict"),
    # fastpatch
    ("fastpatch", {"input": "a", "prompt": "b", "target": "t"}, "prompt",
     "give the prompt once, as 'input' or as 'prompt', not both"),
    ("fastpatch", {"prompt": "", "target": "t"}, "prompt", "empty string"),
    ("fastpatch", {"input": 1, "target": "t"}, "input", "expected a string, got int 1"),
    ("fastpatch", {"input": "a"}, "target", "missing or null"),
    ("fastpatch", {"input": "a", "label": "1"}, "label", "expected a class index (int >= 0), got str '1'"),
    ("fastpatch", {"input": "a", "label": False}, "label", "expected a class index (int >= 0), got bool False"),
    ("fastpatch", {"input": "a", "label": 0.5}, "label", "expected a class index (int >= 0), got float 0.5"),
    ("fastpatch", {"input": "a", "label": -2}, "label", "class index must be >= 0, got -2"),
    ("fastpatch", {"input": "a", "label": 1, "target": 1}, "target", "expected a string, got int 1"),
    ("fastpatch", {"input": "a", "target": "t", "locality": "p"}, "locality",
     "expected a list of {prompt, target}, got str"),
    ("fastpatch", {"input": "a", "target": "t", "locality": {"prompt": "p", "target": "q"}}, "locality",
     "expected a list of {prompt, target}, got dict"),
    ("fastpatch", {"input": "a", "target": "t", "locality": [{"prompt": "p", "target": "q"}, "p"]}, "locality[1]",
     "expected an object, got str"),
    ("fastpatch", {"input": "a", "target": "t", "locality": [{"target": "q"}]}, "locality[0].prompt",
     "missing or null"),
    ("fastpatch", {"input": "a", "target": "t", "locality": [{"prompt": "p", "target": ""}]}, "locality[0].target",
     "empty string"),
    ("fastpatch", {"input": "a", "target": "t", "locality": [{"prompt": "p", "label": -1}]}, "locality[0].label",
     "class index must be >= 0, got -1"),
    ("fastpatch", {"input": "a", "target": "t", "ground_truth": 2}, "ground_truth", "expected a string, got int 2"),
    ("fastpatch", {"input": "a", "target": "t", "ground_truth": ""}, "ground_truth", "empty string"),
    ("fastpatch", {"input": "a", "target": "t", "subject": ["s"]}, "subject", "expected a string, got list ['s']"),
    ("fastpatch", {"input": "a", "target": "t", "rephrases": [" "]}, "rephrases[0]", "empty string"),
    ("fastpatch", {"input": "a", "target": "t", "rephrases": "r"}, "rephrases", "expected a list of strings, got str"),
    ("fastpatch", {"input": "a", "target": "t", "id": "good"}, "id", "duplicate id 'good' (first at row 0)"),
    ("fastpatch", {"input": "a", "target": "t", "id": ""}, "id", "expected an int or non-empty string id, got str ''"),
]


@pytest.mark.parametrize("fmt, row, field, reason", ROW_ERRORS,
                         ids=[f"{f}-{x}-{i}" for i, (f, _, x, _) in enumerate(ROW_ERRORS)])
def test_row_errors_name_row_field_and_reason(fmt: str, row: dict, field: str, reason: str) -> None:
    err = _error(row, fmt)
    assert (err.row, err.field, err.reason, err.path) == (1, field, reason, None)
    assert str(err) == f"row 1 (0-based), field {field!r}: {reason}"


def test_a_row_that_is_not_an_object() -> None:
    for fmt in FORMATS:
        with pytest.raises(StreamFormatError) as err:
            parse_rows([["a list"]], fmt=fmt)
        assert (err.value.row, err.value.field, err.value.reason) == (0, "", "expected an object, got list")
        assert str(err.value) == "row 0 (0-based): expected an object, got list"


def test_stream_format_error_message_and_path() -> None:
    err = StreamFormatError(3, "a.b", "why", Path("d") / "s.json")
    assert (err.row, err.field, err.reason, err.path) == (3, "a.b", "why", os.path.join("d", "s.json"))
    assert isinstance(err, ValueError) and str(err) == f"{os.path.join('d', 's.json')}: row 3 (0-based), field 'a.b': why"
    assert str(StreamFormatError(0, "", "whole row")) == "row 0 (0-based): whole row"
    with pytest.raises(StreamFormatError) as caught:
        parse_rows([{"input": 1, "target": "t"}], path="where.jsonl")
    assert caught.value.path == "where.jsonl" and str(caught.value).startswith("where.jsonl: row 0 (0-based), field")


# ---------------------------------------------------------------------------------------------
# Format names and detection
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("row, fmt", [
    ({"requested_rewrite": {}, "src": "s", "alt": "a"}, "counterfact"),  # requested_rewrite first
    ({"src": "s", "alt": "a"}, "zsre"),  # exactly the keys a format needs
    ({"prompt": "p", "target_new": "t"}, "easyedit"),
    ({"src": "s", "alt": "a", "prompt": "p", "target_new": "t"}, "zsre"),
    ({"src": "s"}, None),
    ({"alt": "a"}, None),
    ({"prompt": "p", "target_new": "t", "target": "x"}, "easyedit"),
    ({"target_new": "t"}, None),
    ({"prompt": "p", "target": "t"}, "fastpatch"),
    ({"input": "p", "label": 0}, "fastpatch"),
    ({"input": "p"}, None),
    ({"target": "t", "label": 1}, None),
    ({}, None),
])
def test_detect_format(row: dict, fmt: str | None) -> None:
    assert detect_format(row) == fmt


def test_format_names() -> None:
    assert FORMATS == ("zsre", "counterfact", "easyedit", "fastpatch")
    rows = [{"input": "a", "target": "t"}]
    for name in (" FastPatch ", "JSONL", "auto", "Auto"):
        assert parse_rows(rows, fmt=name).format == "fastpatch"
    for name, fmt in (("MEND", "zsre"), ("Rome", "counterfact"), ("CF", "counterfact")):
        assert parse_rows([], fmt=name).format == fmt
    with pytest.raises(ValueError) as err:
        parse_rows(rows, fmt="json")
    assert str(err.value) == ("unknown stream format 'json'; expected 'auto' or one of "
                              "('zsre', 'counterfact', 'easyedit', 'fastpatch')")


def test_undetectable_first_row() -> None:
    with pytest.raises(StreamFormatError) as err:
        parse_rows([{"q": 1, "a": 2}, {"input": "x", "target": "t"}], path="p.json")
    assert (err.value.row, err.value.field, err.value.path) == (0, "", "p.json")
    assert err.value.reason == ("cannot detect the stream format from the first row's keys ['a', 'q']; "
                                "pass fmt= one of ('zsre', 'counterfact', 'easyedit', 'fastpatch')")
    for first, name in (("text", "str"), (5, "int"), (["input", "target"], "list")):
        with pytest.raises(StreamFormatError) as err:
            parse_rows([first], skip_bad=True)
        assert err.value.reason.startswith(f"cannot detect the stream format from the first row's keys {name};")
    empty = parse_rows([])
    assert (empty.records, empty.skipped, empty.format, empty.loader) == ([], [], "unknown", "datasets")
    assert StreamLoad([]).format == "unknown" and StreamLoad([]).skipped == []


def test_limit() -> None:
    rows = [{"input": f"p{i}", "target": "t"} for i in range(4)]
    rows.insert(1, {"input": "bad"})
    assert [r.source_row for r in parse_rows(rows, limit=2, skip_bad=True).records] == [0, 2]
    assert parse_rows(rows, limit=0).records == []  # stops before the bad row
    assert [r.source_row for r in parse_rows(rows, limit=1).records] == [0]
    with pytest.raises(StreamFormatError):
        parse_rows(rows, limit=2)
    with pytest.raises(ValueError) as err:
        parse_rows(rows, limit=-1)
    assert str(err.value) == "limit must be >= 0, got -1"


def test_ids_and_optional_fields() -> None:
    got = parse_rows([{"id": 5, "input": "a", "target": "t"}, {"id": "5", "input": "b", "target": "t"}],
                     skip_bad=True)
    assert [r.id for r in got.records] == ["5"] and got.skipped == [(1, "id", "duplicate id '5' (first at row 0)")]
    # a skipped row's id is not taken: a later row may use it
    got = parse_rows([{"id": "x", "input": 3, "target": "t"}, {"id": "x", "input": "b", "target": "t"}],
                     skip_bad=True)
    assert [r.id for r in got.records] == ["x"] and [s[0] for s in got.skipped] == [0]
    # ids default to the row index, counted over all rows
    got = parse_rows([{"input": "a", "target": "t"}, {"input": "b", "target": "t", "id": -3},
                      {"input": "c", "target": "t", "id": 3.0}, {"input": "d", "target": "t"}], skip_bad=True)
    assert [r.id for r in got.records] == ["0", "-3", "3"] and got.skipped[0][:2] == (3, "id")
    # CounterFact and EasyEdit rows without case_id: the row index too
    cf = {k: v for k, v in CF_ROME_ROW.items() if k != "case_id"}
    assert [r.id for r in parse_rows([cf, _with(cf, "requested_rewrite.subject", "Peru")]).records] == ["0", "1"]
    easy = {k: v for k, v in CF_EASY_ROW.items() if k != "case_id"}
    assert [r.id for r in parse_rows([easy, _with(easy, "prompt", "q")]).records] == ["0", "1"]
    # null optional fields are as absent
    rec = parse_rows([{"input": "a", "target": "t", "locality": None, "ground_truth": None, "subject": None,
                       "rephrases": None, "label": None, "id": None}]).records[0]
    assert rec == EditRecord("0", "a", "t", None, [], [], None, 0, None)
    # a locality item with a label and no target: the index as text
    rec = parse_rows([{"input": "a", "target": "t", "locality": [{"prompt": "p", "label": 2.0}]}]).records[0]
    assert rec.locality == [("p", "2")] and rec.label is None


def test_record_to_fastpatch_has_every_key() -> None:
    rec = EditRecord("i", "p", "t", "g", ["r1", "r2"], [("lp", "lt")], "s", 4, 1)
    d = record_to_fastpatch(rec)
    assert d == {"id": "i", "input": "p", "target": "t", "ground_truth": "g", "subject": "s",
                 "rephrases": ["r1", "r2"], "locality": [{"prompt": "lp", "target": "lt"}], "label": 1}
    assert d["rephrases"] is not rec.rephrases  # a copy
    back = parse_rows([d]).records[0]
    assert back == EditRecord("i", "p", "t", "g", ["r1", "r2"], [("lp", "lt")], "s", 0, 1)


# ---------------------------------------------------------------------------------------------
# resolve_label messages
# ---------------------------------------------------------------------------------------------


def test_resolve_label_messages() -> None:
    with pytest.raises(ValueError) as err:
        resolve_label(5, None, 2)
    assert str(err.value) == "label 5 out of range: this classifier has 2 labels"
    with pytest.raises(ValueError) as err:
        resolve_label("-1", {}, 3)
    assert str(err.value) == "label '-1' out of range: this classifier has 3 labels"
    with pytest.raises(ValueError) as err:
        resolve_label("X1", None, 2)  # not an index written as text
    assert str(err.value) == "label 'X1' is not a class of this classifier (2 labels)"
    with pytest.raises(ValueError) as err:
        resolve_label(False, {"no": 0, "yes": 1}, 2)
    assert str(err.value) == "label False is not a class index or name; this classifier has 2 labels: 0='no', 1='yes'"
    with pytest.raises(ValueError) as err:
        resolve_label(1.0, None, 2)  # type: ignore[arg-type]
    assert "is not a class of this classifier" in str(err.value)
    assert resolve_label("1", None, 2) == 1 and resolve_label(" 0 ", {"a": 1, "b": 0}, 2) == 0
    assert resolve_label("B", {"a": 1, "b": 0}, 2) == 0 and resolve_label("b", {"B": 1, "b": 0}, 2) == 0
