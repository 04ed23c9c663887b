"""A trained diffusion model as one object (U-Net + schedule + prediction type), and its files.

``load`` / ``save`` are the public checkpoint functions; ``resolve_model`` turns whatever a user
passes to ``sample`` (a DDPM, a UNet, an ``eps_model(x, t)`` callable, a checkpoint path or the
name of a bundled model) into a :class:`DDPM`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from .checkpoint import CheckpointError, model_spec, read_checkpoint, recover_checkpoint, write_checkpoint
from .models.unet import UNet, UNetConfig
from .schedule import PREDICTIONS, Schedule

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


def bundled_models() -> tuple:
    """Names of the pretrained checkpoints shipped inside the package."""
    if not os.path.isdir(WEIGHTS_DIR):
        return ()
    return tuple(sorted(d for d in os.listdir(WEIGHTS_DIR)
                        if os.path.isfile(os.path.join(WEIGHTS_DIR, d, "config.json"))))


@dataclass
class DDPM:
    """An ``eps_model(x, t)`` (usually a :class:`UNet`), its noise schedule and prediction type."""

    model: Callable
    schedule: Schedule
    prediction: str = "eps"
    step: int = 0

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction: expected one of {PREDICTIONS}, got {self.prediction!r}")

    def sampler_defaults(self) -> dict:
        """The :func:`fastddpm.sample` keywords this model samples with unless told otherwise:
        ancestral DDPM, fixed_large variance, x0 clipped (a diffusers folder's: its scheduler's)."""
        return {"sampler": "ddpm", "variance": "fixed_large", "clip": True}

    @property
    def image_shape(self):
        """``(C, H, W)`` of the images the model generates, when it is a UNet."""
        cfg = getattr(self.model, "config", None)
        if isinstance(cfg, UNetConfig):
            return (cfg.in_channels, cfg.resolution, cfg.resolution)
        return None

    def config_dict(self) -> dict:
        """The JSON config stored in checkpoints."""
        if not isinstance(self.model, UNet):
            raise TypeError(f"model: only a fastddpm UNet can be saved, got {type(self.model).__name__}")
        if self.schedule.config is None or self.schedule.T != self.schedule.config.T:
            raise ValueError("schedule: only a full schedule built from a ScheduleConfig can be saved")
        return {"model": self.model.config.to_dict(), "schedule": self.schedule.config.to_dict(),
                "prediction": self.prediction, "step": self.step}


def save(ddpm: Union[DDPM, UNet], path: str, *, schedule: Optional[Schedule] = None,
         ema: Optional[torch.nn.Module] = None, weights_dtype: Optional[torch.dtype] = None) -> str:
    """Save a model (and optionally its EMA weights) as a checkpoint directory, atomically."""
    if isinstance(ddpm, UNet):
        ddpm = DDPM(ddpm, schedule or Schedule.linear())
    elif not isinstance(ddpm, DDPM):
        raise TypeError(f"ddpm: expected a DDPM or UNet, got {type(ddpm).__name__}")
    return write_checkpoint(path, ddpm.config_dict(), ddpm.model, ema=ema, weights_dtype=weights_dtype)


def build_ddpm(config: dict, state: dict, path: str) -> DDPM:
    """A :class:`DDPM` from a checkpoint's config and a weights state dict (``path`` names the
    checkpoint in errors); a :class:`CheckpointError` when they do not match. The config is checked
    against its bounds (:func:`~fastddpm.checkpoint.model_spec`) before the U-Net is built."""
    spec = model_spec(config, path)
    model = UNet(spec.model)
    ref = model.state_dict()
    state = {k: v.to(ref[k].dtype) if k in ref else v for k, v in state.items()}
    missing, unexpected = set(ref) - set(state), set(state) - set(ref)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint: {path!r} weights do not match its model config "
                              f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint: {path!r} weights do not match its model config ({e})") from None
    model.eval()
    return DDPM(model, Schedule.from_config(spec.schedule), spec.prediction, spec.step)


def locate_checkpoint(path) -> str:
    """The checkpoint folder ``path`` names: a checkpoint directory, a training run directory (its
    ``checkpoint``), or a bundled model by name (e.g. ``"mnist"``). A checkpoint missing because
    its save was killed mid-swap is first recovered from beside it (:func:`recover_checkpoint`)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a checkpoint path or bundled model name, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path) and path in bundled_models():
        path = os.path.join(WEIGHTS_DIR, path)
    if not os.path.exists(path):
        recover_checkpoint(path)
    if not os.path.exists(path) and os.sep not in path and not path.startswith("."):
        raise CheckpointError(f"checkpoint: {path!r} is neither an existing path nor a bundled "
                              f"model (bundled: {list(bundled_models())})")
    run_checkpoint = os.path.join(path, "checkpoint")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")) \
            and (os.path.isdir(run_checkpoint) or recover_checkpoint(run_checkpoint)):
        path = run_checkpoint  # a training run directory: use its latest checkpoint
    return path


def load(path: str, *, ema: bool = True, device="cpu") -> DDPM:
    """Load a checkpoint directory, a training run directory (its ``checkpoint``), a bundled
    model by name (e.g. ``"mnist"``), or a diffusers pipeline / UNet2DModel folder (read without
    diffusers: :func:`fastddpm.diffusers_io.load_folder`) as a :class:`DDPM`.

    With ``ema=True`` the EMA weights are used when the checkpoint has them.
    """
    from .diffusers_io.folder import is_diffusers_folder, load_folder  # it builds on this module

    path = locate_checkpoint(path)
    if is_diffusers_folder(path):
        return load_folder(path, device=device)
    ckpt = read_checkpoint(path)
    state = ckpt.ema if (ema and ckpt.ema is not None) else ckpt.model
    ddpm = build_ddpm(ckpt.config, state, ckpt.path)
    ddpm.model.to(device)
    return ddpm


def resolve_model(model_or_path, device: torch.device) -> DDPM:
    """Turn a DDPM, UNet, eps-model callable, checkpoint path or bundled name into a DDPM."""
    if isinstance(model_or_path, DDPM):
        return model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        return load(model_or_path, device=device)
    if isinstance(model_or_path, UNet):
        return DDPM(model_or_path, Schedule.linear())
    if callable(model_or_path):
        return DDPM(model_or_path, Schedule.linear())
    raise TypeError(f"model_or_path: expected a DDPM, UNet, eps_model(x, t) callable, checkpoint "
                    f"path or bundled name, got {type(model_or_path).__name__}")
