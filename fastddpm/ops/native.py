"""The compiled ops of csrc/ (``fastddpm._C``, op namespace ``fastddpm::``) as a backend.

Importing this module never fails: when the extension is missing or broken, ``AVAILABLE`` is
False, ``ERROR`` says why, and a warning is issued once (unless ``FASTDDPM_NATIVE=0``).
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

from .autograd import register_autograd
from .compiled import CompiledOps
from .fakes import register_fakes, register_winograd_fake

AVAILABLE = False
ERROR: Optional[str] = None

if os.environ.get("FASTDDPM_NATIVE", "1") == "0":
    ERROR = "disabled by FASTDDPM_NATIVE=0"
else:
    try:
        from .. import _C  # noqa: F401  (loading it registers the fastddpm:: ops)

        AVAILABLE = True
    except Exception as e:  # noqa: BLE001 - a broken build must not break the package
        ERROR = f"{type(e).__name__}: {e}"
        warnings.warn(f"fastddpm: native extension unavailable ({ERROR}); using the reference ops. "
                      f"Reinstall with a compiler present, or set FASTDDPM_NATIVE=0 to silence this.",
                      RuntimeWarning, stacklevel=2)

if AVAILABLE:
    register_fakes("fastddpm")
    register_autograd("fastddpm")
    if hasattr(torch.ops.fastddpm, "winograd_conv3x3"):
        register_winograd_fake()


def cuda_available() -> bool:
    """Whether the extension carries CUDA kernels."""
    return AVAILABLE and torch._C._dispatch_has_kernel_for_dispatch_key("fastddpm::ddpm_step", "CUDA")


WHERE = "CPU tensors, and CUDA tensors when built with its CUDA kernels (see `fastddpm info`)"


def runs_on(device: torch.device) -> bool:
    """Whether the compiled kernels take tensors on ``device`` (meta: their fake kernels)."""
    if device.type in ("cpu", "meta"):
        return AVAILABLE
    return device.type == "cuda" and cuda_available()


_ops = CompiledOps("fastddpm")
q_sample, ddpm_step, group_norm_act = _ops.q_sample, _ops.ddpm_step, _ops.group_norm_act
