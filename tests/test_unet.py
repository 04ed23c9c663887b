"""The paper's U-Net: shapes, parameter counts, zero-init, and the time embedding in every block."""

import math

import pytest
import torch

from fastddpm import PRESETS, UNet, UNetConfig
from fastddpm.models import winograd
from fastddpm.models.unet import ResBlock, timestep_embedding

from conftest import randomize_zero_init



@pytest.mark.parametrize("name,size", [("cifar10", 32), ("celebahq", 64), ("mnist", 32), ("digits", 8)])
def test_output_shape_equals_input_shape(name, size):
    model = UNet.from_preset(name).eval()
    c = model.config.in_channels
    x = torch.randn(1 if name == "celebahq" else 2, c, size, size)
    with torch.no_grad():
        out = model(x, torch.randint(0, 1000, (x.shape[0],)))
    assert out.shape == x.shape


def test_cifar10_preset_has_the_papers_35_7M_parameters():
    assert abs(UNet.from_preset("cifar10").num_parameters() - 35.7e6) <= 0.05e6


def test_celebahq_preset_has_about_114M_parameters():
    assert abs(UNet.from_preset("celebahq").num_parameters() - 114e6) <= 1e6


def test_fresh_model_outputs_zero_because_output_conv_is_zero_initialised():
    model = UNet.from_preset("digits")
    out = model(torch.randn(2, 1, 8, 8), torch.tensor([3, 900]))
    assert torch.count_nonzero(out) == 0


def test_time_embedding_changes_the_output(tiny_unet):
    x = torch.randn(1, 1, 8, 8).expand(3, -1, -1, -1)
    with torch.no_grad():
        out = tiny_unet(x, torch.tensor([0, 1, 999]))
    assert not torch.allclose(out[0], out[1], atol=1e-6)
    assert not torch.allclose(out[0], out[2], atol=1e-6)


def test_time_embedding_reaches_every_residual_block(tiny_unet):
    blocks = [m for m in tiny_unet.modules() if isinstance(m, ResBlock)]
    assert len(blocks) == 2 * 1 + 2 + 2 * 2  # down + middle + up for the digits preset
    tiny_unet(torch.randn(2, 1, 8, 8), torch.tensor([5, 600])).square().mean().backward()
    for b in blocks:
        assert b.temb_proj.weight.grad is not None and bool(b.temb_proj.weight.grad.abs().sum() > 0)


def test_timestep_embedding_formula():
    t = torch.tensor([0, 7, 999])
    emb = timestep_embedding(t, 8)
    freqs = [math.exp(-math.log(10000) * i / 3) for i in range(4)]
    expected = torch.tensor([[math.sin(tt * f) for f in freqs] + [math.cos(tt * f) for f in freqs]
                             for tt in t.tolist()])
    assert torch.allclose(emb, expected, atol=1e-4)


def test_config_validation():
    with pytest.raises(ValueError, match="groups"):
        UNetConfig(ch=48, groups=32)
    with pytest.raises(ValueError, match="resolution"):
        UNetConfig(resolution=30)
    with pytest.raises(ValueError, match="preset"):
        UNet.from_preset("imagenet")
    with pytest.raises(ValueError, match="x: expected"):
        UNet.from_preset("digits")(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))


def test_config_round_trips_through_dict():
    for cfg in PRESETS.values():
        assert UNetConfig.from_dict(cfg.to_dict()) == cfg


# Every option of diffusers' UNet2DModel that fastddpm's U-Net grew, on (two configs: the middle
# attention without GroupNorm, and no middle attention at all).
ALL_OPTIONS = UNetConfig(resolution=16, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16, 8), groups=4,
                         dropout=0.0, flip_sin_to_cos=True, freq_shift=0, attention_head_dim=8, downsample_padding=1,
                         resnet_time_scale_shift="scale_shift", time_embedding_dim=40, mid_attn_groups=0,
                         mid_block_scale_factor=2.0, center_input_sample=True)
NO_MID_ATTENTION = UNetConfig(resolution=16, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                              groups=4, mid_attention=False, mid_attn_groups=2)


@pytest.mark.parametrize("config", [ALL_OPTIONS, NO_MID_ATTENTION], ids=["all_options", "no_mid_attention"])
def test_parameter_count_is_exact_with_the_new_options(config):
    with torch.device("meta"):
        assert config.num_parameters() == UNet(config).num_parameters()


def test_adagn_projects_the_time_embedding_to_a_scale_and_a_shift():
    block = UNet(ALL_OPTIONS).mid1
    assert block.temb_proj.out_features == 2 * 32 and block.temb_proj.in_features == 40


def test_a_config_dict_written_before_the_new_options_loads_as_the_papers_model():
    old = {k: v for k, v in PRESETS["cifar10"].to_dict().items()
           if k in ("resolution", "in_channels", "out_channels", "ch", "ch_mult", "num_res_blocks",
                    "attn_resolutions", "dropout", "groups", "norm_eps")}
    assert UNetConfig.from_dict(old) == PRESETS["cifar10"]
    assert UNetConfig.from_dict(ALL_OPTIONS.to_dict()) == ALL_OPTIONS


@pytest.mark.parametrize("field,value,error", [
    ("flip_sin_to_cos", 1, TypeError), ("freq_shift", 8, ValueError), ("attention_head_dim", 12, ValueError),
    ("downsample_padding", 2, ValueError), ("resnet_time_scale_shift", "spatial", ValueError),
    ("time_embedding_dim", 0, ValueError), ("mid_attention", "yes", TypeError), ("mid_attn_groups", 3, ValueError),
    ("mid_block_scale_factor", 0.0, ValueError), ("center_input_sample", None, TypeError)])
def test_new_options_are_validated_by_name(field, value, error):
    base = dict(resolution=16, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), groups=4)
    with pytest.raises(error, match=rf"^{field}: "):
        UNetConfig(**base, **{field: value})


def test_flipped_and_shifted_timestep_embedding_formula():
    t = torch.tensor([0, 7, 999])
    freqs = [math.exp(-math.log(10000) * i / 4) for i in range(4)]  # freq_shift=0: divided by half
    expected = torch.tensor([[math.cos(tt * f) for f in freqs] + [math.sin(tt * f) for f in freqs]
                             for tt in t.tolist()])
    assert torch.allclose(timestep_embedding(t, 8, flip_sin_to_cos=True, freq_shift=0), expected, atol=1e-4)


@pytest.mark.parametrize("config", [ALL_OPTIONS, NO_MID_ATTENTION], ids=["all_options", "no_mid_attention"])
def test_new_options_run_in_channels_last_and_with_winograd(config):
    torch.manual_seed(0)
    model = randomize_zero_init(UNet(config)).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([4, 800])
    with torch.no_grad():
        ref = model(x, t)
        last = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t)
        torch.testing.assert_close(last, ref, rtol=1e-5, atol=1e-5)
        if winograd.available():
            torch.testing.assert_close(winograd.with_winograd_convs(model, 1)(x, t), ref, rtol=1e-4, atol=1e-4)
