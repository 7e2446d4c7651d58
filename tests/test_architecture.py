"""The layout the README's Architecture section describes, checked: layers, no import cycles,
and imports inside functions only where they save start-up time, saying so."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("studio", "guide", "chat", "viz", "demo", "tuning", "evaluation", "merging")


def test_the_layer_contracts_hold():
    done = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                           "sys.exit(lint_imports(no_cache=True, no_logo=True))"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 kept, 0 broken" in done.stdout


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), over every import,
    including those written inside functions."""
    modules = sorted(graph.modules)
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(root: str) -> None:
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next((c for c in children if c in graph.modules), None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])

    for module in modules:
        if module not in index:
            visit(module)
    return found


def test_no_module_imports_itself_through_a_cycle():
    sys.path.insert(0, str(REPO))
    graph = grimp.build_graph(*PACKAGES)
    # a package's __init__ importing its own modules is the package, not a cycle
    for package in graph.modules:
        for child in graph.find_children(package):
            if graph.direct_import_exists(importer=package, imported=child):
                graph.remove_import(importer=package, imported=child)
    assert _cycles(graph) == []


def _function_imports():
    """(file, line, imported module, the lines above it) of every import inside a function."""
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            source = path.read_text(encoding="utf-8")
            lines = source.splitlines()
            for function in ast.walk(ast.parse(source)):
                if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    for node in ast.walk(function):
                        if isinstance(node, (ast.Import, ast.ImportFrom)):
                            module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                            yield path.relative_to(REPO), node.lineno, module, "\n".join(lines[node.lineno - 4:node.lineno])


def test_imports_inside_functions_are_third_party_and_say_they_defer_start_up():
    found = list(_function_imports())
    assert found, "the scan found no function-level import at all: is it still looking in the right place?"
    for path, line, module, context in found:
        assert module.split(".")[0] not in PACKAGES, f"{path}:{line} imports {module} inside a function (a hidden cycle?)"
        assert "Deferred" in context, f"{path}:{line}: say why {module} is imported inside a function ('# Deferred: ...')"


def test_names_the_demo_registers_exist_only_once_demo_is_imported():
    """evaluation and merging know no demo: the suite 'zoo' and the calibration source 'geography'
    are registered by importing demo, as python -m merging, python -m viz and app.py do."""
    probe = ("import sys\n{}from evaluation import load_suite\nfrom merging.calibration import load_examples\n"
             "try:\n    load_suite('zoo'); load_examples('geography', 2)\nexcept Exception as exc:\n"
             "    sys.exit(str(exc))\n")
    without = subprocess.run([sys.executable, "-c", probe.format("")], cwd=REPO, capture_output=True, text=True)
    assert without.returncode != 0 and "zoo" in without.stderr and "none registered" in without.stderr
    with_demo = subprocess.run([sys.executable, "-c", probe.format("import demo\n")], cwd=REPO, capture_output=True,
                               text=True)
    assert with_demo.returncode == 0, with_demo.stderr
