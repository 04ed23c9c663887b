"""PyTorch's own distributed engine, as fastddpm uses it: a process group started by ``torchrun``
(NCCL on CUDA, gloo on the CPU), the rank and world size, and the device of each rank.

Nothing here launches processes: ``torchrun --nproc_per_node N ...`` (or ``--nnodes`` with a c10d
rendezvous) does, and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``. Without them every function answers for one process, so the same code runs
unchanged with and without torchrun.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def initialized() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def init(device: Optional[torch.device] = None) -> bool:
    """Join the process group torchrun describes (once; later calls do nothing): NCCL when
    ``device`` is CUDA, else gloo. Returns whether this run is distributed."""
    if initialized():
        return True
    if not launched():
        return False
    if not dist.is_available():
        raise ValueError("WORLD_SIZE: set by a launcher, but this torch build has no torch.distributed")
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if initialized() else 1


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK; 0 without one)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Whether this is rank 0: the process that writes checkpoints, logs and manifests."""
    return rank() == 0


def rank_device(device) -> torch.device:
    """The device this rank runs on: ``cuda`` becomes ``cuda:<LOCAL_RANK>`` under torchrun."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and initialized():
        return torch.device("cuda", local_rank())
    return device


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if initialized():
        dist.barrier()


_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``tensor`` combined over every rank in place (``op``: sum, max or min) and returned; as it
    is without a process group. Every rank must make the same calls in the same order."""
    if op not in _OPS:
        raise ValueError(f"op: expected one of {sorted(_OPS)}, got {op!r}")
    if initialized():
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, _OPS[op]))
    return tensor


def data_parallel(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` wrapped in DistributedDataParallel (gradients averaged over the ranks during
    ``backward``) when there is more than one rank; ``module`` itself otherwise."""
    if world_size() == 1:
        return module
    device = torch.device(device)
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None)


def shutdown() -> None:
    """Leave the process group (nothing without one): the end of a command run under torchrun."""
    if initialized():
        dist.destroy_process_group()
