"""The "likelihood" section: the variational bound in bits/dim of the bundled MNIST model on bundled
MNIST images (all T = 1000 timesteps, fixed_large, seed 0): the batched fast path
(``fastddpm.bits_per_dim``: (image, t) pairs in large forward passes of the prepared model, x_t from the
fused q_sample op) against the per-t reference loop (``reference_bits_per_dim``: one model call per
timestep on all images, the forward process in float64), checked to agree to 1e-4 bits/dim."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List

import torch

import fastddpm
from fastddpm.likelihood import BitsPerDim, bits_per_dim, mnist_images, reference_bits_per_dim

from .harness import sync

TOLERANCE = 1e-4  # bits/dim, per image


def jobs(n: int, device="cpu", **speed) -> Dict[str, Callable[[], BitsPerDim]]:
    """``{"reference": fn, "fast": fn}`` computing the bound of the bundled model on ``n`` MNIST
    images with the same draws (seed 0); ``speed``: SpeedOptions fields for the fast path."""
    device = torch.device(device)
    ddpm = fastddpm.load("mnist", device=device)
    x0 = mnist_images(n, ddpm.image_shape[-1]).to(device)

    def reference():
        return reference_bits_per_dim(ddpm.model, ddpm.schedule, x0, prediction=ddpm.prediction, seed=0)

    def fast():
        return bits_per_dim(ddpm, x0, seed=0, device=device, progress=False, **speed)

    return {"reference": reference, "fast": fast}


def agree(a: BitsPerDim, b: BitsPerDim) -> float:
    """The largest per-image difference of the totals; an AssertionError above :data:`TOLERANCE`."""
    diff = float((a.total - b.total).abs().max())
    if not diff <= TOLERANCE:
        raise AssertionError(f"bits/dim: fast path and reference differ by {diff:.3g} bits/dim (> {TOLERANCE})")
    return diff


def run(device="cpu", quick=False, rounds=1) -> Dict:
    """Time both paths, a round of each in turn (a call is long: no warm-up call; the fast path's
    time includes preparing the model); the first round's results are checked to agree."""
    device = torch.device(device)
    n = 2 if quick else 256
    fns = jobs(n, device)
    times: Dict[str, List[float]] = {name: [] for name in fns}
    results: Dict[str, BitsPerDim] = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            results.setdefault(name, fn())
            sync(device)
            times[name].append(time.perf_counter() - start)
    diff = agree(results["fast"], results["reference"])
    ref, fast = statistics.median(times["reference"]), statistics.median(times["fast"])
    mean = results["fast"].mean()
    rows = [dict(name=f"bits/dim mnist {n} images x T=1000, batched vs per-t loop", ref_s=ref, fast_s=fast,
                 fast_min_s=min(times["fast"]), fast_max_s=max(times["fast"]), speedup=ref / fast,
                 bits_per_dim=mean["total"], prior=mean["prior"], kl=mean["kl"], decoder=mean["decoder"],
                 max_diff=diff)]
    return dict(device=str(device), rounds=rounds, rows=rows)


def markdown(result: Dict) -> str:
    """The rows as a markdown table."""
    lines = ["| case | reference | fast (median) | fast min..max | speed-up | bits/dim (prior + KL + decoder) | "
             "max diff |", "|---|---:|---:|---:|---:|---|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['ref_s']:.2f} s | {r['fast_s']:.2f} s | {r['fast_min_s']:.2f}.."
                     f"{r['fast_max_s']:.2f} s | {r['speedup']:.2f}x | {r['bits_per_dim']:.4f} ({r['prior']:.1e} + "
                     f"{r['kl']:.4f} + {r['decoder']:.4f}) | {r['max_diff']:.1e} |")
    return "\n".join(lines)
