"""Compile every Triton kernel launch for a Hopper GPU (sm_90) on a machine without one.

    python benchmarks/compile_check.py [--arch 90] [--which all|default|quick]

The interpreter (``TRITON_INTERPRET=1``) runs kernels as numpy and never sees Triton's code
generator, so an error that only the compiler raises (a global that is not a ``tl.constexpr``, a
type that does not lower, a tile that needs more shared memory than the chip has) would first
show up on a lent GPU, where each minute counts. This script calls the real launchers with small
CPU tensors, records every kernel launch instead of running it, and compiles each one with
``triton.compile`` for ``GPUTarget("cuda", arch, 32)`` (ptxas ships with Triton; no driver is
needed). It reports shared memory, registers and local-memory (spill) bytes per launch
configuration, read from the cubin with the ``cuobjdump`` Triton also ships.

Exit status 1 if any launch fails to compile, needs more shared memory than ``--smem-kb`` (and
would still be launched), or has a shared-memory estimate (``fused_ffn.smem_estimate``, which the
launchers plan with) more than 15% off the compiler's figure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# This folder on the path: the atomic schedule (``kernels_atomic.py``) is compiled beside the library's.
sys.path.insert(0, str(Path(__file__).resolve().parent))

if os.environ.get("TRITON_INTERPRET") == "1":  # the real JIT is needed, not the interpreter
    raise SystemExit("compile_check needs TRITON_INTERPRET unset")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from fastpatch.kernels.testing import specialisation  # noqa: E402

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
           torch.int32: "i32", torch.int64: "i64", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
           torch.bool: "i1"}
#: Shared memory a thread block may use on sm_90 (227 KB opt-in).
SMEM_LIMIT_KB = 227
#: How far ``fused_ffn.smem_estimate`` may be from what the compiler allots.
SMEM_ESTIMATE_TOL = 0.15


@dataclass
class Launch:
    """One recorded ``kernel[grid](...)`` call: the kernel and its bound arguments."""

    fn: JITFunction
    args: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    label: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Within the block, ``JITFunction.run`` records its call instead of compiling and launching."""
    calls: list[Launch] = []
    real = JITFunction.run

    def fake(self: JITFunction, *args: Any, grid: Any, warmup: Any, **kwargs: Any) -> None:
        opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "num_ctas", "maxnreg") if k in kwargs}
        bound = dict(zip(self.arg_names, args))
        bound.update({k: v for k, v in kwargs.items() if k in self.arg_names})
        calls.append(Launch(self, bound, opts.get("num_warps", 4), opts.get("num_stages", 3)))

    JITFunction.run = fake  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        JITFunction.run = real  # type: ignore[method-assign]


def _arg_type(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return "*" + _DTYPES[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i64" if not -(2**31) <= v < 2**31 else "i32"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"cannot type kernel argument {v!r}")


def _specialisation(p: Any, v: Any) -> tuple:
    """What Triton compiles a separate kernel for: constants, types, integers equal to 1 and
    divisibility by 16 (of integers, and of pointers' addresses)."""
    if p.is_constexpr or v is None:
        return (p.name, repr(v))
    if isinstance(v, int) and not isinstance(v, bool):
        return (p.name, "1" if specialisation(v, p.do_not_specialize)[0] else _arg_type(v), _aligned(p, v))
    return (p.name, _arg_type(v), isinstance(v, torch.Tensor) and v.data_ptr() % 16 == 0)


def _aligned(p: Any, v: Any) -> bool:
    """Whether Triton tells the compiler that ``v`` is divisible by 16 (see ``specialisation``)."""
    return specialisation(v, p.do_not_specialize, getattr(p, "do_not_specialize_on_alignment", False))[1]


def _cuobjdump() -> str:
    import triton.backends.nvidia as nv

    return os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")


def compile_launch(call: Launch, arch: int = 90) -> dict[str, Any]:
    """Compile ``call`` for ``sm_<arch>``; returns its resource usage (or the error)."""
    fn = call.fn
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    sig: dict[str, str] = {}
    consts: dict[tuple[int, ...], Any] = {}
    attrs: dict[tuple[int, ...], Any] = {}
    for i, p in enumerate(fn.params):
        v = call.args.get(p.name)
        # Triton's own specialisation at launch: None and integers equal to 1 become constants,
        # integers and pointers divisible by 16 (bytes) carry that fact (it enables wide loads).
        if p.is_constexpr or v is None or specialisation(v, p.do_not_specialize)[0]:
            sig[p.name] = "constexpr"
            consts[(i,)] = v
            continue
        sig[p.name] = _arg_type(v)
        if _aligned(p, v):
            attrs[(i,)] = backend.parse_attr("D")
    row: dict[str, Any] = {"kernel": fn.__name__, "config": call.label, "warps": call.num_warps,
                           "stages": call.num_stages}
    t0 = time.perf_counter()
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=target,
                           options={"num_warps": call.num_warps, "num_stages": call.num_stages})
    except Exception as e:  # the point of this script: report it
        row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        return row
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    row["shared_kb"] = round(k.metadata.shared / 1024, 1)
    est = call.extra.get("smem_estimate")
    if est:  # the launchers plan with this estimate (fused_ffn.first_fitting / the tuner's prune)
        row["estimate_kb"] = round(est / 1024, 1)
        if abs(est - k.metadata.shared) > SMEM_ESTIMATE_TOL * k.metadata.shared:
            row["error"] = f"shared-memory estimate {row['estimate_kb']} KB is off the compiler's {row['shared_kb']} KB"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?LOCAL:(\d+)", usage)
    if m:
        row["regs"], row["stack"], row["local"] = (int(g) for g in m.groups())
    return row


def _label(cfg: Any) -> str:
    if cfg is None:
        return "fixed"
    return " ".join(f"{k.replace('BLOCK_', '')}{v}" for k, v in cfg.kwargs.items()) + f" w{cfg.num_warps} s{cfg.num_stages}"


def fused_ffn_launches(which: str = "all") -> list[Launch]:
    """Fused-FFN launches (gated and two-matrix, bf16 and fp32, 1, 5 and 33 tokens): the library's
    split schedule and the atomic one it is benchmarked against (``kernels_atomic.py``).

    ``which``: ``all`` candidates, each bucket's ``default`` (what runs where tuning is off), or
    ``quick``: one launch per code path (padded ``tl.dot`` and GEMV tiles, both FFN forms, fp32,
    both schedules)."""
    from kernels_atomic import atomic_configs_for, atomic_patched_ffn, default_atomic_config

    from fastpatch.kernels import reference as R
    from fastpatch.kernels.fused_ffn import default_split_config, fused_patched_ffn, smem_estimate, split_configs_for

    # schedule -> (launcher, candidates of M, default of (M, dtype, gated))
    schedules = {"split": (fused_patched_ffn, split_configs_for, default_split_config),
                 "atomic": (atomic_patched_ffn, atomic_configs_for, default_atomic_config)}
    out = []
    d, Fdim, P = 64, 80, 48
    for dtype in (torch.bfloat16, torch.float32):
        for gated in (True, False):
            for M in (1, 5, 33):
                if which == "quick" and (M == 33 or (dtype == torch.float32 and (M == 1 or not gated))):
                    continue
                x = torch.randn(M, d, dtype=dtype)
                w = torch.randn(Fdim, d, dtype=dtype)
                args = dict(w_gate=w if gated else None, b_up=None if gated else torch.zeros(Fdim, dtype=dtype),
                            keys=torch.randn(P, d, dtype=dtype), bias=torch.zeros(P, dtype=dtype),
                            values=torch.randn(P, d, dtype=dtype))
                for schedule, (run, candidates, default_of) in schedules.items():
                    if which == "quick" and schedule == "split" and (M == 1 or dtype == torch.float32):
                        continue
                    default = default_of(M, dtype, gated)
                    configs = [default] if which != "all" else candidates(M)
                    if which == "quick" and schedule == "atomic" and M == 1 and gated and dtype == torch.bfloat16:
                        configs.append(next(c for c in candidates(M) if c.kwargs["BLOCK_M"] == 1))
                    for c in configs:
                        with recording() as calls:
                            run(x, w, w, R.ACT_SILU if gated else R.ACT_GELU, config=c, **args)
                        for call in calls:
                            call.label = (f"{'gated' if gated else 'dense'} {str(dtype)[6:]} M={M} {schedule} "
                                          f"{_label(c)}")
                            call.extra = {"smem_estimate": smem_estimate(c, x.element_size(), gated),
                                          "default": c is default}
                        out += calls
    return out


def patch_forward_launches(which: str = "all") -> list[Launch]:
    """The patch kernels: fused (every configuration), compact and sparse value kernels."""
    from fastpatch.kernels.patch_forward import patch_configs_for, patch_forward

    out = []
    d, P = 64, 48
    for dtype in (torch.bfloat16, torch.float32) if which != "quick" else (torch.bfloat16,):
        for M in (1, 5, 65) if which != "quick" else (1, 65):
            x = torch.randn(M, d, dtype=dtype)
            keys, bias, values = torch.randn(P, d, dtype=dtype), torch.zeros(P, dtype=dtype), torch.randn(P, d, dtype=dtype)
            configs = patch_configs_for(M) if which == "all" else patch_configs_for(M)[:1]
            for c in configs:
                with recording() as calls:
                    patch_forward(x, keys, bias, values, backend="triton", strategy="fused", config=c)
                for call in calls:
                    call.label = f"{str(dtype)[6:]} M={M} {_label(c)}"
                out += calls
            for strategy in ("compact",):
                with recording() as calls:
                    try:
                        patch_forward(x, keys, bias, values, backend="triton", strategy=strategy)
                    except Exception:  # host-side steps after the first launch need real outputs
                        pass
                for call in calls:
                    call.label = f"{strategy} {str(dtype)[6:]} M={M}"
                out += calls
    return out


def patch_loss_launches() -> list[Launch]:
    """The memory-loss kernels (pre-activation pass and row gather)."""
    from fastpatch.kernels import patch_loss as PL

    out = []
    for dtype in (torch.bfloat16, torch.float32):
        mem = torch.randn(100, 64, dtype=dtype)
        keys = torch.randn(3, 64, dtype=dtype, requires_grad=True)
        bias = torch.zeros(3, dtype=dtype, requires_grad=True)
        a_e = torch.ones(3, requires_grad=True)
        with recording() as calls:
            try:
                PL.patch_memory_loss(mem, keys, bias, a_e, topk=5, backend="triton")
            except Exception:  # the recorded (not run) launches leave outputs unwritten
                pass
        for call in calls:
            call.label = str(dtype)[6:]
        out += calls
    return out


def collect(which: str = "all") -> list[Launch]:
    """Every launch of every kernel (see ``fused_ffn_launches`` for ``which``), deduplicated by
    kernel, argument types, constants and options."""
    launches: list[Launch] = []
    producers: list[Callable[[], list[Launch]]] = [
        lambda: fused_ffn_launches(which), lambda: patch_forward_launches(which), patch_loss_launches]
    with _triton_launch_path():
        for produce in producers:
            launches += produce()
    seen, unique = set(), []
    for call in launches:
        key = (call.fn.__name__, call.num_warps, call.num_stages,
               tuple(_specialisation(p, call.args.get(p.name)) for p in call.fn.params))
        if key not in seen:
            seen.add(key)
            unique.append(call)
    return unique


def check(which: str = "all", arch: int = 90, smem_kb: float = SMEM_LIMIT_KB, echo: bool = True) -> int:
    """Compile every launch of ``collect(which)``; returns how many failed.

    A failure: a compile error, a shared-memory estimate off the compiler's figure, or more
    shared memory than the chip has in a configuration the launchers would still run (a tuning
    candidate over ``fused_ffn.SMEM_BUDGET`` is pruned before compiling, so it is only noted).
    """
    from fastpatch.kernels.fused_ffn import SMEM_BUDGET

    launches = collect(which)
    if echo:
        print(f"{len(launches)} distinct launches; compiling for sm_{arch}", flush=True)
    bad = 0
    for call in launches:
        row = compile_launch(call, arch)
        err, note = row.get("error", ""), ""
        if not err and row.get("shared_kb", 0) > smem_kb:
            if call.extra.get("smem_estimate", 0) > SMEM_BUDGET and not call.extra.get("default"):
                note = "(over the chip's shared memory: the tuner prunes it)"
            else:
                err = f"needs {row['shared_kb']} KB of shared memory"
        bad += bool(err)
        if echo:
            cols = " ".join(f"{k}={row[k]}" for k in ("shared_kb", "estimate_kb", "regs", "stack", "local", "compile_s")
                            if k in row)
            print(f"{'FAIL' if err else 'ok  '} {row['kernel']:<20} {row['config']:<62} {cols} {err}{note}", flush=True)
    if echo:
        print(f"{bad} of {len(launches)} launches failed")
    return bad


@contextlib.contextmanager
def _triton_launch_path() -> Iterator[None]:
    """Make the launchers take their Triton path for CPU tensors (they record, never run)."""
    from fastpatch.kernels import dispatch, patch_forward, patch_loss

    patched = [m for m in (dispatch, patch_forward, patch_loss) if hasattr(m, "use_triton")]
    real = {m: m.use_triton for m in patched}
    for m in patched:
        m.use_triton = lambda *a, **k: True  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for m in patched:
            m.use_triton = real[m]  # type: ignore[attr-defined]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90: Hopper)")
    ap.add_argument("--smem-kb", type=float, default=SMEM_LIMIT_KB, help="shared memory a block may use")
    ap.add_argument("--which", choices=("all", "default", "quick"), default="all",
                    help="every candidate, each bucket's default, or one launch per code path")
    args = ap.parse_args()
    return 1 if check(args.which, args.arch, args.smem_kb) else 0


if __name__ == "__main__":
    sys.exit(main())
