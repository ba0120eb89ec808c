"""The import graph keeps its shape: no cycle among modules, each package imports only the layers under it, tests and
benches share helpers through ``kdsearch.testing`` (never each other), and storage's private modules stay private.

Every ``.py`` file of the packages below is parsed (nothing is imported): every ``import`` statement counts, at
module level, inside a function or under ``if TYPE_CHECKING:``, since a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kdsearch", "search_space", "storage", "distill", "service", "bench", "tests")
# What each package may import besides itself (and the standard library and third-party packages).
ALLOWED = {
    # The foundation, kdsearch.testing included: every room imports it, so it imports none, not even lazily (it
    # starts the API and workers as commands, ``python -m service.cli``).
    "kdsearch": set(),
    "search_space": {"kdsearch"},
    "storage": {"kdsearch"},
    "distill": {"kdsearch", "search_space", "storage"},
    "service": {"kdsearch", "search_space", "storage", "distill"},
    "bench": {"kdsearch", "search_space", "storage", "distill", "service"},  # never tests: kdsearch.testing
    "tests": {"kdsearch", "search_space", "storage", "distill", "service"},  # never bench: kdsearch.testing
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                found[_module_name(path)] = path
    return found


SOURCES = _sources()


def _imported(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """(dotted name, line) of everything ``module`` imports, anywhere in its file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package (one level up per extra dot)
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:  # ``from a import b``: module a.b when there is one, else a name of a
                yield (f"{source}.{alias.name}" if f"{source}.{alias.name}" in SOURCES else source), node.lineno


def _resolve(name: str) -> str | None:
    """The project module ``name`` is (or is in: ``a.b.name``), None for the standard library or a dependency."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in SOURCES:
            return ".".join(parts[:end])
    return None


def _graph() -> dict[str, dict[str, int]]:
    """module -> {imported project module: line of its first import}."""
    graph: dict[str, dict[str, int]] = {}
    for module, path in SOURCES.items():
        edges = graph.setdefault(module, {})
        for name, line in _imported(module, path):
            target = _resolve(name)
            if target is not None and target != module:
                edges.setdefault(target, line)
    return graph


GRAPH = _graph()


def _where(module: str, target: str) -> str:
    return f"{SOURCES[module].relative_to(ROOT)}:{GRAPH[module][target]} imports {target}"


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a path back to its first module) in each strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(start: str) -> None:  # Tarjan's algorithm, iterative (the graph is deep enough to recurse far)
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)

    for module in sorted(graph):
        if module not in index:
            connect(module)
    cycles = []
    for component in components:  # a shortest way back to the component's first module (breadth first)
        first = min(component)
        came_from: dict[str, str] = {}
        frontier = [first]
        while frontier and first not in came_from:
            following = []
            for node in frontier:
                for child in sorted(graph[node]):
                    if child in component and child not in came_from:
                        came_from[child] = node
                        following.append(child)
            frontier = following
        path = [first]
        while len(path) == 1 or path[-1] != first:
            path.append(came_from[path[-1]])
        cycles.append(path[::-1])
    return cycles


def test_the_graph_is_read() -> None:
    """A guard on the parser: imports at module level, in a function and under TYPE_CHECKING are all seen."""
    assert GRAPH["service.cli"], "service/cli.py imports project modules"
    assert "kdsearch.testing.processes" in GRAPH["kdsearch.testing.hosts"]  # module level
    assert "storage" in GRAPH["tests.conftest"]  # inside a function (queue_unchecked)
    assert not any(module.startswith(("bench.results", "tests.__pycache__")) for module in SOURCES)


def test_no_import_cycle() -> None:
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles:\n" + "\n".join(
        " -> ".join(cycle) + "\n    " + "\n    ".join(_where(a, b) for a, b in itertools.pairwise(cycle))
        for cycle in cycles)


def test_packages_import_only_the_layers_under_them() -> None:
    """kdsearch imports no room; search_space and storage only kdsearch; distill those three; service any room;
    bench and tests any room and never each other."""
    wrong = [_where(module, target) for module, edges in GRAPH.items() for target in edges
             if target.split(".")[0] != module.split(".")[0]
             and target.split(".")[0] not in ALLOWED[module.split(".")[0]]]
    assert not wrong, "imports across the layering:\n" + "\n".join(sorted(wrong))


def test_storage_private_modules_stay_private() -> None:
    """Outside storage/, only the package's public names (``from storage import ...``), never ``storage._*``."""
    wrong = [_where(module, target) for module, edges in GRAPH.items() if module.split(".")[0] != "storage"
             for target in edges if target.startswith("storage.") and target.split(".")[1].startswith("_")]
    assert not wrong, "imports of storage's private modules:\n" + "\n".join(sorted(wrong))
