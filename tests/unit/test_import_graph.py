"""The import rules of docs/internals.md ("Layers and packages"), read from the source.

Every import statement counts, wherever it is: at module level, inside a function
(the lazy imports `start` and the daemon rely on) and under TYPE_CHECKING. A lazy
import still ties two modules together, and a circle of them is what these tests
keep out.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
Graph = Mapping[str, set[str]]


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(tree: ast.AST, module: str, is_package: bool) -> Iterable[str]:
    """Every dotted name an import statement in ``tree`` names: for `from a import b`,
    both `a` and `a.b` (b may be a module or a name in a)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")
                package = package if is_package else package[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, *([base] if base else [])])
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def import_graph(root: Path, packages: Iterable[str]) -> dict[str, set[str]]:
    """module -> the modules of ``packages`` it imports (itself excluded)."""
    paths = {
        module_name(root, path): path
        for package in packages
        for path in sorted((root / package).rglob("*.py"))
    }
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        tree = ast.parse(path.read_text(), str(path))
        targets: set[str] = set()
        for name in imported_names(tree, module, path.name == "__init__.py"):
            # The longest prefix that is one of our modules: `a.b.c` may be a name in a.b.
            while name and name not in paths:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def circles(graph: Graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def describe(graph: Graph, component: list[str]) -> str:
    members = set(component)
    return "; ".join(
        f"{m} -> {', '.join(sorted(graph[m] & members))}" for m in component if graph[m] & members
    )


def imports_into(graph: Graph, sources: str, targets: str) -> list[str]:
    """`module -> module` for every import from package ``sources`` into ``targets``."""

    def inside(module: str, package: str) -> bool:
        return module == package or module.startswith(package + ".")

    return sorted(
        f"{module} -> {target}"
        for module, imported in graph.items()
        if inside(module, sources)
        for target in imported
        if inside(target, targets)
    )


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(REPO, ("protocol", "shim", "manager", "crashtest"))


def test_no_import_circle_inside_shim(graph: Graph) -> None:
    shim = {m: {t for t in ts if t.split(".")[0] == "shim"} for m, ts in graph.items()}
    shim = {m: ts for m, ts in shim.items() if m.split(".")[0] == "shim"}
    found = circles(shim)
    assert not found, "import circles: " + " | ".join(describe(shim, c) for c in found)


def test_the_task_model_never_imports_the_boot_machinery(graph: Graph) -> None:
    assert imports_into(graph, "shim.task", "shim.boot") == []


@pytest.mark.parametrize(
    ("sources", "targets"),
    [("shim", "manager"), ("manager", "shim"), ("protocol", "shim"), ("protocol", "manager")],
)
def test_layers_call_downward_only(graph: Graph, sources: str, targets: str) -> None:
    """protocol <- shim <- (binary) <- manager: the manager runs the shim binary."""
    assert imports_into(graph, sources, targets) == []


@pytest.mark.parametrize("package", ["protocol", "shim", "manager"])
def test_the_crash_tool_drives_runtimes_from_outside(graph: Graph, package: str) -> None:
    """crashtest runs containerd, ctr, pyshimd and pyshim as a user would: it imports
    no runtime code (so it tests any runtime alike), and no runtime imports it."""
    assert imports_into(graph, "crashtest", package) == []
    assert imports_into(graph, package, "crashtest") == []


def test_no_import_circle_inside_the_crash_tool(graph: Graph) -> None:
    tool = {m: {t for t in ts if t.startswith("crashtest")} for m, ts in graph.items()}
    tool = {m: ts for m, ts in tool.items() if m.startswith("crashtest")}
    assert len(tool) >= 10, sorted(tool)
    found = circles(tool)
    assert not found, "import circles: " + " | ".join(describe(tool, c) for c in found)


def test_the_graph_sees_every_kind_of_import(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("TYPE_CHECKING = False\nif TYPE_CHECKING:\n    from pkg.b import X\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.sub import c\n")
    (pkg / "sub" / "c.py").write_text("from .. import a\nimport os\n")
    (pkg / "d.py").write_text("import pkg.sub.c as c\nfrom pkg.a import nothing_module\n")
    g = import_graph(tmp_path, ["pkg"])
    assert g["pkg.a"] == {"pkg.b"}
    assert g["pkg.b"] == {"pkg.sub", "pkg.sub.c"}
    assert g["pkg.sub.c"] == {"pkg", "pkg.a"}
    assert g["pkg.d"] == {"pkg.sub.c", "pkg.a"}
    assert circles(g) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    assert imports_into(g, "pkg.sub", "pkg.a") == ["pkg.sub.c -> pkg.a"]
    g["pkg.sub.c"] = {"pkg"}
    assert circles(g) == []
