"""The package's import graph, function-level imports included, has no cycle; and loading the
plugin imports no heavy library."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pytest_diffeval"


def module_names(root: Path) -> dict[str, Path]:
    """``{"pkg.sub.mod": path}`` for every module under the package folder ``root``."""
    names = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """Which of the package's modules each module imports, anywhere in its body (function-level
    imports count: an import that dodges a cycle by running late is still a cycle)."""
    modules = module_names(root)
    package = root.name
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [f"{module}.{alias.name}" for alias in node.names] + [module]
            for target in targets:
                while target and target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in modules and target != name and target.split(".")[0] == package:
                    graph[name].add(target)
                    break
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph(PACKAGE)
    assert len(graph) > 30 and sum(map(len, graph.values())) > 50  # the walk found the package's imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_a_function_level_cycle_is_found(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from . import b\n")
    (package / "b.py").write_text("def f():\n    from .sub.c import g\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "c.py").write_text("def g():\n    from ..a import x\n")
    assert find_cycle(import_graph(package)) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]
    (package / "sub" / "c.py").write_text("import os\n")
    assert find_cycle(import_graph(package)) is None


@pytest.mark.parametrize("module", ["pytest_diffeval", "pytest_diffeval.plugin"])
def test_loading_the_plugin_imports_no_heavy_library(module: str) -> None:
    code = (f"import sys, {module}; heavy = [m for m in ('torch', 'diffusers', 'transformers', 'torchmetrics') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_pytest_fixtures_lists_this_repositorys_fixtures_without_an_internal_error() -> None:
    """Two test modules that imported one fixture function tied on ``--fixtures``' sort key
    (same module, path and name): INTERNALERROR.  Shared fixtures live in tests/conftest.py."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "pytest", "--fixtures", "-p", "no:cacheprovider",
                           "tests/test_report.py", "tests/test_review.py", "tests/test_baselines.py"],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "INTERNALERROR" not in done.stdout + done.stderr, done.stdout[-2000:]
    assert "user_project" in done.stdout and "scenario" in done.stdout
