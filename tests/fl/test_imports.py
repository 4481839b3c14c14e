"""fl/ has no import cycles and its core types import nothing else of fl/ (DESIGN "Extension points")."""

from __future__ import annotations

import ast
from pathlib import Path

FL = Path(__file__).resolve().parents[2] / "src" / "fedtrust" / "fl"


def fl_imports() -> dict[str, set[str]]:
    """Module → the fedtrust.fl modules it imports (any import statement, lazy ones included)."""
    graph = {}
    for path in FL.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            deps |= {n for n in names if n.startswith("fedtrust.fl.")}
            if isinstance(node, ast.ImportFrom) and node.module == "fedtrust.fl":
                deps |= {f"fedtrust.fl.{a.name}" for a in node.names}
        graph[f"fedtrust.fl.{path.stem}"] = deps
    return graph


def test_core_types_import_nothing_else_of_fl():
    """Rules out fl/types.py growing a dependency on the executors or the protocol (the source of cycles)."""
    assert fl_imports()["fedtrust.fl.types"] == set()


def test_fl_has_no_import_cycles():
    """Rules out a cycle such as protocol → local → protocol (what a lazy import used to hide)."""
    graph = fl_imports()
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            assert state.get(dep) != 1, " -> ".join([*path, module, dep])
            if dep in graph and not state.get(dep):
                visit(dep, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if not state.get(module):
            visit(module, [])
