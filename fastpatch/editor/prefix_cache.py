"""Keys and values of the fixed context prefixes, computed once and reused by every edit.

The editor captures each request in several views: as given, and behind each of a few fixed
context prefixes (``EditorConfig.augment``). On the fast path the patched FFN is the last layer's
and everything after it (final norm, LM head) is position-wise, so no attention layer ever reads
what the patches change: a prefix's per-layer keys/values and its FFN inputs are the same for
every edit. They are computed once per prefix; each capture forward then runs only the tokens
after the part it shares with a prefix (about half the tokens of the batch on SmolLM2 with the
default four 8-token prefixes).

The batched forward puts row ``i``'s ``c_i`` cached tokens at the end of a shared cache of
length ``C = max c_i`` (left padding, masked out), and gives its new tokens the positions
``c_i, c_i + 1, ...``: keys were stored with their rotary/absolute positions applied, so every
row attends exactly as in a forward over its whole sequence.

The result equals the uncached forward up to floating-point summation order. The editor still
compares the two on its first cached capture and falls back to uncached forwards for good if
they disagree (a model family whose cache behaves differently).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = ["PrefixState", "common_length", "cache_tensors", "build_cache", "cache_kwarg", "batched_inputs"]


@dataclass
class PrefixState:
    """What a prefix's tokens leave behind: per-layer (keys, values), each (1, heads, n, head_dim),
    and the patched FFN's inputs at those tokens, (n, d)."""

    ids: tuple[int, ...]
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    x: torch.Tensor


def common_length(prefix: Sequence[int], ids: Sequence[int]) -> int:
    """Length of the longest common leading run of two token sequences."""
    n = 0
    for a, b in zip(prefix, ids):
        if a != b:
            break
        n += 1
    return n


def cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) of a filled ``transformers`` ``DynamicCache`` (old and new API)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache))  # transformers < 4.56


def build_cache(kv: list[tuple[torch.Tensor, torch.Tensor]], config: Any) -> Any:
    """A ``DynamicCache`` holding ``kv`` (per-layer keys and values)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(ddp_cache_data=kv, config=config)
    except TypeError:  # transformers < 4.56
        return DynamicCache.from_legacy_cache(tuple(kv))


def cache_kwarg(model: Any) -> str:
    """The name under which ``model.forward`` takes a KV cache: ``cache`` from transformers 5.24
    on (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    return _cache_kwarg_of(type(model))


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(cls: type) -> str:  # one signature inspection per model class, not per edit
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def batched_inputs(
    seqs: Sequence[torch.Tensor], states: Sequence[PrefixState | None], offsets: Sequence[int], pad: int
) -> tuple[dict[str, torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Model inputs for the tokens of ``seqs`` after their cached ``offsets``, and the batch's cache.

    Row ``i`` reuses the first ``offsets[i]`` tokens of ``states[i]`` (0: none). Returns the
    ``input_ids`` (right-padded), ``attention_mask`` (cache plus new tokens) and ``position_ids``,
    and the per-layer (keys, values) of the batch, left-padded to the longest offset.
    """
    B = len(seqs)
    C = max(offsets)
    news = [s[c:] for s, c in zip(seqs, offsets)]
    L = max(t.shape[0] for t in news)
    dev = seqs[0].device
    ids = torch.full((B, L), pad, dtype=seqs[0].dtype, device=dev)
    mask = torch.zeros(B, C + L, dtype=torch.long, device=dev)
    pos = torch.zeros(B, L, dtype=torch.long, device=dev)
    for i, (t, c) in enumerate(zip(news, offsets)):
        ids[i, : t.shape[0]] = t
        mask[i, C - c : C + t.shape[0]] = 1
        pos[i] = c + torch.arange(L, device=dev)
    ref = next(s for s in states if s is not None)
    kv = []
    for layer, (k0, v0) in enumerate(ref.kv):
        k = k0.new_zeros(B, k0.shape[1], C, k0.shape[3])
        v = v0.new_zeros(B, v0.shape[1], C, v0.shape[3])
        for i, (st, c) in enumerate(zip(states, offsets)):
            if st is not None and c:
                k[i, :, C - c :] = st.kv[layer][0][0, :, :c]
                v[i, :, C - c :] = st.kv[layer][1][0, :, :c]
        kv.append((k, v))
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}, kv
