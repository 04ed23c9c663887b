"""``export_diffusers(ddpm, path)``: a fastddpm model as a folder ``DDPMPipeline.from_pretrained``
loads (model_index.json, unet/, scheduler/), without diffusers.

The scheduler is a DDPMScheduler with ``timestep_spacing="linspace"``: its timesteps for
``num_inference_steps=n`` are fastddpm's evenly respaced ones for ``steps=n``, so the pipeline
called with the same generator gives :func:`fastddpm.sample`'s images (to float32 rounding).
"""

from __future__ import annotations

import json
import os
from typing import Union

import torch

from ..models.diffusers_compat import diffusers_config, to_diffusers_state_dict
from ..models.unet import UNet
from ..pipeline import DDPM
from ..sampling.method import clip_value
from ..schedule import VARIANCES, Schedule
from .folder import MODEL_INDEX, SCHEDULER_CONFIG, UNET_CONFIG, WEIGHT_FILES
from .scheduler import BETA_SCHEDULES, PREDICTION_TYPES

# diffusers names each fastddpm schedule kind and prediction
_BETA_SCHEDULE_NAMES = {fast: theirs for theirs, fast in BETA_SCHEDULES.items()}
_PREDICTION_NAMES = {fast: theirs for theirs, fast in PREDICTION_TYPES.items()}
# diffusers' squaredcos_cap_v2 is the cosine schedule with this offset only
_DIFFUSERS_COSINE_S = 0.008


def _betas_fields(schedule: Schedule) -> dict:
    """The scheduler fields of the beta schedule: its name and range, or its betas."""
    config = schedule.config
    if not bool((schedule.timesteps == torch.arange(schedule.T)).all()):
        raise ValueError("ddpm: its schedule is respaced; export the model with its full training schedule")
    named = config is not None and config.T == schedule.T and (
        config.kind != "cosine" or config.cosine_s == _DIFFUSERS_COSINE_S)
    if named:
        return {"num_train_timesteps": config.T, "beta_schedule": _BETA_SCHEDULE_NAMES[config.kind],
                "beta_start": config.beta_start, "beta_end": config.beta_end, "trained_betas": None}
    return {"num_train_timesteps": schedule.T, "beta_schedule": "linear", "trained_betas": schedule.betas.tolist()}


def scheduler_config(ddpm: DDPM, *, variance: str = "fixed_large", clip: Union[bool, float] = True) -> dict:
    """The DDPMScheduler config of ``ddpm``'s schedule and prediction, sampling with ``variance``
    and ``clip`` as :func:`fastddpm.sample` does."""
    if variance not in VARIANCES:
        raise ValueError(f"variance: expected one of {VARIANCES}, got {variance!r}")
    bound = clip_value(clip)
    return {"_class_name": "DDPMScheduler", **_betas_fields(ddpm.schedule), "variance_type": variance,
            "clip_sample": bound is not None, "clip_sample_range": bound or 1.0,
            "prediction_type": _PREDICTION_NAMES[ddpm.prediction], "thresholding": False,
            "timestep_spacing": "linspace", "steps_offset": 0, "rescale_betas_zero_snr": False}


def _write_json(fp: str, value: dict) -> None:
    with open(fp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)


def export_diffusers(ddpm: Union[DDPM, UNet], path, *, variance: str = "fixed_large",
                     clip: Union[bool, float] = True) -> str:
    """Write ``ddpm`` (a :class:`DDPM`, or a :class:`UNet` on the paper's linear schedule) as a
    diffusers DDPMPipeline folder at ``path`` and return ``path``. The scheduler samples with
    ``variance`` and ``clip`` (fastddpm.sample's defaults) on fastddpm's evenly spaced timesteps.

    Example::

        fastddpm.export_diffusers(fastddpm.load("mnist"), "mnist-diffusers")
        pipe = diffusers.DDPMPipeline.from_pretrained("mnist-diffusers")
    """
    if isinstance(ddpm, UNet):
        ddpm = DDPM(ddpm, Schedule.linear())
    if not isinstance(ddpm, DDPM) or not isinstance(ddpm.model, UNet):
        raise TypeError(f"ddpm: expected a DDPM of a fastddpm UNet, or a UNet, got {type(ddpm).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a folder path, got {type(path).__name__}")
    from safetensors.torch import save_file

    scheduler = scheduler_config(ddpm, variance=variance, clip=clip)
    config = ddpm.model.config
    path = os.fspath(path)
    for sub in ("unet", "scheduler"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
    _write_json(os.path.join(path, MODEL_INDEX), {"_class_name": "DDPMPipeline",
                                                  "scheduler": ["diffusers", "DDPMScheduler"],
                                                  "unet": ["diffusers", "UNet2DModel"]})
    _write_json(os.path.join(path, "scheduler", SCHEDULER_CONFIG), scheduler)
    _write_json(os.path.join(path, "unet", UNET_CONFIG), diffusers_config(config))
    state = {k: v.detach().float().cpu() for k, v in to_diffusers_state_dict(ddpm.model, config).items()}
    save_file(state, os.path.join(path, "unet", WEIGHT_FILES[0]))
    return path
