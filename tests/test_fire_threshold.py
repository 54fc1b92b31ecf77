"""``EditorConfig.fire_threshold``: a committed patch's threshold is raised to a fraction of its
activation on its own edit and its value scaled to match, so it adds what it added on the edit
and nothing on inputs that drive it weakly (fastpatch.editor.training.raise_threshold)."""

from __future__ import annotations

import pytest
import torch

from fastpatch.editor import EditError, EditorConfig, EditRequest
from fastpatch.editor import training
from fastpatch.editor.training import raise_threshold, train_edit

from .test_deep_tail import _deep_editor
from .test_editor import CORPUS

PROMPT, SUBJECT_POS = "the capital of peru is", 3


def _edited(t: float):
    ed = _deep_editor(0, dtype=torch.float32, augment=2, augment_tokens=4, key_position="subject",
                      max_steps=300, fire_threshold=t)
    res = ed.edit(EditRequest(PROMPT, "lima", subject="peru", edit_id="p"))
    assert res.success and len(res.patch_ids) == 1
    return ed


def test_raised_threshold_keeps_the_edit_and_silences_weak_inputs() -> None:
    t = 0.3
    plain, raised = _edited(0.0), _edited(t)
    b0, bank = plain.ffn.bank, raised.ffn.bank
    torch.testing.assert_close(bank.keys, b0.keys)  # same training, only the threshold moved
    x = plain.ffn_inputs([PROMPT])[0][SUBJECT_POS].float()
    a_e = float(x @ b0.keys[0].float() + b0.biases[0].float())
    assert a_e > 0
    torch.testing.assert_close(float(bank.biases[0]), float(b0.biases[0]) - t * a_e, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bank.values, b0.values / (1 - t), rtol=1e-5, atol=1e-6)
    # on the edit the patch adds exactly what it added before, and the edit holds
    out0 = plain.ffn.patch_activations(x[None])[0, 0] * b0.values[0]
    out1 = raised.ffn.patch_activations(x[None])[0, 0] * bank.values[0]
    torch.testing.assert_close(out1, out0, rtol=1e-4, atol=1e-4)
    assert raised.check([PROMPT], ["lima"]) == [True]
    # an input that drives the plain patch to a fifth of that: the raised one adds nothing
    m = plain.ffn_inputs(CORPUS[:1])[0][0].float()
    a_m = float(m @ b0.keys[0].float() + b0.biases[0].float())
    assert a_m < 0
    w = (0.2 * a_e - a_m) / (a_e - a_m)
    mid = (1 - w) * m + w * x
    assert float(plain.ffn.patch_activations(mid[None])[0, 0]) == pytest.approx(0.2 * a_e, rel=1e-3)
    assert float(raised.ffn.patch_activations(mid[None])[0, 0]) == 0.0
    assert float(raised.activations(CORPUS).max()) <= 0.0  # the memory margins only widen


def test_a_request_left_wrong_by_the_raised_threshold_tries_lower_fractions_then_keeps_its_patch() -> None:
    """The tiny model's edit also leans on positions where its patch fires more weakly than at
    the subject, so 0.9 leaves it wrong: it tries 0.45, 0.225, and keeps the patch as trained
    when every fraction is wrong (checked through the whole model)."""
    ed = _deep_editor(0, dtype=torch.float32, augment=2, augment_tokens=4, key_position="subject", max_steps=300)
    batch = ed._prepare([EditRequest(PROMPT, "lima", subject="peru")])
    params, _, _, ok, keep = train_edit(ed.handle, ed.config, ed.memory, batch, 0)
    assert ok == [True]
    before = {k: v.clone() for k, v in params.items()}
    a_e = float(batch.neuron_inputs(0)[0] @ params["keys"][0] + params["bias"][0])
    raise_threshold(ed.handle, ed.config, ed.memory, batch, params, keep, [False], tries=3)
    for k in params:  # a failed request: untouched
        assert torch.equal(params[k], before[k]), k
    calls = []
    for t, tries in ((0.99, 1), (0.9, 3)):
        cfg = EditorConfig(**{**ed.config.to_dict(), "fire_threshold": t})
        p = {k: v.clone() for k, v in before.items()}
        raise_threshold(ed.handle, cfg, ed.memory, batch, p, keep, ok, tries=tries)
        moved = float(before["bias"][0] - p["bias"][0]) / a_e  # the fraction that was kept
        calls.append(moved)
        if moved == 0.0:
            assert all(torch.equal(p[k], before[k]) for k in p)
        else:
            assert any(moved == pytest.approx(t / 2 ** i, rel=1e-4) for i in range(tries)), moved
            torch.testing.assert_close(p["amp"], before["amp"] / (1 - moved), rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            assert training._right_as_given(ed.handle, cfg, ed.memory, batch, p, keep) == [True]
    # 0.99 alone leaves the edit wrong: kept as trained; from 0.9 a lower fraction holds
    assert calls[0] == 0.0 and 0.0 < calls[1] < 0.9


def test_fire_threshold_config() -> None:
    with pytest.raises(EditError, match="fire_threshold must be in"):
        EditorConfig(fire_threshold=1.0)
    assert EditorConfig.authors().fire_threshold == 0.0
    old = {k: v for k, v in EditorConfig(fire_threshold=0.3).to_dict().items() if k != "fire_threshold"}
    assert EditorConfig.from_dict(old).fire_threshold == 0.0  # a config saved before the field: off
