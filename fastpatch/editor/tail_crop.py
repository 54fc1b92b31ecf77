"""The deep tail cropped to where the patches act: the same features as
:func:`.deep_tail.seq_features`, re-running the later layers only from each view's first position
on which a patch fires.

With a ReLU patch, a position where no neuron's pre-activation is positive gets exactly nothing
(value and gradient), and under causal attention the positions before a view's first firing one
are those of the unedited model at every later layer. So each step re-runs the tail layers over
``[c_v, L_v)`` only, with ``c_v`` the first position of view ``v`` where a patch fires (or its
first label position, if earlier), and the attention reads the keys and values of ``[0, c_v)``
from one unpatched pass recorded per edit. A subject key fires from the subject on, so the
context prefixes and the words before the subject are not re-run. The result is exact: the tests
compare it with the full re-run in float64, losses and gradients.

It works through the layers' own attention: a cache object whose ``update`` prepends the recorded
keys and values, a boolean mask and the rotary tables gathered at the re-run positions. Layers
that do not take these (no ``cache``/``past_key_values`` keyword, an attention other than
scaled-dot-product, a non-boolean or non-causal captured mask) keep the full re-run
(:func:`can_crop`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["can_crop", "crop_plan", "cropped_features", "record_kv"]

#: Crop only when it re-runs at most this fraction of the batch's positions (else the full re-run).
MAX_FRACTION = 0.8


class _PrefixKV:
    """A stand-in for a transformers ``Cache`` in the tail layers' attention: records each layer's
    keys and values (``record``), or prepends the recorded ones (the first ``C`` positions)."""

    def __init__(self, kv: dict[int, tuple[torch.Tensor, torch.Tensor]], record: bool, width: int = 0) -> None:
        self.kv, self.record, self.width = kv, record, width

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.record:
            self.kv[layer_idx] = (key.detach(), value.detach())
            return key, value
        pk, pv = self.kv[layer_idx]
        return torch.cat([pk[:, :, : self.width].to(key.dtype), key], 2), torch.cat(
            [pv[:, :, : self.width].to(value.dtype), value], 2)


def _cache_kwarg(kwargs: dict[str, Any]) -> str | None:
    for name in ("cache", "past_key_values"):
        if name in kwargs:
            return name
    return None


def can_crop(layers: Sequence[nn.Module], kwargs: dict[str, Any], valid: torch.Tensor) -> bool:
    """Whether the cropped re-run applies: every layer's attention takes a cache and knows its
    index, the captured mask is the plain causal one over the real positions (boolean), and the
    rotary tables are given per position."""
    name = _cache_kwarg(kwargs)
    mask, pe = kwargs.get("attention_mask"), kwargs.get("position_embeddings")
    if name is None:
        return False
    if not (isinstance(pe, tuple) and len(pe) == 2 and all(isinstance(t, torch.Tensor) for t in pe)):
        return False
    if not all(isinstance(getattr(getattr(m, "self_attn", None), "layer_idx", None), int) for m in layers):
        return False
    # the crop builds a boolean mask, which is what scaled-dot-product attention takes (eager adds
    # its mask, flash attention takes none)
    impls = {getattr(getattr(m.self_attn, "config", None), "_attn_implementation", None) for m in layers}
    if impls != {"sdpa"}:
        return False
    if mask is None:  # no padding: the attention is causal by itself
        return bool(valid.all())
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 4:
        return False
    B, L = valid.shape
    causal = torch.ones(L, L, dtype=torch.bool, device=valid.device).tril()
    want = causal[None] & valid[:, None, :]
    got = mask[:, 0]
    # rows of padding queries are never read; compare the real ones
    return got.shape == want.shape and bool((got == want)[valid].all())


@torch.no_grad()
def record_kv(layers: Sequence[nn.Module], s0: torch.Tensor, kwargs: dict[str, Any]
              ) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Every tail layer's keys and values (after the rotary embedding) over the unpatched batch,
    and the last layer's output (the pass is the plain one: recording changes nothing)."""
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    rec = _PrefixKV(kv, record=True)
    s = s0
    for layer in layers:
        out = layer(s, **{**kwargs, _cache_kwarg(kwargs): rec})  # type: ignore[dict-item]
        s = out[0] if isinstance(out, tuple) else out
    return kv, s


def crop_plan(active: torch.Tensor, valid: torch.Tensor, first_label: torch.Tensor) -> torch.Tensor | None:
    """(B,) where each view's re-run starts: its first firing position or first label position,
    whichever comes first; None when that would re-run more than :data:`MAX_FRACTION` of the
    real positions (the full re-run is then as cheap)."""
    B, L = valid.shape
    pos = torch.arange(L, device=valid.device).expand(B, L)
    firing = torch.where(active & valid, pos, torch.full_like(pos, L)).min(1).values
    start = torch.minimum(firing, first_label)
    lengths = valid.sum(1)
    if float((lengths - start).sum()) > MAX_FRACTION * float(lengths.sum()):
        return None
    return start


def cropped_features(layers: Sequence[nn.Module], norm: nn.Module, s: torch.Tensor, kwargs: dict[str, Any],
                     valid: torch.Tensor, rows: torch.Tensor, start: torch.Tensor,
                     kv: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """(R, d) the head's input at the label rows (flat ``b * L + p``), re-running ``layers`` over
    ``[start[b], L_b)`` of each view of ``s`` (B, L, d) with the recorded prefix ``kv``."""
    B, L = valid.shape
    dev = s.device
    lengths = valid.sum(1)
    n = lengths - start  # positions re-run per view, >= 1 (a label position is among them)
    S, C = int(n.max()), int(start.max())
    t = torch.arange(S, device=dev)
    idx = (start[:, None] + t[None]).clamp(max=L - 1)  # (B, S) the original position of each re-run one
    live = t[None] < n[:, None]  # (B, S) real re-run positions
    h = torch.gather(s, 1, idx[..., None].expand(B, S, s.shape[-1]))
    cos, sin = kwargs["position_embeddings"]
    pe = tuple(torch.gather(x.expand(B, *x.shape[1:]), 1, idx[..., None].expand(B, S, x.shape[-1])) for x in (cos, sin))
    # keys: the recorded [0, C) (each view reads its own [0, start)), then the re-run ones (causal)
    prefix = torch.arange(C, device=dev)[None, None] < start[:, None, None]  # (B, 1, C)
    causal = torch.ones(S, S, dtype=torch.bool, device=dev).tril()[None] & live[:, None, :]
    mask = torch.cat([prefix.expand(B, S, C), causal], 2)[:, None]  # (B, 1, S, C + S)
    name = _cache_kwarg(kwargs)
    call = {**kwargs, "attention_mask": mask, "position_embeddings": pe, "position_ids": idx,
            name: _PrefixKV(kv, record=False, width=C)}  # type: ignore[dict-item]
    if "cache_position" in call:
        call.pop("cache_position")
    for layer in layers:
        out = layer(h, **call)
        h = out[0] if isinstance(out, tuple) else out
    feats = norm(h)
    b, p = rows // L, rows % L
    return feats[b, p - start[b]]
