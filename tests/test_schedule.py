"""Schedule tables against closed forms, the forward process, the posterior and step coefficients."""

import math

import pytest
import torch

from fastddpm import Schedule, ScheduleConfig
from fastddpm.diffusion import q_posterior, q_sample, q_step
from fastddpm.schedule import even_timesteps

SCHEDULES = [Schedule.linear(), Schedule.cosine(), Schedule.quadratic(), Schedule.linear(T=10, beta_end=0.3)]


def test_linear_schedule_is_the_papers():
    s = Schedule.linear()
    assert s.T == 1000 and s.betas.dtype == torch.float64
    assert s.betas[0].item() == pytest.approx(1e-4, abs=1e-18)
    assert s.betas[-1].item() == pytest.approx(0.02, abs=1e-18)
    assert torch.allclose(s.betas[1:] - s.betas[:-1], torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: repr(s))
def test_tables_match_closed_forms(s):
    abar = torch.tensor([math.prod(1 - b for b in s.betas[: t + 1].tolist()) for t in range(s.T)],
                        dtype=torch.float64)
    assert torch.allclose(s.abar, abar, rtol=1e-12, atol=0)
    assert s.abar_prev[0] == 1 and torch.equal(s.abar_prev[1:], s.abar[:-1])
    assert torch.allclose(s.sqrt_recip_abar, 1 / abar.sqrt(), rtol=1e-12)
    assert torch.allclose(s.sqrt_recipm1_abar, (1 / abar - 1).sqrt(), rtol=1e-12)
    beta, abar_prev = s.betas, s.abar_prev
    assert torch.allclose(s.posterior_c0, beta * abar_prev.sqrt() / (1 - abar), rtol=1e-12)
    assert torch.allclose(s.posterior_ct, (1 - abar_prev) * (1 - beta).sqrt() / (1 - abar), rtol=1e-12)
    assert torch.allclose(s.var_small, beta * (1 - abar_prev) / (1 - abar), rtol=1e-12)
    assert s.var_small[0] == 0
    assert s.var_large[0] == s.var_small[1] and torch.equal(s.var_large[1:], beta[1:])


def test_cosine_and_quadratic_closed_forms():
    c = Schedule.cosine(T=1000)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):
        assert c.abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    q = Schedule.quadratic(T=100)
    assert torch.allclose(q.betas.sqrt(), torch.linspace(1e-2, 0.02**0.5, 100, dtype=torch.float64), rtol=1e-12)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="kind"):
        Schedule.from_config(ScheduleConfig(kind="exponential"))
    with pytest.raises(ValueError, match="T"):
        Schedule.linear(T=0)
    with pytest.raises(ValueError, match="betas"):
        Schedule(torch.tensor([0.1, 1.5]))


def test_closed_form_q_sample_equals_iterated_forward_process():
    s = Schedule.linear(T=1000)
    g = torch.Generator().manual_seed(0)
    n = 40000
    x0 = torch.tensor([0.8, -0.5, 0.0]).repeat(n, 1)
    x = x0.clone()
    checkpoints = {50: None, 300: None, 999: None}
    for t in range(1000):
        x = q_step(s, x, t, generator=g)
        if t in checkpoints:
            checkpoints[t] = x.clone()
    for t, xt_iter in checkpoints.items():
        xt_closed, _ = q_sample(s, x0, torch.full((n,), t), generator=g)
        mean, var = s.sqrt_abar[t].item() * x0[0], 1 - s.abar[t].item()
        se_mean, se_var = (var / n) ** 0.5, var * (2 / n) ** 0.5
        for sample in (xt_iter, xt_closed):
            assert torch.allclose(sample.mean(0).double(), mean.double(), atol=5 * se_mean)
            assert torch.allclose(sample.var(0).double(), torch.full((3,), var, dtype=torch.float64),
                                  atol=5 * se_var)


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_posterior_is_bayes_rule(t):
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0), integrated numerically on a grid."""
    s = Schedule.linear()
    x0, xt = 0.3, -0.7
    grid = torch.linspace(-8, 8, 400001, dtype=torch.float64)
    beta, abar_prev = s.betas[t], s.abar_prev[t]
    log_lik = -((xt - (1 - beta).sqrt() * grid) ** 2) / (2 * beta)
    log_prior = -((grid - abar_prev.sqrt() * x0) ** 2) / (2 * (1 - abar_prev))
    w = torch.softmax(log_lik + log_prior, 0)
    num_mean = (w * grid).sum()
    num_var = (w * (grid - num_mean) ** 2).sum()
    mean, var = q_posterior(s, torch.tensor([[x0]], dtype=torch.float64),
                            torch.tensor([[xt]], dtype=torch.float64), t)
    assert mean.item() == pytest.approx(num_mean.item(), rel=1e-6, abs=1e-9)
    assert var.item() == pytest.approx(num_var.item(), rel=1e-5)


def _apply(coeffs, t, x, m, clip=None):
    p, q, m1, m2, m3, s = coeffs[t]
    x0 = p * x - q * m
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    return m1 * x0 + m2 * x + m3 * m, s


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_coefficients_reproduce_algorithm_2(variance):
    s = Schedule.linear()
    coeffs = s.step_coefficients("ddpm", variance=variance)
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(64, generator=g, dtype=torch.float64), torch.randn(64, generator=g, dtype=torch.float64)
    for t in (0, 1, 7, 500, 999):
        out, sd = _apply(coeffs, t, x, eps)
        textbook = (x - s.betas[t] / (1 - s.abar[t]).sqrt() * eps) / s.alphas[t].sqrt()
        assert torch.allclose(out, textbook, rtol=1e-13, atol=1e-13)
        expected_sd = 0.0 if t == 0 else s.variance(variance)[t].sqrt()
        assert sd.item() == pytest.approx(float(expected_sd), rel=1e-15, abs=0)


def test_ddpm_coefficients_with_clipping_give_clipped_posterior_mean():
    s = Schedule.linear()
    coeffs = s.step_coefficients("ddpm")
    g = torch.Generator().manual_seed(2)
    x, eps = 3 * torch.randn(64, generator=g, dtype=torch.float64), torch.randn(64, generator=g, dtype=torch.float64)
    for t in (1, 100, 999):
        out, _ = _apply(coeffs, t, x, eps, clip=1.0)
        x0 = ((x - (1 - s.abar[t]).sqrt() * eps) / s.abar[t].sqrt()).clamp(-1, 1)
        mean, _ = q_posterior(s, x0[:, None], x[:, None], torch.full((64,), t))
        assert torch.allclose(out, mean[:, 0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_x0_and_eps_coefficients_invert_the_forward_process(prediction):
    s = Schedule.cosine(T=100)
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(100, 8, generator=g, dtype=torch.float64), torch.randn(100, 8, generator=g, dtype=torch.float64)
    a, b = s.sqrt_abar[:, None], s.sqrt_one_minus_abar[:, None]
    xt = a * x0 + b * eps
    m = {"eps": eps, "x0": x0, "v": a * eps - b * x0}[prediction]
    p, q = s.x0_coefficients(prediction)
    assert torch.allclose(p[:, None] * xt - q[:, None] * m, x0, atol=1e-9)
    ax, am = s.eps_coefficients(prediction)
    assert torch.allclose(ax[:, None] * xt + am[:, None] * m, eps, atol=1e-9)


def test_ddim_eta_one_is_ddpm_fixed_small():
    s = Schedule.linear()
    ddim = s.step_coefficients("ddim", eta=1.0)
    ddpm = s.step_coefficients("ddpm", variance="fixed_small")
    assert torch.allclose(ddim, ddpm, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_direction_forms_coincide_without_clipping(prediction, eta):
    s = Schedule.linear(T=50)
    a = s.step_coefficients("ddim", eta=eta, prediction=prediction, ddim_direction="rederived")
    b = s.step_coefficients("ddim", eta=eta, prediction=prediction, ddim_direction="model")
    g = torch.Generator().manual_seed(4)
    x, m = torch.randn(32, generator=g, dtype=torch.float64), torch.randn(32, generator=g, dtype=torch.float64)
    for t in range(50):
        assert torch.allclose(_apply(a, t, x, m)[0], _apply(b, t, x, m)[0], atol=1e-10)


def test_ddim_eta_zero_is_the_deterministic_ddim_update():
    s = Schedule.linear()
    c = s.step_coefficients("ddim", eta=0.0)
    g = torch.Generator().manual_seed(5)
    x, eps = torch.randn(16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    for t in (0, 10, 999):
        x0 = (x - (1 - s.abar[t]).sqrt() * eps) / s.abar[t].sqrt()
        ddim = s.abar_prev[t].sqrt() * x0 + (1 - s.abar_prev[t]).sqrt() * eps
        assert torch.allclose(_apply(c, t, x, eps)[0], ddim, atol=1e-10)
        assert c[t, 5] == 0


def test_respacing_keeps_the_marginals():
    s = Schedule.linear()
    ts = even_timesteps(1000, 50)
    assert ts[0] == 0 and ts[-1] == 999 and len(ts) == 50 and bool((ts[1:] > ts[:-1]).all())
    r = s.respaced(50)
    assert r.T == 50 and torch.equal(r.timesteps, ts)
    assert torch.allclose(r.abar, s.abar[ts], rtol=1e-12)
    assert s.respaced(1000) is s
    with pytest.raises(ValueError, match="steps"):
        s.respaced(1001)
    with pytest.raises(ValueError, match="timesteps"):
        s.respace([5, 3])


def test_device_tables_are_float32_and_cached():
    s = Schedule.linear()
    a = s.table("step", "cpu", sampler="ddpm", variance="fixed_small")
    assert a.dtype == torch.float32 and a.shape == (1000, 6)
    assert s.table("step", "cpu", sampler="ddpm", variance="fixed_small") is a
    assert s.table("noising", "cpu").shape == (1000, 2)
    with pytest.raises(ValueError, match="variance"):
        s.step_coefficients("ddpm", variance="learned")
    with pytest.raises(ValueError, match="eta"):
        s.step_coefficients("ddim", eta=2.0)
