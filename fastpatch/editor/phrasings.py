"""Phrasings of a relation learnt from data: extra training views of an edit.

A request that names its subject gives a *template* of its prompt (the prompt with the subject
cut out). Requests whose prompts share a template ask the same relation; the other phrasings
they carry (their paraphrases, cut the same way) are other ways to ask it. For a new edit,
:meth:`PhrasingBank.views` puts its own subject into the phrasings its relation has collected:
"What family are {}?" learnt from another record becomes a view "What family are Ramalinaceae?"
of the edit "Which family does Ramalinaceae belong to?". The editor trains the patch on those
views beside the prompt (``EditorConfig.phrasings``), so its key learns the subject under more
than one wording.

The bank is filled from a held-out split of a benchmark (:meth:`PhrasingBank.add_records`) and
from every request the editor has seen, *after* it is edited: a request's own paraphrases
never become its own views, and a view that equals one of the request's paraphrases is
dropped, so an evaluated paraphrase is never trained on.
"""

from __future__ import annotations

import random
from typing import Any, Iterable, Sequence

__all__ = ["PhrasingBank", "template_of"]

#: The subject's place in a template (a character no benchmark text holds).
SLOT = "\x00"


def template_of(text: str, subject: str | None) -> str | None:
    """``text`` with every occurrence of ``subject`` replaced by the slot, or None when the
    subject is missing, blank or not in the text."""
    subj = (subject or "").strip()
    if not subj or subj not in text:
        return None
    return text.replace(subj, SLOT)


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


class PhrasingBank:
    """Relation -> phrasing templates, in the order first seen.

    A relation is named by the template of a prompt; ``add`` links the phrasings to it.
    Bounded: at most ``per_relation`` templates per relation (the first ones).
    """

    def __init__(self, per_relation: int = 64) -> None:
        self.per_relation = per_relation
        self.templates: dict[str, list[str]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self.templates.values())

    def add(self, prompt: str, subject: str | None, phrasings: Iterable[str]) -> int:
        """Record ``phrasings`` (texts naming ``subject``) as ways to ask ``prompt``'s relation;
        return how many templates were new. Texts without the subject are skipped."""
        key = template_of(prompt, subject)
        if key is None:
            return 0
        bucket = self.templates.setdefault(key, [])
        new = 0
        for text in phrasings:
            t = template_of(text, subject)
            if t is None or t == key or t in bucket or len(bucket) >= self.per_relation:
                continue
            bucket.append(t)
            new += 1
        return new

    def add_records(self, records: Iterable[Any]) -> int:
        """Fill from records with ``prompt``, ``subject`` and ``rephrases`` (e.g. a held-out
        split of the benchmark); return the number of new templates."""
        return sum(self.add(r.prompt, r.subject, list(r.rephrases)) for r in records)

    def views(self, prompt: str, subject: str | None, k: int, exclude: Sequence[str] = (),
              seed: int = 0) -> list[str]:
        """Up to ``k`` phrasings of ``prompt``'s relation about ``subject`` (a fixed random draw
        for ``seed``), none equal (up to case and spacing) to the prompt or to ``exclude``."""
        key = template_of(prompt, subject)
        if key is None or k <= 0:
            return []
        subj = (subject or "").strip()
        banned = {_norm(prompt), *(_norm(t) for t in exclude)}
        texts = []
        for t in self.templates.get(key, []):
            text = t.replace(SLOT, subj)
            if _norm(text) not in banned:
                banned.add(_norm(text))
                texts.append(text)
        if len(texts) > k:
            texts = random.Random(seed).sample(texts, k)
        return texts

    def state(self) -> dict[str, list[str]]:
        """The templates, JSON-ready (a copy)."""
        return {k: list(v) for k, v in self.templates.items()}

    def load_state(self, state: dict[str, list[str]]) -> None:
        """Restore what :meth:`state` returned."""
        self.templates = {str(k): [str(t) for t in v] for k, v in state.items()}
