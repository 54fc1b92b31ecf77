"""The amplifier search (fastpatch.editor.init.search_amplifier) settles on the smallest doubling
of the amplifier that makes the request right as given, checking the request's own view only;
with the deep tail it evaluates every doubling in one batched re-run and decides exactly as the
loop of single evaluations does."""

from __future__ import annotations

import pytest
import torch

from fastpatch.editor import EditRequest
from fastpatch.editor.init import _doubling_logits, _first_right, init_params, search_amplifier
from fastpatch.editor.objective import exact_flags, label_logits, losses
from fastpatch.kernels.testing import TOLERANCES

from .test_deep_tail import _deep_editor

MAX = 10


def _setup(layer: int, loss_vocab: int = 16):
    ed = _deep_editor(layer, augment=2, augment_tokens=4, loss_vocab=loss_vocab)
    batch = ed._prepare([EditRequest("the capital of peru is", "lima", subject="peru")])
    params = {k: t.detach().clone() for k, t in init_params(ed.handle, ed.config, ed.memory, batch, 0).items()}
    # a small base amplifier, so that the first right doubling lies inside the grid
    params["amp"] = torch.full_like(params["amp"], 0.01)
    return ed, batch, params


def _right_at(ed, batch, params, k: int) -> bool:
    """Brute force on the whole batch: the request right as given at ``amp * 2**k``."""
    p = dict(params, amp=params["amp"] * 2.0 ** k)
    with torch.no_grad():
        ok = losses(ed.handle, ed.config, ed.memory, batch, p, False, with_memory=False).main_ok
        if batch.cand is not None and all(ok):
            ok = exact_flags(ed.handle, batch, p)[1]
    return all(ok)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_search_settles_on_the_first_right_doubling(layer: int) -> None:
    ed, batch, params = _setup(layer)
    grid = [_right_at(ed, batch, params, k) for k in range(MAX)]
    assert 0 < grid.index(True) < MAX - 1  # something to search on both sides
    p = {k: t.clone() for k, t in params.items()}
    k = search_amplifier(ed.handle, ed.config, ed.memory, batch, p, max_doublings=MAX)
    assert k == grid.index(True)
    torch.testing.assert_close(p["amp"], params["amp"] * 2.0 ** k * ed.config.value_margin)
    p = dict(params, amp=params["amp"] * 1e-9)  # never right within the grid
    assert search_amplifier(ed.handle, ed.config, ed.memory, batch, p, max_doublings=3) is None
    torch.testing.assert_close(p["amp"], params["amp"] * 1e-9 * 2.0 ** 3)


@pytest.mark.parametrize("layer,loss_vocab,narrow", [(0, 16, False), (1, 0, False), (0, 16, True)])
def test_batched_doublings_decide_as_single_evaluations(layer: int, loss_vocab: int, narrow: bool) -> None:
    """One re-run of every doubling gives each doubling's logits, and the same decision, with the
    same tokens added to the candidates, as evaluating them one by one. ``narrow``: the labels are
    the only candidates, so the whole vocabulary's check adds the tokens that beat them."""
    ed, batch, params = _setup(layer, loss_vocab)
    assert ed.adapter.deep
    if narrow:
        batch.set_candidates(torch.empty(0, dtype=torch.long))
    n_cand = None if batch.cand is None else len(batch.cand)
    own = batch.as_given()
    grid = _doubling_logits(ed.handle, own, params, MAX)
    for k in (0, 4, MAX - 1):
        want = label_logits(ed.handle, own, *[t if n != 2 else t * 2.0 ** k for n, t in
                                                enumerate((params["keys"], params["bias"], params["amp"] * params["v_dir"]))])
        # the patch parameters are float32 (as trained): their matmul rounds with the batch size
        atol, rtol = TOLERANCES[torch.float32]
        torch.testing.assert_close(grid[k], want, rtol=rtol, atol=atol)
    seq_own, bat_own = batch.as_given(), batch.as_given()
    base = params["amp"].clone()
    k_seq, l_seq = _first_right(ed.handle, ed.config, ed.memory, seq_own, dict(params), base, MAX, None)
    k_bat, l_bat = _first_right(ed.handle, ed.config, ed.memory, bat_own, dict(params), base, MAX,
                                _doubling_logits(ed.handle, bat_own, params, MAX))
    assert k_seq == k_bat is not None
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(torch.tensor(l_bat), torch.tensor(l_seq), rtol=rtol, atol=atol)  # the same edit loss
    if seq_own.cand is None:
        assert bat_own.cand is None
    else:
        assert torch.equal(seq_own.cand, bat_own.cand)
        assert (len(bat_own.cand) > n_cand) == narrow


@pytest.mark.parametrize("layer", [0, 2])
def test_without_a_right_doubling_the_fallback_is_the_last_or_the_lowest_loss(layer: int) -> None:
    """No doubling right (a tiny start): ``"max"`` leaves ``2**M`` times the start, ``"lowest_loss"``
    the doubling where the edit loss is lowest."""
    ed, batch, params = _setup(layer)
    start = params["amp"] * 1e-6
    _, loss = _first_right(ed.handle, ed.config, ed.memory, batch.as_given(), dict(params), start, 4, None)
    assert len(loss) == 4 and len(set(loss)) > 1  # the two fallbacks differ: 2**4 is never on the grid
    for fallback, want in (("max", start * 2.0 ** 4), ("lowest_loss", start * 2.0 ** min(range(4), key=loss.__getitem__))):
        ed.config.amplifier_fallback = fallback
        p = dict(params, amp=start.clone())
        assert search_amplifier(ed.handle, ed.config, ed.memory, batch, p, max_doublings=4) is None
        torch.testing.assert_close(p["amp"], want)
