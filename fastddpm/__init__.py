"""fastddpm: Denoising Diffusion Probabilistic Models (Ho et al. 2020), exact and fast.

Quick start::

    import fastddpm
    x = fastddpm.sample("mnist", 16, steps=100, seed=0)   # the bundled MNIST model
    fastddpm.save_grid(x, "samples.png")
"""

from .checkpoint import CheckpointError
from .diffusers_io import accelerate, export_diffusers
from .diffusion import q_posterior, q_sample, reference_ddim_sample, reference_sample, training_loss
from .edits import denoise, from_shared_latent, inpaint, interpolate, progressive, reconstruct
from .images import make_grid, save_grid
from .likelihood import BitsPerDim, bits_per_dim
from .models.unet import PRESETS, UNet, UNetConfig
from .pipeline import DDPM, bundled_models, load, save
from .sampling import NoiseSource, NonFiniteWarning, Sampler, SpeedOptions, sample
from .schedule import Schedule, ScheduleConfig
from .train import NonFiniteError, TrainConfig, Trainer, train

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "DDPM", "NoiseSource", "NonFiniteWarning", "PRESETS", "Sampler", "Schedule", "ScheduleConfig",
    "SpeedOptions",
    "TrainConfig", "Trainer", "UNet", "UNetConfig", "bundled_models", "load", "make_grid", "q_posterior", "q_sample",
    "reference_ddim_sample", "reference_sample", "sample", "save", "save_grid", "train", "training_loss",
    "denoise", "from_shared_latent", "inpaint", "interpolate", "progressive", "reconstruct",
    "BitsPerDim", "bits_per_dim", "NonFiniteError", "accelerate", "export_diffusers",
    "__version__",
]
