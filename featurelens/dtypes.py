"""Floating-point dtypes by name: one table for model weights, dictionaries and activation caches.

>>> parse_dtype("bf16")
torch.bfloat16
>>> dtype_name(torch.float16)
'float16'
"""

from __future__ import annotations

import torch

from .engine.errors import InputError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
}
ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp64": "float64"}


def parse_dtype(dtype: str | torch.dtype, choices: tuple[str, ...] | None = None) -> torch.dtype:
    """A dtype or its name ("float32", "bf16", ...) -> torch.dtype; `choices` limits the names accepted."""
    allowed = tuple(choices) if choices is not None else tuple(DTYPES)
    if isinstance(dtype, torch.dtype):
        if dtype_name(dtype) not in allowed:
            raise InputError(f"dtype must be one of {', '.join(allowed)}, got {dtype}")
        return dtype
    name = ALIASES.get(dtype, dtype) if isinstance(dtype, str) else None
    if name not in allowed:
        raise InputError(f"dtype must be one of {', '.join(allowed)}, got {dtype!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the name configs and manifests store)."""
    return str(dtype).removeprefix("torch.")
