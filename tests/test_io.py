"""Atomic writes (featurelens.io): the target is complete or untouched, and nothing temporary is left behind."""

from __future__ import annotations

import json

import pytest

from featurelens.io import atomic_dir, atomic_save, atomic_write_bytes, atomic_write_json, atomic_write_text, is_tmp


def test_atomic_writes_replace_the_target(tmp_path):
    p = tmp_path / "f.json"
    atomic_write_json(p, {"a": 1})
    atomic_write_json(p, {"a": 2}, indent=None)
    assert json.loads(p.read_text()) == {"a": 2} and p.read_text().endswith("\n")
    atomic_write_text(tmp_path / "t.txt", "héllo")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "t.txt").read_text() == "héllo" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["b.bin", "f.json", "t.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    p = tmp_path / "state.bin"
    atomic_write_bytes(p, b"old")

    def half_then_fail(tmp):
        tmp.write_bytes(b"new but trunc")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_save(p, half_then_fail)
    with pytest.raises(TypeError):
        atomic_write_json(p, {"x": object()})  # not serializable: raised before anything is written
    assert p.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["state.bin"]


def test_atomic_dir(tmp_path):
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        assert is_tmp(tmp) and not final.exists()
        (tmp / "config.json").write_text("{}")
    assert (final / "config.json").read_text() == "{}"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "config.json").write_text('{"half": ')
            raise RuntimeError("conversion failed")
    assert (final / "config.json").read_text() == "{}"  # the old directory is kept
    with atomic_dir(final) as tmp:
        (tmp / "weights").write_text("w")
    assert sorted(x.name for x in final.iterdir()) == ["weights"]  # replaced as a whole
    assert [x.name for x in tmp_path.iterdir()] == ["model"]  # no temporary or old directory left
    with pytest.raises(FileExistsError):
        with atomic_dir(final, replace=False):
            pass
