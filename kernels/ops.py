"""The patch kernels as PyTorch custom operators: what ``torch.compile`` and CUDA graphs see.

Two operators, each with its launcher and its fake (meta) implementation here, Liger-Kernel
style: ``PatchedFFN`` only calls the operator, the operator picks the Triton kernel (CUDA) or the
PyTorch path (CPU) inside, and the compiler treats it as one opaque node of known output shape.

``fastpatch::patch_forward(x, keys, biases, values, base, act, backend, strategy)``
    ``base + act(x K^T + b) V`` (``base`` optional). Differentiable in ``x``, the patches and
    ``base`` (``torch.library.register_autograd``): the backward is built from ATen ops
    (``addmm`` and the activation's own ``*_backward``), so AOTAutograd can trace it.

``fastpatch::fused_ffn(x, w_up, w_down, act, w_gate, b_up, b_gate, b_down, keys, biases, values,
patch_act)``
    The one-launch decode kernel (``fused_ffn.fused_ffn_launch``): FFN and patches together.
    CUDA only, inference only (no autograd: ``PatchedFFN`` routes calls that need gradients
    elsewhere).

Why operators: ``torch.compile`` cannot trace into a Triton launcher with host-side decisions
(tuning, token buckets, ``.item()``-free but Python-branching dispatch) without graph breaks;
an operator with a fake implementation is traced as a single call whose output shape the fake
gives, so ``fullgraph=True`` holds and CUDA-graph capture sees one kernel call.

Entry points for ``PatchedFFN``: ``patch_add`` (no autograd), ``patch_delta`` (differentiable,
no base) and ``fused_ffn``. While ``torch.compile`` traces they call the operators; in eager mode
they call the same launchers directly: the Python layer of ``torch.library.custom_op`` (schema
checks, dispatch) costs a sizeable fraction of a small CPU patch forward, which an eager decode
step would pay for nothing.

Patch count and recompiles: a compiled caller passes the bank's full-capacity buffers (rows past
the live patches are exact zeros: zero keys, biases and values contribute exactly nothing for
every activation code, since ``act(0) * 0 = 0``). Their shape changes only when the bank grows
(capacity doubles), so adds and removes between calls reuse the compiled graph.
"""

from __future__ import annotations

from typing import Optional

import torch

from .fused_ffn import fused_ffn_launch
from .patch_forward import PatchForward, patch_forward
from .reference import ACT_GELU, ACT_GELU_TANH, ACT_IDENTITY, ACT_RELU, ACT_SILU

__all__ = ["patch_forward_op", "fused_ffn_op", "activation_backward", "patch_add", "patch_delta", "fused_ffn"]


# ------------------------------------------------------------------ patch forward
@torch.library.custom_op("fastpatch::patch_forward", mutates_args=())
def patch_forward_op(
    x: torch.Tensor,
    keys: torch.Tensor,
    biases: torch.Tensor,
    values: torch.Tensor,
    base: Optional[torch.Tensor],
    act: int,
    backend: str,
    strategy: str,
) -> torch.Tensor:
    """``base + act(x K^T + b) V`` as an operator (see ``patch_forward.patch_forward``).

    Args:
        x: (M, d) FFN inputs; keys (P, d), biases (P,), values (P, d_out), base (M, d_out) or
            None, all in ``x``'s dtype.
        act: activation code (``reference.ACT_*``).
        backend: ``auto``/``triton``/``torch``, or ``""`` for the environment's default.
        strategy: the Triton strategy (``auto``/``fused``/``compact``/``gemm``).
    """
    out = patch_forward(x, keys, biases, values, base, act, backend or None, strategy)
    # An operator's output may not alias an input (the compiler assumes it is fresh memory).
    return out.clone() if base is not None and out.data_ptr() == base.data_ptr() else out


@patch_forward_op.register_fake
def _patch_forward_fake(x, keys, biases, values, base, act, backend, strategy):
    return x.new_empty(x.shape[0], values.shape[1])


def activation_backward(grad_h: torch.Tensor, pre: torch.Tensor, act: int) -> torch.Tensor:
    """``grad_h * act'(pre)`` with the ATen backward of each activation (traceable, and the very
    formulas autograd uses for ``reference.activation_reference``)."""
    if act == ACT_RELU:
        return torch.ops.aten.threshold_backward(grad_h, torch.relu(pre), 0)
    if act == ACT_SILU:
        return torch.ops.aten.silu_backward(grad_h, pre)
    if act == ACT_GELU:
        return torch.ops.aten.gelu_backward(grad_h, pre, approximate="none")
    if act == ACT_GELU_TANH:
        return torch.ops.aten.gelu_backward(grad_h, pre, approximate="tanh")
    if act == ACT_IDENTITY:
        return grad_h
    raise ValueError(f"unknown activation code {act}")


def _act(pre: torch.Tensor, act: int) -> torch.Tensor:
    from .reference import activation_reference

    return activation_reference(pre, act)


def _setup_context(ctx, inputs, output) -> None:
    x, keys, biases, values, base, act, _backend, _strategy = inputs
    ctx.save_for_backward(x, keys, biases, values)
    ctx.act = act
    ctx.has_base = base is not None


def _backward(ctx, grad_out):
    # Recompute the pre-activations (cheaper to store x than the (M, P) matrix), then five GEMMs.
    x, keys, biases, values = ctx.saved_tensors
    need_x, need_k, need_b, need_v, need_base = ctx.needs_input_grad[:5]
    pre = torch.addmm(biases.to(x.dtype), x, keys.t())
    d_pre = activation_backward(grad_out @ values.t(), pre, ctx.act)
    grad_x = d_pre @ keys if need_x else None
    grad_k = d_pre.t() @ x if need_k else None
    grad_b = d_pre.sum(0).to(biases.dtype) if need_b else None
    grad_v = _act(pre, ctx.act).t() @ grad_out if need_v else None
    grad_base = grad_out if (ctx.has_base and need_base) else None
    return grad_x, grad_k, grad_b, grad_v, grad_base, None, None, None


torch.library.register_autograd("fastpatch::patch_forward", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------ fused FFN (decode)
@torch.library.custom_op("fastpatch::fused_ffn", mutates_args=())
def fused_ffn_op(
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    act: int,
    w_gate: Optional[torch.Tensor],
    b_up: Optional[torch.Tensor],
    b_gate: Optional[torch.Tensor],
    b_down: Optional[torch.Tensor],
    keys: torch.Tensor,
    biases: torch.Tensor,
    values: torch.Tensor,
    patch_act: int,
) -> torch.Tensor:
    """``FFN(x) + patch_act(x K^T + b) V`` in one Triton launch (``fused_ffn.fused_ffn_launch``).

    ``w_down`` is the neuron-major (F, d_out) view (``down.weight.t()``); CUDA tensors only.
    """
    return fused_ffn_launch(x, w_up, w_down, act, w_gate, b_up, b_gate, b_down, keys, biases, values, patch_act)


@fused_ffn_op.register_fake
def _fused_ffn_fake(x, w_up, w_down, act, w_gate, b_up, b_gate, b_down, keys, biases, values, patch_act):
    return x.new_empty(x.shape[0], w_down.shape[1])


# ------------------------------------------------------------------ entry points
def patch_add(
    x: torch.Tensor, keys: torch.Tensor, biases: torch.Tensor, values: torch.Tensor, base: torch.Tensor,
    act: int, backend: str | None, strategy: str = "auto",
) -> torch.Tensor:
    """``base + act(x K^T + b) V`` without gradients: the operator under ``torch.compile``, the
    launcher itself in eager mode (the same computation)."""
    if torch.compiler.is_compiling():
        return patch_forward_op(x, keys, biases, values, base, act, backend or "", strategy)
    return patch_forward(x, keys, biases, values, base, act, backend, strategy)


def patch_delta(
    x: torch.Tensor, keys: torch.Tensor, biases: torch.Tensor, values: torch.Tensor, act: int,
    backend: str | None,
) -> torch.Tensor:
    """Differentiable ``act(x K^T + b) V`` (no base): the operator with its registered autograd
    under ``torch.compile``, ``patch_forward.PatchForward`` in eager mode (same formulas)."""
    if torch.compiler.is_compiling():
        return patch_forward_op(x, keys, biases, values, None, act, backend or "", "auto")
    return PatchForward.apply(x, keys, biases, values, act, backend)


def fused_ffn(
    x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, act: int, w_gate: torch.Tensor | None,
    b_up: torch.Tensor | None, b_gate: torch.Tensor | None, b_down: torch.Tensor | None,
    keys: torch.Tensor, biases: torch.Tensor, values: torch.Tensor, patch_act: int,
) -> torch.Tensor:
    """The one-launch patched FFN (CUDA): the operator under ``torch.compile``, the launcher in
    eager mode."""
    if torch.compiler.is_compiling():
        return fused_ffn_op(x, w_up, w_down, act, w_gate, b_up, b_gate, b_down, keys, biases, values, patch_act)
    return fused_ffn_launch(x, w_up, w_down, act, w_gate, b_up, b_gate, b_down, keys, biases, values, patch_act)
