"""The house limits on size, checked on the package itself (README, Layout): no module
over 500 lines, no function over 50 — a long one is split into named steps, and a
constructor or entry point with many knobs takes a config object."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "streamfuse"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 50


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_package_is_found() -> None:
    assert len(_modules()) > 50, PACKAGE


def test_no_module_over_500_lines() -> None:
    long = {str(p.relative_to(PACKAGE)): n for p in _modules() if (n := p.read_text().count("\n")) > MAX_MODULE_LINES}
    assert not long, long


def test_no_function_over_50_lines() -> None:
    long = {}
    for p in _modules():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{p.relative_to(PACKAGE)}:{node.lineno} {node.name}"] = n
    assert not long, long
