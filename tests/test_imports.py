"""The modules of src/arrag import each other without a cycle, counting imports inside functions.

An import inside a function hides a cycle from the interpreter until the function runs; it is still a dependency
of the design. Importing ``arrag.a.b`` also runs ``arrag/a/__init__.py``, so a module depends on the packages
above what it imports, except its own: a module's own packages always start before it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import arrag

ROOT = Path(arrag.__file__).parent


def module_names() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by the name of its ``__init__``)."""
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imported(name: str, path: Path, modules: set[str]) -> set[str]:
    """The arrag modules that ``name`` (at ``path``) imports anywhere in its file, with their parent packages."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import module`
    parts = name.split(".")
    own_packages = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    with_parents = set()
    for target in found & modules:
        pieces = target.split(".")
        with_parents |= {".".join(pieces[:i]) for i in range(2, len(pieces) + 1)}
    return (with_parents & modules) - own_packages


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph as a list of nodes (first repeated last), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for successor in sorted(graph[node]):
            if state.get(successor) == "open":
                return [*stack[stack.index(successor) :], successor]
            if successor not in state and (cycle := visit(successor)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    paths = module_names()
    graph = {name: imported(name, path, set(paths)) for name, path in paths.items()}
    assert len(graph) > 50
    assert "arrag.retrieval.database" in graph["arrag.build.pipeline"]  # the graph sees ordinary imports
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_a_module_depends_on_the_packages_above_what_it_imports(tmp_path):
    (tmp_path / "x.py").write_text("def f():\n    from arrag.build.stages import tokenize_shard\n")
    modules = {"arrag", "arrag.build", "arrag.build.stages", "arrag.retrieval", "arrag.retrieval.x"}
    assert imported("arrag.retrieval.x", tmp_path / "x.py", modules) == {"arrag.build", "arrag.build.stages"}
