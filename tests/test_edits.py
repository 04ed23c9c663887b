"""The edits: partial diffusion and reverse, interpolation, denoising, inpainting, progressive
generation and shared latents — each against its textbook definition."""

import numpy as np
import pytest
import torch

import fastddpm
from fastddpm import DDPM
from fastddpm.diffusion import reference_reconstruct
from fastddpm.edits import estimate_sigma, mix


@pytest.fixture
def tiny(tiny_unet, short_schedule):
    return DDPM(tiny_unet, short_schedule)


def _images(n=3, seed=0):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


FAST = dict(channels_last=False, progress=False)


def test_reconstruct_at_t0_returns_the_input_exactly(tiny):
    x0 = _images()
    out, xt = fastddpm.reconstruct(tiny, x0, 0, seed=0, return_xt=True, **FAST)
    assert torch.equal(out, x0) and torch.equal(xt, x0)


def test_reconstruct_equals_the_textbook_loop(tiny, tiny_unet, short_schedule):
    """q_sample of the reference op, then Algorithm 2's steps from t, drawing from one generator."""
    x0, t = _images(), 12
    fast = fastddpm.reconstruct(tiny, x0, t, generator=torch.Generator().manual_seed(4), **FAST)
    textbook = reference_reconstruct(tiny_unet, short_schedule, x0, t, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(fast, textbook, rtol=1e-5, atol=1e-5)


def test_reconstructions_move_away_from_the_input_as_t_grows():
    x0 = fastddpm.data.load_mnist_data()[0][:8]
    dist = [float((fastddpm.reconstruct("mnist", x0, t, steps=10, seed=0, progress=False) - x0).abs().mean())
            for t in (50, 250, 500, 900)]
    assert dist == sorted(dist) and dist[0] < dist[-1] / 2, dist


def test_interpolation_endpoints_are_reconstructions_with_the_same_noise(tiny):
    x_a, x_b = _images(2, 1), _images(2, 2)
    out = fastddpm.interpolate(tiny, x_a, x_b, 10, [0.0, 0.5, 1.0], seed=3, **FAST)
    assert out.shape == (2, 3, 1, 8, 8)
    ra = fastddpm.reconstruct(tiny, x_a, 10, seed=3, **FAST)
    rb = fastddpm.reconstruct(tiny, x_b, 10, seed=3, **FAST)
    torch.testing.assert_close(out[:, 0], ra, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 2], rb, rtol=1e-5, atol=1e-5)
    slerp = fastddpm.interpolate(tiny, x_a, x_b, 10, [0.0, 1.0], mode="slerp", seed=3, **FAST)
    torch.testing.assert_close(slerp[:, 0], ra, rtol=1e-4, atol=1e-4)


def test_slerp_of_unit_vectors_stays_on_the_sphere():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    a, b = a / a.flatten(1).norm(dim=1).view(-1, 1, 1, 1), b / b.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    out = mix(a, b, torch.linspace(0, 1, 7), "slerp")
    torch.testing.assert_close(out.flatten(2).norm(dim=2), torch.ones(4, 7), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mix(a, a, torch.tensor([0.3]), "slerp")[:, 0], a)  # parallel: stays put


def test_sigma_estimate_is_monotone_and_within_20_percent():
    """Pooled over a batch the estimate is within 20% for sigma >= 0.1; one 32x32 digit alone has
    too few wavelet coefficients for that (measured: within 30%)."""
    x0 = fastddpm.data.load_mnist_data()[0][::100][:32]
    g = torch.Generator().manual_seed(0)
    pooled, per_image = [], []
    for sigma in (0.05, 0.1, 0.2, 0.4, 0.8):
        y = x0 + sigma * torch.randn(x0.shape, generator=g)
        batch = estimate_sigma(y, per_image=False)
        assert batch.shape == (32,) and bool((batch == batch[0]).all())
        pooled.append(float(batch[0]))
        each = estimate_sigma(y)
        per_image.append(float(each.median()))
        if sigma >= 0.1:
            assert abs(pooled[-1] - sigma) <= 0.2 * sigma, (sigma, pooled[-1])
            assert ((each - sigma).abs() <= 0.3 * sigma).all(), (sigma, each)
    assert pooled == sorted(pooled) and per_image == sorted(per_image)
    assert float(estimate_sigma(torch.zeros(2, 1, 8, 8)).max()) == 0.0  # a clean flat image: no noise


def _psnr(x, ref):
    mse = ((x.clamp(-1, 1) - ref) ** 2).flatten(1).mean(1) / 4  # on the [0, 1] scale
    return float((10 * torch.log10(1 / mse)).mean())


@pytest.mark.parametrize("sigma", [0.1, 0.2, 0.4, 0.8])
def test_denoising_raises_psnr_with_the_bundled_model(sigma):
    x0 = fastddpm.data.load_mnist_data()[0][::500][:8]  # one of each class or so (all in the training set)
    y = x0 + sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    for mode in ("posterior_mean", "ancestral"):
        result = fastddpm.denoise("mnist", y, sigma, mode=mode, steps=20, seed=0, progress=False)
        assert _psnr(result.x, x0) > _psnr(y, x0), (mode, sigma)
    estimated = fastddpm.denoise("mnist", y, mode="posterior_mean", progress=False)
    assert estimated.estimated and ((estimated.sigma - sigma).abs() <= 0.2 * sigma).all()


def test_inpainting_keeps_known_pixels_and_reduces_to_sampling(tiny):
    x = _images(2, 5)
    mask = torch.zeros(8, 8)
    mask[:, :4] = 1
    out = fastddpm.inpaint(tiny, x, mask, seed=0, **FAST)
    assert torch.equal(out[..., :4], x[..., :4]) and not torch.equal(out, x)
    assert torch.equal(fastddpm.inpaint(tiny, x, torch.ones(8, 8), seed=0, **FAST), x)
    plain = fastddpm.sample(tiny, 2, seed=0, **FAST)
    assert torch.equal(fastddpm.inpaint(tiny, x, torch.zeros(8, 8), seed=0, **FAST), plain)
    repaint = fastddpm.inpaint(tiny, x, mask, resample=3, jump=4, seed=0, **FAST)
    assert torch.equal(repaint[..., :4], x[..., :4]) and not torch.equal(repaint, out)


def test_inpainting_reads_a_png_mask(tiny, tmp_path):
    from PIL import Image

    pixels = np.zeros((8, 8), dtype=np.uint8)
    pixels[:4] = 255
    Image.fromarray(pixels).save(tmp_path / "mask.png")
    x = _images(1, 6)
    out = fastddpm.inpaint(tiny, x, str(tmp_path / "mask.png"), seed=0, **FAST)
    assert torch.equal(out[..., :4, :], x[..., :4, :])
    pixels[0, 0] = 128
    Image.fromarray(pixels).save(tmp_path / "gray.png")
    with pytest.raises(ValueError, match="mask: expected binary values"):
        fastddpm.inpaint(tiny, x, str(tmp_path / "gray.png"), **FAST)


def test_progressive_frames_end_at_the_sample(tiny):
    result = fastddpm.progressive(tiny, 2, every=5, seed=0, **FAST)
    assert result.frames.shape == (5, 2, 1, 8, 8) and result.timesteps == [19, 14, 9, 4, 0]
    torch.testing.assert_close(result.frames[-1], result.x)  # the last step's x0 prediction is the sample


def test_completions_of_a_shared_latent(tiny):
    result = fastddpm.from_shared_latent(tiny, t=(5, 20), samples=3, seed=0, **FAST)
    assert result.latents.shape == (2, 1, 8, 8) and result.samples.shape == (2, 3, 1, 8, 8)
    spread = result.samples.std(dim=1).mean(dim=(1, 2, 3))
    assert spread[0] < spread[1]  # from a less noisy latent the completions agree more


@pytest.mark.parametrize("call,error,match", [
    (lambda m: fastddpm.reconstruct(m, _images(), 21), ValueError, r"t: expected an int in \[0, 20\]"),
    (lambda m: fastddpm.reconstruct(m, torch.rand(2, 3, 8, 8), 5), ValueError, r"x0: expected images shaped \[N, 1, 8, 8\]"),
    (lambda m: fastddpm.reconstruct(m, _images() * 3, 5), ValueError, r"x0: expected values in \[-1, 1\]"),
    (lambda m: fastddpm.interpolate(m, _images(), _images(), 5, [0.5, 1.5]), ValueError, r"lambdas: expected"),
    (lambda m: fastddpm.interpolate(m, _images(), _images(), 5, mode="cubic"), ValueError, "mode: expected one of"),
    (lambda m: fastddpm.denoise(m, _images(), -0.1), ValueError, "sigma: expected a positive number"),
    (lambda m: fastddpm.inpaint(m, _images(), torch.ones(4, 4)), ValueError, "mask: expected shape"),
    (lambda m: fastddpm.inpaint(m, _images(), torch.ones(8, 8), resample=0), ValueError, "resample: expected"),
])
def test_edits_reject_bad_input_clearly(tiny, call, error, match):
    with pytest.raises(error, match=match):
        call(tiny)
