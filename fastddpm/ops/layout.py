"""Tensor layout helpers every backend shares: the memory format the kernels write, the dtype of
saved statistics, and per-sample scalars gathered from a schedule table for broadcasting."""

from __future__ import annotations

from typing import Tuple

import torch


def dense_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout the kernels produce for ``x``: channels_last when x is, else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def dense_empty_like(x: torch.Tensor) -> torch.Tensor:
    """A new tensor like ``x`` in :func:`dense_memory_format` (x)."""
    return torch.empty_like(x, memory_format=dense_memory_format(x))


def stat_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the saved group statistics: float64 for float64 inputs, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def per_sample(table: torch.Tensor, t: torch.Tensor, ndim: int) -> Tuple[torch.Tensor, ...]:
    """Gather ``table[t]`` on the device (no host sync) and split it into columns shaped
    ``[B, 1, 1, ...]`` (``ndim`` dims) for broadcasting against a ``[B, ...]`` tensor.

    An out-of-range ``t`` (trusted, so unchecked: see :mod:`fastddpm.ops`) is clamped into the
    table, as the kernels do: unspecified values rather than an IndexError or a device assert."""
    rows = table.index_select(0, t.clamp(0, table.shape[0] - 1))
    shape = (t.shape[0],) + (1,) * (ndim - 1)
    return tuple(rows[:, i].reshape(shape) for i in range(table.shape[1]))


def per_channel(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """[C] or [B, C] reshaped to broadcast over the spatial dims of an ndim-dim [B, C, ...] tensor."""
    return v.reshape(v.shape[0] if v.dim() == 2 else 1, -1, *([1] * (ndim - 2)))
