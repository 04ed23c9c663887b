"""The backward of ``fastddpm_triton::group_norm_act`` in Triton: gradients (x, weight, bias, temb)
from the forward's saved mean and rstd, the formula of :func:`fastddpm.ops.autograd.group_norm_act_backward`.

Two kernels, a program per (sample, channel) each, two reads of x and grad in all:
- stats: ``gp = grad * act'(u)`` and the channel's sums ``sg = sum gp``, ``sgx = sum gp xhat``;
- apply: the group's ``A = mean(w gp)``, ``B = mean(w gp xhat)`` from its channels' sums, then
  ``gx = rstd (w gp - A - xhat B)`` (gp recomputed rather than stored) and ``gtemb = sum gx``.
``gw = sum_n sgx`` and ``gb = sum_n sg`` are reduced over the batch afterwards, in a fixed order.
Statistics in fp32 (fp64 for fp64 inputs). NCHW and channels_last (strided reads of a channel there).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..layout import dense_empty_like, stat_dtype
from .common import configs, dense_like

_SPACE = [({"BLOCK": 1024}, 4), ({"BLOCK": 2048}, 8), ({"BLOCK": 512}, 4)]


@triton.jit
def _channel_tile(x_ptr, g_ptr, temb_ptr, w_ptr, b_ptr, n, c, C, S, s, mean, rstd, CL: tl.constexpr,
                  HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_T: tl.constexpr, SILU: tl.constexpr,
                  ACC: tl.constexpr):
    """Offsets, xhat and gp = grad * act'(u) of spatial positions ``s`` of channel c of sample n."""
    mask = s < S
    off = n * S * C + s * C + c if CL else (n * C + c) * S + s
    h = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
    if HAS_T:
        h += tl.load(temb_ptr + n * C + c).to(ACC)
    xhat = (h - mean) * rstd
    gp = tl.load(g_ptr + off, mask=mask, other=0.0).to(ACC)
    if SILU:
        u = xhat
        if HAS_W:
            u = u * tl.load(w_ptr + c).to(ACC)
        if HAS_B:
            u = u + tl.load(b_ptr + c).to(ACC)
        sig = 1.0 / (1.0 + tl.exp(-u))
        gp = gp * sig * (1.0 + u * (1.0 - sig))
    return off, mask, xhat, gp


@triton.autotune(configs=configs(_SPACE), key=["S", "CL"])
@triton.jit
def _gn_bwd_stats_kernel(x_ptr, g_ptr, w_ptr, b_ptr, temb_ptr, mean_ptr, rstd_ptr, sg_ptr, sgx_ptr, C, S, G,
                         CL: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_T: tl.constexpr,
                         SILU: tl.constexpr, BLOCK: tl.constexpr):
    ACC: tl.constexpr = mean_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)  # n * C + c
    n, c = row // C, row % C
    stat = n * G + c // (C // G)
    mean, rstd = tl.load(mean_ptr + stat), tl.load(rstd_ptr + stat)
    s1 = tl.zeros([BLOCK], dtype=ACC)
    s2 = tl.zeros([BLOCK], dtype=ACC)
    for base in range(0, S, BLOCK):
        s = base + tl.arange(0, BLOCK)
        _, mask, xhat, gp = _channel_tile(x_ptr, g_ptr, temb_ptr, w_ptr, b_ptr, n, c, C, S, s, mean, rstd, CL,
                                          HAS_W, HAS_B, HAS_T, SILU, ACC)
        s1 += gp  # gp is 0 where masked (grad loads 0 there)
        s2 += gp * xhat
    tl.store(sg_ptr + row, tl.sum(s1, axis=0))
    tl.store(sgx_ptr + row, tl.sum(s2, axis=0))


@triton.autotune(configs=configs(_SPACE), key=["S", "CL"])
@triton.jit
def _gn_bwd_apply_kernel(x_ptr, g_ptr, w_ptr, b_ptr, temb_ptr, mean_ptr, rstd_ptr, sg_ptr, sgx_ptr, gx_ptr, gt_ptr,
                         C, S, G, CL: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_T: tl.constexpr,
                         SILU: tl.constexpr, CPG_P2: tl.constexpr, BLOCK: tl.constexpr):
    ACC: tl.constexpr = mean_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    n, c = row // C, row % C
    cpg = C // G
    stat = n * G + c // cpg
    mean, rstd = tl.load(mean_ptr + stat), tl.load(rstd_ptr + stat)
    k = tl.arange(0, CPG_P2)
    kmask = k < cpg
    first = n * C + (c // cpg) * cpg  # the group's first channel's row
    sg = tl.load(sg_ptr + first + k, mask=kmask, other=0.0)
    sgx = tl.load(sgx_ptr + first + k, mask=kmask, other=0.0)
    w = 1.0
    if HAS_W:
        wk = tl.load(w_ptr + (c // cpg) * cpg + k, mask=kmask, other=0.0).to(ACC)
        sg, sgx = sg * wk, sgx * wk
        w = tl.load(w_ptr + c).to(ACC)
    size = cpg * S
    A = tl.sum(sg, axis=0) / size
    B = tl.sum(sgx, axis=0) / size
    total = tl.zeros([BLOCK], dtype=ACC)
    for base in range(0, S, BLOCK):
        s = base + tl.arange(0, BLOCK)
        off, mask, xhat, gp = _channel_tile(x_ptr, g_ptr, temb_ptr, w_ptr, b_ptr, n, c, C, S, s, mean, rstd, CL,
                                            HAS_W, HAS_B, HAS_T, SILU, ACC)
        gx = rstd * (w * gp - A - xhat * B)
        tl.store(gx_ptr + off, gx, mask=mask)
        total += tl.where(mask, gx, 0.0)
    if HAS_T:
        tl.store(gt_ptr + row, tl.sum(total, axis=0))


@triton_op("fastddpm_triton::group_norm_act_backward", mutates_args={})
def group_norm_act_backward(grad: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                            bias: Optional[torch.Tensor], temb: Optional[torch.Tensor], mean: torch.Tensor,
                            rstd: torch.Tensor, groups: int, silu: bool
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gx, gweight, gbias, gtemb) of ``fastddpm_triton::group_norm_act`` (same schema as
    ``fastddpm::group_norm_act_backward``: an input's None gradient is an empty tensor)."""
    gx = dense_empty_like(x)
    x, grad = dense_like(x, gx), dense_like(grad, gx)
    N, C = x.shape[:2]
    S = x.shape[2:].numel()
    acc = stat_dtype(x)
    sg = x.new_empty((N, C), dtype=acc)
    sgx = torch.empty_like(sg)
    gt = torch.empty_like(sg)
    flags = dict(CL=gx.dim() == 4 and not gx.is_contiguous(), HAS_W=weight is not None, HAS_B=bias is not None,
                 HAS_T=temb is not None, SILU=silu)
    w, b, tb = (v.contiguous() if v is not None else x for v in (weight, bias, temb))  # x: an unread stand-in
    mean, rstd = mean.contiguous(), rstd.contiguous()
    if N * C > 0:
        wrap_triton(_gn_bwd_stats_kernel)[(N * C,)](x, grad, w, b, tb, mean, rstd, sg, sgx, C, S, groups, **flags)
        wrap_triton(_gn_bwd_apply_kernel)[(N * C,)](x, grad, w, b, tb, mean, rstd, sg, sgx, gx, gt, C, S, groups,
                                                    CPG_P2=triton.next_power_of_2(C // groups), **flags)
    # (a fresh empty tensor for each None: a custom op's outputs may not alias one another)
    gw = sgx.sum(0).to(weight.dtype) if weight is not None else x.new_empty(0)
    gb = sg.sum(0).to(bias.dtype) if bias is not None else x.new_empty(0)
    gtemb = gt.to(temb.dtype, copy=True) if temb is not None else x.new_empty(0)
    return gx, gw, gb, gtemb
