"""Model architectures."""

from .diffusers_compat import (config_from_diffusers, convert_state_dict, diffusers_config, to_diffusers_state_dict,
                               unet_from_diffusers)
from .unet import PRESETS, UNet, UNetConfig, timestep_embedding

__all__ = ["PRESETS", "UNet", "UNetConfig", "config_from_diffusers", "convert_state_dict", "diffusers_config",
           "timestep_embedding", "to_diffusers_state_dict", "unet_from_diffusers"]
