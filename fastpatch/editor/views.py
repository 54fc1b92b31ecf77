"""What an edit trains on: its views, hard negatives, context prefixes and phrasings.

An edit is trained on several *views* of its request: the request as given, the request behind
each generated context prefix (``config.augment``) and behind a sentence about its subject
(``config.subject_context``), and its relation's other phrasings about the same subject
(``config.phrasings``, :mod:`.phrasings`). Its memory loss also reads *hard
negatives*: the prompt about other subjects of the pool (``config.negatives``). A subject key
(``config.key_position``) reads each view at its subject's last token.

:class:`EditViews` is the part of :class:`~.editor.Editor` that builds these; it owns no state of
its own beyond what the editor saves (``prefixes``, ``subjects``, ``phrasings``).
"""

from __future__ import annotations

import logging
import random
from typing import Any, Callable, Sequence

import torch

from .batch import EditBatch, pick_neurons, with_subject_neuron
from .capture import Capturer
from .encoding import Encoded, subject_last_token
from .handle import ModelHandle
from .memory import MemorySet
from .phrasings import PhrasingBank
from .types import CONTEXT_SEEDS, SUBJECT_SEEDS, EditError, EditorConfig, EditRequest

__all__ = ["EditViews"]

log = logging.getLogger("fastpatch.editor")


class EditViews:
    """Builds an edit's training batch (mixed into :class:`~.editor.Editor`).

    Needs from the editor: ``config``, ``handle``, ``tokenizer``, ``memory``, ``capturer``,
    ``next_code``, ``_encode``, ``ffn_inputs`` and ``greedy``.
    """

    config: EditorConfig
    handle: ModelHandle
    tokenizer: Any
    memory: MemorySet
    capturer: Capturer
    next_code: int
    prefixes: list[str] | None
    subjects: list[str]
    phrasings: PhrasingBank
    _warned_empty: bool
    _encode: Callable[[EditRequest], Encoded]
    ffn_inputs: Callable[..., list[torch.Tensor]]
    greedy: Callable[..., list[list[int]]]

    # ------------------------------------------------------------------ batch
    def _prepare(self, reqs: Sequence[EditRequest]) -> EditBatch:
        """Encode (raises ``EditError`` on bad input), add context variants, capture, pick neurons."""
        encs = [self._encode(r) for r in reqs]
        if len(self.memory) == 0 and not self._warned_empty:
            log.warning("editing with an empty memory set: call build_memory() for locality")
            self._warned_empty = True
        # views: each request as given (its first view) plus its context-prefixed variants
        views: list[Encoded] = []
        groups: list[list[int]] = []
        key_pos: list[int | None] = []
        phrased = [self._phrasing_texts(r) for r in reqs]
        by_subject = self.config.key_position != "last"
        subject_keyed: list[bool] = []
        for r, e, texts in zip(reqs, encs, phrased):
            own = self._subject_pos(e, r) if by_subject else None
            subject_keyed.append(own is not None)
            groups.append([len(views)])
            views.append(e)
            key_pos.append(own)
            for v in self._augmented(r) + self._subject_views(r) + self._phrased(r, texts):
                pos = self._subject_pos(v, r) if own is not None else None
                if own is not None and pos is None:
                    continue  # a view without the subject has nothing for a subject key to read
                groups[-1].append(len(views))
                views.append(v)
                key_pos.append(pos)
        cap = self.capturer.capture_all(views, self.config.loss_vocab)
        neurons = pick_neurons(encs, cap, groups, self.config.max_neurons)
        if any(subject_keyed):  # one subject neuron per request: instead of ("subject") or beside ("both") its own
            neurons = [n for ri in range(len(reqs)) for n in with_subject_neuron(
                [x for x in neurons if x[0] == ri], subject_keyed[ri], self.config.key_position == "both")]
        batch = EditBatch(views, cap, groups, neurons, key_pos=key_pos if any(subject_keyed) else None)
        if neurons:
            batch.negatives = self._negatives(reqs, phrased if self.config.negative_views else None,
                                              whole=by_subject)
        for r in reqs:  # the pools grow with every request that names its subject
            if r.subject and r.subject.strip() and r.subject not in self.subjects:
                self.subjects.append(r.subject)
            self.phrasings.add(r.prompt, r.subject, r.rephrases)
        if neurons and all("top" in c for c in cap):
            batch.set_candidates(torch.cat([c["top"].reshape(-1) for c in cap]))
        return batch

    def _subject_pos(self, enc: Encoded, req: EditRequest) -> int | None:
        """Where a subject key reads view ``enc`` of ``req``: its subject's last token (None: absent)."""
        if not req.subject or enc.prompt is None:
            return None
        return subject_last_token(self.tokenizer, enc.prompt, req.subject)

    def _negatives(self, reqs: Sequence[EditRequest], phrased: Sequence[list[str]] | None = None,
                   whole: bool = False) -> torch.Tensor | None:
        """FFN inputs of the requests' hard negatives (``config.negatives``), from the last prompt
        token on: each prompt with up to that many other subjects of the pool in place of its own
        (a fixed random draw per edit), read with its ground truth (else its target). With
        ``phrased`` (each request's phrasing views, ``config.negative_views``) the other subjects
        go in turn into the prompt and each of its views, so the patch stays silent on the
        relation's other wordings about other subjects too. ``whole``: every position of each
        negative (a subject key must stay silent on the other subjects themselves)."""
        k = self.config.negatives
        if k <= 0 or not self.handle.encoder.augments or not self.subjects:
            return None
        texts, starts = [], []
        rng = random.Random(self.config.seed * 1_000_003 + self.next_code)
        for ri, r in enumerate(reqs):
            subj = (r.subject or "").strip()
            if not subj or subj not in r.prompt:
                continue
            wordings = [r.prompt, *(phrased[ri] if phrased else [])]
            pool = [s for s in self.subjects if s.strip() != subj and not any(s in w for w in wordings)]
            answer = r.ground_truth if r.ground_truth and r.ground_truth.strip() else r.target
            for j, other in enumerate(rng.sample(pool, min(k, len(pool)))):
                prompt = wordings[j % len(wordings)].replace(subj, other.strip())
                texts.append(prompt + self.handle.encoder.target_text(prompt, answer))
                starts.append(0 if whole else len(self.tokenizer(prompt)["input_ids"]) - 1)
        if not texts:
            return None
        rows = [x[s:] for x, s in zip(self.ffn_inputs(texts), starts)]
        return torch.cat(rows).float()

    # ------------------------------------------------------------ augmentation
    def context_prefixes(self) -> list[str]:
        """The generated context prefixes of ``config.augment`` (empty when it is 0).

        Generated once with the model's own greedy decoding from fixed seed words, so they are
        deterministic for a given model, and saved with the editor. Decoder-only models only.
        """
        n = self.config.augment if self.handle.encoder.augments else 0
        if n == 0:
            return []
        if self.prefixes is None or len(self.prefixes) < n:
            # Generation starts after a newline: a bare first word at the very start of a text
            # is out of distribution for many LMs (SmolLM2 continues "The" with "-the-world-").
            self.prefixes = self._generated_prefixes(list(CONTEXT_SEEDS[:n]))
        return self.prefixes[:n]

    def _generated_prefixes(self, seeds: Sequence[str], whole_word: bool = False) -> list[str]:
        """Each seed with the original model's greedy continuation (``config.augment_tokens``
        tokens, to the first line end), as one sentence ending in ". ". ``whole_word``: a
        continuation that runs on inside the seed's last word ("Papp" -> "Pappas") is dropped."""
        with self.ffn.patches_disabled():
            gen = self.greedy(["\n" + w for w in seeds], max_new_tokens=self.config.augment_tokens)
        texts = []
        for seed, ids in zip(seeds, gen):
            cont = self.tokenizer.decode(ids, skip_special_tokens=True).split("\n")[0]
            if whole_word and cont[:1].isalnum():
                cont = ""
            text = " ".join((seed + cont).split()).rstrip(" .,;:")
            texts.append(text + ". ")
        return texts

    def subject_prefixes(self, req: EditRequest) -> list[str]:
        """The subject-context prefixes of ``req`` (``config.subject_context``): a sentence the
        original model continues from each of :data:`~.types.SUBJECT_SEEDS` with the request's
        subject (empty without a subject, or for models that are not decoder-only)."""
        n = self.config.subject_context if self.handle.encoder.augments else 0
        subj = " ".join((req.subject or "").split())
        if n == 0 or not subj:
            return []
        return self._generated_prefixes([seed.format(s=subj) for seed in SUBJECT_SEEDS[:n]], whole_word=True)

    def _subject_views(self, req: EditRequest) -> list[Encoded]:
        """The request behind each of its subject-context prefixes; a view equal to one of the
        request's own paraphrases, or longer than the context, is left out."""
        own = {" ".join(p.split()) for p in req.rephrases}
        texts = [prefix + req.prompt for prefix in self.subject_prefixes(req)]
        return self._encoded(req, [t for t in texts if " ".join(t.split()) not in own])

    def _augmented(self, req: EditRequest) -> list[Encoded]:
        """The request behind each context prefix (variants longer than the context are left out)."""
        return self._encoded(req, [prefix + req.prompt for prefix in self.context_prefixes()])

    def _encoded(self, req: EditRequest, texts: Sequence[str]) -> list[Encoded]:
        """``texts`` as prompts of ``req``'s target, encoded; those longer than the context are left out."""
        out = []
        for text in texts:
            try:
                out.append(self._encode(EditRequest(text, req.target, edit_id=req.edit_id)))
            except EditError:
                continue
        return out

    def add_phrasings(self, records: Sequence[Any]) -> int:
        """Teach the phrasing bank (``config.phrasings``) from records with ``prompt``, ``subject``
        and ``rephrases``, e.g. a held-out split of the benchmark; return the new templates."""
        return self.phrasings.add_records(records)

    def _phrasing_texts(self, req: EditRequest) -> list[str]:
        """The texts of the request's phrasing views (``config.phrasings``): its relation's other
        phrasings about its subject, none equal to its own paraphrases (:mod:`.phrasings`)."""
        k = self.config.phrasings if self.handle.encoder.augments else 0
        return self.phrasings.views(req.prompt, req.subject, k, exclude=req.rephrases,
                                    seed=self.config.seed * 1_000_003 + self.next_code)

    def _phrased(self, req: EditRequest, texts: Sequence[str] | None = None) -> list[Encoded]:
        """The request's phrasing views, encoded (``texts``: from :meth:`_phrasing_texts`)."""
        return self._encoded(req, self._phrasing_texts(req) if texts is None else texts)
