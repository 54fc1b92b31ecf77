"""The T-Patcher editor for Hugging Face models.

    ed = Editor(model, tokenizer)                 # finds and wraps the last FFN
    ed.build_memory(corpus_texts)                 # FFN inputs the patches must stay silent on
    res = ed.edit(EditRequest("The capital of Peru is", " Lima"))
    ed.rollback(res.edit_id)

Each edit appends a few patch neurons (``PatchedFFN``) trained with
``L = L_edit + alc * L_act + mlc * (L_m1 + L_m2)`` (``../shared/docs/tpatcher.md``).

Fast path: a training step never re-runs the frozen layers. One forward per edit captures, at the
patched FFN, the FFN inputs ``X`` and the residual state ``s0`` that the model's tail (final norm,
head) reads; each step then computes ``tail(s0 + act(X K^T + b) V)`` at the target positions only,
and the memory losses with the fused kernel (``kernels/patch_loss.py``), which reads the memory
matrix once per step. Families without an adapter train through a full forward per step.

The pieces, each on the shared :class:`~.handle.ModelHandle`: per-task encoding
(:mod:`.encoding`, through the family adapter), the views and hard negatives an edit trains on
(:mod:`.views`), capture and the prefix cache (:mod:`.capture`), the neurons of an edit
(:mod:`.batch`), init strategies (:mod:`.init`), the objective (:mod:`.objective`), the training
loop (:mod:`.training`) and persistence (:mod:`.persistence`).
This class orchestrates them: encode -> capture -> init -> train -> commit, or nothing changes.

Nothing is changed until an edit has succeeded: patches and memory rows are committed together
at the end, so a failure or an exception leaves the model exactly as it was.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..ffn import resolve_module
from ..patched_ffn import PatchedFFN
from .adapters import FamilyAdapter, find_adapter
from .batch import EditBatch
from .capture import Capturer, capturing, run_until_stop
from .encoding import Encoded
from .handle import ModelHandle
from .memory import CORPUS, MemorySet
from .objective import Params, final
from .persistence import load_editor, save_editor
from .phrasings import PhrasingBank
from .scoring import answer_starts, batched_rows, chunks_by_length, mean_logprobs, perplexity
from .training import train_edit
from .types import EditError, EditorConfig, EditRequest, EditResult
from .views import EditViews

__all__ = ["Editor"]

log = logging.getLogger("fastpatch.editor")


class Editor(EditViews):
    """T-Patcher editing of a Hugging Face model.

    Args:
        model: a causal LM (Llama, Qwen2, Mistral, Gemma, GPT-2), a seq2seq LM (BART, T5),
            ``BertForMaskedLM`` or ``BertForSequenceClassification``.
        tokenizer: its tokenizer.
        config: the T-Patcher knobs (``EditorConfig``).
        module_path: the FFN to patch; default: the last FFN of a supported family.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        config: EditorConfig | None = None,
        module_path: str | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or EditorConfig()
        self.config.validate()
        self.adapter: FamilyAdapter = find_adapter(model, module_path)
        if self.config.key_position != "last" and (self.adapter.tail is not None or not self.adapter.encoder.augments):
            raise EditError(f"config.key_position={self.config.key_position!r} needs a decoder-only model patched before its last layer "
                            f"(module_path='model.layers.<i>.mlp'): the FFN at {self.adapter.ffn_path!r} is the last "
                            "one, where a patch at the subject never reaches the answer")
        self.module_path_arg = module_path
        canon = resolve_module(model, self.adapter.ffn_path)[1]
        existing = [m for m in model.modules() if isinstance(m, PatchedFFN)
                    and (m.module_path == canon or m.module_path.startswith(canon + "."))]
        if existing:  # already wrapped (e.g. a second Editor on the same model)
            self.ffn = existing[0]
        else:
            self.ffn = PatchedFFN.wrap(model, self.adapter.ffn_path, activation=self.config.activation)
        tail = resolve_module(model, self.adapter.tail_input)[0] if self.adapter.tail_input else None
        self.handle = ModelHandle(model, tokenizer, self.adapter, self.ffn,
                                  fast=self.config.fast_path and self.adapter.fast_path, tail_module=tail)
        w = self.ffn.layout.w_up
        self.memory = MemorySet(self.ffn.bank.d_in, w.dtype, w.device)
        self.edits: dict[str, dict[str, Any]] = {}  # edit_id -> {"code", "patch_ids", "time"}
        self.next_code = 0
        self.prefixes: list[str] | None = None  # generated once, on the first augmented edit
        self.subjects: list[str] = []  # subjects of the requests so far: the hard negatives' pool
        self.phrasings = PhrasingBank()  # relation phrasings seen so far: the phrasing views' source
        self.capturer = Capturer(self.handle, self.context_prefixes)
        self._warned_empty = False
        if self.config.value_init == "gradient" and not self.handle.fast and self.handle.encoder.has_vocab:
            log.info("value_init='gradient' needs the fast path (fast_path=True and a family adapter with a tail): "
                     "this editor uses 'unembed' without the amplifier search")
        if getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token", None) is not None:
            tokenizer.pad_token = tokenizer.eos_token

    # ------------------------------------------------------------------ basics
    @property
    def patched_ffn(self) -> PatchedFFN:
        """The patched FFN (the same object as ``ffn``)."""
        return self.ffn

    @property
    def num_patches(self) -> int:
        """Patches in the bank."""
        return self.ffn.num_patches

    @property
    def device(self) -> torch.device:
        """Where the patched FFN lives."""
        return self.handle.device

    @property
    def task(self) -> str:
        """``causal``, ``seq2seq``, ``mlm`` or ``cls``."""
        return self.adapter.task

    def bank_fingerprint(self) -> str:
        """Fingerprint of the patched FFN's base weights (identifies model + layer)."""
        return self.ffn.fingerprint()

    def _encode(self, req: EditRequest) -> Encoded:
        """Tokenize a request (the task's encoder); raise ``EditError`` on bad input."""
        return self.handle.encoder.encode(self.handle, req)

    # ------------------------------------------------------------------ memory
    def _batches(self, texts: Sequence[str], batch_size: int) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """Tokenized batches and the mask of FFN positions that count (non-padding; [CLS] for cls)."""
        tok = self.tokenizer
        old_side = getattr(tok, "padding_side", "right")
        tok.padding_side = "right"
        try:
            for i in range(0, len(texts), batch_size):
                chunk = list(texts[i : i + batch_size])
                h = self.handle
                enc = tok(chunk, return_tensors="pt", padding=True, truncation=True, max_length=min(h.max_len(), 512))
                inputs = h.to_dev(enc)
                mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
                yield inputs, h.encoder.memory_batch(h, inputs, mask)
        finally:
            tok.padding_side = old_side

    @torch.no_grad()
    def ffn_inputs(self, texts: Sequence[str], batch_size: int = 16) -> list[torch.Tensor]:
        """FFN-input vectors (positions that count) of each text: a list of (T_i, d)."""
        out = []
        for inputs, mask in self._batches(texts, batch_size):
            with capturing(self.handle, want_s0=False, stop=True) as got:
                run_until_stop(lambda: self.handle.forward(inputs))
            x = got["x"]
            for b in range(x.shape[0]):
                out.append(x[b][mask[b]])
        return out

    def build_memory(self, texts: Sequence[str], batch_size: int = 16) -> int:
        """Fill the memory set from a corpus (texts, or a ``datasets`` column); return its size.

        Keeps at most ``config.memory_cap`` corpus vectors (in corpus order).
        """
        texts = [t for t in texts if isinstance(t, str) and t.strip()]
        if not texts:
            raise EditError("the memory corpus is empty")
        cap = self.config.memory_cap - self.memory.num_corpus()
        for vecs in self.ffn_inputs(texts, batch_size):
            if cap <= 0:
                break
            vecs = vecs[:cap]
            self.memory.add(vecs, CORPUS)
            cap -= vecs.shape[0]
        log.info("memory set: %d vectors", len(self.memory))
        return len(self.memory)

    # ------------------------------------------------------------------- edit
    def edit(self, request: EditRequest) -> EditResult:
        """Apply one edit (see ``edit_batch``)."""
        return self.edit_batch([request])[0]

    def edit_batch(self, requests: Sequence[EditRequest]) -> list[EditResult]:
        """Edit several requests jointly, each with its own neurons.

        Returns one result per request. Succeeded requests keep their patches; failed ones are
        removed (unless ``config.keep_failed``). Bad input raises ``EditError`` before anything
        changes; any exception leaves the model and bank as they were.
        """
        if not requests:
            raise EditError("no edit requests given")
        t0 = time.perf_counter()
        reqs = list(requests)
        ids = []
        for i, r in enumerate(reqs):
            eid = r.edit_id or f"edit-{self.next_code + i}"
            if eid in self.edits or eid in ids:
                raise EditError(f"edit id {eid!r} already exists")
            ids.append(eid)
        batch = self._prepare(reqs)
        if not batch.neurons:
            dt = time.perf_counter() - t0
            return [EditResult(ids[i], True, 0, dt, [], {}, 0, already_correct=True) for i in range(len(reqs))]
        with torch.enable_grad():  # editing works inside a caller's no_grad()/inference code too
            params, steps, losses, ok, keep = train_edit(self.handle, self.config, self.memory, batch, len(self.edits))
        return self._commit(batch, ids, params, steps, losses, ok, keep, time.perf_counter() - t0)

    def _commit(self, batch: EditBatch, ids: list[str], params: Params, steps: int, losses: dict[str, float],
                ok: list[bool], keep: list[bool], dt: float) -> list[EditResult]:
        """Add each request's patches and memory rows together (those that succeeded, or all with
        ``keep_failed``; of a success, the neurons ``keep`` marks); on any exception, remove what
        was added: all or nothing."""
        cfg = self.config
        K, b, V = final(params)
        neurons = batch.neurons
        results: list[EditResult] = []
        committed: list[str] = []
        try:
            for ri in range(len(ids)):
                mine = [j for j, (r, _) in enumerate(neurons) if r == ri]
                if not mine:
                    results.append(EditResult(ids[ri], True, steps, dt, [], losses, 0, already_correct=True))
                    continue
                success = bool(ok[ri])
                pids: list[int] = []
                if success or cfg.keep_failed:
                    sel = torch.tensor([j for j in mine if keep[j]] if success else mine)
                    dt_bank = self.ffn.bank.dtype
                    pids = self.ffn.add_patches(K[sel].to(dt_bank), b[sel].to(dt_bank), V[sel].to(dt_bank),
                                                edit_id=ids[ri], extra={"steps": steps})
                    code = self.next_code
                    self.next_code += 1
                    self.edits[ids[ri]] = {"code": code, "patch_ids": pids, "time": time.time()}
                    committed.append(ids[ri])
                    self.memory.add(self._memory_rows(batch, ri), owner=code)
                results.append(EditResult(ids[ri], success, steps, dt, pids, losses, len(mine),
                                          kept_failed=(not success and cfg.keep_failed)))
        except BaseException:
            for eid in committed:
                self._drop_edit(eid)
            raise
        return results

    def _memory_rows(self, batch: EditBatch, ri: int) -> torch.Tensor:
        """The FFN inputs of request ``ri`` that join the memory set (``config.memory_growth``)."""
        view = batch.groups[ri][0]
        x = batch.cap[view]["x"]
        growth = self.config.memory_growth
        if growth == "labels":
            return x[batch.views[view].label_pos.to(x.device)]
        return x if growth == "all" else x[:0]

    # --------------------------------------------------------------- rollback
    def rollback(self, edit_id: str) -> None:
        """Remove one edit's patches and memory rows; every other edit keeps working."""
        if edit_id not in self.edits:
            raise KeyError(f"unknown edit id {edit_id!r}")
        self._drop_edit(edit_id)

    def _drop_edit(self, edit_id: str) -> None:
        rec = self.edits.pop(edit_id)
        self.ffn.remove(rec["patch_ids"])
        self.memory.remove_owner(rec["code"])

    # -------------------------------------------------------------- evaluation
    def _pairs(self, prompts: Sequence[str], targets: Sequence[Any]) -> list[Encoded]:
        if len(prompts) != len(targets):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
        encoder = self.handle.encoder
        return [self._encode(encoder.request(p, t)) for p, t in zip(prompts, targets)]

    def predict_tokens(self, prompts: Sequence[str], targets: Sequence[Any], batch_size: int = 32) -> list[list[int]]:
        """Teacher-forced argmax token ids at each target position (class id for classifiers)."""
        return self._predict(self._pairs(prompts, targets), batch_size)

    def _predict(self, encs: list[Encoded], batch_size: int) -> list[list[int]]:
        return batched_rows(self.handle, encs, batch_size, lambda rows, e: rows.argmax(-1).tolist())

    def target_logprobs(self, prompts: Sequence[str], targets: Sequence[Any], batch_size: int = 32) -> list[float]:
        """Mean log-probability of each target's tokens after its prompt, teacher-forced (what
        the CounterFact scores compare: ``target_new`` against ``target_true``)."""
        return mean_logprobs(self.handle, self._pairs(prompts, targets), batch_size)

    def perplexity(self, texts: Sequence[str], batch_size: int = 16) -> float | None:
        """Token-level perplexity of a generative model on ``texts`` (None for classifiers)."""
        if not self.handle.encoder.generative or self.task != "causal":
            return None
        return perplexity(self.handle, [t for t in texts if isinstance(t, str) and t.strip()], batch_size)

    def generates(self, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32) -> list[bool]:
        """Free greedy generation: whether each prompt's continuation starts with its target
        (:func:`~.scoring.answer_starts`). Generates as many tokens as the target has, plus two."""
        if len(prompts) != len(targets):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
        lengths = [len(ids) for ids in self.target_ids(prompts, targets)]
        out = [False] * len(prompts)
        for idx in chunks_by_length(len(prompts), lambda k: lengths[k], batch_size):
            gen = self.greedy([prompts[k] for k in idx], max_new_tokens=max(lengths[k] for k in idx) + 2,
                              batch_size=batch_size)
            for k, ids in zip(idx, gen):
                out[k] = answer_starts(self.tokenizer.decode(ids, skip_special_tokens=True), targets[k])
        return out

    def target_ids(self, prompts: Sequence[str], targets: Sequence[Any]) -> list[list[int]]:
        """The token ids each target is scored on (its label for classifiers); no forward pass."""
        return [e.labels.tolist() for e in self._pairs(prompts, targets)]

    def check(self, prompts: Sequence[str], targets: Sequence[Any], batch_size: int = 32) -> list[bool]:
        """True where every target token (or the label) is the model's teacher-forced argmax."""
        encs = self._pairs(prompts, targets)
        preds = self._predict(encs, batch_size)
        return [p == e.labels.tolist() for p, e in zip(preds, encs)]

    @torch.no_grad()
    def greedy(self, prompts: Sequence[str], max_new_tokens: int = 8, batch_size: int = 32) -> list[list[int]]:
        """Greedy continuation token ids of each prompt (batched, left-padded)."""
        encoder = self.handle.encoder
        if not encoder.generative:
            raise EditError(f"greedy generation needs a generative model, this one is {self.task!r}")
        tok = self.tokenizer
        old = tok.padding_side
        tok.padding_side = encoder.generation_padding
        out: list[list[int]] = []
        try:
            for i in range(0, len(prompts), batch_size):
                enc = tok(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True)
                inputs = self.handle.to_dev(enc)
                gen = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                          pad_token_id=tok.pad_token_id)
                out.extend(encoder.generated(gen, inputs).tolist())
        finally:
            tok.padding_side = old
        return out

    @torch.no_grad()
    def activations(self, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """(len(texts), num_patches): each patch's largest activation over each text's positions."""
        rows = []
        for x in self.ffn_inputs(texts, batch_size):
            a = self.ffn.patch_activations(x)
            rows.append(a.max(0).values if a.shape[0] else a.new_zeros(self.num_patches))
        return torch.stack(rows).float().cpu() if rows else torch.zeros(0, self.num_patches)

    # ------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike) -> None:
        """Save patches, memory set and config to ``directory`` (replaced atomically)."""
        save_editor(self, directory)

    @classmethod
    def load(cls, directory: str | os.PathLike, model: nn.Module, tokenizer: Any) -> "Editor":
        """Restore an editor saved by :meth:`save` onto a fresh copy of the same model."""
        return load_editor(cls, directory, model, tokenizer)

