"""A model's eligible 3x3 convolutions rewritten to Winograd convolutions
(:mod:`fastddpm.ops.winograd`), for inference on the CPU.

The U-Net's fp32 forward on a CPU is mostly 3x3 convolutions that oneDNN already runs near the
cores' FMA peak, so fewer multiplies is where more speed comes from. :func:`with_winograd_convs`
returns a copy of a model with every eligible ``nn.Conv2d`` (3x3, stride 1, padding 1, no
dilation or groups, float32 weights on the CPU) of a width :func:`choose_tile` ever sends to
Winograd replaced by a :class:`WinogradConv2d`. Inference only: the op has no backward.

Which variant runs is decided per call from the compute dtype, the width and the input's
resolution by :func:`choose_tile`, a fixed rule read off interleaved timings of every preset's
convolutions (``fastddpm bench --only ops``, conv rows; numbers in docs/performance.md) rather
than a timing on first call: a fixed rule keeps the choice deterministic, free at run time, and
visible to torch.compile as plain Python on static shapes. The rule:

- float32: F(4x4, 3x3) wherever the width is ``MIN_CHANNELS`` or more (36 multiplies per 4x4 tile
  instead of 144; the presets' resolutions are multiples of 4, so no tile is wasted), else direct
  (narrow GEMMs run far below the FMA peak, and the transforms' memory traffic outweighs the saved
  multiplies).
- bfloat16 (autocast): direct. oneDNN's AMX convolution runs at or above the AMX GEMM rate, so the
  bf16 Winograd F(2x2) GEMMs alone take about as long as the whole direct convolution, before any
  transform; and F(4x4) in bf16 is too inaccurate (about 10x the direct bf16 error).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import winograd as winograd_op
from ..ops.winograd import TILES, available, transform_weight  # noqa: F401  (re-exported for model code)

# The narrowest width (min of in and out channels) where a float32 Winograd convolution beats
# oneDNN's direct one at every preset resolution measured; narrower convolutions stay direct.
MIN_CHANNELS = 128

DIRECT = 0  # choose_tile's answer for "run the direct convolution"


def choose_tile(dtype: torch.dtype, channels: int, height: int, width: int) -> int:
    """The variant a convolution of ``channels`` (the smaller of in/out) on ``height`` x ``width``
    inputs runs in compute ``dtype``: 4 (F(4x4, 3x3)), 2 (F(2x2, 3x3)) or ``DIRECT`` (0); the
    rule and its reasons are in this module's docstring."""
    if dtype != torch.float32 or channels < MIN_CHANNELS:
        return DIRECT
    return 4 if min(height, width) >= 4 else 2


def eligible(module: nn.Module, min_channels: int = 1) -> bool:
    """A float32 CPU ``nn.Conv2d`` with a 3x3 kernel, stride 1, zero padding 1, no dilation or
    groups, and at least ``min_channels`` channels in and out."""
    return (type(module) is nn.Conv2d and min(module.in_channels, module.out_channels) >= min_channels
            and module.kernel_size == (3, 3) and module.stride == (1, 1) and module.padding == (1, 1)
            and module.dilation == (1, 1) and module.groups == 1
            and module.padding_mode == "zeros" and module.weight.dtype == torch.float32
            and module.weight.device.type == "cpu")


class WinogradConv2d(nn.Module):
    """The inference-only Winograd form of an eligible ``nn.Conv2d``: its weights (for the direct
    path), and the float32 tables of the tile sizes it may run (transformed once). ``tile`` None
    picks per call by :func:`choose_tile`; 2 or 4 always runs that tile size in float32 (tests,
    benchmarks); other compute dtypes run the direct convolution."""

    def __init__(self, conv: nn.Conv2d, tile: Optional[int] = None):
        super().__init__()
        if not eligible(conv):
            raise ValueError(f"conv: expected a float32 CPU 3x3 stride-1 padding-1 Conv2d, got {conv}")
        if tile is not None and tile not in TILES:
            raise ValueError(f"tile: expected None or one of {TILES}, got {tile!r}")
        self.tile, self.channels = tile, min(conv.in_channels, conv.out_channels)
        self.register_buffer("weight", conv.weight.detach().clone())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())
        for t in (TILES if tile is None else (tile,)):
            self.register_buffer(f"U{t}", transform_weight(conv.weight, t))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        tile = self.tile if self.tile is not None and dtype == torch.float32 else \
            choose_tile(dtype, self.channels, x.shape[-2], x.shape[-1])
        if tile == DIRECT:
            return F.conv2d(x, self.weight, self.bias, padding=1)
        return winograd_op.winograd_conv3x3(x.float(), getattr(self, f"U{tile}"), self.bias)


def with_winograd_convs(model: nn.Module, min_channels: Optional[int] = None, tile: Optional[int] = None) -> nn.Module:
    """A copy of ``model`` whose eligible convolutions with at least ``min_channels`` channels in
    and out (default ``MIN_CHANNELS``: the widths :func:`choose_tile` may send to Winograd) run as
    :class:`WinogradConv2d` (``tile``: see there); the original is untouched. Raises if the native
    kernel is not built."""
    if not available():
        raise RuntimeError("winograd: the native CPU extension is not built (see `fastddpm info`)")
    min_channels = MIN_CHANNELS if min_channels is None else min_channels
    model = copy.deepcopy(model)
    for child in list(model.modules()):
        for attr, sub in list(child.named_children()):
            if eligible(sub, min_channels):
                setattr(child, attr, WinogradConv2d(sub, tile))
    return model
