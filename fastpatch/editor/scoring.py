"""Scoring the current model on many ``(prompt, target)`` pairs: teacher-forced rows in padded
batches, read as argmax tokens or as target log-probabilities; free greedy generation checked
against a target; and perplexity on plain text.

Every function takes the editor's :class:`~.handle.ModelHandle` and already-encoded requests
(:class:`~.encoding.Encoded`), so the per-task differences stay in the encoders.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .encoding import Encoded
from .handle import ModelHandle

__all__ = ["answer_starts", "batched_rows", "chunks_by_length", "mean_logprobs", "padded_batch", "perplexity"]


def padded_batch(encs: Sequence[Encoded], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded model inputs of several encodings (their attention masks added)."""
    batch: dict[str, torch.Tensor] = {}
    for k in encs[0].inputs:
        seqs = [e.inputs[k][0] for e in encs]
        L = max(s.shape[0] for s in seqs)
        fill = pad if k in ("input_ids", "decoder_input_ids") else 0
        batch[k] = torch.stack([F.pad(s, (0, L - s.shape[0]), value=fill) for s in seqs])
        if k in ("input_ids", "decoder_input_ids"):
            m = torch.stack([F.pad(torch.ones_like(s), (0, L - s.shape[0])) for s in seqs])
            batch["attention_mask" if k == "input_ids" else "decoder_attention_mask"] = m
    return batch


@torch.no_grad()
def batched_rows(h: ModelHandle, encs: Sequence[Encoded], batch_size: int,
                 read: Callable[[torch.Tensor, Encoded], Any]) -> list[Any]:
    """``read(rows, enc)`` for every encoding, in order, where ``rows`` are the logits at its
    label positions from one teacher-forced forward per batch of ``batch_size``."""
    out: list[Any] = []
    pad = h.tokenizer.pad_token_id or 0
    for i in range(0, len(encs), batch_size):
        chunk = encs[i : i + batch_size]
        logits = h.forward(padded_batch(chunk, pad)).logits
        out.extend(read(h.encoder.rows(logits[bi], e), e) for bi, e in enumerate(chunk))
    return out


def mean_logprobs(h: ModelHandle, encs: Sequence[Encoded], batch_size: int) -> list[float]:
    """Per encoding: the mean log-probability of its target tokens, teacher-forced (ROME's
    per-token average, whose ``exp`` is the geometric-mean token probability)."""

    def read(rows: torch.Tensor, enc: Encoded) -> float:
        lp = torch.log_softmax(rows.float(), -1)
        return float(lp.gather(-1, enc.labels.to(lp.device)[:, None]).mean())

    return batched_rows(h, encs, batch_size, read)


def answer_starts(generated: str, target: str) -> bool:
    """Whether a free generation gives ``target`` as its answer: the generated text, leading
    whitespace dropped, starts with the target (whitespace-stripped), and the target ends there
    at a word boundary (``"Englishman"`` does not answer ``"English"``)."""
    got, want = generated.lstrip(), target.strip()
    if not want or not got.startswith(want):
        return False
    rest = got[len(want):]
    return not rest or not (rest[0].isalnum() or rest[0] == "_")


@torch.no_grad()
def perplexity(h: ModelHandle, texts: Sequence[str], batch_size: int = 16, max_length: int = 256) -> float | None:
    """Token-level perplexity of a causal LM on ``texts`` (every next-token prediction of every
    text, padding excluded); None when no text has two tokens."""
    tok = h.tokenizer
    old = getattr(tok, "padding_side", "right")
    tok.padding_side = "right"
    nll, count = 0.0, 0
    try:
        for i in range(0, len(texts), batch_size):
            enc = tok(list(texts[i : i + batch_size]), return_tensors="pt", padding=True, truncation=True,
                      max_length=max_length)
            inputs = h.to_dev(enc)
            mask = inputs["attention_mask"]
            logits = h.forward(inputs).logits[:, :-1].float()
            labels = inputs["input_ids"][:, 1:]
            keep = mask[:, 1:].bool()
            lp = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
            nll -= float(lp[keep].sum())
            count += int(keep.sum())
    finally:
        tok.padding_side = old
    return float(torch.tensor(nll / count).exp()) if count else None


def chunks_by_length(n: int, key: Callable[[int], int], size: int) -> Iterator[list[int]]:
    """Indices ``0..n-1`` sorted by ``key`` and cut into chunks of ``size`` (less padding)."""
    order = sorted(range(n), key=key)
    for i in range(0, n, size):
        yield order[i : i + size]
