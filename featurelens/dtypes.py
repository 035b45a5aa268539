"""Floating-point dtypes by name: one table for model weights, dictionaries and activation caches.

>>> parse_dtype("bf16")
torch.bfloat16
>>> dtype_name(torch.float16)
'float16'
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

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


def forward_autocast(device: "str | torch.device", model_dtype: torch.dtype,
                     enabled: bool | None = None) -> ContextManager[object]:
    """The context for a model's forward pass that only produces activations (for training or a cache): bfloat16
    autocast, that is matmuls in bfloat16 with float32 accumulation while featurelens' norms and softmax still run
    in float32 and the residual stream stays float32. `enabled` None (the default) turns it on for a float32 model
    on CUDA, where bfloat16 matmuls run several times faster, and nowhere else (on a CPU it is emulated or changes
    results for no gain); True turns it on on any device, False never."""
    if not autocast_wanted(device, model_dtype, enabled):
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def autocast_wanted(device: "str | torch.device", model_dtype: torch.dtype, enabled: bool | None = None) -> bool:
    """Whether `forward_autocast` turns bfloat16 autocast on for these arguments."""
    if enabled is not None:
        return enabled
    return torch.device(device).type == "cuda" and model_dtype == torch.float32
