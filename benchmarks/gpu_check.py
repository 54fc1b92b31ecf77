"""One prepared GPU check: CUDA correctness of every kernel, then the benchmark table.

    python benchmarks/gpu_check.py --out benchmarks/results/<card>

Fits a 15-minute lease with room to rerun (target: under 5 minutes). Sections:

0. precompile: every launch configuration the run will use, compiled in 16 worker processes
   (Triton's disk cache then serves the tuner and the checks);
1. environment and the measured HBM bandwidth (a large device-to-device copy);
2. correctness: every Triton kernel against its float64 reference, fp32 and bf16, odd shapes;
3. the decode roofline: Llama-7B FFN, bf16, P = 1,000 / 10,000, M = 1 / 16 tokens: PatchedFFN,
   the fused kernel alone, cuBLAS + patch kernel and the authors' concatenation, timed eagerly
   and as CUDA-graph replays, against the bytes each must read (% of HBM, speed-up);
3a. patched FFN latency: fastpatch (fused / unfused) against the unpatched FFN, the authors'
   concatenated-Linear T-Patcher and a GRACE-style codebook, at SmolLM2, BERT-base and Llama-7B
   FFN shapes, P in {0, 100, 1k, 10k, 50k}, M in {1, 16, 512}, with bytes, GB/s and % of HBM;
4. the fused/unfused crossover in tokens (sets FUSED_FFN_MAX_TOKENS / FUSED_MAX_TOKENS), with the
   three large-batch strategies (fused, compact, gemm);
4b. the launch-configuration sweep: every autotune candidate of the fused FFN timed on its own at
   Llama-7B shapes, P = 10,000, M = 1 and 16, beside what the autotuner picked;
5. the patch-training loss kernel at N = 40,000 memory vectors, d = 4096, with % of HBM;
6. SmolLM2-architecture whole-model prefill/decode with 0 / 1k / 10k patches;
7. memory: patch storage bytes against P*(2d+1), peak allocation;
8. editing: milliseconds per edit (SmolLM2 architecture, 40,000-vector memory; goal < 20 ms);
9. issue 16 (``gpu_issue16.py``): prefill at M = 512 / 2,048 against the merged concatenation,
   P = 1k / 10k / 100k at M = 1 / 16, the split kernel's default against every candidate under
   CUDA-graph timing (1-16 tokens), 200 edits with Triton compilations counted after the first,
   and ``torch.compile(fullgraph=True, mode="reduce-overhead")`` of a patched model.

Issue 16's sections alone (about 5 minutes on an H200):
    python benchmarks/gpu_check.py --skip-correctness --no-precompile \
        --sections prefill,scale,split_tuning,gpu_editing,compiled --out benchmarks/results/<card>/runs/<date>-issue16

``--sections a,b`` runs a subset of the timed sections (correctness always runs first).
Writes ``gpu_check.json``, ``ffn_latency.csv`` and prints a Markdown table. Every timed method is
checked against the reference first: a fast wrong kernel fails the check.

The sections live beside this file: ``gpu_common.py`` (device, sizes, ``RESULTS``, timing and
checking helpers), ``gpu_correctness.py`` (0, 2), ``gpu_timing.py`` (1, 3-5), ``gpu_model.py``
(6-8), ``gpu_issue16.py`` (9) and ``gpu_specialization.py``; this file registers them, parses the
command line and writes the report. Their helpers stay reachable as attributes of this module
(``g.bench``, ``g.DEV``, ...), which is how issue 16's sections use them.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

# The script's own folder is on sys.path: import the baselines and the other gpu_* modules from
# there, and fastpatch from the installed package (the repo root is deliberately not on the path:
# kernels/ is installed as fastpatch.kernels, which a source checkout does not have at that name).
sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton  # noqa: E402

import fastpatch  # noqa: E402
import gpu_common as C  # noqa: E402
import gpu_issue16 as I16  # noqa: E402
import gpu_specialization as GS  # noqa: E402
from fastpatch.atomic import atomic_file, write_atomic  # noqa: E402
from fastpatch.kernels import fused_ffn as FF  # noqa: E402
from gpu_common import RESULTS, T0, log  # noqa: E402  (RESULTS is mutated, never rebound)
from gpu_correctness import correctness, precompile  # noqa: E402
from gpu_model import editing, memory, whole_model  # noqa: E402
from gpu_timing import (  # noqa: E402
    autotune_choices, config_sweep, crossover, decode_roofline, ffn_latency, loss_kernel, measure_bandwidth,
)

# Re-exported, so that every name this module had before the split is still one of its attributes:
# the sections that take this module as ``g`` (gpu_issue16.py, gpu_specialization.py) use them.
from triton.runtime.errors import OutOfResources  # noqa: E402,F401
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402,F401
from baselines import ConcatPatcher, GatedFFN, GraceCodebook, make_patches  # noqa: E402,F401
from fastpatch import PatchedFFN  # noqa: E402,F401
from fastpatch.ffn import detect_layout  # noqa: E402,F401
from fastpatch.kernels import reference as R  # noqa: E402,F401
from fastpatch.kernels.fused_ffn import (  # noqa: E402,F401
    _fused_ffn_split_kernel, default_split_config, fused_patched_ffn, split_configs_for,
)
from fastpatch.kernels.patch_forward import _patch_fused_kernel, patch_configs_for, patch_forward  # noqa: E402,F401
from fastpatch.kernels.testing import TOLERANCES  # noqa: E402,F401
from gpu_common import (  # noqa: E402,F401
    BIG, DECODE_P, DEV, DRY, DTYPES, LOSS_N, LOW, M_LIST, P_LIST, SHAPES, _SHORT, _cfg_name, _split_extras,
    _sweep_extras, bench, bench_graph, close, env_var, fused_ffn_at, gated_reference, smollm2_config,
)
from gpu_correctness import (  # noqa: E402,F401
    PRECOMPILE_TIMEOUT_S, _config_row, _ffn_case, _precompile_one, config_correctness, loss_correctness,
)
from gpu_model import _editing, _id_tokenizer  # noqa: E402,F401
from kernels_atomic import (  # noqa: E402,F401
    _fused_ffn_atomic_kernel, atomic_configs_for, atomic_patched_ffn, default_atomic_config,
)


OUT_DIR: Path | None = None


def section(name: str, fn, *args):
    log(f"== {name}")
    try:
        out = fn(*args)
    except Exception as e:
        traceback.print_exc()
        RESULTS["failures"].append(f"section {name} crashed: {e!r}")
        out = None
    RESULTS["sections"][name] = out
    if OUT_DIR is not None:  # after every section: a run cut short by the lease keeps what it measured
        RESULTS["wall_s"] = time.time() - T0
        write_atomic(OUT_DIR / "gpu_check.json", json.dumps(RESULTS, indent=1, default=str))
    return out


def md_table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


#: Columns of each section's table in ``gpu_check.md``, in the order the tables appear.
REPORT_COLUMNS = [
    ("correctness", ["kernel", "dtype", "M", "N", "P", "d", "n", "max_err"]),
    ("decode_roofline", ["M", "P", "active", "method", "timing", "ms", "p20_ms", "p80_ms", "must_read_MB", "GB/s", "pct_hbm", "speedup_vs_concat", "speedup_vs_concat_each"]),
    ("ffn_latency", ["shape", "M", "P", "active", "method", "ms", "p20_ms", "p80_ms", "GB/s", "pct_hbm", "vs_unpatched"]),
    ("crossover", ["M", "unpatched_ms", "fused_ffn_ms", "fused_atomic_ms", "cublas+patch_fused_ms", "cublas+patch_compact_ms", "cublas+patch_gemm_ms", "eager"]),
    ("config_sweep", ["M", "config", "ms", "p20_ms", "p80_ms", "GB/s", "pct_hbm", "error"]),
    ("loss_kernel", ["dtype", "N", "d", "n", "preact_ms", "preact_pct_hbm", "fwd_ms", "step_ms", "naive_torch_step_ms", "step_GB/s", "step_pct_hbm"]),
    ("whole_model", ["model", "dtype", "P", "prefill128_ms", "decode_ms", "prefill_vs_unpatched", "decode_vs_unpatched"]),
    ("editing", ["method", "edits", "memory_vectors", "median_ms_per_edit", "p90_ms_per_edit", "median_steps"]),
    ("prefill", ["shape", "M", "P", "active", "timing", "unpatched_ms", "fastpatch_ms", "concat_ms", "speedup_vs_concat", "vs_unpatched"]),
    ("scale", ["P", "M", "active", "timing", "unpatched_ms", "fastpatch_ms", "concat_ms", "speedup_vs_concat", "patch_overhead_ms", "key_scan_floor_ms", "bytes_per_key_element", "pct_hbm"]),
    ("split_tuning", ["M", "default_config", "default_ms", "best_config", "best_ms", "default_vs_best", "candidates", "patchedffn_default_ms", "config", "error"]),
    ("gpu_editing", ["edits", "memory_vectors", "first_edit_s", "median_ms_per_edit", "p90_ms_per_edit", "max_ms_per_edit", "median_steps", "success_rate", "compilations_first_edit", "compilations_after_first_edit", "tuned_keys_after_first_edit"]),
    ("split_specialization", ["P", "M", "variant", "ms", "vs_shipped", "error"]),
    ("compiled", ["mode", "dtype", "first_call_s", "max_abs_err", "compiled_ms", "eager_ms", "speedup", "frames_compiled", "dynamo_unique_graphs", "graph_breaks"]),
]


def timed_sections() -> list[tuple]:
    """(name, function, whether it takes the measured HBM bandwidth) of every timed section, in
    the order they run. Issue 16's (``gpu_issue16.py``) take this module as their first argument."""
    me = sys.modules[__name__]
    return [("decode_roofline", decode_roofline, True), ("config_sweep", config_sweep, True),
            ("ffn_latency", ffn_latency, True), ("loss_kernel", loss_kernel, True),
            ("crossover", crossover, False), ("whole_model", whole_model, False), ("memory", memory, False),
            ("editing", editing, False),
            ("prefill", lambda *a: I16.prefill(me, *a), True),
            ("scale", lambda *a: I16.scale(me, *a), True),
            ("split_tuning", lambda *a: I16.split_tuning(me, *a), True),
            ("gpu_editing", lambda: I16.gpu_editing(me), False),
            ("compiled", lambda: I16.compiled(me), False),
            ("split_specialization", lambda *a: GS.split_specialization(me, *a), True)]


def parse_args(names: list[str]) -> argparse.Namespace:
    """The command line; ``names``: the timed sections ``--sections`` may choose from."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/gpu"))
    ap.add_argument("--quick", action="store_true", help="correctness only")
    ap.add_argument("--skip-correctness", action="store_true",
                    help="skip section 2 (the timed sections still check each method they time)")
    ap.add_argument("--no-precompile", action="store_true", help="compile serially, as tuning asks")
    ap.add_argument("--sections", default="all",
                    help="comma-separated subset of the timed sections to run (after correctness), e.g. "
                         "decode_roofline,config_sweep; default all")
    ap.add_argument("--decode-p", default=",".join(map(str, DECODE_P)), help="bank sizes of the decode roofline")
    args = ap.parse_args()
    args.wanted = set(names) if args.sections == "all" else set(args.sections.split(","))
    unknown = args.wanted - set(names)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {names}")
    return args


def environment() -> dict:
    """The card, its multiprocessors and the versions this run measured with."""
    if DRY:
        os.environ.setdefault("FASTPATCH_BACKEND", "triton")
        name, sms = "dry-run (CPU, TRITON_INTERPRET=1)", 0
    else:
        props = torch.cuda.get_device_properties(0)
        name, sms = props.name, props.multi_processor_count
    return {"gpu": name, "sms": sms, "torch": torch.__version__, "triton": triton.__version__,
            "fastpatch": fastpatch.__version__, "python": platform.python_version(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "cpu_threads": torch.get_num_threads()}


def write_report(out: Path, hbm: float) -> None:
    """``gpu_check.json``, ``ffn_latency.csv`` and ``gpu_check.md`` (also printed)."""
    write_atomic(out / "gpu_check.json", json.dumps(RESULTS, indent=1, default=str))
    lat = RESULTS["sections"].get("ffn_latency") or []
    if lat:
        with atomic_file(out / "ffn_latency.csv", "w") as f:
            w = csv.DictWriter(f, fieldnames=list(lat[0]))
            w.writeheader()
            w.writerows(lat)
    report = [f"# GPU check on {RESULTS['env']['gpu']}", f"HBM copy bandwidth: {hbm:.0f} GB/s", ""]
    for name, cols in REPORT_COLUMNS:
        rows = RESULTS["sections"].get(name) or []
        if rows:
            report += [f"## {name}", md_table(rows, [c for c in cols if any(c in r for r in rows)]), ""]
    if RESULTS.get("autotune"):
        report += ["## autotune choices", "```", json.dumps(RESULTS["autotune"], indent=1), "```", ""]
    if RESULTS["sections"].get("memory"):
        report += ["## memory", "```", json.dumps(RESULTS["sections"]["memory"], indent=1), "```", ""]
    report += ["## failures", *(f"- {f}" for f in RESULTS["failures"] or ["none"])]
    write_atomic(out / "gpu_check.md", "\n".join(report))
    print("\n".join(report))


def main() -> int:
    global OUT_DIR, DECODE_P
    timed = timed_sections()
    args = parse_args([n for n, _, _ in timed])
    # gpu_common's copy is the one decode_roofline reads; this module's stays in step with it
    DECODE_P = C.DECODE_P = tuple(int(v) for v in args.decode_p.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    OUT_DIR = out
    RESULTS["env"] = environment()
    log(RESULTS["env"])
    fast = {"decode_roofline", "config_sweep", "crossover"}
    p_sizes = (48,) if (args.skip_correctness and args.wanted <= fast and all(p % 16 == 0 for p in DECODE_P)) else (48, 40)
    if not args.no_precompile:  # in the dry run: checks the worker processes' plumbing
        section("precompile", precompile, p_sizes, not args.skip_correctness)
        log(f"precompiled: {RESULTS['sections']['precompile']}")
    hbm = section("hbm_bandwidth_GBps", measure_bandwidth)
    log(f"HBM copy bandwidth: {hbm:.0f} GB/s")
    if not args.skip_correctness:
        FF.CHECK_SPLIT_FLAGS = True  # the kernel's error flags, read after every launch
        section("correctness", correctness)
        FF.CHECK_SPLIT_FLAGS = False
    log(f"correctness failures so far: {len(RESULTS['failures'])}")
    if not args.quick:
        for name, fn, takes_hbm in timed:
            if name in args.wanted:
                section(name, fn, *((hbm,) if takes_hbm else ()))
        RESULTS["autotune"] = autotune_choices()
    RESULTS["wall_s"] = time.time() - T0
    write_report(out, hbm)
    log(f"done in {time.time() - T0:.0f}s; failures: {len(RESULTS['failures'])}")
    return 1 if RESULTS["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
