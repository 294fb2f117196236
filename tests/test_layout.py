"""Code layout (issue #23): no function in the library packages runs over 60 lines, so each one can be read whole.

A function's length is ``end_lineno - lineno + 1`` of its ``def`` (decorators excluded, nested functions counted
in their parent as well as on their own)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ff_engine", "kernels", "model_adapters")
MAX_LINES = 60


def long_functions(max_lines: int = MAX_LINES) -> list[str]:
    found = []
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > max_lines:
                        found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    return found


def test_packages_are_there():
    assert all((REPO / pkg).is_dir() for pkg in PACKAGES)


def test_no_library_function_is_longer_than_60_lines():
    found = long_functions()
    assert not found, f"functions over {MAX_LINES} lines (split them into helpers):\n" + "\n".join(found)
