"""``SamplingMethod``: what the reverse process computes — the sampler, its variance, x0 clipping,
DDIM's eta and direction form, and the number of steps — validated once, and turned into the
(respaced) schedule and the step op's coefficient table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..schedule import DDIM_DIRECTIONS, VARIANCES, Schedule, even_timesteps

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


@dataclass(frozen=True)
class SamplingMethod:
    """The sampler and its settings (hashable; see :func:`fastddpm.sample` for each field).

    steps: reverse steps; None: every timestep. Fewer steps respace the schedule evenly (betas
    recomputed from abar, improved-diffusion's respacing).
    """

    sampler: str = "ddpm"
    variance: str = "fixed_large"
    clip: Union[bool, float, None] = True
    eta: float = 0.0
    ddim_direction: str = "rederived"
    steps: Optional[int] = None

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler: expected one of {SAMPLERS}, got {self.sampler!r}")
        if self.variance not in VARIANCES:
            raise ValueError(f"variance: expected one of {VARIANCES}, got {self.variance!r}")
        if self.ddim_direction not in DDIM_DIRECTIONS:
            raise ValueError(f"ddim_direction: expected one of {DDIM_DIRECTIONS}, got {self.ddim_direction!r}")
        object.__setattr__(self, "clip", clip_value(self.clip))
        if (not isinstance(self.eta, (int, float)) or isinstance(self.eta, bool) or not 0 <= self.eta <= 1):
            raise ValueError(f"eta: expected a number in [0, 1], got {self.eta!r}")
        if self.sampler == "ddpm" and self.eta != 0:
            raise ValueError(f"eta: DDIM's noise scale; sampler='ddpm' takes none (its noise is fixed by variance=), "
                             f"got eta={self.eta!r}; use sampler='ddim' with eta")
        if self.steps is not None and (not isinstance(self.steps, int) or isinstance(self.steps, bool)
                                       or self.steps < 1):
            raise ValueError(f"steps: expected a positive int or None, got {self.steps!r}")

    def schedule(self, full: Schedule, upto: Optional[int] = None) -> Schedule:
        """The schedule the reverse process runs on: ``full`` respaced to ``steps`` over all its
        timesteps, or over the first ``upto`` of them (a run that starts from x_t at timestep
        ``upto - 1``: partial diffusion and the edits)."""
        span = full.T if upto is None else upto
        steps = span if self.steps is None else self.steps
        if not 1 <= steps <= span:
            what = "T of this model" if upto is None else f"the {span} timesteps below the start"
            raise ValueError(f"steps: expected an int in [1, {span}] ({what}), got {steps!r}")
        if upto is None:
            return full.respaced(steps)
        return full.respace(even_timesteps(span, steps))

    def coefficients(self, schedule: Schedule, prediction: str, device) -> torch.Tensor:
        """The step op's ``[S, 6]`` coefficient table of this method on ``schedule``."""
        return schedule.table("step", device, sampler=self.sampler, variance=self.variance, prediction=prediction,
                              eta=self.eta, ddim_direction=self.ddim_direction)
