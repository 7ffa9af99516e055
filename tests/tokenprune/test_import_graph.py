"""visattn.tokenprune has no import cycles: the module-level import graph of its modules is acyclic (static, from
the source), and every module imports first in a fresh interpreter (-m slow). Kernels never import transformers."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(ROOT, "visattn", "tokenprune")


def _modules() -> dict[str, str]:
    """``{module name: path}`` of every module of the package."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, file), ROOT)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, file)
    return out


def _top_level_imports(path: str, modules: dict[str, str]) -> set[str]:
    """Package modules imported at module level (imports inside functions run later and cannot form a cycle)."""
    tree = ast.parse(open(path).read())
    found = set()
    for node in tree.body:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from pkg import submodule`` needs the submodule; ``from module import name`` the module
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        found |= {n for n in names if n in modules}
    return found


def test_module_level_import_graph_is_acyclic():
    modules = _modules()
    # parent packages are left out: a package's __init__ importing its own submodules is how packages work
    graph = {name: _top_level_imports(path, modules) - {name} for name, path in modules.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_kernels_never_import_transformers():
    for name, path in _modules().items():
        if ".kernels" not in name:
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "transformers" for n in names), name


@pytest.mark.slow
def test_every_module_imports_first_in_a_fresh_interpreter():
    failures = []
    for name in sorted(_modules()):
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
        if proc.returncode:
            failures.append((name, proc.stderr.strip().splitlines()[-1:]))
    assert not failures, failures
