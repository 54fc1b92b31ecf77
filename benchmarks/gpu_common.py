"""Shared state and helpers of ``gpu_check.py``: the device, the sizes (toy ones in the dry run),
``RESULTS``, timing (``bench``, ``bench_graph``), the reference check (``close``) and the launch
configurations and names that more than one section uses.

``gpu_check.py`` puts this folder on ``sys.path`` before importing this module. ``DECODE_P`` is set
from ``--decode-p`` at run time: read it as ``gpu_common.DECODE_P``, not a copy imported by name.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from fastpatch.kernels import reference as R
from fastpatch.kernels.fused_ffn import fused_patched_ffn
from fastpatch.kernels.testing import TOLERANCES
from kernels_atomic import atomic_patched_ffn

#: FASTPATCH_GPU_CHECK_DRYRUN=1 runs every section on the CPU through TRITON_INTERPRET=1 at toy
#: sizes, to validate this script before spending lease time on it.
DRY = os.environ.get("FASTPATCH_GPU_CHECK_DRYRUN") == "1"
DEV = "cpu" if DRY else "cuda"
SHAPES = {"tiny": (64, 96 + 17)} if DRY else {"llama-7b": (4096, 11008), "smollm2": (576, 1536), "bert-base": (768, 3072)}
P_LIST = (0, 100) if DRY else (0, 100, 1000, 10000, 50000)
M_LIST = (1, 5) if DRY else (1, 16, 512)
BIG = (64, 113, 100) if DRY else (4096, 11008, 10000)  # d, F, P of the Llama-7B cases
LOSS_N = 1000 if DRY else 40000
DTYPES = (torch.float32, torch.float16) if DRY else (torch.float32, torch.bfloat16)  # no bf16 in the interpreter
LOW = torch.float16 if DRY else torch.bfloat16
DECODE_P = (1000, 10000)  # banks of the decode roofline (--decode-p)
RESULTS: dict = {"sections": {}, "failures": []}
T0 = time.time()


def log(*a) -> None:
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def bench(fn, rep: int = 40) -> dict:
    if DRY:
        t = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t) * 1e3
        return {"ms": ms, "p20_ms": ms, "p80_ms": ms}
    fn()
    torch.cuda.synchronize()
    med, lo, hi = do_bench(fn, warmup=10, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return {"ms": med, "p20_ms": lo, "p80_ms": hi}


def bench_graph(fn, rep: int = 50) -> dict:
    """Median of CUDA-graph replays of ``fn``: the device time alone, without the Python and launch
    overhead between calls (how a serving stack runs decode steps). Autotuning happens in the
    warm-up call, before capture."""
    if DRY:
        return bench(fn)
    fn()
    torch.cuda.synchronize()
    med, lo, hi = do_bench_cudagraph(fn, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return {"ms": med, "p20_ms": lo, "p80_ms": hi}


def fused_ffn_at(config, *args, **kwargs) -> torch.Tensor:
    """The fused FFN at launch configuration ``config``: the library's kernel for its own
    configurations (and ``None``), the atomic schedule (``kernels_atomic.py``) for its."""
    run = atomic_patched_ffn if config is not None and "ROTATE_N" in config.kwargs else fused_patched_ffn
    return run(*args, config=config, **kwargs)


def gated_reference(x: torch.Tensor, layout, keys=None, biases=None, values=None) -> torch.Tensor:
    """The float64 reference of a gated (SiLU) FFN ``layout`` (``detect_layout``) plus patches."""
    D = lambda t: None if t is None else t.double()  # noqa: E731
    return R.patched_ffn_reference(D(x), D(layout.w_up), D(layout.w_down), R.ACT_SILU, w_gate=D(layout.w_gate),
                                   keys=D(keys), bias=D(biases), values=D(values))


def smollm2_config(**overrides):
    """SmolLM2-135M's architecture as a ``LlamaConfig`` (random weights: latency does not depend on
    them); 2 layers and 1,000 words in the dry run."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True, **overrides)
    if DRY:
        cfg.num_hidden_layers, cfg.vocab_size = 2, 1000
    return cfg


@contextlib.contextmanager
def env_var(name: str, value: str):
    """``os.environ[name] = value`` inside the block, the old value (or none) after it."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> float:
    atol, rtol = TOLERANCES[dtype]
    out, ref = out.detach(), ref.detach()
    scale = max(1.0, float(ref.abs().max()))
    err = float((out.double() - ref.double()).abs().max())
    ok = torch.allclose(out.double(), ref.double(), atol=atol * scale, rtol=rtol)
    if not ok:
        RESULTS["failures"].append(f"{what}: max abs err {err:.3g} (atol {atol * scale:.3g})")
    return err


# ------------------------------------- launch configurations beyond the candidates, and their names
def _split_extras(M: int) -> list:
    """Split-schedule configurations timed in the sweep beside its candidates: other group sizes,
    output slices, pipeline depths and programs per SM."""
    if DRY:
        return []
    tiles = [(64, 128, 256, 4, 4, 2, 1024), (64, 128, 512, 4, 3, 2, 512), (64, 128, 256, 4, 3, 2, 256),
             (64, 128, 256, 4, 5, 2, 256), (32, 128, 256, 4, 4, 4, 256), (64, 128, 256, 8, 4, 2, 256),
             (64, 64, 256, 4, 6, 2, 256), (128, 128, 256, 8, 3, 1, 512)]
    return [triton.Config({"BLOCK_M": 16, "BLOCK_F": f, "BLOCK_D": bd, "BLOCK_N": bn, "PROGRAMS_PER_SM": pps,
                           "GROUP_F": g}, num_warps=w, num_stages=st)
            for (f, bd, bn, w, st, pps, g) in tiles]


def _sweep_extras(M: int) -> list:
    """Atomic-schedule configurations timed in the sweep beside its candidates (not candidates
    themselves): the same tiles without the rotated column order, a 2-stage pipeline, other output
    tiles, deeper pipelines and a 128-register cap."""
    if DRY:
        return []
    bm = 1 if M == 1 else 16
    tiles = [
        (16, 64, 128, 128, 4, 3, 0, 0), (16, 64, 128, 128, 4, 3, 2, 0), (16, 64, 128, 128, 4, 2, 0, 1),
        (16, 64, 128, 64, 4, 4, 0, 1), (16, 64, 128, 256, 4, 3, 0, 1), (16, 128, 64, 128, 4, 4, 1, 1),
        (16, 64, 128, 128, 4, 5, 0, 1), (16, 64, 128, 128, 4, 4, 0, 0),
        # capped at 128 registers (a few spilled): 3-4 programs per SM instead of 2
        (16, 64, 128, 128, 4, 3, 0, 1, 128), (16, 64, 64, 128, 4, 4, 3, 1, 128),
    ]
    if bm == 1:
        tiles.append((1, 32, 256, 128, 8, 2, 2, 0))
    return [triton.Config({"BLOCK_M": m, "BLOCK_F": f, "BLOCK_D": bd, "BLOCK_N": bn, "PROGRAMS_PER_SM": pps,
                           "ROTATE_N": rot}, num_warps=w, num_stages=st, maxnreg=(reg or [None])[0])
            for (m, f, bd, bn, w, st, pps, rot, *reg) in tiles]


_SHORT = {"PROGRAMS_PER_SM": "pps", "ROTATE_N": "rot", "GROUP_F": "grp"}


def _cfg_name(c) -> str:
    k = c.kwargs
    return ("split " if "GROUP_F" in k else "") + ("gemv " if k["BLOCK_M"] == 1 else f"dot{k['BLOCK_M']} ") + " ".join(
        f"{_SHORT.get(n, n.split('_')[-1])}{v}" for n, v in k.items() if n != "BLOCK_M") + \
        f" w{c.num_warps} s{c.num_stages}" + (f" r{c.maxnreg}" if getattr(c, "maxnreg", None) else "")
