"""Timing helpers: medians of several rounds, and the bandwidth of a plain copy and the rate of a
large matrix product for comparison."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch


def sync(device: torch.device):
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], *, rounds: int = 7, warmup: int = 2, device="cpu",
            min_time: float = 0.0) -> Dict[str, float]:
    """Median / min / max seconds of ``fn()`` over ``rounds`` rounds after ``warmup`` calls.

    A round repeats ``fn`` until it has run ``min_time`` seconds, so very short calls are timed
    over many iterations.
    """
    return measure_interleaved({"fn": fn}, rounds=rounds, warmup=warmup, device=device, min_time=min_time)["fn"]


def measure_interleaved(fns: Dict[str, Callable[[], object]], *, rounds: int = 7, warmup: int = 2, device="cpu",
                        min_time: float = 0.0) -> Dict[str, Dict[str, float]]:
    """:func:`measure` for several functions at once, on the CPU one round of each in turn
    (A B, A B, ...), so a shared machine's drift (its clock, its neighbours, its bandwidth)
    falls on all of them alike; returns ``{name: {"median", "min", "max", "rounds"}}``."""
    device = torch.device(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    if device.type == "cuda":  # GPU rounds are events around back-to-back calls; they do not drift
        return {name: _measure_cuda(fn, rounds=rounds, min_time=max(min_time, 0.02)) for name, fn in fns.items()}
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            n, start = 0, time.perf_counter()
            while True:
                fn()
                n += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_time:
                    break
            times[name].append(elapsed / n)
    return {name: {"median": statistics.median(v), "min": min(v), "max": max(v), "rounds": rounds}
            for name, v in times.items()}


def copy_bandwidth(nbytes: int, device="cpu", rounds: int = 7) -> float:
    """Achieved bytes/s of ``dst.copy_(src)`` for ``nbytes`` read plus ``nbytes`` written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), rounds=rounds, device=device)["median"]
    return 2 * src.numel() * 4 / t


def gemm_rate(dtype: torch.dtype = torch.float32, n: int = 2048, device="cpu", rounds: int = 5) -> float:
    """Achieved FLOP/s of one ``n x n @ n x n`` matrix product in ``dtype``: the machine's practical
    peak for that dtype (FMA units in float32, AMX in bf16 where present), as a yardstick."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = measure(lambda: a @ b, rounds=rounds, device=device)["median"]
    return 2 * n**3 / t


def _measure_cuda(fn: Callable[[], object], *, rounds: int, min_time: float) -> Dict[str, float]:
    """GPU rounds: ``n`` back-to-back calls between two CUDA events (no sync between calls), with
    ``n`` chosen so that a round lasts about ``min_time``."""
    def timed(n: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / n

    n = max(1, min(10000, int(min_time / max(timed(3), 1e-7))))
    times = [timed(n) for _ in range(rounds)]
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "rounds": rounds}


def measure_graphed(fn: Callable[[], object], *, rounds: int = 7, calls: int = 20) -> Optional[Dict[str, float]]:
    """GPU time of ``fn`` without host overhead: ``calls`` calls captured in one CUDA graph, timed
    over replays (seconds per call). None when ``fn`` cannot be captured (e.g. it syncs)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    except Exception:  # noqa: BLE001 - not capturable: report eager timing only
        torch.cuda.synchronize()
        return None
    graph.replay()
    result = _measure_cuda(graph.replay, rounds=rounds, min_time=0.02)
    return {k: (v / calls if k != "rounds" else v) for k, v in result.items()}


def time_rounds(fn: Callable[[], object], device, rounds: int) -> Tuple[Dict[str, float], object]:
    """Wall time of each of ``rounds`` single calls of a long job (a whole sampling run), synced on
    a GPU; returns ``({"median", "min", "max"} in seconds, the last call's result)``."""
    device = torch.device(device)
    times, result = [], None
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}, result


def interleaved_rounds(fns: Dict[str, Callable[[], object]], device, rounds: int) -> Dict[str, Dict[str, float]]:
    """Like :func:`time_rounds` for several jobs at once, run in turn within each round (A B C, A B C,
    ...), so drift on a shared machine (its bandwidth, its clock, glibc's thresholds) falls on
    every job alike; returns ``{name: {"median", "min", "max", "total"}}`` (total: the sum of its rounds)."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(time_rounds(fn, device, 1)[0]["median"])
    return {name: {"median": statistics.median(v), "min": min(v), "max": max(v), "total": sum(v)}
            for name, v in times.items()}

