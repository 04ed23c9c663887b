"""``fastddpm.sample``: ancestral DDPM (Algorithm 2) and DDIM, on the full or a respaced schedule.

This module validates what the user asked for and splits it into batches; each batch runs on a
prepared :class:`Sampler`, kept for the next call (:mod:`.cache`).
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence, Union

import torch

from ..pipeline import DDPM, locate_checkpoint, resolve_model
from ..pipeline import load as load_checkpoint
from ..schedule import DDIM_DIRECTIONS, VARIANCES
from ..utils import resolve_device
from . import cache
from .noise import NoiseSource
from .options import SpeedOptions

SAMPLERS = ("ddpm", "ddim")


def clip_value(clip) -> Optional[float]:
    """``clip`` as the step op takes it: True -> 1.0, False/None -> None, a positive float as is."""
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


def _resolve(model_or_path, device: torch.device, reuse: bool) -> DDPM:
    """The DDPM to sample; a checkpoint path or bundled name is loaded once while its files stay unchanged."""
    if reuse and isinstance(model_or_path, (str, os.PathLike)):
        path = locate_checkpoint(model_or_path)
        return cache.MODELS.get(path, device, lambda p, d: load_checkpoint(p, device=d))
    return resolve_model(model_or_path, device)


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def sample(model_or_path: Union[DDPM, torch.nn.Module, Callable, str] = "mnist", n: int = 16, *,
           steps: Optional[int] = None, sampler: str = "ddpm", variance: str = "fixed_large",
           clip: Union[bool, float] = True, eta: float = 0.0, ddim_direction: str = "rederived",
           seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
           noise_source: str = "generator", device="cpu", batch_size: Optional[int] = None,
           shape: Optional[Sequence[int]] = None, progress: bool = True, callback: Optional[Callable] = None,
           options: Optional[SpeedOptions] = None, reuse: bool = True, **speed) -> torch.Tensor:
    """Generate ``n`` images in [-1, 1], shaped ``[n, C, H, W]``, on ``device``.

    model_or_path: a :class:`DDPM`, a :class:`UNet` or any ``eps_model(x, t)`` (linear schedule,
        T=1000), a checkpoint directory, or the name of a bundled model (``"mnist"``).
    steps: number of sampling steps; ``None`` uses all T. Fewer steps sample on an evenly respaced
        subset of timesteps with betas recomputed from abar (improved-diffusion's respacing).
    sampler: ``"ddpm"`` (ancestral, Algorithm 2) or ``"ddim"`` (``eta`` in [0, 1];
        ``ddim_direction``: ``"rederived"`` from the clipped x0, or ``"model"`` as diffusers does).
    variance: ``"fixed_large"`` (beta_t; the paper's CIFAR-10 choice) or ``"fixed_small"``.
    clip: clip the predicted x0 to [-1, 1] (or to [-clip, clip] for a float).
    seed / generator: reproducibility; a given ``generator`` is used as is (and advanced).
    noise_source: ``"generator"`` (``torch.randn`` from the generator: the reference sampler's
        draws, equal results in float32) or ``"philox"`` (drawn inside the step kernel from a
        Philox state seeded by ``seed``; needed by ``cuda_graph``, faster on the CPU).
    batch_size: images per forward pass (default: all ``n`` at once; on a GPU, halved until a
        batch fits in memory).
    shape: ``(C, H, W)``; needed only for a model that is not a fastddpm UNet.
    callback: ``callback(i, t, x, x0)`` after each step (x0: the model's prediction at that step).
    options / speed keywords: how fast, not what: a :class:`SpeedOptions`, and/or its fields as
        keywords (``dtype=``, ``channels_last=``, ``compile=``, ``freeze=``, ``cuda_graph=``,
        ``graph_steps=``, ``winograd=``, ``memory_pool=``); documented there.
    reuse: keep the prepared sampler (and a model loaded from a path) for the next call with the
        same model, options and shape; a model whose weights changed since is prepared anew.

    Example::

        x = fastddpm.sample("mnist", 16, steps=100, seed=0)
        fastddpm.save_grid(x, "samples.png")
    """
    options = SpeedOptions.from_arguments(options, **speed)
    _positive_int("n", n)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")
    if variance not in VARIANCES:
        raise ValueError(f"variance: expected one of {VARIANCES}, got {variance!r}")
    if ddim_direction not in DDIM_DIRECTIONS:
        raise ValueError(f"ddim_direction: expected one of {DDIM_DIRECTIONS}, got {ddim_direction!r}")
    clip = clip_value(clip)
    device = resolve_device(device)
    ddpm = _resolve(model_or_path, device, reuse)
    T = ddpm.schedule.T
    steps = T if steps is None else steps
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= T:
        raise ValueError(f"steps: expected an int in [1, {T}] (T of this model), got {steps!r}")
    batch_size = _positive_int("batch_size", n if batch_size is None else batch_size)
    image_shape = tuple(shape) if shape is not None else ddpm.image_shape
    if image_shape is None or len(image_shape) != 3:
        raise ValueError(f"shape: expected (C, H, W) for a model that is not a fastddpm UNet, got {shape!r}")
    model_device = _model_device(ddpm.model)
    if model_device is not None and model_device != device:
        raise ValueError(f"device: the model's parameters are on {model_device}, but sampling was "
                         f"asked on {device}; move the model with .to({str(device)!r}) first")
    if options.cuda_graph and noise_source != "philox":
        raise ValueError("noise_source: cuda_graph=True needs noise_source='philox' (drawn inside the captured step)")
    noise = NoiseSource.resolve(noise_source, seed=seed, generator=generator, device=device)

    schedule = ddpm.schedule.respaced(steps)
    coeffs = schedule.table("step", device, sampler=sampler, variance=variance,
                            prediction=ddpm.prediction, eta=eta, ddim_direction=ddim_direction)
    was_training = getattr(ddpm.model, "training", False)
    if isinstance(ddpm.model, torch.nn.Module):
        ddpm.model.eval()

    def prepared(size: int):
        shape_ = (size, *image_shape)
        if reuse:
            return cache.SAMPLERS.get(ddpm.model, schedule, coeffs, shape_, clip=clip, device=device, options=options)
        from .sampler import Sampler

        return Sampler(ddpm.model, schedule, coeffs, shape_, clip=clip, device=device, options=options)

    try:
        return _in_batches(prepared, n, batch_size, dict(noise=noise, callback=callback, progress=progress))
    finally:
        if was_training:
            ddpm.model.train()


def _in_batches(prepared: Callable, n: int, batch_size: int, run_args: dict) -> torch.Tensor:
    """Run prepared samplers over ``n`` images ``batch_size`` at a time; on CUDA, halve the batch
    when it does not fit in memory (the draws then differ from one full batch, as they would by hand)."""
    chunks, start = [], 0
    while start < n:
        size = min(batch_size, n - start)
        try:
            chunks.append(prepared(size).run(**run_args))
        except torch.cuda.OutOfMemoryError:
            cache.SAMPLERS.clear()
            torch.cuda.empty_cache()
            if batch_size == 1:
                raise
            batch_size = max(1, batch_size // 2)
            continue
        start += size
    return torch.cat(chunks)
