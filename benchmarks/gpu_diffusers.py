"""Phase ``diffusers`` of benchmarks/gpu_check.sh: the benchmark suite's diffusers section
(benchmarks/diffusers_cmp.py: DDPMPipeline against ``fastddpm.accelerate(pipe)`` and
``fastddpm.sample()``, eager fp32, then each at its best in fp32 and in bf16, which on a GPU is
compile + channels_last (+ bf16)) for one case, with fewer calls and, optionally, fewer steps than
the section's own run, so that it fits the check's time budget.

The section prints each setting's row as a JSON line as soon as it is measured; ``--from-log``
turns the rows in a log of such runs into ``OUT/diffusers.md``, so a run cut at its time limit
still reports the settings it finished.

    python -m benchmarks.gpu_diffusers --case ddpm-cifar10-32 [--steps 200] [--device cuda] >>LOG
    python -m benchmarks.gpu_diffusers --from-log LOG --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Dict

import torch

from .diffusers_cmp import CASES, QUICK_CASES, compare_case

HEADER = ("## diffusers: DDPMPipeline against fastddpm.accelerate(pipe) and fastddpm.sample(), same weights; "
          "medians of repeated calls")


def row_text(r: Dict) -> str:
    """One row of the section as a line of the summary."""
    text = (f"{r['name']}: DDPMPipeline {r['ref_s']:.2f} s, accelerate(pipe) {r['fast_s']:.2f} s "
            f"(**{r['speedup']:.2f}x**), sample() {r['sample_s']:.2f} s ({r['sample_speedup']:.2f}x); max abs diff "
            f"{r['max_diff']:.1e}")
    if "pipe_first_s" in r:
        text += (f"; first calls {r['pipe_first_s']:.1f} / {r['fast_first_s']:.1f} / {r['sample_first_s']:.1f} s "
                 f"(pipe / accelerate / sample)")
    return text


def write_summary(log: str, out: str) -> int:
    """``OUT/diffusers.md`` from the JSON rows printed in ``log``; returns how many there were."""
    lines = []
    if os.path.exists(log):
        with open(log) as f:
            for line in f:
                if line.startswith('{"name"'):
                    lines.append(row_text(json.loads(line)))
                elif line.startswith("diffusers: ") and "not supported" in line:
                    lines.append(line.strip())
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "diffusers.md"), "w") as f:
        f.write(HEADER + "\n\n" + "".join(f"- {line}\n" for line in lines or ["no rows"]))
    return len(lines)


def main(argv=None) -> int:
    """Entry point: run one case (``--case``), or summarize a log of runs (``--from-log``)."""
    cases = {name: (config, cpu_size, gpu_size) for name, config, cpu_size, gpu_size in CASES + QUICK_CASES}
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_diffusers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--case", choices=sorted(cases), help="run this case of the section")
    what.add_argument("--from-log", metavar="LOG", help="write OUT/diffusers.md from the rows printed in LOG")
    p.add_argument("--out", default=".", help="with --from-log: the folder for diffusers.md")
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the section's for the device)")
    p.add_argument("--rounds", type=int, default=1, help="timed rounds of the eager setting after its first call")
    p.add_argument("--calls", type=int, default=2, help="whole calls of each contender in the best settings")
    args = p.parse_args(argv)
    if args.from_log:
        print(f"diffusers: {write_summary(args.from_log, args.out)} rows in {args.out}/diffusers.md")
        return 0
    device = torch.device(args.device)
    config, cpu_size, gpu_size = cases[args.case]
    batch, steps = cpu_size if device.type == "cpu" else gpu_size
    try:  # compare_case prints each setting's row as it is measured
        compare_case(args.case, config, batch, args.steps or steps, device, args.rounds, best=True, calls=args.calls)
    except ValueError as e:  # as the section does: a config the converter does not support yet
        print(f"diffusers: {args.case}: not supported, skipped: {e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
