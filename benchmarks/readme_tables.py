"""Shared formatting of the rendered results (``update_readme.py``, ``readme_streams.py``): the
repository's paths and one Markdown table style, so every table of the results looks the same."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RES = ROOT / "benchmarks" / "results"


def fmt(v, nd=4) -> str:
    """A cell: 4 significant digits, thousands separated, an en dash for a missing value."""
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def table(header: list[str], rows: list[list]) -> list[str]:
    """A Markdown table (its lines) with every cell through :func:`fmt`."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return out
