"""The cropped deep tail (fastpatch.editor.tail_crop): re-running the later layers only from each
view's first firing position, with the earlier positions' keys and values recorded once, gives
the full re-run's features and gradients exactly (float64), and falls back where it cannot."""

from __future__ import annotations

import pytest
import torch

from fastpatch.editor import EditRequest
from fastpatch.editor.deep_tail import SeqState, _captured_kv, seq_descent, seq_features
from fastpatch.editor.objective import label_logits
from fastpatch.editor.tail_crop import can_crop, crop_plan, record_kv
from fastpatch.kernels.testing import TOLERANCES

from .test_deep_tail import _deep_editor


def _batch(augment: int = 3, layer: int = 0):
    ed = _deep_editor(layer, augment=augment, augment_tokens=4)
    batch = ed._prepare([EditRequest("the capital of peru is", "lima oslo", subject="peru")])
    return ed, batch, batch.seq() if ed.adapter.deep else None


def _late_keys(st, n: int = 3, seed: int = 0):
    """Keys that fire at and around the first label position of view 0 only (a subject key's
    pattern): later positions, so the crop has something to skip."""
    g = torch.Generator().manual_seed(seed)
    p = int(st.first_label[0])
    x = st.x[0, p]
    K = torch.stack([x + 0.05 * torch.randn(x.shape, generator=g, dtype=x.dtype) for _ in range(n)])
    own = (K @ x)
    b = -0.9 * own
    V = torch.randn(n, st.s0.shape[-1], generator=g, dtype=x.dtype)
    return K, b, V  # the parameters' dtype: the FFN inputs' (float32), as in training


@pytest.mark.parametrize("layer,augment", [(0, 3), (1, 2), (0, 0)])
def test_cropped_tail_equals_the_full_rerun_values_and_gradients(layer: int, augment: int) -> None:
    ed, batch, st = _batch(augment, layer)
    layers, norm = ed.adapter.seq_layers, ed.adapter.features
    assert st.croppable(layers)
    K, b, V = _late_keys(st)
    pre = st.x @ K.t() + b
    start = crop_plan((pre > 0).any(-1), st.valid, st.first_label)
    assert start is not None and int(start.sum()) > 0  # something is skipped
    params = [t.clone().requires_grad_(True) for t in (K, b, V)]
    got = seq_features(layers, norm, st, *params, crop=True)
    want = seq_features(layers, norm, st, *params, crop=False)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    w = torch.randn(got.shape, generator=torch.Generator().manual_seed(1), dtype=got.dtype)
    g_got = torch.autograd.grad((got * w).sum(), params)
    g_want = torch.autograd.grad((want * w).sum(), params)
    for a, c in zip(g_got, g_want):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-10)


def test_crop_plan_starts_at_the_first_firing_or_label_position_and_declines_when_little_is_saved() -> None:
    valid = torch.tensor([[True] * 8, [True] * 6 + [False] * 2])
    active = torch.zeros(2, 8, dtype=torch.bool)
    active[0, 5] = active[1, 2] = active[1, 7] = True  # [1, 7] is padding: ignored
    start = crop_plan(active, valid, torch.tensor([6, 4]))
    assert start.tolist() == [5, 2]
    assert crop_plan(active, valid, torch.tensor([1, 1])) is None  # re-runs nearly everything


def test_masks_the_crop_cannot_reproduce_keep_the_full_rerun() -> None:
    ed, _, st = _batch(2)
    layers = ed.adapter.seq_layers
    assert can_crop(layers, st.kwargs, st.valid)
    float_mask = dict(st.kwargs, attention_mask=st.kwargs["attention_mask"].float())
    assert not can_crop(layers, float_mask, st.valid)
    window = st.kwargs["attention_mask"].clone()
    window[:, :, -1, 0] = False  # a sliding window: not the plain causal mask
    if st.valid[:, -1].any():
        assert not can_crop(layers, dict(st.kwargs, attention_mask=window), st.valid)
    no_cache = {k: v for k, v in st.kwargs.items() if k not in ("cache", "past_key_values")}
    assert not can_crop(layers, no_cache, st.valid)
    impl = layers[0].self_attn.config._attn_implementation
    try:  # eager attention adds its mask: a boolean one would be read as 0/1 offsets
        layers[0].self_attn.config._attn_implementation = "eager"
        assert not can_crop(layers, st.kwargs, st.valid)
    finally:
        layers[0].self_attn.config._attn_implementation = impl


def test_the_capture_records_the_keys_and_values_the_crop_reads() -> None:
    """The capture's prediction pass records the tail's keys and values over the edit's batch, so
    no step runs the whole batch again: they equal a fresh recording."""
    ed, batch, st = _batch(3)
    assert st._kv is not None  # taken from the capture, not recorded lazily
    fresh, out = record_kv(ed.adapter.seq_layers, st.s0, st.kwargs)
    assert fresh.keys() == st._kv.keys()
    for i in fresh:
        for a, c in zip(fresh[i], st._kv[i]):
            torch.testing.assert_close(a, c, rtol=0, atol=0)
    feats = seq_features(ed.adapter.seq_layers, ed.adapter.features, st)  # the plain full re-run
    torch.testing.assert_close(ed.adapter.features(out).reshape(-1, out.shape[-1])[st.rows], feats)
    # a subset of the captured views is another batch: it records its own
    assert _captured_kv([batch.cap[1], batch.cap[0]]) is None
    assert _captured_kv(batch.cap[:2]) is None


@pytest.mark.parametrize("layer", [0, 1])
def test_cropped_descent_equals_the_full_one(layer: int) -> None:
    """The value init's descent direction, taken from each view's first active position on, is the
    full re-run's (float64)."""
    ed, batch, st = _batch(3, layer)
    layers, norm, head = ed.adapter.seq_layers, ed.adapter.features, ed.adapter.head
    K, b, _ = _late_keys(st)
    assert crop_plan((st.x @ K.t() + b > 0).any(-1), st.valid, st.first_label) is not None
    rows = batch.tail_rows()
    args = (layers, norm, head, st, K, b, rows["labels"], rows["weight"], ed.ffn.patch_act)
    got, want = seq_descent(*args, crop=True), seq_descent(*args, crop=False)
    assert float(want.abs().max()) > 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layer", [0, 2])
def test_requests_as_given_are_scored_as_in_the_whole_batch(layer: int) -> None:
    """``EditBatch.as_given`` (the amplifier search's batch) runs each request's own view only and
    gives it the logits it has in the whole batch, deep tail (layer 0) or position-wise (the last)."""
    ed, batch, _ = _batch(3, layer)
    own = batch.as_given()
    assert own is not batch and len(own.views) == 1 and len(batch.views) > 1
    if ed.adapter.deep:
        K, b, V = _late_keys(batch.seq(), 2)
    else:  # the last layer: keys at the request's first label row
        x = batch.tail_rows()["x"][:1]
        K, b = x.repeat(2, 1), -0.5 * (x @ x.t()).reshape(1).repeat(2)
        V = torch.randn(2, batch.cap[0]["s0"].shape[-1], dtype=x.dtype, generator=torch.Generator().manual_seed(3))
    whole = label_logits(ed.handle, batch, K, b, V)
    mine = label_logits(ed.handle, own, K, b, V)
    n = len(batch.views[0].labels)  # the request's own view's rows come first
    # the position-wise path computes the pre-activations from the float32 FFN inputs, whose
    # matmul may round differently with the number of rows
    atol, rtol = (1e-10, 1e-10) if ed.adapter.deep else TOLERANCES[torch.float32]
    torch.testing.assert_close(mine, whole[:n], rtol=rtol, atol=atol)


def test_tail_arguments_of_unknown_layout_keep_the_whole_batch() -> None:
    ed, batch, st = _batch(2)
    assert st.select([0], [batch.views[0].label_pos]) is not None
    odd = dict(st.kwargs, extra=torch.zeros(len(batch.views), 3))  # a tensor argument nobody slices
    assert SeqState(st.s0, st.x, st.valid, odd, st.rows, st.first_label).select([0], [batch.views[0].label_pos]) is None
    batch._seq = SeqState(st.s0, st.x, st.valid, odd, st.rows, st.first_label)
    assert batch.as_given() is batch
