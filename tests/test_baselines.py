"""The benchmark baselines are run at their best: the authors-style editing loop freezes the base model."""

from __future__ import annotations

import torch

from benchmarks.baselines import authors_style_edit, frozen_parameters
from fastpatch.editor import EditRequest

from .test_editor import _editor


def test_frozen_parameters_restores_requires_grad() -> None:
    lin = torch.nn.Linear(3, 2)
    lin.bias.requires_grad_(False)  # a parameter already frozen stays frozen
    with frozen_parameters(lin) as frozen:
        assert frozen == [lin.weight]
        assert not any(p.requires_grad for p in lin.parameters())
    assert lin.weight.requires_grad and not lin.bias.requires_grad


def test_authors_style_edit_computes_no_base_weight_gradient(one_thread) -> None:
    ed = _editor("llama")
    model = ed.model
    params = dict(model.named_parameters())
    assert params and all(p.requires_grad for p in params.values())
    # During the loop, every gradient that autograd accumulates into a leaf lands here. A base
    # weight that required grad would get one on every backward.
    touched: set[str] = set()
    hooks = [p.register_post_accumulate_grad_hook(lambda _p, n=n: touched.add(n)) for n, p in params.items()]
    seen_requires_grad: list[bool] = []
    orig_forward = ed.handle.forward

    def spy(inputs):
        if torch.is_grad_enabled():  # a training-step forward (the others run under no_grad)
            seen_requires_grad.append(any(p.requires_grad for p in model.parameters()))
        return orig_forward(inputs)

    ed.handle.forward = spy
    try:
        ok, steps, _ = authors_style_edit(ed, EditRequest("the capital of peru is", "lima"), max_steps=20)
    finally:
        del ed.handle.forward
        for h in hooks:
            h.remove()
    assert steps > 0, "the loop took no training step: the test would not exercise a backward"
    assert len(seen_requires_grad) > 1 and not any(seen_requires_grad), "base parameters required grad during the loop"
    assert touched == set(), f"base weights got gradients: {sorted(touched)[:5]}"
    # Afterwards: the model is as it was (trainable flags restored, no stray .grad, PatchedFFN back).
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert ed.ffn.num_patches == 0 and model.get_submodule(ed.ffn.module_path) is ed.ffn
