"""``group_norm_act`` in Triton: ``act(GroupNorm(x + temb[:, :, None, None]) * w + b)``.

Two paths, chosen per call by the group's size (``C / groups * H * W`` values):
- one pass: a program per (sample, group) holds the whole group in registers: one read, one write;
- split reduction: each group is cut into ``split`` chunks; one kernel writes per-chunk (mean, M2,
  count), a second merges them (Chan et al.) and normalizes its chunk: two reads, one write, and
  enough programs to fill the GPU when there are few (sample, group) pairs.
Statistics are exact two-level ones in fp32 (fp64 for fp64 inputs). NCHW and channels_last.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..layout import dense_empty_like, stat_dtype
from .common import configs, dense_like

ONEPASS_MAX = 8192  # largest group (values) held in one program's registers
PROGRAMS_PER_SM = 4


@triton.jit
def _group_offsets(j, n, g, C, S, cpg, CL: tl.constexpr):
    """Memory offsets and channels of values ``j`` (in memory order) of group g of sample n."""
    if CL:
        k = j % cpg
        off = n * S * C + (j // cpg) * C + g * cpg + k
    else:
        k = j // S
        off = n * S * C + g * cpg * S + j
    return off, g * cpg + k


@triton.jit
def _load_group(x_ptr, temb_ptr, off, c, n, C, mask, HAS_T: tl.constexpr, ACC: tl.constexpr):
    h = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
    if HAS_T:
        h += tl.load(temb_ptr + n * C + c, mask=mask, other=0.0).to(ACC)
    return h


@triton.jit
def _inv_sqrt(v, ACC: tl.constexpr):
    """1 / sqrt(v) with a correctly rounded sqrt in ACC: sqrt_rn takes fp32 only, and the fp64 sqrt
    (float64 inputs keep float64 statistics) is correctly rounded already."""
    if ACC == tl.float64:
        return 1.0 / tl.sqrt(v)
    return 1.0 / tl.sqrt_rn(v)


@triton.jit
def _normalize_store(y_ptr, w_ptr, b_ptr, h, mean, rstd, off, c, mask,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr):
    y = (h - mean) * rstd
    if HAS_W:
        y = y * tl.load(w_ptr + c, mask=mask, other=0.0).to(y.dtype)
    if HAS_B:
        y = y + tl.load(b_ptr + c, mask=mask, other=0.0).to(y.dtype)
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    tl.store(y_ptr + off, y, mask=mask)


@triton.autotune(configs=configs([({}, 4), ({}, 8), ({}, 16), ({}, 2)]), key=["BLOCK", "CL"])
@triton.jit
def _gn_onepass_kernel(x_ptr, w_ptr, b_ptr, temb_ptr, y_ptr, mean_ptr, rstd_ptr, C, S, G, eps,
                       CL: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_T: tl.constexpr,
                       SILU: tl.constexpr, BLOCK: tl.constexpr):
    ACC: tl.constexpr = mean_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)  # n * G + g
    n, g = row // G, row % G
    cpg = C // G
    size = cpg * S
    j = tl.arange(0, BLOCK)
    mask = j < size
    off, c = _group_offsets(j, n, g, C, S, cpg, CL)
    h = _load_group(x_ptr, temb_ptr, off, c, n, C, mask, HAS_T, ACC)
    mean = tl.sum(h, axis=0) / size
    d = tl.where(mask, h - mean, 0.0)
    rstd = _inv_sqrt((tl.sum(d * d, axis=0) / size + eps).to(ACC), ACC)  # eps may arrive as fp64
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)
    _normalize_store(y_ptr, w_ptr, b_ptr, h, mean, rstd, off, c, mask, HAS_W, HAS_B, SILU)


_SPLIT_SPACE = [({"BLOCK": 1024}, 4), ({"BLOCK": 2048}, 8), ({"BLOCK": 4096}, 8), ({"BLOCK": 512}, 4)]


@triton.autotune(configs=configs(_SPLIT_SPACE), key=["size", "SPLIT", "CL"])
@triton.jit
def _gn_partial_stats_kernel(x_ptr, temb_ptr, part_ptr, C, S, G, size, chunk,
                             CL: tl.constexpr, HAS_T: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    n, g = row // G, row % G
    cpg = C // G
    lo = part * chunk
    hi = tl.minimum(lo + chunk, size)
    count = tl.zeros([], dtype=ACC)
    mean = tl.zeros([], dtype=ACC)
    m2 = tl.zeros([], dtype=ACC)
    for base in range(lo, hi, BLOCK):  # exact per tile, merged across tiles (Chan et al.)
        j = base + tl.arange(0, BLOCK)
        mask = j < hi
        off, c = _group_offsets(j, n, g, C, S, cpg, CL)
        h = _load_group(x_ptr, temb_ptr, off, c, n, C, mask, HAS_T, ACC)
        tile_n = tl.sum(mask.to(ACC), axis=0)
        tile_mean = tl.sum(h, axis=0) / tile_n
        d = tl.where(mask, h - tile_mean, 0.0)
        total = count + tile_n
        delta = tile_mean - mean
        mean += delta * (tile_n / total)
        m2 += tl.sum(d * d, axis=0) + delta * delta * (count * tile_n / total)
        count = total
    out = part_ptr + (row * SPLIT + part) * 3
    tl.store(out, mean)
    tl.store(out + 1, m2)
    tl.store(out + 2, count)


@triton.autotune(configs=configs(_SPLIT_SPACE), key=["size", "SPLIT", "CL"])
@triton.jit
def _gn_split_apply_kernel(x_ptr, w_ptr, b_ptr, temb_ptr, part_ptr, y_ptr, mean_ptr, rstd_ptr, C, S, G, size,
                           chunk, eps, CL: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                           HAS_T: tl.constexpr, SILU: tl.constexpr, SPLIT: tl.constexpr,
                           SPLIT_P2: tl.constexpr, BLOCK: tl.constexpr):
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    n, g = row // G, row % G
    cpg = C // G
    p = tl.arange(0, SPLIT_P2)
    pmask = p < SPLIT
    parts = part_ptr + (row * SPLIT + p) * 3
    means = tl.load(parts, mask=pmask, other=0.0)
    m2s = tl.load(parts + 1, mask=pmask, other=0.0)
    counts = tl.load(parts + 2, mask=pmask, other=0.0)
    mean = tl.sum(counts * means, axis=0) / size
    d = tl.where(pmask, means - mean, 0.0)
    rstd = _inv_sqrt((tl.sum(m2s + counts * d * d, axis=0) / size + eps).to(ACC), ACC)
    if part == 0:
        tl.store(mean_ptr + row, mean)
        tl.store(rstd_ptr + row, rstd)
    lo = part * chunk
    hi = tl.minimum(lo + chunk, size)
    for base in range(lo, hi, BLOCK):
        j = base + tl.arange(0, BLOCK)
        mask = j < hi
        off, c = _group_offsets(j, n, g, C, S, cpg, CL)
        h = _load_group(x_ptr, temb_ptr, off, c, n, C, mask, HAS_T, ACC)
        _normalize_store(y_ptr, w_ptr, b_ptr, h, mean, rstd, off, c, mask, HAS_W, HAS_B, SILU)


def _split_for(rows: int, size: int, device: torch.device) -> int:
    """Chunks per group: enough programs for PROGRAMS_PER_SM on every SM, chunks of >= 1024 values."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, rows), triton.cdiv(size, 1024)))


@triton_op("fastddpm_triton::group_norm_act", mutates_args={})
def group_norm_act(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], groups: int,
                   eps: float, temb: Optional[torch.Tensor], silu: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op (same schema as ``fastddpm::group_norm_act``): ``(y, mean, rstd)``, stats ``[N, groups]``."""
    y = dense_empty_like(x)
    x = dense_like(x, y)
    N, C = x.shape[:2]
    S = x.shape[2:].numel()
    size = C // groups * S
    mean = x.new_empty((N, groups), dtype=stat_dtype(x))
    rstd = torch.empty_like(mean)
    cl = y.dim() == 4 and not y.is_contiguous()
    flags = dict(CL=cl, HAS_W=weight is not None, HAS_B=bias is not None, HAS_T=temb is not None, SILU=silu)
    w, b, tb = (v.contiguous() if v is not None else x for v in (weight, bias, temb))  # x: an unread stand-in
    rows = N * groups
    if rows == 0:  # an empty batch: no group to normalize, nothing to launch
        return y, mean, rstd
    if triton.next_power_of_2(size) <= ONEPASS_MAX:
        wrap_triton(_gn_onepass_kernel)[(rows,)](x, w, b, tb, y, mean, rstd, C, S, groups, float(eps),
                                                 BLOCK=triton.next_power_of_2(size), **flags)
        return y, mean, rstd
    split = _split_for(rows, size, x.device)
    chunk = triton.cdiv(size, split)
    part = x.new_empty((rows, split, 3), dtype=mean.dtype)
    wrap_triton(_gn_partial_stats_kernel)[(rows, split)](x, tb, part, C, S, groups, size, chunk, CL=cl,
                                                         HAS_T=temb is not None, SPLIT=split)
    wrap_triton(_gn_split_apply_kernel)[(rows, split)](x, w, b, tb, part, y, mean, rstd, C, S, groups, size,
                                                       chunk, float(eps), SPLIT=split,
                                                       SPLIT_P2=triton.next_power_of_2(split), **flags)
    return y, mean, rstd
