"""The house's structure: two floors in bench/, methods and datasets between them, no import circle.

Every import statement of the project's packages counts, wherever it stands (module level, inside a
function, under ``TYPE_CHECKING``): a circle through a lazy import is still a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bench", "methods", "datasets")
FOUNDATION = "bench.core"
ORCHESTRATION_FILES_LIMIT = 500  # lines of one module of bench/


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {_module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an imported name belongs to (``bench.core.records.RunDir`` -> ``bench.core.records``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                imported = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            for item in imported:
                target = _resolve(item, modules)
                if target is not None and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
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
    return found


def _floor(module: str) -> str:
    if module == FOUNDATION or module.startswith(FOUNDATION + "."):
        return "foundation"
    return module.split(".")[0]  # bench (orchestration), methods, datasets


# What each floor may import, besides itself.
ALLOWED = {
    "foundation": {"foundation"},
    "methods": {"foundation", "methods"},
    "datasets": {"foundation", "datasets"},
    "bench": {"foundation", "methods", "datasets", "bench"},
}


def test_the_circle_finder_finds_circles() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    modules = project_modules()
    graph = import_graph(modules)
    # bench.cli imports bench.runner inside a function only.
    assert "bench.runner" in graph["bench.cli"]
    assert "bench.core.records" in graph["bench.core.artifacts"]


def test_no_import_circle_anywhere() -> None:
    assert circles(import_graph(project_modules())) == []


def test_each_floor_imports_only_what_is_below_it() -> None:
    graph = import_graph(project_modules())
    wrong = [f"{module} -> {target}" for module, targets in sorted(graph.items()) for target in sorted(targets)
             if _floor(target) not in ALLOWED[_floor(module)]]
    assert wrong == []


@pytest.mark.parametrize("module", sorted(m for m in project_modules() if m.startswith("bench")))
def test_modules_of_bench_stay_small(module: str) -> None:
    lines = project_modules()[module].read_text().count("\n")
    assert lines <= ORCHESTRATION_FILES_LIMIT, f"{module}: {lines} lines; split it by concern"
