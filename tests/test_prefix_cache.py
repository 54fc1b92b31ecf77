"""The context prefixes' key/value cache (fastpatch.editor.prefix_cache): a batched forward that
reuses cached prefixes gives the logits of a plain forward over each whole sequence."""

from __future__ import annotations

import pytest
import torch

from fastpatch.editor.prefix_cache import (
    PrefixState,
    batched_inputs,
    build_cache,
    cache_kwarg,
    cache_tensors,
    common_length,
)

from .tiny_models import TINY


def test_common_length() -> None:
    assert common_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_length([1, 2], [1, 2, 3]) == 2 and common_length([], [1]) == 0 and common_length([7], [8]) == 0


def _prefix_state(model: torch.nn.Module, ids: list[int]) -> PrefixState:
    cache = build_cache([], model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]), **{cache_kwarg(model): cache}, use_cache=True)
    kv = cache_tensors(cache)
    assert len(kv) == model.config.num_hidden_layers and kv[0][0].shape[2] == len(ids)
    return PrefixState(tuple(ids), [(k.detach(), v.detach()) for k, v in kv], torch.zeros(len(ids), 1))


def test_batched_inputs_layout() -> None:
    k = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(1, 2, 3, 2)
    st = PrefixState((1, 2, 3), [(k, -k)], torch.zeros(3, 1))
    seqs = [torch.tensor([1, 2, 3, 9]), torch.tensor([1, 2, 8, 8, 8]), torch.tensor([4, 5])]
    inputs, kv = batched_inputs(seqs, [st, st, None], [3, 2, 0], pad=0)
    assert inputs["input_ids"].tolist() == [[9, 0, 0], [8, 8, 8], [4, 5, 0]]
    # cache of length 3 (the longest offset), left-padded; then the new tokens
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0]]
    assert inputs["position_ids"][:, 0].tolist() == [3, 2, 0]
    (bk, bv), = kv
    assert bk.shape == (3, 2, 3, 2)
    assert torch.equal(bk[0], k[0]) and torch.equal(bk[1, :, 1:], k[0, :, :2]) and not bk[2].any()
    assert torch.equal(bv[0], -k[0])


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_cached_forward_equals_plain_forward(name: str) -> None:
    torch.manual_seed(0)
    model = TINY[name][0]().double()
    prefix = [5, 6, 7, 8]
    st = _prefix_state(model, prefix)
    seqs = [torch.tensor(prefix + [11, 12, 13]), torch.tensor(prefix[:2] + [20, 21]), torch.tensor([30, 31, 32])]
    offsets = [common_length(prefix, s.tolist()) for s in seqs]
    assert offsets == [4, 2, 0]
    inputs, kv = batched_inputs(seqs, [st, st, None], offsets, pad=0)
    with torch.no_grad():
        out = model(**inputs, **{cache_kwarg(model): build_cache(kv, model.config)}, use_cache=True).logits
        for i, (s, c) in enumerate(zip(seqs, offsets)):
            plain = model(input_ids=s[None]).logits[0, c:]
            torch.testing.assert_close(out[i, : len(s) - c], plain, rtol=1e-6, atol=1e-8)
