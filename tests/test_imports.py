"""The package's import structure: no import cycles between dist_train modules, and no module reaching
into another package for a private name.

Read from the source with `ast`, not by importing: every import counts, at module level or inside a
function (a lazy import that only dodges a cycle at load time is still a cycle in the design), except
those under `if TYPE_CHECKING:`, which never run.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, NamedTuple

import dist_train

ROOT = Path(dist_train.__file__).resolve().parent
PACKAGE = ROOT.name  # "dist_train"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


# Every module of the package, by dotted name -> its file.
MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
PACKAGES = {name for name, path in MODULES.items() if path.name == "__init__.py"}


class Import(NamedTuple):
    importer: str
    line: int
    target: str  # the dist_train module it loads
    name: str | None  # the name taken from it (`from target import name`), None for `import target`


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Every node under `node` that can run, skipping the bodies of `if TYPE_CHECKING:` (their `else` runs)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.orelse:
                yield stmt
                yield from _runtime_nodes(stmt)
            continue
        yield child
        yield from _runtime_nodes(child)


def _known(dotted: str) -> str | None:
    """The longest prefix of `dotted` that is a dist_train module (`import a.b` of a missing `b` still loads `a`)."""
    parts = dotted.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def imports_of(module: str) -> list[Import]:
    return imports_in(MODULES[module].read_text(), module)


def imports_in(source: str, module: str) -> list[Import]:
    """The dist_train modules that `source`, read as module `module`, imports when it runs."""
    tree = ast.parse(source)
    # The package a relative import starts from: a package's __init__ is inside itself.
    here = module if module in PACKAGES else module.rpartition(".")[0]
    found: list[Import] = []
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _known(alias.name)
                if target is not None:
                    found.append(Import(module, node.lineno, target, None))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source != PACKAGE and not source.startswith(PACKAGE + "."):
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                target = sub if sub in MODULES else _known(source)
                if target is not None:
                    found.append(Import(module, node.lineno, target, alias.name))
    return found


IMPORTS: list[Import] = [imp for module in MODULES for imp in imports_of(module)]


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (the graph is small, but recursion depth should not depend on it)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = counter
                    counter += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    advanced = True
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def import_cycles() -> list[list[str]]:
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for imp in IMPORTS:
        if imp.target != imp.importer:
            graph[imp.importer].add(imp.target)
    return sorted(c for c in _strongly_connected(graph) if len(c) > 1)


def _package_of(module: str) -> str:
    return module if module in PACKAGES else module.rpartition(".")[0]


def test_the_scan_sees_the_package() -> None:
    # Guards the test itself: a resolver that lost its imports would pass vacuously.
    assert "dist_train.cli" in MODULES and "dist_train.runtime" in PACKAGES
    edges = {(imp.importer, imp.target) for imp in IMPORTS}
    assert ("dist_train.cli", "dist_train.errors") in edges
    assert len(edges) > 100


def test_resolution_rules() -> None:
    source = """
from typing import TYPE_CHECKING
import torch
from . import perf
from .. import errors
from ..runtime import env
from dist_train.telemetry import Progress
import dist_train.config.load
if TYPE_CHECKING:
    from dist_train.train import loop
else:
    from dist_train.data import sampler
def lazy():
    from dist_train.optim.muon import Muon
"""
    found = {(imp.target, imp.name) for imp in imports_in(source, "dist_train.telemetry.writers")}
    assert found == {
        ("dist_train.telemetry.perf", "perf"),  # relative, `from pkg import sub`: the submodule
        ("dist_train.errors", "errors"),  # two levels up
        ("dist_train.runtime.env", "env"),
        ("dist_train.telemetry", "Progress"),  # `from pkg import name`: the package's __init__
        ("dist_train.config.load", None),  # no implicit edges to dist_train.config or dist_train
        ("dist_train.data.sampler", "sampler"),  # the else branch of TYPE_CHECKING runs
        ("dist_train.optim.muon", "Muon"),  # inside a function: still an edge
    }  # torch is not ours; the TYPE_CHECKING import of train.loop never runs


def test_strongly_connected_components() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": {"f"}}
    assert sorted(c for c in _strongly_connected(graph) if len(c) > 1) == [["a", "b", "c"], ["d", "e"]]


def test_no_import_cycles() -> None:
    cycles = import_cycles()
    if cycles:
        lines = []
        for component in cycles:
            members = set(component)
            lines.append("cycle: " + ", ".join(component))
            lines += [f"    {imp.importer} (line {imp.line}) imports {imp.target}"
                      + (f" for {imp.name}" if imp.name else "")
                      for imp in IMPORTS if imp.importer in members and imp.target in members
                      and imp.target != imp.importer]
        raise AssertionError(f"{len(cycles)} import cycle(s) among dist_train modules:\n" + "\n".join(lines))


def private_imports() -> list[Import]:
    """Imports of a private name, or of anything from a private module, of another package."""
    found = []
    for imp in IMPORTS:
        if _package_of(imp.importer) == _package_of(imp.target):
            continue
        module_private = imp.target.rpartition(".")[2].startswith("_")
        name_private = imp.name is not None and imp.name.startswith("_")
        if module_private or name_private:
            found.append(imp)
    return found


def test_no_private_names_across_packages() -> None:
    # A leading underscore is a module's own business (or its package's); another package that needs
    # the name needs it public.
    offenders = [f"{imp.importer} (line {imp.line}) imports {imp.name or imp.target} from {imp.target}"
                 for imp in private_imports()]
    assert not offenders, "private names imported across packages:\n" + "\n".join(offenders)
