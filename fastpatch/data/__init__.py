"""Edit streams: file formats (:mod:`.formats`) and real geography facts (:mod:`.geography`).

Importing this package is cheap: ``datasets`` is imported only when a file is loaded.
"""

from .formats import (
    FORMATS,
    EditRecord,
    StreamFormatError,
    StreamLoad,
    detect_format,
    load_stream,
    parse_rows,
    record_to_fastpatch,
    save_stream_jsonl,
)
from .geography import (
    CountryFact,
    capital_paraphrases,
    capital_prompt,
    currency_prompts,
    geography_records,
    geography_stream,
    load_country_facts,
    load_fanoutqa_questions,
    region_prompts,
    split_memory_and_locality,
)

__all__ = [
    "FORMATS",
    "CountryFact",
    "EditRecord",
    "StreamFormatError",
    "StreamLoad",
    "capital_paraphrases",
    "capital_prompt",
    "currency_prompts",
    "detect_format",
    "geography_records",
    "geography_stream",
    "load_country_facts",
    "load_fanoutqa_questions",
    "load_stream",
    "parse_rows",
    "record_to_fastpatch",
    "region_prompts",
    "save_stream_jsonl",
    "split_memory_and_locality",
]
