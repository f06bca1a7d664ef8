"""The harness stands apart: the core never imports it, and it has no import cycle inside.

Read from the source with ``ast`` (every import, at any depth of the file), so
a lazy import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from support import REPO

PACKAGE = REPO / "wqsupervisor"
HARNESS = "wqsupervisor.harness"
# The one way in from the core: the CLI loads these, inside the function that
# dispatches the `bench` and `demo` commands.
CLI = "wqsupervisor.cli"
CLI_MAY_LOAD = {"wqsupervisor.harness.bench.suite", "wqsupervisor.harness.demo"}


@dataclass(frozen=True)
class Import:
    """One module a source file imports, and whether the import sits inside a function."""

    target: str
    lazy: bool
    line: int


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> list[Import]:
    """Every module of the package that ``path`` imports, relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend(Import(a.name, lazy, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    module = ".".join([*base, *([child.module] if child.module else [])])
                else:
                    module = child.module or ""
                found.append(Import(module, lazy, child.lineno))
                # `from . import report` imports the module `report`, not a name in `.`.
                found.extend(
                    Import(f"{module}.{a.name}", lazy, child.lineno)
                    for a in child.names
                    if f"{module}.{a.name}" in known
                )
            visit(child, inner)

    visit(tree, False)
    return [i for i in found if i.target in known]


def _graph() -> dict[str, list[Import]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _in_harness(name: str) -> bool:
    return name == HARNESS or name.startswith(HARNESS + ".")


def test_the_walk_sees_the_imports_it_must_judge():
    """The walk finds known imports both ways (the test would pass vacuously otherwise)."""
    graph = _graph()
    assert any(_in_harness(n) for n in graph)
    assert {i.target for i in graph["wqsupervisor.harness.lab"]} >= {
        "wqsupervisor.harness.sandbox",
        "wqsupervisor.process",
    }
    assert {i.target for i in graph[CLI] if _in_harness(i.target)} == CLI_MAY_LOAD


def test_no_core_module_imports_the_harness():
    """Outside the harness, only cli.py loads it, lazily, and only the bench suite and the demo."""
    wrong = [
        f"{name}:{i.line} imports {i.target}"
        for name, imports in _graph().items()
        if not _in_harness(name)
        for i in imports
        if _in_harness(i.target) and not (name == CLI and i.lazy and i.target in CLI_MAY_LOAD)
    ]
    assert wrong == []


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := walk(start)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    """The cycle finder names a cycle where there is one, and none in a chain."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_harness_has_no_import_cycle():
    """No module of the harness imports, through any chain of harness modules, itself."""
    graph = {
        name: {i.target for i in imports if _in_harness(i.target) and i.target != name}
        for name, imports in _graph().items()
        if _in_harness(name)
    }
    assert _cycle(graph) is None


def test_every_module_the_harness_runs_as_a_program_exists():
    """Each ``python -m wqsupervisor...`` the harness spawns names a module that is there."""
    named = set()
    for path in (PACKAGE / "harness").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            is_text = isinstance(node, ast.Constant) and isinstance(node.value, str)
            if is_text and re.fullmatch(r"wqsupervisor(\.\w+)+", node.value):
                named.add(node.value)
    assert "wqsupervisor.harness.labapps" in named
    assert [m for m in sorted(named) if importlib.util.find_spec(m) is None] == []


def test_the_lab_programs_run_as_a_module():
    """``python -m wqsupervisor.harness.labapps`` starts and answers a wrong call with its usage."""
    res = subprocess.run(
        [sys.executable, "-m", "wqsupervisor.harness.labapps"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 2
    assert "usage: python -m wqsupervisor.harness.labapps {app|probe}" in res.stderr
