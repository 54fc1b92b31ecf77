"""Edit-stream formats, normalised to one record type.

Four on-disk formats are understood (auto-detected from the first row's keys, or forced with
``fmt=``):

``zsre`` (MEND)
    ``src, rephrase, alt, answers, loc, loc_ans`` -> prompt=src, target=alt,
    ground_truth=answers[0], rephrases=[rephrase], locality=[(loc, loc_ans)]. ``loc`` keeps its
    ``"nq question: "`` prefix.
``counterfact`` (ROME)
    ``requested_rewrite{prompt ("{}" marks the subject), subject, target_new{str},
    target_true{str}}, paraphrase_prompts, neighborhood_prompts`` -> prompt=prompt with the
    subject filled in, target=target_new.str, ground_truth=target_true.str,
    rephrases=paraphrase_prompts, locality=[(p, target_true.str)] for every neighborhood prompt
    (neighbours share the true object).
``easyedit``
    ``prompt, target_new, ground_truth, rephrase_prompt, locality{name: {prompt, ground_truth}}``,
    or the flat variant ``locality_prompt, locality_ground_truth``. ``ground_truth`` may be a
    string or a list (first element taken); a locality ``prompt`` may be a list with a parallel
    ``ground_truth`` list.
``fastpatch``
    ``input`` (or ``prompt``, the Python API's word), ``target, rephrases?, locality?[{prompt, target}], id?, ground_truth?, subject?,
    label?`` -- what :func:`save_stream_jsonl` writes. A classification request gives ``label``
    (a class index) and/or ``target`` naming the class (``"true"``, mapped through the model's
    ``config.label2id`` when the stream runs, see :func:`resolve_label`); with ``label`` alone the
    target is the index as text. Locality items take ``label`` in place of ``target`` likewise.

Targets are kept verbatim (no spaces added or stripped: the editor handles spacing). Rows are
numbered from 0 in file order. A malformed row raises :class:`StreamFormatError` naming the row
and the field; with ``skip_bad=True`` it is skipped and listed in :attr:`StreamLoad.skipped`.
Nothing is dropped silently.

Files (``.json`` list, ``.jsonl``/``.ndjson`` lines, ``.parquet``) are read with
``datasets.load_dataset`` into memory, with a throw-away cache directory, so nothing is written
next to the data (which may be read-only).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_file
# _MISSING / _type_name: the field helpers' sentinel and type naming, shared with the file readers here
from .records import _MISSING, PARSERS, EditRecord, RowError, _type_name  # noqa: F401

__all__ = [
    "FORMATS",
    "EditRecord",
    "StreamFormatError",
    "StreamLoad",
    "content_fingerprint",
    "detect_format",
    "load_stream",
    "parse_rows",
    "record_to_fastpatch",
    "resolve_label",
    "save_stream_jsonl",
]

#: Canonical format names.
FORMATS: tuple[str, ...] = ("zsre", "counterfact", "easyedit", "fastpatch")
_ALIASES = {"mend": "zsre", "rome": "counterfact", "cf": "counterfact", "jsonl": "fastpatch"}


@dataclass
class StreamLoad:
    """Result of :func:`load_stream`."""

    records: list[EditRecord]
    skipped: list[tuple[int, str, str]] = field(default_factory=list)  #: (row, field, reason)
    format: str = "unknown"
    #: "datasets", or "json" when the file had to be read with the json module (see _read_rows).
    loader: str = "datasets"


class StreamFormatError(ValueError):
    """A malformed row (or an undetectable format). ``row`` is 0-based; ``field`` is a dotted
    path such as ``"requested_rewrite.target_new.str"`` (empty when about the whole row)."""

    def __init__(self, row: int, field: str, reason: str, path: str | os.PathLike[str] | None = None):
        self.row = row
        self.field = field
        self.reason = reason
        self.path = None if path is None else os.fspath(path)
        where = f"{self.path}: " if self.path else ""
        what = f", field {field!r}" if field else ""
        super().__init__(f"{where}row {row} (0-based){what}: {reason}")


def content_fingerprint(rows: Iterable[Mapping[str, Any]]) -> str:
    """sha256 over JSON rows (sorted keys, one per line), in order: what identifies a dataset."""
    import hashlib

    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def detect_format(row: Mapping[str, Any]) -> str | None:
    """The format a row's keys indicate, or None."""
    keys = set(row)
    if "requested_rewrite" in keys:
        return "counterfact"
    if {"src", "alt"} <= keys:
        return "zsre"
    if {"prompt", "target_new"} <= keys:
        return "easyedit"
    if keys & {"input", "prompt"} and keys & {"target", "label"}:
        return "fastpatch"
    return None


def _canonical_format(fmt: str) -> str:
    name = fmt.strip().lower()
    name = _ALIASES.get(name, name)
    if name != "auto" and name not in FORMATS:
        raise ValueError(f"unknown stream format {fmt!r}; expected 'auto' or one of {FORMATS}")
    return name


def parse_rows(
    rows: Sequence[Any],
    fmt: str = "auto",
    limit: int | None = None,
    skip_bad: bool = False,
    path: str | os.PathLike[str] | None = None,
) -> StreamLoad:
    """Normalise already-loaded rows (dicts). See :func:`load_stream` for the arguments."""
    fmt = _canonical_format(fmt)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if fmt == "auto":
        if not rows:
            return StreamLoad(records=[], format="unknown")
        first = rows[0]
        detected = detect_format(first) if isinstance(first, Mapping) else None
        if detected is None:
            keys = sorted(first) if isinstance(first, Mapping) else _type_name(first)
            raise StreamFormatError(
                0, "", f"cannot detect the stream format from the first row's keys {keys}; "
                f"pass fmt= one of {FORMATS}", path)
        fmt = detected
    parser = PARSERS[fmt]
    out = StreamLoad(records=[], format=fmt)
    seen: dict[str, int] = {}
    for index, row in enumerate(rows):
        if limit is not None and len(out.records) >= limit:
            break
        try:
            if not isinstance(row, Mapping):
                raise RowError("", f"expected an object, got {_type_name(row)}")
            record = parser(row, index)
            if record.id in seen:
                id_field = "id" if fmt == "fastpatch" else "case_id"
                raise RowError(id_field, f"duplicate id {record.id!r} (first at row {seen[record.id]})")
        except RowError as err:
            if not skip_bad:
                raise StreamFormatError(index, err.field, err.reason, path) from None
            out.skipped.append((index, err.field, err.reason))
            continue
        seen[record.id] = index
        out.records.append(record)
    return out


def resolve_label(value: str | int, label2id: Mapping[str, int] | None, num_labels: int) -> int:
    """The class index a classification target names, for a classifier with ``num_labels``
    classes whose names are ``label2id`` (``config.label2id``).

    ``value`` may be an int, a class name (matched exactly, then case-insensitively, surrounding
    spaces ignored) or an index written as text (``"1"``).

    Raises:
        ValueError: not a name of this classifier, or an index outside ``0 .. num_labels - 1``;
            the message lists the valid names and indices.
    """
    names = dict(label2id or {})
    valid = f"{num_labels} labels: " + ", ".join(
        f"{i}={n!r}" for i, n in sorted((int(i), n) for n, i in names.items())) if names else f"{num_labels} labels"
    if isinstance(value, bool):
        raise ValueError(f"label {value!r} is not a class index or name; this classifier has {valid}")
    index: int | None = None
    if isinstance(value, int):
        index = value
    elif isinstance(value, str):
        text = value.strip()
        if text in names:
            index = int(names[text])
        else:
            folded = {n.lower(): int(i) for n, i in names.items()}
            if text.lower() in folded:
                index = folded[text.lower()]
            elif text.lstrip("-").isdigit():
                index = int(text)
    if index is None:
        raise ValueError(f"label {value!r} is not a class of this classifier ({valid})")
    if not 0 <= index < num_labels:
        raise ValueError(f"label {value!r} out of range: this classifier has {valid}")
    return index


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def _container(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise ValueError(f"{path}: unsupported file type {suffix!r}; expected .json, .jsonl or .parquet")


def _has_json_feature(feature: Any) -> bool:
    """Whether a ``datasets`` feature tree contains the ``Json`` type (see :func:`_read_rows`)."""
    if type(feature).__name__ == "Json":
        return True
    if isinstance(feature, Mapping):
        return any(_has_json_feature(f) for f in feature.values())
    if isinstance(feature, (list, tuple)):
        return any(_has_json_feature(f) for f in feature)
    inner = getattr(feature, "feature", None)
    return inner is not None and _has_json_feature(inner)


def _load_with_datasets(path: Path, container: str) -> tuple[list[dict[str, Any]], bool]:
    """Rows through ``datasets``; the flag says whether any column has the ``Json`` type."""
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        # keep_in_memory + a throw-away cache_dir: nothing is written beside the data, and the
        # temporary Arrow cache is deleted as soon as the rows are in memory.
        with tempfile.TemporaryDirectory(prefix="fastpatch-ds-") as cache:
            ds = datasets.load_dataset(
                "json" if container in ("json", "jsonl") else "parquet",
                data_files=str(path),
                split="train",
                keep_in_memory=True,
                cache_dir=cache,
            )
            return ds.to_list(), _has_json_feature(ds.features)
    finally:
        if bars:
            datasets.enable_progress_bars()


def _json_list_rows(text: str, path: Path) -> list[Any]:
    """The rows of a JSON list, parsed one element at a time so that a truncated or corrupt file
    is a :class:`StreamFormatError` naming the row where it breaks."""
    dec = json.JSONDecoder()
    ws = " \t\n\r"
    rows: list[Any] = []
    pos = len(text) - len(text.lstrip(ws)) + 1  # past "["

    def fail(what: str) -> StreamFormatError:
        line = text.count("\n", 0, pos) + 1
        return StreamFormatError(len(rows), "", f"not valid JSON (truncated or corrupt?): {what} at line {line}; "
                                 f"expected a JSON list of rows, or one JSON object per line", path)

    while True:
        while pos < len(text) and text[pos] in ws:
            pos += 1
        if pos < len(text) and text[pos] == "]" and not rows:
            pos += 1
            break
        try:
            row, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise fail(err.msg) from None
        rows.append(row)
        while pos < len(text) and text[pos] in ws:
            pos += 1
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos < len(text) and text[pos] == "]":
            pos += 1
            break
        else:
            raise fail("expected ',' or ']' after a row" if pos < len(text) else "the list is not closed")
    if text[pos:].strip(ws):
        raise fail("extra data after the list")
    return rows


def _utf8(raw: bytes, path: Path, row: Callable[[str], int]) -> str:
    """``raw`` decoded as UTF-8; otherwise a :class:`StreamFormatError` naming the row (``row``
    maps the text before the bad bytes to the row they fall in)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        before = raw[: err.start].decode("utf-8", errors="replace")
        raise StreamFormatError(row(before), "", f"bytes that are not UTF-8 at byte {err.start} "
                                f"(the file must be UTF-8 encoded)", path) from None


def _jsonl_row_at(before: str) -> int:
    return sum(1 for line in before.splitlines()[:-1] if line.strip()) if before else 0


def _json_row_at(before: str) -> int:
    """The row of a JSON list that the text ``before`` ends in (after a complete list: the row
    after its last one, as the parser names data after the list)."""
    try:
        return len(_json_list_rows(before, Path()))
    except StreamFormatError as err:
        return err.row


def _load_with_json(path: Path, container: str) -> list[Any]:
    """Rows with the json module, every value exactly as written. Anything that is not rows (a
    truncated or corrupt file, bytes that are not UTF-8, a top-level value that is not a list) is a
    :class:`StreamFormatError` naming the row where it is found."""
    raw = path.read_bytes()
    if container == "json":
        text = _utf8(raw, path, _json_row_at if raw.lstrip().startswith(b"[") else _jsonl_row_at)
        body = text.lstrip(" \t\n\r")
        if body.startswith("["):
            return _json_list_rows(text, path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = _MISSING  # a ".json" file holding JSON lines (datasets accepts those too)
        if data is not _MISSING:
            raise StreamFormatError(0, "", f"expected a JSON list of rows, got {_type_name(data)}", path)
    else:
        text = _utf8(raw, path, _jsonl_row_at)
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise StreamFormatError(len(rows), "", f"line {lineno} is not valid JSON (truncated or corrupt?): "
                                        f"{err}", path) from None
    return rows


def _read_rows(path: Path) -> tuple[list[Any], str]:
    """Rows of a file and the loader used ("datasets" or "json").

    ``datasets`` is tried first. For .json/.jsonl we fall back to the json module when
      * ``datasets`` fails: pyarrow cannot unify some heterogeneous nested fields, an empty file
        has "no data", a top-level list of scalars, ...; or
      * ``datasets`` succeeded only by typing a column as ``Json`` (values of mixed types). That
        type is lossy: string values that parse as JSON come back decoded (``"1990"`` -> ``1990``,
        observed with datasets 5.2), so a valid string target could be reported as a wrong type.
    The json module keeps every value exactly as written, and the row validation then reports
    the mixed-type rows precisely.
    """
    container = _container(path)
    if not path.is_file():
        raise FileNotFoundError(path)
    if container == "parquet":
        try:
            return _load_with_datasets(path, container)[0], "datasets"
        except Exception as err:  # noqa: BLE001 - pyarrow/datasets errors of a damaged file
            raise StreamFormatError(0, "", f"not a readable parquet file (truncated or corrupt?): "
                                    f"{type(err).__name__}: {err}", path) from None
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
    lossy = True
    # Only a list or objects go to datasets: a top-level JSON scalar is not rows (and a file
    # holding just "null" crashes its JSON reader, datasets 5.2 / pyarrow, with a segfault).
    if head[:1] in (b"[", b"{"):
        try:
            rows, lossy = _load_with_datasets(path, container)
        except Exception:  # noqa: BLE001 - any datasets/pyarrow failure -> plain json below
            lossy = True
    if not lossy:
        return rows, "datasets"
    return _load_with_json(path, container), "json"


def load_stream(
    path: str | os.PathLike[str],
    fmt: str = "auto",
    limit: int | None = None,
    skip_bad: bool = False,
) -> StreamLoad:
    """Load an edit stream from a .json (list), .jsonl or .parquet file.

    Args:
        path: the file.
        fmt: ``"auto"`` (detect from the first row's keys) or one of :data:`FORMATS`
            (aliases: ``"mend"`` -> zsre, ``"rome"`` -> counterfact).
        limit: keep at most this many records (skipped rows do not count).
        skip_bad: skip malformed rows, listing them in ``.skipped`` as (row, field, reason),
            instead of raising.

    Raises:
        StreamFormatError: a malformed row (message: path, 0-based row, field, reason), or the
            format cannot be detected.
    """
    p = Path(path)
    rows, loader = _read_rows(p)
    result = parse_rows(rows, fmt=fmt, limit=limit, skip_bad=skip_bad, path=p)
    result.loader = loader
    return result


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def record_to_fastpatch(record: EditRecord) -> dict[str, Any]:
    """One record as a fastpatch-format dict (every key present, so all rows share a schema)."""
    return {
        "id": record.id,
        "input": record.prompt,
        "target": record.target,
        "ground_truth": record.ground_truth,
        "subject": record.subject,
        "rephrases": list(record.rephrases),
        "locality": [{"prompt": p, "target": t} for p, t in record.locality],
        "label": record.label,
    }


def save_stream_jsonl(records: Iterable[EditRecord], path: str | os.PathLike[str]) -> Path:
    """Write records as fastpatch JSONL (one object a line, UTF-8); returns the path.

    The file is written under a temporary name and renamed into place.
    """
    out = Path(path)
    with atomic_file(out, "w") as fh:
        for record in records:
            fh.write(json.dumps(record_to_fastpatch(record), ensure_ascii=False) + "\n")
    return out
