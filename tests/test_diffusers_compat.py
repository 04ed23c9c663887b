"""fastddpm against diffusers (an optional dependency; skipped without it): UNet2DModels of the
paper's architecture and of the settings diffusers' own examples train give the same outputs once
converted and convert back to the same tensors; unsupported settings are named; DDPMPipeline
(fixed_large, clip) gives the same samples as fastddpm's sampler from the same generator."""

import inspect

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fastddpm import DDPM, Schedule, sample  # noqa: E402
from fastddpm import UNet  # noqa: E402
from fastddpm.models import (config_from_diffusers, convert_state_dict, diffusers_config,  # noqa: E402
                             to_diffusers_state_dict, unet_from_diffusers)
from fastddpm.models.diffusers_compat import DIFFUSERS_DEFAULTS  # noqa: E402


def small_unet2d(seed=0):
    """The google/ddpm-cifar10-32 config, narrower (32/64 channels, one block per level)."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, norm_eps=1e-6,
                                 freq_shift=1, flip_sin_to_cos=False, downsample_padding=0, attention_head_dim=None)
    with torch.no_grad():  # diffusers initialises some output convs to small values; make every layer count
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return unet.eval()


def test_converted_unet_matches_diffusers_outputs():
    unet = small_unet2d()
    model = unet_from_diffusers(unet).eval()
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([0, 421, 999])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), unet(x, t).sample, rtol=1e-4, atol=1e-4)


def test_sampler_matches_ddpm_pipeline_with_the_same_generator():
    unet = small_unet2d(1)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_large",
                                        clip_sample=True)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(5), num_inference_steps=10,
                  output_type="np").images
    # diffusers' 10 steps are its "leading" timesteps 900, 800, ..., 0: the same respacing here
    schedule = Schedule.linear().respace(sorted(pipe.scheduler.timesteps.tolist()))
    ours = sample(DDPM(unet_from_diffusers(unet), schedule), 2, generator=torch.Generator().manual_seed(5),
                  progress=False)
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(ours - theirs).max() < 1e-4


def test_sampler_embeds_a_diffusers_unet_directly():
    """No conversion: any eps_model(x, t) works, here diffusers' UNet2DModel behind a lambda."""
    from fastddpm import Sampler

    unet = small_unet2d(2)
    schedule = Schedule.linear().respaced(8)
    coeffs = schedule.table("step", "cpu", sampler="ddpm", variance="fixed_large")
    shape = (2, 3, 32, 32)
    direct = Sampler(lambda x, t: unet(x, t).sample, schedule, coeffs, shape).run(
        generator=torch.Generator().manual_seed(4))
    converted = Sampler(unet_from_diffusers(unet).eval(), schedule, coeffs, shape).run(
        generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(direct, converted, rtol=1e-4, atol=1e-4)



# UNet2DModel configs people own, narrowed (small channel counts) to keep the tests fast.
PAPER = dict(sample_size=32, block_out_channels=(16, 32, 32, 32), layers_per_block=2,
             down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
             norm_eps=1e-6, freq_shift=1, flip_sin_to_cos=False, downsample_padding=0, attention_head_dim=None,
             dropout=0.1)
# diffusers' defaults (multi-head attention at 3 of 4 levels, padded downsampling, cos-first sinusoid)
DEFAULTS_64PX = dict(sample_size=64, block_out_channels=(16, 32, 48, 64), norm_num_groups=4)
# examples/unconditional_image_generation/train_unconditional.py's model
TRAIN_EXAMPLE_128PX = dict(sample_size=128, layers_per_block=2, block_out_channels=(8, 8, 16, 16, 32, 32),
                           down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D",
                                             "AttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D",
                                           "UpBlock2D"), norm_num_groups=4)
ONE_CHANNEL = dict(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                   down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                   up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4)
# AdaGN; its middle attention has no GroupNorm (diffusers' attn_norm_num_groups=None under scale_shift)
ADAGN = dict(sample_size=16, block_out_channels=(16, 32), layers_per_block=1,
             down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
             up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"), norm_num_groups=4,
             resnet_time_scale_shift="scale_shift", attention_head_dim=4)
# the remaining options: a wider time embedding, a scaled middle block without attention, inputs in [0, 1]
EXTRAS = dict(sample_size=16, block_out_channels=(16, 32), layers_per_block=1,
              down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
              norm_num_groups=4, time_embedding_dim=48, mid_block_scale_factor=2**0.5, add_attention=False,
              center_input_sample=True, freq_shift=3, norm_eps=1e-3)
# the same with AdaGN and the middle attention's own GroupNorm
EXTRAS_ADAGN = dict(EXTRAS, add_attention=True, attn_norm_num_groups=2, resnet_time_scale_shift="scale_shift")
CONFIGS = {"paper_cifar10": PAPER, "defaults_64px": DEFAULTS_64PX, "train_example_128px": TRAIN_EXAMPLE_128PX,
           "one_channel": ONE_CHANNEL, "adagn": ADAGN, "extras": EXTRAS, "extras_adagn": EXTRAS_ADAGN}


def random_unet2d(kwargs, seed=0):
    """A UNet2DModel of ``kwargs`` with every weight random (none left at a constant init)."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(**kwargs)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet.eval()


def inputs(unet, batch=2):
    c, size = unet.config.in_channels, unet.config.sample_size
    torch.manual_seed(1)
    return torch.randn(batch, c, size, size), torch.tensor([0, 999, 421][:batch])


@pytest.mark.parametrize("name", CONFIGS)
def test_converted_forward_equals_diffusers(name):
    unet = random_unet2d(CONFIGS[name])
    model = unet_from_diffusers(unet).eval()
    x, t = inputs(unet)
    with torch.no_grad():
        ours, theirs = model(x, t), unet(x, t).sample
    print(f"{name}: max abs difference {(ours - theirs).abs().max().item():.2e}")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_diffusers_to_fastddpm_to_diffusers_is_identity(name):
    unet = random_unet2d(CONFIGS[name])
    theirs = unet.state_dict()
    config = config_from_diffusers(dict(unet.config))
    back = to_diffusers_state_dict(convert_state_dict(dict(unet.config), theirs), config)
    assert back.keys() == theirs.keys()
    assert all(torch.equal(back[k], v) for k, v in theirs.items())
    assert config_from_diffusers(diffusers_config(config)) == config


@pytest.mark.parametrize("name", CONFIGS)
def test_export_loads_into_diffusers_with_the_same_outputs(name):
    torch.manual_seed(2)
    config = config_from_diffusers(random_unet2d(CONFIGS[name]).config)
    model = UNet(config).eval()
    with torch.no_grad():  # the zero-initialised output convs too
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = diffusers_config(config)
    assert cfg.pop("_class_name") == "UNet2DModel"
    unet = diffusers.UNet2DModel(**cfg).eval()
    unet.load_state_dict(to_diffusers_state_dict(model, config), strict=True)
    x, t = inputs(unet)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t).sample, model(x, t), rtol=1e-5, atol=1e-5)


def test_the_defaults_assumed_for_missing_keys_are_diffusers_own():
    params = inspect.signature(diffusers.UNet2DModel.__init__).parameters
    installed = {k: p.default for k, p in params.items() if k != "self"}
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in installed.items()} == DIFFUSERS_DEFAULTS


def test_a_config_dict_without_diffusers_defaults_converts_like_the_model():
    unet = random_unet2d(DEFAULTS_64PX)
    assert config_from_diffusers(DEFAULTS_64PX) == config_from_diffusers(unet.config)


BASE = dict(diffusers.UNet2DModel(**ONE_CHANNEL).config)
UNSUPPORTED = {
    "class_embed_type": "timestep", "num_class_embeds": 10, "time_embedding_type": "fourier",
    "resnet_time_scale_shift": "spatial", "act_fn": "mish", "mid_block_type": "UNetMidBlock2DCrossAttn",
    "downsample_type": "resnet", "upsample_type": "resnet", "downsample_padding": 2, "norm_num_groups": None,
    "down_block_types": ("SkipDownBlock2D", "AttnSkipDownBlock2D"),
    "up_block_types": ("AttnSkipUpBlock2D", "SkipUpBlock2D"), "block_out_channels": (16, 24),
    "attention_head_dim": 12, "sample_size": None, "_class_name": "UNet2DConditionModel",
}


@pytest.mark.parametrize("field", UNSUPPORTED)
def test_an_unsupported_setting_is_refused_by_name(field):
    with pytest.raises(ValueError, match=rf"^unet: .*\b{field}="):
        config_from_diffusers(dict(BASE, **{field: UNSUPPORTED[field]}))


@pytest.mark.parametrize("field,value", [("block_out_channels", (0, 16)), ("block_out_channels", None),
                                         ("attention_head_dim", 0), ("down_block_types", "DownBlock2D")])
def test_malformed_structure_is_a_value_error(field, value):
    with pytest.raises(ValueError, match=rf"^unet: .*\b{field}="):
        config_from_diffusers(dict(BASE, **{field: value}))


def test_every_unsupported_setting_is_named_at_once():
    bad = {k: UNSUPPORTED[k] for k in ("class_embed_type", "time_embedding_type", "down_block_types")}
    with pytest.raises(ValueError) as info:
        config_from_diffusers(dict(BASE, **bad))
    assert all(f"{k}=" in str(info.value) for k in bad)


def test_state_dicts_of_another_architecture_are_refused():
    unet = random_unet2d(ONE_CHANNEL)
    state = unet.state_dict()
    del state["conv_in.bias"]
    with pytest.raises(ValueError, match=r"^state: .*missing \['conv_in.bias'\]"):
        convert_state_dict(dict(unet.config), state)
    config = config_from_diffusers(unet.config)
    with pytest.raises(ValueError, match=r"^model_or_state: .*unexpected \['extra'\]"):
        to_diffusers_state_dict(dict(UNet(config).state_dict(), extra=torch.zeros(1)), config)
