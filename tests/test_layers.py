"""The package's layering, as declared in pyproject.toml ([tool.importlinter]), checked by import-linter.

engine < utilities (store, paths, io, ...) < models < data < dictionaries < search < analysis
< interventions | attribution < server < cli; the engine imports nothing from featurelens outside itself; no import
cycles between featurelens's packages, nor between the modules of analysis, search, interventions, data and store,
nor between the server's modules and its routes.
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
    r = lint_imports()
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    # the contracts are the ones declared (an emptied config would pass vacuously)
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    for name in ("layers: engine < utilities", "the engine imports nothing from featurelens",
                 "no import cycles between the packages", "no import cycles between the modules",
                 "no import cycles between the modules of the server"):
        assert name in out, out
    assert f"{len(contracts)} kept, 0 broken" in out, out


def test_a_reversed_layer_is_reported(tmp_path):
    """The checker sees the real imports: claiming the engine sits above the CLI must break."""
    cfg = tmp_path / "reversed.toml"
    cfg.write_text('[tool.importlinter]\nroot_package = "featurelens"\n\n[[tool.importlinter.contracts]]\n'
                   'name = "reversed"\ntype = "layers"\nlayers = ["featurelens.engine", "featurelens.cli"]\n')
    r = lint_imports("--config", str(cfg))
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "BROKEN" in out and "featurelens.cli" in out, out
