"""What the compiled backends share: the csrc ``fastddpm::`` ops and the Triton ``fastddpm_triton::``
ops have the same schemas, so their fake kernels, autograd formulas and Python entry points
(:class:`CompiledOps`) are written once here and bound to an op namespace."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .philox import PhiloxState
from .reference import _per_sample, predicted_x0


def dense_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout the kernels produce for ``x``: channels_last when x is, else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def dense_empty_like(x: torch.Tensor) -> torch.Tensor:
    """A new tensor like ``x`` in :func:`dense_memory_format` (x)."""
    return torch.empty_like(x, memory_format=dense_memory_format(x))


def stat_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the saved group statistics: float64 for float64 inputs, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_channel(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """[C] or [B, C] reshaped to broadcast over the spatial dims of an ndim-dim [B, C, ...] tensor."""
    return v.reshape(v.shape[0] if v.dim() == 2 else 1, -1, *([1] * (ndim - 2)))


def group_norm_act_backward(grad: torch.Tensor, x: torch.Tensor, weight, bias, temb, mean: torch.Tensor,
                            rstd: torch.Tensor, groups: int, silu: bool):
    """Gradients (x, weight, bias, temb) of ``act(GN(x + temb) * w + b)`` from the saved statistics."""
    N, C = x.shape[:2]
    dims = [0] + list(range(2, x.dim()))
    work = stat_dtype(x)
    h = x.to(work) + (_per_channel(temb.to(work), x.dim()) if temb is not None else 0)
    xhat = ((h.reshape(N, groups, -1) - mean[..., None]) * rstd[..., None]).reshape(h.shape)
    w = _per_channel(weight.to(work), x.dim()) if weight is not None else None
    g = grad.to(work)
    if silu:
        u = xhat * w if w is not None else xhat
        if bias is not None:
            u = u + _per_channel(bias.to(work), x.dim())
        sig = torch.sigmoid(u)
        g = g * sig * (1 + u * (1 - sig))
    gw = (g * xhat).sum(dims).to(weight.dtype) if weight is not None else None
    gb = g.sum(dims).to(bias.dtype) if bias is not None else None
    gxhat = (g * w if w is not None else g).reshape(N, groups, -1)
    xg = xhat.reshape(N, groups, -1)
    gx = rstd[..., None] * (gxhat - gxhat.mean(-1, keepdim=True) - xg * (gxhat * xg).mean(-1, keepdim=True))
    gx = gx.reshape(x.shape)
    gtemb = gx.sum(list(range(2, x.dim()))).to(temb.dtype) if temb is not None else None
    return gx.to(x.dtype), gw, gb, gtemb


def _gn_setup(ctx, inputs, output):
    x, weight, bias, groups, eps, temb, silu = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, temb, mean, rstd)
    ctx.groups, ctx.silu = groups, silu


def _gn_backward(ctx, grad, _gmean, _grstd):
    x, weight, bias, temb, mean, rstd = ctx.saved_tensors
    gx, gw, gb, gt = group_norm_act_backward(grad, x, weight, bias, temb, mean, rstd, ctx.groups, ctx.silu)
    return gx, gw, gb, None, None, gt, None


# q_sample and ddpm_step are affine in their tensor inputs (piecewise, where x0 is clipped).
def _qs_setup(ctx, inputs, output):
    x0, t, table, noise, _ = inputs
    ctx.save_for_backward(t, table)
    ctx.ndim, ctx.has_noise = x0.dim(), noise is not None


def _qs_backward(ctx, grad, _gnoise):
    t, table = ctx.saved_tensors
    a, b = _per_sample(table, t, ctx.ndim)
    return (grad * a).to(grad.dtype), None, None, (grad * b).to(grad.dtype) if ctx.has_noise else None, None


def _step_setup(ctx, inputs, output):
    x, model_out, t, coeffs, noise, _, clip = inputs
    ctx.save_for_backward(x, model_out, t, coeffs)
    ctx.clip, ctx.has_noise = clip, noise is not None


def _step_backward(ctx, grad):
    x, m, t, coeffs = ctx.saved_tensors
    p, q, m1, m2, m3, s = _per_sample(coeffs, t, x.dim())
    inside = 1.0
    if ctx.clip is not None:  # where x0 was clipped, it no longer depends on x and m
        inside = (predicted_x0(x.float(), m.float(), t, coeffs).abs() < ctx.clip).float()
    gx = grad * (m1 * p * inside + m2)
    gm = grad * (m3 - m1 * q * inside)
    gz = (grad * s).to(grad.dtype) if ctx.has_noise else None
    return gx.to(grad.dtype), gm.to(grad.dtype), None, None, gz, None, None


def register_autograd(namespace: str) -> None:
    """Attach the backward formulas to ``{namespace}::q_sample``, ``ddpm_step`` and ``group_norm_act``."""
    torch.library.register_autograd(f"{namespace}::group_norm_act", _gn_backward, setup_context=_gn_setup)
    torch.library.register_autograd(f"{namespace}::q_sample", _qs_backward, setup_context=_qs_setup)
    torch.library.register_autograd(f"{namespace}::ddpm_step", _step_backward, setup_context=_step_setup)


def register_fakes(namespace: str) -> None:
    """Fake (meta) kernels for the four ops of ``namespace``, so torch.compile traces them."""
    @torch.library.register_fake(f"{namespace}::q_sample")
    def _q_sample_fake(x0, t, table, noise, rng_state):
        return dense_empty_like(x0), (dense_empty_like(x0) if noise is None else x0.new_empty(0))

    @torch.library.register_fake(f"{namespace}::ddpm_step")
    def _ddpm_step_fake(x, model_out, t, coeffs, noise, rng_state, clip):
        return dense_empty_like(x)

    @torch.library.register_fake(f"{namespace}::ddpm_step_out")
    def _ddpm_step_out_fake(x, model_out, t, coeffs, noise, rng_state, clip, out):
        return None

    @torch.library.register_fake(f"{namespace}::group_norm_act")
    def _group_norm_act_fake(x, weight, bias, groups, eps, temb, silu):
        stats = x.new_empty((x.shape[0], groups), dtype=stat_dtype(x))
        return dense_empty_like(x), stats, stats.clone()


_DEFAULT_STATES = {}


def default_rng(device: torch.device) -> PhiloxState:
    """The process-wide Philox state for ``device``, seeded from torch's RNG on first use."""
    key = str(device)
    if key not in _DEFAULT_STATES:
        _DEFAULT_STATES[key] = PhiloxState(device=device)
    return _DEFAULT_STATES[key]


def _noise_args(x, noise, generator, rng):
    """(noise, rng_state) for the op: explicit noise, torch.randn from a generator, or Philox."""
    if noise is not None:
        return noise, None
    if generator is not None:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype), None
    return None, (rng or default_rng(x.device))


class CompiledOps:
    """The backend functions of :mod:`fastddpm.ops` over the four ops of one namespace."""

    def __init__(self, namespace: str):
        self.namespace = namespace

    @property
    def _ops(self):
        return getattr(torch.ops, self.namespace)

    def q_sample(self, x0, t, table, noise=None, *, generator=None, rng=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``q_sample`` of this backend; see :func:`fastddpm.ops.q_sample`."""
        noise, state = _noise_args(x0, noise, generator, rng)
        xt, drawn = self._ops.q_sample(x0, t, table, noise, state.tensor if state else None)
        if state is not None:
            state.advance()
            return xt, drawn
        return xt, noise

    def ddpm_step(self, x, model_out, t, coeffs, noise=None, clip: Optional[float] = None, *, generator=None,
                  out=None, rng=None) -> torch.Tensor:
        """``ddpm_step`` of this backend; see :func:`fastddpm.ops.ddpm_step`."""
        noise, state = _noise_args(x, noise, generator, rng)
        rng_state = state.tensor if state else None
        if out is not None and out.dtype == x.dtype and out.is_contiguous(memory_format=dense_memory_format(x)):
            self._ops.ddpm_step_out(x, model_out, t, coeffs, noise, rng_state, clip, out)
            result = out
        else:
            result = self._ops.ddpm_step(x, model_out, t, coeffs, noise, rng_state, clip)
            if out is not None:
                result = out.copy_(result)
        if state is not None:
            state.advance()
        return result

    def group_norm_act(self, x, weight, bias, groups, eps=1e-6, temb=None, act="silu") -> torch.Tensor:
        """``group_norm_act`` of this backend; see :func:`fastddpm.ops.group_norm_act`."""
        return self._ops.group_norm_act(x, weight, bias, groups, float(eps), temb, act == "silu")[0]
