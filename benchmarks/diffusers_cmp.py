"""The "diffusers" section: what users run today — diffusers' ``DDPMPipeline`` with a
``UNet2DModel`` in the configuration of google/ddpm-cifar10-32 (randomly initialised; nothing is
downloaded) and a ``DDPMScheduler`` (fixed_large, clip_sample) — against fastddpm's sampler on the
same weights (converted by :func:`fastddpm.models.unet_from_diffusers`) and the same noise.
diffusers is an optional dependency (``pip install .[bench]``)."""

from __future__ import annotations

from typing import Dict

import torch

from fastddpm import DDPM, Schedule, sample
from fastddpm.models import unet_from_diffusers

from .harness import time_rounds

CIFAR10_CONFIG = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                      layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                                            "DownBlock2D"),
                      up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32,
                      norm_eps=1e-6, freq_shift=1, flip_sin_to_cos=False, downsample_padding=0, attention_head_dim=None)
QUICK_CONFIG = dict(CIFAR10_CONFIG, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def run(device="cpu", quick=False, rounds=1) -> Dict:
    """Time DDPMPipeline and fastddpm.sample (eager; compiled) on the same weights and generator."""
    import diffusers

    device = torch.device(device)
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**(QUICK_CONFIG if quick else CIFAR10_CONFIG)).to(device).eval()
    with torch.no_grad():
        for p in unet.parameters():  # random weights everywhere (diffusers zero-inits nothing, but be sure)
            p.add_(0.02 * torch.randn_like(p))
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                        variance_type="fixed_large", clip_sample=True)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    batch, steps = (2, 10) if quick else ((4, 100) if device.type == "cpu" else (64, 1000))

    def theirs():
        return pipe(batch_size=batch, generator=torch.Generator(device).manual_seed(0), num_inference_steps=steps,
                    output_type="np").images

    pipe.scheduler.set_timesteps(steps)
    schedule = Schedule.linear().respace(sorted(pipe.scheduler.timesteps.tolist()))  # diffusers' "leading" steps
    ddpm = DDPM(unet_from_diffusers(unet).to(device).eval(), schedule)

    def ours(**options):
        x = sample(ddpm, batch, generator=torch.Generator(device).manual_seed(0), device=device, progress=False,
                   **options)
        return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()

    def timed(fn):
        stats, out = time_rounds(fn, device, rounds)
        return out, stats["median"]

    ref_x, ref_s = timed(theirs)
    rows = []
    variants = [("fastddpm eager", {})] + ([] if quick else [("fastddpm compiled", {"compile": True})])
    if device.type == "cuda" and not quick:
        variants.append(("fastddpm compiled, bf16", {"compile": True, "dtype": "bfloat16"}))
    for name, options in variants:
        ours(**options)  # warm-up (compile)
        x, t = timed(lambda options=options: ours(**options))
        diff = float(abs(x - ref_x).max())
        if "dtype" not in options and diff > 1e-3:
            raise AssertionError(f"diffusers comparison: {name} differs from DDPMPipeline by {diff}")
        rows.append(dict(name=f"{'quick config' if quick else 'ddpm-cifar10-32 config'} batch {batch}, {steps} "
                              f"steps: {name} vs DDPMPipeline", ref_s=ref_s, fast_s=t, fast_min_s=t, fast_max_s=t,
                         speedup=ref_s / t, max_diff=diff))
    return dict(device=str(device), diffusers=diffusers.__version__, rounds=rounds, rows=rows)


def markdown(result: Dict) -> str:
    """The rows as a markdown table."""
    lines = [f"diffusers {result['diffusers']}; images compared in [0, 1]", "",
             "| case | DDPMPipeline | fastddpm | speed-up | max abs diff |", "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['ref_s']:.2f} s | {r['fast_s']:.2f} s | {r['speedup']:.2f}x | "
                     f"{r['max_diff']:.1e} |")
    return "\n".join(lines)
