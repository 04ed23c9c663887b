"""A model's eligible 3x3 convolutions rewritten to Winograd convolutions
(:mod:`fastddpm.ops.winograd`), for inference on the CPU.

The U-Net's fp32 forward on a CPU is mostly 3x3 convolutions that oneDNN already runs near the
cores' FMA peak, so fewer multiplies is where more speed comes from. :func:`with_winograd_convs`
returns a copy of a model with every eligible ``nn.Conv2d`` (3x3, stride 1, padding 1, no
dilation or groups, float32 weights on the CPU) of a width :func:`choose_tile` ever sends to
Winograd replaced by a :class:`WinogradConv2d`. Inference only: the op has no backward.

Which variant runs is decided per call from the compute dtype, the convolution's width (the
smaller of its in and out channels) and its number of output tiles (batch x resolution) by
:func:`choose_tile`, a fixed table (``RULES``) read off interleaved timings of every preset's
convolutions at their sampling batch sizes (``fastddpm bench --only ops``, conv rows; numbers in
docs/performance.md), not a timing on first call: a fixed rule keeps the choice deterministic,
free at run time, and plain Python on static shapes for torch.compile. What the table encodes:

- float32: F(4x4, 3x3) (36 multiplies per 4x4 tile instead of 144) for widths 128-256 with enough
  tiles; F(2x2, 3x3) at 512 channels (F(4x4)'s weight table, 4x the weights, is then streamed
  for too few tiles per block) and for 128 channels with few tiles; direct below 64 channels,
  and at 64 with few tiles (narrow GEMMs run far below the FMA peak: no gain there).
- bfloat16 (autocast): direct, except F(2x2) for 256+ channels with at most 256 tiles, where
  oneDNN's AMX direct convolution is slow (small images; it runs at or above the AMX GEMM rate on
  larger ones, so no Winograd wins there). F(4x4) in bf16 is too inaccurate (about 10x the
  direct bf16 convolution's error), so the op rejects it.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import winograd as winograd_op
from ..ops.winograd import TILES, available, transform_weight  # noqa: F401  (re-exported for model code)

DIRECT = 0  # choose_tile's answer for "run the direct convolution"

# True inside per_image(): see there.
_per_image = False

# Per compute dtype, rows (narrowest width, tile, fewest tiles, most tiles): the first row whose
# width the convolution reaches and whose range holds its number of tiles of that size wins;
# no row: direct. Tiles of size m: N * ceil(H / m) * ceil(W / m).
RULES = {
    torch.float32: ((512, 2, 0, math.inf), (256, 4, 0, math.inf), (128, 4, 256, math.inf), (128, 2, 0, math.inf),
                    (64, 4, 256, math.inf)),
    torch.bfloat16: ((256, 2, 0, 256),),
}

# The narrowest width any rule sends to Winograd: narrower convolutions are never rewritten.
MIN_CHANNELS = min(row[0] for rows in RULES.values() for row in rows)


@contextlib.contextmanager
def per_image():
    """Inside it, every :class:`WinogradConv2d` chooses its variant for one image and runs image by
    image, so an image's output does not depend on how many images share its batch (the variant
    and the GEMMs' tile blocks would otherwise follow the batch's tile count). Used by per-image
    runs on the CPU (:func:`fastddpm.sampling.api.batch_invariant_here`); not thread-local."""
    global _per_image
    saved, _per_image = _per_image, True
    try:
        yield
    finally:
        _per_image = saved


def choose_tile(dtype: torch.dtype, channels: int, batch: int, height: int, width: int) -> int:
    """The variant a convolution of ``channels`` (the smaller of in/out) on ``batch`` x ``height``
    x ``width`` inputs runs in compute ``dtype``: 4 (F(4x4, 3x3)), 2 (F(2x2, 3x3)) or ``DIRECT``
    (0), by ``RULES``; the reasons are in this module's docstring."""
    for min_channels, tile, lo, hi in RULES.get(dtype, ()):
        tiles = batch * -(-height // tile) * -(-width // tile)
        if channels >= min_channels and lo <= tiles <= hi:
            return tile
    return DIRECT


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
    path) and the tables of the variants it may run, transformed once. ``tile`` None picks the
    variant per call by :func:`choose_tile` (float32 or bf16 under autocast); 2 or 4 always runs
    that tile size in float32 (tests, benchmarks), other compute dtypes then run direct."""

    def __init__(self, conv: nn.Conv2d, tile: Optional[int] = None, dtypes: Sequence[torch.dtype] = tuple(RULES)):
        super().__init__()
        if not eligible(conv):
            raise ValueError(f"conv: expected a float32 CPU 3x3 stride-1 padding-1 Conv2d, got {conv}")
        if tile is not None and (type(tile) is not int or tile not in TILES):
            raise ValueError(f"tile: expected None or one of {TILES}, got {tile!r}")
        self.tile, self.channels = tile, min(conv.in_channels, conv.out_channels)
        self.register_buffer("weight", conv.weight.detach().clone())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())
        # "U4_float32", ...: the tables the rules (or the fixed tile) can pick for this width in the
        # compute dtypes asked for (each table is 1.8x (F(2x2)) or 4x (F(4x4)) the weights' size)
        variants = {(tile, torch.float32)} if tile is not None else {
            (row[1], dtype) for dtype in dtypes for row in RULES.get(dtype, ()) if self.channels >= row[0]}
        for t, dtype in sorted(variants, key=str):
            self.register_buffer(self._table(t, dtype), transform_weight(conv.weight, t, dtype))

    @staticmethod
    def _table(tile: int, dtype: torch.dtype) -> str:
        return f"U{tile}_{str(dtype).split('.')[-1]}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution of ``x`` by the variant :func:`choose_tile` (or the fixed tile) picks."""
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        if self.tile is not None:
            tile = self.tile if dtype == torch.float32 else DIRECT
        else:
            tile = choose_tile(dtype, self.channels, 1 if _per_image else x.shape[0], x.shape[-2], x.shape[-1])
        if tile == DIRECT:
            return F.conv2d(x, self.weight, self.bias, padding=1)
        table = getattr(self, self._table(tile, dtype), None)
        if table is None:  # a compute dtype this layer was not prepared for
            return F.conv2d(x, self.weight, self.bias, padding=1)
        if _per_image:
            return torch.cat([winograd_op.winograd_conv3x3(x[i:i + 1].to(dtype), table, self.bias)
                              for i in range(x.shape[0])])
        return winograd_op.winograd_conv3x3(x.to(dtype), table, self.bias)


def with_winograd_convs(model: nn.Module, min_channels: Optional[int] = None, tile: Optional[int] = None,
                        dtypes: Sequence[torch.dtype] = tuple(RULES)) -> nn.Module:
    """A copy of ``model`` whose eligible convolutions with at least ``min_channels`` channels in
    and out (default: the narrowest width :func:`choose_tile` sends to Winograd in one of
    ``dtypes``, the compute dtypes the copy will run in) run as :class:`WinogradConv2d` (``tile``:
    see there); the original is untouched. Raises if the native kernel is not built."""
    if not available():
        raise RuntimeError("winograd: the native CPU extension is not built (see `fastddpm info`)")
    if min_channels is None:
        widths = [row[0] for dtype in dtypes for row in RULES.get(dtype, ())]
        if not widths:
            return copy.deepcopy(model)  # no rule sends any convolution to Winograd in these dtypes
        min_channels = min(widths)
    model = copy.deepcopy(model)
    for child in list(model.modules()):
        for attr, sub in list(child.named_children()):
            if eligible(sub, min_channels):
                setattr(child, attr, WinogradConv2d(sub, tile, dtypes))
    return model
