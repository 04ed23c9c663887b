"""The "diffusers" section: what users run today — diffusers' ``DDPMPipeline`` (a ``UNet2DModel``,
randomly initialised: nothing is downloaded, and a ``DDPMScheduler``, fixed_large, clip_sample) —
against fastddpm on the same weights, for two configs:

* google/ddpm-cifar10-32 (the paper's CIFAR-10 U-Net, 32 px);
* the 128 px model of diffusers' ``examples/unconditional_image_generation/train_unconditional.py``
  (six levels, diffusers' default time embedding and multi-head attention).

Three contenders run interleaved in rounds (pipe, accelerated, sample(), pipe, ...), so the
machine's drift falls on all alike: the pipeline; ``fastddpm.accelerate(pipe)`` (the pipeline's
call and generator draws, so its images are compared); and ``fastddpm.sample()`` on the same
converted weights, called afresh each round as a user calls it (the per-call view: its prepared
sampler is found again in the cache). Each contender's first call (conversion, compilation) is
timed on its own, and ``calls`` whole calls are totalled: what a user pays for ten pipeline calls
against ten ``sample()`` calls. The settings, per precision:

* eager fp32, each side's defaults (fastddpm's include channels_last and the CPU's Winograd
  convolutions), where the images must agree to float32 rounding;
* each at its best in fp32: the pipeline's U-Net under ``torch.compile`` in channels_last (Inductor's
  weight freezing gave its steps no speed and tripled its compile time, so it is left out),
  fastddpm with ``compile`` (and ``freeze`` on the CPU);
* each at its best in bf16 where the device has bf16 arithmetic (a CUDA GPU, a CPU with
  ``avx512_bf16`` or AMX): the compiled pipeline under bf16 autocast, fastddpm in bf16.

A config the converter does not support yet is reported as unsupported, with the reason. diffusers
is an optional dependency (``pip install .[bench]``)."""

from __future__ import annotations

import contextlib
import gc
import json
from typing import Callable, Dict, List, Tuple

import torch

import fastddpm
from fastddpm.utils import cpu_has_bf16_arithmetic

from .harness import interleaved_rounds, time_rounds

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
CASES = [("ddpm-cifar10-32", CIFAR10_CONFIG, (16, 10), (64, 1000)),
         ("train_unconditional 128 px", TRAIN_EXAMPLE_CONFIG, (1, 10), (16, 100))]
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


def tune_pipe(pipe):
    """The pipeline at its best here: channels_last and a ``torch.compile``'d U-Net. The compiled
    U-Net serves fp32 and, under autocast, bf16 calls."""
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.unet = torch.compile(pipe.unet)


def settings(device: torch.device, best: bool) -> List[Tuple[str, Dict, Callable]]:
    """(label, fastddpm's speed options, the pipeline's call context) for each setting compared."""
    cpu = device.type == "cpu"
    rows = [("eager fp32", {}, contextlib.nullcontext)]
    if best:
        rows.append(("best fp32 (compiled, channels_last" + (", frozen)" if cpu else ")"),
                     dict(compile=True, freeze=cpu), contextlib.nullcontext))
        if bf16_available(device):
            rows.append(("best bf16 (compiled, channels_last" + (", frozen" if cpu else "") + ", bf16)",
                         dict(compile=True, freeze=cpu, dtype="bfloat16"),
                         lambda: torch.autocast(device.type, dtype=torch.bfloat16)))
    return rows


class Unsupported(Exception):
    """A config the diffusers converter does not support (yet)."""


def _first_call(fn, device: torch.device) -> Tuple[float, object]:
    stats, result = time_rounds(fn, device, 1)  # synced on a GPU, like the rounds
    return stats["median"], result


def compare_case(name: str, config: dict, batch: int, steps: int, device: torch.device, rounds: int,
                 best: bool, calls: int) -> List[Dict]:
    """Rows for one config: each setting of :func:`settings`, its three contenders interleaved;
    ``calls`` whole calls of each in the best settings (their first call included), ``rounds`` in
    the eager one."""
    pipe = make_pipe(config, device)
    try:
        model = fastddpm.models.unet_from_diffusers(pipe.unet)
    except ValueError as e:
        raise Unsupported(str(e)) from e
    # sample()'s steps: as many U-Net calls as the pipeline's num_inference_steps (same work a call)
    ddpm = fastddpm.DDPM(model, fastddpm.Schedule.linear())
    reference = None
    rows = []
    for label, options, context in settings(device, best):
        fast = fastddpm.accelerate(pipe, **options)
        if label != "eager fp32" and not hasattr(pipe.unet, "_orig_mod"):  # not compiled yet
            tune_pipe(pipe)

        def theirs(context=context):
            with context():
                return pipe(batch_size=batch, generator=torch.Generator(device).manual_seed(0),
                            num_inference_steps=steps, output_type="np").images

        def ours(fast=fast):
            return fast(batch_size=batch, generator=torch.Generator(device).manual_seed(0),
                        num_inference_steps=steps, output_type="np").images

        def sample(options=options):
            return fastddpm.sample(ddpm, batch, steps=steps, seed=0, device=device, progress=False, **options)

        firsts = {}
        firsts["pipe"], theirs_x = _first_call(theirs, device)
        firsts["fast"], ours_x = _first_call(ours, device)
        firsts["sample"], _ = _first_call(sample, device)
        if reference is None:
            reference = theirs_x  # the eager pipeline's images
        diff = float(abs(theirs_x - ours_x).max())
        if label == "eager fp32" and diff > EAGER_TOLERANCE:
            raise AssertionError(f"diffusers comparison: {name}: accelerate(pipe) differs from DDPMPipeline by {diff}")
        n_rounds = rounds if label == "eager fp32" else max(calls - 1, 1)
        stats = interleaved_rounds({"pipe": theirs, "fast": ours, "sample": sample}, device, n_rounds)
        row = dict(name=f"{name} batch {batch}, {steps} steps: {label}", ref_s=stats["pipe"]["median"],
                   fast_s=stats["fast"]["median"], fast_min_s=stats["fast"]["min"], fast_max_s=stats["fast"]["max"],
                   sample_s=stats["sample"]["median"], speedup=stats["pipe"]["median"] / stats["fast"]["median"],
                   sample_speedup=stats["pipe"]["median"] / stats["sample"]["median"], max_diff=diff,
                   calls=n_rounds + 1, steps=steps, batch=batch,
                   **{f"{k}_first_s": v for k, v in firsts.items()},
                   **{f"{k}_calls_total_s": firsts[k] + stats[k]["total"] for k in firsts})
        if label != "eager fp32":  # how far each side's fast settings move its images from the eager pipe's
            row["max_diff_vs_eager_pipe"] = float(abs(ours_x - reference).max())
            row["pipe_diff_vs_eager_pipe"] = float(abs(theirs_x - reference).max())
        rows.append(row)
        print(json.dumps(row), flush=True)
        # this setting's prepared samplers (converted, frozen copies of the model) go before the next's
        fastddpm.sampling.clear_cache()
        del fast, ours, sample
        gc.collect()
    return rows


def run(device="cpu", quick=False, rounds=3, calls: int = 10) -> Dict:
    """Time DDPMPipeline against fastddpm for each config (see the module docstring); ``calls``:
    whole calls of each contender in the best settings."""
    import diffusers

    device = torch.device(device)
    rows, unsupported = [], []
    for name, config, cpu_size, gpu_size in (QUICK_CASES if quick else CASES):
        batch, steps = cpu_size if device.type == "cpu" else gpu_size
        try:
            rows += compare_case(name, config, batch, steps, device, rounds, best=not quick,
                                 calls=2 if quick else calls)
        except Unsupported as e:  # the converter does not support this architecture (yet): say which field
            unsupported.append(f"{name}: {e}")
    return dict(device=str(device), diffusers=diffusers.__version__, rounds=rounds, rows=rows,
                unsupported=unsupported)  # not "skipped": the report reads that as the whole section's


def markdown(result: Dict) -> str:
    """The rows as two markdown tables (per call; first call and whole runs of calls), and the
    configs not supported, with their reasons."""
    lines = [f"diffusers {result['diffusers']}; images compared in [0, 1]; DDPMPipeline against "
             f"fastddpm.accelerate(pipe) and fastddpm.sample() on the same weights, interleaved; medians of "
             f"repeated calls", "",
             "| case | DDPMPipeline | accelerate(pipe) | speed-up | sample() | speed-up | max abs diff |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['ref_s']:.2f} s | {r['fast_s']:.2f} s | {r['speedup']:.2f}x | "
                     f"{r['sample_s']:.2f} s | {r['sample_speedup']:.2f}x | {r['max_diff']:.1e} |")
    lines += ["", "Per call, as a user meets it: the first call (conversion, compilation) and the total of "
              "the first and the repeated calls", "",
              "| case | calls | DDPMPipeline first / total | accelerate(pipe) first / total | "
              "sample() first / total | total speed-up, sample() |", "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if "pipe_first_s" not in r:
            continue
        lines.append(f"| {r['name']} | {r['calls']} | {r['pipe_first_s']:.1f} / {r['pipe_calls_total_s']:.1f} s | "
                     f"{r['fast_first_s']:.1f} / {r['fast_calls_total_s']:.1f} s | {r['sample_first_s']:.1f} / "
                     f"{r['sample_calls_total_s']:.1f} s | "
                     f"{r['pipe_calls_total_s'] / r['sample_calls_total_s']:.2f}x |")
    lines += [f"\nnot supported, skipped: {s}" for s in result.get("unsupported", [])]
    return "\n".join(lines)
