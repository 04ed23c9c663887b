"""The fast sampler against the reference samplers: every sampler and option on CPU, noise
streams, and the step loop's promise of no host synchronisation."""

import pytest
import torch

from fastddpm import DDPM, Sampler, reference_ddim_sample, reference_sample, sample
from fastddpm.ops import PhiloxState


def _fast(ddpm, n=3, seed=7, **kwargs):
    """sample() in NCHW unless a test asks for channels_last (its own parametrization covers it)."""
    kwargs.setdefault("channels_last", False)
    return sample(ddpm, n, generator=torch.Generator().manual_seed(seed), progress=False, **kwargs)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("options", [{}, {"channels_last": True}, {"batch_size": 2}])
def test_ddpm_equals_the_reference_sampler(tiny_unet, short_schedule, variance, clip, options):
    fast = _fast(DDPM(tiny_unet, short_schedule), variance=variance, clip=clip, **options)
    if options.get("batch_size"):  # batches draw their own x_T and noise, in order
        g = torch.Generator().manual_seed(7)
        ref = torch.cat([reference_sample(tiny_unet, short_schedule, (b, 1, 8, 8), variance=variance, clip=clip,
                                          generator=g) for b in (2, 1)])
    else:
        ref = reference_sample(tiny_unet, short_schedule, (3, 1, 8, 8), variance=variance, clip=clip,
                               generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("direction", ["rederived", "model"])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("steps", [20, 7])
def test_ddim_equals_the_reference_ddim(tiny_unet, short_schedule, eta, clip, direction, steps):
    """The reference DDIM steps in float64, the fast one in float32 (the ddpm_step op); through 20
    steps of a random-weight U-Net that rounding grows chaotically. Its scale: how far the reference
    moves when the model's output is nudged by one ulp at every step (up to 9e-6 here, where a
    wrong coefficient or direction form moves the samples by 1e-2 or more)."""
    fast = _fast(DDPM(tiny_unet, short_schedule), sampler="ddim", eta=eta, clip=clip, ddim_direction=direction,
                 steps=steps)

    def reference(model):
        return reference_ddim_sample(model, short_schedule.respaced(steps), (3, 1, 8, 8), eta=eta, clip=clip,
                                     direction=direction, generator=torch.Generator().manual_seed(7))

    def nudged(x, t):
        eps = tiny_unet(x, t)
        return torch.nextafter(eps, torch.full_like(eps, float("inf")))

    ref = reference(tiny_unet)
    one_ulp = (reference(nudged) - ref).abs().max().item()
    assert 0 < one_ulp < 1e-4
    torch.testing.assert_close(fast, ref, rtol=0, atol=4 * one_ulp + 1e-6)


@pytest.mark.parametrize("steps", [1, 2, 7, 13])
def test_respaced_ddpm_equals_the_reference_on_the_respaced_schedule(tiny_unet, short_schedule, steps):
    fast = _fast(DDPM(tiny_unet, short_schedule), steps=steps, variance="fixed_small")
    ref = reference_sample(tiny_unet, short_schedule.respaced(steps), (3, 1, 8, 8), variance="fixed_small",
                           clip=True, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_ddim_eta_one_with_all_steps_equals_ancestral_fixed_small(tiny_unet, short_schedule):
    ddpm = DDPM(tiny_unet, short_schedule)
    torch.testing.assert_close(_fast(ddpm, sampler="ddim", eta=1.0), _fast(ddpm, variance="fixed_small"),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("freeze", [False, True])
def test_compiled_sampler_equals_the_reference(tiny_unet, short_schedule, freeze):
    torch._dynamo.reset()
    fast = _fast(DDPM(tiny_unet, short_schedule), compile=True, freeze=freeze)
    ref = reference_sample(tiny_unet, short_schedule, (3, 1, 8, 8), clip=True,
                           generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)  # Inductor reorders float sums


def test_freeze_folds_the_weights_into_the_compiled_model(tiny_unet, short_schedule):
    # frozen: the weights become constants of the compiled code, and later changes to the model
    # reach the eager, the plain compiled and newly frozen samplers only (whichever compiled first:
    # dynamo must never hand a frozen graph to another compile, nor the plain graph to a frozen one)
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    coeffs = short_schedule.table("step", "cpu", sampler="ddpm", variance="fixed_large")
    make = lambda **o: Sampler(tiny_unet, short_schedule, coeffs, (2, 1, 8, 8), winograd=False, **o)  # noqa: E731
    run = lambda s: s.run(generator=torch.Generator().manual_seed(3))  # noqa: E731
    compiled, frozen, eager = make(compile=True), make(compile=True, freeze=True), make()
    before_compiled = run(compiled)
    before_frozen, codes = run_and_get_code(run, frozen)
    assert any("_frozen_param" in code for code in codes)  # Inductor's freezing pass ran
    later_compiled = make(compile=True)  # compiled after the frozen one
    with torch.no_grad():
        tiny_unet.conv_out.weight.add_(0.5)
    after_eager = run(eager)
    assert not torch.allclose(after_eager, before_compiled, rtol=1e-3, atol=1e-3)
    for s in (compiled, later_compiled):
        torch.testing.assert_close(run(s), after_eager, rtol=1e-4, atol=1e-4)
    assert torch.equal(run(frozen), before_frozen)
    torch.testing.assert_close(run(make(compile=True, freeze=True)), after_eager, rtol=1e-4, atol=1e-4)  # a new one


@pytest.mark.parametrize("native_bf16", [False, True])
def test_bfloat16_on_a_cpu_without_bf16_arithmetic_warns(tiny_unet, short_schedule, monkeypatch, native_bf16):
    import warnings

    import fastddpm.sampling.prepare
    monkeypatch.setattr(fastddpm.sampling.prepare, "cpu_has_bf16_arithmetic", lambda: native_bf16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fast(DDPM(tiny_unet, short_schedule), dtype="bfloat16", steps=2)
    slow = [w for w in caught if "without bf16 arithmetic" in str(w.message)]
    assert len(slow) == (0 if native_bf16 else 1)


def test_bfloat16_samples_stay_close_to_float32(tiny_unet, short_schedule):
    ddpm = DDPM(tiny_unet, short_schedule)
    diff = (_fast(ddpm, dtype="bfloat16") - _fast(ddpm)).abs()
    assert diff.mean() < 0.05 and diff.max() < 0.5, (diff.mean(), diff.max())


def test_philox_noise_is_reproducible_and_not_the_generator_stream(tiny_unet, short_schedule):
    ddpm = DDPM(tiny_unet, short_schedule)
    a = sample(ddpm, 2, seed=3, noise_source="philox", progress=False)
    b = sample(ddpm, 2, seed=3, noise_source="philox", progress=False)
    c = sample(ddpm, 2, seed=4, noise_source="philox", progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, sample(ddpm, 2, seed=3, progress=False))


def test_philox_sampler_equals_reference_ops_with_the_same_stream(tiny_unet, short_schedule):
    """In-kernel noise is the Philox stream: the reference step fed philox_normal gives the same x."""
    ddpm = DDPM(tiny_unet, short_schedule)
    coeffs = short_schedule.table("step", "cpu", sampler="ddpm", variance="fixed_large")
    fast = Sampler(tiny_unet, short_schedule, coeffs, (2, 1, 8, 8)).run(rng=PhiloxState(11))
    from fastddpm.ops import reference
    state = PhiloxState(11)
    x = state.randn((2, 1, 8, 8))
    with torch.no_grad():
        for i in reversed(range(short_schedule.T)):
            t = torch.full((2,), i)
            z = state.randn(x.shape) if i > 0 else torch.zeros_like(x)
            x = reference.ddpm_step(x, ddpm.model(x, t), t, coeffs, z, 1.0)
    torch.testing.assert_close(fast, x, rtol=1e-5, atol=1e-5)


class _SyncCounter:
    """Counts tensor-to-host reads (item, tolist, bool, int, float, cpu, numpy) while active."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy")

    def __init__(self, monkeypatch):
        self.calls = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counting(t, *a, _name=name, _original=original, **k):
                self.calls.append(_name)
                return _original(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counting)


@pytest.mark.parametrize("noise", ["generator", "philox"])
def test_the_step_loop_never_reads_the_device(tiny_unet, short_schedule, monkeypatch, noise):
    coeffs = short_schedule.table("step", "cpu", sampler="ddpm", variance="fixed_large")
    sampler = Sampler(tiny_unet, short_schedule, coeffs, (2, 1, 8, 8))
    args = dict(generator=torch.Generator().manual_seed(0)) if noise == "generator" else dict(rng=PhiloxState(1))
    x_T = torch.randn(2, 1, 8, 8)
    counter = _SyncCounter(monkeypatch)
    sampler.run(x_T=x_T, **args)
    # one read per run, after the loop: the count of non-finite images (report_nonfinite)
    assert counter.calls == ["__int__"]
    counter.calls.clear()
    sampler.run(x_T=x_T, stop=3, **args)  # a segment (RePaint) is not checked: nothing read at all
    assert counter.calls == []


def test_one_step_compiles_into_one_graph(tiny_unet, short_schedule):
    """fullgraph=True fails on any graph break, so a host read (.item(), a branch on a tensor
    value) anywhere in the step (U-Net + fused update) would fail this test."""
    torch._dynamo.reset()
    coeffs = short_schedule.table("step", "cpu", sampler="ddpm", variance="fixed_large")
    sampler = Sampler(tiny_unet, short_schedule, coeffs, (2, 1, 8, 8))
    sampler.x.copy_(torch.randn(2, 1, 8, 8))
    z = torch.randn(2, 1, 8, 8)
    expected = sampler.x.clone()
    with torch.no_grad():
        sampler._step(sampler.model_rows[5], sampler.step_rows[5], z, None)
        eager, _ = sampler.x.clone(), sampler.x.copy_(expected)
        torch.compile(lambda: sampler._step(sampler.model_rows[5], sampler.step_rows[5], z, None),
                      fullgraph=True, backend="aot_eager")()
    torch.testing.assert_close(sampler.x, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(dtype="int8"), "dtype: expected one of"),
    (dict(compile="fast"), "compile: expected one of"),
    (dict(cuda_graph=True, noise_source="philox"), "cuda_graph: needs a CUDA device"),
    (dict(cuda_graph=True), "noise_source: cuda_graph=True needs noise_source='philox'"),
    (dict(noise_source="gaussian"), "noise_source: expected one of"),
    (dict(noise_source="philox", generator=torch.Generator()), "generator: not used with noise_source='philox'"),
    (dict(graph_steps=0, noise_source="philox"), "graph_steps: expected a positive int"),
    (dict(freeze=True), "freeze: folds a model's weights into its compiled form; it needs compile=True"),
])
def test_sampler_options_are_validated(tiny_unet, short_schedule, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample(DDPM(tiny_unet, short_schedule), 1, progress=False, **kwargs)
