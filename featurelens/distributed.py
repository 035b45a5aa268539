"""Data parallelism over PyTorch's own runtime (`torch.distributed`, started by `torchrun`): the few collectives
training and analysis need, each a no-op in a single process, so the same code runs with one rank or many.

    torchrun --nproc_per_node 2 -m featurelens train --hook blocks.6.hook_resid_post ...

`init_from_env` joins the group torchrun describes in the environment (WORLD_SIZE, RANK, MASTER_ADDR, ...):
gloo on CPU, nccl on CUDA. `comm_bytes` counts the payload every collective here has sent, for benchmarks.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterable, Iterator, Sequence

import torch

from .errors import InputError

_sent = [0]  # payload bytes this rank has passed to collectives
_alone = [0]  # depth of `alone()` blocks: inside one, this rank acts as a single process


def active() -> bool:
    """Whether this process is one of several ranks of an initialized process group (and not inside `alone()`)."""
    import torch.distributed as dist

    return not _alone[0] and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Inside this block the rank works as a process of its own: `active()` is False, so every collective here is a
    no-op, `rank()` is 0 and `is_main()` True. For work split by model part rather than by data (a transcoder
    set's layers on different ranks), where nothing is to be summed until the parts are gathered after it."""
    _alone[0] += 1
    try:
        yield
    finally:
        _alone[0] -= 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, the one that writes checkpoints, results and progress."""
    return rank() == 0


def launched() -> bool:
    """Whether torchrun (or another launcher) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: "str | torch.device | None" = None) -> bool:
    """Join the process group torchrun's environment describes (gloo for CPU, nccl for CUDA); True when this process
    is one of several ranks. Outside torchrun it does nothing and returns False."""
    import torch.distributed as dist

    if not launched():
        return False
    if not dist.is_available():
        raise InputError("this PyTorch build has no torch.distributed; run a single process")
    if not dist.is_initialized():
        cuda = device is not None and torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return active()


def comm_device() -> torch.device:
    """Where scalar collectives' tensors live: nccl moves only CUDA tensors, gloo CPU ones."""
    import torch.distributed as dist

    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def comm_bytes() -> int:
    """Payload bytes this rank has sent through the collectives of this module so far."""
    return _sent[0]


def _count(t: torch.Tensor) -> None:
    _sent[0] += t.numel() * t.element_size()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over the ranks, in place; returned for chaining."""
    if active():
        import torch.distributed as dist

        _count(t)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_min(t: torch.Tensor) -> torch.Tensor:
    if active():
        import torch.distributed as dist

        _count(t)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def total(value: float | int) -> float:
    """A number summed over the ranks (one scalar collective)."""
    if not active():
        return value
    return float(all_sum(torch.tensor([float(value)], dtype=torch.float64, device=comm_device()))[0])


def any_rank(flag: bool) -> bool:
    """True when `flag` is true on some rank (so that all ranks stop together)."""
    return total(1.0 if flag else 0.0) > 0 if active() else flag


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """The ranks' tensors concatenated along dim 0 in rank order (lengths may differ)."""
    if not active():
        return t
    import torch.distributed as dist

    n = world_size()
    sizes = torch.zeros(n, dtype=torch.long, device=comm_device())
    sizes[rank()] = t.shape[0]
    sizes = all_sum(sizes).cpu()
    width = int(sizes.max())
    padded = t.new_zeros((width, *t.shape[1:]))
    padded[:t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(n)]
    _count(padded)
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:int(s)] for p, s in zip(parts, sizes)])


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order, on every rank (tensors in it should be on the CPU: they are
    unpickled on the device they were sent from)."""
    if not active():
        return [obj]
    import pickle

    import torch.distributed as dist

    out: list[Any] = [None] * world_size()
    _sent[0] += len(pickle.dumps(obj))
    dist.all_gather_object(out, obj)
    return out


def sum_grads(params: Iterable[torch.Tensor]) -> None:
    """Sum the parameters' gradients over the ranks in one flat collective. A parameter without a gradient on every
    rank keeps none (the optimizer skips it, as in one process); one with a gradient somewhere gets the sum, zero
    standing in for the ranks where it had none."""
    if not active():
        return
    ps = list(params)
    has = all_sum(torch.tensor([p.grad is not None for p in ps], dtype=torch.int32, device=comm_device()))
    ps = [p for p, h in zip(ps, has.tolist()) if h]
    if not ps:
        return
    for p in ps:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in ps])
    all_sum(flat)
    at = 0
    for p in ps:
        p.grad.copy_(flat[at:at + p.numel()].view_as(p.grad))
        at += p.numel()


def broadcast(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Copy rank `src`'s tensors to every rank, in place."""
    if not active():
        return
    import torch.distributed as dist

    for t in tensors:
        _count(t)
        dist.broadcast(t.data, src=src)


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()
