"""The packages' floors point down only: an import that runs back up fails here, with the line that does it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
JOB = ("pipelines.nightly", "pipelines.runners", "pipelines.scratch", "pipelines.cli", "pipelines.serve")
# Files under a folder (or one file), and the first-party modules they may not import (prefixes).
RULES = {
    "transforms": ("pipelines", "benchmarks", "demo", "tests"),
    "transforms/config.py": ("transforms", "pipelines"),
    "pipelines/search": (*JOB, "pipelines.health"),
    "pipelines/health": JOB,
    "demo": ("pipelines", "benchmarks", "tests"),
}


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, module) for every import in a module's source, at any depth, relative ones made absolute."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*module.split(".")[:-node.level], *([base] if base else [])])
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def upward_imports(root: Path, rules: dict[str, tuple[str, ...]]) -> list[str]:
    problems = []
    for scope, forbidden in rules.items():
        files = [root / scope] if scope.endswith(".py") else sorted((root / scope).rglob("*.py"))
        for path in files:
            module = ".".join(path.relative_to(root).with_suffix("").parts)
            for line, name in imported_modules(path.read_text(encoding="utf-8"), module):
                if any(name == f or name.startswith(f"{f}.") for f in forbidden):
                    problems.append(f"{path.relative_to(root)}:{line} imports {name}")
    return problems


def test_no_module_imports_a_floor_above_its_own():
    assert upward_imports(ROOT, RULES) == []


@pytest.mark.parametrize(("source", "caught"), [
    ("from pipelines.search.query import Table\n", "transforms/stage.py:1 imports pipelines.search.query.Table"),
    ("import os\nfrom pipelines import nightly\n", "transforms/stage.py:2 imports pipelines.nightly"),
    ("def late():\n    import pipelines.cli\n", "transforms/stage.py:2 imports pipelines.cli"),
    ("from ..pipelines import serve\n", "transforms/stage.py:1 imports pipelines.serve"),
])
def test_an_upward_import_is_caught_wherever_it_is_written(tmp_path, source, caught):
    (tmp_path / "transforms").mkdir()
    (tmp_path / "transforms" / "stage.py").write_text(source, encoding="utf-8")
    assert upward_imports(tmp_path, {"transforms": ("pipelines",)}) == [caught]
