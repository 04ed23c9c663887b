"""Sampling: the public :func:`sample`, the prepared :class:`Sampler`, and what they share.

    options.py   SpeedOptions: precision, layout, kernels, compile/freeze, CUDA graphs (validated once)
    noise.py     NoiseSource: torch.randn from a generator, or in-kernel Philox (decided once per run)
    prepare.py   prepare_model: the model as the loop runs it (Winograd, channels_last, compile, autocast)
    sampler.py   Sampler: buffers, the eager loop, CUDA-graph replay; runs from any step, with a step hook
    cache.py     prepared samplers (and loaded checkpoints) reused across sample() calls
    api.py       sample(): validation and batching
"""

from .api import clip_value, sample
from .cache import clear_cache
from .noise import NOISE_SOURCES, NoiseSource
from .options import SpeedOptions, resolve_dtype
from .prepare import PreparedModel, prepare_model
from .sampler import Sampler

__all__ = ["NOISE_SOURCES", "NoiseSource", "PreparedModel", "Sampler", "SpeedOptions", "clear_cache", "clip_value",
           "prepare_model", "resolve_dtype", "sample"]
