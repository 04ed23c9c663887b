"""Denoising: a noisy image is a scaled x_t, so the reverse process from there removes the noise."""

from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Union

import torch

from .common import EditRun, t_for_noise_level

MODES = ("ancestral", "posterior_mean")
ESTIMATES = ("batch", "image")
# the truncation of the iterated estimate, in estimated stds
_TRUNCATE_AT = 2.5


def _truncated_half_normal_median(k: float) -> float:
    """The median of |z| for a standard normal z conditioned on |z| < k."""
    from statistics import NormalDist

    unit = NormalDist()
    return unit.inv_cdf(0.5 + 0.25 * (2 * unit.cdf(k) - 1))


def estimate_sigma(y: torch.Tensor, per_image: bool = True, iterations: int = 5) -> torch.Tensor:
    """A robust estimate of the std of additive white Gaussian noise in ``y`` (``[N, C, H, W]``),
    for each image or (``per_image=False``) for the batch as a whole.

    The finest diagonal Haar wavelet coefficients ``(a - b - c + d) / 2`` of every 2x2 window are
    near zero on the smooth parts of a clean image and on straight edges, so they measure the
    noise: their median absolute value / 0.6745 (Donoho & Johnstone's estimator), then refined by
    re-taking the median of the coefficients within 2.5 estimated stds (the image's strong
    features dropped; the truncated normal's median corrects for the cut)."""
    if y.dim() != 4 or y.shape[-1] < 2 or y.shape[-2] < 2:
        raise ValueError(f"y: expected [N, C, H, W] images of at least 2x2, got {tuple(y.shape)}")
    z = y.double()
    d = ((z[..., :-1, :-1] - z[..., :-1, 1:] - z[..., 1:, :-1] + z[..., 1:, 1:]) / 2).abs()
    d = d.flatten(1) if per_image else d.reshape(1, -1)
    sigma = d.median(dim=1).values / _truncated_half_normal_median(math.inf)
    scale = _truncated_half_normal_median(_TRUNCATE_AT)
    for _ in range(iterations):
        kept = torch.where(d <= _TRUNCATE_AT * sigma[:, None], d, torch.full_like(d, math.nan))
        sigma = kept.nanmedian(dim=1).values / scale
    sigma = sigma.float()
    return sigma if per_image else sigma.expand(y.shape[0]).clone()


@dataclass
class Denoised:
    """The result of :func:`denoise`: the images, the noise std used for each (given or
    estimated), and the t each one started from."""

    x: torch.Tensor
    sigma: torch.Tensor
    t: torch.Tensor
    estimated: bool


@torch.no_grad()
def denoise(model_or_path, y: torch.Tensor, sigma: Union[float, torch.Tensor, None] = None, *,
            mode: str = "ancestral", estimate: str = "batch", **run_options) -> Denoised:
    """Remove additive Gaussian noise of std ``sigma`` (in the model's [-1, 1] scale) from ``y``.

    ``y = x0 + sigma eps`` is ``x_t / sqrt(abar_t)`` for the t with (1 - abar_t) / abar_t =
    sigma^2, so the reverse process starts from ``sqrt(abar_t) y`` at that t: ``mode="ancestral"``
    runs it to x_0, ``"posterior_mean"`` takes the model's one-shot prediction of x_0 there.
    ``sigma``: a number, one per image, or None to estimate it with :func:`estimate_sigma` (reported
    in the result): ``estimate="batch"`` pools the images (they share one noise level; the more
    accurate), ``"image"`` estimates each alone. ``run_options``: as :func:`reconstruct`.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if estimate not in ESTIMATES:
        raise ValueError(f"estimate: expected one of {ESTIMATES}, got {estimate!r}")
    run = EditRun(model_or_path, **run_options)
    y = run.images("y", y, in_range=False)
    N = y.shape[0]
    if sigma is None:
        sigmas, estimated = estimate_sigma(y, per_image=estimate == "image").cpu(), True
    else:
        sigmas = torch.as_tensor(sigma, dtype=torch.float32).flatten().cpu()
        sigmas = sigmas.expand(N).clone() if sigmas.numel() == 1 else sigmas
        if sigmas.numel() != N:
            raise ValueError(f"sigma: expected a number or one per image ({N}), got {sigmas.numel()} values")
        estimated = False
    ts = torch.tensor([t_for_noise_level(run.ddpm.schedule, float(s)) for s in sigmas.cpu()], dtype=torch.int64)
    out = torch.empty_like(y)
    schedule = run.ddpm.schedule
    for t in ts.unique().tolist():  # images at the same t run as one batch
        rows = (ts == t).nonzero().flatten().to(run.device)
        xt = float(schedule.sqrt_abar[t - 1]) * y.index_select(0, rows)
        if mode == "ancestral":
            result = run.reverse(xt, t)
        else:
            prefix = run.schedule_from(t)
            with run.eval_mode():
                result = run.sampler_for(prefix, xt.shape[0]).predict_x0(xt, prefix.T - 1)
        out.index_copy_(0, rows, result)
    return Denoised(out, sigmas.to(torch.float32), ts, estimated)
