"""Pieces every Triton kernel here shares: the autotune config spaces, and the counter-based normal
noise — the same Philox4x32-10 + Box-Muller stream as the native kernels (csrc elementwise.h) and
the Python oracle (:func:`fastddpm.ops.philox_normal`), with the seed and offset read from device
memory so a captured CUDA graph draws fresh noise on every replay."""

from __future__ import annotations

import os

import triton
import triton.language as tl

from ..layout import dense_memory_format

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# FASTDDPM_TRITON_AUTOTUNE=0: take each space's first config (a good default) without tuning; tests
# on many shapes use it, since every new shape would be tuned afresh.
AUTOTUNE = not INTERPRET and os.environ.get("FASTDDPM_TRITON_AUTOTUNE", "1") != "0"


def configs(space, **fixed):
    """``triton.Config`` for each ``(meta-parameters, num_warps)`` of ``space``; only the first
    when not tuning (under the CPU interpreter, tuning would time nothing real)."""
    space = space if AUTOTUNE else space[:1]
    return [triton.Config({**meta, **fixed}, num_warps=warps) for meta, warps in space]


# Elementwise kernels: large tiles keep Hopper's and Ampere's memory pipes full; small ones serve
# small tensors with enough programs.
ELEMENTWISE_SPACE = [({"BLOCK": 1024}, 4), ({"BLOCK": 2048}, 4), ({"BLOCK": 2048}, 8), ({"BLOCK": 4096}, 8),
                     ({"BLOCK": 512}, 4), ({"BLOCK": 8192}, 16)]


@triton.jit
def load_timestep(t_ptr, t_stride, sample, T, mask):
    """``t[sample]`` (0 in masked lanes), clamped into ``[0, T)``: a trusted, unchecked t (see
    :mod:`fastddpm.ops`) gives unspecified values, never a read outside the table."""
    step = tl.load(t_ptr + sample * t_stride, mask=mask, other=0)
    return tl.minimum(tl.maximum(step, 0), T - 1)


@triton.jit
def _uniform_open0(u):
    """uint32 -> float in (0, 1] (never 0, so the log is finite)."""
    return ((u >> 8).to(tl.float32) + 1.0) * 5.9604644775390625e-08


@triton.jit
def _noise_log(x):
    """Branch-free Cephes logf for x in (0, 1], the operations of ``noise_log`` in elementwise.h."""
    bits = x.to(tl.uint32, bitcast=True)
    m = ((bits & 0x007FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)
    small = m < 0.70710678118654752
    fe = ((bits >> 23).to(tl.int32) - 126).to(tl.float32) - tl.where(small, 1.0, 0.0)
    t = m * tl.where(small, 2.0, 1.0) - 1.0
    z = t * t
    y = 7.0376836292e-2 * t - 1.1514610310e-1
    y = y * t + 1.1676998740e-1
    y = y * t - 1.2420140846e-1
    y = y * t + 1.4249322787e-1
    y = y * t - 1.6668057665e-1
    y = y * t + 2.0000714765e-1
    y = y * t - 2.4999993993e-1
    y = y * t + 3.3333331174e-1
    y = y * t * z
    y = y + -2.12194440e-4 * fe
    y = y + -0.5 * z
    return (t + y) + 0.693359375 * fe


@triton.jit
def _noise_sincos_2pi(u):
    """(sin, cos) of 2 pi u for u in (0, 1], as ``noise_sincos_2pi`` in elementwise.h."""
    v = 4.0 * u
    q = (v + 0.5).to(tl.int32)
    x = (v - q.to(tl.float32)) * 1.57079632679489662
    z = x * x
    sp = -1.9515295891e-4 * z + 8.3321608736e-3
    sp = sp * z - 1.6666654611e-1
    sp = sp * z * x + x
    cp = 2.443315711809948e-5 * z - 1.388731625493765e-3
    cp = cp * z + 4.166664568298827e-2
    cp = cp * z * z - 0.5 * z + 1.0
    odd = (q & 1) != 0
    s = tl.where(odd, cp, sp) * tl.where((q & 2) != 0, -1.0, 1.0)
    c = tl.where(odd, sp, cp) * tl.where(((q + 1) & 2) != 0, -1.0, 1.0)
    return s, c


@triton.jit
def _normal_pair(a, b):
    radius = tl.sqrt_rn(-2.0 * _noise_log(_uniform_open0(a)))
    s, c = _noise_sincos_2pi(_uniform_open0(b))
    return radius * c, radius * s


@triton.jit
def normal_tile(state_ptr, start, BLOCK: tl.constexpr, HAS_BASE: tl.constexpr):
    """Normals for the flat indices ``start + arange(BLOCK)`` (``start`` a multiple of 4) of the
    stream ``(seed, offset) = state_ptr[0:2]``: element i is lane i % 4 of Philox block i // 4,
    counted from ``base = state_ptr[2]`` (a multiple of 4) when the state has one (HAS_BASE)."""
    seed = tl.load(state_ptr)
    offset = tl.load(state_ptr + 1)
    if HAS_BASE:
        start = start + tl.load(state_ptr + 2)
    block = start // 4 + tl.arange(0, BLOCK // 4).to(tl.int64)
    zero = tl.zeros([BLOCK // 4], dtype=tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, (block & 0xFFFFFFFF).to(tl.uint32), (block >> 32).to(tl.uint32),
                               zero + (offset & 0xFFFFFFFF).to(tl.uint32), zero + (offset >> 32).to(tl.uint32))
    z0, z1 = _normal_pair(r0, r1)
    z2, z3 = _normal_pair(r2, r3)
    # [z0_0, z1_0, z2_0, z3_0, z0_1, ...]
    return tl.interleave(tl.interleave(z0, z2), tl.interleave(z1, z3))


def dense_like(v, like):
    """``v`` laid out like ``like`` (which is dense): itself when it already is, else a copy."""
    return v if v.stride() == like.stride() else v.contiguous(memory_format=dense_memory_format(like))
