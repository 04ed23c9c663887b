"""``fastddpm.accelerate(pipe)``: a diffusers DDPMPipeline / DDIMPipeline's call on the fast sampler.

:class:`FastPipeline` is a fastddpm U-Net plus a diffusers scheduler config
(:class:`~fastddpm.diffusers_io.scheduler.SchedulerSettings`), called like the pipeline:
``(batch_size, generator, num_inference_steps, eta, use_clipped_model_output, output_type,
return_dict)``. It draws x_T and each step's noise from the generator as the pipeline does (same
shapes, same order), steps on diffusers' timesteps with diffusers' coefficients, and post-processes
the images as the pipeline does; the step's arithmetic is fastddpm's fused op, so images equal the
pipeline's to float32 rounding (docs/diffusers.md).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from ..models.diffusers_compat import unet_from_diffusers
from ..models.unet import UNet
from ..sampling import cache, eval_mode, positive_int
from ..sampling.noise import NoiseSource
from ..sampling.options import SpeedOptions
from ..schedule import Schedule
from ..utils import resolve_device
from .scheduler import SchedulerSettings, full_schedule, scheduler_settings, step_plan

OUTPUT_TYPES = ("pil", "np", "pt")
PIPELINES = ("DDPMPipeline", "DDIMPipeline")
# The pipelines' own default step counts (DDPMPipeline.__call__ and DDIMPipeline.__call__).
DEFAULT_STEPS = {"ddpm": 1000, "ddim": 50}


@dataclass
class ImageOutput:
    """The pipeline's output (``.images``) where diffusers' ``ImagePipelineOutput`` is not loaded."""

    images: Any


def _output(images):
    # diffusers' own class when the user has diffusers loaded (they called us with a pipe);
    # a folder's user need not have it, and importing it would cost seconds.
    utils = sys.modules.get("diffusers")
    cls = getattr(utils, "ImagePipelineOutput", None) if utils is not None else None
    return (cls or ImageOutput)(images=images)


def to_pil(images: np.ndarray) -> list:
    """``[B, H, W, C]`` floats in [0, 1] as PIL images, rounded as diffusers' ``numpy_to_pil``
    rounds (grayscale for one channel)."""
    from PIL import Image

    pixels = (images * 255).round().astype("uint8")
    if pixels.shape[-1] == 1:
        return [Image.fromarray(p[..., 0], mode="L") for p in pixels]
    return [Image.fromarray(p) for p in pixels]


def postprocess(x: torch.Tensor, output_type: str):
    """Images in [-1, 1] as the pipelines return them: ``"pt"`` ``[B, C, H, W]`` in [0, 1],
    ``"np"`` ``[B, H, W, C]``, ``"pil"`` a list of PIL images."""
    images = (x / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    images = images.cpu().permute(0, 2, 3, 1).numpy()
    return to_pil(images) if output_type == "pil" else images


class FastPipeline:
    """A diffusers DDPM/DDIM pipeline's call, run by fastddpm's sampler.

    Args:
        model: the fastddpm :class:`~fastddpm.UNet` (converted once, kept here).
        settings: the scheduler config (:func:`~fastddpm.diffusers_io.scheduler.scheduler_settings`).
        schedule: the full schedule (default: the settings' own).
        device: where it runs (the model is moved there).
        options / speed keywords: :class:`~fastddpm.SpeedOptions` (``dtype=``, ``compile=``,
            ``channels_last=``, ``freeze=``, ``winograd=``, ...), as :func:`fastddpm.sample` takes them.
    """

    def __init__(self, model: UNet, settings: SchedulerSettings, schedule: Optional[Schedule] = None, *,
                 device="cpu", options: Optional[SpeedOptions] = None, **speed):
        if not isinstance(model, UNet):
            raise TypeError(f"model: expected a fastddpm UNet, got {type(model).__name__}")
        if not isinstance(settings, SchedulerSettings):
            raise TypeError(f"settings: expected SchedulerSettings, got {type(settings).__name__}")
        self.options = SpeedOptions.from_arguments(options, **speed)
        if self.options.cuda_graph:
            raise ValueError("cuda_graph: needs in-kernel Philox noise, but the pipeline's images come from "
                             "its generator's draws")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.settings = settings
        self.schedule = schedule if schedule is not None else full_schedule(settings)
        if self.schedule.T != settings.T:
            raise ValueError(f"schedule: expected the scheduler's T={settings.T} steps, got {self.schedule.T}")

    def __call__(self, batch_size: int = 1, generator: Optional[torch.Generator] = None, eta: float = 0.0,
                 num_inference_steps: Optional[int] = None, use_clipped_model_output: Optional[bool] = None,
                 output_type: str = "pil", return_dict: bool = True):
        """Generate ``batch_size`` images as the pipeline would (see the class docstring);
        ``num_inference_steps`` defaults to the pipeline's (1000 for DDPM, 50 for DDIM)."""
        positive_int("batch_size", batch_size)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: expected one of {OUTPUT_TYPES}, got {output_type!r}")
        if isinstance(generator, (list, tuple)):
            raise TypeError("generator: one torch.Generator (a list of per-image generators is not supported)")
        if self.settings.kind == "ddpm" and use_clipped_model_output is not None:
            raise ValueError("use_clipped_model_output: a DDIMPipeline argument; this is a DDPM pipeline")
        steps = DEFAULT_STEPS[self.settings.kind] if num_inference_steps is None else num_inference_steps
        schedule, table = step_plan(self.settings, self.schedule, steps, eta=eta,
                                    clipped_direction=bool(use_clipped_model_output))
        coeffs = table.to(self.device, torch.float32)
        shape = (batch_size, self.model.config.in_channels, self.model.config.resolution,
                 self.model.config.resolution)
        noise = NoiseSource.resolve("generator", generator=generator, device=self.device)
        sampler = cache.SAMPLERS.get(self.model, schedule, coeffs, shape, clip=self.settings.clip,
                                     device=self.device, options=self.options)
        with eval_mode(self.model):
            x = sampler.run(noise)
        images = postprocess(x, output_type)
        return _output(images) if return_dict else (images,)


def _pipeline_kind(pipe) -> str:
    name = type(pipe).__name__
    if name not in PIPELINES or not hasattr(pipe, "unet") or not hasattr(pipe, "scheduler"):
        raise TypeError(f"pipe: expected a diffusers DDPMPipeline or DDIMPipeline, got {name}")
    return name


def accelerate(pipe, *, options: Optional[SpeedOptions] = None, **speed) -> FastPipeline:
    """``pipe`` (a diffusers ``DDPMPipeline`` or ``DDIMPipeline``) on fastddpm's sampler: a callable
    with the pipeline's call signature whose images equal ``pipe(...)``'s with the same generator
    (to float32 rounding). Its U-Net is converted once, here; the speed keywords (``dtype=``,
    ``compile=``, ``channels_last=``, ...) are :class:`~fastddpm.SpeedOptions`'.

    Example::

        fast = fastddpm.accelerate(pipe, compile=True)
        images = fast(batch_size=4, generator=torch.Generator().manual_seed(0), num_inference_steps=50).images
    """
    _pipeline_kind(pipe)
    settings = scheduler_settings(dict(pipe.scheduler.config), type(pipe.scheduler).__name__)
    model = unet_from_diffusers(pipe.unet)
    return FastPipeline(model, settings, device=pipe.device, options=options, **speed)
