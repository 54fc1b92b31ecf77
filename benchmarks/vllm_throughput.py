"""vLLM serving throughput of SmolLM2 with 0 / 1,000 / 10,000 fastpatch patches against the
unpatched model, all in one process and interleaved (``make bench-vllm``).

Two engines run side by side: stock vLLM (``LlamaForCausalLM``) and fastpatch's
``FastpatchLlamaForCausalLM`` (last layer patchable). The patched engine switches between patch
sets with hot updates, so every configuration is timed in every round, in turn, on the same
engine build. Work is identical across configurations (``ignore_eos``, fixed output length).

Patch sets: the serving demo's real capital edits, padded with synthetic patches to 1,000 and
10,000. Synthetic keys are random directions with the real keys' median norm and the real
biases' median bias (like real T-Patcher patches, meant to stay silent on other inputs; how
often they fire on this workload is not measured); values are random with the real values'
median norm. The CPU time other processes used during each timed run is recorded beside it (the
machine is shared).

    python benchmarks/vllm_throughput.py --out benchmarks/results/vllm-cpu [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

import torch  # noqa: E402

from fastpatch.atomic import write_json_atomic  # noqa: E402

PATCH_COUNTS = (0, 1000, 10000)
PROMPT_STEMS = (
    "The capital of {} is", "Tell me about the history of {}.", "What is the climate like in {}?",
    "Write a short poem about {}.",
)
COUNTRIES = ("France", "Peru", "Japan", "Kenya", "Norway", "Chile", "Egypt", "Canada")


def _workload(batch: int) -> list[str]:
    return [PROMPT_STEMS[i % len(PROMPT_STEMS)].format(COUNTRIES[i % len(COUNTRIES)]) for i in range(batch)]


def make_patch_files(out: Path, real_file: str, counts: tuple[int, ...]) -> dict[int, str]:
    """Patch files with ``counts`` patches each: the real edits first, then synthetic ones."""
    from fastpatch import PatchBank, PatchedFFN
    from fastpatch.app.models import load_smollm2

    tensors, _ = PatchBank.read_file(real_file)
    k, b, v = tensors["keys"].float(), tensors["biases"].float(), tensors["values"].float()
    model, _ = load_smollm2()
    ffn = PatchedFFN.wrap(model, "model.layers.-1.mlp")
    g = torch.Generator().manual_seed(0)
    k_norm, v_norm, bias = k.norm(dim=1).median(), v.norm(dim=1).median(), b.median()
    files = {}
    for n in counts:
        if n == 0:
            continue
        ffn.bank.clear()
        m = max(0, n - k.shape[0])
        keys = torch.randn(m, k.shape[1], generator=g)
        vals = torch.randn(m, v.shape[1], generator=g)
        keys = keys / keys.norm(dim=1, keepdim=True) * k_norm
        vals = vals / vals.norm(dim=1, keepdim=True) * v_norm
        ffn.add_patches(torch.cat([k, keys])[:n], torch.cat([b, bias.expand(m)])[:n], torch.cat([v, vals])[:n])
        files[n] = str(out / f"patches-{n}.safetensors")
        ffn.save(files[n])
    return files


def _cpu_seconds(own: set[int]) -> tuple[float, float]:
    """CPU seconds used so far by (this benchmark's process tree, every other process)."""
    import psutil

    mine = others = 0.0
    for p in psutil.process_iter(["pid"]):
        try:
            t = p.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if p.info["pid"] in own:
            mine += t.user + t.system
        else:
            others += t.user + t.system
    return mine, others


def _own_pids() -> set[int]:
    import psutil

    me = psutil.Process()
    return {me.pid} | {c.pid for c in me.children(recursive=True)}


def timed(llm, prompts: list[str], max_tokens: int) -> dict[str, float]:
    """Generate and time one batch; returns tokens, seconds, and the CPU (in cores) that this
    benchmark's processes (both engines) and all other processes used meanwhile."""
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    own = _own_pids()
    (m0, o0), t0 = _cpu_seconds(own), time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    m1, o1 = _cpu_seconds(own)
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"tokens": n, "seconds": dt, "tokens_per_s": n / dt, "own_cpu_cores": (m1 - m0) / dt,
            "others_cpu_cores": (o1 - o0) / dt}


def _summarise(runs: dict[str, dict[str, list[dict[str, float]]]], configs: list[str],
               shapes: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Median tokens/s per configuration and shape, and relative to the unpatched engine."""
    base = {s: statistics.median(x["tokens_per_s"] for x in runs["unpatched"][s]) for s in shapes}
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for c in configs:
        summary[c] = {}
        for s in shapes:
            tps = [x["tokens_per_s"] for x in runs[c][s]]
            summary[c][s] = {
                "tokens_per_s_median": statistics.median(tps), "tokens_per_s_all": tps,
                "relative_to_unpatched": statistics.median(tps) / base[s],
                "others_cpu_cores_median": statistics.median(x["others_cpu_cores"] for x in runs[c][s]),
                "own_cpu_cores_median": statistics.median(x["own_cpu_cores"] for x in runs[c][s]),
            }
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/vllm-cpu")
    ap.add_argument("--work", default="runs/vllm-bench", help="patch files (not committed: 10,000 patches are 46 MB)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--eager", action="store_true", help="enforce_eager (default: vLLM's torch.compile)")
    # One thread by default: on this shared 2-core machine two OpenMP threads per engine ran ~10x
    # slower (benchmarks/results/vllm-cpu/throughput_2threads.json), spinning against other load.
    ap.add_argument("--threads", type=int, default=1, help="OpenMP threads of each engine")
    args = ap.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(1)

    from vllm import LLM

    from fastpatch.integrations.vllm import PatchUpdater, llm_kwargs
    from fastpatch.app.serve_demo import edit_capitals

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    made, _ = edit_capitals(work / "edits", n_edits=4)
    files = make_patch_files(work, made.patch_file, PATCH_COUNTS)
    engine = dict(dtype="float32", max_model_len=512, enforce_eager=args.eager)
    t0 = time.perf_counter()
    plain = LLM(model=made.model_dir, **engine)
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    patched = LLM(**llm_kwargs(made.model_dir, layers=[-1]), **engine)
    t_patched = time.perf_counter() - t0
    upd = PatchUpdater(patched)
    configs = ["unpatched"] + [f"patches_{n}" for n in PATCH_COUNTS]
    shapes = {"batch": _workload(args.batch), "single": _workload(1)}
    runs: dict[str, dict[str, list[dict[str, float]]]] = {c: {s: [] for s in shapes} for c in configs}
    swaps: list[float] = []
    for llm in (plain, patched):  # warm-up (compilation of the batch shapes, caches)
        for prompts in shapes.values():
            timed(llm, prompts, 8)
    for r in range(args.rounds):
        for c in configs:
            if c == "unpatched":
                llm = plain
            else:
                n = int(c.split("_")[1])
                s0 = time.perf_counter()
                upd.clear() if n == 0 else upd.replace(files[n])
                swaps.append(time.perf_counter() - s0)
                llm = patched
            for s, prompts in shapes.items():
                runs[c][s].append(timed(llm, prompts, args.max_tokens))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{c} {runs[c]['batch'][-1]['tokens_per_s']:.0f} tok/s" for c in configs), flush=True)
    summary = _summarise(runs, configs, list(shapes))
    result = {
        "what": "vLLM 0.32 (CPU) serving SmolLM2-135M-Instruct fp32, greedy, ignore_eos",
        "workload": {"batch": args.batch, "single": 1, "max_tokens": args.max_tokens, "rounds": args.rounds,
                     "mode": "eager" if args.eager else "torch.compile", "omp_threads": args.threads},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_at_end": os.getloadavg()},
        "startup_s": {"unpatched": t_plain, "fastpatch": t_patched},
        "hot_update_s": {"median": statistics.median(swaps), "max": max(swaps)},
        "patch_bytes": {n: (576 * 2 + 1) * 4 * n for n in PATCH_COUNTS},
        "summary": summary,
        "runs": runs,
    }
    write_json_atomic(out / "throughput.json", result)
    for c, row in summary.items():
        print(f"{c}: batch {row['batch']['tokens_per_s_median']:.0f} tok/s ({row['batch']['relative_to_unpatched']:.2f}x), "
              f"single {row['single']['tokens_per_s_median']:.1f} tok/s ({row['single']['relative_to_unpatched']:.2f}x)")
    print(f"wrote {out / 'throughput.json'}; `python benchmarks/update_readme.py` renders the README table")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
