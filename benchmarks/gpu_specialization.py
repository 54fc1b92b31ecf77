"""Which opt-out from Triton's specialisation slows the split fused-FFN kernel (a ``gpu_check`` section).

On the H200 (run ``2026-12-04T1750-no-specialize``), opting the split kernel out of specialising
on the sizes a stream changes made its decode step 2.0-2.3x slower, even at P = 1,000 where the
bank size was not divisible by 16 anyway; the other kernels kept their speed with the same
opt-outs, and compiling both versions for sm_90 here gives the same registers. This section
times one change at a time, so the next lease can tell which one it is:

- ``as shipped``: the kernel as the library launches it;
- ``P``, ``NG_MAX``, ``buckets`` (``M_BUCKET``, ``P_BUCKET``): that argument not specialised on;
- ``M (alignment)``: the token count keeps only its ``== 1`` specialisation;
- ``padded scratch``: the activations' scratch rows padded to a multiple of 16 elements;
- ``all``: everything the reverted commit did (1726a03).

Llama-7B FFN, bf16, P = 1,000 and 10,000, 1 and 16 tokens, CUDA-graph timing, each variant
checked against the float64 reference first.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from types import ModuleType

import torch

from fastpatch.kernels import fused_ffn as FF

VARIANTS: dict[str, dict] = {
    "as shipped": {},
    "P": {"do_not_specialize": ["P"]},
    "NG_MAX": {"do_not_specialize": ["NG_MAX"]},
    "buckets": {"do_not_specialize": ["M_BUCKET", "P_BUCKET"]},
    "M (alignment)": {"do_not_specialize_on_alignment": ["M"]},
    "padded scratch": {"pad": True},
    "all": {"do_not_specialize": ["M_BUCKET", "P_BUCKET", "P", "NG_MAX"], "do_not_specialize_on_alignment": ["M"],
            "pad": True},
}


class _PaddedTorch(types.ModuleType):
    """``torch`` as ``fused_ffn`` sees it, but ``empty(M, width)`` of the scratch buffer returns a
    view of rows padded to a multiple of 16 elements."""

    def __init__(self, width: int) -> None:
        super().__init__("torch")
        self._width = width

    def __getattr__(self, name: str):
        return getattr(torch, name)

    def empty(self, *size, **kwargs):
        if len(size) == 2 and size[1] == self._width:
            return torch.empty(size[0], -(-size[1] // 16) * 16, **kwargs)[:, : size[1]]
        return torch.empty(*size, **kwargs)


@contextlib.contextmanager
def split_variant(name: str, width: int) -> Iterator[None]:
    """Within the block, ``fused_patched_ffn`` launches variant ``name`` of the split kernel
    (``width``: F + P, the scratch rows' width)."""
    import triton

    spec = VARIANTS[name]
    tuner = FF._fused_ffn_split_kernel
    jit_kwargs = {k: v for k, v in spec.items() if k != "pad"}
    kernel = types.SimpleNamespace(fn=triton.jit(**jit_kwargs)(tuner.fn.fn)) if jit_kwargs else tuner
    saved_torch = FF.torch
    FF._fused_ffn_split_kernel = kernel
    if spec.get("pad"):
        FF.torch = _PaddedTorch(width)
    try:
        yield
    finally:
        FF._fused_ffn_split_kernel = tuner
        FF.torch = saved_torch


def split_specialization(g: ModuleType, hbm_gbs: float) -> list[dict]:
    """Each variant's CUDA-graph time at Llama-7B decode shapes, beside the kernel as shipped."""
    R = g.R
    rows = []
    dtype = g.LOW
    d, Fdim = (64, 113) if g.DRY else (4096, 11008)
    ffn = g.GatedFFN(d, Fdim, dtype=dtype, device=g.DEV).eval()
    lay = g.detect_layout(ffn)
    for P in ((7, 48) if g.DRY else (1000, 10000)):
        for M in ((1, 5) if g.DRY else (1, 16)):
            x = torch.randn(M, d, device=g.DEV, dtype=dtype)
            keys, biases, values, _ = g.make_patches(x, P, d)
            ref = g.gated_reference(x, lay, keys, biases, values)
            cfg = g.default_split_config(M, dtype)

            def call():
                return g.fused_patched_ffn(x, lay.w_up, lay.w_down, R.ACT_SILU, w_gate=lay.w_gate, keys=keys,
                                           bias=biases, values=values, config=cfg)

            shipped = None
            for name in VARIANTS:
                with torch.no_grad(), split_variant(name, Fdim + P):
                    try:
                        g.close(call(), ref, dtype, f"split variant [{name}] P={P} M={M}")
                        ms = g.bench_graph(call)["ms"]
                    except Exception as e:
                        rows.append({"P": P, "M": M, "variant": name, "error": f"{type(e).__name__}: {e}"[:160]})
                        continue
                shipped = ms if name == "as shipped" else shipped
                rows.append({"P": P, "M": M, "variant": name, "ms": ms,
                             "vs_shipped": ms / shipped if shipped else None})
                g.log(f"split variant P={P} M={M}: {rows[-1]}")
    return rows
