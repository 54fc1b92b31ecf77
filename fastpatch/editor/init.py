"""Init strategies of a patch: one small function or class each (as PEFT's ``tuners/lora/variants.py``).

Keys and biases (``EditorConfig.init``):

* ``"authors"`` -- :func:`authors_key_init`: ``k = q/||q||^2``, ``b = 0``.
* ``"memory"`` -- :func:`memory_key_init`: the key along the memory-whitened direction of the
  edit, the bias between edit and memory.

Values (``EditorConfig.value_init``), each a :class:`ValueInit` in :data:`VALUE_INITS`:

* ``"random"`` -- :class:`RandomValue`: a random direction times the amplifier (the authors').
* ``"unembed"`` -- :class:`UnembedValue`: the target token's output embedding minus the
  predicted one's, then :func:`search_amplifier`.
* ``"gradient"`` -- :class:`GradientValue`: the descent direction of the edit loss at the tail
  input, then :func:`search_amplifier`. Needs the fast path: without it, ``"unembed"`` without
  the search (see :func:`value_init_for`).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from ..kernels.patch_loss import patch_preactivations
from ..kernels.reference import activation_reference
from .batch import EditBatch
from .deep_tail import seq_descent, seq_features
from .handle import ModelHandle
from .memory import MemorySet
from .objective import Params, exact_flags, final, losses
from .types import EditorConfig

__all__ = [
    "VALUE_INITS",
    "GradientValue",
    "RandomValue",
    "UnembedValue",
    "ValueInit",
    "authors_key_init",
    "init_params",
    "memory_key_init",
    "search_amplifier",
    "value_init_for",
]

log = logging.getLogger("fastpatch.editor")

# ---------------------------------------------------------------------------- keys and biases
def authors_key_init(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' key ``q/||q||^2`` (pre-activation 1 on the edit) and a zero bias."""
    keys = q / q.pow(2).sum(1, keepdim=True).clamp_min(1e-12)
    return keys, torch.zeros(len(q), device=q.device)


@torch.no_grad()
def memory_key_init(memory: MemorySet, q: torch.Tensor, qs: list[torch.Tensor], keys: torch.Tensor,
                    bias: torch.Tensor, negatives: torch.Tensor | None = None,
                    negative_whiten: float = 0.0, view_scatter: float = 1.0,
                    boundary: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Key along the memory-whitened direction of the edit, bias between edit and memory.

    ``u = (C + lam I)^-1 (q - mu)`` (the linear discriminant of the edit vector against the
    memory's mean ``mu`` and covariance ``C``; ``q`` is the mean over the request's views):
    plain ``q - mu`` is dominated by the few high-variance directions (attention-sink
    positions) where memory vectors have huge projections. The key is scaled and the bias
    set so that the patch starts at pre-activation at least ``2 (1 - boundary)`` on every view
    of its edit and at most ``-2 boundary`` on every memory vector (+1 and -1 at the default
    0.5: the zero halfway); where the memory does not separate from the edit along ``u``, the
    authors' init is kept.

    ``negatives`` (the edit's hard negatives) count as memory vectors for the margin; with
    ``negative_whiten`` their scatter around ``mu`` joins ``C`` (Woodbury on the shared
    factorisation), so ``u`` turns away from the directions the edit shares with them.
    """
    mem = memory.vectors if negatives is None else torch.cat([memory.vectors, negatives.to(memory.vectors.dtype)])
    mu, cov = memory.moments()
    lam = 1e-2 * float(cov.diagonal().mean()) + 1e-8
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    chol = torch.linalg.cholesky(cov + lam * eye)  # one factorisation, shared by every neuron
    solve = _woodbury_solver(chol, negatives, mu, negative_whiten)
    rhs = (q.double() - mu).t()  # (d, n)
    u = solve(rhs).t()  # (n, d)
    if view_scatter > 0 and any(x.shape[0] > 1 for x in qs):
        # The views' own scatter S = U U^T (rank < views) joins the covariance, so the patch
        # fires about equally on every view: Woodbury on the shared factorisation,
        # (A + U U^T)^-1 r = A^-1 r - A^-1 U (I + U^T A^-1 U)^-1 U^T A^-1 r.
        for n, x in enumerate(qs):
            if x.shape[0] < 2:
                continue
            dx = x.double() - x.double().mean(0)
            U = dx.t() * math.sqrt(view_scatter / x.shape[0])  # (d, views)
            AiU = solve(U)
            small = torch.eye(U.shape[1], dtype=U.dtype, device=U.device) + U.t() @ AiU
            u[n] = u[n] - AiU @ torch.linalg.solve(small, U.t() @ u[n])
    u = (u / u.norm(dim=1, keepdim=True).clamp_min(1e-30)).float()
    a_q = torch.stack([(x @ u[n]).min() for n, x in enumerate(qs)])  # weakest view
    a_mem = patch_preactivations(mem, u.to(mem.dtype), torch.zeros(len(u), device=u.device, dtype=mem.dtype))
    m_max = a_mem.float().max(0).values
    gap = a_q - m_max
    good = gap > 1e-6 * a_q.abs().clamp_min(1.0)
    c = 2.0 / gap.clamp_min(1e-12)
    k_new = c[:, None] * u
    b_new = -c * ((1.0 - boundary) * m_max + boundary * a_q)  # at 0.5 exactly -c (a_q + m_max) / 2
    keys = torch.where(good[:, None], k_new, keys)
    bias = torch.where(good, b_new, bias)
    return keys, bias


def _woodbury_solver(chol: torch.Tensor, negatives: torch.Tensor | None, mu: torch.Tensor, weight: float):
    """``r -> (A + N N^T)^-1 r`` for ``A = chol chol^T`` and ``N`` the negatives' deviations from
    ``mu`` scaled by ``sqrt(weight / count)`` (just ``A^-1 r`` without negatives or weight)."""
    if negatives is None or not len(negatives) or weight <= 0:
        return lambda r: torch.cholesky_solve(r, chol)
    N = (negatives.double() - mu).t() * math.sqrt(weight / negatives.shape[0])  # (d, m)
    AiN = torch.cholesky_solve(N, chol)
    small = torch.eye(N.shape[1], dtype=N.dtype, device=N.device) + N.t() @ AiN

    def solve(r: torch.Tensor) -> torch.Tensor:
        Air = torch.cholesky_solve(r, chol)
        return Air - AiN @ torch.linalg.solve(small, N.t() @ Air)

    return solve


# ------------------------------------------------------------------------------------- values
class ValueInit:
    """A value init: the direction of each neuron's value, before the amplifier."""

    #: the amplifier is then searched (:func:`search_amplifier`, fast path only)
    searches_amplifier = False

    def __call__(self, h: ModelHandle, batch: EditBatch, keys: torch.Tensor, bias: torch.Tensor,
                 v_dir: torch.Tensor) -> torch.Tensor:
        """``(n, d_out)`` value directions, given the random ones ``v_dir``."""
        return v_dir


class RandomValue(ValueInit):
    """The authors': the random direction itself."""


class UnembedValue(ValueInit):
    """Along the target token's output embedding minus the predicted one's."""

    searches_amplifier = True

    @torch.no_grad()
    def __call__(self, h: ModelHandle, batch: EditBatch, keys: torch.Tensor, bias: torch.Tensor,
                 v_dir: torch.Tensor) -> torch.Tensor:
        head = h.model.get_output_embeddings()
        if head is None:
            return v_dir
        W = head.weight
        out = v_dir.clone()
        for n, (ri, j) in enumerate(batch.neurons):
            j = max(j, 0)  # a subject neuron pushes the first target token
            t = int(batch.views[batch.groups[ri][0]].labels[j])
            # the wrong prediction to push away from: the request's own, else its first wrong view's
            preds = [int(batch.cap[v]["pred"][j]) for v in batch.groups[ri]]
            p = next((x for x in preds if x != t), preds[0])
            u = (W[t] - W[p]).float()
            out[n] = u / u.norm().clamp_min(1e-12)
        return out


class GradientValue(UnembedValue):
    """Each value along the descent direction of L_edit at the tail input, summed over the rows
    its neuron fires on (weighted by its activation there): one tail forward and backward.
    Unlike the unembedding difference, it accounts for the final norm and for every view's own
    wrong prediction. Starts from the unembedding direction (where the descent is zero)."""

    def __call__(self, h: ModelHandle, batch: EditBatch, keys: torch.Tensor, bias: torch.Tensor,
                 v_dir: torch.Tensor) -> torch.Tensor:
        v_dir = super().__call__(h, batch, keys, bias, v_dir)
        d = self._deep_descent(h, batch, keys, bias) if h.adapter.deep else self._descent(h, batch, keys, bias)
        norm = d.norm(dim=1, keepdim=True)
        return torch.where(norm > 0, d / norm.clamp_min(1e-30), v_dir)

    @staticmethod
    def _deep_descent(h: ModelHandle, batch: EditBatch, keys: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Every position's gradient, through the layers after the patched one (:mod:`.deep_tail`)."""
        rows, ad, cand = batch.tail_rows(), h.adapter, batch.cand
        labels = rows["cand_labels"] if cand is not None else rows["labels"]
        return seq_descent(ad.seq_layers, ad.features, ad.head, batch.seq(), keys, bias, labels, rows["weight"],
                           h.ffn.patch_act, cand)

    @staticmethod
    def _descent(h: ModelHandle, batch: EditBatch, keys: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The gradient at the label rows through the position-wise tail."""
        rows = batch.tail_rows()
        with torch.no_grad():
            a = activation_reference(rows["x"] @ keys.t() + bias, h.ffn.patch_act)  # (rows, n)
        with torch.enable_grad():
            s = rows["s0"].float().clone().requires_grad_(True)
            s_in = s.to(rows["s0"].dtype)
            if batch.cand is not None:  # the candidate-vocabulary loss: no pass over the whole head
                logits, labels = h.adapter.head(h.adapter.features(s_in), batch.cand), rows["cand_labels"]
            else:
                logits, labels = h.adapter.tail(s_in), rows["labels"]
            ce = F.cross_entropy(logits.float(), labels, reduction="none")
            (g,) = torch.autograd.grad((ce * rows["weight"]).sum(), s)
        return -(a.t() @ g)


VALUE_INITS: dict[str, ValueInit] = {"random": RandomValue(), "unembed": UnembedValue(), "gradient": GradientValue()}


def value_init_for(h: ModelHandle, cfg: EditorConfig) -> ValueInit:
    """The value init the editor uses: ``cfg.value_init``, except that classifiers (no output
    embedding) use ``"random"`` and ``"gradient"`` off the fast path uses ``"unembed"`` without
    the amplifier search (documented in :class:`~fastpatch.editor.types.MethodSettings`)."""
    if not h.encoder.has_vocab:
        return VALUE_INITS["random"]
    if cfg.value_init in ("unembed", "gradient") and not h.fast:
        return _UNEMBED_NO_SEARCH
    return VALUE_INITS[cfg.value_init]


class _UnembedNoSearch(UnembedValue):
    searches_amplifier = False


_UNEMBED_NO_SEARCH = _UnembedNoSearch()


@torch.no_grad()
def search_amplifier(h: ModelHandle, cfg: EditorConfig, memory: MemorySet, batch: EditBatch, params: Params,
                     max_doublings: int = 10) -> int | None:
    """Set the amplifiers to the smallest ``amp * 2**k`` (``k < max_doublings``) that makes every
    request predicted right as given, times ``config.value_margin``; return ``k`` (None, and
    ``amp * 2**max_doublings``, when none does).

    Tail-only evaluations: a few replace the many Adam steps it takes to grow a too-small value
    from the authors' amplifier of 10. With the deep tail every doubling is evaluated in one
    batched re-run (:func:`_doubling_logits`; on a CPU a step costs about the same for one view
    or ten, and on the benchmarks most searches try every doubling), then read in order as the
    doubling loop would. Context variants are not searched for (nor run:
    :meth:`~.batch.EditBatch.as_given`): pushed further along the unembedding direction, the
    final norm saturates and other tokens win; training (up to ``config.augment_patience``
    steps) takes them from there.
    """
    own = batch.as_given()  # only the requests as given are checked: their views alone are run
    base = params["amp"].clone()
    try:
        grid = _doubling_logits(h, own, params, max_doublings) if h.adapter.deep else None
        k, loss = _first_right(h, cfg, memory, own, params, base, max_doublings, grid)
        if k is not None:
            # Barely right on the edit is too weak where a paraphrase fires less strongly.
            params["amp"] = base * 2.0 ** k * cfg.value_margin
        elif cfg.amplifier_fallback == "lowest_loss":
            params["amp"] = base * 2.0 ** min(range(len(loss)), key=loss.__getitem__)
        else:
            params["amp"] = base * 2.0 ** max_doublings
        return k
    finally:
        if own is not batch and own.cand is not None and batch.cand is not None and len(own.cand) > len(batch.cand):
            batch.set_candidates(own.cand)  # tokens that beat a target joined the candidates


def _first_right(h: ModelHandle, cfg: EditorConfig, memory: MemorySet, own: EditBatch, params: Params,
                 base: torch.Tensor, max_doublings: int, grid: torch.Tensor | None) -> tuple[int | None, list[float]]:
    """The first doubling ``k`` at which every request is right as given, as the loop of
    single evaluations decides it (the candidates' argmax, then the whole vocabulary's, tokens
    that beat a target joining the candidates), and the edit loss at each doubling evaluated;
    ``grid``: every doubling's whole-vocabulary logits at the label rows (M, rows, vocab), else
    each is evaluated in turn."""
    rows = own.tail_rows()
    labels = rows["labels"]
    smooth = h.encoder.label_smoothing(cfg.label_smoothing)
    loss: list[float] = []
    for k in range(max_doublings):
        if grid is None:
            params["amp"] = base * 2.0 ** k
            ev = losses(h, cfg, memory, own, params, False, with_memory=False)
            loss.append(ev.info["edit"])
            ok = all(ev.main_ok)
            if own.cand is not None and ok:
                ok = all(exact_flags(h, own, params)[1])
        else:
            logits = grid[k]
            # the edit loss as training computes it (over the candidates, when there are any)
            lg, lab = (logits[:, own.cand], rows["cand_labels"]) if own.cand is not None else (logits, labels)
            ce = F.cross_entropy(lg.float(), lab, label_smoothing=smooth, reduction="none")
            loss.append(float((ce * rows["weight"]).sum()))
            ok = own.cand is None or bool((own.cand[logits[:, own.cand].argmax(-1)] == labels).all())
            if ok:
                pred = logits.argmax(-1)
                hit = pred == labels
                ok = bool(hit.all())
                if not ok and own.cand is not None:
                    own.set_candidates(torch.cat([own.cand, pred[~hit]]))
        if ok:
            return k, loss
    return None, loss


def _doubling_logits(h: ModelHandle, own: EditBatch, params: Params, max_doublings: int) -> torch.Tensor | None:
    """(M, rows, vocab) the whole-vocabulary logits at ``own``'s label rows with the patches'
    values doubled ``k = 0 .. M-1`` times: the views repeated once per doubling in one deep-tail
    re-run (None where the captured state cannot be sliced)."""
    st = own.seq()
    n = st.valid.shape[0]
    idx = [v for _ in range(max_doublings) for v in range(n)]
    big = st.select(idx, [own.views[v].label_pos for v in idx])
    if big is None:
        return None
    K, b, V = final(params)
    scale = (2.0 ** torch.arange(max_doublings, device=V.device, dtype=V.dtype)).repeat_interleave(n)
    ad = h.adapter
    feats = seq_features(ad.seq_layers, ad.features, big, K, b, V, h.ffn.patch_act, scale=scale)
    logits = ad.head(feats, None)
    return logits.reshape(max_doublings, -1, logits.shape[-1])


def init_params(h: ModelHandle, cfg: EditorConfig, memory: MemorySet, batch: EditBatch, n_edits: int) -> Params:
    """The starting parameters of an edit's neurons (``requires_grad`` set), from the configured
    key and value inits; ``n_edits`` (edits so far) seeds the random value direction."""
    d_out = h.ffn.bank.d_out
    qs = [batch.neuron_inputs(n) for n in range(len(batch.neurons))]  # each (views, d)
    q = torch.stack([x.mean(0) for x in qs])  # (n, d)
    keys, bias = authors_key_init(q)
    if cfg.init == "memory" and len(memory) > 0:
        keys, bias = memory_key_init(memory, q, qs, keys, bias, batch.negatives, cfg.negative_whiten,
                                     cfg.view_scatter, cfg.key_boundary)
    g = torch.Generator(device="cpu").manual_seed(cfg.seed + n_edits)
    v_dir = (torch.randn(len(qs), d_out, generator=g) / math.sqrt(d_out)).to(q.device)
    value = value_init_for(h, cfg)
    v_dir = value(h, batch, keys, bias, v_dir)
    amp = torch.full((len(qs), 1), cfg.amplifier, device=q.device)
    params = {"keys": keys, "bias": bias, "v_dir": v_dir, "amp": amp}
    if value.searches_amplifier:
        search_amplifier(h, cfg, memory, batch, params)
    return {k: t.clone().requires_grad_(True) for k, t in params.items()}
