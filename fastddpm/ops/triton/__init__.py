"""The Triton backend of :mod:`fastddpm.ops` (op namespace ``fastddpm_triton::``).

Each op is a ``torch.library.triton_op`` whose kernels are launched through ``wrap_triton``, so
``torch.compile`` traces into them. They run on CUDA tensors, and on CPU tensors only under
``TRITON_INTERPRET=1`` (the interpreter, for tests). Importing this module never fails: without
Triton ``AVAILABLE`` is False and ``ERROR`` says why.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

AVAILABLE = False
ERROR: Optional[str] = None

try:
    import triton  # noqa: F401

    from . import ddpm_step_op, group_norm_act_op, group_norm_backward_op, q_sample_op  # noqa: F401  (registers the ops)
    from ..autograd import register_autograd
    from ..compiled import CompiledOps

    register_autograd("fastddpm_triton")
    AVAILABLE = True
except Exception as e:  # noqa: BLE001 - no Triton (or a broken one) must not break the package
    ERROR = f"{type(e).__name__}: {e}"


def runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device``: CUDA, or CPU under ``TRITON_INTERPRET=1``."""
    if not AVAILABLE:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


WHERE = "CUDA tensors, or CPU tensors under TRITON_INTERPRET=1"

if AVAILABLE:
    # fastddpm.ops.dispatch.implementation checks runs_on before any of these is called.
    _ops = CompiledOps("fastddpm_triton")
    q_sample, ddpm_step, group_norm_act = _ops.q_sample, _ops.ddpm_step, _ops.group_norm_act
