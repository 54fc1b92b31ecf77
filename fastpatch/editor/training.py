"""The training loop of one edit: Adam on the neurons' parameters until the stopping rule holds."""

from __future__ import annotations

import dataclasses

import torch

from .batch import SUBJECT, EditBatch
from .handle import ModelHandle
from .init import init_params
from .memory import MemorySet
from .objective import Params, exact_flags, losses
from .types import EditorConfig

__all__ = ["raise_threshold", "train", "train_edit"]


def train_edit(h: ModelHandle, cfg: EditorConfig, memory: MemorySet, batch: EditBatch, n_edits: int
               ) -> tuple[Params, int, dict[str, float], list[bool], list[bool]]:
    """Initialise and train an edit's neurons: the parameters, the steps taken, the last loss
    parts, per request whether it succeeded (see :func:`train`) and per neuron whether to keep it.

    With subject neurons beside last-token ones (``key_position="both"``) each kind is initialised
    and trained on its own, as if it were the edit's only patch: trained together, the kind that
    fires on more views makes them right first and the other never learns them, so a paraphrase
    on which only the other fires would fail. A request succeeds when either kind does, and keeps
    the kinds that succeeded: a subject key that cannot be made to work (its memory margins broken
    by the subject's other facts, say) costs the edit nothing the authors' key would have given.
    Kinds that succeed alone but not together are reconciled (:func:`_reconcile`). The steps add
    up and the loss parts are the last kind's.
    """
    kinds = [[n for n, (_, j) in enumerate(batch.neurons) if (j == SUBJECT) == subj] for subj in (True, False)]
    if not all(kinds):
        params = init_params(h, cfg, memory, batch, n_edits)
        steps, info, ok = train(h, cfg, memory, batch, params)
        keep = [True] * len(batch.neurons)
        raise_threshold(h, cfg, memory, batch, params, keep, ok)
        return params, steps, info, ok, keep
    parts, steps, info = [], 0, {}
    ok = [False] * len(batch.groups)
    keep = [False] * len(batch.neurons)
    for idx in kinds:
        sub = dataclasses.replace(batch, neurons=[batch.neurons[n] for n in idx])
        if batch.cand is not None:  # its own candidates: the label rows it shares are re-indexed
            sub.set_candidates(batch.cand)
        params = init_params(h, cfg, memory, sub, n_edits)
        s, info, ok_k = train(h, cfg, memory, sub, params)
        steps += s
        for n in idx:
            keep[n] = ok_k[batch.neurons[n][0]]
        ok = [a or b for a, b in zip(ok, ok_k)]
        parts.append(params)
    order = torch.tensor([n for idx in kinds for n in idx]).argsort()
    merged = {k: torch.cat([p[k] for p in parts])[order.to(parts[0][k].device)] for k in parts[0]}
    _reconcile(h, cfg, memory, batch, merged, keep)
    raise_threshold(h, cfg, memory, batch, merged, keep, ok)
    return merged, steps, info, ok, keep


def _right_as_given(h: ModelHandle, cfg: EditorConfig, memory: MemorySet, batch: EditBatch, params: Params,
                    keep: list[bool]) -> list[bool]:
    """Per request: right as given with the kept neurons only (over the whole vocabulary on the
    fast path)."""
    mask = torch.tensor(keep, dtype=params["amp"].dtype, device=params["amp"].device)[:, None]
    kept = dict(params, amp=params["amp"] * mask)
    if h.fast:
        return exact_flags(h, batch, kept)[1]
    return losses(h, cfg, memory, batch, kept, True, with_memory=False).main_ok


@torch.no_grad()
def _reconcile(h: ModelHandle, cfg: EditorConfig, memory: MemorySet, batch: EditBatch, params: Params,
               keep: list[bool]) -> None:
    """Make the kinds that each fix a request alone fix it together (``params``/``keep`` in place).

    Each kind moves the answer by enough to overturn the argmax; both at once can overshoot into
    another token (the tail after an earlier layer is not linear). Where the sum is wrong, both
    kinds' values are halved (their mean: the keys, so the memory margins, are untouched); where
    that is wrong too, the subject neuron is dropped and the last-token ones, right alone, stay.
    """
    subj = [j == SUBJECT for _, j in batch.neurons]
    mine = [[n for n, (r, _) in enumerate(batch.neurons) if r == ri and keep[n]] for ri in range(len(batch.groups))]
    both = [ri for ri, ns in enumerate(mine) if any(subj[n] for n in ns) and not all(subj[n] for n in ns)]
    if not both:
        return
    right = _right_as_given(h, cfg, memory, batch, params, keep)
    wrong = [ri for ri in both if not right[ri]]
    if not wrong:
        return
    half = [n for ri in wrong for n in mine[ri]]
    params["amp"][half] *= 0.5
    right = _right_as_given(h, cfg, memory, batch, params, keep)
    for ri in wrong:
        if not right[ri]:
            params["amp"][mine[ri]] *= 2.0
            for n in mine[ri]:
                keep[n] = keep[n] and not subj[n]


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


@torch.no_grad()
def raise_threshold(h: ModelHandle, cfg: EditorConfig, memory: MemorySet, batch: EditBatch, params: Params,
                    keep: list[bool], ok: list[bool], tries: int = 3) -> None:
    """Raise each succeeded request's neurons' thresholds (``cfg.fire_threshold``; ``params`` in
    place): ``b -= t * a_e`` and ``amp /= 1 - t``, with ``a_e`` the neuron's pre-activation on its
    request as given where its key reads. On that input the patch adds what it added before; an
    input that drives it to less than ``t * a_e`` adds nothing, one between adds less. Memory
    margins only widen (every pre-activation drops).

    A patch can also act where it fires more weakly on its own edit (a subject key at the
    positions after the subject), so a raised threshold can leave a request wrong as given:
    such a request tries half the fraction, up to ``tries`` fractions in all, then keeps its
    neurons as trained.
    """
    t = cfg.fire_threshold
    if t <= 0 or not batch.neurons:
        return
    K, b, amp = params["keys"], params["bias"], params["amp"]
    a_e = torch.stack([batch.neuron_inputs(n)[0].to(K.dtype) @ K[n] + b[n] for n in range(len(batch.neurons))])
    owner = [r for r, _ in batch.neurons]
    movable = [keep[n] and bool(a_e[n] > 0) for n in range(len(owner))]
    pending = {r for n, r in enumerate(owner) if ok[r] and movable[n]}
    b0, amp0 = b.clone(), amp.clone()
    for _ in range(tries):
        if not pending:
            return
        for n, r in enumerate(owner):
            if r in pending and movable[n]:
                b[n], amp[n] = b0[n] - t * a_e[n], amp0[n] / (1.0 - t)
        right = _right_as_given(h, cfg, memory, batch, params, keep)
        pending = {r for r in pending if not right[r]}
        t /= 2
    for n, r in enumerate(owner):
        if r in pending:
            b[n], amp[n] = b0[n], amp0[n]
