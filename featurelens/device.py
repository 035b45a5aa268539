"""What this machine computes fast: probes that pick a dtype for a matmul-heavy step."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def bf16_matmul_is_fast(device_type: str) -> bool:
    """Whether bfloat16 matmuls beat float32 here: GPUs, and CPUs with AVX512-BF16 or AMX (elsewhere they are emulated)."""
    if device_type == "cuda":
        return True
    if device_type != "cpu":
        return False
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes
        return False
