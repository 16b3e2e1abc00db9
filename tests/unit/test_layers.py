"""Imports run one way: cli -> kernel -> audit -> policy -> errors, and never in a circle.

Every import statement of the package counts, also those inside functions and under
TYPE_CHECKING: a lazy import is still an arrow between layers.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "ipe_bpf"

# Rank of each part of the package: a module may import its own part and the parts of lower rank.
RANKS = {
    "errors": 0,
    "bpf_files": 0,  # where bpf/ is: a leaf the header reader (policy) and the loaders use
    "policy": 1,
    "audit": 2,
    "kernel": 3,
    "vm": 3,  # the test VM: a sibling of kernel, neither imports the other
    "service": 4,
    "generate": 4,  # makes policy text from files and records; measures through kernel/
    "cli": 5,
    "demo": 5,
    "__main__": 6,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """The package modules `name` imports (a `from X import y` of a submodule y counts as X.y)."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, path.name == "__init__.py", node)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        yield from (t for t in targets if t == "ipe_bpf" or t.startswith("ipe_bpf."))


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: set(imports(name, path, known)) - {name} for name, path in known.items()}


def part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "errors"  # ipe_bpf/__init__.py holds only __version__


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_every_part_has_a_rank() -> None:
    assert {part(m) for m in modules()} <= set(RANKS)


def test_no_import_runs_back_up() -> None:
    wrong = [f"{a} imports {b}" for a, targets in graph().items() for b in sorted(targets)
             if part(a) != part(b) and RANKS[part(b)] >= RANKS[part(a)]]
    assert wrong == []


def test_no_import_circles() -> None:
    assert cycles(graph()) == []


def test_the_walk_sees_lazy_and_relative_imports() -> None:
    edges = graph()
    assert "ipe_bpf.kernel.loader" in edges["ipe_bpf.cli.kernel"]  # imported inside a function
    assert "ipe_bpf.kernel.bpfsys" in edges["ipe_bpf.kernel.ringbuf"]  # from . import bpfsys
    assert "ipe_bpf.errors" in edges["ipe_bpf.policy.parser"]  # from ..errors import PolicyError


def test_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
