"""Shared fixtures: a tiny U-Net with non-trivial outputs and a short schedule."""

import os

import torch

# Without a GPU, the Triton kernels are tested on CPU tensors through Triton's interpreter. The
# variable must be set before the first kernel is defined (when fastddpm.ops is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastddpm import Schedule, UNet  # noqa: E402


def randomize_zero_init(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-initialise every all-zero parameter (the zero-initialised output convs) with noise,
    so that a fresh model's output depends on its input and timestep."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture
def tiny_unet():
    torch.manual_seed(0)
    return randomize_zero_init(UNet.from_preset("digits")).eval()


@pytest.fixture
def short_schedule():
    return Schedule.linear(T=20, beta_start=1e-3, beta_end=0.2)
