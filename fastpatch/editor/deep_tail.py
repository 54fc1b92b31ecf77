"""The deep tail: training a patch in an FFN *before* the last layer without re-running the layers
below it.

At the last FFN the tail (final norm, head) is position-wise, so a training step needs the
residual state ``s0`` at the label positions only (:mod:`.objective`). At layer ``i < last`` a
patch's output ``delta`` at any position reaches the label positions through the attention of the
layers after it, so the deep tail re-runs those layers over every position of every view:

    features = norm(layers[i+1:](s0 + act(X K^T + b) V))      # (views, L, d), one batch
    logits   = head(features at the label rows)

``s0`` (every position), ``X`` and the keyword arguments the model passed to layer ``i + 1``
(the causal mask, the rotary embeddings) come from the edit's one capture forward, which stops
there; the layers below ``i + 1`` never run again. The captured keyword arguments belong to that
batch (same views, same padding), which is the batch every step re-runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.reference import ACT_RELU, activation_reference
from .tail_crop import can_crop, crop_plan, cropped_features, record_kv

__all__ = ["SeqState", "seq_descent", "seq_features", "seq_state"]


@dataclass
class SeqState:
    """What the deep tail re-runs: one right-padded batch of every view of an edit.

    Attributes:
        s0: (B, L, d) residual state after the patched layer at every position.
        x: (B, L, d_in) the patched FFN's inputs at every position (float32).
        valid: (B, L) True at real (non-padding) positions.
        kwargs: what the model passed to the first tail layer besides the hidden states.
        rows: (R,) flat indices ``b * L + p`` of the label rows, in ``EditBatch.tail_rows`` order.
        first_label: (B,) each view's first label position.
    """

    s0: torch.Tensor
    x: torch.Tensor
    valid: torch.Tensor
    kwargs: dict[str, Any]
    rows: torch.Tensor
    first_label: torch.Tensor | None = None
    _croppable: bool | None = None
    _kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def croppable(self, layers: Sequence[nn.Module]) -> bool:
        """Whether the cropped re-run (:mod:`.tail_crop`) applies to this batch (checked once)."""
        if self._croppable is None:
            self._croppable = self.first_label is not None and can_crop(layers, self.kwargs, self.valid)
        return self._croppable

    def prefix_kv(self, layers: Sequence[nn.Module]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The tail layers' keys and values over the unpatched batch (recorded once)."""
        if self._kv is None:
            self._kv = record_kv(layers, self.s0, self.kwargs)
        return self._kv


def seq_state(caps: Sequence[dict[str, Any]], groups: Sequence[Sequence[int]], views: Sequence[Any]) -> SeqState:
    """The :class:`SeqState` of captured views (each cap with ``x``, ``s0_all`` and the shared
    ``tail_kwargs``), padded back to the capture batch's length; label rows in ``groups`` order."""
    L = max(c["s0_all"].shape[0] for c in caps)
    s0 = torch.stack([F.pad(c["s0_all"], (0, 0, 0, L - c["s0_all"].shape[0])) for c in caps])
    x = torch.stack([F.pad(c["x"].float(), (0, 0, 0, L - c["x"].shape[0])) for c in caps])
    valid = torch.stack([torch.arange(L, device=s0.device) < c["s0_all"].shape[0] for c in caps])
    rows = torch.cat([v * L + views[v].label_pos.to(s0.device) for g in groups for v in g])
    first = torch.stack([views[v].label_pos.min() for v in range(len(caps))]).to(s0.device)
    return SeqState(s0, x, valid, caps[0]["tail_kwargs"], rows, first)


def _run_layers(layers: Sequence[nn.Module], s: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    for layer in layers:
        out = layer(s, **kwargs)
        s = out[0] if isinstance(out, tuple) else out
    return s


def seq_features(layers: Sequence[nn.Module], norm: nn.Module, st: SeqState, K: torch.Tensor | None = None,
                 b: torch.Tensor | None = None, V: torch.Tensor | None = None, act: int = ACT_RELU,
                 s0: torch.Tensor | None = None, crop: bool = True) -> torch.Tensor:
    """(R, d) the head's input at the label rows with the patches ``(K, b, V)`` added at every
    real position of the patched layer (none: the captured state as is). ``s0`` overrides the
    captured state (for a gradient with respect to it). With ``crop`` and ReLU patches, the
    layers re-run only from each view's first firing position where that applies
    (:mod:`.tail_crop`; the same result)."""
    s = st.s0 if s0 is None else s0
    if K is not None and K.shape[0]:
        pre = st.x @ K.t() + b
        delta = activation_reference(pre, act) @ V
        delta = delta * st.valid.unsqueeze(-1).to(delta.dtype)
        # added in float32 at least (bf16 states), in the state's own precision above that
        s = (s.to(torch.promote_types(s.dtype, torch.float32)) + delta).to(st.s0.dtype)
        if crop and s0 is None and act == ACT_RELU and st.croppable(layers):
            assert st.first_label is not None
            start = crop_plan((pre > 0).any(-1), st.valid, st.first_label)
            if start is not None:
                return cropped_features(layers, norm, s, st.kwargs, st.valid, st.rows, start, st.prefix_kv(layers))
    h = norm(_run_layers(layers, s, st.kwargs))
    return h.reshape(-1, h.shape[-1])[st.rows]


def seq_descent(layers: Sequence[nn.Module], norm: nn.Module, head: Any, st: SeqState, keys: torch.Tensor,
                bias: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, act: str,
                cand: torch.Tensor | None = None) -> torch.Tensor:
    """(n, d) each neuron's descent direction of the weighted edit loss at the patched layer's
    output: ``-sum_p a_n(p) dL/ds0(p)`` over every real position ``p`` (the deep tail's version
    of :class:`~.init.GradientValue`), unnormalised."""
    with torch.no_grad():
        a = activation_reference(st.x @ keys.t() + bias, act) * st.valid.unsqueeze(-1)  # (B, L, n)
    with torch.enable_grad():
        s = st.s0.float().clone().requires_grad_(True)
        logits = head(seq_features(layers, norm, st, s0=s.to(st.s0.dtype)), cand).float()
        ce = F.cross_entropy(logits, labels, reduction="none")
        (g,) = torch.autograd.grad((ce * weight).sum(), s)
    return -(a.reshape(-1, a.shape[-1]).t() @ g.reshape(-1, g.shape[-1]))
