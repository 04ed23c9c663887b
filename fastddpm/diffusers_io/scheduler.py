"""A diffusers ``DDPMScheduler`` / ``DDIMScheduler`` config in fastddpm's terms, without diffusers.

:func:`scheduler_settings` checks a scheduler config dict and names each field fastddpm cannot
follow; :func:`full_schedule` is its fastddpm :class:`~fastddpm.Schedule`;
:func:`inference_timesteps` is the pipeline's timestep list for ``num_inference_steps``; and
:func:`step_plan` turns those steps into the sampler's schedule and six-coefficient table, so that
fastddpm's step op computes what ``scheduler.step`` computes (docs/diffusers.md).

Each diffusers step goes from ``abar[t]`` to ``abar[prev]`` where ``prev`` is the next timestep of
the list (DDPMScheduler) or ``t - T // num_inference_steps`` (DDIMScheduler, which need not be in
the list with trailing spacing). Every row of the table is therefore taken from the two-step
fastddpm schedule whose cumulative products are ``abar[prev], abar[t]``: the coefficients come
from :meth:`Schedule.step_coefficients`, the one place their formulas live.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from ..schedule import MAX_T, Schedule, ScheduleConfig

SCHEDULERS = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim"}
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "quadratic", "squaredcos_cap_v2": "cosine"}
PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
# diffusers' "_log" forms compute the same standard deviation (fixed_small_log: exp(0.5 log var));
# fixed_large_log is Glide's log-domain beta_t, which DDPMScheduler.step itself turns into NaN
# (it takes the square root of a log): fastddpm follows the intent, beta_t.
VARIANCE_TYPES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
                  "fixed_large_log": "fixed_large"}
SPACINGS = ("leading", "trailing", "linspace")
# Fields of either scheduler; a field the other scheduler has is ignored (DDIMPipeline converts a
# DDPMScheduler's config and keeps its variance_type), a field neither has is refused: it may
# change the samples.
FIELDS = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "variance_type",
          "clip_sample", "clip_sample_range", "prediction_type", "thresholding", "dynamic_thresholding_ratio",
          "sample_max_value", "timestep_spacing", "steps_offset", "rescale_betas_zero_snr", "set_alpha_to_one"}
# diffusers clamps the DDPM variance at this value before it uses it (it takes its log elsewhere)
DIFFUSERS_MIN_VARIANCE = 1e-20


@dataclass(frozen=True)
class SchedulerSettings:
    """A checked DDPMScheduler / DDIMScheduler config, in fastddpm's words.

    Attributes:
        kind: ``"ddpm"`` (DDPMScheduler) or ``"ddim"`` (DDIMScheduler).
        schedule: the named beta schedule, or None for ``trained_betas``.
        trained_betas: the config's own betas (a tuple), or None.
        prediction: ``"eps"``, ``"x0"`` or ``"v"``.
        variance: ``"fixed_small"`` or ``"fixed_large"`` (DDPM's noise).
        clip: the bound of the predicted x0, or None.
        timestep_spacing, steps_offset, set_alpha_to_one: as in diffusers.
    """

    kind: str
    schedule: Optional[ScheduleConfig]
    trained_betas: Optional[Tuple[float, ...]]
    prediction: str
    variance: str
    clip: Optional[float]
    timestep_spacing: str
    steps_offset: int
    set_alpha_to_one: bool

    @property
    def T(self) -> int:
        """The number of training timesteps."""
        return self.schedule.T if self.schedule is not None else len(self.trained_betas)

    def sampler_defaults(self) -> dict:
        """The keywords of :func:`fastddpm.sample` closest to this scheduler (its sampler, variance
        and clip; the exact timesteps are :func:`step_plan`'s)."""
        return {"sampler": self.kind, "variance": self.variance, "clip": self.clip or False}


def _choice(config: dict, name: str, default, choices):
    value = config.get(name, default)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {sorted(choices)}, got {value!r}")
    return value


def _flag(config: dict, name: str, default: bool) -> bool:
    value = config.get(name, default)
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    return value


def _number(config: dict, name: str, default: float) -> float:
    value = config.get(name, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def _kind(config: dict, class_name: Optional[str]) -> str:
    name = class_name if class_name is not None else config.get("_class_name", "DDPMScheduler")
    if name not in SCHEDULERS:
        raise ValueError(f"_class_name: expected one of {sorted(SCHEDULERS)} (the DDPM and DDIM pipelines' "
                         f"schedulers), got {name!r}")
    return SCHEDULERS[name]


def _betas_source(config: dict) -> Tuple[Optional[ScheduleConfig], Optional[Tuple[float, ...]]]:
    """The named schedule, or the trained betas (bounded like a schedule's T)."""
    trained = config.get("trained_betas")
    if trained is not None:
        if not isinstance(trained, (list, tuple)) or not 1 <= len(trained) <= MAX_T or not all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b < 1 for b in trained):
            raise ValueError(f"trained_betas: expected 1 to {MAX_T} numbers in (0, 1)")
        return None, tuple(float(b) for b in trained)
    kind = BETA_SCHEDULES[_choice(config, "beta_schedule", "linear", BETA_SCHEDULES)]
    fields = {"kind": kind, "T": config.get("num_train_timesteps", 1000),
              "beta_start": _number(config, "beta_start", 1e-4), "beta_end": _number(config, "beta_end", 0.02)}
    try:
        return ScheduleConfig.from_dict(fields), None
    except ValueError as e:
        raise ValueError(f"num_train_timesteps: {e}") from None


def _clip(config: dict) -> Optional[float]:
    """The x0 bound: clip_sample's range; dynamic thresholding only where it reduces to clipping."""
    if _flag(config, "thresholding", False):
        # diffusers clamps the per-image quantile s to [1, sample_max_value]: with a maximum of 1,
        # s is 1 and thresholding is clipping to [-1, 1]; otherwise x0 is rescaled per image, which
        # the step's one scalar bound cannot express.
        if _number(config, "sample_max_value", 1.0) != 1.0:
            raise ValueError(f"thresholding: dynamic thresholding with sample_max_value="
                             f"{config.get('sample_max_value')!r} rescales x0 per image; fastddpm supports it only "
                             f"with sample_max_value=1.0 (where it is clipping to [-1, 1])")
        return 1.0
    if not _flag(config, "clip_sample", True):
        return None
    bound = _number(config, "clip_sample_range", 1.0)
    if bound <= 0:
        raise ValueError(f"clip_sample_range: expected a positive number, got {bound!r}")
    return bound


def scheduler_settings(config: dict, class_name: Optional[str] = None) -> SchedulerSettings:
    """The :class:`SchedulerSettings` of a diffusers scheduler config dict (``scheduler_config.json``
    or ``dict(pipe.scheduler.config)``); ``class_name`` overrides its ``"_class_name"``.

    A ValueError names the field when a value is not one fastddpm reproduces (``variance_type``
    learned, ``beta_schedule`` sigmoid, ``rescale_betas_zero_snr``, a field unknown to both
    schedulers, ...).
    """
    if not isinstance(config, dict):
        raise TypeError(f"config: expected a dict, got {type(config).__name__}")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in FIELDS)
    if unknown:
        raise ValueError(f"{unknown[0]}: not a DDPMScheduler / DDIMScheduler field fastddpm knows "
                         f"(unknown: {unknown})")
    kind = _kind(config, class_name)
    if _flag(config, "rescale_betas_zero_snr", False):
        raise ValueError("rescale_betas_zero_snr: zero terminal SNR makes the last beta 1, outside fastddpm's "
                         "schedules (betas in (0, 1))")
    schedule, trained = _betas_source(config)
    variance = "fixed_small"
    if kind == "ddpm":
        variance = VARIANCE_TYPES[_choice(config, "variance_type", "fixed_small", VARIANCE_TYPES)]
    steps_offset = config.get("steps_offset", 0)
    if not isinstance(steps_offset, int) or isinstance(steps_offset, bool) or steps_offset < 0:
        raise ValueError(f"steps_offset: expected a non-negative int, got {steps_offset!r}")
    return SchedulerSettings(
        kind=kind, schedule=schedule, trained_betas=trained,
        prediction=PREDICTION_TYPES[_choice(config, "prediction_type", "epsilon", PREDICTION_TYPES)],
        variance=variance, clip=_clip(config), timestep_spacing=_choice(config, "timestep_spacing", "leading", SPACINGS),
        steps_offset=steps_offset, set_alpha_to_one=_flag(config, "set_alpha_to_one", True))


def full_schedule(settings: SchedulerSettings) -> Schedule:
    """The fastddpm schedule of the scheduler's ``T`` training timesteps (float64; a named schedule
    keeps its :class:`ScheduleConfig`, so the model can be saved as a fastddpm checkpoint)."""
    if settings.schedule is not None:
        return Schedule.from_config(settings.schedule)
    # diffusers keeps trained betas as float32: the same numbers here
    return Schedule(torch.tensor(settings.trained_betas, dtype=torch.float32).double())


def _check_steps(settings: SchedulerSettings, num_inference_steps) -> int:
    if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) \
            or not 1 <= num_inference_steps <= settings.T:
        raise ValueError(f"num_inference_steps: expected an int in [1, {settings.T}], got {num_inference_steps!r}")
    return num_inference_steps


def inference_timesteps(settings: SchedulerSettings, num_inference_steps: int) -> torch.Tensor:
    """The descending int64 timesteps of ``scheduler.set_timesteps(num_inference_steps)``: leading
    (``k * (T // n) + steps_offset``), trailing (``round(T - k T / n) - 1``) or linspace. The
    arithmetic is diffusers' own, in numpy, so that its roundings are the same."""
    n, T = _check_steps(settings, num_inference_steps), settings.T
    if settings.timestep_spacing == "linspace":
        timesteps = np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    elif settings.timestep_spacing == "leading":
        timesteps = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.int64) + settings.steps_offset
    else:
        timesteps = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    if timesteps.min() < 0 or timesteps.max() >= T:
        raise ValueError(f"steps_offset: timesteps {timesteps.tolist()} leave [0, {T}) with "
                         f"num_inference_steps={n} (diffusers would index out of its tables)")
    return torch.from_numpy(timesteps)


def previous_timesteps(settings: SchedulerSettings, timesteps: torch.Tensor) -> torch.Tensor:
    """The timestep each step goes to (-1: past the start): the next one of the list for
    DDPMScheduler, ``t - T // n`` for DDIMScheduler (diffusers' ``previous_timestep`` and
    ``step``)."""
    if settings.kind == "ddpm":
        return torch.cat([timesteps[1:], torch.tensor([-1])])
    return timesteps - settings.T // timesteps.numel()


def _two_step_row(abar_t: float, abar_prev: float, *, last_noise_t: Optional[int], **coefficients) -> torch.Tensor:
    """The step row from ``abar_prev`` to ``abar_t``: row 1 of the schedule whose cumulative
    products are ``[abar_prev, abar_t]``, or row 0 of ``[abar_t]`` when ``abar_prev`` is 1.

    ``last_noise_t``: for DDPM's step into ``abar_prev = 1``, its timestep; diffusers adds noise
    there unless it is 0 (with its variance clamped at 1e-20), where fastddpm's row 0 adds none.
    """
    if abar_prev == 1.0:
        single = Schedule(torch.tensor([1.0 - abar_t], dtype=torch.float64))
        row = single.step_coefficients(**coefficients)[0]
        if last_noise_t:
            variance = single.variance(coefficients["variance"])[0].clamp(min=DIFFUSERS_MIN_VARIANCE)
            row[5] = variance.sqrt()
        return row
    if abar_prev <= abar_t:
        raise ValueError("set_alpha_to_one: false with a last timestep of 0 makes diffusers' final DDIM step "
                         "re-noise x0 to abar[0] (no schedule step); use set_alpha_to_one=true, steps_offset=1 or "
                         "timestep_spacing='trailing'")
    pair = Schedule(torch.tensor([1.0 - abar_prev, 1.0 - abar_t / abar_prev], dtype=torch.float64))
    return pair.step_coefficients(**coefficients)[1]


def step_plan(settings: SchedulerSettings, schedule: Schedule, num_inference_steps: int, *, eta: float = 0.0,
              clipped_direction: bool = False) -> Tuple[Schedule, torch.Tensor]:
    """The sampler's ``(schedule, float64 [S, 6] coefficient table)`` for the pipeline's call with
    ``num_inference_steps`` (and DDIM's ``eta`` and ``use_clipped_model_output``): index ``i`` of
    both is the ``i``-th smallest of :func:`inference_timesteps`, as :class:`~fastddpm.Sampler`
    runs them."""
    if settings.kind == "ddpm" and eta != 0:
        raise ValueError(f"eta: DDIM's noise scale; a DDPMScheduler takes none, got eta={eta!r}")
    timesteps = inference_timesteps(settings, num_inference_steps)
    previous = previous_timesteps(settings, timesteps)
    final = 1.0 if settings.kind == "ddpm" or settings.set_alpha_to_one else float(schedule.abar[0])
    coefficients = dict(sampler=settings.kind, variance=settings.variance, prediction=settings.prediction,
                        eta=eta, ddim_direction="rederived" if clipped_direction else "model")
    rows = [_two_step_row(float(schedule.abar[t]), float(schedule.abar[p]) if p >= 0 else final,
                          last_noise_t=int(t) if settings.kind == "ddpm" else None, **coefficients)
            for t, p in zip(timesteps.tolist(), previous.tolist())]
    order = torch.argsort(timesteps)
    return schedule.respace(timesteps[order]), torch.stack(rows)[order]
