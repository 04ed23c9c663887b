"""The variational bound in bits/dim (fastddpm.likelihood): its formulas against independent closed
forms, its parts, the batched fast path against the per-t oracle, analytic models whose bound is
known exactly, the bundled model on MNIST, the CLI and the errors."""

import math

import numpy as np
import pytest
import torch

import fastddpm
from fastddpm import DDPM
from fastddpm.cli import main
from fastddpm.likelihood import (bits_per_dim, discretized_gaussian_log_likelihood, mnist_images, normal_kl,
                                 reference_bits_per_dim)

LN2 = math.log(2.0)


def _images_8bit(n, shape=(1, 8, 8), seed=0):
    """Random 8-bit images in [-1, 1] (pixel k as k / 127.5 - 1), edge values included."""
    k = torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed)).float()
    k.view(n, -1)[:, :2] = torch.tensor([0.0, 255.0])
    return k / 127.5 - 1.0


class GaussianOptimalEps:
    """The optimal eps-predictor for data x0 ~ N(mu, s^2 I) under ``schedule``:
    ``eps*(x_t) = sqrt(1 - abar)(x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar)`` (s = 0: a point mass
    at mu, where eps* is the true noise and the predicted x0 is mu exactly)."""

    def __init__(self, schedule, mu, s):
        self.abar = schedule.abar
        self.mu, self.s = torch.as_tensor(mu, dtype=torch.float64), s

    def __call__(self, x, t):
        a = self.abar[t].reshape(-1, *([1] * (x.dim() - 1)))
        eps = (1 - a).sqrt() * (x.double() - a.sqrt() * self.mu) / (a * self.s**2 + 1 - a)
        return eps.float()


def _closed_form_tables(schedule):
    """abar, abar_prev, betas in float64 numpy, recomputed from the betas (not from the Schedule's tables)."""
    betas = schedule.betas.numpy().astype(np.float64)
    abar = np.cumprod(1.0 - betas)
    return betas, abar, np.concatenate([[1.0], abar[:-1]])


def _expected_terms(schedule, variance, s, mu2):
    """Expected bound parts in nats per dim for data x0 ~ N(mu, s^2) per pixel (mu2 = mu^2) under
    the optimal model: (prior, [KL_i for i = 1..T-1], decoder variance sigma0^2, tau0^2).

    KL_i = 0.5 (v_q / v_m - 1 - log(v_q / v_m)) + 0.5 c0^2 tau_i^2 / v_m, where the means differ by
    c0 (x0 - E[x0 | x_i]) and tau_i^2 = Var(x0 | x_i) = s^2 (1 - abar) / (abar s^2 + 1 - abar)."""
    betas, abar, abar_prev = _closed_form_tables(schedule)
    T = len(betas)
    v_q = betas * (1 - abar_prev) / (1 - abar)
    v_m = betas.copy() if variance == "fixed_large" else v_q.copy()
    v_m[0] = v_q[1]  # the decoder's variance, for both choices
    c0 = betas * np.sqrt(abar_prev) / (1 - abar)
    tau2 = s**2 * (1 - abar) / (abar * s**2 + 1 - abar)
    kl = [0.5 * (v_q[i] / v_m[i] - 1 - math.log(v_q[i] / v_m[i])) + 0.5 * c0[i] ** 2 * tau2[i] / v_m[i]
          for i in range(1, T)]
    a = abar[-1]
    prior = 0.5 * (a * (mu2 + s**2) + (1 - a) - 1 - math.log(1 - a))
    return prior, np.array(kl), v_m[0], tau2[0]


def _phi(z):
    return 0.5 * math.erfc(-z / math.sqrt(2.0))  # accurate far into the lower tail


# ------------------------------------------------------------------------------------- formulas
def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    lv1, lv2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                                 torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-12, atol=1e-12)
    assert float(normal_kl(m1, lv1, m1, lv1).abs().max()) == 0.0  # equal Gaussians: exactly zero


@pytest.mark.parametrize("mean,scale", [(0.0, 0.01), (0.3, 0.004), (-0.99, 0.2), (1.0, 3.0), (0.05, 1e-4)])
def test_discretized_likelihood_is_a_distribution_over_the_256_bins(mean, scale):
    """The 256 bin probabilities sum to 1, and each equals the normal CDF difference (math.erf)."""
    x = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0
    logp = discretized_gaussian_log_likelihood(x, torch.tensor(mean, dtype=torch.float64),
                                               torch.tensor(math.log(scale), dtype=torch.float64))
    assert torch.isfinite(logp).all()
    assert abs(float(logp.exp().sum()) - 1.0) < 1e-10
    h = 1 / 255
    for k in (0, 1, 100, 127, 128, 254, 255):
        xk = k / 127.5 - 1.0
        lo = 0.0 if k == 0 else _phi((xk - h - mean) / scale)
        hi = 1.0 if k == 255 else _phi((xk + h - mean) / scale)
        if hi - lo > 1e-200:
            assert abs(float(logp[k].exp()) - (hi - lo)) < 1e-12


def test_discretized_likelihood_stays_finite_far_in_the_tails():
    """Bins 50 standard deviations from the mean: finite log-probabilities (no 1e-12 floor), with
    the Gaussian tail's asymptotics log p ~ -z^2 / 2."""
    x = torch.tensor([0.5, -0.5, 1.0, -1.0], dtype=torch.float64)
    logp = discretized_gaussian_log_likelihood(x, torch.zeros(4, dtype=torch.float64),
                                               torch.full((4,), math.log(0.01), dtype=torch.float64))
    assert torch.isfinite(logp).all()
    z = (0.5 - 1 / 255) / 0.01
    assert -0.5 * z * z - math.log(z) - 2 < float(logp[0]) < -0.5 * z * z
    assert float(logp[0]) == pytest.approx(float(logp[1]), rel=1e-12)


# ---------------------------------------------------------------------------------- the bound
@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_parts_add_up_and_kl_terms_are_nonnegative(tiny_unet, short_schedule, variance):
    x0 = _images_8bit(3)
    r = bits_per_dim(DDPM(tiny_unet, short_schedule), x0, variance=variance, progress=False)
    T = short_schedule.T
    assert r.total.shape == r.prior.shape == r.decoder.shape == (3,) and r.terms.shape == (3, T)
    assert torch.isfinite(r.terms).all() and bool((r.terms[:, 1:] >= 0).all()) and bool((r.prior >= 0).all())
    torch.testing.assert_close(r.total, r.prior + r.terms[:, 1:].sum(1) + r.decoder, rtol=0, atol=1e-6)
    torch.testing.assert_close(r.decoder, r.terms[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(r.kl, r.terms[:, 1:].sum(1), rtol=0, atol=0)
    m = r.mean()
    assert m["total"] == pytest.approx(m["prior"] + m["kl"] + m["decoder"], abs=1e-9)
    assert "bits/dim" in str(r)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_batched_fast_path_equals_the_per_t_reference(tiny_unet, short_schedule, prediction, variance):
    """Same seed, so the same x_t draws; batches of 7 pairs cut the timesteps anywhere."""
    x0 = _images_8bit(3)
    fast = bits_per_dim(DDPM(tiny_unet, short_schedule, prediction), x0, variance=variance, batch_t=7,
                        seed=3, progress=False)
    ref = reference_bits_per_dim(tiny_unet, short_schedule, x0, prediction=prediction, variance=variance, seed=3)
    # a random net read as an x0- or v-predictor makes terms of hundreds of bits/dim, where float32
    # rounding alone exceeds 1e-4 absolute: there the check is relative
    rtol = 0 if prediction == "eps" else 1e-5
    torch.testing.assert_close(fast.terms, ref.terms, rtol=rtol, atol=1e-4)
    torch.testing.assert_close(fast.total, ref.total, rtol=rtol, atol=1e-4)
    torch.testing.assert_close(fast.prior, ref.prior, rtol=0, atol=1e-12)


def test_batch_size_layout_and_generator_do_not_change_the_draws(tiny_unet, short_schedule):
    ddpm = DDPM(tiny_unet, short_schedule)
    x0 = _images_8bit(4)
    a = bits_per_dim(ddpm, x0, batch_t=5, progress=False)  # default seed 0
    b = bits_per_dim(ddpm, x0, batch_t=80, channels_last=False, progress=False,
                     generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.terms, b.terms, rtol=0, atol=1e-5)
    c = bits_per_dim(ddpm, x0, batch_t=80, seed=1, progress=False)
    assert float((c.terms - a.terms).abs().max()) > 1e-4  # another seed: other draws


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_point_mass_data_gives_the_exact_closed_form(short_schedule, variance):
    """Data that is one image x*: the optimal model predicts x0 = x* from every x_t, so the bound
    has no randomness: prior 0.5 (abar_T x*^2 + (1 - abar_T) - 1 - log(1 - abar_T)), KL terms from the
    variance mismatch alone, and the decoder -log of the mass N(x*, sigma0^2) puts on x*'s bin
    (interior: erf(h / (sigma0 sqrt 2)); edge bins: Phi(h / sigma0))."""
    k = torch.tensor([0, 255, 1, 254, 17, 64, 127, 128, 200, 3, 90, 160, 31, 222, 250, 5], dtype=torch.float64)
    x_star = (k / 127.5 - 1.0).reshape(1, 1, 4, 4)
    x0 = x_star.float().repeat(2, 1, 1, 1)
    model = GaussianOptimalEps(short_schedule, x_star, 0.0)
    r = bits_per_dim(DDPM(model, short_schedule), x0, variance=variance, progress=False)

    betas, abar, abar_prev = _closed_form_tables(short_schedule)
    prior_nats, kl_nats, sigma0_sq, _ = _expected_terms(short_schedule, variance, 0.0, 0.0)
    a = abar[-1]
    prior_nats = float(np.mean(0.5 * (a * x_star.numpy() ** 2 + (1 - a) - 1 - math.log(1 - a))))
    h, sigma0 = 1 / 255, math.sqrt(sigma0_sq)
    edge = ((k == 0) | (k == 255)).numpy()
    decoder_nats = float(np.mean(np.where(edge, -math.log(_phi(h / sigma0)), -math.log(math.erf(h / (sigma0 * 2**0.5))))))
    assert np.allclose(r.prior.numpy(), prior_nats / LN2, rtol=0, atol=1e-9)
    assert np.allclose(r.terms[:, 1:].numpy(), kl_nats / LN2, rtol=0, atol=1e-6)
    assert np.allclose(r.decoder.numpy(), decoder_nats / LN2, rtol=0, atol=1e-6)
    total = (prior_nats + kl_nats.sum() + decoder_nats) / LN2
    assert np.allclose(r.total.numpy(), total, rtol=0, atol=1e-6)
    if variance == "fixed_small":  # the model's variance is the posterior's: every KL vanishes
        assert float(r.terms[:, 1:].abs().max()) < 1e-9


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_every_term_of_the_gaussian_optimal_model_equals_its_closed_form(short_schedule, variance):
    """Per (image, t) pair, given the x_t draws (the documented order: one ``torch.randn`` of
    [N, C, H, W] for t = T-1, ..., 0 from the seed): with the Gaussian-optimal model (mu 0.1, s 0.3),
    whose predicted x0 is the posterior mean of Bayes' rule m(x_t) = mu + s^2 sqrt(abar)
    (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar), each KL term is per pixel
    0.5 (v_q / v_m - 1 - log(v_q / v_m)) + 0.5 c0^2 (x0 - m(x_t))^2 / v_m, and the decoder
    -log(Phi((x0 + h - m) / sigma0) - Phi((x0 - h - m) / sigma0)) with open edge bins. Agreement up to
    the float32 rounding of the fast path's x_t."""
    mu, s, seed = 0.1, 0.3, 5
    x0 = _images_8bit(4, (1, 4, 4), seed=1)
    model = GaussianOptimalEps(short_schedule, mu, s)
    r = bits_per_dim(DDPM(model, short_schedule), x0, variance=variance, batch_t=13, seed=seed, progress=False)

    betas, abar, abar_prev = _closed_form_tables(short_schedule)
    v_q = betas * (1 - abar_prev) / (1 - abar)
    v_m = betas.copy() if variance == "fixed_large" else v_q.copy()
    v_m[0] = v_q[1]
    c0 = betas * np.sqrt(abar_prev) / (1 - abar)
    g, xd, h = torch.Generator().manual_seed(seed), x0.double(), 1 / 255
    for i in reversed(range(short_schedule.T)):
        z = torch.randn(x0.shape, generator=g).double()
        x_t = math.sqrt(abar[i]) * xd + math.sqrt(1 - abar[i]) * z
        m = mu + s**2 * math.sqrt(abar[i]) * (x_t - math.sqrt(abar[i]) * mu) / (abar[i] * s**2 + 1 - abar[i])
        if i > 0:
            ratio = v_q[i] / v_m[i]
            nats = 0.5 * (ratio - 1 - math.log(ratio)) + 0.5 * c0[i] ** 2 * (xd - m) ** 2 / v_m[i]
        else:
            sigma0 = math.sqrt(v_m[0])
            hi = torch.where(xd > 0.999, torch.ones_like(xd), torch.special.ndtr((xd + h - m) / sigma0))
            lo = torch.where(xd < -0.999, torch.zeros_like(xd), torch.special.ndtr((xd - h - m) / sigma0))
            nats = -torch.log(hi - lo)
        torch.testing.assert_close(r.terms[:, i], nats.flatten(1).mean(1) / LN2, rtol=1e-4, atol=1e-7)


def test_gaussian_data_matches_the_expected_bound(short_schedule):
    """Data x0 ~ N(0, s^2 I) with the optimal eps-predictor: the mean bound over many images matches
    its expectation — every KL term in closed form, the prior in closed form, the decoder as a 1-D
    Gauss-Hermite integral over x0 - E[x0 | x_1] ~ N(0, tau0^2) — within 1e-3 bits/dim. The decoder's
    spread dominates the Monte Carlo error; s = 0.01 and 1024 images of 32x32 put its standard error
    below a quarter of the tolerance (checked). (The per-pair test above covers a wide s exactly.)"""
    s, N = 0.01, 1024
    x0 = (s * torch.randn(N, 1, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)).float()
    model = GaussianOptimalEps(short_schedule, 0.0, s)
    r = bits_per_dim(DDPM(model, short_schedule), x0, batch_t=4096, seed=2, progress=False)

    prior_nats, kl_nats, sigma0_sq, tau0_sq = _expected_terms(short_schedule, "fixed_large", s, 0.0)
    z, w = np.polynomial.hermite_e.hermegauss(120)
    h, sigma0, tau0 = 1 / 255, math.sqrt(sigma0_sq), math.sqrt(tau0_sq)
    # the integrand is even in delta: on the negative side both CDF values are small (no cancellation)
    bins = [-math.log(_phi((h - tau0 * abs(zi)) / sigma0) - _phi((-h - tau0 * abs(zi)) / sigma0)) for zi in z]
    decoder_nats = float(np.dot(w, bins) / math.sqrt(2 * math.pi))
    expected_total = (prior_nats + kl_nats.sum() + decoder_nats) / LN2

    se = float(r.total.std() / math.sqrt(N))
    assert se < 2.5e-4
    assert abs(float(r.total.mean()) - expected_total) < 1e-3
    # each part on its own, within 5 standard errors of its Monte Carlo mean
    for got, want in [(r.decoder, decoder_nats / LN2), (r.prior, prior_nats / LN2)] + \
            [(r.terms[:, i], kl_nats[i - 1] / LN2) for i in range(1, short_schedule.T)]:
        assert abs(float(got.mean()) - want) <= 5 * float(got.std()) / math.sqrt(N) + 1e-9, (float(got.mean()), want)


def test_bundled_model_on_mnist_is_finite_and_far_below_8_bits():
    """4 images (each is 1000 model calls, a few seconds on 2 CPU cores)."""
    ddpm = fastddpm.load("mnist")
    x0 = mnist_images(4)
    r = bits_per_dim(ddpm, x0, progress=False)
    assert torch.isfinite(r.total).all() and bool((r.terms[:, 1:] >= 0).all())
    assert float(r.total.mean()) < 4.0, str(r)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_bpd_prints_one_line(capsys):
    assert main(["bpd", "--n", "1", "--quiet", "--batch-t", "500"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "bits/dim" in out[0] and "prior" in out[0] and "decoder" in out[0]


@pytest.mark.parametrize("argv,message", [
    (["--n", "0"], "--n: expected a positive integer"),
    (["--n", "6000"], "n: expected an int in [1, 5000]"),
    (["--n", "2", "--batch-t", "0"], "--batch-t: expected a positive integer"),
    (["--n", "2", "--cuda-graph"], "cuda_graph"),
])
def test_cli_bpd_errors_are_one_line_with_exit_code_2(capsys, argv, message):
    assert main(["bpd", "--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


# --------------------------------------------------------------------------------------- errors
def test_errors_name_the_argument(tiny_unet, short_schedule):
    ddpm = DDPM(tiny_unet, short_schedule)
    x0 = _images_8bit(2)
    cases = [
        (TypeError, "x0: expected a torch.Tensor", dict(x0=x0.numpy())),
        (TypeError, "x0: expected float pixels", dict(x0=(x0 * 127.5 + 127.5).to(torch.uint8))),
        (ValueError, "x0: expected a batch of images", dict(x0=x0[0])),
        (ValueError, r"x0: expected images of shape \(C, H, W\) = \(1, 8, 8\)", dict(x0=x0.repeat(1, 3, 1, 1))),
        (ValueError, r"x0: expected images of shape", dict(x0=torch.zeros(2, 1, 16, 16))),
        (ValueError, "x0: expected finite values", dict(x0=x0.clone().fill_(float("nan")))),
        (ValueError, r"x0: expected pixels in \[-1, 1\]", dict(x0=x0 * 2)),
        (ValueError, "variance: expected one of", dict(variance="learned")),
        (ValueError, "batch_t: expected a positive int", dict(batch_t=0)),
        (ValueError, "seed / generator: give at most one", dict(seed=1, generator=torch.Generator())),
        (TypeError, "seed: expected an int", dict(seed="0")),
        (ValueError, "cuda_graph", dict(cuda_graph=True)),
        (TypeError, "unexpected keyword argument", dict(steps=10)),
    ]
    for error, message, kwargs in cases:
        kwargs = {"x0": x0, **kwargs}
        with pytest.raises(error, match=message):
            bits_per_dim(ddpm, progress=False, **kwargs)
    with pytest.raises(ValueError, match="prediction: expected one of"):
        reference_bits_per_dim(tiny_unet, short_schedule, x0, prediction="score")
    with pytest.raises(ValueError, match="n: expected an int"):
        mnist_images(0)
