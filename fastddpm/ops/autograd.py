"""Backward formulas of the compiled ops (csrc ``fastddpm::`` and Triton ``fastddpm_triton::`` share
their schemas, so one set serves both), attached with ``torch.library.register_autograd``.

``group_norm_act``'s backward runs a fused kernel of its namespace (``group_norm_act_backward``:
csrc on the CPU, Triton) where there is one; :func:`group_norm_act_backward` is the formula they
are tested against, and the backward of the csrc op on CUDA."""

from __future__ import annotations

import torch

from .layout import per_channel, per_sample, stat_dtype
from .reference import predicted_x0


def group_norm_act_backward(grad: torch.Tensor, x: torch.Tensor, weight, bias, temb, mean: torch.Tensor,
                            rstd: torch.Tensor, groups: int, silu: bool):
    """Gradients (x, weight, bias, temb) of ``act(GN(x + temb) * w + b)`` from the saved statistics."""
    N, C = x.shape[:2]
    dims = [0] + list(range(2, x.dim()))
    work = stat_dtype(x)
    h = x.to(work) + (per_channel(temb.to(work), x.dim()) if temb is not None else 0)
    xhat = ((h.reshape(N, groups, -1) - mean[..., None]) * rstd[..., None]).reshape(h.shape)
    w = per_channel(weight.to(work), x.dim()) if weight is not None else None
    g = grad.to(work)
    if silu:
        u = xhat * w if w is not None else xhat
        if bias is not None:
            u = u + per_channel(bias.to(work), x.dim())
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


def _fused_backward(namespace: str):
    """The backward of ``{namespace}::group_norm_act`` as a function like :func:`group_norm_act_backward`:
    the fused kernel ``{namespace}::group_norm_act_backward`` where the namespace has one for the
    device (csrc: the CPU; Triton: everywhere it runs), else the formula (csrc on CUDA)."""
    def backward(grad, x, weight, bias, temb, mean, rstd, groups, silu):
        if torch.is_grad_enabled():  # create_graph=True: neither the kernels nor the formula (its
            # statistics are saved constants) give second derivatives; aten's group norm does
            raise NotImplementedError("group_norm_act: no double backward (create_graph=True) in the fused ops; "
                                      "run the model under fastddpm.ops.use_backend('reference')")
        op = getattr(getattr(torch.ops, namespace), "group_norm_act_backward", None)
        if op is None or (namespace == "fastddpm" and x.device.type != "cpu"):
            return group_norm_act_backward(grad, x, weight, bias, temb, mean, rstd, groups, silu)
        # the kernels take grad in x's dtype (y's); an empty tensor stands for an input's None gradient
        gx, gw, gb, gt = op(grad.to(x.dtype), x, weight, bias, temb, mean, rstd, groups, silu)
        return gx, gw if weight is not None else None, gb if bias is not None else None, \
            gt if temb is not None else None
    return backward


def _gn_backward_for(namespace: str):
    """The ``register_autograd`` backward of ``{namespace}::group_norm_act``."""
    backward = _fused_backward(namespace)

    def _gn_backward(ctx, grad, _gmean, _grstd):
        x, weight, bias, temb, mean, rstd = ctx.saved_tensors
        gx, gw, gb, gt = backward(grad, x, weight, bias, temb, mean, rstd, ctx.groups, ctx.silu)
        return gx, gw, gb, None, None, gt, None
    return _gn_backward


# q_sample and ddpm_step are affine in their tensor inputs (piecewise, where x0 is clipped).
def _qs_setup(ctx, inputs, output):
    x0, t, table, noise, _ = inputs
    ctx.save_for_backward(t, table)
    ctx.ndim, ctx.has_noise = x0.dim(), noise is not None


def _qs_backward(ctx, grad, _gnoise):
    t, table = ctx.saved_tensors
    a, b = per_sample(table, t, ctx.ndim)
    return (grad * a).to(grad.dtype), None, None, (grad * b).to(grad.dtype) if ctx.has_noise else None, None


def _step_setup(ctx, inputs, output):
    x, model_out, t, coeffs, noise, _, clip = inputs
    ctx.save_for_backward(x, model_out, t, coeffs)
    ctx.clip, ctx.has_noise = clip, noise is not None


def _step_backward(ctx, grad):
    x, m, t, coeffs = ctx.saved_tensors
    p, q, m1, m2, m3, s = per_sample(coeffs, t, x.dim())
    inside = 1.0
    if ctx.clip is not None:  # where x0 was clipped, it no longer depends on x and m
        inside = (predicted_x0(x.float(), m.float(), t, coeffs).abs() < ctx.clip).float()
    gx = grad * (m1 * p * inside + m2)
    gm = grad * (m3 - m1 * q * inside)
    gz = (grad * s).to(grad.dtype) if ctx.has_noise else None
    return gx.to(grad.dtype), gm.to(grad.dtype), None, None, gz, None, None


def register_autograd(namespace: str) -> None:
    """Attach the backward formulas to ``{namespace}::q_sample``, ``ddpm_step`` and ``group_norm_act``."""
    torch.library.register_autograd(f"{namespace}::group_norm_act", _gn_backward_for(namespace),
                                    setup_context=_gn_setup)
    torch.library.register_autograd(f"{namespace}::q_sample", _qs_backward, setup_context=_qs_setup)
    torch.library.register_autograd(f"{namespace}::ddpm_step", _step_backward, setup_context=_step_setup)
