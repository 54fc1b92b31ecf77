"""Edit streams: file formats (:mod:`.formats`), real geography facts (:mod:`.geography`) and
the true/false claims built from them for classifiers (:mod:`.claims`).

Importing this package is cheap: ``datasets`` is imported only when a file is loaded.
"""

from .claims import Claim, ClaimsData, build_claims, claims_data, claims_records
from .formats import (
    FORMATS,
    EditRecord,
    StreamFormatError,
    StreamLoad,
    detect_format,
    load_stream,
    parse_rows,
    record_to_fastpatch,
    resolve_label,
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
    "Claim",
    "ClaimsData",
    "CountryFact",
    "EditRecord",
    "StreamFormatError",
    "StreamLoad",
    "capital_paraphrases",
    "build_claims",
    "capital_prompt",
    "claims_data",
    "claims_records",
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
    "resolve_label",
    "save_stream_jsonl",
    "split_memory_and_locality",
]
