"""The key inits of ``fastpatch.editor.init`` on synthetic FFN inputs: the calibration the
docstring promises (+1 on the weakest view, -1 on the closest memory row or hard negative), what
``view_scatter`` and ``negative_whiten`` change, and the authors' fallback."""

from __future__ import annotations

import torch

from fastpatch.editor.init import authors_key_init, memory_key_init
from fastpatch.editor.memory import MemorySet

D = 9  # odd on purpose


def _memory(n: int = 300, seed: int = 0) -> MemorySet:
    g = torch.Generator().manual_seed(seed)
    mem = MemorySet(D, torch.float32, torch.device("cpu"))
    scale = torch.linspace(0.2, 3.0, D)  # anisotropic: whitening matters
    mem.add(torch.randn(n, D, generator=g) * scale)
    return mem


def _views(center: torch.Tensor, spread: torch.Tensor, n: int = 5, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return center + torch.randn(n, D, generator=g) * spread


def _init(mem: MemorySet, views: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    q = views.mean(0, keepdim=True)
    k0, b0 = authors_key_init(q)
    return memory_key_init(mem, q, [views], k0, b0, **kw)


def _pre(x: torch.Tensor, k: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return x.double() @ k[0].double() + float(b[0])


def test_authors_init_fires_at_one_on_the_edit() -> None:
    q = torch.randn(3, D)
    k, b = authors_key_init(q)
    assert torch.allclose((q * k).sum(1), torch.ones(3), atol=1e-6) and torch.equal(b, torch.zeros(3))


def test_memory_init_puts_the_weakest_view_at_plus_one_and_the_closest_memory_at_minus_one() -> None:
    mem = _memory()
    views = _views(torch.full((D,), 4.0), torch.full((D,), 0.3))
    negatives = _views(torch.full((D,), 2.5), torch.full((D,), 0.3), n=4, seed=2)
    k, b = _init(mem, views, negatives=negatives)
    assert abs(float(_pre(views, k, b).min()) - 1.0) < 1e-4
    closest = float(torch.cat([_pre(mem.vectors, k, b), _pre(negatives, k, b)]).max())
    assert abs(closest + 1.0) < 1e-4
    # without the negatives the memory alone sets the -1, and the negatives may come closer
    k2, b2 = _init(mem, views)
    assert abs(float(_pre(mem.vectors, k2, b2).max()) + 1.0) < 1e-4


def test_inseparable_edit_keeps_the_authors_init() -> None:
    mem = _memory()
    views = mem.vectors[:3].clone()  # the edit's vectors are memory rows: no key separates them
    q = views.mean(0, keepdim=True)
    k0, b0 = authors_key_init(q)
    k, b = memory_key_init(mem, q, [views], k0, b0)
    assert torch.equal(k, k0) and torch.equal(b, b0)


def test_view_scatter_evens_the_pre_activation_across_views() -> None:
    mem = _memory()
    # views that differ strongly along one low-variance memory direction
    spread = torch.full((D,), 0.05)
    spread[0] = 1.5
    views = _views(torch.full((D,), 3.0), spread, n=6)
    even = _pre(views, *_init(mem, views, view_scatter=1.0))
    plain = _pre(views, *_init(mem, views, view_scatter=0.0))
    assert float(even.max() - even.min()) < 0.5 * float(plain.max() - plain.min())
    # either way the weakest view starts at +1
    assert abs(float(even.min()) - 1.0) < 1e-4 and abs(float(plain.min()) - 1.0) < 1e-4


def test_negative_whitening_turns_the_key_away_from_what_the_negatives_share() -> None:
    mem = _memory()
    own, shared = 4, D - 1  # the edit's own direction and the one it shares with its negatives
    center = torch.zeros(D)
    center[own], center[shared] = 12.0, 6.0
    views = _views(center, torch.full((D,), 0.1))
    g = torch.Generator().manual_seed(5)
    negatives = torch.randn(8, D, generator=g) * 0.3
    negatives[:, shared] += 6.0  # the same template about other subjects: not along `own`
    negatives[:, own] = 0.0
    share = lambda k: float(k[0, shared].abs() / k[0, own].abs())  # noqa: E731
    k_plain, b_plain = _init(mem, views, negatives=negatives, negative_whiten=0.0)
    k_white, b_white = _init(mem, views, negatives=negatives, negative_whiten=8.0)
    for k, b in ((k_plain, b_plain), (k_white, b_white)):  # both calibrated (not the authors' fallback)
        assert abs(float(_pre(views, k, b).min()) - 1.0) < 1e-4
    assert share(k_white) < 0.5 * share(k_plain)


def test_key_boundary_moves_the_zero_between_memory_and_edit() -> None:
    mem = _memory()
    views = _views(torch.full((D,), 4.0), torch.full((D,), 0.3))
    for t in (0.5, 0.25, 0.8):
        k, b = _init(mem, views, boundary=t)
        assert abs(float(_pre(views, k, b).min()) - 2 * (1 - t)) < 1e-4
        assert abs(float(_pre(mem.vectors, k, b).max()) + 2 * t) < 1e-4
