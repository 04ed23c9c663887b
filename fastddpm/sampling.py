"""Sampling: ancestral DDPM (Algorithm 2) and DDIM, on the full or a respaced schedule.

Every sampler is the same loop — ``m = model(x, t)``, then one ``ddpm_step`` with that sampler's
coefficient table (DESIGN.md section 2) — so every sampler runs through the one fused step op.
"""

from __future__ import annotations

import random
from typing import Callable, Optional, Sequence, Union

import torch

from . import ops
from .pipeline import DDPM, resolve_model
from .schedule import DDIM_DIRECTIONS, VARIANCES, Schedule
from .utils import resolve_device

SAMPLERS = ("ddpm", "ddim")


def _clip_value(clip) -> Optional[float]:
    if clip is True:
        return 1.0
    if clip is False or clip is None:
        return None
    if isinstance(clip, (int, float)) and clip > 0:
        return float(clip)
    raise ValueError(f"clip: expected a bool or a positive float, got {clip!r}")


def _model_device(model) -> Optional[torch.device]:
    if isinstance(model, torch.nn.Module):
        p = next(model.parameters(), None)
        return p.device if p is not None else None
    return None


@torch.no_grad()
def sample_loop(model: Callable, schedule: Schedule, shape: Sequence[int], *,
                coeffs: torch.Tensor, clip: Optional[float], generator: torch.Generator,
                device: torch.device, progress: bool = False,
                callback: Optional[Callable] = None) -> torch.Tensor:
    """Run the reverse process from ``x_T ~ N(0, I)`` through every index of ``schedule``.

    Noise order matches :func:`fastddpm.diffusion.reference_sample`: ``x_T`` first, then one draw
    for each step whose noise scale is non-zero. ``callback(i, t, x)`` is called after each step.
    """
    from tqdm.auto import tqdm

    x = torch.randn(tuple(shape), generator=generator, device=device)
    b = x.shape[0]
    noisy = (coeffs[:, 5] > 0).tolist()  # host copy once, before the loop
    model_t = schedule.timesteps.to(device)
    zeros = torch.zeros_like(x)
    for i in tqdm(reversed(range(schedule.T)), total=schedule.T, disable=not progress,
                  desc="sample", unit="step", leave=False):
        idx = torch.full((b,), i, dtype=torch.int64, device=device)
        m = model(x, model_t[idx])
        z = torch.randn(x.shape, generator=generator, device=device) if noisy[i] else zeros
        x = ops.ddpm_step(x, m, idx, coeffs, noise=z, clip=clip)
        if callback is not None:
            callback(i, int(schedule.timesteps[i]), x)
    return x


def sample(model_or_path: Union[DDPM, torch.nn.Module, Callable, str] = "mnist", n: int = 16, *,
           steps: Optional[int] = None, sampler: str = "ddpm", variance: str = "fixed_large",
           clip: Union[bool, float] = True, eta: float = 0.0, ddim_direction: str = "rederived",
           seed: Optional[int] = None, generator: Optional[torch.Generator] = None, device="cpu",
           batch_size: Optional[int] = None, shape: Optional[Sequence[int]] = None,
           progress: bool = True, callback: Optional[Callable] = None) -> torch.Tensor:
    """Generate ``n`` images in [-1, 1], shaped ``[n, C, H, W]``, on ``device``.

    model_or_path: a :class:`DDPM`, a :class:`UNet` or any ``eps_model(x, t)`` (linear schedule,
        T=1000), a checkpoint directory, or the name of a bundled model (``"mnist"``).
    steps: number of sampling steps; ``None`` uses all T. Fewer steps sample on an evenly respaced
        subset of timesteps with betas recomputed from abar (improved-diffusion's respacing).
    sampler: ``"ddpm"`` (ancestral, Algorithm 2) or ``"ddim"`` (``eta`` in [0, 1]).
    variance: ``"fixed_large"`` (beta_t; the paper's CIFAR-10 choice) or ``"fixed_small"``.
    clip: clip the predicted x0 to [-1, 1] (or to [-clip, clip] for a float).
    seed / generator: reproducibility; a given ``generator`` is used as is (and advanced).
    batch_size: images per forward pass (default: all ``n`` at once).
    shape: ``(C, H, W)``; needed only for a model that is not a fastddpm UNet.
    callback: ``callback(i, t, x)`` after each step.

    Example::

        x = fastddpm.sample("mnist", 16, steps=100, seed=0)
        fastddpm.save_grid(x, "samples.png")
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")
    if variance not in VARIANCES:
        raise ValueError(f"variance: expected one of {VARIANCES}, got {variance!r}")
    if ddim_direction not in DDIM_DIRECTIONS:
        raise ValueError(f"ddim_direction: expected one of {DDIM_DIRECTIONS}, got {ddim_direction!r}")
    clip_value = _clip_value(clip)
    device = resolve_device(device)
    ddpm = resolve_model(model_or_path, device)
    T = ddpm.schedule.T
    steps = T if steps is None else steps
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= T:
        raise ValueError(f"steps: expected an int in [1, {T}] (T of this model), got {steps!r}")
    batch_size = n if batch_size is None else batch_size
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    image_shape = tuple(shape) if shape is not None else ddpm.image_shape
    if image_shape is None or len(image_shape) != 3:
        raise ValueError(f"shape: expected (C, H, W) for a model that is not a fastddpm UNet, got {shape!r}")
    model_device = _model_device(ddpm.model)
    if model_device is not None and model_device != device:
        raise ValueError(f"device: the model's parameters are on {model_device}, but sampling was "
                         f"asked on {device}; move the model with .to({str(device)!r}) first")
    if generator is None:
        seed = random.randrange(2**63) if seed is None else seed
        generator = torch.Generator(device).manual_seed(seed)
    elif generator.device != device:
        raise ValueError(f"generator: expected a generator on {device}, got one on {generator.device}")

    schedule = ddpm.schedule.respaced(steps)
    coeffs = schedule.table("step", device, sampler=sampler, variance=variance,
                            prediction=ddpm.prediction, eta=eta, ddim_direction=ddim_direction)
    was_training = getattr(ddpm.model, "training", False)
    if isinstance(ddpm.model, torch.nn.Module):
        ddpm.model.eval()
    try:
        chunks = [sample_loop(ddpm.model, schedule, (min(batch_size, n - start), *image_shape),
                              coeffs=coeffs, clip=clip_value, generator=generator, device=device,
                              progress=progress, callback=callback)
                  for start in range(0, n, batch_size)]
    finally:
        if was_training:
            ddpm.model.train()
    return torch.cat(chunks)
