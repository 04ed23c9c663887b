"""Sampling: the public :func:`sample`, the prepared :class:`Sampler`, and what they share.

    options.py   SpeedOptions: precision, layout, kernels, compile/freeze, CUDA graphs (validated once)
    noise.py     NoiseSource: torch.randn from a generator, or in-kernel Philox (decided once per run)
    prepare.py   prepare_model: the model as the loop runs it (Winograd, channels_last, compile, autocast)
    sampler.py   Sampler: buffers, the eager loop, CUDA-graph replay; runs from any step, with a step hook
    cache.py     prepared samplers (and loaded checkpoints) reused across sample() calls
    method.py    SamplingMethod: the sampler, variance, clip, eta, steps -> schedule and coefficients
    api.py       sample(), and what every user of the reverse process shares (model, prepared sampler, batches)
"""

from .api import eval_mode, image_shape, in_batches, positive_int, prepared_sampler, resolve_ddpm, sample
from .cache import clear_cache
from .method import SamplingMethod, clip_value
from .noise import NOISE_SOURCES, NoiseSource, SharedNoise
from .options import SpeedOptions, resolve_dtype
from .prepare import PreparedModel, prepare_model
from .sampler import NonFiniteWarning, Sampler

__all__ = ["NOISE_SOURCES", "NoiseSource", "NonFiniteWarning", "PreparedModel", "Sampler", "SamplingMethod", "SharedNoise", "SpeedOptions", "clear_cache",
           "clip_value", "eval_mode", "image_shape", "in_batches", "positive_int", "prepare_model", "prepared_sampler", "resolve_ddpm",
           "resolve_dtype", "sample"]
