"""Editor settings reach the loss (issue 18, point 5).

``L = L_edit + alc * L_act + mlc * (L_m1 + L_m2)`` with (tpatcher.md, "Losses"):

* ``L_act`` = mean of the top-``act_topk`` of ``exp(-a)`` over the neurons' pre-activations on the
  edit input,
* ``L_m1`` = mean over neurons of the mean of the top-``mem_topk`` of ``exp(a_i - a_e + margin)``
  over the memory vectors (``a_e``: the neuron's weakest view of its edit),
* ``L_m2`` = likewise of ``exp(a_i + margin)``.

Each setting is changed on one editor, with the same patch parameters, and every part of the loss
the editor reports is compared with a plain float64 PyTorch computation of the formula. The
entry point is the editor's one loss evaluation, ``fastpatch.editor.objective.losses`` (the smallest one that reads
the settings), isolated in :func:`_editor_losses` so a refactor has one place to retarget.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastpatch.editor import Editor, EditorConfig, EditRequest, objective
from tests.test_editor import CORPUS, word_tokenizer
from tests.tiny_models import tiny_llama

REQ = EditRequest("the capital of norway is", "oslo city river", edit_id="n")


@pytest.fixture(scope="module")
def setup(one_thread):
    torch.manual_seed(0)
    ed = Editor(tiny_llama(), word_tokenizer(), EditorConfig(augment=0, loss_vocab=0, max_neurons=3))
    ed.build_memory(CORPUS)
    batch = ed._prepare([REQ])
    n = len(batch.neurons)
    assert n >= 2, "the test wants several neurons (per-neuron means)"
    g = torch.Generator().manual_seed(5)
    d_in, d_out = ed.ffn.bank.d_in, ed.ffn.bank.d_out
    # Parameters chosen so pre-activations are spread around 0 on the edit and the memory: every
    # top-k below selects a different set, and no term is 0 or inf.
    params = {
        "keys": torch.randn(n, d_in, generator=g) * 0.3,
        "bias": torch.randn(n, generator=g) * 0.5,
        "v_dir": torch.randn(n, d_out, generator=g) / d_out**0.5,
        "amp": torch.full((n, 1), 2.0),
    }
    xs = [batch.neuron_inputs(j).double() for j in range(n)]
    return ed, batch, params, xs


def _editor_losses(ed: Editor, batch, params) -> dict[str, float]:
    """The editor's loss and its parts for ``params`` under ``ed.config``."""
    with torch.no_grad():
        _, info, *_ = objective.losses(ed.handle, ed.config, ed.memory, batch, params, full_forward=False)
    return info


def _reference(ed: Editor, xs, params, *, alc, mlc, act_topk, mem_topk, margin, l_edit) -> dict[str, float]:
    K = params["keys"].double()
    b = params["bias"].double()
    a_views = [x @ K[j] + b[j] for j, x in enumerate(xs)]
    a_all = torch.cat(a_views)
    a_e = torch.stack([a.min() for a in a_views])
    l_act = torch.exp(-a_all).sort(descending=True).values[:act_topk].mean()
    mem = ed.memory.vectors.double()
    A = mem @ K.t() + b  # (N, n)
    k = min(mem_topk, A.shape[0])
    m1 = torch.stack([torch.exp(A[:, j] - a_e[j] + margin).sort(descending=True).values[:k].mean()
                      for j in range(len(xs))]).mean()
    m2 = torch.stack([torch.exp(A[:, j] + margin).sort(descending=True).values[:k].mean()
                      for j in range(len(xs))]).mean()
    return {"act": float(l_act), "m1": float(m1), "m2": float(m2),
            "loss": l_edit + alc * float(l_act) + mlc * float(m1 + m2)}


def _check(ed: Editor, batch, params, xs, **cfg) -> dict[str, float]:
    base = EditorConfig(augment=0, loss_vocab=0, max_neurons=3)
    for name, value in cfg.items():
        setattr(base, name, value)
    ed.config = base
    got = _editor_losses(ed, batch, params)
    want = _reference(ed, xs, params, alc=base.alc, mlc=base.mlc, act_topk=base.act_topk,
                      mem_topk=base.mem_topk, margin=base.margin, l_edit=got["edit"])
    for part in ("act", "m1", "m2", "loss"):
        assert got[part] == pytest.approx(want[part], rel=2e-4, abs=1e-6), (cfg, part, got[part], want[part])
    return got


def test_defaults_are_the_authors_and_the_loss_uses_them(setup) -> None:
    """The defaults (alc 1, mlc 10, top-5 activation, top-1000 memory, margin 3) -- the literal
    values of the paper, not the config's, are put into the reference."""
    ed, batch, params, xs = setup
    cfg = EditorConfig()
    assert (cfg.alc, cfg.mlc, cfg.act_topk, cfg.mem_topk, cfg.margin) == (1.0, 10.0, 5, 1000, 3.0)
    ed.config = EditorConfig(augment=0, loss_vocab=0, max_neurons=3)
    got = _editor_losses(ed, batch, params)
    want = _reference(ed, xs, params, alc=1.0, mlc=10.0, act_topk=5, mem_topk=1000, margin=3.0, l_edit=got["edit"])
    for part in ("act", "m1", "m2", "loss"):
        assert got[part] == pytest.approx(want[part], rel=2e-4), part


@pytest.mark.parametrize("margin", [0.0, 1.5, 3.0, 5.0])
def test_margin(setup, margin: float) -> None:
    ed, batch, params, xs = setup
    got = _check(ed, batch, params, xs, margin=margin)
    three = _check(ed, batch, params, xs, margin=3.0)
    # exp(a + margin): both memory terms scale by exactly exp(margin - 3)
    assert got["m1"] == pytest.approx(three["m1"] * math.exp(margin - 3.0), rel=2e-4)
    assert got["m2"] == pytest.approx(three["m2"] * math.exp(margin - 3.0), rel=2e-4)


@pytest.mark.parametrize("mem_topk", [1, 4, 17, 1000])
def test_mem_topk(setup, mem_topk: int) -> None:
    ed, batch, params, xs = setup
    got = _check(ed, batch, params, xs, mem_topk=mem_topk)
    if mem_topk == 1:  # the top-1 mean is the largest term: above every other mean
        assert got["m2"] > _check(ed, batch, params, xs, mem_topk=4)["m2"]


@pytest.mark.parametrize("act_topk", [1, 2, 5])
def test_act_topk(setup, act_topk: int) -> None:
    ed, batch, params, xs = setup
    got = _check(ed, batch, params, xs, act_topk=act_topk)
    if act_topk == 1:
        assert got["act"] > _check(ed, batch, params, xs, act_topk=2)["act"]


@pytest.mark.parametrize("alc", [0.0, 0.5, 2.0])
def test_alc(setup, alc: float) -> None:
    ed, batch, params, xs = setup
    got = _check(ed, batch, params, xs, alc=alc)
    one = _check(ed, batch, params, xs, alc=1.0)
    assert got["loss"] - one["loss"] == pytest.approx((alc - 1.0) * one["act"], rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("mlc", [0.0, 5.0, 10.0])
def test_mlc(setup, mlc: float) -> None:
    ed, batch, params, xs = setup
    got = _check(ed, batch, params, xs, mlc=mlc)
    ten = _check(ed, batch, params, xs, mlc=10.0)
    assert got["loss"] - ten["loss"] == pytest.approx((mlc - 10.0) * (ten["m1"] + ten["m2"]), rel=1e-3, abs=1e-5)
