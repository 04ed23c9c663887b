"""The "ops" section: the three fused ops and the U-Net forward, each compiled backend against the
reference (native; Triton too on a GPU).

Prints a markdown table: median time, speed-up over the reference measured in the same run, and
for memory-bound ops the achieved GB/s and its fraction of a plain copy of the same bytes; on the
CPU a second table of the presets' 3x3 convolutions, direct against each Winograd variant, in
direct-equivalent GFLOP/s against a large GEMM's rate of the same dtype.
Every fast result is checked against the reference before it is timed.
"""

from __future__ import annotations

import contextlib
import platform
from typing import Dict, List

import torch
import torch.nn.functional as F

from fastddpm import Schedule, UNet, ops
from fastddpm.ops import PhiloxState

from .harness import copy_bandwidth, gemm_rate, measure_graphed, measure_interleaved
from .models import random_unet


def check_close(fast: torch.Tensor, ref: torch.Tensor, name: str, tol: float):
    """An AssertionError unless ``fast`` is within ``tol`` (relative to ref's largest value, at least 1) of ``ref``."""
    err = (fast.float() - ref.float()).abs().max().item()
    if not err <= tol * max(1.0, ref.float().abs().max().item()):
        raise AssertionError(f"{name}: fast path disagrees with the reference (max error {err})")


def op_cases(device: torch.device, quick: bool) -> List[Dict]:
    """The benchmark cases: name, reference fn, fast fn, bytes moved (or None), check tolerance."""
    sched = Schedule.linear()
    coeffs = sched.table("step", device, sampler="ddpm", variance="fixed_large")
    noising = sched.table("noising", device)
    g = torch.Generator(device).manual_seed(0)
    numel = (1 << 20) if quick else (16 << 20)
    B = 16
    x = torch.randn(B, numel // B, generator=g, device=device)
    m, z = torch.randn_like(x), torch.randn_like(x)
    t = torch.randint(1, 1000, (B,), generator=g, device=device)
    rng = PhiloxState(0, device=device)
    nbytes = x.numel() * 4
    out = torch.empty_like(x)  # the sampler steps into preallocated buffers
    cases = [
        dict(name=f"ddpm_step {numel / 2**20:.0f}M, noise given, out=", bytes=4 * nbytes, tol=1e-5, allocates=False,
             ref=lambda: ops.ddpm_step(x, m, t, coeffs, z, 1.0, out=out, backend="reference"),
             fast=lambda be: ops.ddpm_step(x, m, t, coeffs, z, 1.0, out=out, backend=be)),
        dict(name=f"ddpm_step {numel / 2**20:.0f}M, in-kernel noise vs torch.randn, out=", bytes=3 * nbytes,
             tol=None, allocates=False,
             ref=lambda: ops.ddpm_step(x, m, t, coeffs, torch.randn(x.shape, generator=g, device=device), 1.0,
                                       out=out, backend="reference"),
             fast=lambda be: ops.ddpm_step(x, m, t, coeffs, None, 1.0, out=out, rng=rng, backend=be)),
        dict(name=f"q_sample {numel / 2**20:.0f}M, in-kernel noise vs torch.randn", bytes=3 * nbytes, tol=None,
             ref=lambda: ops.q_sample(x, t, noising, torch.randn(x.shape, generator=g, device=device),
                                      backend="reference"),
             fast=lambda be: ops.q_sample(x, t, noising, rng=rng, backend=be)),
    ]
    # the first ResBlock's norm of the cifar10 U-Net (32x32) and of the celebahq one (256x256)
    for shape in ([(8, 128, 32, 32)] if quick else [(64, 128, 32, 32), (4, 256, 64, 64), (2, 128, 256, 256)]):
        N, C = shape[:2]
        h = torch.randn(shape, generator=g, device=device)
        temb = torch.randn(N, C, generator=g, device=device)
        w, b = torch.randn(C, generator=g, device=device), torch.randn(C, generator=g, device=device)
        cases.append(dict(
            name=f"group_norm_act {'x'.join(map(str, shape))} +temb", bytes=2 * h.numel() * 4, tol=1e-4,
            ref=lambda h=h, temb=temb, w=w, b=b: F.silu(F.group_norm(h + temb[:, :, None, None], 32, w, b, 1e-6)),
            fast=lambda be, h=h, temb=temb, w=w, b=b: ops.group_norm_act(h, w, b, 32, 1e-6, temb, backend=be)))
    return cases


# The 3x3 convolutions of each preset (channels, resolution) and the batch its sampler runs.
PRESET_CONVS = (("cifar10", 16, ((128, 32), (256, 16), (256, 8), (256, 4))),
                ("celebahq", 1, ((128, 256), (128, 128), (256, 64), (256, 32), (512, 16), (512, 8))),
                ("mnist", 16, ((32, 32), (64, 16), (64, 8))),
                ("digits", 16, ((32, 8), (64, 4))))


def conv_cases(device: torch.device, quick: bool) -> List[Dict]:
    """The presets' 3x3 convolutions (C -> C channels, channels_last), in float32 and bfloat16:
    oneDNN's direct convolution (F.conv2d) and each Winograd variant the op runs in that dtype.
    Each case: name, dtype, direct-equivalent FLOPs, the variant :func:`choose_tile` picks, the
    functions by variant name, and the check tolerance against the direct one."""
    from fastddpm.models import winograd

    if device.type != "cpu" or not winograd.available():
        return []
    presets = (("cifar10", 4, ((128, 16),)),) if quick else PRESET_CONVS
    cases = []
    for preset, batch, shapes in presets:
        for C, res in shapes:
            for dtype in (torch.float32, torch.bfloat16):
                g = torch.Generator().manual_seed(0)
                x = torch.randn(batch, C, res, res, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
                w = torch.randn(C, C, 3, 3, generator=g) * (2 / (9 * C)) ** 0.5
                b = torch.randn(C, generator=g)
                wd = w.to(dtype).contiguous(memory_format=torch.channels_last)
                fns = {"direct": lambda x=x, w=wd, b=b.to(dtype): F.conv2d(x, w, b, padding=1)}
                for tile in winograd.TILES:
                    if dtype == torch.float32 or tile == 2:  # F(4x4) in bf16: too inaccurate, the op rejects it
                        U = winograd.transform_weight(w, tile, dtype)
                        fns[f"F({tile}x{tile})"] = lambda x=x, U=U, b=b: ops.winograd_conv3x3(x, U, b)
                chosen = winograd.choose_tile(dtype, C, batch, res, res)
                cases.append(dict(name=f"{preset} conv3x3 {C}->{C} at {res}x{res}, batch {batch}", dtype=dtype,
                                  flop=2 * batch * res * res * C * C * 9, fns=fns,
                                  chosen="direct" if chosen == winograd.DIRECT else f"F({chosen}x{chosen})",
                                  tol=1e-4 if dtype == torch.float32 else 2e-2))
    return cases


def measure_convs(cases: List[Dict], rounds: int, quick: bool) -> Dict:
    """Each conv case's variants timed in interleaved rounds (each checked against the direct one
    first), beside a large matrix product of each dtype timed in the same run (the peak)."""
    n = 1024 if quick else 2048
    peaks = {dtype: gemm_rate(dtype, n) for dtype in {c["dtype"] for c in cases}}
    rows = []
    for case in cases:
        ref = case["fns"]["direct"]()
        for name, fn in case["fns"].items():
            check_close(fn(), ref, f"{case['name']} {name}", case["tol"])
        times = measure_interleaved(case["fns"], rounds=rounds, min_time=0.02)  # short convs: many calls a round
        rows.append(dict(name=case["name"], dtype=str(case["dtype"]).split(".")[-1], chosen=case["chosen"],
                         peak_gflop_s=peaks[case["dtype"]] / 1e9,
                         variants={name: dict(s=t["median"], gflop_s=case["flop"] / t["median"] / 1e9)
                                   for name, t in times.items()}))
    return dict(gemm_n=n, peaks={str(d).split(".")[-1]: p / 1e9 for d, p in peaks.items()}, rows=rows)


def unet_cases(device: torch.device, quick: bool) -> List[Dict]:
    """U-Net forward with fused ops against the same model with reference ops; on the CPU, for
    models with convolutions Winograd rewrites, also the form the CPU sampler runs (channels_last,
    fused ops and Winograd convolutions) against the reference ops in channels_last."""
    from fastddpm.models import winograd

    cases = []
    for preset, batch in ([("mnist", 16)] if quick else [("mnist", 16), ("cifar10", 16)]):
        model = random_unet(preset, device)  # outputs worth checking
        c, r = model.config.in_channels, model.config.resolution
        x = torch.randn(batch, c, r, r, device=device)
        t = torch.randint(0, 1000, (batch,), device=device)

        def run(backend, model=model, x=x, t=t):
            with torch.no_grad(), ops.use_backend(backend):
                return model(x, t)

        cases.append(dict(name=f"UNet {preset} forward, batch {batch}", bytes=None, tol=1e-4,
                          ref=lambda run=run: run("reference"), fast=lambda be, run=run: run(be)))
        has_winograd_convs = any(winograd.eligible(m, winograd.MIN_CHANNELS) for m in model.modules())
        if device.type == "cpu" and winograd.available() and has_winograd_convs:
            cl = torch.channels_last
            plain = UNet.from_preset(preset).eval().to(memory_format=cl)
            plain.load_state_dict(model.state_dict())
            rewritten = winograd.with_winograd_convs(plain)
            x_cl = x.contiguous(memory_format=cl)
            cases.append(dict(
                name=f"UNet {preset} forward, batch {batch}, channels_last, + Winograd convs", bytes=None, tol=1e-4,
                ref=lambda run=run, m=plain, x=x_cl: run("reference", m, x),
                fast=lambda be, run=run, m=rewritten, x=x_cl: run(be, m, x)))
    return cases


def fast_backends(device: torch.device) -> List[str]:
    """The compiled backends that run on ``device`` (Triton only on a GPU: its CPU interpreter is for tests)."""
    names = []
    if "native" in ops.available_backends() and (device.type == "cpu" or ops.native.cuda_available()):
        names.append("native")
    if device.type == "cuda" and "triton" in ops.available_backends():
        names.append("triton")
    return names


def _with_pool_variants(cases: List[Dict], device: torch.device) -> List[Dict]:
    """On CPU, each case whose ops allocate their outputs also runs inside ``cpu_memory_pool`` (the
    reference too): glibc maps large blocks afresh on every call, and the page faults of writing
    them can cost more than the op itself (measurements: docs/performance.md#measurements-behind-the-code)."""
    if device.type != "cpu" or not ops.memory_pool.available():
        return cases
    out = []
    for case in cases:
        out.append(case)
        if case.get("allocates", True):
            out.append(dict(case, name=case["name"] + ", in cpu_memory_pool", pool=True))
    return out


def run(device="cpu", quick=False, rounds=7) -> Dict:
    """Run all cases; returns the results as a dict (also the JSON written by the CLI)."""
    device = torch.device(device)
    rows, copies = [], []
    cases = op_cases(device, quick) + unet_cases(device, quick)
    for case in _with_pool_variants(cases, device):
        with ops.cpu_memory_pool() if case.get("pool") else contextlib.nullcontext():
            rows.extend(_measure_case(case, device, rounds, copies))
    convs = conv_cases(device, quick)
    return dict(device=str(device), torch=torch.__version__, threads=torch.get_num_threads(),
                convs=measure_convs(convs, rounds, quick) if convs else None,
                machine=platform.processor() or platform.machine(),
                copy_gb_s=[min(copies) / 1e9, max(copies) / 1e9] if copies else None,
                native=ops.native_status(), triton=ops.triton_status(), rounds=rounds, rows=rows)


def _measure_case(case: Dict, device: torch.device, rounds: int, copies: List[float]) -> List[Dict]:
    """The reference, the copy baseline and every fast backend of one case; the reference and the
    backends are timed in interleaved rounds."""
    rows = []
    fns = {"reference": case["ref"]}
    for backend in fast_backends(device):
        fast_fn = lambda case=case, backend=backend: case["fast"](backend)  # noqa: E731
        if case["tol"] is not None:
            check_close(fast_fn(), case["ref"](), f"{case['name']} [{backend}]", case["tol"])
        fns[backend] = fast_fn
    times = measure_interleaved(fns, rounds=rounds, device=device)
    ref = times["reference"]
    if case["bytes"]:
        # a plain copy moving the same bytes (half read, half written), timed right here: shared
        # machines' bandwidth drifts during a run, so one copy at the start is not the baseline
        copy_bw = copy_bandwidth(case["bytes"] // 2, device=device, rounds=rounds)
        copies.append(copy_bw)
    for backend in fast_backends(device):
        fast, fast_fn = times[backend], fns[backend]
        row = dict(name=f"{case['name']} [{backend}]", backend=backend, ref_s=ref["median"],
                   fast_s=fast["median"], fast_min_s=fast["min"], fast_max_s=fast["max"],
                   speedup=ref["median"] / fast["median"])
        if case["bytes"]:
            row["gb_s"] = case["bytes"] / fast["median"] / 1e9
            row["copy_gb_s"] = copy_bw / 1e9
            row["frac_of_copy"] = case["bytes"] / fast["median"] / copy_bw
        if device.type == "cuda":  # kernel time without launch overhead, as in the sampler's graphs
            ref_g, fast_g = measure_graphed(case["ref"], rounds=rounds), measure_graphed(fast_fn, rounds=rounds)
            if fast_g:
                row["graphed_s"] = fast_g["median"]
                if ref_g:
                    row["graphed_speedup"] = ref_g["median"] / fast_g["median"]
                if case["bytes"]:
                    row["graphed_frac_of_copy"] = case["bytes"] / fast_g["median"] / copy_bw
        rows.append(row)
    return rows


def markdown(result: Dict) -> str:
    """The results as a markdown table."""
    lines = [f"device {result['device']}, torch {result['torch']}, {result['threads']} threads, "
             f"native: {result['native']}, medians of {result['rounds']}; \"copy\": dst.copy_(src) of the "
             f"same bytes, timed beside each case; reference and fast timed in interleaved rounds",
             "", "| case | reference | fast (median) | fast min..max | speed-up | GB/s | copy GB/s | of copy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        bw = (f"{r['gb_s']:.1f} | {r['copy_gb_s']:.1f} | {100 * r['frac_of_copy']:.0f}%" if "gb_s" in r
              else "- | - | -")
        lines.append(f"| {r['name']} | {1e3 * r['ref_s']:.2f} ms | {1e3 * r['fast_s']:.2f} ms | "
                     f"{1e3 * r['fast_min_s']:.2f}..{1e3 * r['fast_max_s']:.2f} ms | {r['speedup']:.2f}x | {bw} |")
    graphed = [r for r in result["rows"] if "graphed_s" in r]
    if graphed:
        lines += ["", "In CUDA graphs (kernel time, no launch overhead; 20 calls per graph):", "",
                  "| case | fast (median) | speed-up over graphed reference | of copy |", "|---|---:|---:|---:|"]
        for r in graphed:
            sp = f"{r['graphed_speedup']:.2f}x" if "graphed_speedup" in r else "-"
            frac = f"{100 * r['graphed_frac_of_copy']:.0f}%" if "graphed_frac_of_copy" in r else "-"
            lines.append(f"| {r['name']} | {1e6 * r['graphed_s']:.1f} us | {sp} | {frac} |")
    if result.get("convs"):
        lines += ["", conv_markdown(result["convs"])]
    return "\n".join(lines)


def conv_markdown(convs: Dict) -> str:
    """The conv rows: per variant the median time and direct-equivalent GFLOP/s (2 N H W C K 9 / time)
    with its percentage of the same dtype's large-GEMM rate measured in the same run; * marks the
    variant fastddpm.models.winograd.choose_tile picks."""
    peaks = ", ".join(f"{d} {p:.0f} GFLOP/s" for d, p in sorted(convs["peaks"].items(), reverse=True))
    n = convs["gemm_n"]
    lines = [f"3x3 convolutions, C -> C, channels_last; direct-equivalent GFLOP/s (% of a {n}^3 GEMM: {peaks}); "
             "variants timed in interleaved rounds; * = the variant the rewrite picks", "",
             "| case | dtype | direct | F(2x2) | F(4x4) | best vs direct |", "|---|---|---:|---:|---:|---:|"]
    for r in convs["rows"]:
        v = r["variants"]
        cells = [(f"{1e3 * v[k]['s']:.2f} ms, {v[k]['gflop_s']:.0f} ({100 * v[k]['gflop_s'] / r['peak_gflop_s']:.0f}%)"
                  + ("*" if r["chosen"] == k else "")) if k in v else "-" for k in ("direct", "F(2x2)", "F(4x4)")]
        best = min(s["s"] for s in v.values())
        lines.append(f"| {r['name']} | {r['dtype']} | {' | '.join(cells)} | {v['direct']['s'] / best:.2f}x |")
    return "\n".join(lines)
