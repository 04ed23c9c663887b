"""Winograd F(2x2, 3x3) convolutions for inference on the CPU (csrc/cpu/winograd_conv.cpp).

The U-Net's fp32 forward on a CPU is ~70% 3x3 convolutions that oneDNN already runs at the
cores' FMA peak; Winograd's F(2x2, 3x3) does the same convolution with 16 multiplies per 2x2
output tile and (input, output) channel pair instead of 36, at the price of additions in the
tile transforms and a rounding error about twice the direct convolution's.
:func:`with_winograd_convs` returns a copy of a model with every eligible ``nn.Conv2d`` (3x3,
stride 1, padding 1, no dilation or groups, float32, at least ``MIN_CHANNELS`` channels in and
out) replaced by a :class:`WinogradConv2d` holding the transformed weights. Inference only: the
op has no backward.

Measured on this project's 2-core AVX-512 CPU, batch 16, channels_last, against oneDNN's direct
convolution: 1.2-1.7x for 128 and 256 channels at 4x4 to 32x32, but 0.95-1.04x for 64 channels at
28x28 (the transforms' memory traffic then outweighs the saved multiplies); hence MIN_CHANNELS.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from ..ops import _native

MIN_CHANNELS = 128

# F(2x2, 3x3) weight transform (Lavin & Gray 2016): U = G g G^T.
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def available() -> bool:
    """Whether the native Winograd kernel is built (part of the native CPU extension)."""
    return _native.AVAILABLE and hasattr(torch.ops.fastddpm, "winograd_conv3x3")


if available():
    @torch.library.register_fake("fastddpm::winograd_conv3x3")
    def _winograd_fake(x, U, bias):
        N, _, H, W = x.shape
        return x.new_empty((N, U.shape[2], H, W)).contiguous(memory_format=torch.channels_last)


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """``[K, C, 3, 3]`` weights to the ``[16, C, K]`` float32 table the kernel multiplies by
    (``U = G g G^T``, computed in float64)."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight: expected [K, C, 3, 3], got {tuple(weight.shape)}")
    G = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    U = torch.einsum("ij,kcjl,ml->imck", G, weight.detach().double(), G)  # [4, 4, C, K]
    return U.reshape(16, weight.shape[1], weight.shape[0]).float().contiguous()


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
        return torch.ops.fastddpm.winograd_conv3x3(x, self.U, self.bias)


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
