"""The CPU Winograd F(2x2, 3x3) convolution against F.conv2d: random shapes (odd sizes, one
channel, one pixel), layouts, the model rewrite, the sampler option and argument errors."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fastddpm import Sampler, Schedule, UNet, reference_sample
from fastddpm.models import winograd

pytestmark = pytest.mark.skipif(not winograd.available(), reason="native extension not built")


def _conv(x, w, b):
    return torch.ops.fastddpm.winograd_conv3x3(x, winograd.transform_weight(w), b)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 20), k=st.integers(1, 20), h=st.integers(1, 9), w=st.integers(1, 9),
       layout=st.sampled_from(["contiguous", "channels_last", "strided"]), with_bias=st.booleans(),
       seed=st.integers(0, 2**31))
def test_matches_direct_convolution(n, c, k, h, w, layout, with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    weight = torch.randn(k, c, 3, 3, generator=g) / (3 * c**0.5)
    bias = torch.randn(k, generator=g) if with_bias else None
    xin = {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last),
           "strided": torch.stack([x, x], dim=-1)[..., 0]}[layout]
    exact = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)
    direct_err = (F.conv2d(x, weight, bias, padding=1).double() - exact).abs().max().item()
    fast = _conv(xin, weight, bias)
    assert fast.shape == (n, k, h, w) and fast.is_contiguous(memory_format=torch.channels_last)
    assert (fast.double() - exact).abs().max().item() <= 4 * direct_err + 1e-6


def test_large_channel_counts_use_several_tile_blocks():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 256, 17, 16, generator=g)
    weight = torch.randn(128, 256, 3, 3, generator=g) / 48
    bias = torch.randn(128, generator=g)
    exact = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    torch.testing.assert_close(_conv(x, weight, bias).double(), exact, rtol=0, atol=2e-5)


def test_model_rewrite_replaces_eligible_convs_on_a_copy():
    torch.manual_seed(0)
    model = UNet(in_channels=1, out_channels=1, resolution=16, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                 attn_resolutions=(8,), groups=8).eval()
    with torch.no_grad():
        model.conv_out.weight.normal_(0, 0.05)
    assert not any(isinstance(m, winograd.WinogradConv2d)  # 32-64 channels: under MIN_CHANNELS
                   for m in winograd.with_winograd_convs(model).modules())
    fast = winograd.with_winograd_convs(model, min_channels=1)
    replaced = [m for m in fast.modules() if isinstance(m, winograd.WinogradConv2d)]
    assert replaced and not any(isinstance(m, winograd.WinogradConv2d) for m in model.modules())
    # the strided Downsample conv and the 1x1 attention convs stay direct
    assert all(not winograd.eligible(m) for m in fast.modules() if isinstance(m, torch.nn.Conv2d))
    assert Sampler(model, Schedule.linear().respaced(2), Schedule.linear().respaced(2).table(
        "step", "cpu", sampler="ddpm", variance="fixed_large"), (1, 1, 16, 16)).model.winograd  # on by default
    x, t = torch.randn(4, 1, 16, 16), torch.tensor([0, 10, 500, 999])
    with torch.no_grad():
        torch.testing.assert_close(fast(x, t), model(x, t), rtol=1e-4, atol=1e-4)


def test_sampler_with_winograd_matches_the_reference_sampler(tiny_unet, short_schedule, monkeypatch):
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)  # the tiny model's convs are all narrow
    coeffs = short_schedule.table("step", "cpu", sampler="ddpm", variance="fixed_large")
    sampler = Sampler(tiny_unet, short_schedule, coeffs, (3, 1, 8, 8), winograd=True)
    assert any(isinstance(m, winograd.WinogradConv2d) for m in sampler.model.module.modules())
    fast = sampler.run(generator=torch.Generator().manual_seed(7))
    ref = reference_sample(tiny_unet, short_schedule, (3, 1, 8, 8), clip=True,
                           generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)


def test_compiles_fullgraph_and_matches_eager():
    torch._dynamo.reset()
    conv = torch.nn.Conv2d(8, 12, 3, padding=1)
    layer = winograd.WinogradConv2d(conv)
    x = torch.randn(2, 8, 7, 6)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="conv: expected"):
        winograd.WinogradConv2d(torch.nn.Conv2d(4, 4, 3, stride=2, padding=1))
    with pytest.raises(ValueError, match="weight: expected"):
        winograd.transform_weight(torch.randn(4, 4, 5, 5))
    U = winograd.transform_weight(torch.randn(6, 4, 3, 3))
    with pytest.raises(ValueError, match="x: expected a float32"):
        torch.ops.fastddpm.winograd_conv3x3(torch.randn(1, 4, 5, 5, dtype=torch.float64), U, None)
    with pytest.raises(ValueError, match="U: expected"):
        torch.ops.fastddpm.winograd_conv3x3(torch.randn(1, 5, 5, 5), U, None)
    with pytest.raises(ValueError, match="bias"):
        torch.ops.fastddpm.winograd_conv3x3(torch.randn(1, 4, 5, 5), U, torch.randn(5))
    tiny = UNet(in_channels=1, out_channels=1, resolution=8, ch=16, ch_mult=(1,), num_res_blocks=1,
                attn_resolutions=(), groups=4)
    sched = Schedule.linear().respaced(2)
    coeffs = sched.table("step", "cpu", sampler="ddpm", variance="fixed_large")
    with pytest.raises(ValueError, match="winograd"):
        Sampler(tiny, sched, coeffs, (1, 1, 8, 8), winograd=True, dtype="bfloat16")
