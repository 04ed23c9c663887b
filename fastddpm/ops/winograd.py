"""The Winograd F(2x2, 3x3) convolution op (csrc/cpu/winograd_conv.cpp; CPU, float32, inference).

F(2x2, 3x3) computes a 3x3, stride-1, padding-1 convolution with 16 multiplies per 2x2 output
tile and (input, output) channel pair instead of 36, at the price of additions in the tile
transforms and a rounding error about twice the direct convolution's. The weights are transformed
once (:func:`transform_weight`); :mod:`fastddpm.models.winograd` rewrites a model's convolutions to use it.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import checks, native

# F(2x2, 3x3) weight transform (Lavin & Gray 2016): U = G g G^T.
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def available() -> bool:
    """Whether the native Winograd kernel is built (part of the native CPU extension)."""
    return native.AVAILABLE and hasattr(torch.ops.fastddpm, "winograd_conv3x3")


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """``[K, C, 3, 3]`` weights to the ``[16, C, K]`` float32 table the kernel multiplies by
    (``U = G g G^T``, computed in float64)."""
    checks.floating("weight", weight)
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight: expected a [K, C, 3, 3] tensor, got {tuple(weight.shape)}")
    G = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    U = torch.einsum("ij,kcjl,ml->imck", G, weight.detach().double(), G)  # [4, 4, C, K]
    return U.reshape(16, weight.shape[1], weight.shape[0]).float().contiguous()


def winograd_conv3x3(x: torch.Tensor, U: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``conv2d(x, w, bias, padding=1)`` for the 3x3 weights ``w`` that ``U = transform_weight(w)``
    came from: ``x`` is a float32 CPU ``[N, C, H, W]`` tensor, ``U`` float32 ``[16, C, K]``,
    ``bias`` None or float32 ``[K]``, all on the CPU; the output is channels_last.

    Raises TypeError / ValueError for bad arguments (as :mod:`fastddpm.ops` documents), and
    RuntimeError when the native extension is not built (:func:`available` says whether it is).
    """
    if not available():
        raise RuntimeError("winograd: the native CPU extension is not built (see `fastddpm info`)")
    checks.tensor("x", x)
    if x.dim() != 4 or x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"x: expected a float32 CPU [N, C, H, W] tensor, got {x.dtype} {tuple(x.shape)} "
                         f"on {x.device}")
    checks.tensor("U", U)
    if U.dim() != 3 or U.shape[0] != 16 or U.shape[1] != x.shape[1] or U.dtype != torch.float32:
        raise ValueError(f"U: expected a float32 [16, {x.shape[1]}, K] table from transform_weight, got "
                         f"{U.dtype} {tuple(U.shape)}")
    checks.on_device("U", U, x.device)
    if checks.optional_tensor("bias", bias) is not None:
        if tuple(bias.shape) != (U.shape[2],) or bias.dtype != torch.float32:
            raise ValueError(f"bias: expected shape ({U.shape[2]},) and dtype float32, got "
                             f"{tuple(bias.shape)} {bias.dtype}")
        checks.on_device("bias", bias, x.device)
    return torch.ops.fastddpm.winograd_conv3x3(x, U, bias)
