"""Training (Algorithm 1): Adam with linear warm-up, grad-norm clipping, EMA, optional AMP,
periodic sample grids and atomic checkpoints that ``resume`` continues exactly.

Every random draw of step ``k`` (batch order, flips, t, eps, dropout) comes from generators seeded
by ``(seed, k)``, so a resumed run takes the same steps as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from .checkpoint import read_checkpoint, write_checkpoint
from .data import load_dataset
from .diffusion import training_loss
from .images import save_grid
from .models.unet import PRESETS, UNet, UNetConfig
from .pipeline import DDPM, build_ddpm
from .schedule import Schedule, ScheduleConfig
from .utils import resolve_device

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """Optimisation hyper-parameters (the paper's: lr 2e-4, warm-up 5000, clip 1, EMA 0.9999)."""

    batch_size: int = 128
    lr: float = 2e-4
    warmup: int = 5000
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    amp: Optional[str] = None
    flip: bool = False
    seed: int = 0
    sample_every: int = 0
    sample_steps: int = 100
    checkpoint_every: int = 1000
    log_every: int = 50

    def __post_init__(self):
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {self.batch_size!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive float, got {self.lr!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: expected a float in [0, 1), got {self.ema_decay!r}")
        if self.amp not in (None, *AMP_DTYPES):
            raise ValueError(f"amp: expected None, 'bf16' or 'fp16', got {self.amp!r}")
        for name in ("warmup", "sample_every", "checkpoint_every", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name}: expected a non-negative int, got {getattr(self, name)!r}")


def _step_generator(device: torch.device, seed: int, step: int) -> torch.Generator:
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step)


class Trainer:
    """Trains a :class:`DDPM` on a tensor of images in [-1, 1], writing into ``out``."""

    def __init__(self, ddpm: DDPM, images: torch.Tensor, out: str, config: TrainConfig = None,
                 device="cpu"):
        self.config = config or TrainConfig()
        self.device = resolve_device(device)
        self.ddpm = ddpm
        self.model = ddpm.model.to(self.device)
        if images.dim() != 4 or images.shape[1:] != torch.Size(ddpm.image_shape):
            raise ValueError(f"images: expected [N, {', '.join(map(str, ddpm.image_shape))}], "
                             f"got {tuple(images.shape)}")
        self.images = images.to(self.device)
        self.out = out
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.config.lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.config.amp == "fp16")
        self.step = 0
        self.losses = []

    # ------------------------------------------------------------------------------- one step
    def _batch(self, g: torch.Generator) -> torch.Tensor:
        n, bs = self.images.shape[0], self.config.batch_size
        per_epoch = max(1, n // bs)
        epoch, j = divmod(self.step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed + epoch))
        idx = order[j * bs:(j + 1) * bs] if n >= bs else order
        batch = self.images[idx.to(self.device)]
        if self.config.flip:
            flip = torch.rand(batch.shape[0], generator=g, device=self.device) < 0.5
            batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        return batch

    def _lr(self) -> float:
        warm = self.config.warmup
        return self.config.lr * (min(1.0, (self.step + 1) / warm) if warm else 1.0)

    def train_step(self) -> float:
        """One optimisation step on one batch; returns the loss."""
        cfg = self.config
        g = _step_generator(self.device, cfg.seed, self.step)
        torch.manual_seed(cfg.seed * 1_000_003 + self.step)  # dropout
        x0 = self._batch(g)
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr()
        with torch.autocast(self.device.type, dtype=AMP_DTYPES.get(cfg.amp), enabled=cfg.amp is not None):
            loss = training_loss(self.model, self.ddpm.schedule, x0, self.ddpm.prediction, generator=g)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._update_ema()
        self.step += 1
        return float(loss.detach())

    def ema_decay(self) -> float:
        """The EMA decay at the current step: ``ema_decay``, warmed up as ``(1 + n) / (10 + n)``
        so that the average does not start out dominated by the untrained initial weights."""
        return min(self.config.ema_decay, (1 + self.step) / (10 + self.step))

    @torch.no_grad()
    def _update_ema(self):
        ema_p, p = list(self.ema.parameters()), list(self.model.parameters())
        torch._foreach_lerp_(ema_p, p, 1.0 - self.ema_decay())
        for eb, b in zip(self.ema.buffers(), self.model.buffers()):
            eb.copy_(b)

    # ------------------------------------------------------------------------------ the loop
    def train(self, steps: int, *, max_minutes: Optional[float] = None, progress: bool = True) -> DDPM:
        """Train until ``self.step == steps`` (or ``max_minutes`` of wall time), checkpointing as set.

        Returns the DDPM with the EMA weights; the raw weights stay in ``self.model``.
        """
        from tqdm.auto import tqdm

        cfg = self.config
        os.makedirs(self.out, exist_ok=True)
        start = time.monotonic()
        bar = tqdm(total=steps, initial=self.step, disable=not progress, desc="train", unit="step")
        log = open(os.path.join(self.out, "log.jsonl"), "a")
        try:
            while self.step < steps:
                loss = self.train_step()
                self.losses.append(loss)
                bar.update(1)
                if cfg.log_every and self.step % cfg.log_every == 0:
                    recent = self.losses[-cfg.log_every:]
                    mean = sum(recent) / len(recent)
                    bar.set_postfix(loss=f"{mean:.4f}")
                    log.write(json.dumps({"step": self.step, "loss": mean, "lr": self._lr(),
                                          "elapsed_s": round(time.monotonic() - start, 1)}) + "\n")
                    log.flush()
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    self.save_samples()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if max_minutes is not None and time.monotonic() - start > 60 * max_minutes:
                    break
        finally:
            bar.close()
            log.close()
        self.save_checkpoint()
        return self.ema_ddpm()

    # ---------------------------------------------------------------------------- artefacts
    def ema_ddpm(self) -> DDPM:
        """The EMA model as a DDPM (shares weights with the trainer)."""
        return DDPM(self.ema, self.ddpm.schedule, self.ddpm.prediction, self.step)

    def save_samples(self, n: int = 16) -> str:
        """Sample a grid from the EMA model into ``out/samples/step_XXXXXXX.png``."""
        from .sampling import sample

        x = sample(self.ema_ddpm(), n, steps=min(self.config.sample_steps, self.ddpm.schedule.T),
                   seed=self.config.seed, device=self.device, progress=False, reuse=False)
        path = os.path.join(self.out, "samples", f"step_{self.step:07d}.png")
        save_grid(x, path)
        return path

    def checkpoint_path(self) -> str:
        """Where the latest checkpoint lives: ``out/checkpoint``."""
        return os.path.join(self.out, "checkpoint")

    def save_checkpoint(self) -> str:
        """Write model, EMA, optimizer state and config to ``out/checkpoint`` atomically."""
        config = dict(self.ema_ddpm().config_dict(), train=asdict(self.config))
        state = {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}
        return write_checkpoint(self.checkpoint_path(), config, self.model, ema=self.ema, optimizer=state)

    @classmethod
    def resume(cls, out: str, images: torch.Tensor, device="cpu", **overrides) -> "Trainer":
        """Continue the run in ``out`` from its checkpoint: same step, weights, EMA and optimizer."""
        ckpt = read_checkpoint(os.path.join(out, "checkpoint"), with_optimizer=True)
        if ckpt.ema is None or ckpt.optimizer is None:
            raise ValueError(f"out: {out!r} holds a checkpoint without EMA or optimizer state; "
                             f"it cannot be resumed")
        ddpm = build_ddpm(ckpt.config, ckpt.model, ckpt.path)
        train_cfg = dict(ckpt.config.get("train", {}), **overrides)
        trainer = cls(ddpm, images, out, TrainConfig(**train_cfg), device=device)
        trainer.ema.load_state_dict(ckpt.ema)
        trainer.optimizer.load_state_dict(ckpt.optimizer["optimizer"])
        trainer.scaler.load_state_dict(ckpt.optimizer["scaler"])
        trainer.step = ddpm.step
        return trainer


def train(data="digits", *, out: str, steps: int, preset: Optional[str] = None,
          model_config: Optional[UNetConfig] = None, schedule: Optional[ScheduleConfig] = None,
          prediction: str = "eps", resume: bool = False, device="cpu",
          max_minutes: Optional[float] = None, progress: bool = True, **train_kwargs) -> DDPM:
    """Train a DDPM on ``data`` (``"digits"``, ``"mnist"``, a folder, a .npy/.npz file or a tensor).

    ``preset`` (default: the data's name when it is a bundled set, else ``cifar10``) or
    ``model_config`` chooses the U-Net; other keyword arguments are :class:`TrainConfig` fields.
    With ``resume=True`` training continues from ``out/checkpoint``. Returns the EMA model.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    if model_config is None:
        name = preset or (data if isinstance(data, str) and data in PRESETS else "cifar10")
        if name not in PRESETS:
            raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
        model_config = PRESETS[name]
    if isinstance(data, torch.Tensor):
        images = data
    else:
        images = load_dataset(data, resolution=model_config.resolution, channels=model_config.in_channels)
    if resume:
        trainer = Trainer.resume(out, images, device=device, **train_kwargs)
    else:
        ddpm = DDPM(UNet(model_config), Schedule.from_config(schedule or ScheduleConfig()), prediction)
        trainer = Trainer(ddpm, images, out, TrainConfig(**train_kwargs), device=device)
    return trainer.train(steps, max_minutes=max_minutes, progress=progress)
