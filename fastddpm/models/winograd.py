"""A model's eligible 3x3 convolutions rewritten to the Winograd F(2x2, 3x3) op
(:mod:`fastddpm.ops.winograd`), for inference on the CPU in float32.

The U-Net's fp32 forward on a CPU is mostly 3x3 convolutions that oneDNN already runs near the
cores' FMA peak, so fewer multiplies is where more speed comes from. :func:`with_winograd_convs`
returns a copy of a model with every eligible ``nn.Conv2d`` (3x3, stride 1, padding 1, no
dilation or groups, float32, at least ``MIN_CHANNELS`` channels in and out) replaced by a
:class:`WinogradConv2d` holding the transformed weights. Inference only: the op has no backward.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from ..ops import winograd as winograd_op
from ..ops.winograd import available, transform_weight  # noqa: F401  (re-exported for model code)

# Below 128 channels the tile transforms' memory traffic outweighs the saved multiplies
# (measured in docs/performance.md), so narrower convolutions stay direct.
MIN_CHANNELS = 128


def eligible(module: nn.Module, min_channels: int = 1) -> bool:
    """A float32 CPU ``nn.Conv2d`` with a 3x3 kernel, stride 1, zero padding 1, no dilation or
    groups, and at least ``min_channels`` channels in and out."""
    return (type(module) is nn.Conv2d and min(module.in_channels, module.out_channels) >= min_channels
            and module.kernel_size == (3, 3) and module.stride == (1, 1) and module.padding == (1, 1)
            and module.dilation == (1, 1) and module.groups == 1
            and module.padding_mode == "zeros" and module.weight.dtype == torch.float32
            and module.weight.device.type == "cpu")


class WinogradConv2d(nn.Module):
    """The inference-only Winograd form of an eligible ``nn.Conv2d`` (weights transformed once)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not eligible(conv):
            raise ValueError(f"conv: expected a float32 CPU 3x3 stride-1 padding-1 Conv2d, got {conv}")
        self.register_buffer("U", transform_weight(conv.weight))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return winograd_op.winograd_conv3x3(x, self.U, self.bias)


def with_winograd_convs(model: nn.Module, min_channels: Optional[int] = None) -> nn.Module:
    """A copy of ``model`` whose eligible convolutions (with at least ``min_channels`` channels in
    and out; default ``MIN_CHANNELS``) run as :class:`WinogradConv2d`; the original is untouched.
    Raises if the native kernel is not built."""
    if not available():
        raise RuntimeError("winograd: the native CPU extension is not built (see `fastddpm info`)")
    min_channels = MIN_CHANNELS if min_channels is None else min_channels
    model = copy.deepcopy(model)
    for child in list(model.modules()):
        for attr, sub in list(child.named_children()):
            if eligible(sub, min_channels):
                setattr(child, attr, WinogradConv2d(sub))
    return model
