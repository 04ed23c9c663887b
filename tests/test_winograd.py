"""The CPU Winograd convolutions (F(2x2, 3x3) and F(4x4, 3x3) in float32, F(2x2, 3x3) in bfloat16)
against F.conv2d in float64: random shapes (odd sizes, one channel, one pixel), layouts, the
per-call variant choice, the model rewrite, the sampler option in both dtypes and argument errors.

Error bounds are relative to the direct convolution's own error in the same dtype on the same
inputs, plus one ulp of the largest output (a result rounded to the dtype is off by that much
anyway): 4x for F(2x2), 64x for F(4x4), whose transform constants (up to 8 in A^T, 5 in B^T)
amplify rounding (measured: at most 15x below 40 channels, about 30x at 256). A wrong tile,
transform or edge would be off by the size of the outputs themselves."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fastddpm import Sampler, Schedule, UNet, reference_sample
from fastddpm.models import winograd
from fastddpm.ops.winograd import winograd_conv3x3

pytestmark = pytest.mark.skipif(not winograd.available(), reason="native extension not built")

VARIANTS = [(2, torch.float32), (4, torch.float32), (2, torch.bfloat16)]
FACTOR = {2: 4, 4: 64}


def _check_against_float64(x, weight, bias, tile, dtype, xin=None):
    """Winograd of (x or xin) in ``dtype`` within FACTOR[tile] x the direct conv's error, plus an ulp
    of the transforms' sums."""
    exact = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)
    cast = (lambda t: None if t is None else t.to(dtype))
    direct_err = (F.conv2d(cast(x), cast(weight), cast(bias), padding=1).double() - exact).abs().max().item()
    xin = x if xin is None else xin
    fast = winograd_conv3x3(xin.to(dtype), winograd.transform_weight(weight, tile, dtype), bias)
    assert fast.shape == exact.shape and fast.dtype == dtype
    assert fast.is_contiguous(memory_format=torch.channels_last)
    # the transforms mix every tap of a filter, also those that fall on the zero padding (they cancel
    # only in exact arithmetic), so their rounding scales with |x| over the window times the filter's
    # |w|, not with the output (a one-pixel image's output is one tap's product): hypothesis found it
    taps = weight.double().abs().sum((2, 3), keepdim=True).expand(weight.shape) / 9
    scale = max(exact.abs().max().item(), F.conv2d(x.double().abs(), taps, padding=1).max().item())
    ulp = torch.finfo(dtype).eps * scale
    err = (fast.double() - exact).abs().max().item()
    assert err <= FACTOR[tile] * (direct_err + ulp) + 1e-30, (err, direct_err, ulp)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 20), k=st.integers(1, 20), h=st.integers(1, 11), w=st.integers(1, 11),
       layout=st.sampled_from(["contiguous", "channels_last", "strided"]), with_bias=st.booleans(),
       variant=st.sampled_from(VARIANTS), seed=st.integers(0, 2**31))
@example(n=1, c=1, k=1, h=1, w=1, layout="contiguous", with_bias=False, variant=(2, torch.float32), seed=4110)
def test_matches_direct_convolution(n, c, k, h, w, layout, with_bias, variant, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    weight = torch.randn(k, c, 3, 3, generator=g) * (2 / (9 * c)) ** 0.5  # kaiming-like
    bias = torch.randn(k, generator=g) if with_bias else None
    xin = {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last),
           "strided": torch.stack([x, x], dim=-1)[..., 0]}[layout]
    _check_against_float64(x, weight, bias, *variant, xin=xin)


@pytest.mark.parametrize("tile,dtype", VARIANTS)
def test_large_channel_counts_use_several_tile_blocks(tile, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 256, 17, 18, generator=g)
    weight = torch.randn(128, 256, 3, 3, generator=g) / 48
    _check_against_float64(x, weight, torch.randn(128, generator=g), tile, dtype)
    # more tiles than one block holds at any width, and channel counts that end in a partial chunk
    x = torch.randn(3, 200, 37, 41, generator=g)
    weight = torch.randn(136, 200, 3, 3, generator=g) / 42
    _check_against_float64(x, weight, torch.randn(136, generator=g), tile, dtype)


def test_bias_may_be_bfloat16_with_bfloat16_inputs():
    g = torch.Generator().manual_seed(1)
    x, weight, bias = torch.randn(1, 8, 6, 6, generator=g), torch.randn(5, 8, 3, 3, generator=g) / 8, torch.randn(5)
    U = winograd.transform_weight(weight, 2, torch.bfloat16)
    torch.testing.assert_close(winograd_conv3x3(x.bfloat16(), U, bias.bfloat16()),
                               winograd_conv3x3(x.bfloat16(), U, bias.bfloat16().float()), rtol=0, atol=0)


def test_choice_rule_covers_the_presets_as_measured():
    f32, bf16 = torch.float32, torch.bfloat16
    # cifar10 at batch 16: F(4x4) for every width in float32; bf16 F(2x2) only at 256 @ 8 and 4
    assert [winograd.choose_tile(f32, c, 16, r, r) for c, r in [(128, 32), (256, 16), (256, 8), (256, 4)]] == [4] * 4
    assert [winograd.choose_tile(bf16, c, 16, r, r) for c, r in [(128, 32), (256, 16), (256, 8), (256, 4)]] == \
        [0, 0, 2, 2]
    # celebahq at batch 1: F(4x4) at 128-256, F(2x2) at 512; bf16 F(2x2) at 512 only
    assert [winograd.choose_tile(f32, c, 1, r, r) for c, r in [(128, 256), (256, 64), (512, 16), (512, 8)]] == \
        [4, 4, 2, 2]
    assert [winograd.choose_tile(bf16, c, 1, r, r) for c, r in [(128, 256), (256, 64), (512, 16), (512, 8)]] == \
        [0, 0, 2, 2]
    # mnist / digits at batch 16: F(4x4) only for 64 @ 16; float16 never
    assert [winograd.choose_tile(f32, c, 16, r, r) for c, r in [(32, 32), (64, 16), (64, 8), (32, 8), (64, 4)]] == \
        [0, 4, 0, 0, 0]
    assert winograd.choose_tile(torch.float16, 512, 1, 8, 8) == winograd.DIRECT
    assert winograd.MIN_CHANNELS == 64


@pytest.mark.parametrize("dtype,channels,batch,res", [
    (torch.float32, 256, 2, 8),  # F(4x4)
    (torch.float32, 512, 1, 4),  # F(2x2)
    (torch.float32, 64, 1, 4),  # direct
    (torch.bfloat16, 256, 1, 8),  # F(2x2) in bf16 (autocast)
    (torch.bfloat16, 256, 2, 32),  # direct in bf16
])
def test_per_call_choice_runs_the_chosen_variant(dtype, channels, batch, res, monkeypatch):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
    layer = winograd.WinogradConv2d(conv)
    tile = winograd.choose_tile(dtype, channels, batch, res, res)
    calls = []
    real = winograd.winograd_op.winograd_conv3x3
    monkeypatch.setattr(winograd.winograd_op, "winograd_conv3x3", lambda x, U, b: calls.append(U.shape) or real(x, U, b))
    x = torch.randn(batch, channels, res, res)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        fast, direct = layer(x), conv(x)
    assert calls == ([] if tile == winograd.DIRECT else [((tile + 2) ** 2, channels, channels)])
    assert fast.dtype == direct.dtype
    exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    direct_err = (direct.double() - exact).abs().max().item()
    ulp = torch.finfo(dtype).eps * exact.abs().max().item()
    assert (fast.double() - exact).abs().max().item() <= FACTOR.get(tile, 1) * (direct_err + ulp)


def test_model_rewrite_replaces_eligible_convs_on_a_copy():
    torch.manual_seed(0)
    model = UNet(in_channels=1, out_channels=1, resolution=16, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                 attn_resolutions=(8,), groups=8).eval()
    with torch.no_grad():
        model.conv_out.weight.normal_(0, 0.05)
    default = [m for m in winograd.with_winograd_convs(model).modules() if isinstance(m, winograd.WinogradConv2d)]
    assert default and all(m.channels >= winograd.MIN_CHANNELS for m in default)  # the 64-channel ones only
    for tile in (2, 4):
        fast = winograd.with_winograd_convs(model, min_channels=1, tile=tile)
        replaced = [m for m in fast.modules() if isinstance(m, winograd.WinogradConv2d)]
        assert replaced and not any(isinstance(m, winograd.WinogradConv2d) for m in model.modules())
        # the strided Downsample conv and the 1x1 attention convs stay direct
        assert all(not winograd.eligible(m) for m in fast.modules() if isinstance(m, torch.nn.Conv2d))
        x, t = torch.randn(4, 1, 16, 16), torch.tensor([0, 10, 500, 999])
        with torch.no_grad():
            torch.testing.assert_close(fast(x, t), model(x, t), rtol=1e-4, atol=1e-4)
    sched = Schedule.linear().respaced(2)
    coeffs = sched.table("step", "cpu", sampler="ddpm", variance="fixed_large")
    for dtype in ("float32", "bfloat16"):  # on by default in both
        assert Sampler(model, sched, coeffs, (1, 1, 16, 16), dtype=dtype).model.winograd


@pytest.fixture
def every_conv_winograd(monkeypatch):
    """Rules that send every convolution of any width to F(4x4) in float32 and F(2x2) in bf16."""
    monkeypatch.setattr(winograd, "RULES", {torch.float32: ((1, 4, 0, math.inf),),
                                            torch.bfloat16: ((1, 2, 0, math.inf),)})
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)


def test_sampler_with_winograd_matches_the_reference_sampler(tiny_unet, short_schedule, every_conv_winograd):
    coeffs = short_schedule.table("step", "cpu", sampler="ddpm", variance="fixed_large")
    sampler = Sampler(tiny_unet, short_schedule, coeffs, (3, 1, 8, 8), winograd=True)
    assert any(isinstance(m, winograd.WinogradConv2d) for m in sampler.model.module.modules())
    fast = sampler.run(generator=torch.Generator().manual_seed(7))
    ref = reference_sample(tiny_unet, short_schedule, (3, 1, 8, 8), clip=True,
                           generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)


def test_bfloat16_sampler_with_winograd_stays_as_close_as_the_direct_one(tiny_unet, short_schedule,
                                                                          every_conv_winograd):
    coeffs = short_schedule.table("step", "cpu", sampler="ddpm", variance="fixed_large")
    ref = reference_sample(tiny_unet, short_schedule, (3, 1, 8, 8), clip=True,
                           generator=torch.Generator().manual_seed(7))
    errs = {}
    for wg in (False, True):
        sampler = Sampler(tiny_unet, short_schedule, coeffs, (3, 1, 8, 8), winograd=wg, dtype="bfloat16")
        assert sampler.model.winograd is wg
        out = sampler.run(generator=torch.Generator().manual_seed(7))
        errs[wg] = (out - ref).abs().mean().item()
    # bf16 F(2x2) errs ~1.3x the direct bf16 convolution per call; over a sampling run (the
    # noise at each step re-randomizes) within 2x the direct bf16 sampler's mean error
    assert errs[True] <= 2 * errs[False] + 1e-3, errs


def test_compiles_fullgraph_and_matches_eager():
    conv = torch.nn.Conv2d(256, 256, 3, padding=1)
    for tile in (None, 2, 4):
        torch._dynamo.reset()
        layer = winograd.WinogradConv2d(conv, tile)
        x = torch.randn(1, 256, 7, 6)
        compiled = torch.compile(layer, fullgraph=True)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), layer(x))
            torch.testing.assert_close(layer(x), conv(x), rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()
    layer = winograd.WinogradConv2d(conv)
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(compiled(x), layer(x))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="conv: expected"):
        winograd.WinogradConv2d(torch.nn.Conv2d(4, 4, 3, stride=2, padding=1))
    with pytest.raises(ValueError, match="tile: expected"):
        winograd.WinogradConv2d(torch.nn.Conv2d(4, 4, 3, padding=1), tile=3)
    with pytest.raises(ValueError, match="weight: expected"):
        winograd.transform_weight(torch.randn(4, 4, 5, 5))
    with pytest.raises(ValueError, match="tile: expected"):
        winograd.transform_weight(torch.randn(4, 4, 3, 3), tile=6)
    for tile in (2.0, True):  # a tile names a table: only the ints 2 and 4
        with pytest.raises(ValueError, match="tile: expected"):
            winograd.transform_weight(torch.randn(4, 4, 3, 3), tile=tile)
        with pytest.raises(ValueError, match="tile: expected"):
            winograd.WinogradConv2d(torch.nn.Conv2d(4, 4, 3, padding=1), tile=tile)
    with pytest.raises(ValueError, match="dtype: expected"):
        winograd.transform_weight(torch.randn(4, 4, 3, 3), dtype=torch.float16)
    U = winograd.transform_weight(torch.randn(6, 4, 3, 3))
    U4 = winograd.transform_weight(torch.randn(6, 4, 3, 3), tile=4)
    for op in (winograd_conv3x3, torch.ops.fastddpm.winograd_conv3x3):  # the wrapper and the raw op
        with pytest.raises(ValueError, match="x: expected a float32"):
            op(torch.randn(1, 4, 5, 5, dtype=torch.float64), U, None)
        with pytest.raises(ValueError, match="U: expected"):
            op(torch.randn(1, 5, 5, 5), U, None)
        with pytest.raises(ValueError, match="U: expected"):
            op(torch.randn(1, 4, 5, 5, dtype=torch.bfloat16), U, None)  # dtype differs from x's
        with pytest.raises(ValueError, match="U: F.4x4, 3x3. .*float32 only"):
            op(torch.randn(1, 4, 5, 5, dtype=torch.bfloat16), U4.bfloat16(), None)
        with pytest.raises(ValueError, match="bias"):
            op(torch.randn(1, 4, 5, 5), U, torch.randn(5))
        with pytest.raises(ValueError, match="bias"):
            op(torch.randn(1, 4, 5, 5), U, torch.randn(6, dtype=torch.float64))
    tiny = UNet(in_channels=1, out_channels=1, resolution=8, ch=16, ch_mult=(1,), num_res_blocks=1,
                attn_resolutions=(), groups=4)
    sched = Schedule.linear().respaced(2)
    coeffs = sched.table("step", "cpu", sampler="ddpm", variance="fixed_large")
    with pytest.raises(ValueError, match="winograd"):
        Sampler(tiny, sched, coeffs, (1, 1, 8, 8), winograd=True, dtype="float16")


def test_a_copy_for_one_compute_dtype_holds_only_its_tables():
    """The tables are 1.8-4x the weights each: a sampler's copy keeps those its dtype can use."""
    model = torch.nn.Sequential(torch.nn.Conv2d(128, 128, 3, padding=1), torch.nn.Conv2d(128, 256, 3, padding=1),
                                torch.nn.Conv2d(256, 256, 3, padding=1))
    names = lambda m: {n.rsplit(".", 1)[-1] for n, _ in m.named_buffers() if n.rsplit(".", 1)[-1].startswith("U")}  # noqa: E731
    f32 = winograd.with_winograd_convs(model, dtypes=(torch.float32,))
    assert names(f32) == {"U2_float32", "U4_float32"}
    bf16 = winograd.with_winograd_convs(model, dtypes=(torch.bfloat16,))
    assert names(bf16) == {"U2_bfloat16"} and isinstance(bf16[0], torch.nn.Conv2d)  # 128 wide: no bf16 rule
    x = torch.randn(2, 128, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a dtype f32 was not prepared for: direct, not an error
        torch.testing.assert_close(f32(x).float(), model(x).float(), rtol=0.05, atol=0.05)
