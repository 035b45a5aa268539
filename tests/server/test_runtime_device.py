"""`featurelens serve --device`: the server's runtime loads models (and dictionaries) on the device it was given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")

from featurelens.models import loader  # noqa: E402
from featurelens.server import create_app  # noqa: E402


def test_runtime_loads_models_on_the_served_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[Any] = []
    monkeypatch.setattr(loader, "load_model", lambda name, device=None, **kw: asked.append((name, device)) or name)
    runtime = create_app(tmp_path, device="cpu").state.runtime
    assert runtime.model("gemma-3-270m") == "gemma-3-270m"
    runtime.model("gemma-3-270m")  # loaded once
    assert asked == [("gemma-3-270m", "cpu")]
    assert create_app(tmp_path / "other").state.runtime.device is None  # the default: cpu, as fl.load_model
