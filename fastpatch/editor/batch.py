"""What one edit trains on: its views, their captures, and the neurons (one per wrong target
position) that will become patches."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .deep_tail import SeqState, seq_state
from .encoding import Encoded

__all__ = ["SUBJECT", "EditBatch", "pick_neurons", "with_subject_neuron"]

#: The label position of a subject neuron (``EditorConfig.key_position``): it reads each view at
#: its subject's last token (``EditBatch.key_pos``) rather than before a target token.
SUBJECT = -1


@dataclass
class EditBatch:
    """What one ``edit_batch`` trains on.

    ``views`` holds every request as given followed by its context-prefixed variants;
    ``groups[r]`` lists the views of request ``r`` (its own first); ``cap[v]`` is what the
    capture forward recorded for view ``v``. Neuron ``n = (r, j)`` belongs to request ``r`` and
    reads target position ``j`` (an index into ``label_pos``) of every view of ``r``.
    """

    views: list[Encoded]
    cap: list[dict[str, torch.Tensor]]
    groups: list[list[int]]
    neurons: list[tuple[int, int]]
    _rows: dict[str, torch.Tensor] | None = None
    #: candidate-vocabulary loss: the sorted token ids the edit loss's softmax runs over (None: all)
    cand: torch.Tensor | None = None
    #: set by each loss evaluation: every neuron fires on every view (not only its request's own)
    variants_fire: bool = True
    #: hard negatives of this edit (``EditorConfig.negatives``): FFN inputs (n, d) its neurons
    #: must stay silent on, beside the memory set's; None: none
    negatives: torch.Tensor | None = None
    _mem: torch.Tensor | None = None
    _seq: SeqState | None = None
    #: ``EditorConfig.key_position`` "subject"/"both": per view, the subject's last token, which a
    #: subject neuron (label position :data:`SUBJECT`) reads; None: no view has one
    key_pos: list[int | None] | None = None

    def seq(self) -> SeqState:
        """The deep tail's batch (:mod:`.deep_tail`; captures with ``s0_all``), built once per edit."""
        if self._seq is None:
            self._seq = seq_state(self.cap, self.groups, self.views)
        return self._seq

    def as_given(self) -> EditBatch:
        """This batch with each request's own view only (its context-prefixed and other views
        left out), for checks of the requests as given: the same neurons, candidates and
        negatives; with the deep tail, the same captured state sliced (keys and values
        included). Itself when every request has one view."""
        if all(len(g) == 1 for g in self.groups):
            return self
        own = [g[0] for g in self.groups]
        sub = EditBatch([self.views[v] for v in own], [self.cap[v] for v in own], [[i] for i in range(len(own))],
                        list(self.neurons), negatives=self.negatives,
                        key_pos=None if self.key_pos is None else [self.key_pos[v] for v in own])
        if self.cand is not None:
            sub.set_candidates(self.cand)
        if self.cap and "s0_all" in self.cap[0]:
            # the captured tail arguments (mask, rotary) belong to the whole batch: sliced with it
            sub._seq = self.seq().select(own, [self.views[v].label_pos for v in own])
            if sub._seq is None:
                return self
        return sub

    def memory_rows(self, memory: torch.Tensor) -> torch.Tensor:
        """The rows the memory losses read: the memory set's, then this edit's negatives
        (concatenated once per edit)."""
        if self.negatives is None or not len(self.negatives):
            return memory
        if self._mem is None or self._mem.shape[0] != memory.shape[0] + self.negatives.shape[0]:
            self._mem = torch.cat([memory, self.negatives.to(memory.device, memory.dtype)])
        return self._mem

    def set_candidates(self, tokens: torch.Tensor) -> None:
        """Use ``tokens`` (plus every label) as the candidate vocabulary."""
        rows = self.tail_rows()
        self.cand = torch.unique(torch.cat([tokens.reshape(-1).to(rows["labels"].device), rows["labels"]]))
        rows["cand_labels"] = torch.searchsorted(self.cand, rows["labels"])

    def tail_rows(self) -> dict[str, torch.Tensor]:
        """The label rows of every view stacked (built once per edit): FFN inputs ``x``, tail
        inputs ``s0``, ``labels``, owning ``view`` and loss ``weight`` (a view's rows share
        1/(rows * views of its request), so L_edit averages positions, then views)."""
        if self._rows is None:
            xs, s0s, labels, view, weight = [], [], [], [], []
            for group in self.groups:
                for v in group:
                    enc, c = self.views[v], self.cap[v]
                    k = len(enc.labels)
                    xs.append(c["x"][enc.label_pos.to(c["x"].device)].float())
                    s0s.append(c["s0"])
                    labels.append(enc.labels)
                    view += [v] * k
                    weight += [1.0 / (k * len(group))] * k
            dev = s0s[0].device
            self._rows = {"x": torch.cat(xs), "s0": torch.cat(s0s), "labels": torch.cat(labels).to(dev),
                          "view": torch.tensor(view, device=dev), "weight": torch.tensor(weight, device=dev)}
        return self._rows

    def neuron_inputs(self, n: int) -> torch.Tensor:
        """(views of its request, d): the FFN inputs neuron ``n`` reads, its own request's first."""
        r, j = self.neurons[n]
        return torch.stack([self.cap[v]["x"][self.read_pos(v, j)] for v in self.groups[r]]).float()

    def read_pos(self, v: int, j: int) -> int:
        """The position of view ``v`` a neuron of label position ``j`` reads (its key's input):
        the subject's last token for a subject neuron (``j == SUBJECT``)."""
        if j == SUBJECT:
            if self.key_pos is None or self.key_pos[v] is None:
                raise ValueError(f"view {v} has no subject position for a subject neuron to read")
            return int(self.key_pos[v])
        return int(self.views[v].label_pos[j])


def pick_neurons(encs: list[Encoded], cap: list[dict[str, torch.Tensor]], groups: list[list[int]],
                 max_neurons: int) -> list[tuple[int, int]]:
    """``(request, label position)`` per neuron: one per position a request gets wrong as given
    (at most ``max_neurons``), or its [CLS] for a classifier.

    With context variants, a position the request gets right as given but some variant gets
    wrong gets a neuron too (after the request's own wrong positions), so every view can be made
    right; a request that is right as given is not edited.
    """
    neurons: list[tuple[int, int]] = []
    for ri, e in enumerate(encs):
        wrong_in = [(cap[v]["pred"] != e.labels.to(cap[v]["pred"].device)) for v in groups[ri]]
        own = wrong_in[0].nonzero().squeeze(1).tolist()
        if not own:
            continue
        extra = torch.stack(wrong_in).any(0).nonzero().squeeze(1).tolist()
        picked = own + [j for j in extra if j not in own]
        neurons.extend((ri, j) for j in picked[:max_neurons])
    return neurons


def with_subject_neuron(own: list[tuple[int, int]], keyed: bool, keep: bool) -> list[tuple[int, int]]:
    """A request's neurons with its subject neuron: ``own`` (its wrong target positions) replaced
    by, or (``keep``) followed by, one neuron at its subject; ``own`` as is when it is not
    subject-keyed or has nothing to fix."""
    if not keyed or not own:
        return own
    return [*own, (own[0][0], SUBJECT)] if keep else [(own[0][0], SUBJECT)]
