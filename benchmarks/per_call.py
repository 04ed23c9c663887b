"""The "calls" section, the per-call view of the sampler: what a user pays for each ``fastddpm.sample()`` call, against one
prepared :class:`fastddpm.Sampler` run as often.

For each variant, ``calls`` calls of ``sample()`` (the bundled mnist model by name, or a cifar10
U-Net object) and ``calls`` runs of a sampler prepared once, interleaved (call, run, call, run,
...), so the machine's drift falls on both alike. A repeated call's setup is the difference of the
medians; its share of a 100-step call is that setup over ten times the prepared 10-step run (the
loop's cost per step does not depend on the number of steps). The first call (preparation,
compilation) is reported on its own, and ``reuse=False`` (a sampler prepared on every call, as
before prepared samplers were kept) beside it.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Dict, List

import torch

import fastddpm
from fastddpm import Sampler
from fastddpm.sampling import clear_cache

from .models import random_unet


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_variant(model, steps: int, calls: int, n: int, options: Dict, reuse: bool = True) -> Dict:
    """Times of ``calls`` sample() calls and ``calls`` runs of one prepared sampler, interleaved."""
    clear_cache()
    torch._dynamo.reset()

    def call():
        return fastddpm.sample(model, n, steps=steps, seed=0, progress=False, reuse=reuse, **options)

    first = _seconds(call)
    ddpm = fastddpm.load(model) if isinstance(model, str) else fastddpm.DDPM(model, fastddpm.Schedule.linear())
    schedule = ddpm.schedule.respaced(steps)
    coeffs = schedule.table("step", "cpu", sampler="ddpm", variance="fixed_large")
    prepared = Sampler(ddpm.model.eval(), schedule, coeffs, (n, *ddpm.image_shape), **options)
    prepared.run(generator=torch.Generator().manual_seed(0))  # its own preparation (compile), untimed
    call_times, run_times = [], []
    for _ in range(calls):
        call_times.append(_seconds(call))
        run_times.append(_seconds(lambda: prepared.run(generator=torch.Generator().manual_seed(0))))
    call_s, run_s = statistics.median(call_times), statistics.median(run_times)
    setup = call_s - run_s
    return dict(first_call_s=first, call_s=call_s, call_min_s=min(call_times), call_max_s=max(call_times),
                prepared_run_s=run_s, setup_s=setup, setup_share_of_100_steps=setup / (run_s * 100 / steps),
                calls=calls, steps=steps)


def run(device="cpu", quick: bool = False, rounds: int = 10) -> Dict:
    """The per-call rows on the CPU (the bundled mnist model by name; a cifar10 U-Net object);
    ``rounds``: calls per mnist variant."""
    import platform

    if torch.device(device).type != "cpu":
        raise ValueError(f"device: the calls section runs on the CPU, got {device!r}")
    return dict(device="cpu", torch=torch.__version__, threads=torch.get_num_threads(),
                machine=platform.processor() or platform.machine(), rows=_rows(quick, rounds))


def _rows(quick: bool, calls: int) -> List[Dict]:
    steps, calls = (2, 2) if quick else (10, calls)
    jobs = [("mnist", "bundled mnist (by name)", 16, calls, [("eager", {}), ("eager, reuse=False", {"reuse": False})])]
    if not quick:
        jobs[0][4].extend([("compiled", {"compile": True}), ("compiled + frozen", {"compile": True, "freeze": True})])
        # cifar10: a 10-step call is long on a CPU, so 3 calls (measurements:
        # docs/performance.md#measurements-behind-the-code); its setup is Winograd and channels_last
        jobs.append((random_unet("cifar10"), "cifar10 U-Net (object)", 16, 3,
                     [("eager, Winograd", {}), ("eager, Winograd, reuse=False", {"reuse": False})]))
    rows = []
    for model, label, n, n_calls, variants in jobs:
        for name, options in variants:
            options = dict(options)
            reuse = options.pop("reuse", True)
            r = measure_variant(model, steps, n_calls, n, options, reuse=reuse)
            rows.append(dict(name=f"{label}, batch {n}, {steps} steps: {name}", **r))
            print(json.dumps(rows[-1]), flush=True)
    clear_cache()
    return rows


def markdown(result: Dict) -> str:
    """The per-call rows as a markdown table."""
    rows = result["rows"]
    lines = ["`fastddpm.sample()` called repeatedly against one prepared `Sampler` run as often, interleaved; "
             "setup = the difference of the medians; its share of a 100-step call = setup / (10 x the 10-step "
             "run)", "","| case | first call | repeated call (median) | prepared sampler run | setup per call | "
             "setup / 100-step call |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} ({r['calls']} calls) | {r['first_call_s']:.2f} s | {r['call_s']:.3f} s | "
                     f"{r['prepared_run_s']:.3f} s | {1e3 * r['setup_s']:.0f} ms | "
                     f"{100 * r['setup_share_of_100_steps']:.1f}% |")
    return "\n".join(lines)
