"""PatchedFFN forward on the CPU against its baselines, the memory roofline, and patch storage.

Groups (``group=``) are one (shape, M, P) each: ``unpatched``, ``fastpatch``, ``concat (authors)``
and ``grace codebook`` side by side, timed in the same process one after another, so their ratios
are taken within one run on one machine. Every method is checked against a float64 reference
before it is timed: a fast wrong method fails here.

- Shapes: SmolLM2-135M's gated MLP (d=576, F=1536, SiLU) and BERT-base's two-matrix FFN (d=768,
  F=3072, GELU, biases). Llama-7B shapes are GPU-only (``gpu_check.py``).
- P in {0, 100, 1,000, 10,000, 50,000}; the patches come from ``make_patches``: a patch fires on a
  few tokens only (2 per "edited" token; all tokens up to 8, then one in 8).
- M in {1, 16, 512}, plus 128 at SmolLM2 shapes (issue 2's CPU criterion).
- fp32 on the CPU, fastpatch's PyTorch backend (the one ``auto`` picks on a CPU).

Bytes each method must read (fp32, ``e`` = 4): FFN weights plus x and the output, plus
  fastpatch  P*(d+1)*e keys and biases + (firing patches)*d*e value rows;
  concat     P*(2d+1)*e (every key, bias and value, active or not);
  grace      P*d*e keys (distance to every key) + M*d*e gathered values.
"""

from __future__ import annotations

import gc

import pytest
import torch

from benchmarks import env as benv
from benchmarks.baselines import (
    ConcatPatcher, DenseFFN, GatedFFN, GraceCodebook, make_grace_codebook, make_patches,
)
from fastpatch import PatchedFFN
from fastpatch.ffn import detect_layout
from fastpatch.kernels import reference as R
from fastpatch.kernels.testing import TOLERANCES

DTYPE = torch.float32
ELEM = 4
#: name -> (d, F, form)
SHAPES = {"smollm2": (576, 1536, "gated"), "bert-base": (768, 3072, "dense")}
M_LIST = {"smollm2": (1, 16, 128, 512), "bert-base": (1, 16, 512)}
P_LIST = (0, 100, 1000, 10000, 50000)
METHODS = ("unpatched", "fastpatch", "concat (authors)", "grace codebook")
#: The untimed smoke run (no --benchmark) keeps P <= 1,000 plus P = 10,000 at M = 1; the rest
#: is marked ``full_only``.
SMOKE_MAX_P = 10000


def _cases():
    out = []
    for shape in SHAPES:
        for M in M_LIST[shape]:
            for P in P_LIST:
                for method in METHODS:
                    if P == 0 and method not in ("unpatched", "fastpatch"):
                        continue
                    big = P > SMOKE_MAX_P or (P == SMOKE_MAX_P and M > 1)
                    marks = [pytest.mark.full_only] if big else []
                    out.append(pytest.param(shape, M, P, method, marks=marks, id=f"{shape}-M{M}-P{P}-{method.split()[0]}"))
    return out


def _ffn_module(shape: str) -> torch.nn.Module:
    d, f, form = SHAPES[shape]
    torch.manual_seed(1234)
    return (GatedFFN(d, f, DTYPE) if form == "gated" else DenseFFN(d, f, DTYPE)).eval()


class _Case:
    """Everything of one (shape, M, P): inputs, the four methods, float64 references."""

    def __init__(self, shape: str, M: int, P: int, ffn: torch.nn.Module) -> None:
        d, f, form = SHAPES[shape]
        self.shape, self.M, self.P, self.d, self.f = shape, M, P, d, f
        g = torch.Generator().manual_seed(M * 7919 + P)
        # Never all-zero; unit-variance activations as after a norm layer.
        self.x = torch.randn(M, d, generator=g, dtype=DTYPE)
        self.ffn = ffn
        self.layout = lay = detect_layout(ffn)
        self.act = int(lay.act_code)
        holder = torch.nn.Module()
        holder.mlp = ffn
        self.pffn = PatchedFFN.wrap(holder, "mlp", backend="torch")
        self.holder = holder
        self.n_active = self.firing = 0
        self.keys = self.biases = self.values = None
        if P:
            self.keys, self.biases, self.values, self.n_active = make_patches(self.x, P, d)
            fire = (self.x @ self.keys.t() + self.biases) > 0
            self.firing = int(fire.any(0).sum())  # distinct patches that fire on some token
            assert 0 < self.firing <= self.n_active, f"{self.firing} patches fire, {self.n_active} were built to"
            self.pffn.add_patches(self.keys, self.biases, self.values)
            self.concat = ConcatPatcher(lay, self.keys, self.biases, self.values)
            gk, gv, self.radius, self.hits = make_grace_codebook(self.x, P, d)
            self.grace = GraceCodebook(ffn, gk, gv, self.radius)
        D = lambda t: None if t is None else t.double()  # noqa: E731
        base_kw = dict(w_gate=D(lay.w_gate), b_up=D(lay.b_up), b_gate=D(lay.b_gate), b_down=D(lay.b_down))
        x64 = self.x.double()
        self.ref_unpatched = R.patched_ffn_reference(x64, D(lay.w_up), D(lay.w_down), self.act, **base_kw)
        self.ref_patched = self.ref_unpatched
        self.ref_grace = self.ref_unpatched
        if P:
            self.ref_patched = R.patch_forward_reference(x64, D(self.keys), D(self.biases), D(self.values),
                                                         self.ref_unpatched)
            dist = torch.cdist(x64, D(gk))
            dmin, idx = dist.min(1)
            hit = (dmin < self.radius).unsqueeze(1)
            assert int(hit.sum()) == self.hits, "GRACE codebook: unexpected number of hits"
            self.ref_grace = torch.where(hit, D(gv)[idx], self.ref_unpatched)

    def method(self, name: str):
        """(callable, float64 reference) of method ``name``."""
        if name == "unpatched":
            return self.ffn, self.ref_unpatched
        if name == "fastpatch":
            return self.pffn, self.ref_patched
        if name == "concat (authors)":
            return self.concat, self.ref_patched
        if name == "grace codebook":
            return self.grace, self.ref_grace
        raise KeyError(name)

    def cost(self, name: str) -> tuple[int, int]:
        """(bytes the method must read and write, floating-point operations)."""
        d, f, M, P = self.d, self.f, self.M, self.P
        gated = SHAPES[self.shape][2] == "gated"
        w = (3 * d * f if gated else 2 * d * f + f + d) * ELEM
        io = 2 * M * d * ELEM
        flop = 2 * M * d * f * (3 if gated else 2)
        if name == "unpatched":
            return w + io, flop
        if name == "fastpatch":
            return w + io + P * (d + 1) * ELEM + self.n_active * d * ELEM, flop + 2 * M * P * d + 2 * M * self.n_active * d
        if name == "concat (authors)":
            return w + io + P * (2 * d + 1) * ELEM, flop + 4 * M * P * d
        if name == "grace codebook":
            return w + io + P * d * ELEM + M * d * ELEM, flop + 2 * M * P * d
        raise KeyError(name)


_CACHE: dict = {}


def _case(shape: str, M: int, P: int) -> _Case:
    """The current case (built once, reused by the methods of its group; older ones freed)."""
    key = (shape, M, P)
    if _CACHE.get("key") != key:
        _CACHE.pop("case", None)
        gc.collect()
        if _CACHE.get("shape") != shape:
            _CACHE["ffn"] = _ffn_module(shape)
            _CACHE["shape"] = shape
        ffn = _CACHE["ffn"]
        _CACHE["case"] = _Case(shape, M, P, ffn)
        _CACHE["key"] = key
    return _CACHE["case"]


def _check(out: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    atol, rtol = TOLERANCES[DTYPE]
    scale = max(1.0, float(ref.abs().max()))
    err = float((out.double() - ref).abs().max())
    torch.testing.assert_close(out.double(), ref, atol=atol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}")
    return err


@pytest.mark.parametrize("shape,M,P,method", _cases())
def test_ffn_forward(benchmark, bandwidth, paired, shape: str, M: int, P: int, method: str) -> None:
    case = _case(shape, M, P)
    fn, ref = case.method(method)
    x = case.x
    # Honesty: the method computes the right function before it is timed (also warms caches).
    out = fn(x)
    err = _check(out, ref, f"{method} {shape} M={M} P={P}")
    if method == "fastpatch" and P:
        assert case.pffn.num_patches == P
    nbytes, flop = case.cost(method)
    benchmark.group = f"ffn {shape} M={M} P={P}"
    benchmark.extra_info.update({
        "kind": "ffn", "shape": shape, "d": case.d, "F": case.f, "M": M, "P": P, "method": method,
        "dtype": str(DTYPE).replace("torch.", ""), "active_patches": case.n_active, "firing_patches": case.firing,
        "grace_hits": getattr(case, "hits", 0) if method == "grace codebook" else None,
        "bytes": nbytes, "flop": flop, "max_abs_err": err, "bandwidth_GBps": bandwidth["GBps"],
        "rss_bytes": benv.rss_bytes(),
    })
    benchmark(fn, x)
    if method != "unpatched":
        paired(benchmark.extra_info, lambda: fn(x), lambda: case.ffn(x))
    benchmark.extra_info["peak_rss_bytes"] = benv.peak_rss_bytes()


def test_memory_bandwidth(benchmark, bandwidth, full) -> None:
    """The roofline ceiling: a large float32 tensor copy, timed (read + write bytes counted)."""
    nbytes = bandwidth["bytes_copied"]
    a = torch.empty(nbytes // ELEM, dtype=DTYPE).normal_()
    b = torch.empty_like(a)
    b.copy_(a)
    assert torch.equal(a, b)
    benchmark.group = "memory bandwidth"
    benchmark.extra_info.update({"kind": "bandwidth", "method": "copy", "bytes": 2 * nbytes,
                                 "fixture_GBps": bandwidth["GBps"], "fixture_method": bandwidth["method"]})
    benchmark(b.copy_, a)


@pytest.mark.parametrize(
    "shape,P",
    [pytest.param(s, p, marks=[pytest.mark.full_only] if p > SMOKE_MAX_P else [], id=f"{s}-P{p}")
     for s in SHAPES for p in (10000, 50000)],
)
def test_patch_storage(benchmark, shape: str, P: int) -> None:
    """Grow a bank to P patches by edits of 5 patches (as an edit stream does) and check storage.

    Storage must be P*(2d+1) elements plus growth slack of at most 2x, and the base FFN weights
    must not be copied. Timed: the whole stream of appends (``per_add_us`` in extra_info).
    """
    d = SHAPES[shape][0]
    ffn = _ffn_module(shape)
    w_ptrs = {p.data_ptr() for p in ffn.parameters()}
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(P, d, generator=g, dtype=DTYPE) / d
    biases = torch.full((P,), -0.5, dtype=DTYPE)
    values = torch.randn(P, d, generator=g, dtype=DTYPE) / d**0.5
    chunk = 5
    state = {}

    def stream():
        holder = torch.nn.Module()
        holder.mlp = ffn
        pffn = PatchedFFN.wrap(holder, "mlp", capacity=16, backend="torch")
        for i in range(0, P, chunk):
            pffn.add_patches(keys[i:i + chunk], biases[i:i + chunk], values[i:i + chunk], edit_id=f"e{i}")
        pffn.unwrap()
        state["pffn"] = pffn

    rss0 = benv.rss_bytes()
    benchmark.pedantic(stream, rounds=3, iterations=1)
    pffn = state["pffn"]
    bank = pffn.bank
    assert bank.num_patches == P
    torch.testing.assert_close(bank.keys, keys, rtol=0, atol=0)
    storage = bank.storage_bytes()
    formula = P * (2 * d + 1) * ELEM
    slack = storage / formula
    assert 1.0 <= slack <= 2.0, f"patch storage {storage} B is {slack:.2f}x the formula P*(2d+1)*e = {formula} B"
    assert {p.data_ptr() for p in pffn.ffn.parameters()} == w_ptrs, "the base FFN weights were copied"
    benchmark.group = "patch storage"
    benchmark.extra_info.update({
        "kind": "storage", "shape": shape, "d": d, "P": P, "method": "fastpatch bank", "adds": -(-P // chunk),
        "patches_per_add": chunk, "storage_bytes": storage, "formula_bytes": formula, "slack_ratio": slack,
        "bytes_per_patch": storage / P, "formula_bytes_per_patch": (2 * d + 1) * ELEM, "capacity": bank.capacity,
        "base_weights_copied": False, "rss_delta_bytes": benv.rss_bytes() - rss0,
        "peak_rss_bytes": benv.peak_rss_bytes(),
    })
    if benchmark.stats:
        benchmark.extra_info["per_add_us"] = benchmark.stats.stats.median / benchmark.extra_info["adds"] * 1e6
