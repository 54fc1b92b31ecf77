"""What every benchmark result records about where it ran, and the machine's memory roofline.

- :func:`environment`: torch / triton / transformers / fastpatch versions, CPU model (from
  ``/proc/cpuinfo``), cores, torch threads, the fastpatch backend, date.
- :func:`machine_tag`: the folder name of this machine's results, ``benchmarks/results/cpu/<tag>``
  (override with ``FASTPATCH_BENCH_TAG``).
- :func:`measure_copy_bandwidth`: a large tensor copy, timed; the roofline ceiling in GB/s
  (bytes read + bytes written per second, as STREAM's "copy").
- :func:`peak_rss_bytes` / :func:`rss_bytes`: the process's peak and current resident memory.
- :func:`save_results`: a result's JSON and its Markdown rendering, written atomically.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def save_results(out: str | os.PathLike[str], stem: str, data: dict, markdown: str) -> None:
    """Write ``<out>/<stem>.json`` and ``<out>/<stem>.md`` through fastpatch's atomic-write helper."""
    from fastpatch.atomic import write_atomic, write_json_atomic

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / f"{stem}.json", data)
    write_atomic(folder / f"{stem}.md", markdown.rstrip("\n") + "\n")


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
    except Exception:
        return None
    return getattr(m, "__version__", "unknown")


def environment() -> dict:
    """The environment of a benchmark run (goes into every result file)."""
    import fastpatch

    return {
        "fastpatch": fastpatch.__version__,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "fastpatch_backend": os.environ.get("FASTPATCH_BACKEND", "auto"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": " ".join(sys.argv[1:]),
    }


def machine_tag() -> str:
    """``<cpu-model-slug>-<cores>c[-<threads>t]``, e.g. ``amd-epyc-2c``; ``FASTPATCH_BENCH_TAG``
    overrides. The thread suffix appears when torch uses fewer threads than there are cores."""
    tag = os.environ.get("FASTPATCH_BENCH_TAG")
    if tag:
        return tag
    slug = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*$", "", cpu_model().lower())
    slug = re.sub(r"[^a-z0-9]+", "-", slug).strip("-")[:40] or "cpu"
    cores, threads = usable_cores(), torch.get_num_threads()
    return f"{slug}-{cores}c" + (f"-{threads}t" if threads != cores else "")


def cpu_results_dir() -> Path:
    return RESULTS_DIR / "cpu" / machine_tag()


def measure_copy_bandwidth(nbytes: int = 256 << 20, reps: int = 15) -> dict:
    """Time ``b.copy_(a)`` on two ``nbytes`` float32 tensors; return GB/s (read + write).

    The tensors are far larger than any CPU cache, so this is DRAM bandwidth: the ceiling for
    the memory-bound (few-token) cases. Median of ``reps`` copies after two warm-up copies.
    """
    n = nbytes // 4
    a = torch.empty(n, dtype=torch.float32).normal_()
    b = torch.empty_like(a)
    for _ in range(2):
        b.copy_(a)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - t)
    assert torch.equal(a[:1024], b[:1024])
    med = statistics.median(times)
    return {
        "bytes_copied": n * 4,
        "median_s": med,
        "min_s": min(times),
        "GBps": 2 * n * 4 / med / 1e9,
        "GBps_best": 2 * n * 4 / min(times) / 1e9,
        "method": f"torch copy_ of {n * 4 >> 20} MiB float32 (read + write counted), median of {reps}",
    }


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``getrusage``; KiB on Linux)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def rss_bytes() -> int:
    """Current resident set size (psutil when installed, else /proc/self/statm)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------ shared-machine robustness
def _proc_stat_busy() -> float | None:
    """Seconds of busy CPU time of the whole machine since boot (all cores), or None."""
    try:
        f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    v = [int(t) for t in f]
    user, nice, system, idle, iowait, irq, softirq = v[:7]
    steal = v[7] if len(v) > 7 else 0
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class ForeignLoad:
    """How busy the machine's cores were with *other* processes (and hypervisor steal) meanwhile.

    ``pct`` = (machine busy CPU time - this process's CPU time) / (wall time x cores). On a
    quiet machine it is ~0; on a shared 2-core machine other jobs show up here, and a timing
    taken while it is high is not trustworthy.
    """

    def __enter__(self) -> "ForeignLoad":
        self.t0, self.busy0, self.own0 = time.perf_counter(), _proc_stat_busy(), sum(os.times()[:2])
        self.pct = None
        return self

    def __exit__(self, *exc) -> None:
        busy1 = _proc_stat_busy()
        wall = time.perf_counter() - self.t0
        if self.busy0 is None or busy1 is None or wall <= 0:
            return
        own = sum(os.times()[:2]) - self.own0
        self.pct = max(0.0, 100 * ((busy1 - self.busy0) - own) / (wall * usable_cores()))


def paired_ratio(fn, base, budget_s: float = 0.3, min_pairs: int = 5, max_pairs: int = 200) -> dict:
    """Time ``fn`` and ``base`` interleaved (A B, B A, A B ...); median of per-pair ratios.

    Slow drifts of the machine (other jobs, frequency) hit both members of a pair alike, so the
    paired ratio is steadier than a ratio of two medians taken seconds apart.
    """
    ratios, ta, tb = [], [], []
    start = time.perf_counter()
    i = 0
    while i < max_pairs and (i < min_pairs or time.perf_counter() - start < budget_s):
        order = (fn, base) if i % 2 == 0 else (base, fn)
        ts = []
        for f in order:
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        a, b = (ts[0], ts[1]) if i % 2 == 0 else (ts[1], ts[0])
        if i == 0 and a + b > budget_s / 3:  # slow case: fewer pairs keep the suite's time in check
            min_pairs = min(min_pairs, 3)
        ta.append(a)
        tb.append(b)
        ratios.append(a / b)
        i += 1
    ratios.sort()
    q = lambda p: ratios[min(len(ratios) - 1, int(p * len(ratios)))]  # noqa: E731
    return {"ratio": statistics.median(ratios), "ratio_q1": q(0.25), "ratio_q3": q(0.75), "pairs": len(ratios),
            "median_s": statistics.median(ta), "base_median_s": statistics.median(tb)}
