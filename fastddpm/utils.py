"""Small shared helpers: device resolution and argument checks."""

from __future__ import annotations

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
        if dev.index is None:  # "cuda" is the current device: name it, as tensors on it do
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type not in ("cpu", "mps", "xpu", "meta"):
        raise ValueError(f"device: expected 'cpu' or 'cuda[:N]', got {device!r}")
    return dev


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are the same, with "cuda" meaning the current CUDA device (a
    ``torch.Generator("cuda")`` reports "cuda", tensors on it "cuda:0")."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type == "cuda" and (a.index is None or b.index is None):
        current = torch.cuda.current_device()
        return (current if a.index is None else a.index) == (current if b.index is None else b.index)
    return a.index == b.index
