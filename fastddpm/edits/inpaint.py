"""Inpainting: the reverse process with the known pixels replaced, at every step, by the input
re-noised to that step's level (the replacement method), optionally with RePaint's resampling."""

from __future__ import annotations

import os
from typing import Union

import numpy as np
import torch

from .. import ops
from ..sampling import NoiseSource, positive_int
from ..schedule import Schedule
from .common import EditRun


def load_mask(mask: Union[str, os.PathLike, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """A boolean mask broadcastable to ``like`` (``[N, C, H, W]``), True where pixels are known:
    from a tensor of 0s and 1s (``[H, W]``, ``[1 or N, 1 or C, H, W]``) or a PNG of black (unknown)
    and white (known) pixels."""
    if isinstance(mask, (str, os.PathLike)):
        from PIL import Image

        if not os.path.isfile(mask):
            raise ValueError(f"mask: {os.fspath(mask)!r} is not a file")
        try:
            with Image.open(mask) as im:
                values = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
        except OSError as e:
            raise ValueError(f"mask: {os.fspath(mask)!r} is not a readable image ({e})") from None
        mask = torch.from_numpy(values)
    if not torch.is_tensor(mask):
        raise TypeError(f"mask: expected a tensor or a PNG path, got {type(mask).__name__}")
    m = mask.detach().to(like.device)
    if m.dim() == 2:
        m = m.view(1, 1, *m.shape)
    N, C, H, W = like.shape
    if m.dim() != 4 or tuple(m.shape[-2:]) != (H, W) or m.shape[0] not in (1, N) or m.shape[1] not in (1, C):
        raise ValueError(f"mask: expected shape [H, W] or [1 or {N}, 1 or {C}, {H}, {W}] for images "
                         f"{tuple(like.shape)}, got {tuple(mask.shape)}")
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError("mask: expected binary values (0 = unknown, 1 = known; in a PNG black and white)")
    return m.bool()


def _forward_jump(x: torch.Tensor, schedule: Schedule, frm: int, to: int, noise: NoiseSource) -> torch.Tensor:
    """x at schedule index ``to`` from x at index ``frm`` (< to; -1 for x_0) with q(x_to | x_frm)."""
    abar_from = 1.0 if frm < 0 else float(schedule.abar[frm])
    ratio = float(schedule.abar[to]) / abar_from
    return ratio ** 0.5 * x + (1.0 - ratio) ** 0.5 * noise.initial(x.shape, x.device)


@torch.no_grad()
def inpaint(model_or_path, x: torch.Tensor, mask, *, resample: int = 1, jump: int = 1,
            **run_options) -> torch.Tensor:
    """Fill the unknown pixels of ``x`` (images in [-1, 1]; ``mask`` True/1/white where known).

    At every step of the reverse process the known pixels are replaced by ``x`` diffused to that
    step's level (the last step puts ``x`` itself), through the sampler's step hook: no host sync,
    and the CUDA graphs keep working. RePaint (Lugmayr et al. 2022): with ``resample`` > 1, every
    ``jump`` steps the state goes back up ``jump`` steps with q and the segment is run again,
    ``resample`` times in all, which harmonizes the fill with the known pixels.
    ``run_options``: as :func:`fastddpm.sample`. Known pixels of the output equal ``x`` exactly.
    """
    run = EditRun(model_or_path, **run_options)
    x = run.images("x", x)
    known = load_mask(mask, x)
    positive_int("resample", resample)
    positive_int("jump", jump)
    schedule = run.method.schedule(run.ddpm.schedule)
    sampler = run.sampler_for(schedule, x.shape[0])
    with run.eval_mode():
        if not bool(known.any()):  # nothing known: plain sampling, with the same draws
            return sampler.run(run.noise, progress=run.progress)
        table = schedule.table("noising", run.device)
        buffer = torch.empty_like(x)

        def replace_known(state: torch.Tensor, i: torch.Tensor) -> None:
            # after the step at index i the state is at index i - 1: x diffused there, or x itself at the end
            z, rng = run.noise.step(buffer)
            noised = ops.q_sample(x, (i - 1).clamp(min=0), table, z, rng=rng)[0]
            target = torch.where((i > 0).view(-1, 1, 1, 1), noised, x)
            state.copy_(torch.where(known, target, state))

        state = run.noise.initial(x.shape, run.device)
        top = schedule.T - 1
        while top >= 0:
            stop = max(top - jump + 1, 0) if resample > 1 else 0  # without resampling: one run
            for r in range(resample):
                state = sampler.run(run.noise, x_T=state, start=top, stop=stop, step_hook=replace_known,
                                    progress=run.progress)
                if r < resample - 1:
                    state = _forward_jump(state, schedule, stop - 1, top, run.noise)
            top = stop - 1
    return state
