"""The objective: ``L = L_edit + alc * L_act + mlc * (L_m1 + L_m2)`` and the "right" flags.

L_edit runs through the tail only on the fast path (one call over every view's label rows), or
through a full forward per view otherwise; the memory losses use the fused kernel
(``kernels/patch_loss.py``), which reads the memory matrix once per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels.patch_loss import patch_memory_loss
from ..kernels.reference import activation_reference
from .batch import EditBatch
from .deep_tail import seq_features
from .handle import ModelHandle
from .memory import MemorySet
from .types import EditorConfig

__all__ = ["LossEval", "Params", "exact_flags", "final", "label_logits", "losses"]

#: The trained tensors of one edit: ``keys`` (n, d), ``bias`` (n,), ``v_dir`` (n, d_out), ``amp`` (n, 1).
Params = dict[str, torch.Tensor]


@dataclass
class LossEval:
    """One evaluation of the objective.

    Attributes:
        loss: the total loss (a scalar tensor with its graph).
        info: its parts as floats (``loss``, ``edit``, ``act``, ``m1``, ``m2``).
        correct: per request, every view right.
        main_ok: per request, right as given.
        margins: every neuron fires on its request as given and stays below 0 on the memory.
    """

    loss: torch.Tensor
    info: dict[str, float]
    correct: list[bool]
    main_ok: list[bool]
    margins: bool

    def __iter__(self):  # unpacks as (loss, info, correct, main_ok, margins)
        return iter((self.loss, self.info, self.correct, self.main_ok, self.margins))


def final(params: Params) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(K, b, V)`` of the patches the parameters describe (``V = amp * v_dir``)."""
    return params["keys"], params["bias"], params["amp"] * params["v_dir"]


def losses(h: ModelHandle, cfg: EditorConfig, memory: MemorySet, batch: EditBatch, params: Params,
           full_forward: bool, with_memory: bool = True) -> LossEval:
    """One evaluation of L = L_edit + alc L_act + mlc (L_m1 + L_m2).

    L_edit is each request's loss averaged over its views; L_act takes the top-k over every
    (neuron, view) pre-activation, and L_m1 compares the memory with each neuron's weakest
    view. Sets ``batch.variants_fire`` (every neuron fires on every view).
    """
    K, b, V = final(params)
    if full_forward:
        l_edit, ok_view = _edit_loss_full(h, cfg, batch, K, b, V)
    else:
        l_edit, ok_view = _edit_loss_tail(h, cfg, batch, K, b, V)
    correct = [all(ok_view[v] for v in g) for g in batch.groups]
    main_ok = [ok_view[g[0]] for g in batch.groups]
    a_views = [batch.neuron_inputs(n) @ K[n] + b[n] for n in range(len(batch.neurons))]
    a_all = torch.cat(a_views)
    a_edit = torch.stack([a.min() for a in a_views])  # each neuron's weakest view
    l_act = torch.exp(-a_all).topk(min(cfg.act_topk, a_all.numel())).values.mean()
    stats: dict[str, torch.Tensor] = {}
    mem = batch.memory_rows(memory.vectors)
    if mem.shape[0] and with_memory:
        m1, m2 = patch_memory_loss(mem, K.to(mem.dtype), b.to(mem.dtype), a_edit, cfg.mem_topk, cfg.margin,
                                   stats=stats)
        l_m1, l_m2 = m1.mean(), m2.mean()
        mem_silent = bool((stats["mem_max"] < 0).all())
    else:
        l_m1 = l_m2 = torch.zeros((), device=K.device)
        mem_silent = True
    loss = l_edit + cfg.alc * l_act + cfg.mlc * (l_m1 + l_m2)
    # success needs every neuron to fire on its request as given (the first view); the
    # context variants are pursued (L_act, the stopping rule) but never required
    fires_own = bool(torch.stack([a[0] for a in a_views]).gt(0).all())
    batch.variants_fire = bool((a_all > 0).all())
    info = {k: float(v.detach()) for k, v in
            (("loss", loss), ("edit", l_edit), ("act", l_act), ("m1", l_m1), ("m2", l_m2))}
    return LossEval(loss, info, correct, main_ok, fires_own and mem_silent)


def _edit_loss_full(h: ModelHandle, cfg: EditorConfig, batch: EditBatch, K: torch.Tensor, b: torch.Tensor,
                    V: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
    """L_edit through a full forward per view (families without a tail adapter)."""
    enc_task = h.encoder
    smooth = enc_task.label_smoothing(cfg.label_smoothing)
    l_edit = torch.zeros((), device=K.device)
    ok: list[bool] = []
    for group in batch.groups:
        for v in group:
            enc = batch.views[v]
            with h.ffn.training_patches(K, b, V):
                out = h.forward(enc.inputs)
            logits = enc_task.rows(out.logits[0], enc).float()
            labels = enc.labels.to(logits.device)
            l_edit = l_edit + F.cross_entropy(logits, labels, label_smoothing=smooth) / len(group)
            ok.append(bool((logits.argmax(-1) == labels).all()))
    return l_edit, ok


def _views_right(batch: EditBatch, hit: torch.Tensor, view: torch.Tensor) -> list[bool]:
    """Per view: every one of its label rows hit."""
    wrong = torch.zeros(len(batch.views), dtype=torch.long, device=hit.device).index_add_(0, view, (~hit).long())
    return (wrong == 0).tolist()


def _edit_loss_tail(h: ModelHandle, cfg: EditorConfig, batch: EditBatch, K: torch.Tensor, b: torch.Tensor,
                    V: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
    """L_edit on the fast path: one tail call over the label rows of every view.

    The tail's head reads its whole weight matrix whatever the number of rows, so the views
    and requests share one call (and one backward) per step. With candidates
    (``config.loss_vocab``) the softmax runs over those tokens only, and the "right" flags
    are provisional until :func:`exact_flags` confirms them over the whole vocabulary.
    """
    rows = batch.tail_rows()
    logits = label_logits(h, batch, K, b, V, batch.cand).float()
    labels = rows["cand_labels"] if batch.cand is not None else rows["labels"]
    smooth = h.encoder.label_smoothing(cfg.label_smoothing)
    ce = F.cross_entropy(logits, labels, label_smoothing=smooth, reduction="none")
    l_edit = (ce * rows["weight"]).sum()
    hit = (logits.argmax(-1) == labels).detach()
    return l_edit, _views_right(batch, hit, rows["view"])


def label_logits(h: ModelHandle, batch: EditBatch, K: torch.Tensor, b: torch.Tensor, V: torch.Tensor,
                 cand: torch.Tensor | None = None) -> torch.Tensor:
    """(rows, vocab or candidates) logits at every view's label rows with the patches ``(K, b, V)``
    added: ``tail(s0 + delta)`` at those rows, or with the deep tail (:mod:`.deep_tail`) the layers
    after the patched one re-run over every position. ``cand``: the candidate tokens only."""
    ad = h.adapter
    if ad.deep:
        feats = seq_features(ad.seq_layers, ad.features, batch.seq(), K, b, V, h.ffn.patch_act)
        return ad.head(feats, cand)
    rows = batch.tail_rows()
    delta = activation_reference(rows["x"] @ K.t() + b, h.ffn.patch_act) @ V
    s0 = rows["s0"]
    s = (s0.float() + delta).to(s0.dtype)
    if cand is not None:
        return ad.head(ad.features(s), cand)
    return ad.tail(s)


@torch.no_grad()
def exact_flags(h: ModelHandle, batch: EditBatch, params: Params) -> tuple[list[bool], list[bool]]:
    """Per request: every view right, and right as given, over the whole vocabulary.

    A token outside the candidates that beats the target joins the candidates, so the next
    steps push it down too.
    """
    K, b, V = final(params)
    rows = batch.tail_rows()
    pred = label_logits(h, batch, K, b, V).argmax(-1)
    hit = pred == rows["labels"]
    if batch.cand is not None and not bool(hit.all()):
        batch.set_candidates(torch.cat([batch.cand, pred[~hit]]))
    ok_view = _views_right(batch, hit, rows["view"])
    return [all(ok_view[v] for v in g) for g in batch.groups], [ok_view[g[0]] for g in batch.groups]
