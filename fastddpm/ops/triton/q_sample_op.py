"""``q_sample`` in Triton: ``x_t = sqrt(abar[t]) x0 + sqrt(1 - abar[t]) z``, z given or drawn in-kernel."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..layout import dense_empty_like
from .common import ELEMENTWISE_SPACE, configs, dense_like, load_timestep, normal_tile


@triton.autotune(configs=configs(ELEMENTWISE_SPACE), key=["numel", "DRAW"])
@triton.jit
def _q_sample_kernel(x0_ptr, t_ptr, t_stride, T, table_ptr, noise_ptr, state_ptr, xt_ptr, drawn_ptr,
                     numel, per_sample, DRAW: tl.constexpr, HAS_BASE: tl.constexpr, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    step = load_timestep(t_ptr, t_stride, offs // per_sample, T, mask)
    a = tl.load(table_ptr + step * 2, mask=mask, other=0.0)
    b = tl.load(table_ptr + step * 2 + 1, mask=mask, other=0.0)
    x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if DRAW:
        z = normal_tile(state_ptr, start, BLOCK, HAS_BASE)
        tl.store(drawn_ptr + offs, z, mask=mask)
    else:
        z = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(xt_ptr + offs, a * x0 + b * z, mask=mask)


@triton_op("fastddpm_triton::q_sample", mutates_args={})
def q_sample(x0: torch.Tensor, t: torch.Tensor, table: torch.Tensor, noise: Optional[torch.Tensor],
             rng_state: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The op (same schema as ``fastddpm::q_sample``): ``(x_t, drawn noise or an empty tensor)``."""
    xt = dense_empty_like(x0)
    x0 = dense_like(x0, xt)
    draw = noise is None
    drawn = dense_empty_like(x0) if draw else x0.new_empty(0)
    noise = x0 if draw else dense_like(noise, xt)
    state = rng_state if draw else t
    numel = x0.numel()
    if numel:
        wrap_triton(_q_sample_kernel)[lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)](
            x0, t, t.stride(0), table.shape[0], table, noise, state, xt, drawn if draw else xt, numel,
            numel // x0.shape[0], DRAW=draw, HAS_BASE=draw and rng_state.numel() == 3)
    return xt, drawn
