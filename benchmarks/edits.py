"""The "edits" section: partial diffusion and reverse (``fastddpm.reconstruct``) and ancestral
denoising (``fastddpm.denoise``) from t = 500 on the fast sampler, against the textbook loop
(reference q_sample, then Algorithm 2 in float64 with the reference ops) on the same draws.
The bundled mnist model, batch 16, every one of the 500 reverse steps; each fast result is checked
against the textbook one before it is timed."""

from __future__ import annotations

import platform
from typing import Dict

import torch

import fastddpm
from fastddpm import ops
from fastddpm.data import load_mnist_data
from fastddpm.diffusion import reference_reconstruct, reference_sample

from .harness import interleaved_rounds

TOLERANCE = 1e-3  # the textbook loop steps in float64, the sampler in float32: 500 clipped steps apart


def jobs(t: int, n: int) -> Dict[str, Dict]:
    """{edit name: {"ref": textbook loop, "fast": fastddpm call}} from t, on n bundled MNIST digits."""
    ddpm = fastddpm.load("mnist")
    model, schedule = ddpm.model, ddpm.schedule
    x0 = load_mnist_data()[0][::5000 // n][:n]
    sigma = float(((1 - schedule.abar[t - 1]) / schedule.abar[t - 1]).sqrt())  # the noise level of x_t
    y = x0 + sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))

    def textbook_reconstruct():
        with ops.use_backend("reference"):
            return reference_reconstruct(model, schedule, x0, t, clip=True, generator=torch.Generator().manual_seed(0))

    def textbook_denoise():
        xt = float(schedule.sqrt_abar[t - 1]) * y
        with ops.use_backend("reference"):
            return reference_sample(model, schedule, tuple(y.shape), clip=True, x_T=xt, start=t - 1,
                                    generator=torch.Generator().manual_seed(0))

    return {
        f"reconstruct from t = {t}": dict(
            ref=textbook_reconstruct,
            fast=lambda: fastddpm.reconstruct("mnist", x0, t, generator=torch.Generator().manual_seed(0))),
        f"denoise (ancestral) from sigma = {sigma:.2f}, t = {t}": dict(
            ref=textbook_denoise,
            fast=lambda: fastddpm.denoise("mnist", y, sigma, generator=torch.Generator().manual_seed(0)).x),
    }


def run(device="cpu", quick=False, rounds=3) -> Dict:
    """Each edit and its textbook loop, timed in interleaved rounds (the fast one prepared by a first,
    untimed call, as a user's second call finds it)."""
    if torch.device(device).type != "cpu":
        raise ValueError(f"device: the edits section runs on the CPU, got {device!r}")
    t, n = (20, 2) if quick else (500, 16)
    rows = []
    for name, job in jobs(t, n).items():
        expected = job["ref"]()
        got = job["fast"]()  # also prepares (and keeps) the sampler
        diff = float((got - expected).abs().max())
        if not diff <= TOLERANCE:
            raise AssertionError(f"{name}: the fast sampler differs from the textbook loop by {diff}")
        timed = interleaved_rounds({"reference": job["ref"], "fast": job["fast"]}, torch.device("cpu"), rounds)
        ref, fast = timed["reference"], timed["fast"]
        rows.append(dict(name=f"mnist batch {n}: {name}, {t} steps", ref_s=ref["median"], fast_s=fast["median"],
                         fast_min_s=fast["min"], fast_max_s=fast["max"], speedup=ref["median"] / fast["median"],
                         max_diff=diff))
    return dict(device="cpu", torch=torch.__version__, threads=torch.get_num_threads(),
                machine=platform.processor() or platform.machine(), rounds=rounds, rows=rows)


def markdown(result: Dict) -> str:
    """The rows as a markdown table."""
    lines = ["| case | textbook loop | fast (median) | fast min..max | speed-up | max abs diff |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['ref_s']:.2f} s | {r['fast_s']:.2f} s | {r['fast_min_s']:.2f}.."
                     f"{r['fast_max_s']:.2f} s | {r['speedup']:.2f}x | {r['max_diff']:.1e} |")
    return "\n".join(lines)
