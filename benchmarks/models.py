"""Models for benchmarks and tests: U-Net presets whose every weight is random.

A fresh U-Net's output convolution is zero-initialised (as the paper's), so its output is exactly
zero and any check of a fast path against the reference would compare zeros with zeros.
"""

from __future__ import annotations

import torch
from torch import nn

from fastddpm import UNet


def randomize_zero_init(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initialise every all-zero weight (the zero-initialised output convs) with noise, in place,
    so that a fresh model's output depends on its input and timestep."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def random_unet(preset: str, device="cpu") -> UNet:
    """The ``preset`` U-Net (seed 0) with every weight random, in eval mode, on ``device``."""
    torch.manual_seed(0)
    return randomize_zero_init(UNet.from_preset(preset)).to(device).eval()
