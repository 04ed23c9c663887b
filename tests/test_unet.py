"""The paper's U-Net: shapes, parameter counts, zero-init, and the time embedding in every block."""

import math

import pytest
import torch

from fastddpm import PRESETS, UNet, UNetConfig
from fastddpm.models.unet import ResBlock, timestep_embedding



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
