"""Counter-based noise state, and a pure-PyTorch Philox4x32-10 + Box-Muller (the oracle for the
native and Triton generators, which implement the same stream; see csrc/include/fastddpm/elementwise.h).

Element ``i`` of a draw with state ``(seed, offset)`` uses Philox block ``i // 4``, lane ``i % 4``,
with counter ``(block, offset)`` and key ``seed``. Each draw advances ``offset`` by one on the
device (an in-place add), so a captured CUDA graph draws fresh noise on every replay.

A state with a ``base`` (a multiple of 4) draws numbers ``base + i`` of the stream instead: a
batch of images ``[i0, i0 + B)`` of C*H*W values each, drawn with ``base = i0 * C*H*W``, gets
exactly the noise those images get in any other batch (per-image seeds, see
:mod:`fastddpm.sampling.noise`). The base is the third element of the state tensor, read on the
device like the rest.
"""

from __future__ import annotations

import math

from typing import Optional

import torch

from . import checks

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK = 0xFFFFFFFF


class PhiloxState:
    """A ``(seed, offset)`` pair, or ``(seed, offset, base)``, held in an int64 tensor on the
    device the kernels run on."""

    def __init__(self, seed: Optional[int] = None, device="cpu", offset: int = 0, base: Optional[int] = None):
        """``seed`` (None: drawn from torch's global RNG) and ``offset`` are ints in ``[0, 2**63)``
        (an int64 holds them); ``device`` a torch.device or its name; ``base`` (None: 0, and a
        two-element state) the stream number of each draw's first element, a multiple of 4 so
        every kernel keeps whole Philox blocks. TypeError / ValueError for bad arguments, as
        :mod:`fastddpm.ops` documents."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        values = [checks.integer("seed", seed, 0, 2**63), checks.integer("offset", offset, 0, 2**63)]
        if base is not None:
            values.append(checks.integer("base", base, 0, 2**63))
            if base % 4:
                raise ValueError(f"base: expected a multiple of 4 (whole Philox blocks), got {base}")
        self.tensor = torch.tensor(values, dtype=torch.int64, device=checks.device("device", device))

    @property
    def device(self) -> torch.device:
        """The device of the state tensor."""
        return self.tensor.device

    def advance(self) -> None:
        """Move to the next stream (device-side; no host sync)."""
        self.tensor[1:2].add_(1)

    def randn(self, shape) -> torch.Tensor:
        """float32 normals of the current stream, shaped ``shape``, then :meth:`advance` (reads the
        state on the host: for a start value, not for a loop)."""
        seed, offset, *base = self.tensor.tolist()
        self.advance()
        numel = math.prod(int(s) for s in shape)
        return philox_normal(numel, seed, offset, device=self.device, first=sum(base)).reshape(tuple(shape))

    def __repr__(self) -> str:
        seed, offset, *base = self.tensor.tolist()
        based = f", base={base[0]}" if base else ""
        return f"PhiloxState(seed={seed}, offset={offset}{based}, device={self.device})"


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


def _noise_log(x: torch.Tensor) -> torch.Tensor:
    """float32 log on (0, 1], the same operations as ``noise_log`` in elementwise.h (Cephes logf)."""
    bits = x.view(torch.int32).to(torch.int64) & _MASK
    e = ((bits >> 23) & 0xFF) - 126
    m = ((bits & 0x007FFFFF) | 0x3F000000).to(torch.int32).view(torch.float32)
    small = m < 0.70710678118654752
    e = torch.where(small, e - 1, e)
    t = torch.where(small, (m + m) - 1.0, m - 1.0)
    z = t * t
    y = torch.full_like(t, 7.0376836292e-2)
    for coef in (-1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
                 -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1):
        y = y * t + coef
    y = y * t * z
    fe = e.to(torch.float32)
    y = y + -2.12194440e-4 * fe
    y = y + -0.5 * z
    return (t + y) + 0.693359375 * fe


def _noise_sincos_2pi(u: torch.Tensor):
    """float32 (sin, cos) of 2 pi u, as ``noise_sincos_2pi`` in elementwise.h."""
    v = 4.0 * u
    q = (v + 0.5).to(torch.int32)
    x = (v - q.to(torch.float32)) * 1.57079632679489662
    z = x * x
    sp = torch.full_like(x, -1.9515295891e-4)
    sp = sp * z + 8.3321608736e-3
    sp = sp * z - 1.6666654611e-1
    sp = sp * z * x + x
    cp = torch.full_like(x, 2.443315711809948e-5)
    cp = cp * z - 1.388731625493765e-3
    cp = cp * z + 4.166664568298827e-2
    cp = cp * z * z - 0.5 * z + 1.0
    k = (q & 3)[..., None]
    table_s = torch.stack([sp, cp, -sp, -cp], dim=-1)
    table_c = torch.stack([cp, -sp, -cp, sp], dim=-1)
    return table_s.gather(-1, k.long())[..., 0], table_c.gather(-1, k.long())[..., 0]


def philox_normal(numel: int, seed: int, offset: int, device="cpu", first: int = 0) -> torch.Tensor:
    """``numel`` float32 normals of stream ``(seed, offset)``, from its number ``first`` on: the
    same bits the native kernels draw.

    ``numel`` and ``first`` are ints >= 0; ``seed`` and ``offset`` ints in ``[0, 2**64)`` (the
    kernels read them as uint64); TypeError / ValueError for bad arguments, as :mod:`fastddpm.ops`
    documents."""
    numel, first = checks.integer("numel", numel), checks.integer("first", first)
    seed, offset = checks.integer("seed", seed, 0, 2**64), checks.integer("offset", offset, 0, 2**64)
    device = checks.device("device", device)
    blocks = torch.arange(first // 4, (first + numel + 3) // 4, dtype=torch.int64, device=device)
    r = philox4x32_10(blocks, offset, seed)
    u = ((r >> 8).to(torch.float32) + 1.0) * 5.9604644775390625e-08  # (0, 1]
    # sqrt via float64: torch's float32 CPU sqrt is not always correctly rounded, sqrtf is
    radius = torch.sqrt((-2.0 * _noise_log(u[:, 0::2])).double()).float()
    sin, cos = _noise_sincos_2pi(u[:, 1::2])
    z = torch.stack([radius * cos, radius * sin], dim=2)  # [blocks, pair, (cos, sin)]
    return z.reshape(-1)[first % 4:first % 4 + numel]
