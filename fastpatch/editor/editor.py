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

Nothing is changed until an edit has succeeded: patches and memory rows are committed together
at the end, so a failure or an exception leaves the model exactly as it was.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import atomic_directory, write_json_atomic
from ..ffn import resolve_module
from ..kernels.patch_loss import patch_memory_loss, patch_preactivations
from ..kernels.reference import activation_reference
from ..patched_ffn import PatchedFFN
from .adapters import FamilyAdapter, find_adapter
from .memory import CORPUS, MemorySet
from .prefix_cache import PrefixState, batched_inputs, build_cache, cache_kwarg, cache_tensors, common_length
from .types import CONTEXT_SEEDS, EditError, EditorConfig, EditRequest, EditResult

__all__ = ["Editor"]

log = logging.getLogger("fastpatch.editor")

_STATE_VERSION = 1

#: Weight of the context variants' own scatter next to the memory covariance when the key is
#: whitened: 1 already evens the patch's pre-activation across the variants (measured on SmolLM2:
#: spread 1.0-1.04 instead of 1-55); more changes nothing there.
_VIEW_SCATTER = 1.0


class _StopForward(Exception):
    """Raised by a capture hook to end a forward once the FFN input is known."""


@dataclass
class _Encoded:
    """One request as model inputs plus the positions the loss reads."""

    inputs: dict[str, torch.Tensor]  # batch of 1, no padding
    label_pos: torch.Tensor  # positions in the FFN's sequence (decoder for seq2seq)
    labels: torch.Tensor  # target token ids or class label, one per label position
    ffn_len: int  # length of the FFN's sequence


@dataclass
class _Batch:
    """What one ``edit_batch`` trains on.

    ``views`` holds every request as given followed by its context-prefixed variants;
    ``groups[r]`` lists the views of request ``r`` (its own first); ``cap[v]`` is what the
    capture forward recorded for view ``v``. Neuron ``n = (r, j)`` belongs to request ``r`` and
    reads target position ``j`` (an index into ``label_pos``) of every view of ``r``.
    """

    views: list[_Encoded]
    cap: list[dict[str, torch.Tensor]]
    groups: list[list[int]]
    neurons: list[tuple[int, int]]
    _rows: dict[str, torch.Tensor] | None = None
    #: candidate-vocabulary loss: the sorted token ids the edit loss's softmax runs over (None: all)
    cand: torch.Tensor | None = None
    #: set by each loss evaluation: every neuron fires on every view (not only its request's own)
    variants_fire: bool = True

    def set_candidates(self, tokens: torch.Tensor) -> None:
        """Use ``tokens`` (plus every label) as the candidate vocabulary."""
        rows = self.tail_rows()
        self.cand = torch.unique(torch.cat([tokens.reshape(-1).to(rows["labels"].device), rows["labels"]]))
        rows["cand_labels"] = torch.searchsorted(self.cand, rows["labels"])

    def tail_rows(self) -> dict[str, torch.Tensor]:
        """The label rows of every view stacked (built once per edit): FFN inputs ``x``, tail
        inputs ``s0``, ``labels``, owning ``view`` and loss ``weight`` (a view's rows share
        1/(rows * views of its request), so L_edit averages positions, then views)."""
        if self._rows is None:
            xs, s0s, labels, view, weight = [], [], [], [], []
            for group in self.groups:
                for v in group:
                    enc, c = self.views[v], self.cap[v]
                    k = len(enc.labels)
                    xs.append(c["x"][enc.label_pos.to(c["x"].device)].float())
                    s0s.append(c["s0"])
                    labels.append(enc.labels)
                    view += [v] * k
                    weight += [1.0 / (k * len(group))] * k
            dev = s0s[0].device
            self._rows = {"x": torch.cat(xs), "s0": torch.cat(s0s), "labels": torch.cat(labels).to(dev),
                          "view": torch.tensor(view, device=dev), "weight": torch.tensor(weight, device=dev)}
        return self._rows

    def neuron_inputs(self, n: int) -> torch.Tensor:
        """(views of its request, d): the FFN inputs neuron ``n`` reads, its own request's first."""
        r, j = self.neurons[n]
        return torch.stack([self.cap[v]["x"][self.views[v].label_pos[j]] for v in self.groups[r]]).float()


class Editor:
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
        self._module_path_arg = module_path
        canon = resolve_module(model, self.adapter.ffn_path)[1]
        existing = [m for m in model.modules() if isinstance(m, PatchedFFN)
                    and (m.module_path == canon or m.module_path.startswith(canon + "."))]
        if existing:  # already wrapped (e.g. a second Editor on the same model)
            self.ffn = existing[0]
        else:
            self.ffn = PatchedFFN.wrap(model, self.adapter.ffn_path, activation=self.config.activation)
        w = self.ffn.layout.w_up
        self.memory = MemorySet(self.ffn.bank.d_in, w.dtype, w.device)
        self._tail_module = (
            resolve_module(model, self.adapter.tail_input)[0] if self.adapter.tail_input else None
        )
        self.edits: dict[str, dict[str, Any]] = {}  # edit_id -> {"code", "patch_ids", "time"}
        self._next_code = 0
        self._prefixes: list[str] | None = None  # generated once, on the first augmented edit
        # the context prefixes' keys/values (prefix_cache); None until checked on a first capture
        self._prefix_ids: tuple[tuple[str, ...], list[tuple[int, ...]]] | None = None
        self._prefix_states: dict[tuple[Any, ...], PrefixState] = {}
        self._prefix_cache_ok: bool | None = None
        if getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token", None) is not None:
            tokenizer.pad_token = tokenizer.eos_token

    # ------------------------------------------------------------------ basics
    @property
    def patched_ffn(self) -> PatchedFFN:
        return self.ffn

    @property
    def num_patches(self) -> int:
        return self.ffn.num_patches

    @property
    def device(self) -> torch.device:
        return self.ffn.layout.w_up.device

    @property
    def task(self) -> str:
        return self.adapter.task

    def bank_fingerprint(self) -> str:
        """Fingerprint of the patched FFN's base weights (identifies model + layer)."""
        return self.ffn.fingerprint()

    def _max_len(self) -> int:
        cfg = self.model.config
        for name in ("max_position_embeddings", "n_positions", "max_length"):
            v = getattr(cfg, name, None)
            if isinstance(v, int) and v > 0:
                return v
        v = getattr(self.tokenizer, "model_max_length", 0)
        return v if 0 < v < 1_000_000 else 1 << 30

    # ---------------------------------------------------------------- encoding
    def _target_text(self, prompt: str, target: str) -> str:
        if self.task == "causal" and not prompt.endswith((" ", "\n")) and not target.startswith((" ", "\n")):
            return " " + target
        return target

    def _encode(self, req: EditRequest) -> _Encoded:
        """Tokenize a request; raise ``EditError`` on bad input before anything is touched."""
        tok = self.tokenizer
        if not isinstance(req.prompt, str) or not req.prompt.strip():
            raise EditError("empty prompt")
        if self.task == "cls":
            n_labels = int(getattr(self.model.config, "num_labels", 2))
            if req.label is None or isinstance(req.label, bool) or not 0 <= int(req.label) < n_labels:
                raise EditError(f"label {req.label!r} out of range: this classifier has {n_labels} labels")
            enc = tok(req.prompt, return_tensors="pt")
            self._check_len(enc["input_ids"].shape[1])
            return _Encoded(self._to_dev(enc), torch.tensor([0]), torch.tensor([int(req.label)]), enc["input_ids"].shape[1])
        if req.target is None or not req.target.strip():
            raise EditError("empty target")
        if self.task == "causal":
            p_ids = tok(req.prompt)["input_ids"]
            t_ids = tok(self._target_text(req.prompt, req.target), add_special_tokens=False)["input_ids"]
            if not t_ids:
                raise EditError(f"target {req.target!r} tokenizes to no tokens")
            ids = p_ids + t_ids[:-1]
            self._check_len(len(ids) + 1)
            pos = torch.arange(len(p_ids) - 1, len(p_ids) - 1 + len(t_ids))
            return _Encoded({"input_ids": torch.tensor([ids], device=self.device)}, pos, torch.tensor(t_ids), len(ids))
        if self.task == "seq2seq":
            enc = tok(req.prompt, return_tensors="pt")
            labels = tok(text_target=req.target)["input_ids"]
            content = [t for t in labels if t not in tok.all_special_ids]
            if not content:
                raise EditError(f"target {req.target!r} tokenizes to no tokens")
            start = self.model.config.decoder_start_token_id
            dec = [start] + labels[:-1]
            self._check_len(max(enc["input_ids"].shape[1], len(dec)))
            inputs = self._to_dev(enc)
            inputs["decoder_input_ids"] = torch.tensor([dec], device=self.device)
            return _Encoded(inputs, torch.arange(len(labels)), torch.tensor(labels), len(dec))
        if self.task == "mlm":
            mask = tok.mask_token
            if mask is None or mask not in req.prompt:
                raise EditError(f"masked-LM prompt must contain the mask token {mask!r}")
            t_ids = tok(req.target.strip(), add_special_tokens=False)["input_ids"]
            if not t_ids:
                raise EditError(f"target {req.target!r} tokenizes to no tokens")
            prompt = req.prompt
            if prompt.count(mask) == 1 and len(t_ids) > 1:
                prompt = prompt.replace(mask, " ".join([mask] * len(t_ids)))
            enc = tok(prompt, return_tensors="pt")
            pos = (enc["input_ids"][0] == tok.mask_token_id).nonzero().squeeze(1)
            if pos.numel() != len(t_ids):
                raise EditError(f"prompt has {pos.numel()} mask tokens but the target has {len(t_ids)} tokens")
            self._check_len(enc["input_ids"].shape[1])
            return _Encoded(self._to_dev(enc), pos, torch.tensor(t_ids), enc["input_ids"].shape[1])
        raise EditError(f"unsupported task {self.task!r}")

    def _check_len(self, n: int) -> None:
        if n > self._max_len():
            raise EditError(f"request of {n} tokens is longer than the model's context ({self._max_len()})")

    def _to_dev(self, enc: Any) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    # ----------------------------------------------------------------- capture
    @contextlib.contextmanager
    def _capturing(self, want_s0: bool = True, stop: bool = False, stop_at_tail: bool = False
                   ) -> Iterator[dict[str, torch.Tensor]]:
        """Capture the FFN input ``x`` and (fast path) the tail input ``s0`` during a forward.

        With ``stop``, the forward ends as soon as ``x`` is captured (raises ``_StopForward``):
        what comes after the patched FFN, the LM head over every position included, is skipped.
        With ``stop_at_tail`` it ends once ``s0`` is captured: the caller runs the tail itself,
        at the positions it needs only.
        """
        got: dict[str, torch.Tensor] = {}
        hooks = []
        tap = self.ffn.layout.tap if self.ffn.layout.kind == "split" else self.ffn

        def grab(module: nn.Module, args: tuple[Any, ...]) -> None:
            got["x"] = args[0]
            if stop:
                raise _StopForward

        hooks.append(tap.register_forward_pre_hook(grab))
        def grab_s0(module: nn.Module, args: tuple[Any, ...]) -> None:
            got["s0"] = args[0]
            if stop_at_tail:
                raise _StopForward

        if want_s0 and self._tail_module is not None:
            hooks.append(self._tail_module.register_forward_pre_hook(grab_s0))
        try:
            yield got
        finally:
            for h in hooks:
                h.remove()

    def _forward(self, inputs: dict[str, torch.Tensor]) -> Any:
        return self.model(**inputs, use_cache=False) if self.task in ("causal", "seq2seq") else self.model(**inputs)

    # ------------------------------------------------------------------ memory
    def _batches(self, texts: Sequence[str], batch_size: int) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """Tokenized batches and the mask of FFN positions that count (non-padding; [CLS] for cls)."""
        tok = self.tokenizer
        old_side = getattr(tok, "padding_side", "right")
        tok.padding_side = "right"
        try:
            for i in range(0, len(texts), batch_size):
                chunk = list(texts[i : i + batch_size])
                enc = tok(chunk, return_tensors="pt", padding=True, truncation=True, max_length=min(self._max_len(), 512))
                inputs = self._to_dev(enc)
                mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
                if self.task == "seq2seq":
                    start = self.model.config.decoder_start_token_id
                    dec = torch.cat([torch.full_like(inputs["input_ids"][:, :1], start), inputs["input_ids"][:, :-1]], 1)
                    inputs["decoder_input_ids"] = dec
                    inputs["decoder_attention_mask"] = mask.long()
                if self.task == "cls":
                    mask = torch.zeros_like(mask)
                    mask[:, 0] = True
                yield inputs, mask
        finally:
            tok.padding_side = old_side

    @torch.no_grad()
    def ffn_inputs(self, texts: Sequence[str], batch_size: int = 16) -> list[torch.Tensor]:
        """FFN-input vectors (positions that count) of each text: a list of (T_i, d)."""
        out = []
        for inputs, mask in self._batches(texts, batch_size):
            with self._capturing(want_s0=False, stop=True) as got:
                try:
                    self._forward(inputs)
                except _StopForward:
                    pass
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
            eid = r.edit_id or f"edit-{self._next_code + i}"
            if eid in self.edits or eid in ids:
                raise EditError(f"edit id {eid!r} already exists")
            ids.append(eid)
        batch = self._prepare(reqs)
        results: list[EditResult | None] = [None] * len(reqs)
        if not batch.neurons:
            dt = time.perf_counter() - t0
            return [EditResult(ids[i], True, 0, dt, [], {}, 0, already_correct=True) for i in range(len(reqs))]
        cfg = self.config
        groups, cap, neurons = batch.groups, batch.cap, batch.neurons
        params = self._init_params(batch)
        with torch.enable_grad():  # editing works inside a caller's no_grad()/inference code too
            steps, losses, ok = self._train(batch, params)
        K, b, V = self._final(params)
        dt = time.perf_counter() - t0
        # commit: patches and memory rows of each request together, all or nothing
        committed: list[str] = []
        try:
            for ri in range(len(reqs)):
                mine = [j for j, (r, _) in enumerate(neurons) if r == ri]
                if not mine:
                    results[ri] = EditResult(ids[ri], True, steps, dt, [], losses, 0, already_correct=True)
                    continue
                success = bool(ok[ri])
                if success or cfg.keep_failed:
                    sel = torch.tensor(mine)
                    dt_bank = self.ffn.bank.dtype
                    pids = self.ffn.add_patches(K[sel].to(dt_bank), b[sel].to(dt_bank), V[sel].to(dt_bank), edit_id=ids[ri],
                                                extra={"steps": steps})
                    code = self._next_code
                    self._next_code += 1
                    self.edits[ids[ri]] = {"code": code, "patch_ids": pids, "time": time.time()}
                    committed.append(ids[ri])
                    self.memory.add(cap[groups[ri][0]]["x"], owner=code)
                else:
                    pids = []
                results[ri] = EditResult(ids[ri], success, steps, dt, pids, losses, len(mine),
                                         kept_failed=(not success and cfg.keep_failed))
        except BaseException:
            for eid in committed:
                self._drop_edit(eid)
            raise
        return [r for r in results if r is not None]

    def _prepare(self, reqs: Sequence[EditRequest]) -> _Batch:
        """Encode (raises ``EditError`` on bad input), add context variants, capture, pick neurons."""
        encs = [self._encode(r) for r in reqs]
        if len(self.memory) == 0 and not getattr(self, "_warned_empty", False):
            log.warning("editing with an empty memory set: call build_memory() for locality")
            self._warned_empty = True
        # views: each request as given (its first view) plus its context-prefixed variants
        views: list[_Encoded] = []
        groups: list[list[int]] = []
        for r, e in zip(reqs, encs):
            groups.append([len(views)])
            views.append(e)
            for v in self._augmented(r):
                groups[-1].append(len(views))
                views.append(v)
        cap = self._capture_all(views)
        # neurons: one per wrong target position (generative, at most max_neurons), or [CLS]
        neurons: list[tuple[int, int]] = []  # (request index, position index into label_pos)
        # With context variants, a position the request gets right as given but some variant
        # gets wrong gets a neuron too (after the request's own wrong positions), so every view
        # can be made right; a request that is right as given is not edited.
        for ri, e in enumerate(encs):
            wrong_in = [(cap[v]["pred"] != e.labels.to(cap[v]["pred"].device)) for v in groups[ri]]
            own = wrong_in[0].nonzero().squeeze(1).tolist()
            if not own:
                continue
            extra = torch.stack(wrong_in).any(0).nonzero().squeeze(1).tolist()
            picked = own + [j for j in extra if j not in own]
            neurons.extend((ri, j) for j in picked[: self.config.max_neurons])
        batch = _Batch(views, cap, groups, neurons)
        if neurons and all("top" in c for c in cap):
            batch.set_candidates(torch.cat([c["top"].reshape(-1) for c in cap]))
        return batch

    # ------------------------------------------------------------ augmentation
    def context_prefixes(self) -> list[str]:
        """The generated context prefixes of ``config.augment`` (empty when it is 0).

        Generated once with the model's own greedy decoding from fixed seed words, so they are
        deterministic for a given model, and saved with the editor. Decoder-only models only.
        """
        n = self.config.augment if self.task == "causal" else 0
        if n == 0:
            return []
        if self._prefixes is None or len(self._prefixes) < n:
            # Generation starts after a newline: a bare first word at the very start of a text
            # is out of distribution for many LMs (SmolLM2 continues "The" with "-the-world-").
            seeds = list(CONTEXT_SEEDS[:n])
            with self.ffn.patches_disabled():
                gen = self.greedy(["\n" + w for w in seeds], max_new_tokens=self.config.augment_tokens)
            texts = []
            for seed, ids in zip(seeds, gen):
                cont = self.tokenizer.decode(ids, skip_special_tokens=True).split("\n")[0]
                text = " ".join((seed + cont).split()).rstrip(" .,;:")
                texts.append(text + ". ")
            self._prefixes = texts
        return self._prefixes[:n]

    def _augmented(self, req: EditRequest) -> list[_Encoded]:
        """The request behind each context prefix (variants longer than the context are left out)."""
        out = []
        for prefix in self.context_prefixes():
            try:
                out.append(self._encode(EditRequest(prefix + req.prompt, req.target, edit_id=req.edit_id)))
            except EditError:
                continue
        return out

    # ---------------------------------------------------------------- capture
    @torch.no_grad()
    def _capture_all(self, views: list[_Encoded]) -> list[dict[str, torch.Tensor]]:
        """Per view: FFN inputs ``x`` (every position), the teacher-forced ``pred`` at the label
        positions and, on the fast path, the tail input ``s0`` there.

        Decoder-only models on the fast path capture every view in one right-padded forward that
        stops at the tail; the tail then runs at the label positions only (not the LM head over
        every position). Other families capture one view per forward.
        """
        fast = self.config.fast_path and self.adapter.fast_path
        if not (fast and self.task == "causal"):
            caps = [self._capture(v) for v in views]
            k = self._top_per_row(sum(len(v.labels) for v in views))
            if k and self.task != "cls":
                for c in caps:
                    logits = self.adapter.tail(c["s0"])
                    c["top"] = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
            return caps
        xs, s0s = self._capture_causal(views)
        out = []
        k = self._top_per_row(sum(len(v.labels) for v in views))
        all_logits = self.adapter.tail(torch.cat(s0s))  # one head call for every view's rows
        start = 0
        for bi, v in enumerate(views):
            logits = all_logits[start : start + len(v.labels)]
            start += len(v.labels)
            c = {"x": xs[bi], "pred": logits.argmax(-1).cpu(), "s0": s0s[bi]}
            if k:
                c["top"] = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
            out.append(c)
        return out

    def _capture_causal(self, views: list[_Encoded]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per view: the FFN inputs at every position and ``s0`` at its label positions, from one
        right-padded forward that stops at the tail (decoder-only models, fast path).

        Tokens a view shares with a context prefix come from that prefix's cached keys and
        values (``prefix_cache``); the first such capture is checked against a plain forward.
        """
        seqs = [v.inputs["input_ids"][0] for v in views]
        offsets, states = self._prefix_offsets(views)
        if not any(offsets):
            return self._capture_plain(views, seqs)
        cached = self._capture_cached(views, seqs, offsets, states)
        if self._prefix_cache_ok is None:
            plain = self._capture_plain(views, seqs)
            tol = 1e-4 if self.ffn.layout.w_up.dtype in (torch.float32, torch.float64) else 2e-2
            err = max(float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
                      for got, want in zip(cached, plain) for a, b in zip(got, want))
            self._prefix_cache_ok = err <= tol
            if not self._prefix_cache_ok:
                log.warning("prefix cache disagrees with a plain forward (relative error %.2e): disabled", err)
                return plain
        return cached

    def _capture_plain(self, views: list[_Encoded], seqs: list[torch.Tensor]
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        pad = self.tokenizer.pad_token_id or 0
        L = max(t.shape[0] for t in seqs)
        ids = torch.stack([F.pad(t, (0, L - t.shape[0]), value=pad) for t in seqs])
        mask = torch.stack([F.pad(torch.ones_like(t), (0, L - t.shape[0])) for t in seqs])
        with self._capturing(want_s0=True, stop_at_tail=True) as got:
            try:
                self._forward({"input_ids": ids, "attention_mask": mask})
            except _StopForward:
                pass
        xs = [got["x"][bi][: t.shape[0]].detach() for bi, t in enumerate(seqs)]
        s0s = [got["s0"][bi][v.label_pos.to(self.device)].detach() for bi, v in enumerate(views)]
        return xs, s0s

    def _capture_cached(self, views: list[_Encoded], seqs: list[torch.Tensor], offsets: list[int],
                        states: list[PrefixState | None]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        inputs, kv = batched_inputs(seqs, states, offsets, self.tokenizer.pad_token_id or 0)
        with self._capturing(want_s0=True, stop_at_tail=True) as got:
            try:
                self.model(**inputs, **{cache_kwarg(self.model): build_cache(kv, self.model.config)}, use_cache=True)
            except _StopForward:
                pass
        xs, s0s = [], []
        for bi, (v, t, c) in enumerate(zip(views, seqs, offsets)):
            new = got["x"][bi][: t.shape[0] - c].detach()
            st = states[bi]
            xs.append(torch.cat([st.x[:c], new]) if st is not None and c else new)
            s0s.append(got["s0"][bi][(v.label_pos - c).to(self.device)].detach())
        return xs, s0s

    def _prefix_offsets(self, views: list[_Encoded]) -> tuple[list[int], list[PrefixState | None]]:
        """Per view: how many leading tokens the prefix cache serves (0: none), and from which prefix."""
        prefixes = tuple(self.context_prefixes())
        if self._prefix_cache_ok is False or not prefixes:
            return [0] * len(views), [None] * len(views)
        if self._prefix_ids is None or self._prefix_ids[0] != prefixes:
            self._prefix_ids = (prefixes, [tuple(self.tokenizer(p)["input_ids"]) for p in prefixes])
        tokenized = self._prefix_ids[1]
        offsets: list[int] = []
        states: list[PrefixState | None] = []
        for v in views:
            ids = v.inputs["input_ids"][0].tolist()
            best, which = max((common_length(p, ids), i) for i, p in enumerate(tokenized))
            # the label positions run fresh: their s0 is read there
            best = min(best, int(v.label_pos.min()))
            offsets.append(best)
            states.append(self._prefix_state(tokenized[which]) if best > 0 else None)
        return offsets, states

    @torch.no_grad()
    def _prefix_state(self, ids: tuple[int, ...]) -> PrefixState:
        """The cached keys/values and FFN inputs of one context prefix (computed on first use)."""
        key = (ids, str(self.device), self.ffn.layout.w_up.dtype)
        state = self._prefix_states.get(key)
        if state is None:
            cache = build_cache([], self.model.config)
            with self._capturing(want_s0=True, stop_at_tail=True) as got:
                try:
                    self.model(input_ids=torch.tensor([ids], device=self.device), **{cache_kwarg(self.model): cache},
                               use_cache=True)
                except _StopForward:
                    pass
            state = PrefixState(ids, [(k.detach(), v.detach()) for k, v in cache_tensors(cache)], got["x"][0].detach())
            self._prefix_states[key] = state
        return state

    def _top_per_row(self, n_rows: int) -> int:
        """Candidates kept per label row: ``loss_vocab`` shared out, at least 16 (0: no candidates)."""
        cfg = self.config
        if not (cfg.loss_vocab and cfg.fast_path and self.adapter.fast_path and self.adapter.head is not None):
            return 0
        return max(16, cfg.loss_vocab // max(1, n_rows))

    @torch.no_grad()
    def _capture(self, enc: _Encoded) -> dict[str, torch.Tensor]:
        with self._capturing(want_s0=self.config.fast_path and self.adapter.fast_path) as got:
            out = self._forward(enc.inputs)
        logits = out.logits[0]
        if self.task == "cls":
            lg = logits.reshape(1, -1)
        else:
            lg = logits[enc.label_pos.to(logits.device)]
        res = {"x": got["x"][0].detach(), "pred": lg.argmax(-1).cpu()}
        if "s0" in got:
            res["s0"] = got["s0"][0][enc.label_pos.to(self.device)].detach()
        return res

    def _init_params(self, batch: _Batch) -> dict[str, torch.Tensor]:
        cfg = self.config
        d_out = self.ffn.bank.d_out
        qs = [batch.neuron_inputs(n) for n in range(len(batch.neurons))]  # each (views, d)
        q = torch.stack([x.mean(0) for x in qs])  # (n, d)
        keys = q / q.pow(2).sum(1, keepdim=True).clamp_min(1e-12)
        bias = torch.zeros(len(qs), device=q.device)
        if cfg.init == "memory" and len(self.memory) > 0:
            keys, bias = self._memory_init(q, qs, keys, bias)
        g = torch.Generator(device="cpu").manual_seed(cfg.seed + len(self.edits))
        v_dir = (torch.randn(len(qs), d_out, generator=g) / math.sqrt(d_out)).to(q.device)
        fast = self.adapter.fast_path and cfg.fast_path
        if cfg.value_init in ("unembed", "gradient") and self.task != "cls":
            v_dir = self._unembed_init(batch, v_dir)
            if cfg.value_init == "gradient" and fast:  # (without the fast path: unembed)
                v_dir = self._gradient_init(batch, keys, bias, v_dir)
        amp = torch.full((len(qs), 1), cfg.amplifier, device=q.device)
        params = {"keys": keys, "bias": bias, "v_dir": v_dir, "amp": amp}
        if cfg.value_init in ("unembed", "gradient") and self.task != "cls" and fast:
            self._search_amplifier(batch, params)
        return {k: t.clone().requires_grad_(True) for k, t in params.items()}

    @torch.no_grad()
    def _search_amplifier(self, batch: _Batch, params, max_doublings: int = 10) -> None:
        """Double the amplifiers until every request is predicted right as given.

        Tail-only evaluations: one costs about a third of a training step, so a few doublings
        replace the many Adam steps it takes to grow a too-small value from the authors'
        amplifier of 10. Context variants are not searched for: pushed further along the
        unembedding direction, the final norm saturates and other tokens win; training (up to
        ``config.augment_patience`` steps) takes them from there.
        """
        for _ in range(max_doublings):
            _, _, _, main_ok, _ = self._losses(batch, params, False, with_memory=False)
            if batch.cand is not None and all(main_ok):
                main_ok = self._exact_flags(batch, params)[1]
            if all(main_ok):
                # Barely right on the edit is too weak where a paraphrase fires less strongly.
                params["amp"] = params["amp"] * self.config.value_margin
                return
            params["amp"] = params["amp"] * 2

    @torch.no_grad()
    def _memory_init(self, q, qs, keys, bias):
        """Key along the memory-whitened direction of the edit, bias between edit and memory.

        ``u = (C + lam I)^-1 (q - mu)`` (the linear discriminant of the edit vector against the
        memory's mean ``mu`` and covariance ``C``; ``q`` is the mean over the request's views):
        plain ``q - mu`` is dominated by the few high-variance directions (attention-sink
        positions) where memory vectors have huge projections. The key is scaled and the bias
        set so that the patch starts at pre-activation at least +1 on every view of its edit and
        at most -1 on every memory vector; where the memory does not separate from the edit
        along ``u``, the authors' init is kept.
        """
        mem = self.memory.vectors
        mu, cov = self.memory.moments()
        lam = 1e-2 * float(cov.diagonal().mean()) + 1e-8
        eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        chol = torch.linalg.cholesky(cov + lam * eye)  # one factorisation, shared by every neuron
        rhs = (q.double() - mu).t()  # (d, n)
        u = torch.cholesky_solve(rhs, chol).t()  # (n, d)
        if any(x.shape[0] > 1 for x in qs):
            # The views' own scatter S = U U^T (rank < views) joins the covariance, so the patch
            # fires about equally on every view: Woodbury on the shared factorisation,
            # (A + U U^T)^-1 r = A^-1 r - A^-1 U (I + U^T A^-1 U)^-1 U^T A^-1 r.
            for n, x in enumerate(qs):
                if x.shape[0] < 2:
                    continue
                dx = x.double() - x.double().mean(0)
                U = dx.t() * math.sqrt(_VIEW_SCATTER / x.shape[0])  # (d, views)
                AiU = torch.cholesky_solve(U, chol)
                small = torch.eye(U.shape[1], dtype=U.dtype, device=U.device) + U.t() @ AiU
                u[n] = u[n] - AiU @ torch.linalg.solve(small, U.t() @ u[n])
        u = (u / u.norm(dim=1, keepdim=True).clamp_min(1e-30)).float()
        a_q = torch.stack([(x @ u[n]).min() for n, x in enumerate(qs)])  # weakest view
        a_mem = patch_preactivations(mem, u.to(mem.dtype), torch.zeros(len(u), device=u.device, dtype=mem.dtype))
        m_max = a_mem.float().max(0).values
        gap = a_q - m_max
        good = gap > 1e-6 * a_q.abs().clamp_min(1.0)
        c = 2.0 / gap.clamp_min(1e-12)
        k_new = c[:, None] * u
        b_new = -c * (a_q + m_max) / 2
        keys = torch.where(good[:, None], k_new, keys)
        bias = torch.where(good, b_new, bias)
        return keys, bias

    @torch.no_grad()
    def _unembed_init(self, batch: _Batch, v_dir):
        head = self.model.get_output_embeddings()
        if head is None:
            return v_dir
        W = head.weight
        out = v_dir.clone()
        for n, (ri, j) in enumerate(batch.neurons):
            t = int(batch.views[batch.groups[ri][0]].labels[j])
            # the wrong prediction to push away from: the request's own, else its first wrong view's
            preds = [int(batch.cap[v]["pred"][j]) for v in batch.groups[ri]]
            p = next((x for x in preds if x != t), preds[0])
            u = (W[t] - W[p]).float()
            out[n] = u / u.norm().clamp_min(1e-12)
        return out

    def _gradient_init(self, batch: _Batch, keys, bias, v_dir):
        """Each value along the descent direction of L_edit at the tail input, summed over the
        rows its neuron fires on (weighted by its activation there): one tail forward and
        backward. Unlike the unembedding difference, it accounts for the final norm and for
        every view's own wrong prediction."""
        rows = batch.tail_rows()
        with torch.no_grad():
            a = activation_reference(rows["x"] @ keys.t() + bias, self.ffn.patch_act)  # (rows, n)
        with torch.enable_grad():
            s = rows["s0"].float().clone().requires_grad_(True)
            s_in = s.to(rows["s0"].dtype)
            if batch.cand is not None:  # the candidate-vocabulary loss: no pass over the whole head
                logits, labels = self.adapter.head(self.adapter.features(s_in), batch.cand), rows["cand_labels"]
            else:
                logits, labels = self.adapter.tail(s_in), rows["labels"]
            ce = F.cross_entropy(logits.float(), labels, reduction="none")
            (g,) = torch.autograd.grad((ce * rows["weight"]).sum(), s)
        d = -(a.t() @ g)
        norm = d.norm(dim=1, keepdim=True)
        return torch.where(norm > 0, d / norm.clamp_min(1e-30), v_dir)

    @staticmethod
    def _final(params) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return params["keys"], params["bias"], params["amp"] * params["v_dir"]

    def _losses(self, batch: _Batch, params, full_forward: bool, with_memory: bool = True
                ) -> tuple[torch.Tensor, dict[str, float], list[bool], list[bool], bool]:
        """One evaluation of L = L_edit + alc L_act + mlc (L_m1 + L_m2).

        L_edit is each request's loss averaged over its views; L_act takes the top-k over every
        (neuron, view) pre-activation, and L_m1 compares the memory with each neuron's weakest
        view. Returns the loss, its parts, per request "every view right" and "right as given",
        and whether every neuron fires on every view while staying below 0 on the memory.
        """
        cfg = self.config
        K, b, V = self._final(params)
        if full_forward:
            l_edit, ok_view = self._edit_loss_full(batch, K, b, V)
        else:
            l_edit, ok_view = self._edit_loss_tail(batch, K, b, V)
        correct = [all(ok_view[v] for v in g) for g in batch.groups]
        main_ok = [ok_view[g[0]] for g in batch.groups]
        a_views = [batch.neuron_inputs(n) @ K[n] + b[n] for n in range(len(batch.neurons))]
        a_all = torch.cat(a_views)
        a_edit = torch.stack([a.min() for a in a_views])  # each neuron's weakest view
        l_act = torch.exp(-a_all).topk(min(cfg.act_topk, a_all.numel())).values.mean()
        stats: dict[str, torch.Tensor] = {}
        if len(self.memory) and with_memory:
            mem = self.memory.vectors
            m1, m2 = patch_memory_loss(mem, K.to(mem.dtype), b.to(mem.dtype), a_edit, cfg.mem_topk, cfg.margin,
                                       stats=stats)
            l_m1, l_m2 = m1.mean(), m2.mean()
            mem_silent = bool((stats["mem_max"] < 0).all())
        else:
            l_m1 = l_m2 = torch.zeros((), device=K.device)
            mem_silent = True
        loss = l_edit + cfg.alc * l_act + cfg.mlc * (l_m1 + l_m2)
        # success needs every neuron to fire on its request as given (the first view); the
        # context variants are pursued (L_act, the stopping rule) but never required
        fires_own = bool(torch.stack([a[0] for a in a_views]).gt(0).all())
        batch.variants_fire = bool((a_all > 0).all())
        info = {k: float(v.detach()) for k, v in
                (("loss", loss), ("edit", l_edit), ("act", l_act), ("m1", l_m1), ("m2", l_m2))}
        return loss, info, correct, main_ok, fires_own and mem_silent

    def _edit_loss_full(self, batch: _Batch, K, b, V) -> tuple[torch.Tensor, list[bool]]:
        """L_edit through a full forward per view (families without a tail adapter)."""
        cfg = self.config
        l_edit = torch.zeros((), device=K.device)
        ok: list[bool] = []
        for group in batch.groups:
            for v in group:
                enc = batch.views[v]
                with self.ffn.training_patches(K, b, V):
                    out = self._forward(enc.inputs)
                logits = out.logits[0]
                logits = logits.reshape(1, -1) if self.task == "cls" else logits[enc.label_pos.to(logits.device)]
                logits = logits.float()
                labels = enc.labels.to(logits.device)
                smooth = 0.0 if self.task == "cls" else cfg.label_smoothing
                l_edit = l_edit + F.cross_entropy(logits, labels, label_smoothing=smooth) / len(group)
                ok.append(bool((logits.argmax(-1) == labels).all()))
        return l_edit, ok

    def _edit_loss_tail(self, batch: _Batch, K, b, V) -> tuple[torch.Tensor, list[bool]]:
        """L_edit on the fast path: one tail call over the label rows of every view.

        The tail's head reads its whole weight matrix whatever the number of rows, so the views
        and requests share one call (and one backward) per step. With candidates
        (``config.loss_vocab``) the softmax runs over those tokens only, and the "right" flags
        are provisional until :meth:`_exact_flags` confirms them over the whole vocabulary.
        """
        rows = batch.tail_rows()
        delta = activation_reference(rows["x"] @ K.t() + b, self.ffn.patch_act) @ V
        s0 = rows["s0"]
        s = (s0.float() + delta).to(s0.dtype)
        if batch.cand is not None:
            logits = self.adapter.head(self.adapter.features(s), batch.cand).float()
            labels = rows["cand_labels"]
        else:
            logits = self.adapter.tail(s).float()
            labels = rows["labels"]
        smooth = 0.0 if self.task == "cls" else self.config.label_smoothing
        ce = F.cross_entropy(logits, labels, label_smoothing=smooth, reduction="none")
        l_edit = (ce * rows["weight"]).sum()
        hit = (logits.argmax(-1) == labels).detach()
        view = rows["view"]
        wrong = torch.zeros(len(batch.views), dtype=torch.long, device=hit.device).index_add_(0, view, (~hit).long())
        return l_edit, (wrong == 0).tolist()

    @torch.no_grad()
    def _exact_flags(self, batch: _Batch, params) -> tuple[list[bool], list[bool]]:
        """Per request: every view right, and right as given, over the whole vocabulary.

        A token outside the candidates that beats the target joins the candidates, so the next
        steps push it down too.
        """
        K, b, V = self._final(params)
        rows = batch.tail_rows()
        delta = activation_reference(rows["x"] @ K.t() + b, self.ffn.patch_act) @ V
        s0 = rows["s0"]
        pred = self.adapter.tail((s0.float() + delta).to(s0.dtype)).argmax(-1)
        hit = pred == rows["labels"]
        if batch.cand is not None and not bool(hit.all()):
            batch.set_candidates(torch.cat([batch.cand, pred[~hit]]))
        wrong = torch.zeros(len(batch.views), dtype=torch.long, device=hit.device).index_add_(0, rows["view"], (~hit).long())
        ok_view = (wrong == 0).tolist()
        return [all(ok_view[v] for v in g) for g in batch.groups], [ok_view[g[0]] for g in batch.groups]

    def _train(self, batch: _Batch, params) -> tuple[int, dict[str, float], list[bool]]:
        cfg = self.config
        full = not (cfg.fast_path and self.adapter.fast_path)
        plist = list(params.values())
        opt = torch.optim.Adam(plist, lr=cfg.lr, weight_decay=cfg.weight_decay)
        info: dict[str, float] = {}
        main_ok = [False] * len(batch.groups)
        margins = False
        step = 0
        settled: int | None = None  # first step at which every request is right as given
        # Full-vocabulary flags of the current parameters, if taken since the last update: one
        # check reads the whole LM head (a quarter of a CPU edit), so none is taken twice.
        exact: tuple[list[bool], list[bool]] | None = None
        for step in range(cfg.max_steps + 1):
            loss, info, correct, main_ok, margins = self._losses(batch, params, full)
            # with candidates, the flags are provisional: confirmed over the whole vocabulary
            # before a decision is taken on them
            done = all(correct) and margins and batch.variants_fire
            if done and batch.cand is not None:
                exact = correct, main_ok = self._exact_flags(batch, params)
                done = all(correct)
            if done:
                break
            if all(main_ok) and margins:
                settled = step if settled is None else settled
                if step - settled >= cfg.augment_patience:
                    if batch.cand is not None:
                        exact = correct, main_ok = exact or self._exact_flags(batch, params)
                    if all(main_ok):
                        break  # the edit holds; stop chasing context variants
                    settled = None
            if step == cfg.max_steps:
                break
            grads = torch.autograd.grad(loss, plist)
            for p, g in zip(plist, grads):
                p.grad = g
            torch.nn.utils.clip_grad_norm_(plist, cfg.grad_clip)
            opt.step()
            exact = None
        for p in plist:
            p.requires_grad_(False)
        if batch.cand is not None:
            correct, main_ok = exact or self._exact_flags(batch, params)
        # a request succeeds when it is predicted right as given and the memory margins hold
        ok = [c and margins for c in main_ok]
        info = {k: round(v, 6) for k, v in info.items()}
        return step, info, ok

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
    def _pairs(self, prompts: Sequence[str], targets: Sequence[Any]) -> list[_Encoded]:
        if len(prompts) != len(targets):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
        if self.task == "cls":
            return [self._encode(EditRequest(p, label=int(t))) for p, t in zip(prompts, targets)]
        return [self._encode(EditRequest(p, target=t)) for p, t in zip(prompts, targets)]

    def predict_tokens(self, prompts: Sequence[str], targets: Sequence[Any], batch_size: int = 32) -> list[list[int]]:
        """Teacher-forced argmax token ids at each target position (class id for classifiers)."""
        return self._predict(self._pairs(prompts, targets), batch_size)

    @torch.no_grad()
    def _predict(self, encs: list[_Encoded], batch_size: int) -> list[list[int]]:
        out: list[list[int]] = []
        pad = self.tokenizer.pad_token_id or 0
        for i in range(0, len(encs), batch_size):
            chunk = encs[i : i + batch_size]
            keys = list(chunk[0].inputs)
            batch: dict[str, torch.Tensor] = {}
            for k in keys:
                seqs = [e.inputs[k][0] for e in chunk]
                L = max(s.shape[0] for s in seqs)
                fill = pad if k in ("input_ids", "decoder_input_ids") else 0
                batch[k] = torch.stack([F.pad(s, (0, L - s.shape[0]), value=fill) for s in seqs])
                if k in ("input_ids", "decoder_input_ids"):
                    m = torch.stack([F.pad(torch.ones_like(s), (0, L - s.shape[0])) for s in seqs])
                    batch["attention_mask" if k == "input_ids" else "decoder_attention_mask"] = m
            logits = self._forward(batch).logits
            for bi, e in enumerate(chunk):
                lg = logits[bi].reshape(1, -1) if self.task == "cls" else logits[bi][e.label_pos.to(logits.device)]
                out.append(lg.argmax(-1).tolist())
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
        if self.task in ("cls", "mlm"):
            raise EditError(f"greedy generation needs a generative model, this one is {self.task!r}")
        tok = self.tokenizer
        old = tok.padding_side
        tok.padding_side = "left" if self.task == "causal" else "right"
        out: list[list[int]] = []
        try:
            for i in range(0, len(prompts), batch_size):
                enc = tok(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True)
                inputs = self._to_dev(enc)
                gen = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                          pad_token_id=tok.pad_token_id)
                start = inputs["input_ids"].shape[1] if self.task == "causal" else 1
                out.extend(gen[:, start:].tolist())
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
        from safetensors.torch import save_file

        with atomic_directory(directory) as tmp:
            self.ffn.save(tmp / "patches.safetensors")
            fp = self.bank_fingerprint()
            save_file(self.memory.state(), str(tmp / "memory.safetensors"),
                      metadata={"fingerprint": fp, "module_path": self.ffn.module_path})
            state = {
                "version": _STATE_VERSION,
                "config": self.config.to_dict(),
                "module_path": self.ffn.module_path,
                "module_path_arg": self._module_path_arg,
                "family": self.adapter.family,
                "fingerprint": fp,
                "edits": self.edits,
                "next_code": self._next_code,
                "context_prefixes": self._prefixes,
            }
            write_json_atomic(tmp / "editor.json", state)

    @classmethod
    def load(cls, directory: str | os.PathLike, model: nn.Module, tokenizer: Any) -> "Editor":
        """Restore an editor saved by :meth:`save` onto a fresh copy of the same model."""
        from safetensors.torch import load_file

        directory = Path(directory)
        try:
            state = json.loads((directory / "editor.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise EditError(f"{directory} is not a saved fastpatch editor: {e}") from e
        if state.get("version") != _STATE_VERSION:
            raise EditError(f"{directory}: editor state version {state.get('version')!r} is not {_STATE_VERSION}")
        ed = cls(model, tokenizer, EditorConfig(**state["config"]), module_path=state.get("module_path_arg"))
        if ed.ffn.module_path != state["module_path"]:
            raise EditError(f"{directory} holds patches for {state['module_path']!r}; this model's FFN is {ed.ffn.module_path!r}")
        ed.ffn.load(directory / "patches.safetensors")  # checks model/layer fingerprints
        ed.memory.load_state(load_file(str(directory / "memory.safetensors")))
        ed.edits = state["edits"]
        ed._next_code = int(state["next_code"])
        prefixes = state.get("context_prefixes")
        ed._prefixes = list(prefixes) if prefixes is not None else None
        return ed
