"""Pure-PyTorch implementations of the three fused ops — the oracle every fast path is tested against.

Shapes: ``x`` is ``[B, ...]``; ``t`` is an int64 tensor of ``B`` timestep indices; tables are float32
``[T, k]`` tensors from :meth:`fastddpm.schedule.Schedule.table`. Per-sample scalars are gathered on
the device (no host sync). Arithmetic is done in float32 and the result cast back to ``x.dtype``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .layout import per_sample
from .philox import PhiloxState


WHERE = "tensors on any device"


def runs_on(device: torch.device) -> bool:
    """The reference runs wherever PyTorch does."""
    return True


def _draw(x: torch.Tensor, rng: Optional[PhiloxState]) -> torch.Tensor:
    """Noise like ``x`` from the Philox stream of ``rng`` (then advanced): what the compiled
    kernels draw in-kernel. (:mod:`fastddpm.ops` resolves a generator into a noise tensor first.)"""
    if rng is None:
        raise ValueError("noise: expected a noise tensor or rng= (a PhiloxState) to draw it from, got neither")
    return rng.randn(x.shape).to(x.dtype)


def _opmath(x: torch.Tensor) -> torch.Tensor:
    """x in the dtype arithmetic is done in: float32 for 16-bit floats, else its own."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def q_sample(x0: torch.Tensor, t: torch.Tensor, table: torch.Tensor,
             noise: Optional[torch.Tensor] = None, *, rng: Optional[PhiloxState] = None
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(x_t, noise)`` with ``x_t = sqrt(abar[t]) x0 + sqrt(1 - abar[t]) noise``."""
    if noise is None:
        noise = _draw(x0, rng)
    a, b = per_sample(table, t, x0.dim())
    xt = a * _opmath(x0) + b * _opmath(noise)
    return xt.to(x0.dtype), noise


def predicted_x0(x: torch.Tensor, model_out: torch.Tensor, t: torch.Tensor, coeffs: torch.Tensor,
                 clip: Optional[float] = None) -> torch.Tensor:
    """The x0 a step predicts: ``p x - q m``, clipped to ``[-clip, clip]`` when given (the first
    line of :func:`ddpm_step`; the step kernels compute the same)."""
    p, q = per_sample(coeffs[:, :2], t, x.dim())
    x0 = p * x - q * model_out
    return x0.clamp(-clip, clip) if clip is not None else x0


def ddpm_step(x: torch.Tensor, model_out: torch.Tensor, t: torch.Tensor, coeffs: torch.Tensor,
              noise: Optional[torch.Tensor] = None, clip: Optional[float] = None, *,
              out: Optional[torch.Tensor] = None, rng: Optional[PhiloxState] = None) -> torch.Tensor:
    """One reverse step: ``x0 = p x - q m`` (clipped to ``[-clip, clip]`` when given), then
    ``m1 x0 + m2 x + m3 m + s z``. ``z`` is ``noise``, else drawn from ``rng``."""
    _, _, m1, m2, m3, s = per_sample(coeffs, t, x.dim())
    xf, mf = _opmath(x), _opmath(model_out)
    x0 = predicted_x0(xf, mf, t, coeffs, clip)
    if noise is None:
        noise = _draw(x, rng)
    result = (m1 * x0 + m2 * xf + m3 * mf + s * _opmath(noise)).to(x.dtype)
    if out is not None:
        out.copy_(result)
        return out
    return result


def _norm_params(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]):
    """(weight, bias) in dtypes F.group_norm takes with ``x``: as given when they are x's, or all
    float32 with a 16-bit x (the mixed precision it supports); else cast to x's dtype (the op takes
    any floating dtype, as the kernels do, which compute in their own precision)."""
    dtypes = {p.dtype for p in (weight, bias) if p is not None}
    if dtypes <= {x.dtype} or (dtypes == {torch.float32} and x.dtype in (torch.float16, torch.bfloat16)):
        return weight, bias
    return tuple(None if p is None else p.to(x.dtype) for p in (weight, bias))


def group_norm_act(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   groups: int, eps: float = 1e-6, temb: Optional[torch.Tensor] = None,
                   act: Optional[str] = "silu") -> torch.Tensor:
    """``act(GroupNorm(x + temb[:, :, None, None]) * weight + bias)``; statistics include temb."""
    if temb is not None:
        x = x + temb.reshape(temb.shape[0], temb.shape[1], *([1] * (x.dim() - 2))).to(x.dtype)
    y = F.group_norm(x, groups, *_norm_params(x, weight, bias), eps)
    if act == "silu":
        y = F.silu(y)
    return y
