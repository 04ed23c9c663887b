"""``fastddpm.sample``: ancestral DDPM (Algorithm 2) and DDIM, on the full or a respaced schedule,
and the pieces every user of the reverse process shares (the edits in :mod:`fastddpm.edits` too):
resolving the model, preparing (or reusing) a sampler, running batches.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Optional, Sequence, Union

import torch

from ..models import winograd
from ..pipeline import DDPM, locate_checkpoint, resolve_model
from ..pipeline import load as load_checkpoint
from ..schedule import Schedule
from ..utils import resolve_device
from . import cache
from .method import SamplingMethod
from .noise import NoiseSource, resolve_seed
from .options import SpeedOptions
from .sampler import Sampler


def resolve_ddpm(model_or_path, device: torch.device, reuse: bool = True) -> DDPM:
    """The DDPM to run (see :func:`sample`'s ``model_or_path``); a checkpoint path or bundled name is
    loaded once while its files stay unchanged (with ``reuse``). Its model must be on ``device``."""
    if reuse and isinstance(model_or_path, (str, os.PathLike)):
        path = locate_checkpoint(model_or_path)
        ddpm = cache.MODELS.get(path, device, lambda p, d: load_checkpoint(p, device=d))
    else:
        ddpm = resolve_model(model_or_path, device)
    if isinstance(ddpm.model, torch.nn.Module):
        p = next(ddpm.model.parameters(), None)
        if p is not None and p.device != device:
            raise ValueError(f"device: the model's parameters are on {p.device}, but it was asked to run on "
                             f"{device}; move the model with .to({str(device)!r}) first")
    return ddpm


def image_shape(ddpm: DDPM, shape: Optional[Sequence[int]] = None) -> tuple:
    """``(C, H, W)`` of the model's images: its UNet config's, or the given ``shape``."""
    if shape is None:
        result = ddpm.image_shape
    elif isinstance(shape, (tuple, list, torch.Size)) and all(isinstance(s, int) and not isinstance(s, bool)
                                                              for s in shape):
        result = tuple(shape)
    else:
        raise TypeError(f"shape: expected a tuple of 3 ints (C, H, W), got {shape!r}")
    if result is None or len(result) != 3 or min(result) < 1:
        raise ValueError(f"shape: expected (C, H, W) of positive sizes for a model that is not a fastddpm UNet, "
                         f"got {shape!r}")
    return result


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """The model in eval mode inside the block (dropout off), its training flag restored after."""
    was_training = getattr(model, "training", False)
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def prepared_sampler(ddpm: DDPM, schedule: Schedule, method: SamplingMethod, shape, *, device: torch.device,
                     options: SpeedOptions, reuse: bool = True) -> Sampler:
    """A :class:`Sampler` of ``ddpm.model`` for ``method`` on ``schedule`` and batch ``shape``:
    the cached one when ``reuse`` and nothing it depends on has changed."""
    coeffs = method.coefficients(schedule, ddpm.prediction, device)
    if reuse:
        return cache.SAMPLERS.get(ddpm.model, schedule, coeffs, shape, clip=method.clip, device=device,
                                  options=options)
    return Sampler(ddpm.model, schedule, coeffs, shape, clip=method.clip, device=device, options=options)


def in_batches(run: Callable[[int, int], torch.Tensor], n: int, batch_size: int) -> torch.Tensor:
    """``run(start, size)`` over ``n`` items ``batch_size`` at a time, concatenated; on CUDA, halve
    the batch when it does not fit in memory (the draws then differ from one full batch, as they
    would by hand, unless they are per-image)."""
    chunks, start = [], 0
    while start < n:
        size = min(batch_size, n - start)
        try:
            chunks.append(run(start, size))
        except torch.cuda.OutOfMemoryError:
            cache.SAMPLERS.clear()
            torch.cuda.empty_cache()
            if batch_size == 1:
                raise
            batch_size = max(1, batch_size // 2)
            continue
        start += size
    return torch.cat(chunks)


class BatchInvariant(torch.overrides.TorchFunctionMode):
    """Inside it, ``F.linear`` computes each sample's rows on its own (a batched matmul), so an
    image's model output does not depend on how many images share its batch: CPU GEMMs pick their
    kernels by the number of rows, and a time-embedding layer's [B, K] input would otherwise give
    rows that differ in the last bits between a batch of 3 and one of 8. (oneDNN's convolutions and
    the native ops compute each sample alike in batches of two or more; Winograd convolutions are
    made so by :func:`batch_invariant`.) Used with ``per_image_seeds``
    on the CPU only (:func:`batch_invariant_here`)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        if func in (torch.nn.functional.linear, torch._C._nn.linear) and args and args[0].dim() >= 2:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            rows = x.reshape(x.shape[0], -1, x.shape[-1])
            out = torch.bmm(rows, weight.t().expand(x.shape[0], *weight.t().shape))
            out = out.reshape(*x.shape[:-1], weight.shape[0])
            return out if bias is None else out + bias
        return func(*args, **kwargs)


def batch_invariant() -> contextlib.ExitStack:
    """Where a run must compute each image independently of its batch: :class:`BatchInvariant`'s
    per-sample linears and Winograd convolutions chosen and run image by image
    (:func:`fastddpm.models.winograd.per_image`)."""
    stack = contextlib.ExitStack()
    stack.enter_context(BatchInvariant())
    stack.enter_context(winograd.per_image())
    return stack


def batch_invariant_here(per_image_seeds: bool, device: torch.device) -> bool:
    """Whether a run computes each image independently of its batch (:class:`BatchInvariant`, and a
    lone image run in a batch of two): per-image runs on the CPU. On CUDA, cuDNN and cuBLAS may pick
    other algorithms for other batch sizes whatever the Python side does, so there bit-equality
    across batch compositions is not promised (docs/distributed.md) and the extra work is skipped."""
    return per_image_seeds and device.type == "cpu"


def noise_per_batch(kind: str, seed: Optional[int], generator: Optional[torch.Generator], per_image_seeds: bool,
                    first_index: int, chw, device: torch.device) -> Callable[[int], NoiseSource]:
    """``noise(start)``: the noise source of the batch starting at image ``start`` of a
    :func:`sample` call: one source shared by all batches, or with ``per_image_seeds`` a
    per-image source of images ``first_index + start`` on."""
    if not isinstance(per_image_seeds, bool):
        raise TypeError(f"per_image_seeds: expected a bool, got {type(per_image_seeds).__name__}")
    if not per_image_seeds:
        if first_index != 0:
            raise ValueError(f"first_index: numbers images of a per_image_seeds run; got {first_index!r} "
                             f"without per_image_seeds=True")
        shared = NoiseSource.resolve(kind, seed=seed, generator=generator, device=device)
        return lambda start: shared
    if generator is not None:
        raise ValueError("generator: per_image_seeds derives one stream per image from seed=; pass seed instead")
    seed = resolve_seed(seed)
    NoiseSource.per_image(kind, seed, first_index, chw, device)  # its argument checks, before any work
    return lambda start: NoiseSource.per_image(kind, seed, first_index + start, chw, device)


def positive_int(name: str, value) -> int:
    """``value`` if it is a positive int, else a ValueError naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def sample(model_or_path: Union[DDPM, torch.nn.Module, Callable, str] = "mnist", n: int = 16, *,
           steps: Optional[int] = None, sampler: Optional[str] = None, variance: Optional[str] = None,
           clip: Union[bool, float, None] = None, eta: float = 0.0, ddim_direction: str = "rederived",
           seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
           noise_source: str = "generator", per_image_seeds: bool = False, first_index: int = 0,
           device="cpu", batch_size: Optional[int] = None,
           shape: Optional[Sequence[int]] = None, progress: bool = True, callback: Optional[Callable] = None,
           options: Optional[SpeedOptions] = None, reuse: bool = True, **speed) -> torch.Tensor:
    """Generate ``n`` images in [-1, 1], shaped ``[n, C, H, W]``, on ``device``.

    model_or_path: a :class:`DDPM`, a :class:`UNet` or any ``eps_model(x, t)`` (linear schedule,
        T=1000), a checkpoint directory, or the name of a bundled model (``"mnist"``).
    steps: number of sampling steps; ``None`` uses all T. Fewer steps sample on an evenly respaced
        subset of timesteps with betas recomputed from abar (improved-diffusion's respacing).
    sampler: ``"ddpm"`` (ancestral, Algorithm 2) or ``"ddim"`` (``eta`` in [0, 1];
        ``ddim_direction``: ``"rederived"`` from the clipped x0, or ``"model"`` as diffusers does).
    variance: ``"fixed_large"`` (beta_t; the paper's CIFAR-10 choice) or ``"fixed_small"``.
    clip: clip the predicted x0 to [-1, 1] (or to [-clip, clip] for a float; False: no clipping).
        ``sampler``, ``variance`` and ``clip`` left as None are the model's
        (:meth:`DDPM.sampler_defaults`: ``"ddpm"``, ``"fixed_large"``, True; a diffusers folder's
        are its scheduler's).
    seed / generator: reproducibility; a given ``generator`` is used as is (and advanced).
    noise_source: ``"generator"`` (``torch.randn`` from the generator: the reference sampler's
        draws, equal results in float32) or ``"philox"`` (drawn inside the step kernel from a
        Philox state seeded by ``seed``; needed by ``cuda_graph``, faster on the CPU).
    per_image_seeds: give image ``i`` its own noise stream derived from ``(seed, i)`` (x_T and
        every step's), so each image is the same whatever the batch size, the batch order or the
        number of processes sharing the run (:mod:`fastddpm.sampling.noise` defines both
        sources' streams); with it, images ``[first_index, first_index + n)`` of the run are
        made (a shard of a bigger run). Off by default: the default ``"generator"`` draws stay
        those of :func:`fastddpm.reference_sample` (one ``torch.randn`` per step for the whole
        batch), and seeds given before keep giving the same images; per-image generator noise
        also costs ``batch_size`` small draws a step (per-image Philox costs nothing). The
        ``fastddpm sample --out-dir`` command always uses it.
    batch_size: images per forward pass (default: all ``n`` at once; on a GPU, halved until a
        batch fits in memory).
    shape: ``(C, H, W)``; needed only for a model that is not a fastddpm UNet.
    callback: ``callback(i, t, x, x0)`` after each step (x0: the model's prediction at that step).
    options / speed keywords: how fast, not what: a :class:`SpeedOptions`, and/or its fields as
        keywords (``dtype=``, ``channels_last=``, ``compile=``, ``freeze=``, ``cuda_graph=``,
        ``graph_steps=``, ``winograd=``, ``memory_pool=``); documented there.
    reuse: keep the prepared sampler (and a model loaded from a path) for the next call with the
        same model, options and shape; a model whose weights changed since is prepared anew.

    Example::

        x = fastddpm.sample("mnist", 16, steps=100, seed=0)
        fastddpm.save_grid(x, "samples.png")
    """
    options = SpeedOptions.from_arguments(options, **speed)
    positive_int("n", n)
    device = resolve_device(device)
    ddpm = resolve_ddpm(model_or_path, device, reuse)
    given = {"sampler": sampler, "variance": variance, "clip": clip}
    method = SamplingMethod(**{**ddpm.sampler_defaults(), **{k: v for k, v in given.items() if v is not None}},
                            eta=eta, ddim_direction=ddim_direction, steps=steps)
    schedule = method.schedule(ddpm.schedule)
    batch_size = positive_int("batch_size", n if batch_size is None else batch_size)
    chw = image_shape(ddpm, shape)
    if options.cuda_graph and noise_source != "philox":
        raise ValueError("noise_source: cuda_graph=True needs noise_source='philox' (drawn inside the captured step)")
    batch_noise = noise_per_batch(noise_source, seed, generator, per_image_seeds, first_index, chw, device)

    invariant = batch_invariant_here(per_image_seeds, device)

    def run(start: int, size: int) -> torch.Tensor:
        # per-image on the CPU: a lone image runs in a batch of two (the next index's image,
        # dropped), since CPU convolutions compute a batch of one with other kernels than larger batches
        padded = 2 if invariant and size == 1 else size
        sampler_ = prepared_sampler(ddpm, schedule, method, (padded, *chw), device=device, options=options,
                                    reuse=reuse)
        return sampler_.run(batch_noise(start), callback=callback, progress=progress)[:size]

    with eval_mode(ddpm.model), batch_invariant() if invariant else contextlib.nullcontext():
        return in_batches(run, n, batch_size)
