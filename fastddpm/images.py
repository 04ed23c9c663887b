"""Turning sample tensors in [-1, 1] into image grids and PNG files."""

from __future__ import annotations

import math
import os
from typing import Optional

import torch


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Map [-1, 1] floats to uint8 pixels (values outside are clamped)."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def make_grid(x: torch.Tensor, nrow: Optional[int] = None, padding: int = 2) -> torch.Tensor:
    """Tile ``[N, C, H, W]`` images into one ``[C, H', W']`` uint8 grid (``nrow`` images a row)."""
    if x.dim() != 4:
        raise ValueError(f"x: expected [N, C, H, W], got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = torch.zeros(c, rows * (h + padding) + padding, nrow * (w + padding) + padding, dtype=torch.uint8)
    pixels = to_uint8(x)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = pixels[i]
    return grid


def save_grid(x: torch.Tensor, path: str, nrow: Optional[int] = None, scale: int = 1) -> str:
    """Save samples in [-1, 1] as one PNG grid (each pixel repeated ``scale`` times); returns path."""
    from PIL import Image

    grid = make_grid(x, nrow)
    if scale > 1:
        grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    array = grid.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)
    return path
