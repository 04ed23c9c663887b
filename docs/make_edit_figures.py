"""Make the pictures and the denoising table of docs/edits.md with the bundled mnist model.

    python docs/make_edit_figures.py [reconstruct interpolate denoise inpaint progressive shared]

(from the repository root; all of them take about ten minutes on 2 CPU cores)

Every image is drawn from the bundled MNIST images (all 5,000 were in the model's training set).
"""

from __future__ import annotations

import os
import sys
import time

import torch

import fastddpm
from fastddpm.data import load_mnist_data

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "edits")
STEPS = 100  # reverse steps of every run (respaced); the 1000-step runs look the same, slower
SCALE = 3


def save(x, name, nrow):
    path = fastddpm.save_grid(x, os.path.join(OUT, name), nrow=nrow, scale=SCALE)
    print("wrote", os.path.relpath(path))


def psnr(x, ref):
    """PSNR in dB of images in [-1, 1] (on the [0, 1] scale), averaged over images."""
    mse = ((x.clamp(-1, 1) - ref) ** 2).flatten(1).mean(1) / 4
    return float((10 * torch.log10(1 / mse)).mean())


def main(which):
    os.makedirs(OUT, exist_ok=True)
    images = load_mnist_data()[0]
    x = images[::625][:8]  # 8 digits spread over the (class-sorted) file
    opts = dict(steps=STEPS, seed=0, progress=False)
    if "reconstruct" in which:
        reconstruct(x, opts)
    if "interpolate" in which:
        interpolate(images, opts)
    if "denoise" in which:
        denoise(images, opts)
    if "inpaint" in which:
        inpaint(x, opts)
    if "progressive" in which:
        progressive()
    if "shared" in which:
        shared(opts)


def reconstruct(x, opts):
    ts = (100, 250, 500, 750)
    rows = [x] + [fastddpm.reconstruct("mnist", x, t, **opts) for t in ts]
    save(torch.cat(rows), "reconstruct.png", nrow=len(x))


def interpolate(images, opts):
    a, b = images[[0, 1000, 2000, 3000]], images[[4500, 3500, 2500, 1500]]
    lambdas = [i / 8 for i in range(9)]
    morph = fastddpm.interpolate("mnist", a, b, 500, lambdas, mode="slerp", **opts)
    save(torch.cat([a.unsqueeze(1), morph, b.unsqueeze(1)], 1).reshape(-1, 1, 32, 32), "interpolate.png",
         nrow=len(lambdas) + 2)


def denoise(images, opts):
    g = torch.Generator().manual_seed(1)
    clean = images[::78][:64]  # spread over the (class-sorted) file
    lines = ["| sigma | noisy | ancestral reverse | posterior mean (one model call) | sigma estimated |",
             "|---:|---:|---:|---:|---:|"]
    shown = slice(None, None, 8)  # 8 of the 64, every class or so
    rows = [clean[shown]]
    for sigma in (0.1, 0.2, 0.4, 0.8):
        y = clean + sigma * torch.randn(clean.shape, generator=g)
        anc = fastddpm.denoise("mnist", y, sigma, mode="ancestral", **opts)
        mean = fastddpm.denoise("mnist", y, sigma, mode="posterior_mean", **opts)
        est = fastddpm.denoise("mnist", y, mode="posterior_mean", **opts).sigma
        lines.append(f"| {sigma} | {psnr(y, clean):.1f} dB | {psnr(anc.x, clean):.1f} dB | {psnr(mean.x, clean):.1f} dB"
                     f" | {float(est[0]):.3f} |")
        if sigma in (0.2, 0.8):
            rows += [y[shown], anc.x[shown], mean.x[shown]]
    save(torch.cat(rows), "denoise.png", nrow=8)
    print("\n".join(lines))


def inpaint(x, opts):
    known = torch.ones(32, 32)
    known[:, 16:] = 0
    masked = torch.where(known.bool(), x, torch.zeros_like(x))
    fill = fastddpm.inpaint("mnist", x, known, **opts)
    repaint = fastddpm.inpaint("mnist", x, known, resample=5, jump=10, **opts)
    save(torch.cat([x, masked, fill, repaint]), "inpaint.png", nrow=len(x))


def progressive():
    prog = fastddpm.progressive("mnist", 6, steps=1000, every=100, seed=0, progress=False)
    save(prog.frames.transpose(0, 1).reshape(-1, 1, 32, 32), "progressive.png", nrow=len(prog.timesteps))


def shared(opts):
    shared = fastddpm.from_shared_latent("mnist", (250, 500, 750, 1000), samples=6, **opts)
    save(torch.cat([shared.latents.unsqueeze(1), shared.samples], 1).reshape(-1, 1, 32, 32), "shared.png", nrow=7)


if __name__ == "__main__":
    start = time.monotonic()
    main(sys.argv[1:] or ["reconstruct", "interpolate", "denoise", "inpaint", "progressive", "shared"])
    print(f"done in {time.monotonic() - start:.0f} s")
