"""The training loop of one edit: Adam on the neurons' parameters until the stopping rule holds."""

from __future__ import annotations

import torch

from .batch import EditBatch
from .handle import ModelHandle
from .memory import MemorySet
from .objective import Params, exact_flags, losses
from .types import EditorConfig

__all__ = ["train"]


def train(h: ModelHandle, cfg: EditorConfig, memory: MemorySet, batch: EditBatch, params: Params
          ) -> tuple[int, dict[str, float], list[bool]]:
    """Train ``params`` in place; return the steps taken, the last loss parts, and per request
    whether it succeeded (right as given, memory margins held).

    Stops when every view of every request is right, every neuron fires on every view and the
    memory margins hold; or, once every request is right as given with the margins held, after
    ``cfg.augment_patience`` more steps; or after ``cfg.max_steps``. With candidate tokens
    (``loss_vocab``) every decision is confirmed over the whole vocabulary first.
    """
    full = not h.fast
    plist = list(params.values())
    opt = torch.optim.Adam(plist, lr=cfg.lr, weight_decay=cfg.weight_decay)
    info: dict[str, float] = {}
    main_ok = [False] * len(batch.groups)
    margins = False
    step = 0
    settled: int | None = None  # first step at which every request is right as given
    # Full-vocabulary flags of the current parameters, if taken since the last update: one
    # check reads the whole LM head (a quarter of a CPU edit), so none is taken twice.
    exact: tuple[list[bool], list[bool]] | None = None
    for step in range(cfg.max_steps + 1):
        loss, info, correct, main_ok, margins = losses(h, cfg, memory, batch, params, full)
        # with candidates, the flags are provisional: confirmed over the whole vocabulary
        # before a decision is taken on them
        done = all(correct) and margins and batch.variants_fire
        if done and batch.cand is not None:
            exact = correct, main_ok = exact_flags(h, batch, params)
            done = all(correct)
        if done:
            break
        if all(main_ok) and margins:
            settled = step if settled is None else settled
            if step - settled >= cfg.augment_patience:
                if batch.cand is not None:
                    exact = correct, main_ok = exact or exact_flags(h, batch, params)
                if all(main_ok):
                    break  # the edit holds; stop chasing context variants
                settled = None
        if step == cfg.max_steps:
            break
        grads = torch.autograd.grad(loss, plist)
        for p, g in zip(plist, grads):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(plist, cfg.grad_clip)
        opt.step()
        exact = None
    for p in plist:
        p.requires_grad_(False)
    if batch.cand is not None:
        correct, main_ok = exact or exact_flags(h, batch, params)
    # a request succeeds when it is predicted right as given and the memory margins hold
    ok = [c and margins for c in main_ok]
    info = {k: round(v, 6) for k, v in info.items()}
    return step, info, ok
