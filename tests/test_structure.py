"""The structure drawn from the imports (issue 21): no import circles among exo_lab's modules,
counting the imports inside functions too (a lazy import is still an arrow), and no test
module importing another test module (shared pieces live in helper modules and conftest.py).

``python tests/test_structure.py [module ...]`` prints the figures: modules, arrows, circles,
and what each named module imports.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "exo_lab"


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its file. The package itself is
    no target: ``exo_lab/__init__`` only re-exports names lazily, and Python runs it before any
    submodule anyway."""
    known = modules()
    graph = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, package)
                subs = {f"{base}.{alias.name}" for alias in node.names} & known.keys()
                targets.update(subs if len(subs) == len(node.names) else subs | {base})
        graph[name] = {t for t in targets if t in known and t not in (name, PACKAGE)}
    return graph


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    parts = parts[:len(parts) - node.level + 1]
    return ".".join(parts + ([node.module] if node.module else []))


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph)))
    try:
        for node in graph:
            if node not in index:
                visit(node)
    finally:
        sys.setrecursionlimit(limit)
    return found


def test_no_import_circles_even_through_imports_inside_functions():
    found = circles(import_graph())
    assert not found, "import circles (break each by moving the shared piece down a layer): " + \
        "; ".join(" <-> ".join(c) for c in found)


def test_the_circle_finder_finds_a_circle():
    """The check above can fail: a made-up graph with a circle is reported."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]


def test_no_test_module_imports_another():
    tests = Path(__file__).resolve().parent
    names = {path.stem for path in tests.glob("test_*.py")}
    offenders = []
    for path in tests.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            imported = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                        else [node.module] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{path.name} imports {name}" for name in imported if name in names]
    assert not offenders, "move what is shared to a helper module or conftest.py: " + ", ".join(offenders)


if __name__ == "__main__":
    graph = import_graph()
    print(f"modules {len(graph)}, arrows {sum(len(t) for t in graph.values())}, circles {len(circles(graph))}")
    for circle in circles(graph):
        print("  circle:", " <-> ".join(circle))
    for module in sys.argv[1:]:
        print(f"{module} imports {len(graph[module])}: {', '.join(sorted(graph[module]))}")
