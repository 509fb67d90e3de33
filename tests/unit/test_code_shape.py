"""The shape of the code, as docs/architecture.md states it: the package root shows the architecture (at most 10
modules beside the sub-packages), and no function is longer than 60 lines, docstring included, unless the
architecture document names it with its reason."""

from __future__ import annotations

import ast
import re

from tests.conftest import ROOT

PACKAGE = ROOT / "vime_spmd"
MAX_FUNCTION_LINES = 60


def long_functions() -> dict[str, int]:
    """`path::name` -> lines (decorators and docstring included) of every function over the limit."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                    found[f"{path.relative_to(ROOT)}::{node.name}"] = node.end_lineno - start + 1
    return found


def named_exceptions() -> set[str]:
    """The `path::name` entries of architecture.md's section on long functions."""
    text = (ROOT / "docs/architecture.md").read_text()
    section = text.split("## Functions over 60 lines", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`(vime_spmd/[\w/]+\.py::\w+)`", section))


def test_no_function_is_longer_than_60_lines_unless_the_architecture_names_it():
    unnamed = {k: v for k, v in long_functions().items() if k not in named_exceptions()}
    assert unnamed == {}, f"shorten these, or name them with the reason in docs/architecture.md: {unnamed}"


def test_every_named_exception_is_still_long():
    assert named_exceptions() <= set(long_functions()), "docs/architecture.md names a function that is now short"


def test_the_package_root_holds_at_most_ten_modules():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= 10, modules
