"""The front page (README.md) and the docs: the opening example runs as written, the front page
stays a front page, and every relative link of README.md and docs/ points at a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def test_readme_opening_example_runs(tmp_path, monkeypatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {})
    assert (tmp_path / "patches.safetensors").is_file()


def test_readme_is_a_front_page() -> None:
    text = README.read_text()
    for part in ("## Two commands", "`make demo`", "`make test`", "## Architecture", "## Results",
                 "docs/manual.md", "docs/architecture.md", "docs/results.md"):
        assert part in text, part
    assert len(text.splitlines()) < 150, "the manual and the full results belong in docs/"
    summary = text[text.index("<!-- summary:start -->"):text.index("<!-- summary:end -->")]
    assert "benchmarks/results/demo/summary.json" in summary  # rendered by benchmarks/update_readme.py
    results = (ROOT / "docs" / "results.md").read_text()
    assert "<!-- results:start -->" in results and "<!-- results:end -->" in results
    manual = (ROOT / "docs" / "manual.md").read_text()
    assert "**Pinned versions.**" in manual and "**The `kernels/` folder**" in manual


def test_relative_links_resolve() -> None:
    missing = []
    for doc in [README, *DOCS]:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"(https?:|mailto:|#)", target):
                continue
            path = (doc.parent / target.split("#")[0]).resolve()
            if not path.exists():
                missing.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not missing, missing
