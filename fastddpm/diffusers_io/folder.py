"""Read a diffusers folder as a fastddpm :class:`DDPM`, without diffusers.

Two layouts (what ``save_pretrained`` writes):

* a pipeline: ``model_index.json`` (a DDPMPipeline or DDIMPipeline), ``unet/`` and ``scheduler/``;
* a bare ``UNet2DModel``: ``config.json`` with ``"_class_name": "UNet2DModel"`` (the schedule is
  then DDPMScheduler's default: linear, T=1000, fixed_small, clipped).

The U-Net's weights are ``diffusion_pytorch_model.safetensors`` (its header checked against the
config's tensors before any data is read) or ``diffusion_pytorch_model.bin`` (``torch.load`` with
``weights_only=True``). Configs are size-capped and checked by :class:`~fastddpm.UNetConfig` and
:func:`~fastddpm.diffusers_io.scheduler.scheduler_settings` before anything is allocated.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from ..checkpoint import CheckpointError, check_safetensors
from ..models.diffusers_compat import config_from_diffusers, convert_state_dict, to_diffusers_state_dict
from ..models.unet import UNet, UNetConfig
from ..pipeline import DDPM
from .accelerate import FastPipeline
from .scheduler import SchedulerSettings, full_schedule, scheduler_settings

MODEL_INDEX = "model_index.json"
UNET_CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
PIPELINES = ("DDPMPipeline", "DDIMPipeline")
# A scheduler config may list up to MAX_T trained betas (~25 bytes each in JSON).
MAX_JSON_BYTES = 4 << 20

Tensors = Dict[str, torch.Tensor]


@dataclass
class DiffusersDDPM(DDPM):
    """A :class:`DDPM` read from a diffusers folder, with the folder's scheduler config.

    ``scheduler.sampler_defaults()`` are the :func:`fastddpm.sample` keywords closest to it;
    :meth:`pipeline` runs it exactly as the diffusers pipeline would.
    """

    scheduler: Optional[SchedulerSettings] = None

    def sampler_defaults(self) -> dict:
        """The folder's scheduler as :func:`fastddpm.sample` keywords (its sampler, variance, clip)."""
        return self.scheduler.sampler_defaults() if self.scheduler is not None else super().sampler_defaults()

    def pipeline(self, **speed) -> FastPipeline:
        """The folder's pipeline call on the fast sampler (:class:`FastPipeline`; speed keywords as
        :func:`fastddpm.sample` takes them)."""
        device = next(self.model.parameters()).device
        return FastPipeline(self.model, self.scheduler, self.schedule, device=device, **speed)


def _unet_config_is_diffusers(path: str) -> bool:
    try:
        config = read_json(os.path.join(path, UNET_CONFIG))
    except CheckpointError:
        return False  # not ours to judge: the fastddpm reader reports a broken config.json
    return config.get("_class_name") == "UNet2DModel"


def is_diffusers_folder(path) -> bool:
    """Whether ``path`` is a diffusers pipeline folder or a bare UNet2DModel folder."""
    path = os.fspath(path)
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, MODEL_INDEX))
                                    or _unet_config_is_diffusers(path))


def read_json(fp: str) -> dict:
    """The JSON object in file ``fp`` (at most :data:`MAX_JSON_BYTES`); a CheckpointError naming the
    file when it is missing, too large, or not a JSON object."""
    if not os.path.isfile(fp):
        raise CheckpointError(f"checkpoint: {fp!r} is missing")
    if os.path.getsize(fp) > MAX_JSON_BYTES:
        raise CheckpointError(f"checkpoint: {fp!r} is larger than the {MAX_JSON_BYTES} bytes a config may have")
    try:
        with open(fp, "rb") as f:
            value = json.loads(f.read())
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"checkpoint: {fp!r} cannot be read as JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"checkpoint: {fp!r} is not a JSON object")
    return value


def _expected_tensors(config: UNetConfig) -> Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]:
    """Name -> (dtype, shape) of the diffusers state dict of ``config``'s U-Net, from a model on
    the meta device (nothing allocated)."""
    with torch.device("meta"):
        state = to_diffusers_state_dict(UNet(config), config)
    return {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}


def _check_bin(fp: str, state, expected) -> Tensors:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint: {fp!r} is not a state dict of tensors")
    missing, unknown = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unknown:
        raise CheckpointError(f"checkpoint: {fp!r} does not match its config (missing {missing[:3]}, "
                              f"unexpected {unknown[:3]})")
    for name, (_, shape) in expected.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(f"checkpoint: {fp!r} tensor {name!r} has shape {list(state[name].shape)}, "
                                  f"the config gives {list(shape)}")
    return state


def read_unet_weights(folder: str, config: UNetConfig) -> Tensors:
    """The diffusers state dict in ``folder`` (safetensors preferred over .bin), checked against the
    tensors of ``config``'s U-Net."""
    expected = _expected_tensors(config)
    for name in WEIGHT_FILES:
        fp = os.path.join(folder, name)
        if not os.path.isfile(fp):
            continue
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            check_safetensors(fp, expected)
            return load_file(fp)
        try:
            state = torch.load(fp, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle and zip errors have many types; none of them is ours to raise
            raise CheckpointError(f"checkpoint: {fp!r} cannot be read with weights_only=True ({e})") from None
        return _check_bin(fp, state, expected)
    raise CheckpointError(f"checkpoint: {folder!r} holds none of {list(WEIGHT_FILES)} (sharded or variant "
                          f"weights are not read)")


def read_unet(folder: str) -> UNet:
    """The fastddpm U-Net (float32, eval mode) of the UNet2DModel folder ``folder``."""
    config_dict = read_json(os.path.join(folder, UNET_CONFIG))
    if config_dict.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"_class_name: {os.path.join(folder, UNET_CONFIG)!r} describes a "
                         f"{config_dict.get('_class_name')!r}, expected a UNet2DModel")
    config = config_from_diffusers(config_dict)
    state = convert_state_dict(config_dict, read_unet_weights(folder, config))
    model = UNet(config)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()


def _pipeline_parts(path: str) -> Tuple[str, SchedulerSettings]:
    """The U-Net folder and the scheduler settings of pipeline folder ``path``."""
    index = read_json(os.path.join(path, MODEL_INDEX))
    if index.get("_class_name") not in PIPELINES:
        raise ValueError(f"_class_name: {os.path.join(path, MODEL_INDEX)!r} describes a "
                         f"{index.get('_class_name')!r}; expected one of {PIPELINES}")
    scheduler = read_json(os.path.join(path, "scheduler", SCHEDULER_CONFIG))
    return os.path.join(path, "unet"), scheduler_settings(scheduler)


def load_folder(path, *, device="cpu") -> DiffusersDDPM:
    """The :class:`DiffusersDDPM` of a diffusers pipeline folder or bare UNet2DModel folder (see the
    module docstring), its model on ``device``."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, MODEL_INDEX)):
        unet_dir, settings = _pipeline_parts(path)
    else:
        unet_dir, settings = path, scheduler_settings({}, "DDPMScheduler")
    model = read_unet(unet_dir).to(device)
    return DiffusersDDPM(model, full_schedule(settings), settings.prediction, scheduler=settings)


def load_pipeline(path, *, device="cpu", **speed) -> FastPipeline:
    """The pipeline saved in folder ``path`` as a :class:`FastPipeline` (no diffusers needed): called
    like the diffusers pipeline, with its images."""
    return load_folder(path, device=device).pipeline(**speed)
