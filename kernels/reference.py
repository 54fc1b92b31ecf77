"""PyTorch references for every fastpatch kernel (the ``naive.py`` of flash-linear-attention).

These are the definitions the Triton kernels are tested against, in float64. They favour
clarity over speed: no sparsity tricks, no fusion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Activation codes shared by the references and the kernels (a Triton ``constexpr``).
ACT_RELU, ACT_SILU, ACT_GELU, ACT_GELU_TANH, ACT_IDENTITY = 0, 1, 2, 3, 4
ACT_NAMES = {ACT_RELU: "relu", ACT_SILU: "silu", ACT_GELU: "gelu", ACT_GELU_TANH: "gelu_tanh", ACT_IDENTITY: "identity"}
ACT_CODES = {v: k for k, v in ACT_NAMES.items()}


def activation_reference(h: torch.Tensor, act: int) -> torch.Tensor:
    """Apply activation ``act`` (one of the ``ACT_*`` codes)."""
    if act == ACT_RELU:
        return F.relu(h)
    if act == ACT_SILU:
        return F.silu(h)
    if act == ACT_GELU:
        return F.gelu(h)
    if act == ACT_GELU_TANH:
        return F.gelu(h, approximate="tanh")
    if act == ACT_IDENTITY:
        return h
    raise ValueError(f"unknown activation code {act}")


def patch_forward_reference(
    x: torch.Tensor,
    keys: torch.Tensor,
    bias: torch.Tensor,
    values: torch.Tensor,
    base: torch.Tensor | None = None,
    act: int = ACT_RELU,
) -> torch.Tensor:
    """``base + act(x K^T + b) V`` for ``x`` (M, d), ``K`` (P, d), ``b`` (P,), ``V`` (P, d_out)."""
    out = activation_reference(x @ keys.t() + bias, act) @ values
    return out if base is None else base + out


def patched_ffn_reference(
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    act: int,
    *,
    w_gate: torch.Tensor | None = None,
    b_up: torch.Tensor | None = None,
    b_gate: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    patch_act: int = ACT_RELU,
) -> torch.Tensor:
    """The original FFN plus patch neurons, written out.

    Weights are in neuron-major form: ``w_up``/``w_gate`` are (F, d), ``w_down`` is (F, d_out).

    - gated (``w_gate`` given): ``(act(x Wg^T + bg) * (x Wu^T + bu)) Wd + bd``
    - two-matrix: ``act(x Wu^T + bu) Wd + bd``

    Patches add ``patch_act(x K^T + b) V``.
    """
    up = x @ w_up.t()
    if b_up is not None:
        up = up + b_up
    if w_gate is not None:
        gate = x @ w_gate.t()
        if b_gate is not None:
            gate = gate + b_gate
        h = activation_reference(gate, act) * up
    else:
        h = activation_reference(up, act)
    out = h @ w_down
    if b_down is not None:
        out = out + b_down
    if keys is not None and keys.shape[0] > 0:
        out = patch_forward_reference(x, keys, bias, values, out, patch_act)
    return out
