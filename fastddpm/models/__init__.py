"""Model architectures."""

from .unet import PRESETS, UNet, UNetConfig, timestep_embedding

__all__ = ["PRESETS", "UNet", "UNetConfig", "timestep_embedding"]
