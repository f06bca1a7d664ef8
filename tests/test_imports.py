"""What importing wqsupervisor costs, and that no module of the package imports itself back."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import wqsupervisor
from wqsupervisor import batch
from wqsupervisor.rules import BACKEND_NAMES, WORKER_SYSTEMS

from support import python_env

PACKAGE = Path(wqsupervisor.__file__).parent

# Modules the public import must not load: the engine and what it drives, and the optional extras.
HEAVY = (
    "wqsupervisor.engine",
    "wqsupervisor.tunnel",
    "wqsupervisor.connection",
    "wqsupervisor.remote",
    "wqsupervisor.openssh",
    "wqsupervisor.paramiko_backend",
    "wqsupervisor.jobs",
    "wqsupervisor.batch",
    "paramiko",
    "rich",
    "prometheus_client",
    "matplotlib",
    "asyncio",
)

_LOADED = """
import json, sys
import wqsupervisor
for name in wqsupervisor.__all__:
    getattr(wqsupervisor, name)
print(json.dumps(sorted(sys.modules)))
"""


def test_the_public_import_is_light():
    """import wqsupervisor and every name in __all__ load no engine, tunnel, backend, batch system or extra."""
    out = subprocess.run(
        [sys.executable, "-c", _LOADED],
        capture_output=True,
        text=True,
        env=python_env(),
        timeout=60,
        check=True,
    ).stdout
    loaded = json.loads(out)
    heavy = sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY))
    assert heavy == [], f"import wqsupervisor loads {heavy}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at module level or inside functions, except under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports, read from the sources."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    start = ".".join(base + ([node.module] if node.module else []))
                else:
                    start = node.module or ""
                # "from X import y" needs X.y when y is a module of its own, else X itself.
                targets = [
                    f"{start}.{alias.name}" if f"{start}.{alias.name}" in modules else start
                    for alias in node.names
                ]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    done: set[str] = set()
    for root in sorted(graph):
        if root in done:
            continue
        path: list[str] = []
        on_path: set[str] = set()
        stack: list[tuple[str, list[str]]] = [(root, sorted(graph[root]))]
        path.append(root)
        on_path.add(root)
        while stack:
            node, children = stack[-1]
            if not children:
                stack.pop()
                path.pop()
                on_path.discard(node)
                done.add(node)
                continue
            child = children.pop(0)
            if child in on_path:
                return [*path[path.index(child) :], child]
            if child not in done:
                stack.append((child, sorted(graph[child])))
                path.append(child)
                on_path.add(child)
    return None


def test_the_cycle_finder_finds_a_cycle():
    """find_cycle reports a cycle as a closed path, and None for a graph without one."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_import_graph_sees_relative_function_level_imports():
    """The graph holds module-level and function-level relative imports, and skips TYPE_CHECKING ones."""
    graph = import_graph()
    assert "wqsupervisor.protocol" in graph["wqsupervisor.supervisor"]
    assert "wqsupervisor.status" in graph["wqsupervisor.cli"]  # imported inside main()
    assert "wqsupervisor.batch" in graph["wqsupervisor.jobs"]  # imported inside build_tracker()
    assert "wqsupervisor.batch" not in graph["wqsupervisor.config"]


def test_no_import_cycle_in_the_package():
    """No module of wqsupervisor imports, directly or not, a module that imports it back."""
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_config_names_every_backend():
    """The backend names config validates are exactly the transports the backends module knows."""
    from wqsupervisor.backends import BACKENDS

    assert set(BACKENDS) == set(BACKEND_NAMES)


def test_config_names_every_worker_system():
    """The worker-system names config validates are exactly the batch registry's, in its order."""
    assert tuple(batch.SYSTEMS) == WORKER_SYSTEMS
