"""The forward process, the training loss (Algorithm 1), the posterior, and the textbook sampler.

:func:`reference_sample` is Algorithm 2 written literally from the paper's formulas — the oracle
the step-coefficient sampler in :mod:`fastddpm.sampling` is tested against.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from . import ops
from .schedule import PREDICTIONS, Schedule


def _check_timesteps(schedule: Schedule, t: torch.Tensor, batch: int) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.int64)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t: expected a scalar or shape [{batch}], got {tuple(t.shape)}")
    if bool((t < 0).any()) or bool((t >= schedule.T).any()):
        raise ValueError(f"t: expected timesteps in [0, {schedule.T}), got {t.tolist()}")
    return t.contiguous()


def q_sample(schedule: Schedule, x0: torch.Tensor, t, noise: Optional[torch.Tensor] = None,
             generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sample ``x_t ~ q(x_t | x_0)`` in closed form; returns ``(x_t, noise)``."""
    t = _check_timesteps(schedule, t, x0.shape[0]).to(x0.device)
    return ops.q_sample(x0, t, schedule.table("noising", x0.device), noise, generator=generator)


def q_step(schedule: Schedule, x_prev: torch.Tensor, t: int,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One forward step ``x_t ~ q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)``."""
    beta = float(schedule.betas[t])
    z = torch.randn(x_prev.shape, generator=generator, dtype=x_prev.dtype, device=x_prev.device)
    return (1.0 - beta) ** 0.5 * x_prev + beta**0.5 * z


def _bcast(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device)[t].reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def q_posterior(schedule: Schedule, x0: torch.Tensor, xt: torch.Tensor,
                t) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ``q(x_{t-1} | x_t, x_0)`` (eqs. 6-7); variance shaped for broadcasting."""
    t = _check_timesteps(schedule, t, x0.shape[0]).to(x0.device)
    mean = _bcast(schedule.posterior_c0, t, x0) * x0 + _bcast(schedule.posterior_ct, t, x0) * xt
    return mean, _bcast(schedule.var_small, t, x0)


def training_target(schedule: Schedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                    prediction: str = "eps") -> torch.Tensor:
    """What the network regresses: eps (the paper), x0, or v = sqrt(abar) eps - sqrt(1-abar) x0."""
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    if prediction == "v":
        return _bcast(schedule.sqrt_abar, t, x0) * noise - _bcast(schedule.sqrt_one_minus_abar, t, x0) * x0
    raise ValueError(f"prediction: expected one of {PREDICTIONS}, got {prediction!r}")


def training_loss(model: Callable, schedule: Schedule, x0: torch.Tensor, prediction: str = "eps",
                  generator: Optional[torch.Generator] = None, *, t: Optional[torch.Tensor] = None,
                  noise: Optional[torch.Tensor] = None, rng: Optional[ops.PhiloxState] = None) -> torch.Tensor:
    """Algorithm 1: t ~ Uniform{0..T-1}, eps ~ N(0, I), loss = ||target - model(x_t, t)||^2 (mean).

    ``t`` (schedule indices) and ``noise`` are drawn from ``generator``, in that order, unless
    given: a distributed run draws them for the whole global batch and passes each rank its share.
    ``rng`` (a :class:`fastddpm.ops.PhiloxState`, instead of ``noise``): eps is drawn inside the
    noising kernel from its Philox stream (then advanced), so x0 is read and x_t and eps written
    once; ``generator`` then draws t alone.
    """
    if noise is not None and rng is not None:
        raise ValueError("noise / rng: give at most one of them, got both")
    if t is None:
        t = torch.randint(0, schedule.T, (x0.shape[0],), generator=generator, device=x0.device)
    if noise is None and rng is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    xt, noise = ops.q_sample(x0, t, schedule.table("noising", x0.device), noise, rng=rng)
    out = model(xt, schedule.timesteps.to(x0.device)[t])
    return F.mse_loss(out.float(), training_target(schedule, x0, noise, t, prediction).float())


@torch.no_grad()
def reference_sample(model: Callable, schedule: Schedule, shape, *, variance: str = "fixed_large",
                     clip: bool = False, generator: Optional[torch.Generator] = None,
                     device="cpu", x_T: Optional[torch.Tensor] = None, start: Optional[int] = None) -> torch.Tensor:
    """Algorithm 2 from the paper's formulas, for an eps-predicting model. The oracle sampler.

    Without clipping: ``x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) + sigma_t z``.
    With clipping: the posterior mean of eq. 7 evaluated at x0 clipped to [-1, 1].
    Noise order: ``x_T`` first (unless given), then one draw per step for every t > 0 (none at t = 0).
    ``x_T`` / ``start``: the state to start from and its schedule index (default: drawn, T - 1).
    """
    x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T.float()
    sigma = schedule.variance(variance).sqrt()
    for i in reversed(range(schedule.T if start is None else start + 1)):
        t = torch.full((shape[0],), i, dtype=torch.int64, device=device)
        eps = model(x, schedule.timesteps.to(device)[t]).double()
        xd = x.double()
        if clip:
            x0 = (schedule.sqrt_recip_abar[i] * xd - schedule.sqrt_recipm1_abar[i] * eps).clamp(-1, 1)
            mean = schedule.posterior_c0[i] * x0 + schedule.posterior_ct[i] * xd
        else:
            mean = (xd - schedule.betas[i] / schedule.sqrt_one_minus_abar[i] * eps) / schedule.alphas[i].sqrt()
        if i > 0:
            z = torch.randn(shape, generator=generator, device=device)
            mean = mean + sigma[i] * z.double()
        x = mean.float()
    return x


@torch.no_grad()
def reference_reconstruct(model: Callable, schedule: Schedule, x0: torch.Tensor, t: int, *,
                          variance: str = "fixed_large", clip: bool = True,
                          generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Partial diffusion and reverse written out: x_t from q(x_t | x_0) with the reference op (its
    noise the generator's first draw), then Algorithm 2 (:func:`reference_sample`) from index t - 1.
    The oracle of :func:`fastddpm.reconstruct`."""
    index = torch.full((x0.shape[0],), t - 1, dtype=torch.int64, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    xt = ops.q_sample(x0, index, schedule.table("noising", x0.device), noise, backend="reference")[0]
    return reference_sample(model, schedule, tuple(x0.shape), variance=variance, clip=clip, generator=generator,
                            device=x0.device, x_T=xt, start=t - 1)


@torch.no_grad()
def reference_ddim_sample(model: Callable, schedule: Schedule, shape, *, eta: float = 0.0, clip: bool = False,
                          direction: str = "rederived", generator: Optional[torch.Generator] = None,
                          device="cpu") -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) from the paper's formulas, for an eps-predicting model: the
    oracle for the DDIM sampler. On a respaced ``schedule``, abar_prev is that of the previous kept step.

    ``x0 = (x - sqrt(1 - abar) eps) / sqrt(abar)`` (clipped to [-1, 1] when asked);
    ``sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev)``;
    ``x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps' + sigma z``, with eps' the
    model's eps (``direction="model"``, diffusers' default) or re-derived from the clipped x0
    (``"rederived"``). Noise order: ``x_T``, then one draw per step with sigma > 0.
    """
    x = torch.randn(shape, generator=generator, device=device)
    for i in reversed(range(schedule.T)):
        abar, abar_prev = float(schedule.abar[i]), float(schedule.abar_prev[i])
        t = torch.full((shape[0],), int(schedule.timesteps[i]), dtype=torch.int64, device=device)
        eps = model(x, t).double()
        xd = x.double()
        x0 = (xd - (1 - abar) ** 0.5 * eps) / abar**0.5
        if clip:
            x0 = x0.clamp(-1, 1)
        if direction == "rederived":
            eps = (xd - abar**0.5 * x0) / (1 - abar) ** 0.5
        sigma = eta * ((1 - abar_prev) / (1 - abar)) ** 0.5 * (1 - abar / abar_prev) ** 0.5
        out = abar_prev**0.5 * x0 + max(1 - abar_prev - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            out = out + sigma * torch.randn(shape, generator=generator, device=device).double()
        x = out.float()
    return x
