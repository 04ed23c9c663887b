"""Counter-based noise state, and a pure-PyTorch Philox4x32-10 + Box-Muller (the oracle for the
native and Triton generators, which implement the same stream; see csrc/include/fastddpm/elementwise.h).

Element ``i`` of a draw with state ``(seed, offset)`` uses Philox block ``i // 4``, lane ``i % 4``,
with counter ``(block, offset)`` and key ``seed``. Each draw advances ``offset`` by one on the
device (an in-place add), so a captured CUDA graph draws fresh noise on every replay.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK = 0xFFFFFFFF


class PhiloxState:
    """A ``(seed, offset)`` pair held in an int64 tensor on the device the kernels run on."""

    def __init__(self, seed: Optional[int] = None, device="cpu", offset: int = 0):
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
        self.tensor = torch.tensor([seed, offset], dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        """The device of the state tensor."""
        return self.tensor.device

    def advance(self) -> None:
        """Move to the next stream (device-side; no host sync)."""
        self.tensor[1:].add_(1)

    def __repr__(self) -> str:
        seed, offset = self.tensor.tolist()
        return f"PhiloxState(seed={seed}, offset={offset}, device={self.device})"


def _mulhilo(a: torch.Tensor, m: int):
    p = a * m  # < 2**64: exact modulo 2**64 in int64, so the bit pattern is right
    return (p >> 32) & _MASK, p & _MASK


def philox4x32_10(counter: torch.Tensor, offset: int, seed: int) -> torch.Tensor:
    """The four 32-bit outputs (as int64, shape ``[n, 4]``) of Philox4x32-10 for ``counter``."""
    c0, c1 = counter & _MASK, (counter >> 32) & _MASK
    c2 = torch.full_like(counter, offset & _MASK)
    c3 = torch.full_like(counter, (offset >> 32) & _MASK)
    k0, k1 = seed & _MASK, (seed >> 32) & _MASK
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
    return torch.stack([c0, c1, c2, c3], dim=1)


def philox_normal(numel: int, seed: int, offset: int, device="cpu") -> torch.Tensor:
    """``numel`` float32 normals of stream ``(seed, offset)``, as the native kernels draw them."""
    blocks = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    r = philox4x32_10(blocks, offset, seed)
    u = ((r >> 8).float() + 1.0) * 5.9604644775390625e-08  # (0, 1]
    radius = torch.sqrt(-2.0 * torch.log(u[:, 0::2]))
    angle = 2 * math.pi * u[:, 1::2]
    z = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=2)  # [n, 2, 2]
    return z.reshape(-1)[:numel]
