"""``cpu_memory_pool()``: reuse CPU memory across the iterations of a loop (csrc/cpu/memory_pool.cpp).

glibc hands large blocks back to the kernel on free, so a loop that allocates the same activations
pays a page fault per 4 KiB written, every iteration: a sizeable share of a small model's sampler
step (measurements: docs/performance.md#measurements-behind-the-code). Inside
``with cpu_memory_pool():`` freed CPU blocks of 64 KiB or more are kept and handed out again for
the same size; on exit the cache is freed and the previous allocator is back. Results are
unchanged; only where the bytes live changes.

Without the native extension this is a no-op (``stats()["enabled"]`` stays False).
"""

from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterator, Optional

import torch

from . import native

DEFAULT_LIMIT_BYTES = 8 << 30  # most bytes kept in the free lists at a time


def available() -> bool:
    """Whether the caching allocator is built (it is part of the native CPU extension)."""
    return native.AVAILABLE and hasattr(torch.ops.fastddpm, "cpu_memory_pool")


def stats() -> Dict[str, int]:
    """``enabled``, ``cached_bytes``, ``live_blocks``, and ``hits`` / ``misses`` since enabling."""
    if not available():
        return dict(enabled=0, cached_bytes=0, live_blocks=0, hits=0, misses=0)
    return dict(zip(("enabled", "cached_bytes", "live_blocks", "hits", "misses"),
                    torch.ops.fastddpm.cpu_memory_pool_stats()))


@contextlib.contextmanager
def cpu_memory_pool(limit_bytes: Optional[int] = None) -> Iterator[None]:
    """Serve CPU allocations from a cache of freed blocks inside the ``with`` block (re-entrant:
    the allocator counts nested scopes, and the outermost one's limit holds).

    ``limit_bytes`` bounds the bytes held by the cache (default 8 GiB, or
    ``FASTDDPM_CPU_POOL_LIMIT``); blocks freed beyond it go back to the system.
    """
    if limit_bytes is None:
        limit_bytes = int(os.environ.get("FASTDDPM_CPU_POOL_LIMIT", DEFAULT_LIMIT_BYTES))
    if not isinstance(limit_bytes, int) or limit_bytes < 0:
        raise ValueError(f"limit_bytes: expected a non-negative int, got {limit_bytes!r}")
    if not available():
        yield
        return
    torch.ops.fastddpm.cpu_memory_pool(True, limit_bytes)
    try:
        yield
    finally:
        torch.ops.fastddpm.cpu_memory_pool(False, 0)
