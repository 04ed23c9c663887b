"""What every edit shares: the model and its sampler settings resolved once (:class:`EditRun`),
input images checked against the model, a user's t mapped to schedule indices, diffusing real
images to x_t with the fused op, and running the reverse process from there on the fast sampler."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .. import ops
from ..sampling import (NoiseSource, SamplingMethod, Sampler, SpeedOptions, eval_mode, image_shape, prepared_sampler,
                        resolve_ddpm)
from ..schedule import Schedule
from ..utils import resolve_device


def check_images(name: str, x, chw: tuple, device: torch.device, *, in_range: bool = True) -> torch.Tensor:
    """``x`` as a float32 ``[N, C, H, W]`` batch on ``device`` (a single ``[C, H, W]`` image is
    accepted), checked against the model's ``(C, H, W)``, finite, and in [-1, 1] when ``in_range``."""
    if not torch.is_tensor(x):
        raise TypeError(f"{name}: expected a tensor of images in [-1, 1], got {type(x).__name__}")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or tuple(x.shape[1:]) != tuple(chw) or x.shape[0] < 1:
        raise ValueError(f"{name}: expected images shaped [N, {', '.join(map(str, chw))}] (the model's), "
                         f"got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    x = x.detach().to(device=device, dtype=torch.float32).contiguous()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains NaN or infinite values")
    if in_range and (float(x.min()) < -1 - 1e-6 or float(x.max()) > 1 + 1e-6):
        raise ValueError(f"{name}: expected values in [-1, 1] (the model's scale), got "
                         f"[{float(x.min()):.3g}, {float(x.max()):.3g}]")
    return x


class EditRun:
    """A model, its sampler settings, speed options and noise source, resolved once for an edit.

    ``t`` here counts forward steps as the paper does: x_t for t in [0, T], where x_0 is the data
    and x_t (t >= 1) sits at schedule index t - 1.
    """

    def __init__(self, model_or_path, *, steps: Optional[int] = None, sampler: str = "ddpm",
                 variance: str = "fixed_large", clip=True, eta: float = 0.0, ddim_direction: str = "rederived",
                 seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 noise_source: str = "generator", device="cpu", options: Optional[SpeedOptions] = None,
                 reuse: bool = True, progress: bool = False, **speed):
        self.options = SpeedOptions.from_arguments(options, **speed)
        self.method = SamplingMethod(sampler, variance, clip, eta, ddim_direction, steps)
        self.device = resolve_device(device)
        self.ddpm = resolve_ddpm(model_or_path, self.device, reuse)
        self.chw = image_shape(self.ddpm)
        if self.options.cuda_graph and noise_source != "philox":
            raise ValueError("noise_source: cuda_graph=True needs noise_source='philox' (drawn inside the captured step)")
        self.noise = NoiseSource.resolve(noise_source, seed=seed, generator=generator, device=self.device)
        self.reuse, self.progress = reuse, progress

    @property
    def T(self) -> int:
        """The model's number of diffusion steps."""
        return self.ddpm.schedule.T

    def images(self, name: str, x, *, in_range: bool = True) -> torch.Tensor:
        """``x`` checked against the model (see :func:`check_images`)."""
        return check_images(name, x, self.chw, self.device, in_range=in_range)

    def timestep(self, t, name: str = "t", low: int = 0) -> int:
        """``t`` checked to be an int in [low, T]."""
        if not isinstance(t, int) or isinstance(t, bool) or not low <= t <= self.T:
            raise ValueError(f"{name}: expected an int in [{low}, {self.T}] (T of this model), got {t!r}")
        return t

    def eval_mode(self):
        """The model in eval mode for the edit (see :func:`fastddpm.sampling.eval_mode`)."""
        return eval_mode(self.ddpm.model)

    def diffuse(self, x0: torch.Tensor, t: int, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) with the fused op, its noise drawn from the run's source (or given)."""
        if noise is None:
            noise = self.noise.initial(x0.shape, self.device)
        index = torch.full((x0.shape[0],), t - 1, dtype=torch.int64, device=self.device)
        return ops.q_sample(x0, index, self.ddpm.schedule.table("noising", self.device), noise)[0]

    def schedule_from(self, t: int) -> Schedule:
        """The schedule of a reverse process started at x_t: the timesteps below t, respaced to the
        run's ``steps`` (at most t of them)."""
        method = self.method
        if method.steps is not None and method.steps > t:
            method = SamplingMethod(method.sampler, method.variance, method.clip, method.eta, method.ddim_direction, t)
        return method.schedule(self.ddpm.schedule, upto=t)

    def sampler_for(self, schedule: Schedule, batch: int) -> Sampler:
        """The prepared sampler of this run for ``schedule`` and a batch of ``batch`` images."""
        return prepared_sampler(self.ddpm, schedule, self.method, (batch, *self.chw), device=self.device,
                                options=self.options, reuse=self.reuse)

    def reverse(self, xt: torch.Tensor, t: int, *, noise: Optional[NoiseSource] = None,
                step_hook: Optional[Callable] = None, callback: Optional[Callable] = None) -> torch.Tensor:
        """Run the reverse process from ``xt`` (the state x_t) down to x_0 on the fast sampler."""
        sampler = self.sampler_for(self.schedule_from(t), xt.shape[0])
        with self.eval_mode():
            return sampler.run(noise or self.noise, x_T=xt, step_hook=step_hook, callback=callback,
                               progress=self.progress)


def t_for_noise_level(schedule: Schedule, sigma: float) -> int:
    """The t whose x_t is a scaled noisy image of std ``sigma``: (1 - abar)/abar = sigma^2 at the
    schedule index nearest in abar (t = index + 1)."""
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma: expected a positive number, got {sigma!r}")
    target = 1.0 / (1.0 + sigma * sigma)
    return int((schedule.abar - target).abs().argmin()) + 1
