"""The Winograd F(2x2, 3x3) and F(4x4, 3x3) convolution op (csrc/cpu/winograd_conv.cpp; CPU, inference).

F(m x m, 3x3) computes a 3x3, stride-1, padding-1 convolution with (m + 2)^2 multiplies per m x m
output tile and (input, output) channel pair instead of 9 m^2: 16 instead of 36 for m = 2, 36
instead of 144 for m = 4, at the price of additions in the tile transforms and a larger rounding
error (against float64, on U-Net-like inputs: F(2x2) about 2x a direct convolution's, F(4x4)
about 10x in float32 — still ~1e-6 relative — and F(4x4) in bfloat16 about 10x the direct
bfloat16 convolution's, so the op rejects it; tests/test_winograd.py bounds each variant).
The weights are transformed once (:func:`transform_weight`); the tile size is the table's first
dimension (16 or 36 positions), the dtype x's (float32, or bfloat16 for F(2x2): transforms in
float32, GEMMs in bfloat16). :mod:`fastddpm.models.winograd` rewrites a model's convolutions to use it.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import checks, native

TILES = (2, 4)
DTYPES = (torch.float32, torch.bfloat16)

# Weight transforms G (Lavin & Gray 2016): U = G g G^T, (m + 2) x 3 for F(m x m, 3x3); F(4x4)
# interpolates at 0, 1, -1, 2, -2 and infinity (the B^T and A^T in the C++ file match these points).
_G = {2: ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0)),
      4: ((1 / 4, 0.0, 0.0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
          (1 / 24, -1 / 12, 1 / 6), (0.0, 0.0, 1.0))}


def available() -> bool:
    """Whether the native Winograd kernel is built (part of the native CPU extension)."""
    return native.AVAILABLE and hasattr(torch.ops.fastddpm, "winograd_conv3x3")


def positions(tile: int) -> int:
    """The number of GEMM positions ``(tile + 2)^2`` of F(tile x tile, 3x3): the table's first dimension."""
    if type(tile) is not int or tile not in TILES:  # not 2.0 or True: the tile names a table
        raise ValueError(f"tile: expected one of {TILES}, got {tile!r}")
    return (tile + 2) ** 2


def transform_weight(weight: torch.Tensor, tile: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[K, C, 3, 3]`` weights to the ``[(tile + 2)^2, C, K]`` table of ``dtype`` (float32 or
    bfloat16) the kernel multiplies by for F(tile x tile, 3x3), ``tile`` 2 or 4 (``U = G g G^T``,
    computed in float64, rounded once)."""
    checks.floating("weight", weight)
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight: expected a [K, C, 3, 3] tensor, got {tuple(weight.shape)}")
    a2 = positions(tile)
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype!r}")
    G = torch.tensor(_G[tile], dtype=torch.float64, device=weight.device)
    U = torch.einsum("ij,kcjl,ml->imck", G, weight.detach().double(), G)  # [a, a, C, K]
    return U.reshape(a2, weight.shape[1], weight.shape[0]).to(dtype).contiguous()


def winograd_conv3x3(x: torch.Tensor, U: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``conv2d(x, w, bias, padding=1)`` for the 3x3 weights ``w`` that ``U = transform_weight(w, tile, x.dtype)``
    came from: ``x`` is a float32 or bfloat16 CPU ``[N, C, H, W]`` tensor, ``U`` ``[16 or 36, C, K]``
    of x's dtype (36, F(4x4), in float32 only), ``bias`` None or ``[K]`` float32 or x's dtype, all on
    the CPU; the output is x's dtype, channels_last.

    Raises TypeError / ValueError for bad arguments (as :mod:`fastddpm.ops` documents), and
    RuntimeError when the native extension is not built (:func:`available` says whether it is).
    """
    if not available():
        raise RuntimeError("winograd: the native CPU extension is not built (see `fastddpm info`)")
    checks.tensor("x", x)
    if x.dim() != 4 or x.dtype not in DTYPES or x.device.type != "cpu":
        raise ValueError(f"x: expected a float32 CPU [N, C, H, W] tensor (or bfloat16), got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device}")
    checks.tensor("U", U)
    if U.dim() != 3 or U.shape[0] not in (16, 36) or U.shape[1] != x.shape[1] or U.dtype != x.dtype:
        raise ValueError(f"U: expected a {str(x.dtype).split('.')[-1]} [16, {x.shape[1]}, K] table from "
                         f"transform_weight (or [36, {x.shape[1]}, K], F(4x4)), got {U.dtype} {tuple(U.shape)}")
    if U.shape[0] == 36 and x.dtype != torch.float32:
        raise ValueError("U: F(4x4, 3x3) runs in float32 only (in bfloat16 its error is about 10x a direct "
                         "bfloat16 convolution's); use transform_weight(w, tile=2, dtype=torch.bfloat16)")
    checks.on_device("U", U, x.device)
    if checks.optional_tensor("bias", bias) is not None:
        if tuple(bias.shape) != (U.shape[2],) or bias.dtype not in (torch.float32, x.dtype):
            raise ValueError(f"bias: expected shape ({U.shape[2]},) and dtype float32 or {x.dtype}, got "
                             f"{tuple(bias.shape)} {bias.dtype}")
        checks.on_device("bias", bias, x.device)
    return torch.ops.fastddpm.winograd_conv3x3(x, U, bias)
