"""Progressive generation (the paper's Figure 6) and completions of shared latents (Figure 7)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ..sampling import positive_int
from .common import EditRun


@dataclass
class Progressive:
    """The result of :func:`progressive`: the samples, and the predicted x_0 at the recorded
    steps (``frames[k]`` after the step at model timestep ``timesteps[k]``), first to last."""

    x: torch.Tensor
    frames: torch.Tensor
    timesteps: List[int]


@torch.no_grad()
def progressive(model_or_path, n: int = 4, *, every: Optional[int] = None, **run_options) -> Progressive:
    """Sample ``n`` images and keep the model's prediction of x_0 every ``every`` steps of the one
    run (default: ten frames), the last step always included: x_0 emerging coarse to fine.
    ``run_options``: as :func:`fastddpm.sample` (the eager loop: a recorded step returns to Python).
    """
    run = EditRun(model_or_path, **run_options)
    positive_int("n", n)
    schedule = run.method.schedule(run.ddpm.schedule)
    S = schedule.T
    every = max(1, S // 10) if every is None else positive_int("every", every)
    frames, timesteps = [], []

    def record(i: int, t: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        if (S - 1 - i) % every == 0 or i == 0:
            frames.append(x0.detach().float().clone())
            timesteps.append(t)

    sampler = run.sampler_for(schedule, n)
    if run.options.cuda_graph:
        raise ValueError("cuda_graph: progressive() records x_0 after steps in Python; use the eager loop")
    with run.eval_mode():
        x = sampler.run(run.noise, callback=record, progress=run.progress)
    return Progressive(x, torch.stack(frames), timesteps)


@dataclass
class SharedLatent:
    """The result of :func:`from_shared_latent`: one run's x_t at each t (``latents[k]``), and
    ``samples[k]``: completions of that x_t by the reverse process."""

    latents: torch.Tensor
    samples: torch.Tensor
    t: List[int]


@torch.no_grad()
def from_shared_latent(model_or_path, t: Sequence[int] = (250, 500, 750, 1000), samples: int = 4,
                       **run_options) -> SharedLatent:
    """Run the reverse process once from x_T, take its x_t at each ``t``, and draw ``samples``
    completions p(x_0 | x_t) from each: images that share the latent share its high-level
    features the more, the smaller t. The trajectory runs on the full schedule, the completions on
    ``steps`` (respaced below each t). ``run_options``: as :func:`fastddpm.sample`.
    """
    run = EditRun(model_or_path, **run_options)
    positive_int("samples", samples)
    ts = [run.timestep(v, "t", low=1) for v in (list(t) if not isinstance(t, int) else [t])]
    if not ts:
        raise ValueError("t: expected one or more timesteps in [1, T]")
    full = run.ddpm.schedule
    latents = {}
    trajectory = run.sampler_for(full, 1)
    x_T = run.noise.initial((1, *run.chw), run.device)
    if full.T in ts:
        latents[full.T] = x_T.clone()

    def record(i: int, _t: int, x: torch.Tensor, _x0) -> None:
        if i in wanted:  # after the step at index i the state is x at index i - 1, i.e. x_i
            latents[i] = x.detach().float().clone()

    wanted = set(ts) - {full.T}
    with run.eval_mode():
        if wanted:
            trajectory.run(run.noise, x_T=x_T, stop=min(wanted), callback=record, progress=run.progress)
        out = [run.reverse(latents[v].expand(samples, *run.chw).contiguous(), v) for v in ts]
    return SharedLatent(torch.cat([latents[v] for v in ts]), torch.stack(out), ts)
