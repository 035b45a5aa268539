"""Fixtures shared by the attribution tests."""

from __future__ import annotations

import pytest

from builders import tiny_model, tiny_transcoders


class _CharTokenizer:
    """Characters as tokens (ids 2..49), enough for the command line to take text prompts on a tiny model."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [2 + ord(c) % 48 for c in text]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(ord("a") + (i - 2) % 26) if i >= 2 else "" for i in ids)


@pytest.fixture()
def cli_setup(tmp_path, monkeypatch):
    from featurelens.dictionaries.formats import save_transcoder_set
    import featurelens.models.loader as loader

    model = tiny_model("gemma3")
    model.tokenizer = _CharTokenizer()
    tc_dir = tmp_path / "tc"
    save_transcoder_set(tiny_transcoders(model, skip=True), tc_dir)
    monkeypatch.setattr(loader, "load_model", lambda name, **kw: model)
    return model, tc_dir, tmp_path
