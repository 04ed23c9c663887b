"""Shared fixtures: a tiny U-Net with non-trivial outputs and a short schedule."""

import os

import torch

# Without a GPU, the Triton kernels are tested on CPU tensors through Triton's interpreter. The
# variable must be set before the first kernel is defined (when fastddpm.ops is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastddpm import Schedule, UNet  # noqa: E402
try:  # benchmarks/models.py, installed as fastddpm.bench.models (tests import it from here)
    from fastddpm.bench.models import randomize_zero_init  # noqa: E402,F401
except ImportError:  # a checkout used in place (benchmarks/gpu_check.sh: build_ext --inplace, PYTHONPATH)
    from benchmarks.models import randomize_zero_init  # noqa: E402,F401


@pytest.fixture
def tiny_unet():
    torch.manual_seed(0)
    return randomize_zero_init(UNet.from_preset("digits")).eval()


@pytest.fixture
def short_schedule():
    return Schedule.linear(T=20, beta_start=1e-3, beta_end=0.2)
