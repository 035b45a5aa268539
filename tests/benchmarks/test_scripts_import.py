"""Every benchmark script names only things that exist: each `from featurelens... import X` (and each import from a
sibling script) resolves. A script that no longer starts after a refactor cannot back a figure in the docs, and
running them all is far too slow for the suite, so this reads them instead (no model, no torch work)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.py"))


def _top_level_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _is_submodule(module: object, name: str) -> bool:
    try:
        importlib.import_module(f"{module.__name__}.{name}")  # type: ignore[attr-defined]
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_script_imports_resolve(script: Path):
    missing = []
    for node in ast.walk(ast.parse(script.read_text())):
        if not isinstance(node, ast.ImportFrom) or node.level or node.module is None:
            continue
        wanted = [a.name for a in node.names if a.name != "*"]
        if node.module.split(".")[0] == "featurelens":
            module = importlib.import_module(node.module)
            missing += [f"{node.module}.{n}" for n in wanted if not hasattr(module, n) and not _is_submodule(module, n)]
        elif (BENCHMARKS / f"{node.module}.py").is_file():
            have = _top_level_names(BENCHMARKS / f"{node.module}.py")
            missing += [f"{node.module}.{n}" for n in wanted if n not in have]
    assert not missing, f"{script.name} imports names that do not exist: {', '.join(missing)}"


def test_the_check_sees_a_missing_name(tmp_path: Path):
    broken = tmp_path / "broken.py"
    broken.write_text("from featurelens.cli.train import _int\n")
    with pytest.raises(AssertionError, match="_int"):
        test_benchmark_script_imports_resolve(broken)
