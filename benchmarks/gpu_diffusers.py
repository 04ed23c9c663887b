"""Phase ``diffusers`` of benchmarks/gpu_check.sh: the benchmark suite's diffusers section
(benchmarks/diffusers_cmp.py: DDPMPipeline against ``fastddpm.accelerate(pipe)``, eager fp32, then
each at its best, which on a GPU is compile + channels_last + bf16) one case per call, so that the
check's time limit, should it cut the run, keeps the cases already measured. Rows go to
``OUT/diffusers.jsonl`` and ``OUT/diffusers.md`` as each case finishes. ``--case "quick config"
--device cpu``: the section's quick config, a dry run.

    python -m benchmarks.gpu_diffusers --case ddpm-cifar10-32 --out DIR [--device cuda] [--rounds 1]
"""

from __future__ import annotations

import argparse

import torch

from .diffusers_cmp import CASES, QUICK_CASES, compare_case
from .gpu_fast import Report


def main(argv=None) -> int:
    """Entry point: ``python -m benchmarks.gpu_diffusers --case NAME --out DIR``."""
    cases = {name: (config, cpu_size, gpu_size) for name, config, cpu_size, gpu_size in CASES + QUICK_CASES}
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_diffusers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", required=True, choices=sorted(cases))
    p.add_argument("--out", required=True, help="folder for diffusers.jsonl and diffusers.md")
    p.add_argument("--device", default="cuda")
    p.add_argument("--rounds", type=int, default=1, help="timed calls of each side after its warm-up call")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    config, cpu_size, gpu_size = cases[args.case]
    batch, steps = cpu_size if device.type == "cpu" else gpu_size
    report = Report(args.out, "diffusers", "## diffusers: DDPMPipeline against fastddpm.accelerate(pipe), "
                                           "same weights and generator")
    try:
        rows = compare_case(args.case, config, batch, steps, device, args.rounds, best=True)
    except ValueError as e:  # as the section does: a config the converter does not support yet
        report.add(dict(name=args.case, unsupported=str(e), text=f"{args.case}: not supported, skipped: {e}"))
        return 0
    for r in rows:
        report.add(dict(r, text=f"{r['name']}: DDPMPipeline {r['ref_s']:.2f} s, accelerate(pipe) {r['fast_s']:.2f} s: "
                                f"**{r['speedup']:.2f}x** (max abs diff {r['max_diff']:.1e})"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
