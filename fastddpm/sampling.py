"""``fastddpm.sample``: ancestral DDPM (Algorithm 2) and DDIM, on the full or a respaced schedule.

This module validates what the user asked for and splits it into batches; the loop itself is
:class:`fastddpm.sampler.Sampler` (one fused step op for every sampler, DESIGN.md section 2).
"""

from __future__ import annotations

import random
from typing import Callable, Optional, Sequence, Union

import torch

from .ops import PhiloxState
from .pipeline import DDPM, resolve_model
from .sampler import Sampler
from .schedule import DDIM_DIRECTIONS, VARIANCES
from .utils import resolve_device

SAMPLERS = ("ddpm", "ddim")


def _clip_value(clip) -> Optional[float]:
    if clip is True:
        return 1.0
    if clip is False or clip is None:
        return None
    if isinstance(clip, (int, float)) and clip > 0:
        return float(clip)
    raise ValueError(f"clip: expected a bool or a positive float, got {clip!r}")


def _model_device(model) -> Optional[torch.device]:
    if isinstance(model, torch.nn.Module):
        p = next(model.parameters(), None)
        return p.device if p is not None else None
    return None


def sample(model_or_path: Union[DDPM, torch.nn.Module, Callable, str] = "mnist", n: int = 16, *,
           steps: Optional[int] = None, sampler: str = "ddpm", variance: str = "fixed_large",
           clip: Union[bool, float] = True, eta: float = 0.0, ddim_direction: str = "rederived",
           seed: Optional[int] = None, generator: Optional[torch.Generator] = None, device="cpu",
           batch_size: Optional[int] = None, shape: Optional[Sequence[int]] = None,
           progress: bool = True, callback: Optional[Callable] = None, noise: str = "generator",
           dtype="float32", channels_last: bool = True, compile=False, cuda_graph: bool = False,
           graph_steps: int = 1, winograd: Optional[bool] = None, freeze: bool = False) -> torch.Tensor:
    """Generate ``n`` images in [-1, 1], shaped ``[n, C, H, W]``, on ``device``.

    model_or_path: a :class:`DDPM`, a :class:`UNet` or any ``eps_model(x, t)`` (linear schedule,
        T=1000), a checkpoint directory, or the name of a bundled model (``"mnist"``).
    steps: number of sampling steps; ``None`` uses all T. Fewer steps sample on an evenly respaced
        subset of timesteps with betas recomputed from abar (improved-diffusion's respacing).
    sampler: ``"ddpm"`` (ancestral, Algorithm 2) or ``"ddim"`` (``eta`` in [0, 1]).
    variance: ``"fixed_large"`` (beta_t; the paper's CIFAR-10 choice) or ``"fixed_small"``.
    clip: clip the predicted x0 to [-1, 1] (or to [-clip, clip] for a float).
    seed / generator: reproducibility; a given ``generator`` is used as is (and advanced).
    noise: ``"generator"`` (``torch.randn`` from the generator: the reference sampler's draws,
        equal results in float32) or ``"philox"`` (drawn inside the step kernel from a Philox
        state seeded by ``seed``; required by ``cuda_graph``, faster on CPU).
    batch_size: images per forward pass (default: all ``n`` at once; on a GPU, halved until a
        batch fits in memory).
    shape: ``(C, H, W)``; needed only for a model that is not a fastddpm UNet.
    callback: ``callback(i, t, x, x0)`` after each step (x0: the model's prediction at that step).
    dtype: the U-Net's compute dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (autocast).
    channels_last: run the U-Net on channels_last tensors (a given ``nn.Module`` is converted in
        place). On by default: measured faster on both devices (CPU, mnist eager: 1.23x; H200,
        cifar10 batch 256 bf16 with CUDA graphs: 1.30x) and never slower.
    compile: ``torch.compile`` the U-Net (True, or a mode such as ``"max-autotune"``).
    freeze: with ``compile``, fold the weights into the compiled U-Net (faster steps, a compile
        Inductor cannot cache; see :class:`Sampler`).
    cuda_graph / graph_steps: replay captured CUDA graphs of ``graph_steps`` steps each (CUDA).
    winograd: Winograd F(2x2, 3x3) for the U-Net's wide 3x3 convolutions on the CPU in float32
        (None: wherever it applies; measured 1.4x on the cifar10 U-Net's sampler step here).

    Example::

        x = fastddpm.sample("mnist", 16, steps=100, seed=0)
        fastddpm.save_grid(x, "samples.png")
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")
    if variance not in VARIANCES:
        raise ValueError(f"variance: expected one of {VARIANCES}, got {variance!r}")
    if ddim_direction not in DDIM_DIRECTIONS:
        raise ValueError(f"ddim_direction: expected one of {DDIM_DIRECTIONS}, got {ddim_direction!r}")
    clip_value = _clip_value(clip)
    device = resolve_device(device)
    ddpm = resolve_model(model_or_path, device)
    T = ddpm.schedule.T
    steps = T if steps is None else steps
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= T:
        raise ValueError(f"steps: expected an int in [1, {T}] (T of this model), got {steps!r}")
    batch_size = n if batch_size is None else batch_size
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    image_shape = tuple(shape) if shape is not None else ddpm.image_shape
    if image_shape is None or len(image_shape) != 3:
        raise ValueError(f"shape: expected (C, H, W) for a model that is not a fastddpm UNet, got {shape!r}")
    model_device = _model_device(ddpm.model)
    if model_device is not None and model_device != device:
        raise ValueError(f"device: the model's parameters are on {model_device}, but sampling was "
                         f"asked on {device}; move the model with .to({str(device)!r}) first")
    if noise not in ("generator", "philox"):
        raise ValueError(f"noise: expected 'generator' or 'philox', got {noise!r}")
    if cuda_graph and noise != "philox":
        raise ValueError("noise: cuda_graph=True needs noise='philox' (drawn inside the captured step)")
    seed = random.randrange(2**62) if seed is None else seed
    rng = None
    if noise == "philox":
        if generator is not None:
            raise ValueError("generator: not used with noise='philox'; pass seed= instead")
        rng = PhiloxState(seed, device=device)
    elif generator is None:  # (a given generator's device is checked by Sampler.run)
        generator = torch.Generator(device).manual_seed(seed)

    schedule = ddpm.schedule.respaced(steps)
    coeffs = schedule.table("step", device, sampler=sampler, variance=variance,
                            prediction=ddpm.prediction, eta=eta, ddim_direction=ddim_direction)
    was_training = getattr(ddpm.model, "training", False)
    if isinstance(ddpm.model, torch.nn.Module):
        ddpm.model.eval()
    options = dict(clip=clip_value, device=device, dtype=dtype, channels_last=channels_last, winograd=winograd,
                   compile=compile, freeze=freeze, cuda_graph=cuda_graph, graph_steps=graph_steps)
    try:
        return _sample_in_batches(ddpm.model, schedule, coeffs, n, batch_size, image_shape, options,
                                  dict(generator=generator, rng=rng, callback=callback, progress=progress))
    finally:
        if was_training:
            ddpm.model.train()


def _sample_in_batches(model, schedule, coeffs, n, batch_size, image_shape, options, run_args) -> torch.Tensor:
    """Run the sampler over ``n`` images ``batch_size`` at a time; on CUDA, halve the batch when it
    does not fit in memory (the draws then differ from one full batch, as they would by hand)."""
    chunks, start, samplers = [], 0, {}
    while start < n:
        size = min(batch_size, n - start)
        try:
            if size not in samplers:
                samplers[size] = Sampler(model, schedule, coeffs, (size, *image_shape), **options)
            chunks.append(samplers[size].run(**run_args))
        except torch.cuda.OutOfMemoryError:
            samplers.clear()
            torch.cuda.empty_cache()
            if batch_size == 1:
                raise
            batch_size = max(1, batch_size // 2)
            continue
        start += size
    return torch.cat(chunks)
