"""``torch.compile`` of patched models: no graph break, eager logits, no recompile per edit.

The patch kernels are ``fastpatch::`` custom operators (``kernels/ops.py``) with fake
implementations, so Dynamo traces ``PatchedFFN.forward`` whole (``fullgraph=True`` raises on any
graph break). Most tests compile with the ``aot_eager`` backend (Dynamo + AOTAutograd with the
fake implementations, no C++ toolchain needed); one compiles with Inductor when a C++ compiler
is present. Compilations are counted with ``torch._dynamo.testing.CompileCounterWithBackend``:
every (re)compilation of a frame calls the backend once.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from fastpatch import PatchedFFN
from fastpatch.kernels.ops import activation_backward, patch_forward_op
from fastpatch.kernels.reference import (
    ACT_GELU, ACT_GELU_TANH, ACT_IDENTITY, ACT_RELU, ACT_SILU, activation_reference,
)
from fastpatch.kernels.testing import TOLERANCES

from .tiny_models import TINY, model_inputs

CompileCounterWithBackend = pytest.importorskip("torch._dynamo.testing").CompileCounterWithBackend


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _firing_patches(pffn: PatchedFFN, x: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    """``n`` patches that fire on some of the FFN inputs ``x`` (T-Patcher's init, bias -0.5)."""
    g = torch.Generator().manual_seed(seed)
    rows = x[torch.randint(0, x.shape[0], (n,), generator=g)]
    keys = rows / rows.pow(2).sum(1, keepdim=True)
    biases = torch.full((n,), -0.5)
    values = torch.randn(n, pffn.bank.d_out, generator=g)
    return keys, biases, values


def _patched(name: str, capacity: int = 64) -> tuple[torch.nn.Module, PatchedFFN, dict, torch.Tensor]:
    torch.manual_seed(0)
    build, path, _ = TINY[name]
    model = build()
    inputs = model_inputs(name)
    pffn = PatchedFFN.wrap(model, path, capacity=capacity, backend="torch")
    cap = {}
    h = pffn.register_forward_pre_hook(lambda m, a: cap.__setitem__("x", a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(**inputs)
    h.remove()
    return model, pffn, inputs, cap["x"]


def _assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(out, ref, atol=atol * max(1.0, float(ref.abs().max())), rtol=rtol)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_compiled_patched_model_matches_eager_without_graph_break(one_thread, name: str) -> None:
    model, pffn, inputs, x = _patched(name)
    with torch.no_grad():
        unpatched = model(**inputs).logits
        pffn.add_patches(*_firing_patches(pffn, x, 5, seed=1))
        eager = model(**inputs).logits
        assert not torch.allclose(eager, unpatched), "no patch fires: the test would not exercise the patch op"
        cnt = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(model, backend=cnt, fullgraph=True)  # raises on a graph break
        out = compiled(**inputs).logits
    _assert_close(out, eager)
    assert cnt.frame_count == 1
    # the graph calls the operator (not an inlined copy of the PyTorch path)
    assert any("fastpatch.patch_forward" in str(n.target) for g in cnt.graphs for n in g.graph.nodes)


def test_adds_and_removes_do_not_recompile(one_thread) -> None:
    """Patches added and removed between calls (within the bank's capacity) reuse the graph."""
    model, pffn, inputs, x = _patched("llama", capacity=64)
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=cnt, fullgraph=True)
    edits: list[list[int]] = []
    with torch.no_grad():
        for i in range(24):
            if i % 4 == 3:  # a rollback now and then, as an edit stream has
                pffn.remove(edits.pop(0))
            else:
                edits.append(pffn.add_patches(*_firing_patches(pffn, x, 1 + i % 3, seed=i)))
            _assert_close(compiled(**inputs).logits, model(**inputs).logits)
    assert pffn.bank.capacity == 64, "the bank grew: this test is about adds within capacity"
    assert cnt.frame_count == 1, f"{cnt.frame_count} compilations for 24 adds/removes"


def test_bank_growth_recompiles_once_per_capacity_doubling(one_thread) -> None:
    """Growth doubles the capacity, and Dynamo keeps module buffers' shapes static: one
    recompilation per doubling (log2 of the growth), none for the adds in between. A bank
    preallocated with ``capacity=`` never recompiles."""
    model, pffn, inputs, x = _patched("llama", capacity=4)
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=cnt, fullgraph=True)
    capacities = []
    with torch.no_grad():
        for i in range(12):
            pffn.add_patches(*_firing_patches(pffn, x, 3, seed=100 + i))
            capacities.append(pffn.bank.capacity)
            if i % 4 == 3:
                _assert_close(compiled(**inputs).logits, model(**inputs).logits)
            else:
                compiled(**inputs)
    assert pffn.num_patches == 36 and len(set(capacities)) > 1
    assert cnt.frame_count == len(set(capacities)), f"{cnt.frame_count} compilations for capacities {sorted(set(capacities))}"


def test_compiled_with_no_patches_is_the_unpatched_model(one_thread) -> None:
    model, pffn, inputs, _ = _patched("llama")
    with torch.no_grad():
        eager = model(**inputs).logits
        out = torch.compile(model, backend="aot_eager", fullgraph=True)(**inputs).logits
    _assert_close(out, eager)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler for Inductor")
def test_inductor_compiles_the_patched_model(one_thread) -> None:
    model, pffn, inputs, x = _patched("llama")
    with torch.no_grad():
        pffn.add_patches(*_firing_patches(pffn, x, 4, seed=3))
        eager = model(**inputs).logits
        out = torch.compile(model, fullgraph=True)(**inputs).logits
    _assert_close(out, eager)


def test_compiled_training_step_gives_eager_gradients(one_thread) -> None:
    """Training patches under compile: the operator's registered autograd gives eager's gradients."""
    model, pffn, inputs, x = _patched("llama")
    pffn.add_patches(*_firing_patches(pffn, x, 3, seed=5))
    k, b, v = (t.clone().requires_grad_(True) for t in _firing_patches(pffn, x, 2, seed=6))

    def loss_fn(m):
        with pffn.training_patches(k, b, v):
            return m(**inputs).logits.float().logsumexp(-1).mean()

    grads = []
    for fn in (loss_fn, torch.compile(loss_fn, backend="aot_eager", fullgraph=True)):
        for t in (k, b, v):
            t.grad = None
        fn(model).backward()
        grads.append([t.grad.clone() for t in (k, b, v)])
    for ge, gc in zip(*grads):
        _assert_close(gc, ge)


@pytest.mark.parametrize("act", [ACT_RELU, ACT_SILU, ACT_GELU, ACT_GELU_TANH, ACT_IDENTITY])
def test_patch_forward_op_gradients(act: int) -> None:
    """The operator's backward equals autograd through the float64 reference, for every input."""
    g = torch.Generator().manual_seed(act)
    M, d, P, d_out = 5, 7, 4, 6
    x = torch.randn(M, d, generator=g, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(P, d, generator=g, dtype=torch.float64, requires_grad=True)
    biases = torch.randn(P, generator=g, dtype=torch.float64, requires_grad=True)
    values = torch.randn(P, d_out, generator=g, dtype=torch.float64, requires_grad=True)
    base = torch.randn(M, d_out, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: patch_forward_op(*a, act, "torch", "auto"), (x, keys, biases, values, base)
    )
    pre = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    gh = torch.randn(3, 4, dtype=torch.float64)
    (want,) = torch.autograd.grad(activation_reference(pre, act), pre, gh)
    torch.testing.assert_close(activation_backward(gh, pre.detach(), act), want)


def test_patch_forward_op_passes_opcheck() -> None:
    """``torch.library.opcheck``: schema, fake implementation and autograd registration agree."""
    g = torch.Generator().manual_seed(0)
    x, keys = torch.randn(3, 8, generator=g), torch.randn(5, 8, generator=g)
    biases, values, base = torch.randn(5, generator=g), torch.randn(5, 6, generator=g), torch.randn(3, 6, generator=g)
    for args in ((x, keys, biases, values, base, ACT_RELU, "torch", "auto"),
                 (x, keys, biases, values, None, ACT_SILU, "torch", "auto")):
        torch.library.opcheck(patch_forward_op, args)
        req = tuple(t.clone().requires_grad_(True) if isinstance(t, torch.Tensor) else t for t in args)
        torch.library.opcheck(patch_forward_op, req)
