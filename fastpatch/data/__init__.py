"""Edit streams: the file formats (:mod:`.formats`) and the :class:`EditRecord` every stream is made of.

The built-in streams (geography, claims) are part of the demo app: :mod:`fastpatch.app`.
Importing this package is cheap: ``datasets`` is imported only when a file is loaded.
"""

from .formats import (
    FORMATS,
    EditRecord,
    StreamFormatError,
    StreamLoad,
    content_fingerprint,
    detect_format,
    load_stream,
    parse_rows,
    record_to_fastpatch,
    resolve_label,
    save_stream_jsonl,
)

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
