"""One edit request (:class:`EditRecord`) and the parsers that make one from a row of each format
(the formats are described in :mod:`fastpatch.data.formats`, which reads files and detects them).

A parser raises :class:`RowError` naming the field; the caller adds the row number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["PARSERS", "EditRecord", "RowError"]


@dataclass
class EditRecord:
    """One edit request, whatever format it came from."""

    id: str  #: stable request id (case_id / id field, else the row index)
    prompt: str
    target: str  #: the new target, verbatim
    ground_truth: str | None
    rephrases: list[str]
    locality: list[tuple[str, str]]  #: (prompt, answer) pairs the edit must not change
    subject: str | None = None
    source_row: int = 0  #: 0-based row in the source file
    #: class index of a classification request (``target`` then holds its name or the index as
    #: text); None for generative requests. See :func:`resolve_label`.
    label: int | None = None



class RowError(Exception):
    """Internal: a field problem inside one row (row number added by the caller)."""

    def __init__(self, field: str, reason: str):
        super().__init__(field, reason)
        self.field = field
        self.reason = reason


# --------------------------------------------------------------------------------------------
# Field helpers
# --------------------------------------------------------------------------------------------

_MISSING = object()


def _get(obj: Mapping[str, Any], key: str, path: str, required: bool = True) -> Any:
    """``obj[key]``; a missing key and a null value are the same thing (``datasets`` turns a key
    absent from some rows into null)."""
    value = obj.get(key, _MISSING)
    if value is _MISSING or value is None:
        if required:
            raise RowError(path, "missing or null")
        return None
    return value


def _type_name(value: Any) -> str:
    """The type of a value as an error message names it."""
    return type(value).__name__


def _str(obj: Mapping[str, Any], key: str, path: str, required: bool = True, nonempty: bool = True) -> str | None:
    value = _get(obj, key, path, required)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RowError(path, f"expected a string, got {_type_name(value)} {value!r}")
    if nonempty and not value.strip():
        raise RowError(path, "empty string")
    return value


def _mapping(obj: Mapping[str, Any], key: str, path: str, required: bool = True) -> Mapping[str, Any] | None:
    value = _get(obj, key, path, required)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise RowError(path, f"expected an object, got {_type_name(value)}")
    return value


def _str_list(obj: Mapping[str, Any], key: str, path: str, allow_str: bool = False) -> list[str]:
    """An optional list of non-empty strings (missing/null -> [])."""
    value = _get(obj, key, path, required=False)
    if value is None:
        return []
    if isinstance(value, str) and allow_str:
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise RowError(path, f"expected a list of strings, got {_type_name(value)}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise RowError(f"{path}[{i}]", f"expected a string, got {_type_name(item)} {item!r}")
        if not item.strip():
            raise RowError(f"{path}[{i}]", "empty string")
        out.append(item)
    return out


def _first_str(value: Any, path: str) -> str | None:
    """A string, or the first string of a (possibly nested) list; [] -> None."""
    while isinstance(value, (list, tuple)):
        if not value:
            return None
        value, path = value[0], f"{path}[0]"
    if value is None:
        return None
    if not isinstance(value, str):
        raise RowError(path, f"expected a string or a list of strings, got {_type_name(value)} {value!r}")
    return value


def _row_id(row: Mapping[str, Any], key: str, index: int) -> str:
    value = row.get(key)
    if value is None:
        return str(index)
    if isinstance(value, bool):
        raise RowError(key, f"expected an int or string id, got bool {value!r}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    if isinstance(value, str) and value.strip():
        return value
    raise RowError(key, f"expected an int or non-empty string id, got {_type_name(value)} {value!r}")


# --------------------------------------------------------------------------------------------
# Per-format parsers: raw row (dict) -> EditRecord, or RowError
# --------------------------------------------------------------------------------------------


def _parse_zsre(row: Mapping[str, Any], index: int) -> EditRecord:
    prompt = _str(row, "src", "src")
    target = _str(row, "alt", "alt")
    rephrase = _str(row, "rephrase", "rephrase")
    answers = _get(row, "answers", "answers")
    ground_truth = _first_str(answers, "answers")
    loc = _str(row, "loc", "loc")
    loc_ans = _str(row, "loc_ans", "loc_ans")
    subject = _str(row, "subject", "subject", required=False)
    return EditRecord(
        id=_row_id(row, "case_id", index),
        prompt=prompt,  # type: ignore[arg-type]
        target=target,  # type: ignore[arg-type]
        ground_truth=ground_truth,
        rephrases=[rephrase],  # type: ignore[list-item]
        locality=[(loc, loc_ans)],  # type: ignore[list-item]
        subject=subject,
        source_row=index,
    )


def _parse_counterfact(row: Mapping[str, Any], index: int) -> EditRecord:
    rw = _mapping(row, "requested_rewrite", "requested_rewrite")
    assert rw is not None
    template = _str(rw, "prompt", "requested_rewrite.prompt")
    subject = _str(rw, "subject", "requested_rewrite.subject")
    assert template is not None and subject is not None
    if "{}" not in template:
        raise RowError("requested_rewrite.prompt", f"no '{{}}' subject placeholder in {template!r}")
    new = _mapping(rw, "target_new", "requested_rewrite.target_new")
    true = _mapping(rw, "target_true", "requested_rewrite.target_true")
    assert new is not None and true is not None
    target = _str(new, "str", "requested_rewrite.target_new.str")
    truth = _str(true, "str", "requested_rewrite.target_true.str")
    neighbours = _str_list(row, "neighborhood_prompts", "neighborhood_prompts")
    return EditRecord(
        id=_row_id(row, "case_id", index),
        prompt=template.replace("{}", subject),
        target=target,  # type: ignore[arg-type]
        ground_truth=truth,
        rephrases=_str_list(row, "paraphrase_prompts", "paraphrase_prompts"),
        locality=[(p, truth) for p in neighbours],  # type: ignore[misc]
        subject=subject,
        source_row=index,
    )


def _easyedit_locality(row: Mapping[str, Any]) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    # Flat variant (e.g. KnowledgeSpread's counterfact-edit.json).
    flat_p = row.get("locality_prompt")
    flat_a = row.get("locality_ground_truth")
    if flat_p is not None or flat_a is not None:
        pairs += _locality_pair(flat_p, flat_a, "locality_prompt", "locality_ground_truth")
    # Nested variant: locality {name: {prompt, ground_truth}}.
    loc = _mapping(row, "locality", "locality", required=False)
    for name, item in (loc or {}).items():
        if item is None:  # a name present in other rows only (datasets unifies struct keys)
            continue
        if not isinstance(item, Mapping):
            raise RowError(f"locality.{name}", f"expected an object, got {_type_name(item)}")
        pairs += _locality_pair(
            item.get("prompt"), item.get("ground_truth"),
            f"locality.{name}.prompt", f"locality.{name}.ground_truth",
        )
    return pairs


def _locality_pair(prompt: Any, answer: Any, p_path: str, a_path: str) -> list[tuple[str, str]]:
    if prompt is None:
        raise RowError(p_path, f"missing or null (while {a_path} is given)")
    if answer is None:
        raise RowError(a_path, f"missing or null (while {p_path} is given)")
    if isinstance(prompt, str):
        prompts, answers = [prompt], [answer]
    elif isinstance(prompt, (list, tuple)):
        prompts = list(prompt)
        if not isinstance(answer, (list, tuple)) or len(answer) != len(prompts):
            raise RowError(a_path, f"expected a list parallel to the {len(prompts)} prompts")
        answers = list(answer)
    else:
        raise RowError(p_path, f"expected a string or a list of strings, got {_type_name(prompt)}")
    out = []
    for i, (p, a) in enumerate(zip(prompts, answers)):
        pi = p_path if isinstance(prompt, str) else f"{p_path}[{i}]"
        ai = a_path if isinstance(prompt, str) else f"{a_path}[{i}]"
        if not isinstance(p, str):
            raise RowError(pi, f"expected a string, got {_type_name(p)} {p!r}")
        if not p.strip():
            raise RowError(pi, "empty string")
        a_str = _first_str(a, ai)
        if a_str is None or not a_str.strip():
            raise RowError(ai, "empty")
        out.append((p, a_str))
    return out


def _parse_easyedit(row: Mapping[str, Any], index: int) -> EditRecord:
    prompt = _str(row, "prompt", "prompt")
    target = _str(row, "target_new", "target_new")
    gt_raw = _get(row, "ground_truth", "ground_truth", required=False)
    ground_truth = None if gt_raw is None else _first_str(gt_raw, "ground_truth")
    return EditRecord(
        id=_row_id(row, "case_id", index),
        prompt=prompt,  # type: ignore[arg-type]
        target=target,  # type: ignore[arg-type]
        ground_truth=ground_truth,
        rephrases=_str_list(row, "rephrase_prompt", "rephrase_prompt", allow_str=True),
        locality=_easyedit_locality(row),
        subject=_str(row, "subject", "subject", required=False),
        source_row=index,
    )


def _label(obj: Mapping[str, Any], key: str, path: str) -> int | None:
    """An optional class index: a non-negative int (an integral float from a typed column is
    accepted); missing/null -> None."""
    value = _get(obj, key, path, required=False)
    if value is None:
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RowError(path, f"expected a class index (int >= 0), got {_type_name(value)} {value!r}")
    if value < 0:
        raise RowError(path, f"class index must be >= 0, got {value}")
    return value


def _target_or_label(obj: Mapping[str, Any], path: str) -> tuple[str, int | None]:
    """``target`` (verbatim) and/or ``label`` (a class index); at least one must be given. With
    only a label, the target is the index as text ("1")."""
    label = _label(obj, "label", f"{path}label")
    if label is None:
        return _str(obj, "target", f"{path}target"), None  # type: ignore[return-value]
    target = _str(obj, "target", f"{path}target", required=False)
    return (str(label) if target is None else target), label


def _prompt_key(row: Mapping[str, Any]) -> str:
    """``input`` (what :func:`save_stream_jsonl` writes) or ``prompt`` (the API's word); not both."""
    has_input, has_prompt = row.get("input") is not None, row.get("prompt") is not None
    if has_input and has_prompt:
        raise RowError("prompt", "give the prompt once, as 'input' or as 'prompt', not both")
    return "prompt" if has_prompt else "input"


def _parse_fastpatch(row: Mapping[str, Any], index: int) -> EditRecord:
    key = _prompt_key(row)
    prompt = _str(row, key, key)
    target, label = _target_or_label(row, "")
    locality: list[tuple[str, str]] = []
    raw_loc = _get(row, "locality", "locality", required=False)
    if raw_loc is not None:
        if not isinstance(raw_loc, (list, tuple)):
            raise RowError("locality", f"expected a list of {{prompt, target}}, got {_type_name(raw_loc)}")
        for i, item in enumerate(raw_loc):
            if not isinstance(item, Mapping):
                raise RowError(f"locality[{i}]", f"expected an object, got {_type_name(item)}")
            p = _str(item, "prompt", f"locality[{i}].prompt")
            t, _ = _target_or_label(item, f"locality[{i}].")
            locality.append((p, t))  # type: ignore[arg-type]
    gt = _str(row, "ground_truth", "ground_truth", required=False)
    return EditRecord(
        id=_row_id(row, "id", index),
        prompt=prompt,  # type: ignore[arg-type]
        target=target,  # type: ignore[arg-type]
        ground_truth=gt,
        rephrases=_str_list(row, "rephrases", "rephrases"),
        locality=locality,
        subject=_str(row, "subject", "subject", required=False),
        source_row=index,
        label=label,
    )


PARSERS: dict[str, Callable[[Mapping[str, Any], int], EditRecord]] = {
    "zsre": _parse_zsre,
    "counterfact": _parse_counterfact,
    "easyedit": _parse_easyedit,
    "fastpatch": _parse_fastpatch,
}
