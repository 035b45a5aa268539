"""The package's layering, as declared in pyproject.toml ([tool.importlinter]), checked by import-linter.

engine < utilities (store, paths, io, ...) < models < data < dictionaries < search < analysis
< interventions | attribution < server < cli; the engine imports nothing from featurelens outside itself; no import
cycles between featurelens's packages, nor between the modules of analysis, search, interventions, data, store,
dictionaries, attribution and engine; and (test_no_import_cycle_between_modules_anywhere) none between any two
modules of featurelens, imports inside functions included.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def lint_imports(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--no-cache", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_import_contracts_hold():
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    r = lint_imports()
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    # the contracts are the ones declared (an emptied config would pass vacuously)
    for name in ("layers: engine < utilities", "the engine imports nothing from featurelens",
                 "no import cycles between the packages", "no import cycles between the modules",
                 "graph files: files imports graph and schema", "no import cycles between the modules of the server"):
        assert name in out, out
    assert f"{len(contracts)} kept, 0 broken" in out, out


# Known cycles between modules, each to be removed by the change named (an entry here is a debt, not a permission)
KNOWN_CYCLES: list[set[str]] = []


def module_cycles() -> list[set[str]]:
    """Strongly connected components (more than one module) of featurelens's import graph, every import counted:
    module level and inside functions, as grimp (import-linter's graph) finds them; imports under `if TYPE_CHECKING:`
    never run and are left out."""
    import grimp

    graph = grimp.build_graph("featurelens", include_external_packages=False, exclude_type_checking_imports=True)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; the graph is small, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(comp)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    return found


def test_no_import_cycle_between_modules_anywhere():
    cycles = module_cycles()
    unknown = [sorted(c) for c in cycles if c not in KNOWN_CYCLES]
    assert not unknown, f"import cycles between modules: {unknown}"


def test_the_cycle_check_sees_function_level_imports(tmp_path, monkeypatch):
    """A package whose modules import each other only inside functions is still a cycle."""
    pkg = tmp_path / "cyclepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from . import b\n    return b\n")
    (pkg / "b.py").write_text("from . import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import grimp

    graph = grimp.build_graph("cyclepkg", include_external_packages=False, exclude_type_checking_imports=True)
    assert "cyclepkg.b" in graph.find_modules_directly_imported_by("cyclepkg.a")
    assert "cyclepkg.a" in graph.find_modules_directly_imported_by("cyclepkg.b")


def test_a_reversed_layer_is_reported(tmp_path):
    """The checker sees the real imports: claiming the engine sits above the CLI must break."""
    cfg = tmp_path / "reversed.toml"
    cfg.write_text('[tool.importlinter]\nroot_package = "featurelens"\n\n[[tool.importlinter.contracts]]\n'
                   'name = "reversed"\ntype = "layers"\nlayers = ["featurelens.engine", "featurelens.cli"]\n')
    r = lint_imports("--config", str(cfg))
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "BROKEN" in out and "featurelens.cli" in out, out
