"""The sampler on a GPU: CUDA-graph replay against eager, fresh noise per replay, no memory growth,
no host sync in the loop. Skipped cleanly without a GPU; run by benchmarks/gpu_check.sh."""

import pytest
import torch

from fastddpm import Sampler, Schedule, UNet, reference_sample
from fastddpm.ops import PhiloxState

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def model():
    from conftest import randomize_zero_init

    torch.manual_seed(0)
    return randomize_zero_init(UNet.from_preset("digits")).cuda().eval()


def _sampler(model, T=20, **kwargs):
    schedule = Schedule.linear(T=T, beta_start=1e-3, beta_end=0.2) if T < 1000 else Schedule.linear()
    coeffs = schedule.table("step", "cuda", sampler="ddpm", variance="fixed_large")
    return Sampler(model, schedule, coeffs, (4, 1, 8, 8), device="cuda", **kwargs)


def test_sampler_equals_the_reference_on_gpu(model):
    torch.backends.cudnn.allow_tf32 = False
    schedule = Schedule.linear(T=20, beta_start=1e-3, beta_end=0.2)
    fast = _sampler(model).run(generator=torch.Generator("cuda").manual_seed(3))
    ref = reference_sample(model, schedule, (4, 1, 8, 8), clip=True, generator=torch.Generator("cuda").manual_seed(3),
                           device="cuda")
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("graph_steps", [1, 3, 20])
def test_cuda_graph_replay_equals_eager(model, graph_steps):
    x_T = torch.randn(4, 1, 8, 8, device="cuda")
    eager = _sampler(model).run(rng=PhiloxState(5, device="cuda"), x_T=x_T)
    state = PhiloxState(5, device="cuda")
    graphed = _sampler(model, cuda_graph=True, graph_steps=graph_steps).run(rng=state, x_T=x_T)
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
    assert state.tensor.tolist() == [5, 19]  # one draw per noisy step (all but the last)


def test_frozen_compiled_graph_equals_eager(model):
    torch._dynamo.reset()
    x_T = torch.randn(4, 1, 8, 8, device="cuda")
    eager = _sampler(model).run(rng=PhiloxState(5, device="cuda"), x_T=x_T)
    frozen = _sampler(model, compile=True, freeze=True, cuda_graph=True, graph_steps=5)
    torch.testing.assert_close(frozen.run(rng=PhiloxState(5, device="cuda"), x_T=x_T), eager, rtol=1e-4, atol=1e-4)


def test_replays_draw_fresh_noise(model):
    sampler = _sampler(model, cuda_graph=True, graph_steps=5)
    x_T = torch.randn(4, 1, 8, 8, device="cuda")
    state = PhiloxState(1, device="cuda")
    a, b = sampler.run(rng=state, x_T=x_T), sampler.run(rng=state, x_T=x_T)
    assert not torch.equal(a, b)
    assert torch.equal(a, sampler.run(rng=PhiloxState(1, device="cuda"), x_T=x_T))


def test_no_memory_growth_over_1000_steps(model):
    """Replays allocate nothing per step: a 1000-step run ends where it began (plus the returned
    copy), and its peak is within a small constant of that (x_T is drawn with a few temporaries)."""
    sampler = _sampler(model, T=1000, cuda_graph=True, graph_steps=10)
    state = PhiloxState(2, device="cuda")
    sampler.run(rng=state)  # captures the graphs
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = sampler.run(rng=state)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    assert torch.cuda.memory_allocated() <= before + 4096  # the returned copy, in allocator blocks
    assert torch.cuda.max_memory_allocated() <= before + (1 << 20)  # 1000 steps' activations would be far more


@pytest.mark.parametrize("noise", ["generator", "philox"])
def test_eager_loop_does_not_sync(model, noise):
    sampler = _sampler(model)
    x_T = torch.randn(4, 1, 8, 8, device="cuda")
    args = dict(generator=torch.Generator("cuda").manual_seed(0)) if noise == "generator" else \
        dict(rng=PhiloxState(0, device="cuda"))
    sampler.run(x_T=x_T, **args)  # first call: kernels load, cuDNN picks algorithms
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sampler.run(x_T=x_T, **args)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_sample_on_cuda_by_name(model):
    """``device="cuda"`` with a model on cuda:0 and a ``Generator("cuda")``: the same device."""
    from fastddpm import DDPM, sample

    schedule = Schedule.linear(T=20, beta_start=1e-3, beta_end=0.2)
    a = sample(DDPM(model, schedule), 2, device="cuda", seed=0, progress=False)
    b = sample(DDPM(model, schedule), 2, device="cuda", generator=torch.Generator("cuda").manual_seed(0),
               progress=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("source", ["generator", "philox"])
def test_per_image_seeds_on_cuda_skip_the_batch_invariant_mode(model, source, monkeypatch):
    """On CUDA, per-image runs promise the same noise, not bit-equal images (docs/distributed.md),
    so they neither enter BatchInvariant nor pad a lone image; images agree to float rounding."""
    from fastddpm import DDPM, sample
    from fastddpm.sampling import api

    def refuse():
        raise AssertionError("BatchInvariant entered on CUDA")

    monkeypatch.setattr(api, "BatchInvariant", refuse)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # differences of algorithm, not of TF32
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    ddpm = DDPM(model, Schedule.linear(T=20, beta_start=1e-3, beta_end=0.2))
    run = dict(seed=3, per_image_seeds=True, noise_source=source, device="cuda", progress=False)
    whole = sample(ddpm, 8, batch_size=8, **run)
    torch.testing.assert_close(sample(ddpm, 8, batch_size=3, **run), whole, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sample(ddpm, 1, first_index=2, **run), whole[2:3], rtol=1e-4, atol=1e-4)
    assert not torch.equal(whole[0], whole[1])
