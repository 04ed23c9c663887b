"""The "train" section: one Algorithm-1 training step (loss, backward, grad clip, Adam) of a U-Net.

Two tables:

* fastddpm's reference step (eager, reference ops) against the model compiled by torch.compile,
  as before (``--quick``: the ``digits`` preset; otherwise ``mnist``);
* (full mode only) the ``cifar10`` preset at batch 16: fastddpm's reference step, fastddpm at its
  best variants (native ops with their fused backward, channels_last, fused Adam, in-kernel Philox
  noise for the loss; eager and compiled), and diffusers' ``UNet2DModel`` with the same
  architecture (``diffusers_cmp.CIFAR10_CONFIG``, with the preset's dropout 0.1) at its best
  (torch.compile, channels_last, fused Adam) on the same loss, batch and recipe (grad clip 1.0,
  the loss's eps from a generator as diffusers' training script draws it); each in fp32 and, where the CPU has
  bf16 arithmetic, in bf16 autocast. One precision's variants are timed interleaved in rounds
  (medians), and each row's speed-up is against diffusers in the same precision.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from fastddpm import Schedule, UNet, ops, training_loss
from fastddpm.ops import PhiloxState
from fastddpm.utils import cpu_has_bf16_arithmetic

from .harness import measure, measure_interleaved


def train_step(preset: str, compiled: bool, device="cpu", batch: int = 16, lr: float = 2e-4) -> Callable:
    """One Algorithm-1 step (loss, backward, Adam) of a fresh ``preset`` U-Net (seed 0) on a fixed
    batch and fixed draws, so every variant starts from the same loss; ``compiled``: the model
    through torch.compile. Returns the step, which returns the loss."""
    device = torch.device(device)
    torch.manual_seed(0)
    model = UNet.from_preset(preset).to(device).train()
    net = torch.compile(model, dynamic=False) if compiled else model
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    r = model.config.resolution
    x0 = torch.randn(batch, model.config.in_channels, r, r, generator=torch.Generator().manual_seed(1)).to(device)
    schedule = Schedule.linear()

    def step():
        with ops.use_backend("reference"):  # the compiled graph fuses the reference ops itself
            loss = training_loss(net, schedule, x0, generator=torch.Generator(device).manual_seed(2))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


@dataclass(frozen=True)
class Variant:
    """One way of running the cifar10 training step."""

    label: str
    library: str = "fastddpm"      # or "diffusers"
    backend: str = "auto"          # fastddpm's op backend ("reference": the pure-PyTorch ops)
    compiled: bool = False
    bf16: bool = False             # bf16 autocast
    channels_last: bool = True
    fused_adam: bool = True
    philox: bool = True            # the loss's eps drawn in the noising kernel


def _model(variant: Variant, preset: str, device: torch.device):
    """(module, callable eps_model(x, t)) of the variant, weights from seed 0."""
    torch.manual_seed(0)
    if variant.library == "diffusers":
        import diffusers

        from .diffusers_cmp import CIFAR10_CONFIG

        # dropout 0.1 as in fastddpm's cifar10 preset (the paper's recipe): the same training step
        module = diffusers.UNet2DModel(**CIFAR10_CONFIG, dropout=0.1).to(device).train()

        def eps_model(x, t, unet=module):
            return unet(x, t).sample
    else:
        module = UNet.from_preset(preset).to(device).train()
        eps_model = module
    if variant.channels_last:
        module.to(memory_format=torch.channels_last)
    if variant.compiled:
        eps_model = torch.compile(eps_model, dynamic=False)
    return module, eps_model


def variant_step(variant: Variant, preset: str = "cifar10", batch: int = 16, device="cpu", lr: float = 2e-4,
                 grad_clip: float = 1.0) -> Callable:
    """One step of ``variant``: Algorithm 1's loss on a fixed batch, backward, grad-norm clipping,
    Adam. Returns the step, which returns the loss."""
    device = torch.device(device)
    module, eps_model = _model(variant, preset, device)
    opt = torch.optim.Adam(module.parameters(), lr=lr, fused=variant.fused_adam or None)
    c, r = (3, 32) if variant.library == "diffusers" else (module.config.in_channels, module.config.resolution)
    x0 = torch.randn(batch, c, r, r, generator=torch.Generator().manual_seed(1)).to(device)
    if variant.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    schedule = Schedule.linear()
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if variant.bf16 else contextlib.nullcontext()
    backend = "reference" if variant.library == "diffusers" else variant.backend

    def step():
        g = torch.Generator(device).manual_seed(2)
        with ops.use_backend(backend), amp:
            if variant.philox:
                t = torch.randint(0, schedule.T, (batch,), generator=g, device=device)
                loss = training_loss(eps_model, schedule, x0, t=t, rng=PhiloxState(2, device=device))
            else:
                loss = training_loss(eps_model, schedule, x0, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
        opt.step()
        return loss

    return step


def cifar10_variants(bf16: bool) -> List[Variant]:
    """The variants of one precision (diffusers at its best first: the rows' baseline)."""
    p = "bf16" if bf16 else "fp32"
    return [Variant(f"diffusers UNet2DModel, compiled, channels_last, fused Adam, {p}", library="diffusers",
                    compiled=True, bf16=bf16, philox=False),
            Variant(f"fastddpm reference ops, eager, NCHW, Adam, {p}", backend="reference", bf16=bf16,
                    channels_last=False, fused_adam=False, philox=False),
            Variant(f"fastddpm native ops, eager, channels_last, fused Adam, philox, {p}", bf16=bf16),
            Variant(f"fastddpm native ops, compiled, channels_last, fused Adam, philox, {p}", compiled=True,
                    bf16=bf16),
            Variant(f"fastddpm reference ops, compiled, channels_last, fused Adam, philox, {p}",
                    backend="reference", compiled=True, bf16=bf16)]


def precisions(device: torch.device) -> List[bool]:
    """fp32, and bf16 where it is native arithmetic here (emulated bf16 is no one's best)."""
    return [False, True] if device.type == "cuda" or cpu_has_bf16_arithmetic() else [False]


def compare_cifar10(device="cpu", rounds: int = 3, bf16: Optional[bool] = None, batch: int = 16,
                    timing: Callable = contextlib.nullcontext) -> List[Dict]:
    """Rows for the cifar10 preset: each precision's variants interleaved in rounds (medians),
    speed-ups against diffusers' row of the same precision. ``bf16``: one precision only.
    ``timing``: a context manager entered around the timed rounds only, after every variant has
    been built and compiled (e.g. one that holds a shared machine alone)."""
    device = torch.device(device)
    rows = []
    for low in precisions(device) if bf16 is None else [bf16]:
        variants = cifar10_variants(low)
        steps = {}
        for v in variants:
            steps[v.label] = variant_step(v, batch=batch, device=device)
            steps[v.label]()  # compiles, outside the timed rounds
        with timing():
            stats = measure_interleaved(steps, rounds=rounds, warmup=1, device=device)
        base = stats[variants[0].label]["median"]
        for v in variants:
            s = stats[v.label]
            rows.append(dict(name=f"cifar10 batch {batch}: {v.label}", time_s=s["median"], min_s=s["min"],
                             max_s=s["max"], vs_diffusers=base / s["median"]))
    return rows


def run(device="cpu", quick=False, rounds=5) -> Dict:
    """Time one step of each variant on the same batch and the same draws; returns the rows."""
    device = torch.device(device)
    preset, batch = ("digits", 16) if quick else ("mnist", 16)
    rows = []
    times = {}
    losses = {}
    for name in ("reference", "compiled"):
        step = train_step(preset, name == "compiled", device, batch)
        losses[name] = step().item()  # the first step: equal losses from equal weights and draws
        times[name] = measure(step, rounds=rounds, warmup=1, device=device)
    if abs(losses["compiled"] - losses["reference"]) > 1e-4 * max(1.0, abs(losses["reference"])):
        raise AssertionError(f"train step: compiled loss {losses['compiled']} != reference {losses['reference']}")
    ref, fast = times["reference"], times["compiled"]
    rows.append(dict(name=f"train step {preset} batch {batch} (fwd + bwd + Adam), compiled", ref_s=ref["median"],
                     fast_s=fast["median"], fast_min_s=fast["min"], fast_max_s=fast["max"],
                     speedup=ref["median"] / fast["median"]))
    result = dict(device=str(device), rounds=rounds, rows=rows, cifar10=[])
    if not quick:
        try:
            result["cifar10"] = compare_cifar10(device, rounds=min(rounds, 3))
        except ImportError as e:  # diffusers is optional: the cifar10 table needs it
            result["cifar10_skipped"] = f"{type(e).__name__}: {e}"
    return result


def cifar10_markdown(rows: List[Dict]) -> str:
    """The cifar10 rows as a markdown table."""
    lines = ["| cifar10 training step (loss, backward, clip 1.0, Adam) | median | min..max | vs diffusers |",
             "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {1e3 * r['time_s']:.0f} ms | {1e3 * r['min_s']:.0f}..{1e3 * r['max_s']:.0f} ms "
                     f"| {r['vs_diffusers']:.2f}x |")
    return "\n".join(lines)


def markdown(result: Dict) -> str:
    """The rows as markdown tables."""
    lines = ["| case | reference | fast (median) | fast min..max | speed-up |", "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {1e3 * r['ref_s']:.1f} ms | {1e3 * r['fast_s']:.1f} ms | "
                     f"{1e3 * r['fast_min_s']:.1f}..{1e3 * r['fast_max_s']:.1f} ms | {r['speedup']:.2f}x |")
    if result.get("cifar10"):
        lines += ["", cifar10_markdown(result["cifar10"])]
    if result.get("cifar10_skipped"):
        lines += ["", f"cifar10 rows skipped: {result['cifar10_skipped']}"]
    return "\n".join(lines)
