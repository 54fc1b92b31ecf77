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

__all__ = ["SeqState", "predict_features", "seq_descent", "seq_features", "seq_state"]


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
        """The tail layers' keys and values over the unpatched batch (recorded once: by the
        capture's prediction pass where it ran through :func:`predict_features`, else here)."""
        if self._kv is None:
            self._kv = record_kv(layers, self.s0, self.kwargs)[0]
        return self._kv

    def select(self, idx: Sequence[int], label_pos: Sequence[torch.Tensor]) -> SeqState | None:
        """Views ``idx`` of this batch alone, at the same padded length, with label rows at
        ``label_pos`` (one tensor per selected view, in order): each view's features are those it
        has in the whole batch (attention never crosses views). Recorded keys and values are
        sliced, not recorded again. None when a tail keyword argument holds a tensor whose batch
        layout is unknown (the caller then keeps the whole batch)."""
        B, L = self.valid.shape
        dev = self.s0.device
        ix = torch.as_tensor(list(idx), dtype=torch.long, device=dev)
        kwargs = _select_kwargs(self.kwargs, ix, B)
        if kwargs is None:
            return None
        rows = torch.cat([j * L + p.to(dev) for j, p in enumerate(label_pos)])
        first = None if self.first_label is None else self.first_label[ix]
        kv = None if self._kv is None else {i: (k[ix], v[ix]) for i, (k, v) in self._kv.items()}
        return SeqState(self.s0[ix], self.x[ix], self.valid[ix], kwargs, rows, first, _kv=kv)


#: Tail keyword arguments whose first dimension is the batch's (or 1: shared by every view).
_BATCHED_KWARGS = ("attention_mask", "position_ids")
#: Tail keyword arguments without a batch dimension.
_UNBATCHED_KWARGS = ("cache_position",)


def _select_kwargs(kwargs: dict[str, Any], ix: torch.Tensor, B: int) -> dict[str, Any] | None:
    """``kwargs`` with the rows ``ix`` of every batched tensor (None: a tensor of unknown layout)."""

    def rows(t: torch.Tensor) -> torch.Tensor | None:
        if B == 1 or t.shape[0] == 1:
            return t
        return t[ix] if t.shape[0] == B else None

    out: dict[str, Any] = {}
    for name, v in kwargs.items():
        if v is None or name in _UNBATCHED_KWARGS:
            out[name] = v
        elif name == "position_embeddings" and isinstance(v, tuple) and all(isinstance(t, torch.Tensor) for t in v):
            parts = tuple(rows(t) for t in v)
            if any(t is None for t in parts):
                return None
            out[name] = parts
        elif name in _BATCHED_KWARGS and isinstance(v, torch.Tensor):
            got = rows(v)
            if got is None:
                return None
            out[name] = got
        elif isinstance(v, torch.Tensor) or (isinstance(v, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in v)):
            return None  # a tensor argument this does not know how to slice
        else:
            out[name] = v
    return out


def seq_state(caps: Sequence[dict[str, Any]], groups: Sequence[Sequence[int]], views: Sequence[Any]) -> SeqState:
    """The :class:`SeqState` of captured views (each cap with ``x``, ``s0_all`` and the shared
    ``tail_kwargs``), padded back to the capture batch's length; label rows in ``groups`` order."""
    L = max(c["s0_all"].shape[0] for c in caps)
    s0 = torch.stack([F.pad(c["s0_all"], (0, 0, 0, L - c["s0_all"].shape[0])) for c in caps])
    x = torch.stack([F.pad(c["x"].float(), (0, 0, 0, L - c["x"].shape[0])) for c in caps])
    valid = torch.stack([torch.arange(L, device=s0.device) < c["s0_all"].shape[0] for c in caps])
    rows = torch.cat([v * L + views[v].label_pos.to(s0.device) for g in groups for v in g])
    first = torch.stack([views[v].label_pos.min() for v in range(len(caps))]).to(s0.device)
    return SeqState(s0, x, valid, caps[0]["tail_kwargs"], rows, first, _kv=_captured_kv(caps))


def _captured_kv(caps: Sequence[dict[str, Any]]) -> dict[int, tuple[torch.Tensor, torch.Tensor]] | None:
    """The keys and values the capture's prediction pass recorded, when ``caps`` are that whole
    batch in its order (else None: recorded again when needed)."""
    kv = caps[0].get("tail_kv")
    if kv is None or not kv or any(c.get("tail_kv") is not kv or c.get("tail_index") != i for i, c in enumerate(caps)):
        return None
    first = next(iter(kv.values()))[0]
    return kv if first.shape[0] == len(caps) else None


def predict_features(layers: Sequence[nn.Module], norm: nn.Module, st: SeqState) -> torch.Tensor:
    """(R, d) the head's input at the label rows of the unpatched batch (the capture's
    predictions); where the crop applies, the same pass records the keys and values it reads
    (``st.prefix_kv``), so no training step runs the full batch again."""
    if st._kv is None and st.croppable(layers):
        st._kv, s = record_kv(layers, st.s0, st.kwargs)
        h = norm(s)
        return h.reshape(-1, h.shape[-1])[st.rows]
    return seq_features(layers, norm, st)


def _run_layers(layers: Sequence[nn.Module], s: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    for layer in layers:
        out = layer(s, **kwargs)
        s = out[0] if isinstance(out, tuple) else out
    return s


def seq_features(layers: Sequence[nn.Module], norm: nn.Module, st: SeqState, K: torch.Tensor | None = None,
                 b: torch.Tensor | None = None, V: torch.Tensor | None = None, act: int = ACT_RELU,
                 s0: torch.Tensor | None = None, crop: bool = True, scale: torch.Tensor | None = None) -> torch.Tensor:
    """(R, d) the head's input at the label rows with the patches ``(K, b, V)`` added at every
    real position of the patched layer (none: the captured state as is). ``s0`` overrides the
    captured state (for a gradient with respect to it); ``scale`` (B,) multiplies each view's
    patch output (one batch, several value sizes). With ``crop`` and ReLU patches, the
    layers re-run only from each view's first firing position where that applies
    (:mod:`.tail_crop`; the same result)."""
    s = st.s0 if s0 is None else s0
    if K is not None and K.shape[0]:
        pre = st.x @ K.t() + b
        delta = activation_reference(pre, act) @ V
        delta = delta * st.valid.unsqueeze(-1).to(delta.dtype)
        if scale is not None:
            delta = delta * scale.to(delta.dtype)[:, None, None]
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
                cand: torch.Tensor | None = None, crop: bool = True) -> torch.Tensor:
    """(n, d) each neuron's descent direction of the weighted edit loss at the patched layer's
    output: ``-sum_p a_n(p) dL/ds0(p)`` over every real position ``p`` (the deep tail's version
    of :class:`~.init.GradientValue`), unnormalised."""
    with torch.no_grad():
        a = activation_reference(st.x @ keys.t() + bias, act) * st.valid.unsqueeze(-1)  # (B, L, n)
    # positions where no neuron is active add nothing: where the crop applies, the gradient is
    # taken from each view's first active (or label) position on only (the same sum)
    start = crop_plan((a != 0).any(-1), st.valid, st.first_label) if crop and st.croppable(layers) else None
    with torch.enable_grad():
        s = st.s0.to(torch.promote_types(st.s0.dtype, torch.float32)).clone().requires_grad_(True)
        s_in = s.to(st.s0.dtype)
        if start is not None:
            feats = cropped_features(layers, norm, s_in, st.kwargs, st.valid, st.rows, start, st.prefix_kv(layers))
        else:
            feats = seq_features(layers, norm, st, s0=s_in)
        logits = head(feats, cand).float()
        ce = F.cross_entropy(logits, labels, reduction="none")
        (g,) = torch.autograd.grad((ce * weight).sum(), s)
    return -(a.reshape(-1, a.shape[-1]).t() @ g.reshape(-1, g.shape[-1]).to(a.dtype))
