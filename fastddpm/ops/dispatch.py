"""Which implementation an op call runs: the backend registry, ``"auto"``'s choice per device, and
the overrides (``FASTDDPM_OPS`` for the process, :func:`use_backend` for a block of code).

The override of a block lives in a context variable, so threads and asyncio tasks each see their
own; ``FASTDDPM_OPS`` is read when an op first asks, and a bad value is reported then (not at import).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator, Optional, Tuple

import torch

from . import checks, native, reference
from . import triton as _triton

BACKENDS = {"reference": reference}
if native.AVAILABLE:
    BACKENDS["native"] = native
if _triton.AVAILABLE:
    BACKENDS["triton"] = _triton

# On CUDA, "auto" takes the first present backend of the list for its context (docs/gpu.md): while a
# CUDA graph is being captured Triton, whose group norm is the faster kernel and whose launch cost
# the graph hides; called eagerly the native kernels, since Triton's launch path costs more than
# its kernels save there.
CUDA_PREFERENCE = {"graph": ("triton", "native"), "eager": ("native", "triton")}
# Which backends carry CUDA kernels: fixed once the modules are loaded, so looked up once here
# rather than on every op call.
_CUDA_KERNELS = {"native": native.cuda_available(), "triton": _triton.AVAILABLE}

_block_backend: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("fastddpm_ops_backend", default=None)


def available_backends() -> Tuple[str, ...]:
    """Names of the op backends usable in this process."""
    return tuple(BACKENDS)


def _check_name(name, what: str) -> str:
    """``name``, which must be "auto" or the name of an available backend."""
    if not isinstance(name, str):
        raise TypeError(f"{what}: expected a str ('auto' or one of {available_backends()}), "
                        f"got {checks.type_name(name)}")
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"{what}: expected 'auto' or one of {available_backends()}, got {name!r}")
    return name


def _env_backend() -> Optional[str]:
    """``FASTDDPM_OPS`` (reference | native | triton | auto), checked on every read: an invalid
    value fails the op call that reads it, with the accepted values."""
    value = os.environ.get("FASTDDPM_OPS") or None
    return None if value is None else _check_name(value, "FASTDDPM_OPS")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within the block, ``backend="auto"`` calls (e.g. inside the U-Net) use backend ``name``
    (``"auto"``: let auto decide again, whatever ``FASTDDPM_OPS`` says)."""
    token = _block_backend.set(_check_name(name, "backend"))
    try:
        yield
    finally:
        _block_backend.reset(token)


def forced_backend() -> Optional[str]:
    """The backend that a :func:`use_backend` block or ``FASTDDPM_OPS`` forces now (in that order);
    None when ``"auto"`` decides."""
    name = _block_backend.get()
    if name is None:
        name = _env_backend()
    return None if name in (None, "auto") else name


def auto_backend(device: torch.device, graph: Optional[bool] = None) -> str:
    """The backend ``backend="auto"`` resolves to on ``device`` now (a forced one first).
    ``graph``: for a CUDA graph capture or not (default: whether the current stream is capturing);
    code that warms kernels up before capturing asks with True."""
    forced = forced_backend()
    if forced:
        return forced
    if device.type == "cpu":
        return "native" if native.AVAILABLE else "reference"
    if device.type == "cuda":
        capturing = torch.cuda.is_current_stream_capturing() if graph is None else graph
        order = CUDA_PREFERENCE["graph" if capturing else "eager"]
        return next((name for name in order if _CUDA_KERNELS[name]), "reference")
    return "reference"


def implementation(backend: str, device: torch.device):
    """The backend module (or object) that runs an op for ``backend`` on ``device``: ValueError
    when the name is unknown or the backend has no kernels for ``device``."""
    if _check_name(backend, "backend") == "auto":
        backend = auto_backend(device)
    module = BACKENDS[backend]
    if not module.runs_on(device):
        raise ValueError(f"backend: {backend!r} has no kernels for {device} tensors here ({module.WHERE})")
    return module
