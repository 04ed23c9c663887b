"""Sampling: the step-coefficient sampler against the textbook Algorithm 2, reproducibility, errors."""

import pytest
import torch

import fastddpm
from fastddpm import DDPM, reference_sample, sample


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip", [False, True])
def test_sampler_equals_textbook_algorithm_2(tiny_unet, short_schedule, variance, clip):
    ddpm = DDPM(tiny_unet, short_schedule)
    fast = sample(ddpm, 3, variance=variance, clip=clip, generator=torch.Generator().manual_seed(7),
                  progress=False)
    ref = reference_sample(tiny_unet, short_schedule, (3, 1, 8, 8), variance=variance, clip=clip,
                           generator=torch.Generator().manual_seed(7))
    assert torch.allclose(fast, ref, rtol=1e-5, atol=1e-5)


def test_same_seed_same_samples_different_seed_different(tiny_unet, short_schedule):
    ddpm = DDPM(tiny_unet, short_schedule)
    a = sample(ddpm, 2, seed=3, progress=False)
    b = sample(ddpm, 2, seed=3, progress=False)
    c = sample(ddpm, 2, seed=4, progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_batching_does_not_change_the_stream_of_a_single_batch(tiny_unet, short_schedule):
    ddpm = DDPM(tiny_unet, short_schedule)
    whole = sample(ddpm, 4, seed=1, progress=False)
    chunked = sample(ddpm, 4, seed=1, batch_size=2, progress=False)
    assert chunked.shape == whole.shape and torch.isfinite(chunked).all()


def test_respacing_with_all_steps_equals_the_full_sampler(tiny_unet, short_schedule):
    ddpm = DDPM(tiny_unet, short_schedule)
    full = sample(ddpm, 2, seed=5, progress=False)
    respaced = DDPM(tiny_unet, short_schedule.respace(range(short_schedule.T)))
    assert torch.allclose(sample(respaced, 2, seed=5, progress=False), full, atol=1e-6)


def test_fewer_steps_pass_the_original_timesteps_to_the_model(tiny_unet, short_schedule):
    seen = []

    def eps_model(x, t):
        seen.append(int(t[0]))
        return tiny_unet(x, t)

    sample(DDPM(eps_model, short_schedule), 1, steps=5, seed=0, shape=(1, 8, 8), progress=False)
    assert seen == [19, 14, 10, 5, 0]


def test_ddim_eta_one_equals_ddpm_fixed_small(tiny_unet, short_schedule):
    ddpm = DDPM(tiny_unet, short_schedule)
    a = sample(ddpm, 2, sampler="ddim", eta=1.0, seed=9, progress=False)
    b = sample(ddpm, 2, variance="fixed_small", seed=9, progress=False)
    assert torch.allclose(a, b, atol=1e-5)


def test_callback_sees_every_step_and_records_x0_predictions(tiny_unet, short_schedule):
    steps = []
    out = sample(DDPM(tiny_unet, short_schedule), 1, seed=0, progress=False,
                 callback=lambda i, t, x, x0: steps.append((i, t, x.clone(), x0.clone())))
    assert [s[0] for s in steps] == list(range(19, -1, -1))
    assert torch.equal(steps[-1][2], out)
    assert all(s[3].abs().max() <= 1.0 for s in steps)  # x0 predictions, clipped like the step
    # at the last step (abar_prev = 1) the sample is the x0 prediction itself
    torch.testing.assert_close(steps[-1][3], out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n=0), "n: expected a positive int"),
    (dict(n=2.5), "n: expected a positive int"),
    (dict(variance="learned"), "variance: expected one of"),
    (dict(steps=21), r"steps: expected an int in \[1, 20\]"),
    (dict(steps=0), "steps"),
    (dict(device="gpu"), "device: expected"),
    (dict(device="cuda:0"), "device: 'cuda:0' requested but CUDA is not available"),
    (dict(sampler="euler"), "sampler"),
    (dict(clip=-2.0), "clip"),
    (dict(eta=1.5, sampler="ddim"), "eta"),
])
def test_sample_validates_its_arguments(tiny_unet, short_schedule, kwargs, match):
    if kwargs.get("device", "").startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    args = dict(n=1, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sample(DDPM(tiny_unet, short_schedule), **args)


def test_sample_rejects_missing_and_non_checkpoint_paths(tmp_path):
    with pytest.raises(fastddpm.CheckpointError, match="does not exist"):
        sample(str(tmp_path / "nope"), 1, progress=False)
    (tmp_path / "file.txt").write_text("hello")
    with pytest.raises(fastddpm.CheckpointError, match="not a checkpoint directory"):
        sample(str(tmp_path / "file.txt"), 1, progress=False)
    with pytest.raises(fastddpm.CheckpointError, match="no config.json"):
        sample(str(tmp_path), 1, progress=False)
    with pytest.raises(fastddpm.CheckpointError, match="bundled"):
        sample("cifar100", 1, progress=False)
    with pytest.raises(TypeError, match="model_or_path"):
        sample(42, 1, progress=False)
