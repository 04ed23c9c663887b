"""Timing helpers: medians of several rounds, and the bandwidth of a plain copy for comparison."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict

import torch


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], *, rounds: int = 7, warmup: int = 2, device="cpu",
            min_time: float = 0.0) -> Dict[str, float]:
    """Median / min / max seconds of ``fn()`` over ``rounds`` rounds after ``warmup`` calls.

    A round repeats ``fn`` until it has run ``min_time`` seconds, so very short calls are timed
    over many iterations.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(rounds):
        n, start = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            _sync(device)
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        times.append(elapsed / n)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "rounds": rounds}


def copy_bandwidth(nbytes: int, device="cpu", rounds: int = 7) -> float:
    """Achieved bytes/s of ``dst.copy_(src)`` for ``nbytes`` read plus ``nbytes`` written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), rounds=rounds, device=device)["median"]
    return 2 * src.numel() * 4 / t
