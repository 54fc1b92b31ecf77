"""pytest configuration of the benchmark suite.

    pytest --benchmark benchmarks          # timed run; JSON -> benchmarks/results/cpu/<tag>/bench.json
    python benchmarks/render.py            # tables and plots from every saved JSON
    pytest -q benchmarks                   # smoke: every benchmark once, untimed, small cases only

Without ``--benchmark`` every benchmark runs once, untimed (pytest-benchmark's
``--benchmark-disable``), and cases marked ``full_only`` (the largest banks) are deselected, so
``make test`` stays fast. Each benchmark still checks its method against the float64 reference.

With ``--benchmark`` the suite is timed and the JSON is written to
``benchmarks/results/cpu/<machine-tag>/bench.json`` (``FASTPATCH_BENCH_TAG`` sets the tag;
``--benchmark-json PATH`` writes elsewhere). The JSON's ``machine_info`` holds the environment
(versions, CPU, threads, date), the measured copy bandwidth and the peak RSS; every benchmark's
``extra_info`` holds its bytes, achieved GB/s, % of the measured bandwidth and its ratio against
the unpatched baseline of its group, all computed from medians of this run, plus
``vs_unpatched_paired`` (interleaved calls of the method and the unpatched FFN: steadier on a
shared machine) and ``other_cpu_pct`` (how busy other processes kept the cores meanwhile).

Environment variables:
  FASTPATCH_BENCH_THREADS    torch threads (default: torch's, i.e. all cores; smoke runs use 1)
  FASTPATCH_BENCH_MAX_TIME   pytest-benchmark max_time per benchmark in s (default 0.4)
  FASTPATCH_BENCH_TAG        results folder name (default <cpu>-<cores>c[-<threads>t])
  FASTPATCH_BENCH_KEEP_DATA  1: keep every round's timing in the JSON (default: stats only)
"""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path

import pytest
import torch

from benchmarks import env as benv

#: Timing defaults for ``--benchmark`` (used unless given on the command line): enough rounds for a
#: stable median on a noisy 2-core VM while the whole suite stays under ~10 minutes.
MAX_TIME_S = float(os.environ.get("FASTPATCH_BENCH_MAX_TIME", "0.4"))
MIN_ROUNDS = 5

_STATE: dict = {"bandwidth": None}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--benchmark",
        action="store_true",
        default=False,
        help="fastpatch: run the benchmark suite timed (full sizes) and save the JSON under "
        "benchmarks/results/cpu/<machine>/bench.json. Without it benchmarks run once, untimed.",
    )


def full_run(config: pytest.Config) -> bool:
    """Whether this is a timed ``--benchmark`` run (else: smoke)."""
    return bool(config.getoption("--benchmark", default=False))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "full_only: a large case that only runs with --benchmark")
    threads = os.environ.get("FASTPATCH_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    opt = config.option
    if not hasattr(opt, "benchmark_disable"):  # pytest-benchmark not installed / disabled
        return
    if not full_run(config):
        opt.benchmark_disable = True
        return
    opt.benchmark_disable = False
    # Defaults tuned for this suite unless the user gave their own.
    if Decimal(str(opt.benchmark_max_time)) == Decimal("1.0"):
        opt.benchmark_max_time = MAX_TIME_S
    if opt.benchmark_min_rounds == 5:
        opt.benchmark_min_rounds = MIN_ROUNDS
    if str(opt.benchmark_warmup) in ("auto", "False"):
        opt.benchmark_warmup = True
        if opt.benchmark_warmup_iterations == 100000:
            opt.benchmark_warmup_iterations = 3
    if opt.benchmark_json is None and not (opt.benchmark_save or opt.benchmark_autosave):
        out = benv.cpu_results_dir() / "bench.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        opt.benchmark_json = out


_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Smoke runs drop ``full_only`` cases; ``--benchmark`` runs only the benchmark suite (a bare
    ``pytest --benchmark`` collects tests/ too, through testpaths)."""
    keep, drop = [], []
    for it in items:
        if full_run(config):
            ours = _HERE in Path(str(it.path)).resolve().parents
            (keep if ours else drop).append(it)
        else:
            (drop if it.get_closest_marker("full_only") else keep).append(it)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def full(pytestconfig: pytest.Config) -> bool:
    return full_run(pytestconfig)


@pytest.fixture(scope="session")
def bandwidth(pytestconfig: pytest.Config) -> dict:
    """The measured copy bandwidth of this machine, in this run (the roofline ceiling)."""
    if _STATE["bandwidth"] is None:
        big = full_run(pytestconfig)
        _STATE["bandwidth"] = benv.measure_copy_bandwidth(256 << 20 if big else 64 << 20, reps=15 if big else 3)
    return _STATE["bandwidth"]


@pytest.fixture(scope="session", autouse=True)
def _smoke_threads(pytestconfig: pytest.Config):
    """Smoke runs (untimed) use one thread unless FASTPATCH_BENCH_THREADS says otherwise.

    They only check correctness, and on a shared or CI machine OpenMP threads competing with other
    processes for the same cores slow them down many times over. Restored after the session.
    """
    if full_run(pytestconfig) or os.environ.get("FASTPATCH_BENCH_THREADS"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _bench_seed_and_grad():
    torch.manual_seed(0)
    with torch.no_grad():
        yield


@pytest.fixture(autouse=True)
def _foreign_load(request: pytest.FixtureRequest):
    """Record how busy other processes kept the cores during each benchmark (shared machines)."""
    if "benchmark" not in request.fixturenames:
        yield
        return
    bench = request.getfixturevalue("benchmark")
    load = benv.ForeignLoad()
    with load:
        yield
    if load.pct is not None:
        bench.extra_info["other_cpu_pct"] = round(load.pct, 1)


@pytest.fixture
def paired(full):
    """``paired(info, fn, base)``: in timed runs, add the interleaved ratio against ``base``."""

    def run(info: dict, fn, base) -> None:
        if not full:
            return
        r = benv.paired_ratio(fn, base, budget_s=MAX_TIME_S)
        info.update({"vs_unpatched_paired": r["ratio"], "vs_unpatched_paired_q1": r["ratio_q1"],
                     "vs_unpatched_paired_q3": r["ratio_q3"], "paired_rounds": r["pairs"]})

    return run


# ----------------------------------------------------------------------------- hooks
def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["fastpatch_env"] = benv.environment()
    machine_info["machine_tag"] = benv.machine_tag()
    machine_info["mem_bandwidth"] = _STATE["bandwidth"]
    machine_info["peak_rss_bytes"] = benv.peak_rss_bytes()


def _median(b) -> float | None:
    st = getattr(b, "stats", None)
    if not st:
        return None
    try:
        return float(st.median)
    except Exception:
        return None


def derive(rows: list[tuple[str, dict, float | None]], bw_gbps: float | None) -> None:
    """Fill ``vs_unpatched``, ``GBps``, ``pct_of_bandwidth`` and ``GFLOPs`` into extra_info.

    ``rows`` are (group, extra_info, median seconds). The baseline of a group is its benchmark
    whose ``method`` is ``unpatched``.
    """
    base = {g: m for g, info, m in rows if info.get("method") == "unpatched" and m}
    for g, info, m in rows:
        if not m:
            continue
        if g in base:
            info["vs_unpatched"] = m / base[g]
        if info.get("bytes"):
            info["GBps"] = info["bytes"] / m / 1e9
            if bw_gbps:
                info["pct_of_bandwidth"] = 100 * info["GBps"] / bw_gbps
        if info.get("flop"):
            info["GFLOPs"] = info["flop"] / m / 1e9


def acceptance(rows: list[tuple[str, dict, float | None]]) -> list[dict]:
    """Issue 2's CPU criterion: at SmolLM2 shapes, P = 10,000, M in {1, 128}, fastpatch's
    patched/unpatched ratio is below the concatenated-Linear baseline's."""
    out = []
    for M in (1, 128):
        sel = {info.get("method"): (info, m) for g, info, m in rows
               if info.get("kind") == "ffn" and info.get("shape") == "smollm2" and info.get("P") == 10000
               and info.get("M") == M}
        if not all(k in sel and sel[k][1] for k in ("unpatched", "fastpatch", "concat (authors)")):
            continue
        u = sel["unpatched"][1]
        f, c = sel["fastpatch"][1], sel["concat (authors)"][1]
        row = {"shape": "smollm2", "M": M, "P": 10000, "unpatched_ms": u * 1e3, "fastpatch_ms": f * 1e3,
               "concat_ms": c * 1e3, "fastpatch_ratio": f / u, "concat_ratio": c / u, "passes": f / u < c / u}
        fp, cp = sel["fastpatch"][0].get("vs_unpatched_paired"), sel["concat (authors)"][0].get("vs_unpatched_paired")
        if fp and cp:
            row.update(fastpatch_ratio_paired=fp, concat_ratio_paired=cp, passes_paired=fp < cp)
        out.append(row)
    return out


def _session_rows(config: pytest.Config) -> list[tuple[str, dict, float | None]]:
    bs = getattr(config, "_benchmarksession", None)
    if bs is None:
        return []
    return [(b.group, b.extra_info, _median(b)) for b in bs.benchmarks]


def pytest_benchmark_update_json(config: pytest.Config, benchmarks, output_json: dict) -> None:
    bw = (_STATE["bandwidth"] or {}).get("GBps")
    rows = [(b["group"], b["extra_info"], (b.get("stats") or {}).get("median")) for b in output_json["benchmarks"]]
    derive(rows, bw)
    if os.environ.get("FASTPATCH_BENCH_KEEP_DATA") != "1":  # raw per-round timings: megabytes
        for b in output_json["benchmarks"]:
            (b.get("stats") or {}).pop("data", None)
    output_json["fastpatch"] = {"acceptance_issue2_cpu": acceptance(rows),
                                "timing": {"max_time_s": float(config.option.benchmark_max_time),
                                           "min_rounds": config.option.benchmark_min_rounds}}


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    rows = _session_rows(config)
    if not rows or not full_run(config):
        return
    derive(rows, (_STATE["bandwidth"] or {}).get("GBps"))
    tr = terminalreporter
    tr.section("fastpatch benchmark summary")
    bw = _STATE["bandwidth"]
    if bw:
        tr.write_line(f"measured copy bandwidth: {bw['GBps']:.1f} GB/s ({bw['method']})")
    tr.write_line(f"peak RSS: {benv.peak_rss_bytes() / 2**20:.0f} MiB")
    for a in acceptance(rows):
        tr.write_line(
            f"issue 2 (CPU) smollm2 P=10000 M={a['M']}: fastpatch {a['fastpatch_ms']:.3f} ms "
            f"(x{a['fastpatch_ratio']:.2f} of unpatched {a['unpatched_ms']:.3f} ms), concat "
            f"{a['concat_ms']:.3f} ms (x{a['concat_ratio']:.2f}) -> {'PASS' if a['passes'] else 'FAIL'}"
        )
        if "passes_paired" in a:
            tr.write_line(
                f"    interleaved pairs: fastpatch x{a['fastpatch_ratio_paired']:.2f}, concat "
                f"x{a['concat_ratio_paired']:.2f} -> {'PASS' if a['passes_paired'] else 'FAIL'}"
            )
    mb = [(info, m) for _, info, m in rows if info.get("kind") == "ffn" and info.get("M") == 1 and m and info.get("GBps")]
    if mb:
        tr.write_line("roofline, memory-bound cases (M=1): bytes the method must read+write, achieved GB/s, % of the copy bandwidth")
        for info, m in sorted(mb, key=lambda t: (t[0]["shape"], t[0]["P"], t[0]["method"])):
            tr.write_line(f"    {info['shape']:>9} P={info['P']:<6} {info['method']:<17} {m * 1e3:9.3f} ms "
                          f"{info['bytes'] / 1e6:8.1f} MB {info['GBps']:6.1f} GB/s {info.get('pct_of_bandwidth', 0):6.1f}%")
    busy = [info.get("other_cpu_pct") for _, info, _ in rows if info.get("other_cpu_pct") is not None]
    if busy:
        noisy = sum(1 for b in busy if b > 10)
        tr.write_line(f"other processes' CPU load during benchmarks: median {sorted(busy)[len(busy) // 2]:.0f}%, "
                      f"max {max(busy):.0f}%; {noisy} of {len(busy)} benchmarks ran with > 10%")
    json_path = config.option.benchmark_json
    if json_path:
        tr.write_line(f"JSON: {Path(json_path)}; render with: python benchmarks/render.py")
