"""The "train" section: one training step (Algorithm 1 loss, backward, Adam) of a U-Net preset,
eager with the reference ops against the model compiled by torch.compile (forward and backward)."""

from __future__ import annotations

from typing import Callable, Dict

import torch

from fastddpm import Schedule, UNet, ops, training_loss

from .harness import measure


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
    return dict(device=str(device), rounds=rounds, rows=rows)


def markdown(result: Dict) -> str:
    """The rows as a markdown table."""
    lines = ["| case | reference | fast (median) | fast min..max | speed-up |", "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {1e3 * r['ref_s']:.1f} ms | {1e3 * r['fast_s']:.1f} ms | "
                     f"{1e3 * r['fast_min_s']:.1f}..{1e3 * r['fast_max_s']:.1f} ms | {r['speedup']:.2f}x |")
    return "\n".join(lines)
