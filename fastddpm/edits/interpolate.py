"""Interpolation through the noisy latents (the paper's Figure 8)."""

from __future__ import annotations

from typing import Sequence

import torch

from ..sampling import SharedNoise
from .common import EditRun

MODES = ("linear", "slerp")


def mix(a: torch.Tensor, b: torch.Tensor, lambdas: torch.Tensor, mode: str) -> torch.Tensor:
    """``[N, L, ...]``: for each pair (a[n], b[n]) and each lambda, the point between them —
    linear, ``(1 - l) a + l b``; or slerp, along the great circle between the flattened vectors
    (linear where they are parallel)."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    lam = lambdas.to(a.dtype).view(1, -1, *([1] * (a.dim() - 1)))
    a_, b_ = a.unsqueeze(1), b.unsqueeze(1)
    if mode == "linear":
        return (1 - lam) * a_ + lam * b_
    fa, fb = a.flatten(1).double(), b.flatten(1).double()
    cos = (fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1)).clamp_min(1e-30)
    theta = torch.arccos(cos.clamp(-1, 1)).view(-1, 1, *([1] * (a.dim() - 1)))
    sin = torch.sin(theta)
    lam = lam.double()
    parallel = sin.abs() < 1e-6
    wa = torch.where(parallel, 1 - lam, torch.sin((1 - lam) * theta) / torch.where(parallel, 1.0, sin))
    wb = torch.where(parallel, lam, torch.sin(lam * theta) / torch.where(parallel, 1.0, sin))
    return (wa * a_.double() + wb * b_.double()).to(a.dtype)


@torch.no_grad()
def interpolate(model_or_path, x_a: torch.Tensor, x_b: torch.Tensor, t: int,
                lambdas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), *, mode: str = "linear",
                **run_options) -> torch.Tensor:
    """Interpolate pairs of images through their latents at ``t``: both are diffused with the same
    noise, mixed for every lambda in [0, 1] (``mode`` ``"linear"`` or ``"slerp"``), and all
    lambdas are decoded in one batched reverse run whose per-step noise is shared across the
    lambdas of a pair. ``x_a``, ``x_b``: ``[N, C, H, W]`` in [-1, 1]; returns ``[N, L, C, H, W]``.
    With lambda 0 (1) the result is :func:`reconstruct` of x_a (x_b) with the same noise.

    ``run_options``: as :func:`reconstruct` (the CUDA graphs do not apply: the shared draws are
    tensors).
    """
    run = EditRun(model_or_path, **run_options)
    x_a, x_b = run.images("x_a", x_a), run.images("x_b", x_b)
    if x_a.shape != x_b.shape:
        raise ValueError(f"x_b: expected the shape of x_a {tuple(x_a.shape)}, got {tuple(x_b.shape)}")
    lam = torch.as_tensor(list(lambdas) if not torch.is_tensor(lambdas) else lambdas, dtype=torch.float64).flatten()
    if lam.numel() < 1 or not bool(torch.isfinite(lam).all()) or float(lam.min()) < 0 or float(lam.max()) > 1:
        raise ValueError(f"lambdas: expected one or more numbers in [0, 1], got {lam.tolist()}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    t = run.timestep(t)
    N, L = x_a.shape[0], lam.numel()
    if t == 0:
        return mix(x_a, x_b, lam, mode)
    e = run.noise.initial(x_a.shape, run.device)
    latents = mix(run.diffuse(x_a, t, e), run.diffuse(x_b, t, e), lam, mode).reshape(N * L, *x_a.shape[1:])
    out = run.reverse(latents, t, noise=SharedNoise(run.noise, L))
    return out.reshape(N, L, *x_a.shape[1:])
