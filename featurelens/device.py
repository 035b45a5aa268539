"""What this machine computes fast: probes that pick a dtype for a matmul-heavy step."""

from __future__ import annotations

import functools

import torch

from .engine.errors import InputError


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


def check_device(device: "str | torch.device | None") -> torch.device | None:
    """`device` as a torch.device (None stays None: the default, cpu), or a clear error when it names an
    accelerator this PyTorch cannot use (`--device cuda` on a machine without a CUDA GPU or with a CPU-only build)."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"unknown device {device!r}; use cpu, cuda or cuda:N ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise InputError(f"device {device!r}: this PyTorch ({torch.__version__}, {build}) sees no CUDA GPU; "
                             f"run with --device cpu, or install a CUDA build of PyTorch on a machine with a GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "mps", "meta"):
        raise InputError(f"device {device!r} is not supported; use cpu or cuda")
    return dev
