"""The package layering, read from the source with ``ast`` (no detc module is imported).

Layers, each allowed to import itself and those listed::

    top          detc, detc.compiler (its __init__), compiler.{driver, sweep, bench},
                 compiler.cli.*, compiler.demo.*, compiler.verify.*      → anything
    passes       detc.passes.*                                           → foundation
    targets      detc.targets.*                                          → kernels, foundation
    kernels      detc.kernels.*                                          → (nothing else)
    foundation   compiler.{errors, fileio, reference, tolerances, tensor_compare, frontend},
                 compiler.ir.*, compiler.detection.*                     → (nothing else)

plus one edge: ``detc.compiler.ir.registry`` lists the built-in passes, so it may import
``detc.passes``. Imports inside functions count as much as those at module level (a lazy import
is still a dependency), and an edge goes to the exact module named: ``from detc.a.b import X``
is an edge to ``detc.a.b``, or to ``detc.a.b.X`` when that is a module.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("compiler", "passes", "targets", "kernels")
MAX_LINES = 800
MAX_COMPILER_TOP_FILES = 12

TOP = "top"
FOUNDATION = "foundation"
PASSES = "passes"
TARGETS = "targets"
KERNELS = "kernels"

#: modules (and the modules under them) of each compiler/ layer; anything else in compiler/
#: must be added here first, so that the table stays the truth
COMPILER_LAYERS = {
    "detc.compiler.errors": FOUNDATION,
    "detc.compiler.fileio": FOUNDATION,
    "detc.compiler.reference": FOUNDATION,
    "detc.compiler.tolerances": FOUNDATION,
    "detc.compiler.tensor_compare": FOUNDATION,
    "detc.compiler.frontend": FOUNDATION,
    "detc.compiler.ir": FOUNDATION,
    "detc.compiler.detection": FOUNDATION,
    "detc.compiler.progress": FOUNDATION,
    "detc.compiler.depfile": FOUNDATION,
    "detc.compiler.driver": TOP,
    "detc.compiler.sweep": TOP,
    "detc.compiler.bench": TOP,
    "detc.compiler.cli": TOP,
    "detc.compiler.demo": TOP,
    "detc.compiler.verify": TOP,
}
MAY_IMPORT = {
    FOUNDATION: {FOUNDATION},
    PASSES: {PASSES, FOUNDATION},
    TARGETS: {TARGETS, KERNELS, FOUNDATION},
    KERNELS: {KERNELS},
}
ALLOWED_EXCEPTIONS = {("detc.compiler.ir.registry", "detc.passes")}


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    where: str  # path:line of the import statement

    def __str__(self) -> str:
        return f"{self.source} -> {self.target}  ({self.where})"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["detc", *parts])


def source_files(root: Path) -> list[Path]:
    files = [root / "__init__.py"] if (root / "__init__.py").is_file() else []
    for package in PACKAGES:
        files += sorted(p for p in (root / package).rglob("*.py") if "__pycache__" not in p.parts)
    return files


def _owning_module(name: str, modules: Iterable[str]) -> str | None:
    """The longest prefix of dotted ``name`` that is a detc module (``None`` outside detc)."""
    known = set(modules)
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_edges(root: Path) -> list[Edge]:
    """Every import of one detc module by another, at any depth of the source."""
    paths = {module_name(p, root): p for p in source_files(root)}
    edges = []
    for source, path in paths.items():
        package = source if path.name == "__init__.py" else source.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            named: list[str] = []
            if isinstance(node, ast.Import):
                named = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    named.append(submodule if submodule in paths else base)
            else:
                continue
            where = f"{path.relative_to(root)}:{node.lineno}"
            for name in named:
                target = _owning_module(name, paths)
                if target is not None and target != source:
                    edges.append(Edge(source, target, where))
    return edges


def layer_of(module: str) -> str | None:
    """The layer of a detc module; ``None`` for a compiler/ module in no layer yet."""
    if module in ("detc", "detc.compiler"):
        return TOP
    for prefix, layer in COMPILER_LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return layer
    package = module.split(".")[1]
    return {"passes": PASSES, "targets": TARGETS, "kernels": KERNELS}.get(package)


def layering_violations(edges: Iterable[Edge]) -> list[str]:
    found = set()
    for edge in edges:
        source_layer, target_layer = layer_of(edge.source), layer_of(edge.target)
        for module, layer in ((edge.source, source_layer), (edge.target, target_layer)):
            if layer is None:
                found.add(f"{module} is in no layer: add it to COMPILER_LAYERS in {__file__}")
        if source_layer in (None, TOP) or target_layer is None:
            continue
        if target_layer in MAY_IMPORT[source_layer]:
            continue
        if (edge.source, edge.target) in ALLOWED_EXCEPTIONS:
            continue
        found.add(f"{source_layer} imports {target_layer}: {edge}")
    return sorted(found)


def private_imports(edges: Iterable[Edge]) -> list[str]:
    """Imports of a private module (``_x``) from outside the package that holds it."""
    found = set()
    for edge in edges:
        parts = edge.target.split(".")
        for depth, part in enumerate(parts):
            if part.startswith("_"):
                owner = ".".join(parts[:depth])
                if edge.source != owner and not edge.source.startswith(owner + "."):
                    found.add(f"private module of {owner}: {edge}")
                break
    return sorted(found)


def strongly_connected(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The components of ``graph`` with more than one node (each one an import cycle), sorted.

    Iterative Tarjan: the module graph is deep enough to make recursion a risk.
    """
    nodes = sorted(set(graph) | {w for targets in graph.values() for w in targets})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph.get(succ, ())))))
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
                if len(component) > 1:
                    components.append(sorted(component))
    return sorted(components)


def cycle_report(edges: Iterable[Edge]) -> list[str]:
    """One entry per cycle: its modules, then every import edge that keeps it closed."""
    edges = list(edges)
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
    report = []
    for component in strongly_connected(graph):
        members = set(component)
        inside = sorted(
            {str(e) for e in edges if e.source in members and e.target in members},
        )
        report.append(
            f"cycle of {len(component)} modules {component}:\n    " + "\n    ".join(inside)
        )
    return report


# --- the checks on this repository --------------------------------------------------------------


@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    return import_edges(REPO)


def test_each_layer_imports_only_the_layers_below(edges: list[Edge]) -> None:
    violations = layering_violations(edges)
    assert not violations, "imports across the layering:\n" + "\n".join(violations)


def test_no_module_imports_another_packages_private_module(edges: list[Edge]) -> None:
    offenders = private_imports(edges)
    assert not offenders, "\n".join(offenders)


def test_detc_modules_import_no_cycle(edges: list[Edge]) -> None:
    cycles = cycle_report(edges)
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(cycles)


def test_no_source_file_is_over_the_line_limit() -> None:
    long_files = [
        f"{path.relative_to(REPO)}: {lines} lines"
        for path in source_files(REPO)
        if (lines := len(path.read_text().splitlines())) > MAX_LINES
    ]
    assert not long_files, f"over {MAX_LINES} lines: split by concern\n" + "\n".join(long_files)


def test_compiler_top_level_stays_small() -> None:
    top_files = sorted(p.name for p in (REPO / "compiler").glob("*.py"))
    assert len(top_files) <= MAX_COMPILER_TOP_FILES, (
        f"{len(top_files)} .py files at compiler/'s top (at most {MAX_COMPILER_TOP_FILES}): "
        f"{top_files}"
    )


# --- the checker itself can fail ----------------------------------------------------------------


def test_cycle_finder_finds_cycles_and_only_cycles() -> None:
    graph = {
        "a": {"b"},
        "b": {"c"},
        "c": {"a", "d"},  # a -> b -> c -> a
        "d": {"e"},
        "e": set(),
        "f": {"f"},  # a self-import is not reported: the edge reader never produces one
        "g": {"h"},
        "h": {"g"},
    }
    assert strongly_connected(graph) == [["a", "b", "c"], ["g", "h"]]
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_checks_name_the_offending_edges(tmp_path: Path) -> None:
    """A fake source tree: a kernel importing a target lazily, inside a function, closing a
    cycle, and a pass importing another package's private module."""
    files = {
        "__init__.py": "",
        "compiler/__init__.py": "",
        "compiler/errors.py": "",
        "passes/__init__.py": "",
        "passes/fold.py": "from detc.targets import _secret\nfrom detc.compiler import errors\n",
        "targets/__init__.py": "",
        "targets/_secret.py": "",
        "targets/build.py": "from detc.kernels.conv import schedule\n",
        "kernels/__init__.py": "",
        "kernels/conv.py": "def schedule():\n    from ..targets import build\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = import_edges(tmp_path)
    pairs = {(e.source, e.target) for e in found}
    assert ("detc.kernels.conv", "detc.targets.build") in pairs  # relative, in a function
    assert ("detc.passes.fold", "detc.compiler.errors") in pairs  # `from pkg import module`
    assert ("detc.passes.fold", "detc.compiler") not in pairs

    violations = "\n".join(layering_violations(found))
    assert "kernels imports targets: detc.kernels.conv -> detc.targets.build" in violations
    assert "passes imports targets: detc.passes.fold -> detc.targets._secret" in violations
    assert "detc.passes.fold -> detc.targets._secret" in "\n".join(private_imports(found))
    cycles = cycle_report(found)
    assert len(cycles) == 1
    assert "detc.targets.build -> detc.kernels.conv  (targets/build.py:1)" in cycles[0]
    assert "detc.kernels.conv -> detc.targets.build  (kernels/conv.py:2)" in cycles[0]
