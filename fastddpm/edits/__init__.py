"""What the diffusion process does besides generation from noise, each a thin function over the
fast sampler (:class:`fastddpm.Sampler`: fused step, memory pool, compile, CUDA graphs where they apply).

    common.py       EditRun: model, sampler settings, noise and speed options resolved once; x_t of real images
    reconstruct.py  partial diffusion to x_t and the reverse process back
    interpolate.py  interpolation of two images through their latents (linear or slerp)
    denoise.py      a noisy image as a scaled x_t; the noise level estimated when not given
    inpaint.py      known pixels replaced at every step; RePaint resampling
    progressive.py  x_0 predicted along one run; completions of shared latents
"""

from .denoise import Denoised, denoise, estimate_sigma
from .inpaint import inpaint, load_mask
from .interpolate import interpolate, mix
from .progressive import Progressive, SharedLatent, from_shared_latent, progressive
from .reconstruct import reconstruct

__all__ = ["Denoised", "Progressive", "SharedLatent", "denoise", "estimate_sigma", "from_shared_latent", "inpaint",
           "interpolate", "load_mask", "mix", "progressive", "reconstruct"]
