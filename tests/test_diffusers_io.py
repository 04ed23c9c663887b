"""diffusers folders, scheduler configs, export and ``accelerate(pipe)`` (fastddpm.diffusers_io).

Tiny U-Nets with random weights (the paper's architecture at 16 px, 8/16 channels), T=1000
schedules, few inference steps; nothing is downloaded. Images are compared in [0, 1] as the
pipelines return them; the step formulas differ in arithmetic order, so they agree to float32
rounding (docs/diffusers.md), asserted at ATOL.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fastddpm  # noqa: E402
from fastddpm.diffusers_io import (accelerate, export_diffusers, full_schedule, inference_timesteps,  # noqa: E402
                                   load_pipeline, scheduler_settings)

ATOL = 1e-4  # measured max over these cases: 2.8e-5 with 1 CPU thread, 5.6e-5 with 2 (other GEMM rounding)
SCHEDULERS = {"ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler}
PIPELINES = {"ddpm": diffusers.DDPMPipeline, "ddim": diffusers.DDIMPipeline}


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, norm_eps=1e-6,
                                 freq_shift=1, flip_sin_to_cos=False, downsample_padding=0, attention_head_dim=None)
    with torch.no_grad():  # diffusers zero-inits nothing we rely on, but make every layer count
        for p in unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return unet.eval()


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def make_pipe(unet, kind="ddpm", **scheduler):
    pipe = PIPELINES[kind](unet=unet, scheduler=SCHEDULERS[kind](**scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(fn, **call):
    return fn(batch_size=2, generator=torch.Generator().manual_seed(3), output_type="np", **call).images


# ------------------------------------------------------------------------------------- schedulers
@pytest.mark.parametrize("fields", [dict(beta_schedule="linear"), dict(beta_schedule="scaled_linear"),
                                    dict(beta_schedule="squaredcos_cap_v2"),
                                    dict(beta_schedule="linear", beta_start=5e-4, beta_end=0.03,
                                         num_train_timesteps=300),
                                    dict(trained_betas=np.linspace(1e-3, 0.05, 50).tolist())])
def test_schedule_equals_the_schedulers_betas_and_alphas_cumprod(fields):
    theirs = diffusers.DDPMScheduler(**fields)
    ours = full_schedule(scheduler_settings(dict(theirs.config)))
    torch.testing.assert_close(ours.betas.float(), theirs.betas, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(ours.abar.float(), theirs.alphas_cumprod, rtol=2e-5, atol=1e-9)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
def test_timesteps_equal_set_timesteps(kind, spacing, offset):
    scheduler = SCHEDULERS[kind](timestep_spacing=spacing, steps_offset=offset)
    settings = scheduler_settings(dict(scheduler.config), type(scheduler).__name__)
    for n in (1, 3, 7, 10, 50, 333, 999):
        scheduler.set_timesteps(n)
        assert inference_timesteps(settings, n).tolist() == scheduler.timesteps.tolist(), n


@pytest.mark.parametrize("fields,name", [
    (dict(variance_type="learned"), "variance_type"), (dict(variance_type="learned_range"), "variance_type"),
    (dict(beta_schedule="sigmoid"), "beta_schedule"), (dict(prediction_type="x0"), "prediction_type"),
    (dict(thresholding=True, sample_max_value=2.0), "thresholding"),
    (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"), (dict(timestep_spacing="karras"), "timestep_spacing"),
    (dict(num_train_timesteps=10**7), "num_train_timesteps"), (dict(use_karras_sigmas=True), "use_karras_sigmas"),
    (dict(clip_sample_range=-1.0), "clip_sample_range"), (dict(_class_name="PNDMScheduler"), "_class_name")])
def test_unsupported_scheduler_fields_are_named(fields, name):
    with pytest.raises(ValueError, match=f"^{name}: "):
        scheduler_settings(fields)


def test_steps_the_scheduler_cannot_take_are_named():
    offset = scheduler_settings({"steps_offset": 1})
    with pytest.raises(ValueError, match="^steps_offset: "):
        inference_timesteps(offset, 1000)  # 1..1000: past the last timestep
    with pytest.raises(ValueError, match="^num_inference_steps: "):
        inference_timesteps(offset, 1001)


def test_thresholding_with_max_value_one_is_clipping():
    assert scheduler_settings({"thresholding": True, "clip_sample": False}).clip == 1.0


# -------------------------------------------------------------------------------- accelerate(pipe)
@pytest.mark.parametrize("kind,scheduler,call", [
    ("ddpm", dict(variance_type="fixed_small"), {}),
    ("ddpm", dict(variance_type="fixed_small", clip_sample=False), {}),
    ("ddpm", dict(variance_type="fixed_large"), {}),
    ("ddpm", dict(variance_type="fixed_large", clip_sample=False), {}),
    ("ddpm", dict(variance_type="fixed_large", steps_offset=1, clip_sample_range=0.5), {}),  # noise at t=1 too
    ("ddpm", dict(variance_type="fixed_small_log", timestep_spacing="trailing", prediction_type="v_prediction",
                  beta_schedule="squaredcos_cap_v2"), {}),
    ("ddim", dict(), dict(eta=0.0)),
    ("ddim", dict(), dict(eta=0.5)),
    ("ddim", dict(timestep_spacing="trailing"), dict(eta=0.0)),
    ("ddim", dict(timestep_spacing="trailing"), dict(eta=0.5)),  # t - T//n is not the next timestep here
    ("ddim", dict(set_alpha_to_one=False, steps_offset=1, clip_sample=False), dict(eta=0.5)),
    ("ddim", dict(prediction_type="sample", timestep_spacing="linspace", thresholding=True),
     dict(eta=0.5, use_clipped_model_output=True)),
])
def test_accelerated_pipeline_equals_the_pipeline(unet, kind, scheduler, call):
    pipe = make_pipe(unet, kind, **scheduler)
    fast = accelerate(pipe)
    for steps in (7, 10):
        theirs = images(pipe, num_inference_steps=steps, **call)
        ours = images(fast, num_inference_steps=steps, **call)
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        assert abs(ours - theirs).max() < ATOL, (steps, abs(ours - theirs).max())


def test_accelerate_reads_through_a_compiled_unet(unet):
    """Users compile pipe.unet; converting it must read the wrapped module's weights (torch.compile's
    wrapper prefixes every state-dict key), without compiling anything."""
    pipe = make_pipe(unet, "ddpm", variance_type="fixed_large")
    plain = accelerate(pipe)
    pipe.unet = torch.compile(pipe.unet)
    compiled = accelerate(pipe)
    for a, b in zip(plain.model.state_dict().values(), compiled.model.state_dict().values()):
        assert torch.equal(a, b)


def test_accelerated_output_types_and_generator_state(unet):
    pipe = make_pipe(unet, "ddpm", variance_type="fixed_large")
    fast = accelerate(pipe)
    assert isinstance(fast.model, fastddpm.UNet)  # converted once, here
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    theirs = pipe(batch_size=2, generator=g1, num_inference_steps=5)
    ours = fast(batch_size=2, generator=g2, num_inference_steps=5)
    assert type(ours) is type(theirs)
    for a, b in zip(ours.images, theirs.images):  # PIL images: pixels round alike except at a .5 edge
        assert a.size == b.size and a.mode == b.mode
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1
    assert torch.equal(g1.get_state(), g2.get_state())  # the same draws were made, in the same number
    (pt,) = fast(batch_size=1, num_inference_steps=3, output_type="pt", return_dict=False)
    assert pt.shape == (1, 3, 16, 16) and 0 <= float(pt.min()) and float(pt.max()) <= 1
    with pytest.raises(ValueError, match="^output_type: "):
        fast(output_type="latent")
    with pytest.raises(ValueError, match="^eta: "):
        fast(eta=0.5)
    with pytest.raises(TypeError, match="^pipe: "):
        accelerate(unet)


def test_ddim_last_step_renoised_to_abar0_is_refused(unet):
    fast = accelerate(make_pipe(unet, "ddim", set_alpha_to_one=False))
    with pytest.raises(ValueError, match="^set_alpha_to_one: "):
        fast(num_inference_steps=5)


# ----------------------------------------------------------------------------------------- folders
def test_pipeline_folder_loads_with_the_same_forward_and_samples(unet, tmp_path):
    pipe = make_pipe(unet, "ddim", timestep_spacing="trailing", prediction_type="v_prediction")
    pipe.save_pretrained(tmp_path / "pipe")
    ddpm = fastddpm.load(tmp_path / "pipe")
    assert ddpm.prediction == "v" and ddpm.scheduler.kind == "ddim"
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 900])
    with torch.no_grad():
        torch.testing.assert_close(ddpm.model(x, t), unet(x, t).sample, rtol=1e-4, atol=1e-5)
    theirs = images(pipe, num_inference_steps=6, eta=0.5)
    assert abs(images(load_pipeline(tmp_path / "pipe"), num_inference_steps=6, eta=0.5) - theirs).max() < ATOL


def test_bare_unet_folder_with_bin_weights_loads(unet, tmp_path):
    unet.save_pretrained(tmp_path / "unet", safe_serialization=False)
    assert os.path.exists(tmp_path / "unet" / "diffusion_pytorch_model.bin")
    ddpm = fastddpm.load(tmp_path / "unet")
    assert ddpm.scheduler.variance == "fixed_small" and ddpm.schedule.config.kind == "linear"
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 500])
    with torch.no_grad():
        torch.testing.assert_close(ddpm.model(x, t), unet(x, t).sample, rtol=1e-4, atol=1e-5)


def test_folder_with_wrong_weights_is_refused_before_loading(unet, tmp_path):
    unet.save_pretrained(tmp_path / "unet")
    other = tiny_unet()
    other.register_to_config(block_out_channels=(8, 8))  # a config its weights do not match
    other.save_config(tmp_path / "unet")
    with pytest.raises(fastddpm.CheckpointError, match="^checkpoint: .*safetensors.* the model config does not have"):
        fastddpm.load(tmp_path / "unet")


def test_folders_load_and_sample_with_diffusers_blocked(unet, tmp_path):
    pipe = make_pipe(unet, "ddpm", variance_type="fixed_large")
    pipe.save_pretrained(tmp_path / "pipe")
    unet.save_pretrained(tmp_path / "unet")
    expected = images(pipe, num_inference_steps=4)
    np.save(tmp_path / "expected.npy", expected)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["diffusers"] = None  # import diffusers now raises ImportError
        import numpy as np, torch, fastddpm
        from fastddpm.diffusers_io import load_pipeline
        fastddpm.load({str(tmp_path / "unet")!r})
        out = load_pipeline({str(tmp_path / "pipe")!r})(batch_size=2, generator=torch.Generator().manual_seed(3),
                                                       num_inference_steps=4, output_type="np")
        diff = abs(out.images - np.load({str(tmp_path / "expected.npy")!r})).max()
        assert diff < {ATOL}, diff
        assert sys.modules["diffusers"] is None
        print("ok", type(out).__name__)
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ok", "ImageOutput"]


def test_sample_command_takes_a_pipeline_folder(unet, tmp_path):
    from fastddpm.cli import main

    make_pipe(unet, "ddpm").save_pretrained(tmp_path / "pipe")
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", str(tmp_path / "pipe"), "--n", "2", "--steps", "3", "--out", str(out),
                 "--quiet"]) == 0
    assert out.exists()


# ------------------------------------------------------------------------------------------ export
def test_exported_folder_gives_fastddpm_samples_in_ddpm_pipeline(tmp_path):
    model = fastddpm.models.unet_from_diffusers(tiny_unet(4))
    ddpm = fastddpm.DDPM(model, fastddpm.Schedule.quadratic(T=1000))
    export_diffusers(ddpm, tmp_path / "out", variance="fixed_small", clip=False)
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "out")
    pipe.set_progress_bar_config(disable=True)
    theirs = images(pipe, num_inference_steps=8)
    ours = fastddpm.sample(ddpm, 2, steps=8, variance="fixed_small", clip=False,
                           generator=torch.Generator().manual_seed(3), progress=False)
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(ours - theirs).max() < ATOL
    for steps in (8, 77, 1000):  # linspace spacing is fastddpm's even respacing, at every step count
        pipe.scheduler.set_timesteps(steps)
        assert pipe.scheduler.timesteps.flip(0).tolist() == ddpm.schedule.respaced(steps).timesteps.tolist()
    back = fastddpm.load(tmp_path / "out")
    assert back.schedule.config == ddpm.schedule.config
    for k, v in model.state_dict().items():
        assert torch.equal(back.model.state_dict()[k], v), k


def test_sample_of_a_folder_defaults_to_its_schedulers_settings(unet, tmp_path):
    """A folder whose scheduler says fixed_small without clipping samples that way unless told
    otherwise (fastddpm.sample and the command leave sampler / variance / clip to the model)."""
    make_pipe(unet, variance_type="fixed_small", clip_sample=False).save_pretrained(tmp_path / "pipe")
    ddpm = fastddpm.load(str(tmp_path / "pipe"))
    assert ddpm.sampler_defaults() == {"sampler": "ddpm", "variance": "fixed_small", "clip": False}
    run = dict(steps=5, seed=0, progress=False)
    default = fastddpm.sample(ddpm, 2, **run)
    torch.testing.assert_close(default, fastddpm.sample(ddpm, 2, variance="fixed_small", clip=False, **run),
                               rtol=0, atol=0)
    assert not torch.equal(default, fastddpm.sample(ddpm, 2, variance="fixed_large", clip=True, **run))
