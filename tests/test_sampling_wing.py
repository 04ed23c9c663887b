"""The sampling wing: prepared samplers reused across calls (and never stale), SpeedOptions and
NoiseSource validated once, runs from an intermediate step, and the per-step hook."""

import pytest
import torch

import fastddpm
from fastddpm import DDPM, NoiseSource, Sampler, SpeedOptions, sample
from fastddpm.ops import PhiloxState
from fastddpm.sampling import cache, clear_cache


def _sample(ddpm, **kwargs):
    return sample(ddpm, 2, seed=0, progress=False, channels_last=False, **kwargs)


def test_a_repeated_call_reuses_its_prepared_sampler(tiny_unet, short_schedule):
    clear_cache()
    ddpm = DDPM(tiny_unet, short_schedule)
    a = _sample(ddpm)
    hits, misses = cache.SAMPLERS.hits, cache.SAMPLERS.misses
    b = _sample(ddpm)
    assert torch.equal(a, b)
    assert (cache.SAMPLERS.hits, cache.SAMPLERS.misses) == (hits + 1, misses)
    _sample(ddpm, steps=5)  # another schedule: another entry
    _sample(ddpm, dtype="float32", memory_pool=False)  # other options: another entry
    assert cache.SAMPLERS.misses == misses + 2 and len(cache.SAMPLERS) == 3
    clear_cache()
    assert len(cache.SAMPLERS) == 0


@pytest.mark.parametrize("change", ["in_place", "load_state_dict", "new_parameter", "optimizer_step"])
def test_a_model_whose_weights_changed_is_never_sampled_stale(tiny_unet, short_schedule, change):
    clear_cache()
    ddpm = DDPM(tiny_unet, short_schedule)
    before = _sample(ddpm)
    conv = tiny_unet.conv_out
    with torch.no_grad():
        if change == "in_place":
            conv.weight.mul_(-1)
        elif change == "load_state_dict":
            state = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
            state["conv_out.weight"] = -state["conv_out.weight"]
            tiny_unet.load_state_dict(state)
        elif change == "new_parameter":
            conv.weight = torch.nn.Parameter(-conv.weight.detach().clone())
    if change == "optimizer_step":
        opt = torch.optim.SGD(tiny_unet.parameters(), lr=10.0)
        tiny_unet(torch.randn(2, 1, 8, 8), torch.tensor([1, 2])).square().mean().backward()
        opt.step()
    after = _sample(ddpm)
    fresh = sample(ddpm, 2, seed=0, progress=False, channels_last=False, reuse=False)
    assert torch.equal(after, fresh) and not torch.equal(after, before)


def test_a_winograd_copy_is_prepared_again_after_the_weights_change(tiny_unet, short_schedule, monkeypatch):
    """Winograd runs a copy with transformed weights: the cache must notice the original changed."""
    from fastddpm.models import winograd

    if not winograd.available():
        pytest.skip("native extension not built")
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)  # the tiny model's convs are all narrow
    clear_cache()
    ddpm = DDPM(tiny_unet, short_schedule)
    before = _sample(ddpm, winograd=True)
    with torch.no_grad():
        tiny_unet.conv_out.weight.mul_(-1)
    after = _sample(ddpm, winograd=True)
    torch.testing.assert_close(after, _sample(ddpm, winograd=False), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(before, after, atol=1e-3)


def test_a_frozen_snapshot_is_prepared_again_after_the_weights_change(tiny_unet, short_schedule):
    """freeze compiles a copy of the weights: the cache must notice the original changed."""
    clear_cache()
    ddpm = DDPM(tiny_unet, short_schedule)
    options = dict(compile=True, freeze=True, steps=3)
    before = _sample(ddpm, **options)
    with torch.no_grad():
        tiny_unet.conv_out.weight.mul_(-1)
    after = _sample(ddpm, **options)
    eager = _sample(ddpm, steps=3)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, eager, rtol=1e-4, atol=1e-4)


def test_a_checkpoint_by_path_is_loaded_once_while_its_files_are_unchanged(tmp_path, tiny_unet):
    clear_cache()
    path = fastddpm.save(tiny_unet, str(tmp_path / "ck"))
    a = sample(path, 1, steps=2, seed=0, progress=False)
    hits = cache.SAMPLERS.hits
    b = sample(path, 1, steps=2, seed=0, progress=False)
    assert torch.equal(a, b) and cache.SAMPLERS.hits == hits + 1
    with torch.no_grad():
        tiny_unet.conv_out.weight.mul_(-1)
    fastddpm.save(tiny_unet, path)  # new files at the same path (new modification times): loaded again
    c = sample(path, 1, steps=2, seed=0, progress=False)
    assert not torch.equal(a, c)
    clear_cache()


def test_running_from_an_intermediate_step_continues_the_same_process(tiny_unet, short_schedule):
    """DDIM with eta=0 is deterministic: x at step k, run from k-1 down, gives the full run's x0."""
    coeffs = short_schedule.table("step", "cpu", sampler="ddim", eta=0.0)
    sampler = Sampler(tiny_unet, short_schedule, coeffs, (2, 1, 8, 8), channels_last=False)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = {}
    full = sampler.run(x_T=x_T, rng=PhiloxState(0), callback=lambda i, t, x, x0: seen.setdefault(i, x.clone()))
    k = 7  # seen[k] is x after the step at index k: the state at index k - 1
    resumed = sampler.run(x_T=seen[k], start=k - 1, rng=PhiloxState(0))
    torch.testing.assert_close(resumed, full, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"start: expected a schedule index in \[0, 20\)"):
        sampler.run(x_T=x_T, start=20)


def test_the_step_hook_edits_x_after_every_step_on_the_device(tiny_unet, short_schedule):
    coeffs = short_schedule.table("step", "cpu", sampler="ddpm", variance="fixed_large")
    sampler = Sampler(tiny_unet, short_schedule, coeffs, (2, 1, 8, 8), channels_last=False)
    known = torch.full((2, 1, 8, 4), 0.25)
    indices = []

    def keep_left_half(x, i):
        assert torch.is_tensor(i) and i.dtype == torch.int64 and i.shape == (2,)
        indices.append(int(i[0]))
        x[..., :4] = known

    out = sampler.run(generator=torch.Generator().manual_seed(1), step_hook=keep_left_half)
    assert indices == list(range(19, -1, -1))
    assert torch.equal(out[..., :4], known) and not torch.equal(out[..., 4:], known)


def test_speed_options_are_one_validated_object():
    options = SpeedOptions(dtype="bf16", compile="max-autotune")
    assert options.dtype == torch.bfloat16 and hash(options) == hash(SpeedOptions(dtype=torch.bfloat16,
                                                                                   compile="max-autotune"))
    assert SpeedOptions.from_arguments(options, freeze=True).freeze
    with pytest.raises(TypeError, match=r"^compiled: unexpected keyword argument\(s\)"):
        SpeedOptions.from_arguments(compiled=True)
    with pytest.raises(TypeError, match="channels_last: expected a bool"):
        SpeedOptions(channels_last="yes")
    with pytest.raises(TypeError, match="options: expected a fastddpm.SpeedOptions"):
        SpeedOptions.from_arguments({"compile": True})
    with pytest.raises(ValueError, match="freeze: .* needs compile=True"):
        SpeedOptions(freeze=True)
    assert "Winograd" in SpeedOptions.describe("winograd")


def test_speed_options_reach_sample_as_an_object_or_keywords(tiny_unet, short_schedule):
    ddpm = DDPM(tiny_unet, short_schedule)
    a = sample(ddpm, 1, seed=2, progress=False, options=SpeedOptions(channels_last=False, memory_pool=False))
    b = sample(ddpm, 1, seed=2, progress=False, channels_last=False, memory_pool=False)
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="unexpected keyword"):
        sample(ddpm, 1, progress=False, noise="philox")  # the old name: a clear TypeError


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(kind="gaussian"), ValueError, "noise_source: expected one of"),
    (dict(seed="abc"), ValueError, r"seed: expected an int in \[0, 2\*\*63\)"),
    (dict(seed=-1), ValueError, "seed: expected an int"),
    (dict(seed=2**70), ValueError, "seed: expected an int"),
    (dict(seed=1, generator=torch.Generator()), ValueError, "seed / generator: give one"),
    (dict(generator=5), TypeError, "generator: expected a torch.Generator"),
    (dict(kind="philox", generator=torch.Generator()), ValueError, "generator: not used with noise_source='philox'"),
])
def test_noise_source_is_resolved_once_with_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        NoiseSource.resolve(**kwargs)


def test_noise_sources_draw_the_reference_order_or_philox():
    g = NoiseSource.resolve("generator", seed=3)
    expected = torch.randn(2, 3, generator=torch.Generator().manual_seed(3))
    assert g.kind == "generator" and torch.equal(g.initial((2, 3), torch.device("cpu")), expected)
    p = NoiseSource.resolve("philox", seed=3)
    assert p.kind == "philox" and torch.equal(p.initial((2, 3), torch.device("cpu")), PhiloxState(3).randn((2, 3)))
    noise, state = p.step(torch.empty(2, 3))
    assert noise is None and state is p.state
