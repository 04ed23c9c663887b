"""Model architectures."""

from .diffusers_compat import config_from_diffusers, unet_from_diffusers
from .unet import PRESETS, UNet, UNetConfig, timestep_embedding

__all__ = ["PRESETS", "UNet", "UNetConfig", "config_from_diffusers", "timestep_embedding", "unet_from_diffusers"]
