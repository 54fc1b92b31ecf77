"""FFN layouts: how fastpatch finds the weights of a model's feed-forward block.

Three forms cover the supported families:

``gated``  ``down(act(gate(x)) * up(x))`` in one module: Llama, Qwen2, Mistral, Gemma
           (``gate_proj/up_proj/down_proj``), T5 v1.1 (``wi_0/wi_1/wo``).
``dense``  ``down(act(up(x)))`` in one module: GPT-2 (``c_fc/c_proj``, Conv1D), T5 (``wi/wo``).
``split``  the two matrices are called inside the layer, not by an FFN module of their own:
           BERT (``intermediate.dense`` / ``output.dense``) and BART (``fc1``/``fc2``). fastpatch
           wraps the second matrix and reads the FFN input with a forward pre-hook on the first.

All weight accessors return neuron-major *views* (no copies): up/gate ``(F, d_in)``, down
``(F, d_out)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .kernels.reference import ACT_GELU, ACT_GELU_TANH, ACT_RELU, ACT_SILU

__all__ = ["FFNLayout", "detect_layout", "resolve_module", "activation_code", "SUPPORTED_LAYOUTS", "UnknownLayoutError"]

SUPPORTED_LAYOUTS = (
    "gated MLP with gate_proj/up_proj/down_proj (Llama, Qwen2, Mistral, Gemma)",
    "GPT-2 MLP with c_fc/c_proj (Conv1D)",
    "T5 DenseReluDense with wi/wo, or wi_0/wi_1/wo (gated)",
    "BERT layer with intermediate.dense/output.dense",
    "BART/mBART/OPT-style layer with fc1/fc2",
)


class UnknownLayoutError(ValueError):
    """The module at the given path is not an FFN layout fastpatch knows."""


def activation_code(act: Callable | None) -> int | None:
    """Kernel activation code of a host activation module, or None if it has no kernel twin."""
    if act is None:
        return None
    name = type(act).__name__
    if isinstance(act, nn.ReLU) or name == "ReLU":
        return ACT_RELU
    if isinstance(act, nn.SiLU) or name in ("SiLUActivation", "SiLU"):
        return ACT_SILU
    if isinstance(act, nn.GELU):
        return ACT_GELU_TANH if act.approximate == "tanh" else ACT_GELU
    if name == "GELUActivation" and getattr(act, "act", None) is nn.functional.gelu:
        return ACT_GELU
    if name in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation"):
        return ACT_GELU_TANH
    return None


def _linear_parts(m: nn.Module, transposed: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight as (out_features, in_features) view, bias) of a Linear or a GPT-2 Conv1D."""
    w = m.weight
    return (w.t() if transposed else w), getattr(m, "bias", None)


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


@dataclass
class FFNLayout:
    """Where an FFN's pieces live. ``up``/``gate``/``down`` are Linear or Conv1D modules."""

    kind: str  # "gated" | "dense" | "split"
    family: str
    up: nn.Module
    down: nn.Module
    act: Callable
    gate: nn.Module | None = None
    #: split form: the module whose *input* is the FFN input (hooked), and the down module's
    #: owner + attribute name (it is replaced by the PatchedFFN).
    tap: nn.Module | None = None

    def _w(self, m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        return _linear_parts(m, _is_conv1d(m))

    @property
    def w_up(self) -> torch.Tensor:
        return self._w(self.up)[0]

    @property
    def b_up(self) -> torch.Tensor | None:
        return self._w(self.up)[1]

    @property
    def w_gate(self) -> torch.Tensor | None:
        return None if self.gate is None else self._w(self.gate)[0]

    @property
    def b_gate(self) -> torch.Tensor | None:
        return None if self.gate is None else self._w(self.gate)[1]

    @property
    def w_down(self) -> torch.Tensor:
        """(F, d_out) view of the down projection."""
        return self._w(self.down)[0].t()

    @property
    def b_down(self) -> torch.Tensor | None:
        return self._w(self.down)[1]

    @property
    def d_in(self) -> int:
        return self.w_up.shape[1]

    @property
    def d_out(self) -> int:
        return self.w_down.shape[1]

    @property
    def intermediate(self) -> int:
        return self.w_up.shape[0]

    @property
    def act_code(self) -> int | None:
        return activation_code(self.act)

    def kernel_args(self) -> tuple:
        """``(w_up, w_down, act_code, w_gate, b_up, b_gate, b_down)`` in one pass over the
        modules (the fused kernel's positional arguments; a decode step reads them every call)."""
        w_up, b_up = self._w(self.up)
        w_gate, b_gate = self._w(self.gate) if self.gate is not None else (None, None)
        w_dn, b_down = self._w(self.down)
        return w_up, w_dn.t(), self.act_code, w_gate, b_up, b_gate, b_down

    def base_tensors(self) -> list[torch.Tensor]:
        """The FFN's weights and biases (for fingerprints)."""
        out = [self.w_up, self.w_down]
        for t in (self.w_gate, self.b_up, self.b_gate, self.b_down):
            if t is not None:
                out.append(t)
        return out


def detect_layout(module: nn.Module) -> FFNLayout:
    """Recognise the FFN form of ``module``; raise ``UnknownLayoutError`` listing the supported ones."""
    g = lambda name: getattr(module, name, None)  # noqa: E731
    if all(isinstance(g(n), nn.Module) for n in ("gate_proj", "up_proj", "down_proj")) and g("act_fn") is not None:
        return FFNLayout("gated", "llama", module.up_proj, module.down_proj, module.act_fn, gate=module.gate_proj)
    if _is_conv1d(g("c_fc")) and _is_conv1d(g("c_proj")) and g("act") is not None:
        return FFNLayout("dense", "gpt2", module.c_fc, module.c_proj, module.act)
    if all(isinstance(g(n), nn.Linear) for n in ("wi_0", "wi_1", "wo")) and g("act") is not None:
        return FFNLayout("gated", "t5", module.wi_1, module.wo, module.act, gate=module.wi_0)
    if isinstance(g("wi"), nn.Linear) and isinstance(g("wo"), nn.Linear) and g("act") is not None:
        return FFNLayout("dense", "t5", module.wi, module.wo, module.act)
    if isinstance(g("DenseReluDense"), nn.Module):  # T5LayerFF: point at its DenseReluDense
        return detect_layout(module.DenseReluDense)
    inter, outp = g("intermediate"), g("output")
    if inter is not None and outp is not None and isinstance(getattr(inter, "dense", None), nn.Linear) \
            and isinstance(getattr(outp, "dense", None), nn.Linear):
        return FFNLayout("split", "bert", inter.dense, outp.dense, inter.intermediate_act_fn, tap=inter)
    if isinstance(g("fc1"), nn.Linear) and isinstance(g("fc2"), nn.Linear) and g("activation_fn") is not None:
        return FFNLayout("split", "bart", module.fc1, module.fc2, module.activation_fn, tap=module.fc1)
    raise UnknownLayoutError(
        f"{type(module).__name__} is not a known FFN layout. Supported: " + "; ".join(SUPPORTED_LAYOUTS)
        + ". Pass the path of the FFN module (or of its transformer layer for BERT/BART)."
    )


def resolve_module(model: nn.Module, path: str) -> tuple[nn.Module, str, str]:
    """Resolve a dotted path with optional negative indices (``model.layers.-1.mlp``).

    Returns (module, canonical path with non-negative indices, last attribute name).
    """
    if not path:
        raise ValueError("module path is empty")
    cur: nn.Module = model
    canon: list[str] = []
    for part in path.split("."):
        if isinstance(cur, (nn.ModuleList, nn.Sequential)) and part.lstrip("-").isdigit():
            i = int(part)
            n = len(cur)
            if not -n <= i < n:
                raise KeyError(f"index {i} out of range for {'.'.join(canon) or 'model'} (length {n})")
            i %= n
            cur = cur[i]
            canon.append(str(i))
        else:
            nxt = getattr(cur, part, None)
            if not isinstance(nxt, nn.Module):
                raise KeyError(f"{'.'.join(canon + [part])} is not a module of {type(model).__name__}")
            cur = nxt
            canon.append(part)
    return cur, ".".join(canon), canon[-1]
