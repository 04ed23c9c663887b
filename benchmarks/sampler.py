"""The "sampler" section: the fast sampler against the reference sampler, same model, same noise.

CPU rows: the ``mnist`` preset (batch 16, 100 steps) and the ``cifar10`` preset (batch 16; 10 steps
timed, per-step times reported), fp32 and bf16, eager and compiled; the share of a step spent
outside the U-Net; bf16 against fp32 samples from the same noise (the bundled mnist model, 100 steps).
GPU rows: ``cifar10`` at batch 256 in bf16 for 1000 steps, batch 1 eager against CUDA graphs of
K steps (capture time, memory and per-step time). Each fast result is checked against the
reference before it is timed; every time is the median of the rounds run.
"""

from __future__ import annotations

import json
import platform
import time
from typing import Callable, Dict, List

import torch

from fastddpm import Sampler, Schedule, ops, reference_sample
from fastddpm.models import winograd
from fastddpm.ops import PhiloxState

from .harness import interleaved_rounds, measure, time_rounds
from .models import random_unet


def _timed(fn: Callable[[], torch.Tensor], device, rounds: int) -> Dict[str, float]:
    return time_rounds(fn, device, rounds)[0]


def reference_run(model, schedule, shape, device, seed):
    """The reference sampler (Algorithm 2, reference ops) on ``model`` as a function of no arguments."""
    def run():
        with torch.no_grad(), ops.use_backend("reference"):
            return reference_sample(model, schedule, shape, clip=True, device=device,
                                    generator=torch.Generator(device).manual_seed(seed))
    return run


def fast_run(model, schedule, shape, device, seed, **options):
    """A prepared fast Sampler (DDPM, fixed_large, clip) run from ``seed`` as a function of no arguments."""
    options.setdefault("channels_last", False)  # rows name channels_last where it is on; else NCHW
    coeffs = schedule.table("step", device, sampler="ddpm", variance="fixed_large")
    sampler = Sampler(model, schedule, coeffs, shape, device=device, **options)
    return lambda: sampler.run(generator=torch.Generator(device).manual_seed(seed))


def cpu_rows(quick: bool, rounds: int) -> List[Dict]:
    """Fast sampler variants against the reference sampler on this CPU.

    Each variant and the reference get their own copy of the model (channels_last converts a
    model in place) and are timed in turn within each round, so drift of this shared machine falls
    on all of them alike."""
    device = torch.device("cpu")
    rows = []
    # cifar10: 10 steps timed, per-step times reported: a cifar10 step on a CPU is too slow for 1000
    # steps of every variant in one run (measurements: docs/performance.md#measurements-behind-the-code)
    jobs = [("mnist", 16, 10 if quick else 100)] + ([] if quick else [("mnist", 16, 1000), ("cifar10", 16, 10)])
    for preset, batch, steps in jobs:
        n_rounds = 1 if steps >= 1000 else rounds
        model = random_unet(preset, device)
        c, r = model.config.in_channels, model.config.resolution
        shape = (batch, c, r, r)
        schedule = Schedule.linear().respaced(steps)
        ref_fn = reference_run(model, schedule, shape, device, 0)
        ref_x = ref_fn()
        # Winograd applies by default on the CPU, to convs of >= MIN_CHANNELS channels: rows name it
        # only where the model has such convs
        wino = ", winograd" if any(winograd.eligible(m, winograd.MIN_CHANNELS) for m in model.modules()) else ""
        cl, direct = {"channels_last": True}, {"winograd": False}
        # tolerances: the reference steps in float64, the fast sampler in float32, and the model (all
        # weights random) amplifies the difference step by step: 1.0e-4 was seen after 10 cifar10 steps
        variants = [(f"eager fp32, channels_last{wino}", cl, 1e-3),
                    (f"compiled fp32, channels_last{wino}", {"compile": True, **cl}, 1e-3)]
        frozen = (f"compiled fp32, channels_last{wino}, frozen weights", {"compile": True, "freeze": True, **cl})
        if steps >= 1000:  # the long run: the fastest fp32 variants only; 1000 clipped steps amplify
            variants = [(f"compiled fp32, channels_last{wino}", {"compile": True, **cl}, 1e-2), (*frozen, 1e-2)]
        elif preset == "cifar10" or not quick:
            variants += [(*frozen, 1e-3),
                         ("eager fp32, NCHW, direct convs", direct, 1e-3),
                         ("compiled fp32, NCHW, direct convs", {"compile": True, **direct}, 1e-3),
                         (f"compiled fp32, channels_last{wino}, no memory pool",
                          {"compile": True, **cl, "memory_pool": False}, 1e-3),
                         ("eager bf16, channels_last", {"dtype": "bfloat16", **cl}, None),
                         ("compiled bf16, channels_last", {"dtype": "bfloat16", "compile": True, **cl}, None),
                         ("compiled bf16, channels_last, frozen weights",
                          {"dtype": "bfloat16", "compile": True, "freeze": True, **cl}, None)]
        torch._dynamo.reset()
        fns, errs = {"reference": ref_fn}, {}
        for name, options, tol in variants:
            fast_fn = fast_run(random_unet(preset, device), schedule, shape, device, 0, **options)
            x = fast_fn()  # also the compile
            errs[name] = (x - ref_x).abs().max().item()
            if tol is not None and not errs[name] <= tol:
                raise AssertionError(f"{preset} {name}: fast sampler differs from the reference by {errs[name]}")
            fns[name] = fast_fn
        timed = interleaved_rounds(fns, device, n_rounds)
        ref = timed.pop("reference")
        for name, fast in timed.items():
            rows.append(dict(name=f"{preset} batch {batch}, {steps} steps, {name}", steps=steps,
                             ref_s=ref["median"], fast_s=fast["median"], fast_min_s=fast["min"],
                             fast_max_s=fast["max"], speedup=ref["median"] / fast["median"],
                             max_diff_vs_ref=errs[name]))
    return rows


def step_overhead(rounds: int) -> Dict:
    """What a fast-sampler step (eager, native ops) spends outside the U-Net, mnist batch 16: the
    loop run with a stand-in model that returns a ready tensor, against the U-Net's forward time."""
    device = torch.device("cpu")
    model = random_unet("mnist", device)
    steps, shape = 100, (16, 1, 32, 32)
    schedule = Schedule.linear().respaced(steps)
    x, t = torch.randn(shape), torch.full((16,), 500)
    ready = torch.randn(shape)
    with torch.no_grad():
        forward = measure(lambda: model(x, t), rounds=rounds)["median"]
        loop = _timed(fast_run(lambda x, t: ready, schedule, shape, device, 0), device, rounds)["median"] / steps
    return dict(forward_s=forward, outside_s=loop, overhead=loop / (loop + forward))


def bf16_quality(steps: int = 100) -> Dict:
    """bf16 against fp32 samples of the bundled mnist model from the same noise."""
    from fastddpm.pipeline import resolve_model

    ddpm = resolve_model("mnist", torch.device("cpu"))
    schedule = ddpm.schedule.respaced(steps)
    out = {}
    for dtype in ("float32", "bfloat16"):
        out[dtype] = fast_run(ddpm.model, schedule, (16, 1, 32, 32), torch.device("cpu"), 1, dtype=dtype)()
    diff = (out["bfloat16"] - out["float32"]).abs()
    return dict(steps=steps, max_abs_diff=diff.max().item(), mean_abs_diff=diff.mean().item())


def _report(row: Dict) -> Dict:
    """Print a row as soon as it is measured (a long run cut short still reports what it did)."""
    print(json.dumps(row), flush=True)
    return row


def gpu_rows(quick: bool, rounds: int) -> List[Dict]:
    """GPU: cifar10 batch 256 bf16 over 1000 steps; batch 1 eager against CUDA graphs."""
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    rows = []
    big = (64 if quick else 256, 3, 32, 32)
    full = Schedule.linear()
    coeffs = full.table("step", device, sampler="ddpm", variance="fixed_large")

    def big_run(name, options, runs=2):
        """1000 steps at the big batch; with runs=2 the first run (capture, compile) is not timed."""
        torch._dynamo.reset()  # a fresh model each time: channels_last converts one in place
        options = {"channels_last": False, **options}  # NCHW unless the row names channels_last
        sampler = Sampler(random_unet("cifar10", device), full, coeffs, big, device=device, **options)
        first = _timed(lambda s=sampler: s.run(rng=PhiloxState(0, device=device)), device, 1)["median"]
        t = (_timed(lambda s=sampler: s.run(rng=PhiloxState(0, device=device)), device, 1) if runs > 1
             else dict(median=first, min=first, max=first))
        rows.append(_report(dict(name=f"cifar10 batch {big[0]}, 1000 steps, {name}", fast_s=t["median"],
                                 first_run_s=first, fast_min_s=t["min"], fast_max_s=t["max"])))

    # batch 1 first (quick), then the big batch by expected value; compiling comes last, as a run cut
    # short by its time limit still reports the rows above
    model1 = random_unet("cifar10", device)
    steps = 200
    schedule = full.respaced(steps)
    coeffs1 = schedule.table("step", device, sampler="ddpm", variance="fixed_large")
    eager = Sampler(model1, schedule, coeffs1, (1, 3, 32, 32), device=device, channels_last=False)
    eager.run(rng=PhiloxState(0, device=device))
    base = _timed(lambda: eager.run(rng=PhiloxState(0, device=device)), device, rounds)["median"]
    rows.append(_report(dict(name=f"cifar10 batch 1, {steps} steps, eager fp32", fast_s=base,
                             per_step_ms=1e3 * base / steps)))
    for k in (1, 10, 50):
        torch.cuda.synchronize()
        mem0 = torch.cuda.memory_allocated()
        sampler = Sampler(model1, schedule, coeffs1, (1, 3, 32, 32), device=device, cuda_graph=True, graph_steps=k,
                          channels_last=False)
        start = time.perf_counter()
        sampler.run(rng=PhiloxState(0, device=device))
        torch.cuda.synchronize()
        capture = time.perf_counter() - start
        t = _timed(lambda s=sampler: s.run(rng=PhiloxState(0, device=device)), device, rounds)["median"]
        rows.append(_report(dict(name=f"cifar10 batch 1, {steps} steps, CUDA graphs of {k} steps", fast_s=t,
                                 per_step_ms=1e3 * t / steps, speedup_vs_eager=base / t, capture_s=capture,
                                 graph_memory_mb=(torch.cuda.memory_allocated() - mem0) / 2**20)))
        del sampler
    big_run("CUDA graph bf16 channels_last", {"dtype": "bfloat16", "cuda_graph": True, "channels_last": True})
    big_run("eager bf16 channels_last", {"dtype": "bfloat16", "channels_last": True}, runs=1)
    big_run("CUDA graph bf16", {"dtype": "bfloat16", "cuda_graph": True})
    big_run("compiled + CUDA graph bf16 channels_last", {"dtype": "bfloat16", "cuda_graph": True,
                                                         "channels_last": True, "compile": True})
    big_run("compiled, frozen weights + CUDA graph bf16 channels_last",
            {"dtype": "bfloat16", "cuda_graph": True, "channels_last": True, "compile": True, "freeze": True})
    return rows


def run(device="cpu", quick=False, rounds=3) -> Dict:
    """All rows for ``device``; returns the results (also the JSON written by the CLI)."""
    device = torch.device(device)
    result = dict(device=str(device), torch=torch.__version__, threads=torch.get_num_threads(),
                  machine=platform.processor() or platform.machine(), native=ops.native_status(), rounds=rounds)
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
        result["rows"] = gpu_rows(quick, rounds)
    else:
        result["rows"] = cpu_rows(quick, rounds)
        if not quick:
            result["step_overhead"] = step_overhead(rounds)
            result["bf16_vs_fp32"] = bf16_quality()
    return result


def markdown(result: Dict) -> str:
    """The results as a markdown table."""
    lines = [f"device {result['device']} {result.get('gpu', result['machine'])}, torch {result['torch']}, "
             f"{result['threads']} threads, native: {result['native']}, medians of {result['rounds']}", "",
             "| case | reference | fast (median) | fast min..max | speed-up | notes |", "|---|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        ref = f"{r['ref_s']:.2f} s" if "ref_s" in r else "-"
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else (f"{r['speedup_vs_eager']:.2f}x vs eager"
                                                                 if "speedup_vs_eager" in r else "-")
        notes = ", ".join(f"{k} {v:.3g}" for k, v in r.items()
                          if k in ("max_diff_vs_ref", "first_run_s", "capture_s", "graph_memory_mb", "per_step_ms"))
        spread = f"{r['fast_min_s']:.3f}..{r['fast_max_s']:.3f} s" if "fast_min_s" in r else "-"
        lines.append(f"| {r['name']} | {ref} | {r['fast_s']:.3f} s | {spread} | {speed} | {notes} |")
    if result["device"] == "cpu":
        lines += ["", "CPU rows: the reference and every variant of a preset, each on its own copy of the model, "
                      "timed in turn within each round (interleaved), so the machine's drift falls on all alike"]
    if "step_overhead" in result:
        o = result["step_overhead"]
        lines += ["", f"Step outside the U-Net (mnist batch 16, eager loop with a stand-in model): "
                      f"{1e3 * o['outside_s']:.2f} ms, {100 * o['overhead']:.1f}% of a step "
                      f"(U-Net forward {1e3 * o['forward_s']:.1f} ms)"]
    if "bf16_vs_fp32" in result:
        q = result["bf16_vs_fp32"]
        lines += ["", f"bf16 vs fp32 samples, bundled mnist model, same noise, {q['steps']} steps: max |diff| "
                  f"{q['max_abs_diff']:.3f}, mean |diff| {q['mean_abs_diff']:.4f} (images in [-1, 1])"]
    return "\n".join(lines)
