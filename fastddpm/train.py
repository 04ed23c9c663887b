"""Training (Algorithm 1): Adam with linear warm-up, grad-norm clipping, EMA, optional AMP,
periodic sample grids and atomic checkpoints that ``resume`` continues exactly.

Every random draw of step ``k`` (batch order, flips, t, eps, dropout) comes from generators seeded
by ``(seed, k)``, so a resumed run takes the same steps as an uninterrupted one.

The same code runs under ``torchrun --nproc_per_node N`` (and multi-node rendezvous), with
PyTorch's own engine (:mod:`fastddpm.distributed`): each rank joins the process group (NCCL on
CUDA, gloo on the CPU), trains a DistributedDataParallel replica on ``batch_size / N`` images of
the global batch, and rank 0 alone writes logs, sample grids and checkpoints. The global batch of
step ``k`` and its draws are those of a one-process run, split by rank (see :meth:`Trainer._batch`),
so N processes take the same steps as one up to the order of the gradient all-reduce's float sums,
and a checkpoint resumes on any number of processes.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch

from . import checks, distributed
from .checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from .data import check_finite, load_dataset
from .diffusion import training_loss
from .images import save_grid
from .models.unet import PRESETS, UNet, UNetConfig
from .ops import PhiloxState
from .pipeline import DDPM, build_ddpm
from .schedule import Schedule, ScheduleConfig
from .utils import resolve_device

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ON_NONFINITE = ("stop", "skip")
# TrainConfig fields that say how fast a run goes, not what it computes: not saved with a
# checkpoint, so a resumed run takes them as given then (default off), not as the first run had them.
SPEED_FIELDS = ("compile",)
NOISE_SOURCES = ("generator", "philox")
# Losses stay on the device between host reads; a read at least this often bounds their memory.
FLUSH_EVERY = 1024


class NonFiniteError(ValueError):
    """Training produced a NaN or infinite loss, gradient or weight. Nothing is saved after it:
    the checkpoint on disk keeps the last finite weights."""


@dataclass
class TrainConfig:
    """Optimisation hyper-parameters (the paper's: lr 2e-4, warm-up 5000, clip 1, EMA 0.9999).

    ``grad_clip`` 0 (or None) turns clipping off. ``on_nonfinite``: what a NaN or infinite loss or
    gradient does: ``"stop"`` raises :class:`NonFiniteError` at the next log, sample or checkpoint
    (before anything is written); ``"skip"`` leaves that step's weights, Adam state and EMA
    unchanged, counts it and goes on.

    ``noise``: where the loss's eps comes from: ``"generator"`` (``torch.randn`` from the step's
    generator, after t) or ``"philox"`` (drawn inside the noising kernel from a Philox stream keyed
    by the step's seed; faster, and the same per global batch on any number of processes, but
    other numbers than the generator's). ``compile``: the model's forward and backward through
    ``torch.compile`` (the optimizer step stays eager).
    """

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
    on_nonfinite: str = "stop"
    noise: str = "generator"
    compile: bool = False

    def __post_init__(self):
        self.batch_size = checks.integer("batch_size", self.batch_size, 1)
        self.sample_steps = checks.integer("sample_steps", self.sample_steps, 1)
        for name in ("warmup", "sample_every", "checkpoint_every", "log_every"):
            setattr(self, name, checks.integer(name, getattr(self, name), 0))
        # the per-step generators are seeded with seed * 1_000_003 + step, which must fit 64 bits
        self.seed = checks.integer("seed", self.seed, 0, 2 ** 32)
        self.lr = checks.finite_float("lr", self.lr)
        if self.lr <= 0:
            raise ValueError(f"lr: expected a positive number, got {self.lr!r}")
        self.grad_clip = checks.finite_float("grad_clip", 0.0 if self.grad_clip is None else self.grad_clip)
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip: expected a non-negative number (0: no clipping), got {self.grad_clip!r}")
        self.ema_decay = checks.finite_float("ema_decay", self.ema_decay)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: expected a float in [0, 1), got {self.ema_decay!r}")
        if self.amp not in (None, *AMP_DTYPES):
            raise ValueError(f"amp: expected None, 'bf16' or 'fp16', got {self.amp!r}")
        if not isinstance(self.flip, bool):
            raise TypeError(f"flip: expected a bool, got {self.flip!r}")
        if self.noise not in NOISE_SOURCES:
            raise ValueError(f"noise: expected one of {NOISE_SOURCES}, got {self.noise!r}")
        if not isinstance(self.compile, bool):
            raise TypeError(f"compile: expected a bool, got {self.compile!r}")
        if self.on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite: expected one of {ON_NONFINITE}, got {self.on_nonfinite!r}")


def _train_config(kwargs: dict) -> TrainConfig:
    """A :class:`TrainConfig` from keyword arguments, naming an unknown one in the error."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"{unknown[0]}: not a training option; expected one of {sorted(known)}")
    return TrainConfig(**kwargs)


def _seeded_unet(config: UNetConfig, seed: int) -> UNet:
    """A U-Net whose initial weights come from ``seed`` alone; torch's global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        # a negative seed gives the initialisation a stream of its own: the per-step generators
        # are all seeded with non-negative values
        torch.manual_seed(-1 - seed)
        return UNet(config)


def _grad_norm(parameters) -> torch.Tensor:
    """The 2-norm of all gradients, as a device tensor (no host sync): NaN or inf when any is."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def _all_finite(tensors) -> bool:
    """Whether every value of every tensor is finite (one host read)."""
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _step_seed(seed: int, step: int) -> int:
    """The seed of step ``step``'s draws: below 2**53, as ``seed < 2**32``."""
    return seed * 1_000_003 + step


def _step_generator(device: torch.device, seed: int, step: int) -> torch.Generator:
    return torch.Generator(device).manual_seed(_step_seed(seed, step))


def _dropout_seed(seed: int, step: int, rank: int) -> int:
    """The seed of torch's global RNG (dropout) at step ``step`` on rank ``rank``: the step seed
    with the rank in bits 53 and up, so that ranks draw different masks (rank 0's, and thus a
    one-process run's, are the step seed's). Dropout masks therefore depend on the number of
    processes: N processes equal one exactly only for models without dropout."""
    return _step_seed(seed, step) + (rank << 53)


def _philox_base(first_row: int, per_image: int) -> int:
    """The Philox stream number of a rank's first noise value under ``noise="philox"``: its first
    row of the global batch times the values per image. The kernels draw whole Philox blocks of 4
    numbers, so it must be a multiple of 4 (any even-sided image; one process: always 0)."""
    base = first_row * per_image
    if base % 4:
        raise ValueError(f"noise: 'philox' splits the global batch's draw over the processes in whole blocks of "
                         f"4 values, but a rank's share starts at value {base} ({first_row} images of {per_image} "
                         f"values); use noise='generator' or a batch whose share per process is a multiple of 4 "
                         f"values")
    return base


class Trainer:
    """Trains a :class:`DDPM` on a tensor of images in [-1, 1], writing into ``out``.

    Each step leaves its loss and whether it was finite on the device; the host reads them only
    at log, sample and checkpoint time (and every ``FLUSH_EVERY`` steps), so a step never waits
    for the accelerator.

    Under torchrun the trainer joins the process group and runs on its rank's device (``cuda``
    becomes ``cuda:LOCAL_RANK``); ``config.batch_size`` is the global batch, a multiple of the
    number of processes. ``self.model`` and ``self.ema`` are the plain modules (checkpoints hold
    their state dicts); the forward pass goes through a DistributedDataParallel wrapper, which
    averages the gradients over the ranks, so every rank's weights, Adam state and EMA stay equal.
    Every rank must call the same methods in the same order (they hold collectives).
    """

    def __init__(self, ddpm: DDPM, images: torch.Tensor, out: str, config: TrainConfig = None,
                 device="cpu"):
        self.config = config or TrainConfig()
        if not isinstance(self.config, TrainConfig):
            raise TypeError(f"config: expected a TrainConfig, got {type(self.config).__name__}")
        distributed.init(resolve_device(device))
        # after init, which makes the rank's GPU the current one: "cuda" names cuda:LOCAL_RANK
        self.device = resolve_device(distributed.rank_device(device))
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        _check_images(images, ddpm.image_shape, self.config.batch_size)
        _check_split(self.config.batch_size, self.world_size)
        if self.config.noise == "philox":  # fails here, not at the first step
            _philox_base(self._first_row(), math.prod(ddpm.image_shape))
        self.ddpm = ddpm
        self.model = ddpm.model.to(self.device)
        self.images = images.to(self.device)
        self.out = out
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        # wrapped after the copy, so that the EMA carries none of DDP's hooks
        self._net = distributed.data_parallel(self.model, self.device)  # what the loss calls
        if self.config.compile:
            # the model (through its DDP wrapper), not the optimizer: the custom ops' backward
            # kernels are in the compiled graph
            self._net = torch.compile(self._net)
        # "skip" needs the fused Adam: it alone drops a whole update on the device (see _apply_update)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.config.lr, fused=self._fused())
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.config.amp == "fp16")
        self.step = 0
        self.losses = []
        self._pending = []  # this run's losses still on the device, in step order
        self._nonfinite = torch.zeros((), dtype=torch.int64, device=self.device)
        self._first_nonfinite = torch.full((), -1, dtype=torch.int64, device=self.device)
        self._saved_step = None  # the step of the last checkpoint this trainer wrote or resumed

    def _fused(self) -> Optional[bool]:
        """Adam's ``fused`` flag for this run's ``on_nonfinite``."""
        return True if self.config.on_nonfinite == "skip" else None

    # ------------------------------------------------------------------------------- one step
    def _first_row(self) -> int:
        """Where this rank's rows start in the global batch: ``r * b / N``."""
        return self.rank * (self.config.batch_size // self.world_size)

    def _share(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global-batch tensor (``batch_size`` rows): ``[r * b / N, (r + 1) * b / N)``."""
        size = rows.shape[0] // self.world_size
        return rows[self._first_row():self._first_row() + size]

    def _batch(self, g: torch.Generator) -> torch.Tensor:
        """This rank's share of step ``k``'s global batch, flipped where ``flip`` says.

        The global batch is the one-process run's on any number of processes: epoch ``e`` visits
        the images in the order of a permutation seeded by ``seed + e`` (the same on every rank:
        what a DistributedSampler with per-epoch shuffling does, but one permutation sliced by
        rank instead of one strided per rank, so the split does not change the batch), and the
        flips are drawn for the whole global batch from ``g`` before each rank takes its rows.
        """
        n, bs = self.images.shape[0], self.config.batch_size
        per_epoch = n // bs
        epoch, j = divmod(self.step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed + epoch))
        batch = self.images[self._share(order[j * bs:(j + 1) * bs]).to(self.device)]
        if self.config.flip:
            flip = self._share(torch.rand(bs, generator=g, device=self.device) < 0.5)
            batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        return batch

    def _draws(self, g: torch.Generator, x0: torch.Tensor):
        """This rank's share of the global batch's timesteps and noise, drawn from ``g`` in the
        order :func:`training_loss` draws them, so one process draws exactly what it would.

        Returns ``(t, noise, rng)``: under ``noise="philox"`` noise is None and rng a
        :class:`PhiloxState` for the kernel to draw from: stream ``(step seed, 0)``, from number
        ``base`` on, where this rank's rows start in the global batch, so every rank draws its
        rows' share of one global-batch draw."""
        bs = self.config.batch_size
        t = torch.randint(0, self.ddpm.schedule.T, (bs,), generator=g, device=self.device)
        if self.config.noise == "philox":
            base = _philox_base(self._first_row(), math.prod(self.ddpm.image_shape))
            return self._share(t), None, PhiloxState(_step_seed(self.config.seed, self.step), device=self.device,
                                                     base=base)
        noise = torch.randn((bs, *x0.shape[1:]), generator=g, device=self.device, dtype=x0.dtype)
        return self._share(t), self._share(noise), None

    def _lr(self) -> float:
        warm = self.config.warmup
        return self.config.lr * (min(1.0, (self.step + 1) / warm) if warm else 1.0)

    def train_step(self) -> float:
        """One optimisation step on one batch; returns the loss (under torchrun: the global
        batch's, on every rank).

        Reads the loss on the host (the loop in :meth:`train` does not), and under
        ``on_nonfinite="stop"`` raises :class:`NonFiniteError` when the step was not finite.
        """
        self._step()
        self._sync()
        return self.losses[-1]

    def _step(self) -> torch.Tensor:
        """One optimisation step; returns the loss, left on the device."""
        cfg = self.config
        g = _step_generator(self.device, cfg.seed, self.step)
        torch.manual_seed(_dropout_seed(cfg.seed, self.step, self.rank))
        x0 = self._batch(g)
        t, noise, rng = self._draws(g, x0)
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr()
        with torch.autocast(self.device.type, dtype=AMP_DTYPES.get(cfg.amp), enabled=cfg.amp is not None):
            loss = training_loss(self._net, self.ddpm.schedule, x0, self.ddpm.prediction, t=t, noise=noise, rng=rng)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        loss = loss.detach()
        finite = self._clip_and_check(loss)
        self._apply_update(finite)
        self._update_ema(finite)
        self._record(loss, finite)
        self.step += 1
        return loss

    def _clip_and_check(self, loss: torch.Tensor) -> torch.Tensor:
        """Clip the gradients (when ``grad_clip``) and return, as a device bool, whether the loss
        and (where their norm is at hand) the gradients are finite."""
        cfg = self.config
        norm = None
        if cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        elif cfg.on_nonfinite == "skip" and not self.scaler.is_enabled():
            # without clipping the norm is not computed anyway; "skip" needs it, or an infinite
            # gradient behind a finite loss would turn the weights into NaN
            norm = _grad_norm(self.model.parameters())
        finite = torch.isfinite(loss)
        if norm is not None and not self.scaler.is_enabled():
            # under fp16 an overflowing gradient is the scaler's business: it skips that step and
            # lowers its scale, as it is designed to
            finite = finite & torch.isfinite(norm)
        if self.config.on_nonfinite == "skip" and self.world_size > 1:
            # the loss is per rank: every rank must skip the same steps or the replicas drift
            # apart, so they agree now (a one-element all-reduce on the device, no host read)
            finite = distributed.all_reduce(finite.to(torch.int32), "min").bool()
        return finite

    def _apply_update(self, finite: torch.Tensor) -> None:
        """The Adam step, dropped entirely (weights, moments, step count) under "skip" when the
        step was not finite, without reading ``finite`` on the host."""
        own_flag = self.config.on_nonfinite == "skip" and not self.scaler.is_enabled()
        if own_flag:
            # found_inf is the fused Adam's device-side "skip this update" input, the one an
            # enabled GradScaler fills in itself (under fp16 it does, from the unscaled gradients)
            self.optimizer.found_inf = (~finite).float()
        try:
            self.scaler.step(self.optimizer)
        finally:
            if own_flag:
                del self.optimizer.found_inf
        self.scaler.update()

    def _record(self, loss: torch.Tensor, finite: torch.Tensor) -> None:
        """Keep the loss, count a non-finite step and remember the first one, on the device."""
        bad = ~finite
        self._first_nonfinite.masked_fill_(bad & (self._nonfinite == 0), self.step + 1)
        self._nonfinite += bad
        self._pending.append(loss)
        if len(self._pending) >= FLUSH_EVERY:
            self._sync()

    def ema_decay(self) -> float:
        """The EMA decay at the current step: ``ema_decay``, warmed up as ``(1 + n) / (10 + n)``
        so that the average does not start out dominated by the untrained initial weights."""
        return min(self.config.ema_decay, (1 + self.step) / (10 + self.step))

    @torch.no_grad()
    def _update_ema(self, finite: torch.Tensor):
        ema_p, p = list(self.ema.parameters()), list(self.model.parameters())
        weight = 1.0 - self.ema_decay()
        if self.config.on_nonfinite == "skip":
            # a skipped step moves the EMA by weight 0, chosen on the device
            delta = torch._foreach_sub(p, ema_p)
            torch._foreach_mul_(delta, finite * weight)
            torch._foreach_add_(ema_p, delta)
        else:
            torch._foreach_lerp_(ema_p, p, weight)
        for eb, b in zip(self.ema.buffers(), self.model.buffers()):
            eb.copy_(b)

    # ------------------------------------------------------------------- host reads, checks
    def nonfinite_steps(self) -> int:
        """How many steps of this run had a NaN or infinite loss or gradient (skipped ones under
        ``on_nonfinite="skip"``); a host read."""
        return int(self._nonfinite)

    def _sync(self) -> None:
        """Move the pending losses into ``self.losses`` (under torchrun: the mean over the ranks,
        the global batch's loss); under "stop", raise :class:`NonFiniteError` if any step so far
        was not finite on any rank (every rank then raises, at the same step)."""
        if self._pending:
            losses = distributed.all_reduce(torch.stack(self._pending)) / self.world_size
            self.losses.extend(losses.tolist())
            self._pending.clear()
        if self.config.on_nonfinite == "stop" and self.world_size > 1:
            self._agree_nonfinite()
        if self.config.on_nonfinite == "stop" and self.nonfinite_steps():
            first = int(self._first_nonfinite)
            raise NonFiniteError(f"training: the loss or gradients became NaN or infinite at step {first}; "
                                 f"{self._kept_checkpoint()}. Lower lr, set grad_clip, check the data, or "
                                 f"pass on_nonfinite='skip' to skip such steps")

    def _agree_nonfinite(self) -> None:
        """Every rank takes the others' non-finite steps as its own (the largest count, the
        earliest first step): a loss is per rank, so one rank alone may have seen a NaN."""
        never = torch.iinfo(torch.int64).max
        first = torch.where(self._first_nonfinite < 0, never, self._first_nonfinite)
        both = distributed.all_reduce(torch.stack([self._nonfinite, -first]), "max")
        self._nonfinite.copy_(both[0])
        self._first_nonfinite.copy_(torch.where(both[1] == -never, -1, -both[1]))

    def _ensure_finite(self) -> None:
        """Before a sample grid or a checkpoint: every step finite (under "stop") and the weights
        and EMA finite, else :class:`NonFiniteError`, so NaN weights are never written."""
        self._sync()
        if not _all_finite([*self.model.parameters(), *self.ema.parameters()]):
            raise NonFiniteError(f"training: the weights became NaN or infinite by step {self.step}; "
                                 f"{self._kept_checkpoint()}. Lower lr or set grad_clip")

    def _kept_checkpoint(self) -> str:
        if self._saved_step is None:
            return "no checkpoint was written"
        return f"the checkpoint {self.checkpoint_path()} is left at step {self._saved_step}"

    # ------------------------------------------------------------------------------ the loop
    def train(self, steps: int, *, max_minutes: Optional[float] = None, progress: bool = True) -> DDPM:
        """Train until ``self.step == steps`` (or ``max_minutes`` of wall time), checkpointing as set.

        Returns the DDPM with the EMA weights; the raw weights stay in ``self.model``. Raises
        :class:`NonFiniteError` (under ``on_nonfinite="stop"``) at the first log, sample or
        checkpoint after a non-finite step, without writing a checkpoint. Under torchrun only
        rank 0 shows the progress bar and writes log.jsonl, and every rank returns once the
        final checkpoint is on disk.
        """
        from tqdm.auto import tqdm

        cfg = self.config
        main = distributed.is_main()
        os.makedirs(self.out, exist_ok=True)
        start = time.monotonic()
        bar = tqdm(total=steps, initial=self.step, disable=not (progress and main), desc="train", unit="step")
        log = open(os.path.join(self.out, "log.jsonl"), "a") if main else None
        try:
            while self.step < steps:
                self._step()
                bar.update(1)
                if cfg.log_every and self.step % cfg.log_every == 0:
                    record = self._log_record(time.monotonic() - start)  # on every rank: it all-reduces
                    bar.set_postfix(loss="nan" if record["loss"] is None else f"{record['loss']:.4f}")
                    if log is not None:
                        log.write(json.dumps(record, allow_nan=False) + "\n")
                        log.flush()
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    self.save_samples()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if max_minutes is not None and self._out_of_time(time.monotonic() - start, max_minutes):
                    break
        finally:
            bar.close()
            if log is not None:
                log.close()
        self.save_checkpoint()
        distributed.barrier()  # the other ranks return once rank 0's checkpoint is written
        return self.ema_ddpm()

    def _out_of_time(self, elapsed: float, max_minutes: float) -> bool:
        """Whether ``max_minutes`` have passed. Every rank must leave the loop after the same
        step, so under torchrun they agree (one rank out of time stops all), and only at log
        steps (every step when ``log_every`` is 0), where the host is read anyway."""
        over = elapsed > 60 * max_minutes
        if self.world_size == 1:
            return over
        if self.config.log_every and self.step % self.config.log_every:
            return False
        return bool(distributed.all_reduce(torch.tensor(int(over), device=self.device), "max"))

    def _log_record(self, elapsed: float) -> dict:
        """One log.jsonl line: ``loss`` is the mean of the finite losses of the last ``log_every``
        steps (null when there is none), so that every line stays valid JSON."""
        self._sync()
        recent = [x for x in self.losses[-self.config.log_every:] if math.isfinite(x)]
        mean = sum(recent) / len(recent) if recent else None
        record = {"step": self.step, "loss": mean if mean is not None and math.isfinite(mean) else None,
                  "lr": self._lr(), "elapsed_s": round(elapsed, 1)}
        if self.config.on_nonfinite == "skip":
            record["skipped"] = self.nonfinite_steps()
        return record

    # ---------------------------------------------------------------------------- artefacts
    def ema_ddpm(self) -> DDPM:
        """The EMA model as a DDPM (shares weights with the trainer)."""
        return DDPM(self.ema, self.ddpm.schedule, self.ddpm.prediction, self.step)

    def save_samples(self, n: int = 16) -> str:
        """Sample a grid from the EMA model into ``out/samples/step_XXXXXXX.png`` (under torchrun:
        rank 0 does; every rank checks the run is finite and returns the path)."""
        from .sampling import sample

        self._ensure_finite()
        path = os.path.join(self.out, "samples", f"step_{self.step:07d}.png")
        if not distributed.is_main():
            return path
        x = sample(self.ema_ddpm(), n, steps=min(self.config.sample_steps, self.ddpm.schedule.T),
                   seed=self.config.seed, device=self.device, progress=False, reuse=False)
        save_grid(x, path)
        return path

    def checkpoint_path(self) -> str:
        """Where the latest checkpoint lives: ``out/checkpoint``."""
        return os.path.join(self.out, "checkpoint")

    def save_checkpoint(self) -> str:
        """Write model, EMA, optimizer state and config to ``out/checkpoint`` atomically; a
        :class:`NonFiniteError` instead when the run is no longer finite (the old one stays).

        Under torchrun rank 0 writes (the ranks' states are equal) and the others go on without
        waiting: their next gradient all-reduce waits for rank 0 anyway. The state dicts are the
        plain modules', with no trace of the number of processes, so any number can resume."""
        self._ensure_finite()
        path = self.checkpoint_path()
        if distributed.is_main():
            run = {k: v for k, v in asdict(self.config).items() if k not in SPEED_FIELDS}
            config = dict(self.ema_ddpm().config_dict(), train=run)
            state = {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}
            path = write_checkpoint(path, config, self.model, ema=self.ema, optimizer=state)
        self._saved_step = self.step
        return path

    @classmethod
    def resume(cls, out: str, images: torch.Tensor, device="cpu", **overrides) -> "Trainer":
        """Continue the run in ``out`` from its checkpoint: same step, weights, EMA and optimizer,
        on any number of processes (under torchrun every rank reads it: ``out`` must be on a
        file system every node sees)."""
        ckpt = _read_shared(os.path.join(out, "checkpoint"), device)
        if ckpt.ema is None or ckpt.optimizer is None:
            raise ValueError(f"out: {out!r} holds a checkpoint without EMA or optimizer state; "
                             f"it cannot be resumed")
        ddpm = build_ddpm(ckpt.config, ckpt.model, ckpt.path)
        trainer = cls(ddpm, images, out, _train_config(dict(ckpt.config.get("train", {}), **overrides)),
                      device=device)
        _check_resume_state(ckpt.ema, ckpt.optimizer, trainer, ckpt.path)
        trainer.ema.load_state_dict(ckpt.ema)
        trainer.optimizer.load_state_dict(_as_optimizer_flavour(ckpt.optimizer["optimizer"], trainer._fused()))
        if ckpt.optimizer["scaler"]:  # empty when written without fp16: a fresh scaler then
            trainer.scaler.load_state_dict(ckpt.optimizer["scaler"])
        trainer.step = trainer._saved_step = ddpm.step
        return trainer


def _read_shared(path: str, device):
    """The checkpoint at ``path`` with its optimizer state, read by rank 0 first: reading may
    recover a checkpoint a killed save left beside ``path`` (files are renamed), which one process
    must do alone before the others read."""
    distributed.init(resolve_device(device))
    if distributed.is_main():
        ckpt = read_checkpoint(path, with_optimizer=True)
    distributed.barrier()
    if not distributed.is_main():
        ckpt = read_checkpoint(path, with_optimizer=True)
    return ckpt


def _resume_error(path: str, what: str) -> CheckpointError:
    """The error for a checkpoint that cannot be resumed."""
    return CheckpointError(f"checkpoint: {path!r} cannot be resumed: {what}")


def _check_images(images, image_shape, batch_size: int) -> None:
    """The training images: a tensor ``[N, *image_shape]`` of finite values, N >= ``batch_size``."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images: expected a tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1:] != torch.Size(image_shape):
        raise ValueError(f"images: expected [N, {', '.join(map(str, image_shape))}], "
                         f"got {tuple(images.shape)}")
    if batch_size > images.shape[0]:
        raise ValueError(f"batch_size: expected at most the dataset size ({images.shape[0]} images), "
                         f"got {batch_size}")
    check_finite(images, "images")


def _check_split(batch_size: int, world_size: int) -> None:
    """The global batch splits evenly over the processes: each rank's mean loss then weighs as
    much as the others, and DDP's average of them is the global batch's mean."""
    if batch_size % world_size:
        raise ValueError(f"batch_size: the global batch size must be a multiple of the number of "
                         f"processes ({world_size}), got {batch_size}")


def _check_resume_state(ema: dict, state, trainer: Trainer, path: str) -> None:
    """Raise a :class:`CheckpointError` naming ``path`` unless the EMA weights and optimizer.pt
    are what :meth:`Trainer.save_checkpoint` writes for this model: checked before anything is
    loaded, so a bad checkpoint changes nothing."""
    ref = trainer.ema.state_dict()
    if set(ema) != set(ref) or any(tuple(ema[k].shape) != tuple(ref[k].shape) for k in ref):
        raise _resume_error(path, "its EMA weights do not match its model")
    if not isinstance(state, dict) or not all(isinstance(state.get(k), dict) for k in ("optimizer", "scaler")):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise _resume_error(path, f"optimizer.pt: expected a dict with 'optimizer' and 'scaler' dicts, got {got}")
    _check_adam_state(state["optimizer"], trainer.optimizer, path)
    scaler = state["scaler"]
    missing = sorted({"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"} - set(scaler))
    if scaler and missing:
        raise _resume_error(path, f"optimizer.pt: its GradScaler state lacks {missing}")


def _check_adam_state(saved, optimizer: torch.optim.Optimizer, path: str) -> None:
    """``saved`` is an Adam state dict for ``optimizer``'s parameters (groups, sizes, moment shapes)."""
    groups = optimizer.param_groups
    saved_groups = saved.get("param_groups")
    if not isinstance(saved.get("state"), dict) or not isinstance(saved_groups, list) or \
            not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in saved_groups):
        raise _resume_error(path, "optimizer.pt: expected an optimizer state dict ('state', 'param_groups')")
    sizes, saved_sizes = [len(g["params"]) for g in groups], [len(g["params"]) for g in saved_groups]
    if sizes != saved_sizes:
        raise _resume_error(path, f"optimizer.pt: expected parameter groups of sizes {sizes}, got {saved_sizes}")
    params = dict(zip((i for g in saved_groups for i in g["params"]), (p for g in groups for p in g["params"])))
    for i, entry in saved["state"].items():
        p = params.get(i)
        if p is None or not isinstance(entry, dict) or "step" not in entry:
            raise _resume_error(path, f"optimizer.pt: unusable state for parameter {i!r}")
        for key in ("exp_avg", "exp_avg_sq"):
            t = entry.get(key)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(p.shape):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise _resume_error(path, f"optimizer.pt: parameter {i}'s {key}: expected shape "
                                              f"{tuple(p.shape)}, got {got}")


def _as_optimizer_flavour(saved: dict, fused: Optional[bool]) -> dict:
    """``saved`` set up for this trainer's Adam (fused or not): ``load_state_dict`` adopts the
    saved groups' flags, and the run that wrote them may have used the other ``on_nonfinite``.
    Non-fused Adam keeps its step counts on the CPU (the fused one moves them itself on load)."""
    groups = [dict(g, fused=fused) for g in saved["param_groups"]]
    state = {i: dict(entry, step=entry["step"].cpu()) if isinstance(entry["step"], torch.Tensor) else entry
             for i, entry in saved["state"].items()}
    return dict(saved, param_groups=groups, state=state)


def train(data="digits", *, out: str, steps: int, preset: Optional[str] = None,
          model_config: Optional[UNetConfig] = None, schedule: Optional[ScheduleConfig] = None,
          prediction: str = "eps", resume: bool = False, device="cpu",
          max_minutes: Optional[float] = None, progress: bool = True, **train_kwargs) -> DDPM:
    """Train a DDPM on ``data`` (``"digits"``, ``"mnist"``, a folder, a .npy/.npz file or a tensor).

    ``preset`` (default: the data's name when it is a bundled set, else ``cifar10``) or
    ``model_config`` chooses the U-Net, whose initial weights are drawn from ``seed``; other
    keyword arguments are :class:`TrainConfig` fields. With ``resume=True`` training continues
    from ``out/checkpoint``. Returns the EMA model.

    Runs unchanged under ``torchrun``: ``batch_size`` is then the global batch, split over the
    processes, and the run takes the steps one process would (see :class:`Trainer`).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    if model_config is None:
        name = preset or (data if isinstance(data, str) and data in PRESETS else "cifar10")
        if name not in PRESETS:
            raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
        model_config = PRESETS[name]
    if isinstance(data, torch.Tensor):
        check_finite(data, "data")
        images = data
    else:
        images = load_dataset(data, resolution=model_config.resolution, channels=model_config.in_channels)
    if resume:
        trainer = Trainer.resume(out, images, device=device, **train_kwargs)
    else:
        config = _train_config(train_kwargs)
        ddpm = DDPM(_seeded_unet(model_config, config.seed), Schedule.from_config(schedule or ScheduleConfig()),
                    prediction)
        trainer = Trainer(ddpm, images, out, config, device=device)
    return trainer.train(steps, max_minutes=max_minutes, progress=progress)
