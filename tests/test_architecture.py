"""The architecture, checked from the modules' imports (ast, nothing imported): no import cycle
among the project's modules, the core never imports the demo app (``fastpatch.app``), and no
module of ``fastpatch/`` grows past the size the issue set (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP = "fastpatch.app"
#: Entry points that sit above both the core and the app.
TOP = {"fastpatch.cli"}
MAX_MODULE_LINES = 500


def _modules() -> dict[str, Path]:
    """Module name -> file, for fastpatch/ and kernels/ (installed as fastpatch.kernels)."""
    out: dict[str, Path] = {}
    for base, prefix in ((ROOT / "fastpatch", "fastpatch"), (ROOT / "kernels", "fastpatch.kernels")):
        for f in sorted(base.rglob("*.py")):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = f
    return out


def _is_package(name: str, mods: dict[str, Path]) -> bool:
    return name == "fastpatch.kernels" or mods.get(name, Path()).name == "__init__.py"


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports (module level, in functions, and for type checking)."""
    package = name if _is_package(name, mods) else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in mods:  # `import fastpatch.x.y` names module fastpatch.x.y or a package above
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {name: _imports(name, path, mods) for name, path in mods.items()}
    # A package's __init__ re-exports its submodules; an edge into the package is an edge into
    # what it re-exports, so packages are kept as nodes (a cycle through an __init__ counts).
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _without_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Edges from a package's ``__init__`` to its own submodules are re-exports, and an import of
    ``pkg.sub`` runs ``pkg/__init__`` first; neither is a dependency of the design, so a package's
    own init is left out of the cycles among its submodules."""
    mods = _modules()
    out: dict[str, set[str]] = {}
    for v, ws in graph.items():
        if _is_package(v, mods):
            ws = {w for w in ws if not w.startswith(v + ".")}
        out[v] = ws
    return out


def test_no_import_cycle() -> None:
    cycles = _cycles(_without_package_inits(_graph()))
    assert cycles == [], f"import cycles among project modules: {cycles}"


def test_core_never_imports_the_app() -> None:
    graph = _graph()
    bad = {v: sorted(w for w in ws if w == APP or w.startswith(APP + "."))
           for v, ws in graph.items() if not (v == APP or v.startswith(APP + ".")) and v not in TOP}
    bad = {v: ws for v, ws in bad.items() if ws}
    assert bad == {}, f"core modules import the demo app: {bad}"


def test_the_graph_sees_real_edges() -> None:
    """The checks above are only as good as the graph: it must see the edges we know exist."""
    g = _graph()
    assert "fastpatch.run.loop" in g and "fastpatch.run.checkpoint" in g["fastpatch.run.loop"]
    assert "fastpatch.report" in g["fastpatch.run.loop"]  # a lazy import inside a function
    assert "fastpatch.kernels.reference" in g["fastpatch.ffn"]
    assert "fastpatch.app.registry" in g["fastpatch.cli"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_modules_stay_small() -> None:
    big = {name: n for name, path in _modules().items() if name.startswith("fastpatch.") and
           not name.startswith("fastpatch.kernels") and (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert big == {}, f"modules over {MAX_MODULE_LINES} lines: {big}"


def test_benchmark_scripts_stay_small() -> None:
    """The benchmark and rendering scripts follow the same size rule as the library."""
    scripts = (ROOT / "benchmarks").glob("*.py")
    big = {p.name: n for p in scripts if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert big == {}, f"benchmark scripts over {MAX_MODULE_LINES} lines: {big}"
