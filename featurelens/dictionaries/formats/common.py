"""What every file layout shares: the error for a file that cannot be read, JSON and safetensors readers that name the
file in their errors, an atomic JSON writer, and the file names of our own layout (SAELens's, plus featurelens.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ...engine.errors import MissingFileError
from ...io import atomic_write_json
from ...models.gguf import CorruptFileError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
META_FILE = "featurelens.json"
FORMAT_VERSION = 1
# What of an old directory survives a save over it: every entry the new dictionary does not write itself (training
# checkpoints, the analysis, whatever the user keeps there). An analysis is never served for other weights: its
# dictionary fingerprint is checked when it is opened, and `train --overwrite` removes it.
DIR_KEEP = ("*",)


class CorruptDictionaryError(CorruptFileError):
    """A dictionary file that cannot be read or does not match its config; the message names the file."""


def write_json(path: Path, obj: dict[str, Any]) -> None:
    atomic_write_json(path, obj, default=str)


def read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CorruptDictionaryError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CorruptDictionaryError(f"{path}: cannot be read ({e})") from None
    if not isinstance(obj, dict):
        raise CorruptDictionaryError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    if not path.is_file():
        raise MissingFileError(f"{path}: missing (a dictionary needs {WEIGHTS_FILE} beside {CFG_FILE})")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise CorruptDictionaryError(f"{path}: not a readable safetensors file ({e})") from None
