"""diffusers interoperability without diffusers: pipeline and UNet2DModel folders, schedulers, export,
and ``accelerate(pipe)`` (docs/diffusers.md).

    scheduler.py    a DDPMScheduler / DDIMScheduler config -> fastddpm schedule, timesteps, step table
    folder.py       read a diffusers folder (pipeline or bare UNet2DModel) as a fastddpm DDPM
    export.py       write a DDPM as a folder DDPMPipeline.from_pretrained loads
    accelerate.py   FastPipeline: a pipeline's call on the fast sampler; accelerate(pipe)
"""

from .accelerate import FastPipeline, accelerate
from .export import export_diffusers
from .folder import DiffusersDDPM, is_diffusers_folder, load_folder, load_pipeline
from .scheduler import SchedulerSettings, full_schedule, inference_timesteps, scheduler_settings, step_plan

__all__ = ["DiffusersDDPM", "FastPipeline", "SchedulerSettings", "accelerate", "export_diffusers", "full_schedule",
           "inference_timesteps", "is_diffusers_folder", "load_folder", "load_pipeline", "scheduler_settings",
           "step_plan"]
