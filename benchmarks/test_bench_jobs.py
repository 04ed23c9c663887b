"""pytest-benchmark: end-to-end jobs, fast path and reference side by side on identical inputs —
one training step, the full sampler, and diffusers' DDPMPipeline on the same weights and noise.

    pytest --import-mode=importlib benchmarks [--quick] [--benchmark-disable]

Each fast result is checked against its reference before it is timed.
"""

import pytest
import torch

from fastddpm import Schedule, UNet, training_loss
from fastddpm.bench.models import random_unet
from fastddpm.bench.sampler import fast_run, reference_run
from fastddpm.bench.train import train_step


@pytest.fixture(scope="module")
def sampler_jobs(sampler_job):
    """(reference fn, {variant: fast fn}) for one (preset, steps) job at batch 16."""
    preset, steps = sampler_job
    model = random_unet(preset, "cpu")
    schedule = Schedule.linear().respaced(steps)
    c, r = model.config.in_channels, model.config.resolution
    shape = (16, c, r, r)
    variants = {"eager": {}, "compiled": {"compile": True}}
    return reference_run(model, schedule, shape, torch.device("cpu"), 0), {
        name: fast_run(model, schedule, shape, torch.device("cpu"), 0, **options) for name, options in variants.items()}


@pytest.mark.parametrize("path", ["reference", "eager", "compiled"])
def test_sampler(benchmark, sampler_jobs, sampler_job, path):
    ref, fast = sampler_jobs
    fn = ref if path == "reference" else fast[path]
    if path != "reference":  # 1000 clipped steps amplify Inductor's reordered float sums
        tol = 1e-2 if sampler_job[1] >= 1000 else 1e-3
        torch.testing.assert_close(fn(), ref(), rtol=tol, atol=tol)
    benchmark.group = f"sampler {sampler_job[0]} batch 16, {sampler_job[1]} steps"
    benchmark.pedantic(fn, rounds=1 if sampler_job[1] >= 1000 else 3, iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("path", ["reference", "compiled"])
def test_train_step(benchmark, path, quick):
    preset = "digits" if quick else "mnist"
    torch._dynamo.reset()
    step = train_step(preset, path == "compiled", lr=1e-4)
    r = UNet.from_preset(preset).config.resolution
    x0 = torch.randn(16, 1, r, r, generator=torch.Generator().manual_seed(1))
    schedule = Schedule.linear()
    torch.manual_seed(0)
    expected = training_loss(UNet.from_preset(preset), schedule, x0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(step().detach(), expected.detach(), rtol=1e-4, atol=1e-5)  # same first loss
    benchmark.group = f"train step {preset} batch 16"
    benchmark(step)


def test_diffusers_pipeline_comparison(benchmark, quick):
    """DDPMPipeline vs fastddpm on the same weights and generator (the section checks agreement)."""
    pytest.importorskip("diffusers")
    from fastddpm.bench import diffusers_cmp

    benchmark.group = "diffusers"
    result = benchmark.pedantic(lambda: diffusers_cmp.run(quick=quick), rounds=1, iterations=1)
    assert result["rows"]
    for r in result["rows"]:
        if r["name"].endswith("eager fp32"):
            assert r["max_diff"] < 1e-3, r
        else:  # compiled / bf16: fastddpm's images move from the eager pipe's no more than the pipe's own do
            assert r["max_diff_vs_eager_pipe"] <= 2 * r["pipe_diff_vs_eager_pipe"] + 1e-2, r


@pytest.mark.parametrize("path", ["sample() call", "prepared sampler run"])
def test_per_call(benchmark, path, quick):
    """A repeated ``fastddpm.sample()`` call (its prepared sampler reused) against one prepared
    Sampler run: the difference is what a call costs beyond its steps."""
    import fastddpm
    from fastddpm import Sampler

    steps = 2 if quick else 10
    ddpm = fastddpm.load("mnist")
    schedule = ddpm.schedule.respaced(steps)
    coeffs = schedule.table("step", "cpu", sampler="ddpm", variance="fixed_large")
    prepared = Sampler(ddpm.model, schedule, coeffs, (16, 1, 32, 32))

    def call():
        return fastddpm.sample("mnist", 16, steps=steps, seed=0, progress=False)

    def run():
        return prepared.run(generator=torch.Generator().manual_seed(0))

    torch.testing.assert_close(call(), run(), rtol=0, atol=1e-6)  # the same samples either way
    benchmark.group = f"per call: mnist batch 16, {steps} steps"
    benchmark.pedantic(call if path == "sample() call" else run, rounds=3, iterations=1, warmup_rounds=1)


@pytest.fixture(scope="module")
def bits_per_dim_jobs():
    """The "likelihood" section's two paths at its quick size (the bundled model, 2 MNIST images,
    all 1000 timesteps), and the reference's result computed once to check each timed result against."""
    from fastddpm.bench.likelihood import jobs

    fns = jobs(2)
    return fns, fns["reference"]()


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_bits_per_dim(benchmark, bits_per_dim_jobs, path):
    """bits/dim: the per-t reference loop against the batched fast path, on the same draws."""
    from fastddpm.bench.likelihood import agree

    fns, expected = bits_per_dim_jobs
    benchmark.group = "bits/dim mnist 2 images, T=1000"
    result = benchmark.pedantic(fns[path], rounds=1, iterations=1, warmup_rounds=0)
    agree(result, expected)


@pytest.mark.parametrize("path", ["textbook loop", "fast sampler"])
@pytest.mark.parametrize("edit", [0, 1], ids=["reconstruct", "denoise"])
def test_edit(benchmark, quick, edit, path):
    """reconstruct / denoise from t on the fast sampler against the textbook loop (same draws)."""
    from fastddpm.bench.edits import TOLERANCE, jobs

    t, n = (20, 2) if quick else (500, 16)
    name, job = list(jobs(t, n).items())[edit]
    fn = job["ref"] if path == "textbook loop" else job["fast"]
    assert float((job["fast"]() - job["ref"]()).abs().max()) <= TOLERANCE
    benchmark.group = f"edit: {name}, mnist batch {n}"
    benchmark.pedantic(fn, rounds=1 if not quick else 2, iterations=1, warmup_rounds=0)
