"""What this machine computes fast: probes that pick a dtype for a matmul-heavy step."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def bf16_matmul_is_fast(device_type: str) -> bool:
    """Whether bfloat16 matmuls beat float32 here: GPUs; CPUs with AVX512-BF16 or AMX where a short timed probe
    confirms it (some virtual CPUs report AVX512-BF16 and still run bfloat16 matmuls slower than float32)."""
    if device_type == "cuda":
        return True
    if device_type != "cpu":
        return False
    try:
        flagged = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes
        return False
    return flagged and _probe_seconds(torch.bfloat16) < 0.8 * _probe_seconds(torch.float32)


def _probe_seconds(dtype: torch.dtype, reps: int = 3) -> float:
    """Best of `reps` timings of a [512, 640] x [640, 2048] matmul (a dictionary encoder's shape), ~10 ms in all."""
    import time

    g = torch.Generator().manual_seed(0)
    a = torch.randn(512, 640, generator=g).to(dtype)
    b = torch.randn(640, 2048, generator=g).to(dtype)
    a @ b  # warm-up: the first call picks kernels
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return best
