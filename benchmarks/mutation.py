"""Mutation score of the modules that compute numbers users trust (issue 18): ``make mutation``.

For each group below, a copy of the checkout is made in a scratch directory (nothing is written
into the repository but the results), ``[tool.mutmut]`` is set to mutate that group's files and
to run only the fast test files that cover them, and ``mutmut run`` (mutmut 3: one pytest
session, each mutant in a forked child, only the tests that reach the mutated function) is run
with ``TRITON_INTERPRET=1`` and one thread. The counts and every surviving mutant (its diff) are
written to ``benchmarks/results/mutation/<group>.json`` and summarised in ``summary.md``.

Log statements are not mutated (``do_not_mutate_patterns``). mutmut skips decorated functions (``@triton.jit`` kernels, ``@torch.no_grad()`` methods,
properties): those are covered by the kernel tests and the planted bugs of docs/mutation.md.

    python benchmarks/mutation.py                      # every group
    python benchmarks/mutation.py metrics bank         # some
    python benchmarks/mutation.py --collect formats    # the results of a run stopped early
    MUTATION_CHILDREN=2 python benchmarks/mutation.py  # parallel children (default 1)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fastpatch.atomic import write_atomic, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "mutation"
SCRATCH = Path(os.environ.get("MUTATION_SCRATCH", "/tmp/fastpatch-mutation"))
MUTMUT = Path(sys.executable).with_name("mutmut")

#: The runner's metric code: the functions that build the pre-edit baseline and the evaluation.
_RUNNER_METRIC_CODE = [
    f"fastpatch.run.evaluation.x_{name}__mutmut_*"
    for name in ("retain_split", "compute_baseline", "_sorted_call", "check_pairs", "token_pairs",
                 "check_and_tokens", "evaluate")
] + ["fastpatch.run.loop.x__process__mutmut_*"]

GROUPS: dict[str, dict] = {
    "metrics": {"files": ["fastpatch/metrics.py"],
                "tests": ["tests/test_metrics.py", "tests/test_metric_wiring.py"]},
    "runner": {"files": ["fastpatch/run/evaluation.py", "fastpatch/run/loop.py"], "names": _RUNNER_METRIC_CODE,
               "tests": ["tests/test_metric_wiring.py", "tests/test_scores_wiring.py",
                         "tests/test_runner.py::test_retain_split_is_stable_and_disjoint"]},
    "bank": {"files": ["fastpatch/bank.py"], "tests": ["tests/test_bank.py", "tests/test_bank_state.py"]},
    # kernels/ is placed at fastpatch/kernels/ in the scratch copy (the wheel's layout), so mutmut's
    # module names (fastpatch.kernels.*) are the ones the tests import
    "kernels": {"files": ["fastpatch/kernels/reference.py", "fastpatch/kernels/dispatch.py",
                          "fastpatch/kernels/testing.py"], "kernels_inside": True,
                # test_kernels.py in full runs for minutes under the interpreter: its host-activation
                # test covers the activations the other two files do not reach
                "tests": ["tests/test_kernel_reference.py", "tests/test_sparsity.py", "tests/test_patch_loss.py",
                          "tests/test_kernels.py::test_patch_forward_host_activations"]},
    "formats": {"files": ["fastpatch/data/formats.py", "fastpatch/data/records.py"],
                "tests": ["tests/test_formats_errors.py", "tests/test_formats_files.py", "tests/test_formats.py",
                          "tests/test_formats_synthetic.py"]},
    "ffn": {"files": ["fastpatch/ffn.py"], "tests": ["tests/test_ffn_layouts.py", "tests/test_patched_ffn.py"]},
}

#: Statements mutmut leaves alone: log calls (their text and arguments only reach a log).
_LOG_PATTERN = r"^\s*log\.(debug|info|warning|error)\("

KILLED = ("killed", "timeout", "segfault", "suspicious")


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def prepare(name: str, spec: dict) -> Path:
    work = SCRATCH / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    inside = spec.get("kernels_inside", False)
    # docs/: tests compare the manual's tables with the code (tests/test_metrics.py)
    for item in ("fastpatch", "kernels", "tests", "docs", "README.md", "pyproject.toml"):
        src = ROOT / item
        dst = work / "fastpatch" / "kernels" if (item == "kernels" and inside) else work / item
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    shared = ROOT.parent / "shared"
    if shared.is_dir():  # tests/test_formats.py reads ../shared/data beside the checkout
        (work / "shared").symlink_to(shared)
    with open(work / "pyproject.toml", "a", encoding="utf-8") as fh:
        fh.write(
            "\n[tool.mutmut]\n"
            f"source_paths = {_toml_list(['fastpatch'] if inside else ['fastpatch', 'kernels'])}\n"
            f"also_copy = {_toml_list(['README.md', 'docs'])}\n"
            f"only_mutate = {_toml_list(spec['files'])}\n"
            f"pytest_add_cli_args_test_selection = {_toml_list(spec['tests'])}\n"
            f"pytest_add_cli_args = {_toml_list(['-p', 'no:cacheprovider', '-p', 'no:randomly'])}\n"
            "use_git_change_detection = false\n"
            # log statements are not behaviour under test (their text and arguments only reach a log)
            f"do_not_mutate_patterns = {_toml_list([_LOG_PATTERN])}\n"
        )
    return work


def run_group(name: str, spec: dict, children: int) -> dict:
    work = prepare(name, spec)
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1", HF_HUB_OFFLINE="1")
    t0 = time.time()
    with open(work / "run.log", "w") as log:
        subprocess.run([str(MUTMUT), "run", "--max-children", str(children), *spec.get("names", [])],
                       cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    return collect(name, spec, round(time.time() - t0, 1))


def collect(name: str, spec: dict, seconds: float | None = None) -> dict:
    """The results of a group's scratch directory: every mutant run so far (``--collect`` reads
    a run stopped before its end; mutants not run yet are counted apart, as ``not checked``)."""
    work = SCRATCH / name
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1", HF_HUB_OFFLINE="1")
    res = subprocess.run([str(MUTMUT), "results", "--all", "true"], cwd=work, env=env, capture_output=True, text=True)
    status: dict[str, str] = {}
    for line in res.stdout.splitlines():
        m = re.match(r"\s+(\S+): (.+)$", line)
        if m:
            status[m.group(1)] = m.group(2).strip()
    patterns = spec.get("names")
    if patterns:
        import fnmatch

        status = {k: v for k, v in status.items() if any(fnmatch.fnmatch(k, p) for p in patterns)}
    unchecked = sum(1 for st in status.values() if st == "not checked")
    status = {k: v for k, v in status.items() if v != "not checked"}
    alive = [m for m, st in sorted(status.items()) if st not in KILLED]
    diffs = _diffs(work, env, alive)
    survivors = [{"mutant": m, "status": status[m], "diff": diffs.get(m, [])} for m in alive]
    counts: dict[str, int] = {}
    for st in status.values():
        counts[st] = counts.get(st, 0) + 1
    killed = sum(counts.get(k, 0) for k in KILLED)
    total = len(status)
    return {"group": name, "files": spec["files"], "tests": spec["tests"], "mutants": total, "killed": killed,
            "score": round(killed / total, 4) if total else None, "counts": counts, "not_run": unchecked,
            "seconds": seconds, "survivors": survivors}


_DIFFS = """
import json, sys
from mutmut.__main__ import find_mutant, get_diff_for_mutant
out = {}
for name in json.load(sys.stdin):
    text = get_diff_for_mutant(name, path=find_mutant(name).path)
    out[name] = [ln for ln in text.splitlines() if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]
print(json.dumps(out))
"""


def _diffs(work: Path, env: dict, names: list[str]) -> dict[str, list[str]]:
    """Each mutant's diff, read in one process (``mutmut show`` per mutant reloads everything)."""
    if not names:
        return {}
    res = subprocess.run([sys.executable, "-c", _DIFFS], cwd=work, env=env, input=json.dumps(names),
                         capture_output=True, text=True)
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        print(f"could not read the diffs: {res.stderr[-2000:]}", file=sys.stderr)
        return {}


def summary_md(results: list[dict]) -> str:
    lines = ["# Mutation score (mutmut 3, `make mutation`)", "",
             "| group | files | mutants | killed | score | survivors |", "|---|---|---|---|---|---|"]
    for r in results:
        score = "-" if not r["mutants"] else f"{100 * r['killed'] / r['mutants']:.1f}%"  # not the rounded score
        if r.get("not_run"):
            score += f" ({r['not_run']} not run)"
        lines.append(f"| {r['group']} | {', '.join(r['files'])} | {r['mutants']} | {r['killed']} | {score} | "
                     f"{len(r['survivors'])} |")
    lines.append("")
    for r in results:
        if not r["survivors"]:
            continue
        lines += [f"## {r['group']}: surviving mutants", ""]
        for s in r["survivors"]:
            lines.append(f"- `{s['mutant']}` ({s['status']}): " + " / ".join(f"`{d}`" for d in s["diff"][:4]))
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    only_collect = "--collect" in argv
    argv = [a for a in argv if a != "--collect"]
    names = argv or list(GROUPS)
    unknown = [n for n in names if n not in GROUPS]
    if unknown:
        print(f"unknown groups {unknown}; choose from {list(GROUPS)}", file=sys.stderr)
        return 2
    if not MUTMUT.is_file():
        print(f"{MUTMUT} not found: pip install mutmut (the dev extra)", file=sys.stderr)
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    children = int(os.environ.get("MUTATION_CHILDREN", "1"))
    for name in names:
        r = collect(name, GROUPS[name]) if only_collect else run_group(name, GROUPS[name], children)
        write_json_atomic(OUT / f"{name}.json", r)
        print(f"{name}: {r['killed']}/{r['mutants']} killed ({r['score']}) in {r['seconds']}s; "
              f"{len(r['survivors'])} survivors", flush=True)
    # the groups' results only (planted.json of benchmarks/planted_bugs.py lives beside them)
    results = [json.loads((OUT / f"{g}.json").read_text(encoding="utf-8")) for g in sorted(GROUPS)
               if (OUT / f"{g}.json").is_file()]
    write_atomic(OUT / "summary.md", summary_md(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
