"""Small shared helpers: device resolution and argument checks."""

from __future__ import annotations

import functools
from typing import FrozenSet, Optional

import torch


def resolve_device(device) -> torch.device:
    """Parse ``device`` (a string or torch.device) and check that it exists in this process."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: expected a device such as 'cpu', 'cuda' or 'cuda:0', "
                         f"got {device!r} ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} requested but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: {device!r} requested but only "
                             f"{torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type not in ("cpu", "mps", "xpu"):  # not "meta": it holds no values to compute with
        raise ValueError(f"device: expected 'cpu' or 'cuda[:N]', got {device!r}")
    return _named(dev)


def _named(device: torch.device) -> torch.device:
    """``"cuda"`` as the current CUDA device's name (``"cuda:0"``), as tensors on it report it."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are the same, with "cuda" meaning the current CUDA device (a
    ``torch.Generator("cuda")`` reports "cuda", tensors on it "cuda:0")."""
    return _named(torch.device(a)) == _named(torch.device(b))


@functools.lru_cache(maxsize=None)
def cpu_flags() -> Optional[FrozenSet[str]]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (read once), or None where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


@functools.lru_cache(maxsize=None)
def cpu_model_name() -> Optional[str]:
    """The CPU's model name from ``/proc/cpuinfo`` (e.g. "AMD EPYC"), or None where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def cpu_has_bf16_arithmetic() -> Optional[bool]:
    """Whether this CPU computes in bfloat16 natively (the ``avx512_bf16`` or ``amx_bf16`` flag of
    ``/proc/cpuinfo``); None where the flags cannot be read. Elsewhere bf16 is emulated in fp32,
    which makes a bf16 sampler several times slower than an fp32 one (measurements:
    docs/performance.md#measurements-behind-the-code)."""
    flags = cpu_flags()
    return None if flags is None else bool(flags & {"avx512_bf16", "amx_bf16"})
