"""``ddpm_step`` in Triton: the one step of every sampler (DESIGN.md section 2), z given or drawn.

``x0 = p x - q m`` (clipped when asked), ``out = m1 x0 + m2 x + m3 m + s z``; (p, q, m1, m2, m3, s)
is row ``t`` of the coefficient table, gathered per sample on the device.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..layout import dense_empty_like
from .common import ELEMENTWISE_SPACE, configs, dense_like, load_timestep, normal_tile


# restore_value: `out` may be `x` itself (an in-place step), so tuning runs must not compound.
@triton.autotune(configs=configs(ELEMENTWISE_SPACE), key=["numel", "DRAW"], restore_value=["out_ptr"])
@triton.jit
def _ddpm_step_kernel(x_ptr, m_ptr, t_ptr, t_stride, T, coeffs_ptr, noise_ptr, state_ptr, out_ptr, clip,
                      numel, per_sample, DRAW: tl.constexpr, HAS_BASE: tl.constexpr, CLIP: tl.constexpr,
                      BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    row = coeffs_ptr + load_timestep(t_ptr, t_stride, offs // per_sample, T, mask) * 6
    p = tl.load(row, mask=mask, other=0.0)
    q = tl.load(row + 1, mask=mask, other=0.0)
    m1 = tl.load(row + 2, mask=mask, other=0.0)
    m2 = tl.load(row + 3, mask=mask, other=0.0)
    m3 = tl.load(row + 4, mask=mask, other=0.0)
    s = tl.load(row + 5, mask=mask, other=0.0)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if DRAW:
        z = normal_tile(state_ptr, start, BLOCK, HAS_BASE)
    else:
        z = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x0 = p * x - q * m
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip), clip).to(tl.float32)  # clip may arrive as fp64 (Inductor)
    tl.store(out_ptr + offs, m1 * x0 + m2 * x + m3 * m + s * z, mask=mask)


def _launch(x, model_out, t, coeffs, noise, rng_state, clip, out):
    model_out = dense_like(model_out, out)
    draw = noise is None
    noise = model_out if draw else dense_like(noise, out)
    numel = x.numel()
    if numel:
        wrap_triton(_ddpm_step_kernel)[lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)](
            x, model_out, t, t.stride(0), coeffs.shape[0], coeffs, noise, rng_state if draw else t, out,
            0.0 if clip is None else float(clip), numel, numel // x.shape[0], DRAW=draw,
            HAS_BASE=draw and rng_state.numel() == 3, CLIP=clip is not None)


@triton_op("fastddpm_triton::ddpm_step", mutates_args={})
def ddpm_step(x: torch.Tensor, model_out: torch.Tensor, t: torch.Tensor, coeffs: torch.Tensor,
              noise: Optional[torch.Tensor], rng_state: Optional[torch.Tensor], clip: Optional[float]) -> torch.Tensor:
    """The op (same schema as ``fastddpm::ddpm_step``): the next x in a new tensor."""
    out = dense_empty_like(x)
    _launch(dense_like(x, out), model_out, t, coeffs, noise, rng_state, clip, out)
    return out


@triton_op("fastddpm_triton::ddpm_step_out", mutates_args={"out"})
def ddpm_step_out(x: torch.Tensor, model_out: torch.Tensor, t: torch.Tensor, coeffs: torch.Tensor,
                  noise: Optional[torch.Tensor], rng_state: Optional[torch.Tensor], clip: Optional[float],
                  out: torch.Tensor) -> None:
    """The op writing into ``out`` (laid out densely like ``x``; may be ``x`` itself)."""
    _launch(dense_like(x, out), model_out, t, coeffs, noise, rng_state, clip, out)
