"""The "diffusers" section: what users run today — diffusers' ``DDPMPipeline`` (a ``UNet2DModel``,
randomly initialised: nothing is downloaded, and a ``DDPMScheduler``, fixed_large, clip_sample) —
against ``fastddpm.accelerate(pipe)`` on the same weights and the same generator, for two configs:

* google/ddpm-cifar10-32 (the paper's CIFAR-10 U-Net, 32 px);
* the 128 px model of diffusers' ``examples/unconditional_image_generation/train_unconditional.py``
  (six levels, diffusers' default time embedding and multi-head attention).

Each pair is timed interleaved in one run (pipe, accelerated, pipe, accelerated, ...), first both
eager in float32 (where the images must agree to rounding), then each at its best on this
machine: the pipeline with ``torch.compile`` on its U-Net, channels_last, and bf16 autocast where
the device has bf16 arithmetic; the accelerated call with fastddpm's ``compile`` (and ``freeze``
on the CPU), channels_last and bf16 under the same condition. A config the converter does not
support yet is reported as skipped, with the reason. diffusers is an optional dependency
(``pip install .[bench]``)."""

from __future__ import annotations

import contextlib
from typing import Dict, List

import torch

import fastddpm
from fastddpm.utils import cpu_has_bf16_arithmetic

from .harness import interleaved_rounds

CIFAR10_CONFIG = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                      layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                                            "DownBlock2D"),
                      up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32,
                      norm_eps=1e-6, freq_shift=1, flip_sin_to_cos=False, downsample_padding=0, attention_head_dim=None)
# train_unconditional.py's model at --resolution 128; every other field is UNet2DModel's default
TRAIN_EXAMPLE_CONFIG = dict(sample_size=128, in_channels=3, out_channels=3, layers_per_block=2,
                            block_out_channels=(128, 128, 256, 256, 512, 512),
                            down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D",
                                              "AttnDownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D",
                                            "UpBlock2D"))
QUICK_CONFIG = dict(CIFAR10_CONFIG, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
# (name, config, (batch, steps) on the CPU, (batch, steps) on a GPU)
CASES = [("ddpm-cifar10-32", CIFAR10_CONFIG, (4, 100), (64, 1000)),
         ("train_unconditional 128 px", TRAIN_EXAMPLE_CONFIG, (1, 20), (16, 100))]
QUICK_CASES = [("quick config", QUICK_CONFIG, (2, 10), (2, 10))]
# eager images must agree to float32 rounding (docs/diffusers.md); the best settings may use bf16
EAGER_TOLERANCE = 1e-3


def bf16_available(device: torch.device) -> bool:
    """Whether bf16 is native arithmetic on ``device`` (not emulated: then it is not "best")."""
    return device.type == "cuda" or bool(cpu_has_bf16_arithmetic())


def make_pipe(config: dict, device: torch.device):
    """A DDPMPipeline of ``config`` with random weights (seed 0) on ``device``."""
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**config)
    with torch.no_grad():  # random weights everywhere (no zero-initialised layer left)
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                        variance_type="fixed_large", clip_sample=True)
    pipe = diffusers.DDPMPipeline(unet=unet.to(device).eval(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tune_pipe(pipe, device: torch.device, bf16: bool):
    """The pipeline at its best here: channels_last, torch.compile'd U-Net; returns the autocast
    context its calls run in (bf16 where native, else none)."""
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.unet = torch.compile(pipe.unet)
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext


def compare_case(name: str, config: dict, batch: int, steps: int, device: torch.device, rounds: int,
                 best: bool) -> List[Dict]:
    """Rows for one config: eager fp32 against eager fp32, then each at its best."""
    pipe = make_pipe(config, device)
    bf16 = bf16_available(device)
    eager = fastddpm.accelerate(pipe)
    fast_best = fastddpm.accelerate(pipe, compile=True, freeze=device.type == "cpu",
                                    dtype="bfloat16" if bf16 else "float32")  # converted before the pipe is tuned

    def call(fn, context=contextlib.nullcontext):
        with context():
            return fn(batch_size=batch, generator=torch.Generator(device).manual_seed(0), num_inference_steps=steps,
                      output_type="np").images

    rows = []
    pairs = [("eager fp32", lambda: call(pipe), lambda: call(eager))]
    if best:
        reference = call(pipe)  # the eager pipeline's images, before it is tuned
        context = tune_pipe(pipe, device, bf16)
        label = "best (compile, channels_last" + (", bf16)" if bf16 else ", fp32: no native bf16)")
        pairs.append((label, lambda: call(pipe, context), lambda: call(fast_best)))
    for label, theirs, ours in pairs:
        theirs_x, ours_x = theirs(), ours()  # warm-up (compiles), and the images compared
        diff = float(abs(theirs_x - ours_x).max())
        if label == "eager fp32" and diff > EAGER_TOLERANCE:
            raise AssertionError(f"diffusers comparison: {name}: accelerate(pipe) differs from DDPMPipeline by {diff}")
        stats = interleaved_rounds({"pipe": theirs, "fast": ours}, device, rounds)
        row = dict(name=f"{name} batch {batch}, {steps} steps: {label}", ref_s=stats["pipe"]["median"],
                   fast_s=stats["fast"]["median"], fast_min_s=stats["fast"]["min"], fast_max_s=stats["fast"]["max"],
                   speedup=stats["pipe"]["median"] / stats["fast"]["median"], max_diff=diff)
        if label != "eager fp32":
            row["max_diff_vs_eager_pipe"] = float(abs(ours_x - reference).max())
        rows.append(row)
    return rows


def run(device="cpu", quick=False, rounds=3) -> Dict:
    """Time DDPMPipeline against accelerate(pipe) for each config (see the module docstring)."""
    import diffusers

    device = torch.device(device)
    rows, unsupported = [], []
    for name, config, cpu_size, gpu_size in (QUICK_CASES if quick else CASES):
        batch, steps = cpu_size if device.type == "cpu" else gpu_size
        try:
            rows += compare_case(name, config, batch, steps, device, rounds, best=not quick)
        except ValueError as e:  # the converter does not support this architecture (yet): say which field
            unsupported.append(f"{name}: {e}")
    return dict(device=str(device), diffusers=diffusers.__version__, rounds=rounds, rows=rows,
                unsupported=unsupported)  # not "skipped": the report reads that as the whole section's


def markdown(result: Dict) -> str:
    """The rows as a markdown table (and the configs skipped, with their reasons)."""
    lines = [f"diffusers {result['diffusers']}; images compared in [0, 1]; DDPMPipeline against "
             f"fastddpm.accelerate(pipe), same weights and generator, interleaved", "",
             "| case | DDPMPipeline | accelerate(pipe) | speed-up | max abs diff |", "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['ref_s']:.2f} s | {r['fast_s']:.2f} s | {r['speedup']:.2f}x | "
                     f"{r['max_diff']:.1e} |")
    lines += [f"\nnot supported, skipped: {s}" for s in result.get("unsupported", [])]
    return "\n".join(lines)
