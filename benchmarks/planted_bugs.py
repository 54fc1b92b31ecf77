"""The five bugs of issue 18 that once went unnoticed, planted one at a time: each must make its
test file fail. ``python benchmarks/planted_bugs.py`` (a few minutes; the bank's state machine
is the slowest).

Each bug is a literal replacement in one file of the checkout, followed by the test file that
must catch it (``pytest -x``), and the file is restored from a copy whatever happens. The result,
with the first failing test of each, goes to ``benchmarks/results/mutation/planted.json``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fastpatch.atomic import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]

#: (name, file, text, replacement, test file that must fail)
BUGS: list[tuple[str, str, str, str, str]] = [
    ("Loc against the current model instead of the pre-edit baseline", "fastpatch/run/evaluation.py",
     '(run.baseline["loc_tokens"][i][j], now_tokens[loc_index[(p, a)]])',
     '(now_tokens[loc_index[(p, a)]], now_tokens[loc_index[(p, a)]])', "tests/test_metric_wiring.py"),
    ("ER over all requests instead of the edited ones", "fastpatch/run/evaluation.py",
     '"ER": edit_retain_rate([ok[own[i]] for i in st.edited])', '"ER": edit_retain_rate([ok[k] for k in own])',
     "tests/test_metric_wiring.py"),
    ("PatchBank.remove() leaves a removed patch's value in place", "fastpatch/bank.py",
     "        self._values[:m] = self._values.index_select(0, idx)\n", "", "tests/test_bank_state.py"),
    ("the editor's memory margin 3 -> 0", "fastpatch/editor/types.py", "margin: float = 3.0", "margin: float = 0.0",
     "tests/test_editor_loss_settings.py"),
    ("sparsity: every patch listed as firing", "kernels/patch_forward.py", "active = pre.amax(dim=0) > 0",
     "active = pre.amax(dim=0) > -1e30", "tests/test_sparsity.py"),
]


def plant(name: str, rel: str, old: str, new: str, test: str) -> dict[str, object]:
    """Plant one bug, run its test file, restore the file; what happened."""
    path = ROOT / rel
    src = path.read_text(encoding="utf-8")
    if src.count(old) != 1:
        return {"bug": name, "file": rel, "error": f"the text to replace occurs {src.count(old)} times"}
    backup = Path(tempfile.mkdtemp()) / path.name
    shutil.copy2(path, backup)
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    t0 = time.time()
    try:
        path.write_text(src.replace(old, new), encoding="utf-8")
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:randomly", "-p", "no:cacheprovider", test],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    finally:
        shutil.copy2(backup, path)
    failed = [ln.split(" - ")[0].removeprefix("FAILED ") for ln in r.stdout.splitlines() if ln.startswith("FAILED")]
    return {"bug": name, "file": rel, "test_file": test, "caught": r.returncode == 1 and bool(failed),
            "first_failure": failed[0] if failed else None, "seconds": round(time.time() - t0, 1)}


def main() -> int:
    results = [plant(*bug) for bug in BUGS]
    for res in results:
        print(f"{'caught' if res.get('caught') else 'MISSED'}: {res['bug']} -> {res.get('first_failure') or res.get('error')}")
    write_json_atomic(ROOT / "benchmarks" / "results" / "mutation" / "planted.json", {"bugs": results})
    return 0 if all(r.get("caught") for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
