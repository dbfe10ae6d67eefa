"""The shape of the package, checked: no import circles, few imports hidden in functions, short functions.

The layers themselves are import-linter's contract in pyproject.toml (`lint-imports`, run by
.ci/run); these tests hold what a layers contract cannot say.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "freefuse"
#: Imports of FreeFuse's own modules made inside a function, at most: each one is for start-up
#: time (`--help` and a flag's mistake need no torch) or an optional extra (Gradio).
MAX_FUNCTION_IMPORTS = 20
MAX_FUNCTION_LINES = 100
#: Functions allowed to be longer: the two-stage loop reads best as one numbered whole.
LONG_FUNCTIONS = {("pipeline.py", "generate")}


def modules() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(), str(path))) for path in sorted(SRC.rglob("*.py"))]


def own_import(node: ast.AST) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or (node.module or "").startswith("freefuse")
    return isinstance(node, ast.Import) and any(alias.name.startswith("freefuse") for alias in node.names)


def function_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """Own-module imports inside functions (not under `if TYPE_CHECKING:`): (line, source)."""
    found = []
    for function in ast.walk(tree):
        if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            for node in ast.walk(function):
                if own_import(node):
                    found.append((node.lineno, ast.unparse(node)))
    return sorted(set(found))


def test_no_import_circle_among_the_packages_modules() -> None:
    grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter (dev extras)")
    graph = grimp.build_graph("freefuse", exclude_type_checking_imports=True, cache_dir=None)
    circles = sorted(
        {
            tuple(sorted((module, imported)))
            for module in graph.modules
            for imported in graph.find_modules_directly_imported_by(module)
            if imported != module and graph.chain_exists(importer=imported, imported=module)
        }
    )
    assert not circles, f"import circles: {circles}"


def test_imports_hidden_in_functions_are_few_and_said_why() -> None:
    found = []
    for path, tree in modules():
        lines = path.read_text().splitlines()
        for line, source in function_imports(tree):
            text = lines[line - 1]
            found.append((path.relative_to(SRC), line, source, text))
    assert len(found) <= MAX_FUNCTION_IMPORTS, "\n".join(f"{p}:{n}: {s}" for p, n, s, _ in found)
    unexplained = [f"{path}:{line}: {source}" for path, line, source, text in found if "#" not in text]
    assert not unexplained, "say why each import waits for its function (start-up time, an extra):\n" + "\n".join(
        unexplained
    )


def test_no_function_is_longer_than_a_screenful_or_two() -> None:
    long = []
    for path, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and (path.name, node.name) not in LONG_FUNCTIONS:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}: {length} lines")
    assert not long, "\n".join(long)


def test_the_checks_see_what_they_check(tmp_path) -> None:
    """The AST checks above find a hidden import and a long function when there is one."""
    tree = ast.parse("def f():\n    from .core import MaskSet\n    " + "x = 1\n    " * 120 + "return x\n")
    assert function_imports(tree) == [(2, "from .core import MaskSet")]
    [function] = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)]
    assert function.end_lineno - function.lineno + 1 > MAX_FUNCTION_LINES
