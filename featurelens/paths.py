"""Where featurelens keeps what it makes: one data directory, never the repository."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "FEATURELENS_HOME"
_override: Path | None = None


def data_dir() -> Path:
    """The data directory: set_data_dir(), else $FEATURELENS_HOME, else ~/.cache/featurelens."""
    if _override is not None:
        root = _override
    elif os.environ.get(ENV_VAR):
        root = Path(os.environ[ENV_VAR])
    else:
        root = Path.home() / ".cache" / "featurelens"
    root = root.expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def set_data_dir(path: str | Path | None) -> None:
    """Point featurelens at another data directory for this process (None restores the default)."""
    global _override
    _override = Path(path).expanduser() if path is not None else None


def sub_dir(*parts: str) -> Path:
    d = data_dir().joinpath(*parts)
    d.mkdir(parents=True, exist_ok=True)
    return d
