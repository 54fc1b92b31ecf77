"""Capture: the FFN inputs ``x`` and the tail inputs ``s0`` a request's forward passes produce.

One capture per edit: every view of every request (as given, and behind each context prefix) is
run once; training then never re-runs the frozen layers on the fast path. Decoder-only models on
the fast path capture every view in one right-padded forward that stops at the tail, with the
context prefixes' keys and values served from :mod:`.prefix_cache` (checked once against a plain
forward; dropped for good if they disagree).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .deep_tail import predict_features, seq_state
from .encoding import Encoded
from .handle import ModelHandle
from .prefix_cache import PrefixState, batched_inputs, build_cache, cache_kwarg, cache_tensors, common_length

__all__ = ["Capturer", "StopForward", "capturing", "run_until_stop"]

log = logging.getLogger("fastpatch.editor")


class StopForward(Exception):
    """Raised by a capture hook to end a forward once what it needs is captured."""


@contextlib.contextmanager
def capturing(h: ModelHandle, want_s0: bool = True, stop: bool = False, stop_at_tail: bool = False
              ) -> Iterator[dict[str, torch.Tensor]]:
    """Capture the FFN input ``x`` and (fast path) the tail input ``s0`` during a forward.

    With ``stop``, the forward ends as soon as ``x`` is captured (raises :class:`StopForward`):
    what comes after the patched FFN, the LM head over every position included, is skipped.
    With ``stop_at_tail`` it ends once ``s0`` is captured: the caller runs the tail itself, at
    the positions it needs only.
    """
    got: dict[str, torch.Tensor] = {}
    hooks = []
    tap = h.ffn.layout.tap if h.ffn.layout.kind == "split" else h.ffn

    def grab(module: nn.Module, args: tuple[Any, ...]) -> None:
        got["x"] = args[0]
        if stop:
            raise StopForward

    def grab_s0(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        got["s0"] = args[0] if args else kwargs["hidden_states"]
        # the deep tail re-runs the later layers with what the model passed them (mask, rotary)
        got["tail_kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        if stop_at_tail:
            raise StopForward

    hooks.append(tap.register_forward_pre_hook(grab))
    if want_s0 and h.tail_module is not None:
        hooks.append(h.tail_module.register_forward_pre_hook(grab_s0, with_kwargs=True))
    try:
        yield got
    finally:
        for hook in hooks:
            hook.remove()


def run_until_stop(fn: Callable[[], Any]) -> None:
    """Run a forward that a capture hook may end early."""
    try:
        fn()
    except StopForward:
        pass


def candidates_per_row(h: ModelHandle, loss_vocab: int, n_rows: int) -> int:
    """Candidate tokens kept per label row: ``loss_vocab`` shared out, at least 16 (0: none)."""
    if not (loss_vocab and h.fast and h.adapter.head is not None):
        return 0
    return max(16, loss_vocab // max(1, n_rows))


class Capturer:
    """Captures views for the editor and owns the context prefixes' cached keys and values.

    Args:
        h: the shared handle.
        prefixes: returns the current context prefixes (generated once by the editor).
    """

    def __init__(self, h: ModelHandle, prefixes: Callable[[], list[str]]) -> None:
        self.h = h
        self.prefixes = prefixes
        # the context prefixes' token ids, keys/values; whether the cache agrees with a plain forward
        self.prefix_ids: tuple[tuple[str, ...], list[tuple[int, ...]]] | None = None
        self.states: dict[tuple[Any, ...], PrefixState] = {}
        self.cache_ok: bool | None = None

    @torch.no_grad()
    def capture_one(self, enc: Encoded) -> dict[str, torch.Tensor]:
        """One view in a full forward: ``x`` (every position), ``pred`` and, fast path, ``s0``."""
        h = self.h
        with capturing(h, want_s0=h.fast) as got:
            out = h.forward(enc.inputs)
        lg = h.encoder.rows(out.logits[0], enc)
        res = {"x": got["x"][0].detach(), "pred": lg.argmax(-1).cpu()}
        if "s0" in got:
            res["s0"] = got["s0"][0][enc.label_pos.to(h.device)].detach()
        return res

    @torch.no_grad()
    def capture_all(self, views: list[Encoded], loss_vocab: int = 0) -> list[dict[str, torch.Tensor]]:
        """Per view: FFN inputs ``x`` (every position), the teacher-forced ``pred`` at the label
        positions, on the fast path the tail input ``s0`` there, and with ``loss_vocab`` each
        row's ``top`` candidate tokens.

        Decoder-only models on the fast path capture every view in one right-padded forward that
        stops at the tail; the tail then runs at the label positions only (not the LM head over
        every position). Other families capture one view per forward.
        """
        h = self.h
        k = candidates_per_row(h, loss_vocab, sum(len(v.labels) for v in views))
        if not (h.fast and h.encoder.augments):
            caps = [self.capture_one(v) for v in views]
            if k and h.encoder.has_vocab:
                for c in caps:
                    logits = h.adapter.tail(c["s0"])
                    c["top"] = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
            return caps
        if h.adapter.deep:
            return self.capture_deep(views, k)
        xs, s0s = self.capture_causal(views)
        out = []
        all_logits = h.adapter.tail(torch.cat(s0s))  # one head call for every view's rows
        start = 0
        for bi, v in enumerate(views):
            logits = all_logits[start : start + len(v.labels)]
            start += len(v.labels)
            c = {"x": xs[bi], "pred": logits.argmax(-1).cpu(), "s0": s0s[bi]}
            if k:
                c["top"] = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
            out.append(c)
        return out

    def capture_causal(self, views: list[Encoded]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per view: the FFN inputs at every position and ``s0`` at its label positions, from one
        right-padded forward that stops at the tail (decoder-only models, fast path).

        Tokens a view shares with a context prefix come from that prefix's cached keys and
        values; the first such capture is checked against a plain forward.
        """
        seqs = [v.inputs["input_ids"][0] for v in views]
        offsets, states = self.prefix_offsets(views)
        if not any(offsets):
            return self.capture_plain(views, seqs)
        cached = self.capture_cached(views, seqs, offsets, states)
        if self.cache_ok is None:
            plain = self.capture_plain(views, seqs)
            tol = 1e-4 if self.h.ffn.layout.w_up.dtype in (torch.float32, torch.float64) else 2e-2
            err = max(float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
                      for got, want in zip(cached, plain) for a, b in zip(got, want))
            self.cache_ok = err <= tol
            if not self.cache_ok:
                log.warning("prefix cache disagrees with a plain forward (relative error %.2e): disabled", err)
                return plain
        return cached

    def capture_deep(self, views: list[Encoded], k: int) -> list[dict[str, torch.Tensor]]:
        """:meth:`capture_all` for the deep tail (:mod:`.deep_tail`): one right-padded forward that
        stops at the first tail layer, keeping ``s0`` at every position (``s0_all``) and what the
        model passed that layer (``tail_kwargs``, shared by every view); the later layers then run
        once for the predictions, recording their keys and values where the cropped tail applies
        (``tail_kv``, with each view's place in the batch as ``tail_index``). No prefix cache: the
        tail re-runs the prefixes' positions too."""
        h = self.h
        seqs = [v.inputs["input_ids"][0] for v in views]
        got = self._plain_forward(seqs)
        caps = []
        for bi, (v, t) in enumerate(zip(views, seqs)):
            s0_all = got["s0"][bi][: t.shape[0]].detach()
            caps.append({"x": got["x"][bi][: t.shape[0]].detach(), "s0_all": s0_all,
                         "s0": s0_all[v.label_pos.to(h.device)], "tail_kwargs": got["tail_kwargs"]})
        st = seq_state(caps, [[i] for i in range(len(views))], views)
        logits = h.adapter.head(predict_features(h.adapter.seq_layers, h.adapter.features, st), None)
        if st._kv is not None:  # recorded by that pass: the edit's batch (the same views) reads them
            for bi, c in enumerate(caps):
                c["tail_kv"], c["tail_index"] = st._kv, bi
        start = 0
        for c, v in zip(caps, views):
            lg = logits[start : start + len(v.labels)]
            start += len(v.labels)
            c["pred"] = lg.argmax(-1).cpu()
            if k:
                c["top"] = lg.topk(min(k, lg.shape[-1]), dim=-1).indices
        return caps

    def _plain_forward(self, seqs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """One right-padded forward of ``seqs`` that stops at the tail: what :func:`capturing` got."""
        h = self.h
        pad = h.tokenizer.pad_token_id or 0
        L = max(t.shape[0] for t in seqs)
        ids = torch.stack([F.pad(t, (0, L - t.shape[0]), value=pad) for t in seqs])
        mask = torch.stack([F.pad(torch.ones_like(t), (0, L - t.shape[0])) for t in seqs])
        with capturing(h, want_s0=True, stop_at_tail=True) as got:
            run_until_stop(lambda: h.forward({"input_ids": ids, "attention_mask": mask}))
        return got

    def capture_plain(self, views: list[Encoded], seqs: list[torch.Tensor]
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """:meth:`capture_causal` without the prefix cache: one right-padded forward."""
        h = self.h
        got = self._plain_forward(seqs)
        xs = [got["x"][bi][: t.shape[0]].detach() for bi, t in enumerate(seqs)]
        s0s = [got["s0"][bi][v.label_pos.to(h.device)].detach() for bi, v in enumerate(views)]
        return xs, s0s

    def capture_cached(self, views: list[Encoded], seqs: list[torch.Tensor], offsets: list[int],
                       states: list[PrefixState | None]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """:meth:`capture_causal` running only the tokens after each view's cached prefix."""
        h = self.h
        inputs, kv = batched_inputs(seqs, states, offsets, h.tokenizer.pad_token_id or 0)
        cache = {cache_kwarg(h.model): build_cache(kv, h.model.config)}
        with capturing(h, want_s0=True, stop_at_tail=True) as got:
            run_until_stop(lambda: h.model(**inputs, **cache, use_cache=True))
        xs, s0s = [], []
        for bi, (v, t, c) in enumerate(zip(views, seqs, offsets)):
            new = got["x"][bi][: t.shape[0] - c].detach()
            st = states[bi]
            xs.append(torch.cat([st.x[:c], new]) if st is not None and c else new)
            s0s.append(got["s0"][bi][(v.label_pos - c).to(h.device)].detach())
        return xs, s0s

    def prefix_offsets(self, views: list[Encoded]) -> tuple[list[int], list[PrefixState | None]]:
        """Per view: how many leading tokens the prefix cache serves (0: none), and from which prefix."""
        prefixes = tuple(self.prefixes())
        if self.cache_ok is False or not prefixes:
            return [0] * len(views), [None] * len(views)
        if self.prefix_ids is None or self.prefix_ids[0] != prefixes:
            self.prefix_ids = (prefixes, [tuple(self.h.tokenizer(p)["input_ids"]) for p in prefixes])
        tokenized = self.prefix_ids[1]
        offsets: list[int] = []
        states: list[PrefixState | None] = []
        for v in views:
            ids = v.inputs["input_ids"][0].tolist()
            best, which = max((common_length(p, ids), i) for i, p in enumerate(tokenized))
            # the label positions run fresh: their s0 is read there
            best = min(best, int(v.label_pos.min()))
            offsets.append(best)
            states.append(self.prefix_state(tokenized[which]) if best > 0 else None)
        return offsets, states

    @torch.no_grad()
    def prefix_state(self, ids: tuple[int, ...]) -> PrefixState:
        """The cached keys/values and FFN inputs of one context prefix (computed on first use)."""
        h = self.h
        key = (ids, str(h.device), h.ffn.layout.w_up.dtype)
        state = self.states.get(key)
        if state is None:
            cache = build_cache([], h.model.config)
            with capturing(h, want_s0=True, stop_at_tail=True) as got:
                run_until_stop(lambda: h.model(input_ids=torch.tensor([ids], device=h.device),
                                               **{cache_kwarg(h.model): cache}, use_cache=True))
            state = PrefixState(ids, [(k.detach(), v.detach()) for k, v in cache_tensors(cache)], got["x"][0].detach())
            self.states[key] = state
        return state
