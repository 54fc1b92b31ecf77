"""The benchmark tooling itself: the ``--benchmark`` flag, and render.py on small result files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _stats(median: float) -> dict:
    return {"min": median * 0.9, "max": median * 1.2, "mean": median, "stddev": median * 0.05, "rounds": 7,
            "median": median, "iqr": median * 0.1, "q1": median * 0.95, "q3": median * 1.05, "iqr_outliers": 0,
            "stddev_outliers": 0, "outliers": "0;0", "ld15iqr": median, "hd15iqr": median, "ops": 1 / median,
            "total": 7 * median, "iterations": 1}


def _cpu_json() -> dict:
    bench = []
    for shape, d in (("smollm2", 576), ("bert-base", 768)):
        for M in (1, 128):
            for P in (0, 10000):
                for method, f in (("unpatched", 1.0), ("fastpatch", 1.5), ("concat (authors)", 2.0), ("grace codebook", 2.5)):
                    if P == 0 and method not in ("unpatched", "fastpatch"):
                        continue
                    info = {"kind": "ffn", "shape": shape, "d": d, "F": 3 * d, "M": M, "P": P, "method": method,
                            "active_patches": 2, "bytes": 10_000_000, "GBps": 10.0, "pct_of_bandwidth": 25.0,
                            "vs_unpatched": f, "other_cpu_pct": 3.0}
                    if method != "unpatched":
                        info.update(vs_unpatched_paired=f, vs_unpatched_paired_q1=f, vs_unpatched_paired_q3=f)
                    bench.append({"group": f"ffn {shape} M={M} P={P}", "name": f"t[{shape}-{M}-{P}-{method}]",
                                  "extra_info": info, "stats": _stats(1e-3 * f * (1 + P / 1e4))})
    for phase in ("prefill", "decode"):
        for method, P in (("unpatched", 0), ("fastpatch", 1000), ("concat (authors)", 1000)):
            bench.append({"group": f"model {phase}", "name": f"m[{phase}-{method}]", "stats": _stats(0.05),
                          "extra_info": {"kind": "model", "phase": phase, "method": method, "P": P, "tokens": 64,
                                         "kv_cache": 64, "layers": 30, "vocab": 49152, "vs_unpatched": 1.0}})
    bench.append({"group": "patch storage", "name": "s", "stats": _stats(0.1), "extra_info": {
        "kind": "storage", "shape": "smollm2", "P": 10000, "storage_bytes": 2, "formula_bytes": 1, "slack_ratio": 2.0,
        "bytes_per_patch": 2.0, "formula_bytes_per_patch": 1, "per_add_us": 5.0, "base_weights_copied": False}})
    acc = [{"M": 1, "unpatched_ms": 1.0, "fastpatch_ms": 1.5, "concat_ms": 2.0, "fastpatch_ratio": 1.5,
            "concat_ratio": 2.0, "passes": True}]
    return {"machine_info": {"fastpatch_env": {"cpu": "Test CPU", "torch_threads": 2}, "machine_tag": "test-2c",
                             "mem_bandwidth": {"GBps": 40.0, "method": "copy"}, "peak_rss_bytes": 2**30},
            "benchmarks": bench, "datetime": "2026-01-01", "fastpatch": {"acceptance_issue2_cpu": acc}}


def _gpu_json() -> dict:
    rows = []
    for M in (1, 16):
        for P in (0, 100):
            for method in ("unpatched", "fastpatch", "concat (authors)"):
                if P == 0 and method == "concat (authors)":
                    continue
                rows.append({"shape": "llama-7b", "d": 4096, "F": 11008, "M": M, "P": P, "active": 2, "method": method,
                             "ms": 0.1 + P / 1e4, "p20_ms": 0.09, "p80_ms": 0.2, "bytes": 1e8, "GB/s": 2000.0,
                             "pct_hbm": 60.0, "vs_unpatched": 1.0})
    return {"env": {"gpu": "Test GPU", "date": "2026-01-01"}, "failures": [],
            "sections": {"hbm_bandwidth_GBps": 3000.0, "ffn_latency": rows,
                         "whole_model": [{"model": "x", "P": 0, "decode_ms": 1.0}], "memory": {"P": 10000, "slack_ratio": 1.6}}}


def test_render_writes_tables_and_plots(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from benchmarks import render

    cpu = tmp_path / "cpu" / "test-2c"
    gpu = tmp_path / "test-gpu"
    cpu.mkdir(parents=True)
    gpu.mkdir()
    (cpu / "bench.json").write_text(json.dumps(_cpu_json()))
    (gpu / "gpu_check.json").write_text(json.dumps(_gpu_json()))
    written = render.render(tmp_path)
    for p in (cpu / "README.md", cpu / "table.md", cpu / "ffn_latency.png", cpu / "model_latency.png",
              gpu / "README.md", gpu / "ffn_latency.png", tmp_path / "README.md"):
        assert p in written and p.stat().st_size > 0, p
    readme = (cpu / "README.md").read_text()
    assert "Issue 2, CPU criterion" in readme and "x1.50" in readme and "Test CPU" in readme
    assert "llama-7b" in (gpu / "README.md").read_text()


def test_benchmark_flag_is_registered(tmp_path: Path) -> None:
    """``pytest --benchmark`` is a known option and selects the full-size cases (the smoke run,
    without it, deselects them: see ``make test``'s output)."""
    args = [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
            "benchmarks/bench_patched_ffn.py", "--benchmark", "--benchmark-json", str(tmp_path / "b.json")]
    full = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stdout + full.stderr
    assert "P50000" in full.stdout and "deselected" not in full.stdout


def test_merge_gpu_runs_takes_sections_and_records_provenance(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    import pytest

    from benchmarks import render
    from benchmarks.merge_gpu_runs import merge_run

    folder = tmp_path / "test-gpu"
    old = _gpu_json()
    (folder / "runs" / "a").mkdir(parents=True)
    (folder / "runs" / "a" / "gpu_check.json").write_text(json.dumps(old))
    merge_run(folder, "a", "aaaaaaa", "first run")
    new = {"env": {"gpu": "Test GPU", "date": "2026-02-02"}, "failures": [], "wall_s": 5.0,
           "sections": {"hbm_bandwidth_GBps": 3100.0, "ffn_latency": None,
                        "gpu_editing": [{"edits": 200, "median_ms_per_edit": 12.5, "compilations_after_first_edit": 0}]}}
    (folder / "runs" / "b").mkdir()
    (folder / "runs" / "b" / "gpu_check.json").write_text(json.dumps(new))
    (folder / "runs" / "c").mkdir()
    (folder / "runs" / "c" / "gpu_check.json").write_text(json.dumps({**new, "failures": ["section x crashed"]}))
    with pytest.raises(ValueError, match="did not measure"):
        merge_run(folder, "b", "bbbbbbb", "second run", sections=["ffn_latency"])
    merge_run(folder, "b", "bbbbbbb", "second run")
    merged = merge_run(folder, "c", "ccccccc", "an experiment", record_only=True)
    # b's measured sections replace a's; a's others stay, each with its run; c is listed only.
    assert merged["sections"]["hbm_bandwidth_GBps"] == 3100.0
    assert merged["sections"]["ffn_latency"] == old["sections"]["ffn_latency"]
    assert merged["provenance"] == {"hbm_bandwidth_GBps": "b", "ffn_latency": "a", "whole_model": "a",
                                    "memory": "a", "gpu_editing": "b"}
    assert set(merged["runs"]) == {"a", "b", "c"} and merged["runs"]["c"]["failures"] == ["section x crashed"]
    assert merged["failures"] == [] and merged["env"]["date"] == "2026-02-02"
    render.render(tmp_path)
    readme = (folder / "README.md").read_text()
    assert "## gpu_editing" in readme and "12.5" in readme and "an experiment" in readme
