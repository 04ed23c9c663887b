"""Noise schedules and every table derived from them — the one source of truth for DDPM math.

Index ``t`` runs ``0..T-1`` (the paper's ``1..T``). All tables are computed once in float64; float32
copies are cached per device the first time a device asks (:meth:`Schedule.table`).

Notation (Ho et al. 2020, eqs. 4, 6, 7)::

    beta[t]                       the schedule
    alpha[t]     = 1 - beta[t]
    abar[t]      = prod(alpha[:t+1])          abar_prev[t] = abar[t-1], abar_prev[0] = 1
    q(x_t|x_0):    x_t  = sqrt(abar) x_0 + sqrt(1 - abar) eps
    x0 from eps:   x_0  = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps
    posterior:     mean = c0 x_0 + ct x_t
                   c0 = beta sqrt(abar_prev) / (1 - abar),  ct = (1 - abar_prev) sqrt(alpha) / (1 - abar)
                   var_small = beta (1 - abar_prev) / (1 - abar)      ("fixed_small")
                   var_large = beta, var_large[0] = var_small[1]      ("fixed_large")

Every sampler step is the same affine update (DESIGN.md section 2), driven by six per-step scalars::

    x0  = p * x - q * m                         (m = model output; optionally clipped to [-r, r])
    out = m1 * x0 + m2 * x + m3 * m + s * z     (z ~ N(0, I); s = 0 at the last step)

:meth:`Schedule.step_coefficients` derives them for DDPM and DDIM, for eps-, x0- and v-prediction.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

KINDS = ("linear", "cosine", "quadratic")
VARIANCES = ("fixed_small", "fixed_large")
PREDICTIONS = ("eps", "x0", "v")
DDIM_DIRECTIONS = ("rederived", "model")
# The longest schedule a config may describe (the literature uses at most a few thousand steps).
MAX_T = 100_000

# Column order of the step-coefficient table seen by the ddpm_step op.
STEP_COLUMNS = ("p", "q", "m1", "m2", "m3", "s")
# Column order of the noising table seen by the q_sample op.
NOISING_COLUMNS = ("sqrt_abar", "sqrt_one_minus_abar")


@dataclass(frozen=True)
class ScheduleConfig:
    """Serializable description of a beta schedule (what checkpoints store)."""

    kind: str = "linear"
    T: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    cosine_s: float = 0.008

    def to_dict(self) -> dict:
        """Return a JSON-serializable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ScheduleConfig":
        """Build from :meth:`to_dict` output (e.g. a checkpoint's), rejecting unknown keys, a ``T``
        above :data:`MAX_T` (every table has ``T`` entries) and non-numeric betas."""
        if not isinstance(d, dict):
            raise TypeError(f"schedule config: expected a dict, got {type(d).__name__}")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"schedule config: unknown keys {sorted(unknown)}")
        config = cls(**d)
        if not isinstance(config.T, int) or isinstance(config.T, bool) or not 1 <= config.T <= MAX_T:
            raise ValueError(f"T: expected an int in [1, {MAX_T}], got {config.T!r}")
        for name in ("beta_start", "beta_end", "cosine_s"):
            value = getattr(config, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{name}: expected a finite float, got {value!r}")
        return config


def make_betas(config: ScheduleConfig) -> torch.Tensor:
    """Return the float64 betas of ``config`` (shape ``[T]``)."""
    if config.kind not in KINDS:
        raise ValueError(f"schedule kind: expected one of {KINDS}, got {config.kind!r}")
    if not isinstance(config.T, int) or config.T < 1:
        raise ValueError(f"T: expected a positive int, got {config.T!r}")
    T = config.T
    if config.kind == "linear":
        return torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float64)
    if config.kind == "quadratic":
        return torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=torch.float64) ** 2
    # cosine (Nichol & Dhariwal 2021, eq. 17), betas clipped at 0.999
    s = config.cosine_s
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)


def even_timesteps(T: int, steps: int) -> torch.Tensor:
    """Evenly spaced subset of ``steps`` indices of ``0..T-1``, always containing 0 and T-1.

    This is improved-diffusion's ``space_timesteps(T, [steps])`` for a single section.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= T:
        raise ValueError(f"steps: expected an int in [1, {T}], got {steps!r}")
    if steps == 1:
        return torch.tensor([T - 1], dtype=torch.int64)
    stride = (T - 1) / (steps - 1)
    return torch.tensor([round(i * stride) for i in range(steps)], dtype=torch.int64)


class Schedule:
    """All float64 tables of a DDPM noise schedule, plus step coefficients for every sampler.

    ``timesteps`` maps this schedule's index to the model's timestep: the identity for a full
    schedule, the chosen subset for a respaced one (:meth:`respace`).
    """

    def __init__(self, betas: torch.Tensor, timesteps: Optional[torch.Tensor] = None,
                 config: Optional[ScheduleConfig] = None):
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() < 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas: expected a non-empty sequence with every value in (0, 1)")
        self.config = config
        self.betas = betas
        self.T = betas.numel()
        self.timesteps = (torch.arange(self.T, dtype=torch.int64) if timesteps is None
                          else torch.as_tensor(timesteps, dtype=torch.int64))
        self.alphas = 1.0 - betas
        self.abar = torch.cumprod(self.alphas, 0)
        self.abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.abar[:-1]])
        self.sqrt_abar = self.abar.sqrt()
        self.sqrt_one_minus_abar = (1.0 - self.abar).sqrt()
        self.sqrt_recip_abar = (1.0 / self.abar).sqrt()
        self.sqrt_recipm1_abar = (1.0 / self.abar - 1.0).sqrt()
        self.posterior_c0 = betas * self.abar_prev.sqrt() / (1.0 - self.abar)
        self.posterior_ct = (1.0 - self.abar_prev) * self.alphas.sqrt() / (1.0 - self.abar)
        self.var_small = betas * (1.0 - self.abar_prev) / (1.0 - self.abar)
        self.var_large = betas.clone()
        if self.T > 1:
            self.var_large[0] = self.var_small[1]
        # log of var_small with the t=0 entry (which is 0) replaced, as improved-diffusion does
        self.log_var_small_clipped = torch.log(torch.cat([self.var_small[1:2], self.var_small[1:]])
                                               if self.T > 1 else self.var_large)
        self._device_cache: Dict[Tuple[str, str], torch.Tensor] = {}

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: Optional[ScheduleConfig] = None, **kwargs) -> "Schedule":
        """Build from a :class:`ScheduleConfig` (or its fields as keyword arguments)."""
        if config is None:
            config = ScheduleConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a ScheduleConfig or keyword fields, not both")
        return cls(make_betas(config), config=config)

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "Schedule":
        """The paper's schedule: betas linear from 1e-4 to 0.02 over T=1000 steps."""
        return cls.from_config(ScheduleConfig("linear", T, beta_start, beta_end))

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008) -> "Schedule":
        """Nichol & Dhariwal's cosine schedule."""
        return cls.from_config(ScheduleConfig("cosine", T, cosine_s=s))

    @classmethod
    def quadratic(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "Schedule":
        """Betas whose square roots are linear from sqrt(beta_start) to sqrt(beta_end)."""
        return cls.from_config(ScheduleConfig("quadratic", T, beta_start, beta_end))

    def respace(self, timesteps: Sequence[int]) -> "Schedule":
        """A schedule on a subset of timesteps, with betas recomputed from abar on that subset.

        This is improved-diffusion's respacing: ``abar`` of the new schedule equals ``abar`` of this
        one at the kept indices, so the marginals q(x_t | x_0) are unchanged.
        """
        ts = torch.as_tensor(list(timesteps) if not torch.is_tensor(timesteps) else timesteps,
                             dtype=torch.int64).flatten()
        if ts.numel() < 1 or int(ts.min()) < 0 or int(ts.max()) >= self.T:
            raise ValueError(f"timesteps: expected indices in [0, {self.T}), got {ts.tolist()}")
        if ts.numel() > 1 and not bool((ts[1:] > ts[:-1]).all()):
            raise ValueError("timesteps: expected strictly increasing indices")
        abar = self.abar[ts]
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        return Schedule(1.0 - abar / abar_prev, timesteps=self.timesteps[ts], config=self.config)

    def respaced(self, steps: int) -> "Schedule":
        """This schedule on ``steps`` evenly spaced timesteps (itself when ``steps == T``)."""
        if steps == self.T:
            return self
        return self.respace(even_timesteps(self.T, steps))

    # ------------------------------------------------------------------------------ coefficients
    def variance(self, variance: str) -> torch.Tensor:
        """The float64 reverse-process variance table for ``fixed_small`` or ``fixed_large``."""
        if variance == "fixed_small":
            return self.var_small
        if variance == "fixed_large":
            return self.var_large
        raise ValueError(f"variance: expected one of {VARIANCES}, got {variance!r}")

    def x0_coefficients(self, prediction: str = "eps") -> Tuple[torch.Tensor, torch.Tensor]:
        """(p, q) such that ``x0 = p * x_t - q * model_output`` for the given prediction type."""
        if prediction == "eps":
            return self.sqrt_recip_abar, self.sqrt_recipm1_abar
        if prediction == "x0":
            return torch.zeros_like(self.abar), -torch.ones_like(self.abar)
        if prediction == "v":  # x0 = sqrt(abar) x_t - sqrt(1 - abar) v
            return self.sqrt_abar, self.sqrt_one_minus_abar
        raise ValueError(f"prediction: expected one of {PREDICTIONS}, got {prediction!r}")

    def eps_coefficients(self, prediction: str = "eps") -> Tuple[torch.Tensor, torch.Tensor]:
        """(a_x, a_m) such that the model's own eps is ``a_x * x_t + a_m * model_output``."""
        if prediction == "eps":
            return torch.zeros_like(self.abar), torch.ones_like(self.abar)
        if prediction == "x0":  # eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)
            return 1.0 / self.sqrt_one_minus_abar, -self.sqrt_abar / self.sqrt_one_minus_abar
        if prediction == "v":  # eps = sqrt(abar) v + sqrt(1 - abar) x_t
            return self.sqrt_one_minus_abar, self.sqrt_abar
        raise ValueError(f"prediction: expected one of {PREDICTIONS}, got {prediction!r}")

    def step_coefficients(self, sampler: str = "ddpm", *, variance: str = "fixed_large",
                          prediction: str = "eps", eta: float = 0.0,
                          ddim_direction: str = "rederived") -> torch.Tensor:
        """The ``[T, 6]`` float64 table of (p, q, m1, m2, m3, s) for one sampler.

        sampler="ddpm": ancestral sampling (Algorithm 2) with ``variance`` fixed_small or fixed_large.
        sampler="ddim": DDIM with noise scale ``eta`` in [0, 1]. ``ddim_direction="rederived"``
        points the direction along eps re-derived from the (possibly clipped) x0;
        ``"model"`` uses the model's own eps, as diffusers' DDIMScheduler does by default.
        Clipping x0 is a property of the step op, not of these coefficients. ``s`` is 0 at t=0.
        """
        p, q = self.x0_coefficients(prediction)
        zero = torch.zeros_like(self.abar)
        if sampler == "ddpm":
            m1, m2, m3 = self.posterior_c0, self.posterior_ct, zero
            s = self.variance(variance).sqrt()
        elif sampler == "ddim":
            if not (isinstance(eta, (int, float)) and 0.0 <= eta <= 1.0):
                raise ValueError(f"eta: expected a float in [0, 1], got {eta!r}")
            sigma = eta * self.var_small.sqrt()
            direction = (1.0 - self.abar_prev - sigma**2).clamp(min=0.0).sqrt()
            if ddim_direction == "rederived":
                # eps' = (x - sqrt(abar) x0) / sqrt(1 - abar), linear in x and the clipped x0
                m2 = direction / self.sqrt_one_minus_abar
                m1 = self.abar_prev.sqrt() - m2 * self.sqrt_abar
                m3 = zero
            elif ddim_direction == "model":
                a_x, a_m = self.eps_coefficients(prediction)
                m1, m2, m3 = self.abar_prev.sqrt(), direction * a_x, direction * a_m
            else:
                raise ValueError(f"ddim_direction: expected one of {DDIM_DIRECTIONS}, "
                                 f"got {ddim_direction!r}")
            s = sigma
        else:
            raise ValueError(f"sampler: expected 'ddpm' or 'ddim', got {sampler!r}")
        s = s.clone()
        s[0] = 0.0  # no noise is added at t = 0
        return torch.stack([p, q, m1, m2, m3, s], dim=1)

    def noising_table(self) -> torch.Tensor:
        """The ``[T, 2]`` float64 table of (sqrt(abar), sqrt(1 - abar)) used by q_sample."""
        return torch.stack([self.sqrt_abar, self.sqrt_one_minus_abar], dim=1)

    def table(self, name: str, device, **kwargs) -> torch.Tensor:
        """A float32 copy of a named table on ``device``, cached after the first request.

        ``name`` is ``"noising"`` or ``"step"`` (``kwargs`` go to :meth:`step_coefficients`).
        """
        device = torch.device(device)
        key = (name, repr(sorted(kwargs.items())), str(device))
        cached = self._device_cache.get(key)
        if cached is None:
            if name == "noising":
                full = self.noising_table()
            elif name == "step":
                full = self.step_coefficients(**kwargs)
            else:
                raise ValueError(f"name: expected 'noising' or 'step', got {name!r}")
            cached = full.to(device=device, dtype=torch.float32).contiguous()
            self._device_cache[key] = cached
        return cached

    def __repr__(self) -> str:
        kind = self.config.kind if self.config else "custom"
        return f"Schedule(kind={kind!r}, T={self.T})"
