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

    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        raise ValueError(f"scale: expected a positive int (pixel repeats), got {scale!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path, got {type(path).__name__}")
    Image.init()
    if os.path.splitext(os.fspath(path))[1].lower() not in Image.registered_extensions():
        raise ValueError(f"path: expected an image file name such as 'samples.png', got {os.fspath(path)!r}")
    grid = make_grid(x, nrow)
    if scale > 1:
        grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    array = grid.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)
    return path


def read_images(specs, chw) -> torch.Tensor:
    """Images shaped ``[N, *chw]`` in [-1, 1] from ``specs``: PNG/JPEG paths (converted to the
    model's channels; their size must be the model's), or bundled dataset items written
    ``mnist:0-7`` / ``mnist:0,5,9`` / ``digits:3`` (MNIST padded to 32x32, as the bundled model was
    trained on)."""
    import numpy as np
    from PIL import Image

    c, h, w = chw
    out = []
    for spec in specs:
        name, _, items = str(spec).partition(":")
        if name in ("mnist", "digits") and items and not os.path.exists(spec):
            from .data import load_digits_data, load_mnist_data

            data = load_mnist_data()[0] if name == "mnist" else load_digits_data()[0]
            out.append(data[_indices(items, len(data), spec)])
            continue
        if not os.path.isfile(spec):
            raise ValueError(f"input: {spec!r} is neither an image file nor a bundled item such as 'mnist:0-7'")
        try:
            with Image.open(spec) as im:
                array = np.asarray(im.convert("L" if c == 1 else "RGB"), dtype=np.float32)
        except OSError as e:
            raise ValueError(f"input: {spec!r} is not a readable image ({e})") from None
        array = array[None] if c == 1 else array.transpose(2, 0, 1)
        out.append(torch.from_numpy(array / 127.5 - 1.0)[None])
    images = torch.cat(out) if out else torch.empty(0, *chw)
    if images.shape[1:] != (c, h, w):
        raise ValueError(f"input: expected images of {c}x{h}x{w} (the model's), got {tuple(images.shape[1:])}")
    return images.float()


def _indices(items: str, n: int, spec: str) -> list:
    """``"0-7"`` / ``"0,5,9"`` as a list of indices below ``n``."""
    result = []
    try:
        for part in items.split(","):
            lo, _, hi = part.partition("-")
            result.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    except ValueError:
        raise ValueError(f"input: {spec!r}: expected indices such as 0-7 or 0,5,9") from None
    if not result or min(result) < 0 or max(result) >= n:
        raise ValueError(f"input: {spec!r}: expected indices in [0, {n})")
    return result
