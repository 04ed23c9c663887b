"""``fastddpm bench``: run benchmark sections, print their tables, write JSON, markdown and a plot.

    fastddpm bench [--quick] [--device cpu|cuda] [--only ops,train,sampler,calls,diffusers,likelihood,edits] [--out DIR]
                   [--merge]

Sections: ``ops`` (the three fused ops and the U-Net forward, with GB/s against a plain copy),
``train`` (one training step), ``sampler`` (the full sampler), ``calls`` (repeated ``sample()``
calls against one prepared sampler), ``diffusers`` (DDPMPipeline on the same weights and noise;
needs diffusers), ``likelihood`` (bits/dim: the batched fast path against the per-t loop), ``edits``
(reconstruct and denoise from t = 500 against the textbook loop).
``--merge`` adds the sections run to an existing report in ``--out`` (a partial rerun) instead of
replacing it. ``--quick`` uses small sizes, for a short run (durations:
docs/performance.md#measurements-behind-the-code). Times are medians of ``--rounds`` rounds;
never run it beside other work.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import time
from typing import Dict, List, Optional

import torch

SECTIONS = ("ops", "train", "sampler", "calls", "diffusers", "likelihood", "edits")
_MODULES = {"ops": "ops", "train": "train", "sampler": "sampler", "calls": "per_call", "diffusers": "diffusers_cmp",
            "likelihood": "likelihood", "edits": "edits"}


# what must match for --merge to add sections to an earlier report
SAME_SETUP = ("processor", "threads", "native", "device")


def machine(device="cpu") -> Dict:
    """The machine and setup a report is measured on."""
    from fastddpm import ops
    from fastddpm.utils import cpu_model_name

    return dict(device=str(device), processor=platform.processor() or platform.machine(), cpu_model=cpu_model_name(),
                threads=torch.get_num_threads(), torch=torch.__version__,
                gpu=torch.cuda.get_device_name() if torch.device(device).type == "cuda" else None,
                native=ops.native_status(), triton=ops.triton_status())


def run(sections=SECTIONS, device="cpu", quick=False, rounds: Optional[int] = None) -> Dict:
    """Run ``sections`` on ``device``; returns ``{"machine": ..., "sections": {name: result}}``."""
    result = dict(machine=machine(device), quick=quick, sections={})
    for name in sections:
        module = importlib.import_module(f".{_MODULES[name]}", __package__)
        start = time.perf_counter()
        kwargs = {} if rounds is None else {"rounds": rounds}
        try:
            section = module.run(device=device, quick=quick, **kwargs)
        except ImportError as e:  # an optional dependency (diffusers) is missing: say so, go on
            section = dict(skipped=f"{type(e).__name__}: {e}", rows=[])
        section["wall_s"] = time.perf_counter() - start
        result["sections"][name] = section
        print(section_markdown(name, section), flush=True)
    return result


def section_markdown(name: str, section: Dict) -> str:
    """One section's table (each section module renders its own)."""
    if "skipped" in section:
        return f"## {name}\n\nskipped: {section['skipped']}\n"
    module = importlib.import_module(f".{_MODULES[name]}", __package__)
    return f"## {name}\n\n{module.markdown(section)}\n"


def markdown(result: Dict) -> str:
    """The whole report as markdown."""
    m = result["machine"]
    head = (f"# fastddpm benchmarks\n\n{m['gpu'] or m.get('cpu_model') or m['processor']}, {m['threads']} threads, torch {m['torch']}; "
            f"native: {m['native']}; triton: {m['triton']}{' (--quick)' if result['quick'] else ''}\n")
    return "\n".join([head] + [section_markdown(n, s) for n, s in result["sections"].items()])


def plot(result: Dict, path: str) -> Optional[str]:
    """A bar chart of the speed-up over the reference of every row; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows: List[Dict] = [r for s in result["sections"].values() for r in s.get("rows", []) if "speedup" in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(rows) + 1.2))
    ax.barh(range(len(rows)), [r["speedup"] for r in rows], color="#3b7dd8")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [r["name"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up over the reference (same run, medians)")
    ax.set_title(f"fastddpm on {result['machine']['gpu'] or result['machine']['processor']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    """CLI entry point (``fastddpm bench`` and ``python -m benchmarks``)."""
    p = argparse.ArgumentParser(prog="fastddpm bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="small sizes (about two minutes on 2 cores)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {','.join(SECTIONS)}")
    p.add_argument("--rounds", type=int, default=None, help="rounds per timing (default: per section)")
    p.add_argument("--out", default="bench_results", help="directory for bench.json, bench.md, bench.png")
    p.add_argument("--merge", action="store_true", help="add the sections run to the report already in --out")
    args = p.parse_args(argv)
    sections = [s for s in args.only.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        p.error(f"--only: unknown sections {unknown}; expected some of {list(SECTIONS)}")
    previous = os.path.join(args.out, "bench.json")
    merged = None
    if args.merge and os.path.exists(previous):  # checked before the run, not after it
        with open(previous) as f:
            merged = json.load(f)
        here = machine(args.device)
        if any(merged.get("machine", {}).get(k) != here[k] for k in SAME_SETUP):
            p.error(f"--merge: {previous} was measured on another machine or setup ({merged.get('machine')})")
    result = run(sections, args.device, args.quick, args.rounds)
    os.makedirs(args.out, exist_ok=True)
    if merged is not None:
        merged["sections"].update(result["sections"])
        result = merged
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(markdown(result))
    png = plot(result, os.path.join(args.out, "bench.png"))
    print(f"wrote {args.out}/bench.json, bench.md" + (", bench.png" if png else " (no matplotlib: no plot)"))
