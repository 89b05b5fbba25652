"""The layers stay layers: no import cycle among the project's modules, and no private name (one starting with
"_") imported from another module of the project.

Every module of labelstudio_backend/ and dinov/ is parsed with ast; imports at the top and inside functions
count alike. An edge is an explicit import (`import a.b`, `from a.b import c` -> a.b, or a.b.c when c is a
module); the implicit import of a parent package that Python performs is not an edge, so a package's
__init__ may re-export its submodules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("labelstudio_backend", "dinov")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    """module name -> file, for every .py file of the project's packages."""
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def imports_of(name: str, path: Path, modules: set[str]) -> list[tuple[str, str | None]]:
    """(imported project module, imported name or None) for every import statement of the module."""
    is_package = path.name == "__init__.py"
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name in modules]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package (its own name for a package's __init__)
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in modules:
                    found.append((submodule, None))
                elif base in modules:
                    found.append((base, alias.name))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: {target for target, _ in imports_of(name, path, set(modules)) if target != name}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle [a, b, ..., a] of the directed graph, or None (depth-first search, colouring nodes)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"x": {"a"}, "a": {"b", "d"}, "b": set(), "d": {"a"}}) == ["a", "d", "a"]


def test_imports_are_read_inside_functions_and_relative(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("def _secret(): pass\n")
    module = package / "high.py"
    module.write_text("def late():\n    from .low import _secret\n    import pkg.low\n")
    modules = {"pkg", "pkg.low", "pkg.high"}
    found = imports_of("pkg.high", module, modules)
    assert sorted(found, key=str) == [("pkg.low", "_secret"), ("pkg.low", None)]  # what the private check sees


def test_the_project_has_no_import_cycle():
    graph = import_graph()
    assert "labelstudio_backend.serving.backend" in graph and "dinov.predictor" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_name_is_imported_from_another_module():
    modules = project_modules()
    borrowed = [f"{name} imports {name_imported} from {target}"
                for name, path in modules.items()
                for target, name_imported in imports_of(name, path, set(modules))
                if name_imported and name_imported.startswith("_") and target != name]
    assert borrowed == []


# The backend's packages, lowest first: each imports only from packages before it (and from itself). The top-level
# modules (errors, url_policy, settings) come first; http/ is where a request enters.
BACKEND_ORDER = ("errors", "url_policy", "settings", "labelstudio", "store", "fetching", "runtime", "references",
                 "serving", "training", "bulk", "http")
MAX_MODULE_LINES = 450
MAX_TOP_LEVEL_BACKEND_MODULES = 6


def backend_part(module: str) -> str | None:
    """The package (or top-level module) of labelstudio_backend that a module belongs to; None for the root."""
    parts = module.split(".")
    return parts[1] if parts[0] == "labelstudio_backend" and len(parts) > 1 else None


def layering_violations(graph: dict[str, set[str]], order: tuple[str, ...]) -> list[str]:
    """Edges from a backend package to one that is not below it in `order`."""
    rank = {name: i for i, name in enumerate(order)}
    found = []
    for source, targets in graph.items():
        low = backend_part(source)
        for target in targets:
            high = backend_part(target)
            if low is None or high is None or low == high:
                continue
            if rank.get(high, len(order)) >= rank.get(low, len(order)):
                found.append(f"{source} imports {target} ({low} must not import {high})")
    return sorted(found)


def test_the_layering_check_finds_an_upward_import():
    graph = {"labelstudio_backend.store.work": {"labelstudio_backend.http.app"},
             "labelstudio_backend.http.app": {"labelstudio_backend.store.work"}}
    assert layering_violations(graph, BACKEND_ORDER) == [
        "labelstudio_backend.store.work imports labelstudio_backend.http.app (store must not import http)"]


def test_backend_packages_import_only_from_packages_below_them():
    graph = import_graph()
    parts = {backend_part(name) for name in graph} - {None}
    assert parts <= set(BACKEND_ORDER), f"place these in BACKEND_ORDER: {sorted(parts - set(BACKEND_ORDER))}"
    assert layering_violations(graph, BACKEND_ORDER) == []


def test_the_backend_has_few_top_level_modules():
    top = sorted(p.name for p in (ROOT / "labelstudio_backend").glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_BACKEND_MODULES, top


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_is_oversized(package):
    sizes = {module_name(p): len(p.read_text().splitlines()) for p in (ROOT / package).rglob("*.py")}
    assert {name: lines for name, lines in sizes.items() if lines > MAX_MODULE_LINES} == {}
