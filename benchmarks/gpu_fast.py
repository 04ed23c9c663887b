"""Two phases of benchmarks/gpu_check.sh, the sampler at its fastest on a GPU:

* ``fast-256``: the cifar10 U-Net (random weights), 256 images x 1000 steps in bf16, channels_last,
  in-kernel Philox noise, CUDA graphs and torch.compile, for each ``--variants`` entry
  ``MODE:GRAPH_STEPS`` (a ``SpeedOptions.compile`` mode and ``graph_steps``): the first run
  (compile, capture, 1000 steps) and a timed run; images/s and the U-Net's TFLOP/s. Then the eager
  forward at batch 256 with each op backend (``--no-eager-forward``: not).
* ``latency-1``: batch 1, 200 steps: per-step latency eager, with CUDA graphs (fp32, bf16), compiled
  with CUDA graphs; and the eager U-Net forward with each op backend's group norm (the measurement
  that decides whether the native CUDA group norm is still needed eagerly; docs/gpu.md). At
  batch 1 kernel launches dominate, at batch 256 (``fast-256``) the kernels themselves.

Each result is printed as a JSON line and appended to ``OUT/PHASE.jsonl`` as soon as it is measured,
and ``OUT/PHASE.md`` is rewritten from all of them, so a run cut short by its time limit still
leaves a readable summary (phases run as separate processes, each with its own limit, may share
one file). ``--tiny`` (the CPU dry run of the script: ``--device cpu --tiny``) uses the digits
preset at batch 2 for 3 steps; on the CPU there are no CUDA graphs, and the rows say so.

    python -m benchmarks.gpu_fast fast-256 --out DIR [--variants default:1,default:20] [--device cuda]
    python -m benchmarks.gpu_fast latency-1 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Dict, List, Tuple

import torch

from fastddpm import Sampler, Schedule, ops
from fastddpm.ops import PhiloxState
from fastddpm.sampling.options import COMPILE_MODES

from .harness import measure, sync
from .models import random_unet

# (preset, batch, steps) of each phase, full size and --tiny
SIZES = {"fast-256": {"full": ("cifar10", 256, 1000), "tiny": ("digits", 2, 3)},
         "latency-1": {"full": ("cifar10", 1, 200), "tiny": ("digits", 1, 3)}}


def unet_flops(model, device: torch.device) -> float:
    """FLOPs of one forward of ``model`` on one image (torch's FLOP counter: convolutions, matmuls,
    attention; 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    c, r = model.config.in_channels, model.config.resolution
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, c, r, r, device=device), torch.tensor([500], device=device))
    return float(counter.get_total_flops())


def parse_variants(text: str) -> List[Tuple[object, int]]:
    """``"default:1,max-autotune:1"`` as ``[(compile, graph_steps), ...]``; ValueError naming
    ``--variants`` for anything else."""
    variants = []
    for item in filter(None, text.split(",")):
        mode, _, steps = item.partition(":")
        compile_ = {"eager": False, "default": True}.get(mode, mode)
        if compile_ not in COMPILE_MODES or not steps.isdigit() or int(steps) < 1:
            raise ValueError(f"--variants: expected MODE:GRAPH_STEPS items with MODE eager or one of "
                             f"{[m for m in COMPILE_MODES if isinstance(m, str)]}, got {item!r}")
        variants.append((compile_, int(steps)))
    if not variants:
        raise ValueError("--variants: expected at least one MODE:GRAPH_STEPS item")
    return variants


class Report:
    """The rows of one phase: printed, appended to OUT/PHASE.jsonl, OUT/PHASE.md rewritten."""

    def __init__(self, out: str, phase: str, header: str):
        os.makedirs(out, exist_ok=True)
        self.jsonl, self.md, self.header = os.path.join(out, f"{phase}.jsonl"), os.path.join(out, f"{phase}.md"), header

    def add(self, row: Dict) -> None:
        print(json.dumps(row), flush=True)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.jsonl) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        with open(self.md, "w") as f:
            f.write(self.header + "\n\n" + "\n".join(f"- {r['text']}" for r in rows) + "\n")


def _wall(fn, device: torch.device) -> float:
    """Seconds of one call of ``fn``, synchronized on a GPU."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def eager_forward_by_backend(model, shape, device: torch.device, dtype: torch.dtype, channels_last: bool,
                             report: Report) -> None:
    """The eager U-Net forward with each op backend that runs on ``device``: on CUDA the group norm is
    what differs (Triton's launch path against the native kernel, and torch's own ops), the
    measurement behind ``ops.CUDA_PREFERENCE["eager"]`` (docs/gpu.md)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, device=device).contiguous(memory_format=fmt)
    t = torch.full((shape[0],), 500, device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    label = f"batch {shape[0]}, {str(dtype).replace('torch.', '')}" + (", channels_last" if channels_last else "")
    for backend in [b for b in ops.available_backends() if ops.BACKENDS[b].runs_on(device)]:
        with torch.no_grad(), autocast, ops.use_backend(backend):
            s = measure(lambda: model(x, t), rounds=5, warmup=2, device=device)["median"]
        report.add(dict(name=f"eager U-Net forward, {label}, {backend} ops", forward_ms=1e3 * s, backend=backend,
                        text=f"eager U-Net forward, {label}, with the {backend} ops: {1e3 * s:.2f} ms"))


def fast_256(device: torch.device, tiny: bool, variants: List[Tuple[object, int]], report: Report,
             eager_forward: bool = True) -> None:
    """Each variant: a prepared Sampler's first run (compile, capture, the steps) and a timed run;
    then, with ``eager_forward``, the eager forward at this batch per op backend."""
    preset, batch, steps = SIZES["fast-256"]["tiny" if tiny else "full"]
    graphs = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    model = random_unet(preset, device)
    flops = unet_flops(model, device) * batch * steps
    schedule = Schedule.linear().respaced(steps)
    coeffs = schedule.table("step", device, sampler="ddpm", variance="fixed_large")
    shape = (batch, model.config.in_channels, model.config.resolution, model.config.resolution)
    for compile_, graph_steps in variants:
        # the same model object each time: dynamo reuses what it traced for an earlier variant of
        # the same mode, and channels_last has converted it already
        sampler = Sampler(model, schedule, coeffs, shape, device=device, dtype="bfloat16", channels_last=True,
                          compile=compile_, cuda_graph=graphs, graph_steps=graph_steps if graphs else 1)
        first = _wall(lambda: sampler.run(rng=PhiloxState(0, device=device)), device)
        timed = _wall(lambda: sampler.run(rng=PhiloxState(0, device=device)), device)
        name = (f"{preset} {batch} x {steps} steps, bf16, channels_last, philox, compile={compile_!r}, "
                + (f"CUDA graphs of {graph_steps} steps" if graphs else "no CUDA graphs (cpu)"))
        report.add(dict(name=name, compile=compile_, graph_steps=graph_steps, first_run_s=first, time_s=timed,
                        images_per_s=batch / timed, tflops=flops / timed / 1e12, ms_per_step=1e3 * timed / steps,
                        text=f"{name}: **{timed:.2f} s** ({1e3 * timed / steps:.2f} ms a step, "
                             f"{batch / timed:.1f} images/s, {flops / timed / 1e12:.1f} TFLOP/s at "
                             f"{flops / batch / steps / 1e9:.2f} GFLOP an image-step); first run {first:.1f} s"))
        del sampler
    if eager_forward:  # the samplers have made the model channels_last
        eager_forward_by_backend(model, shape, device, torch.bfloat16, True, report)


def latency_1(device: torch.device, tiny: bool, report: Report) -> None:
    """Batch-1 per-step latency of the sampler variants, then the eager U-Net forward per op backend."""
    preset, batch, steps = SIZES["latency-1"]["tiny" if tiny else "full"]
    graphs = device.type == "cuda"
    model = random_unet(preset, device)
    schedule = Schedule.linear().respaced(steps)
    coeffs = schedule.table("step", device, sampler="ddpm", variance="fixed_large")
    shape = (batch, model.config.in_channels, model.config.resolution, model.config.resolution)

    def row(label: str, runs: int = 3, **options) -> None:
        sampler = Sampler(model, schedule, coeffs, shape, device=device, channels_last=False, **options)
        first = _wall(lambda: sampler.run(rng=PhiloxState(0, device=device)), device)
        t = min(_wall(lambda: sampler.run(rng=PhiloxState(0, device=device)), device) for _ in range(runs))
        name = f"{preset} batch {batch}, {steps} steps, {label}"
        report.add(dict(name=name, ms_per_step=1e3 * t / steps, time_s=t, first_run_s=first,
                        text=f"{name}: **{1e3 * t / steps:.2f} ms a step** (best of {runs} runs of {t:.3f} s; "
                             f"first run {first:.2f} s)"))

    row("eager fp32", runs=1)  # ~4 s a run on the GPU of docs/gpu.md: one timed run after the first
    if graphs:
        row("CUDA graphs of 1 step, fp32", cuda_graph=True)
        row("CUDA graphs of 1 step, bf16", cuda_graph=True, dtype="bfloat16")
    eager_forward_by_backend(model, shape, device, torch.float32, False, report)
    if graphs:  # compiling comes last: a run cut short by its limit still has the rows above
        row("compiled (default mode), CUDA graphs of 1 step, fp32", cuda_graph=True, compile=True)


def main(argv=None) -> int:
    """Entry point: ``python -m benchmarks.gpu_fast PHASE --out DIR``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_fast", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=sorted(SIZES))
    p.add_argument("--out", required=True, help="folder for PHASE.jsonl and PHASE.md")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the digits preset, batch 2, 3 steps (a dry run)")
    p.add_argument("--variants", default="default:1,default:20",
                   help="fast-256: comma list of MODE:GRAPH_STEPS (MODE: eager, default, max-autotune, ...)")
    p.add_argument("--eager-forward", action=argparse.BooleanOptionalAction, default=True,
                   help="fast-256: also time the eager forward at its batch with each op backend")
    args = p.parse_args(argv)
    try:
        variants = parse_variants(args.variants)
    except ValueError as e:
        p.error(str(e))
    device = torch.device(args.device)
    if args.phase == "fast-256":
        report = Report(args.out, "fast-256", "## fast-256: 256 images x 1000 steps (the goal: under 10 s)")
        fast_256(device, args.tiny, variants, report, args.eager_forward)
    else:
        report = Report(args.out, "latency-1", "## latency-1: batch 1, per-step latency")
        latency_1(device, args.tiny, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
