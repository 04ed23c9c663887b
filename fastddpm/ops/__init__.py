"""The three fused ops of DESIGN.md section 3, behind one interface.

Each op has exactly one public function here. ``backend`` selects the implementation:
``"reference"`` (pure PyTorch, always available), ``"native"`` (the compiled csrc kernels, when
built), ``"triton"`` (Triton kernels: CUDA tensors, or CPU under ``TRITON_INTERPRET=1``) or
``"auto"`` (on CPU native, on CUDA the faster compiled backend present, else the reference).
Inputs are validated here, once, so every backend sees well-formed tensors.

Noise: pass ``noise``; or a ``generator`` (drawn with ``torch.randn``: bit-compatible with the
reference); or neither, and the native kernels draw counter-based Philox noise in-kernel from
``rng`` (a :class:`PhiloxState`, or a per-device default one).
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional, Tuple

import torch

from . import _native, reference
from . import triton as _triton
from .memory_pool import cpu_memory_pool
from .philox import PhiloxState, philox_normal

__all__ = ["BACKENDS", "CUDA_PREFERENCE", "PhiloxState", "auto_backend", "available_backends", "cpu_memory_pool",
           "ddpm_step", "forced_backend", "group_norm_act", "native_status", "philox_normal", "q_sample",
           "triton_status", "use_backend"]

BACKENDS = {"reference": reference}
if _native.AVAILABLE:
    BACKENDS["native"] = _native
if _triton.AVAILABLE:
    BACKENDS["triton"] = _triton

# On CUDA, "auto" takes the first present backend of the list for its context, measured on an H200
# (docs/gpu_run4): while a CUDA graph is being captured, Triton (as fast as the native kernels on
# the elementwise ops, 3x faster on group_norm_act); called eagerly, the native kernels (Triton's
# launch path costs tens of microseconds a call: the mnist U-Net forward took 11.7 ms with Triton
# ops, 5.3 ms with native ones, 5.8 ms with the reference ops).
CUDA_PREFERENCE = {"graph": ("triton", "native"), "eager": ("native", "triton")}
# Which backends carry CUDA kernels: fixed once the modules are loaded, so looked up once here
# rather than on every op call.
_CUDA_KERNELS = {"native": _native.cuda_available(), "triton": _triton.AVAILABLE}
_CPU_HALF_TYPES = (torch.bfloat16, torch.float16)


def available_backends() -> Tuple[str, ...]:
    """Names of the op backends usable in this process."""
    return tuple(BACKENDS)


def native_status() -> str:
    """One line on the native extension: what it carries, or why it is unavailable."""
    if not _native.AVAILABLE:
        return f"unavailable ({_native.ERROR})"
    isa = torch.ops.fastddpm.cpu_simd_isa()  # which hand-vectorized CPU path runs here
    return f"cpu ({isa}) + cuda kernels" if _native.cuda_available() else f"cpu kernels ({isa})"


def triton_status() -> str:
    """One line on the Triton backend: where it runs, or why it is unavailable."""
    if not _triton.AVAILABLE:
        return f"unavailable ({_triton.ERROR})"
    import triton

    where = "cuda" if torch.cuda.is_available() else "no GPU: cpu only under TRITON_INTERPRET=1"
    return f"triton {triton.__version__} ({where})"


# FASTDDPM_OPS=reference|native|triton forces what "auto" means for the whole process.
_forced_backend: Optional[str] = os.environ.get("FASTDDPM_OPS") or None
if _forced_backend not in (None, "auto", *BACKENDS):
    raise ValueError(f"FASTDDPM_OPS: expected 'auto' or one of {tuple(BACKENDS)}, got {_forced_backend!r}")


@contextlib.contextmanager
def use_backend(name: str):
    """Within the block, ``backend="auto"`` calls (e.g. inside the U-Net) use backend ``name``."""
    global _forced_backend
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {available_backends()}, got {name!r}")
    previous, _forced_backend = _forced_backend, name
    try:
        yield
    finally:
        _forced_backend = previous


def forced_backend() -> Optional[str]:
    """The backend that ``FASTDDPM_OPS`` or a :func:`use_backend` block forces now; None when
    ``"auto"`` decides."""
    return None if _forced_backend in (None, "auto") else _forced_backend


def auto_backend(device: torch.device, graph: Optional[bool] = None) -> str:
    """The backend ``backend="auto"`` resolves to on ``device`` now (``FASTDDPM_OPS`` or a
    :func:`use_backend` block first). ``graph``: for a CUDA graph capture or not (default: whether
    the current stream is capturing); code that warms kernels up before capturing asks with True."""
    forced = forced_backend()
    if forced:
        return forced
    if device.type == "cpu":
        return "native" if _native.AVAILABLE else "reference"
    if device.type == "cuda":
        capturing = torch.cuda.is_current_stream_capturing() if graph is None else graph
        order = CUDA_PREFERENCE["graph" if capturing else "eager"]
        return next((name for name in order if _CUDA_KERNELS[name]), "reference")
    return "reference"


def _impl(backend: str, device: torch.device):
    if backend == "auto":
        backend = auto_backend(device)
    try:
        return BACKENDS[backend]
    except KeyError:
        raise ValueError(f"backend: expected 'auto' or one of {available_backends()}, "
                         f"got {backend!r}") from None


def _check_t(t: torch.Tensor, x: torch.Tensor, table: torch.Tensor, table_name: str, cols: int,
             check_range: bool = True):
    if not torch.is_tensor(t) or t.dtype != torch.int64 or t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t: expected an int64 tensor of shape [{x.shape[0]}], got "
                         f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
    if t.device != x.device:
        raise ValueError(f"t: expected device {x.device}, got {t.device}")
    if table.dim() != 2 or table.shape[1] != cols or table.dtype != torch.float32:
        raise ValueError(f"{table_name}: expected a float32 [T, {cols}] table, got "
                         f"{table.dtype} {tuple(table.shape)}")
    if table.device != x.device:
        raise ValueError(f"{table_name}: expected device {x.device}, got {table.device}")
    if (check_range and t.device.type == "cpu" and t.numel() and not torch.compiler.is_compiling()
            and not (0 <= int(t.min()) and int(t.max()) < table.shape[0])):
        # Only where reading t is free: on a GPU it would cost a host sync per call, and a traced
        # graph cannot branch on it. There t is trusted (the sampler makes its own).
        raise ValueError(f"t: expected timesteps in [0, {table.shape[0]}), got {t.tolist()}")


def _check_like(name: str, y: Optional[torch.Tensor], x: torch.Tensor):
    if y is None:
        return
    if y.shape != x.shape or y.device != x.device:
        raise ValueError(f"{name}: expected shape {tuple(x.shape)} on {x.device}, got "
                         f"{tuple(y.shape)} on {y.device}")
    if y.dtype != x.dtype:
        raise ValueError(f"{name}: expected dtype {x.dtype} like x, got {y.dtype}")


def q_sample(x0: torch.Tensor, t: torch.Tensor, table: torch.Tensor,
             noise: Optional[torch.Tensor] = None, *, generator: Optional[torch.Generator] = None,
             rng: Optional[PhiloxState] = None, backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Noise ``x0`` to timestep ``t``: returns ``(x_t, noise)``.

    ``table`` is ``schedule.table("noising", device)``; ``noise`` is drawn when None.
    """
    _check_t(t, x0, table, "table", 2)
    _check_like("noise", noise, x0)
    return _impl(backend, x0.device).q_sample(x0, t, table, noise, generator=generator, rng=rng)


def ddpm_step(x: torch.Tensor, model_out: torch.Tensor, t: torch.Tensor, coeffs: torch.Tensor,
              noise: Optional[torch.Tensor] = None, clip: Optional[float] = None, *,
              generator: Optional[torch.Generator] = None, out: Optional[torch.Tensor] = None,
              rng: Optional[PhiloxState] = None, backend: str = "auto", trusted_t: bool = False) -> torch.Tensor:
    """One reverse step of any sampler (DESIGN.md section 2) with coefficient table ``coeffs``.

    ``coeffs`` is ``schedule.table("step", device, ...)``; ``clip`` bounds x0 to ``[-clip, clip]``.
    ``trusted_t``: skip reading ``t`` to check its range (for loops that built ``t`` themselves:
    the check reads the tensor on the host).
    """
    _check_t(t, x, coeffs, "coeffs", 6, check_range=not trusted_t)
    _check_like("model_out", model_out, x)
    _check_like("noise", noise, x)
    _check_like("out", out, x)
    if clip is not None and not (isinstance(clip, (int, float)) and clip > 0):
        raise ValueError(f"clip: expected None or a positive float, got {clip!r}")
    return _impl(backend, x.device).ddpm_step(x, model_out, t, coeffs, noise, clip,
                                              generator=generator, out=out, rng=rng)


def group_norm_act(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   groups: int, eps: float = 1e-6, temb: Optional[torch.Tensor] = None,
                   act: Optional[str] = "silu", *, backend: str = "auto") -> torch.Tensor:
    """``act(GroupNorm(x + temb[:, :, None, None]) * weight + bias)`` in one op.

    ``act`` is ``"silu"`` or None; ``temb`` is ``[B, C]`` or None.
    """
    if x.dim() < 3:
        raise ValueError(f"x: expected [B, C, ...] with at least 3 dims, got {tuple(x.shape)}")
    C = x.shape[1]
    if not isinstance(groups, int) or groups < 1 or C % groups:
        raise ValueError(f"groups: expected a positive divisor of C={C}, got {groups!r}")
    if x.numel() and x.numel() // (x.shape[0] * groups) < 2:
        raise ValueError(f"groups: each group must hold more than one value; {groups} groups of "
                         f"x {tuple(x.shape)} hold {x.numel() // (x.shape[0] * groups)}")
    if temb is not None and (tuple(temb.shape) != (x.shape[0], C) or temb.device != x.device):
        raise ValueError(f"temb: expected shape {(x.shape[0], C)} on {x.device}, got "
                         f"{tuple(temb.shape)} on {temb.device}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (tuple(p.shape) != (C,) or p.device != x.device):
            raise ValueError(f"{name}: expected shape ({C},) on {x.device}, got "
                             f"{tuple(p.shape)} on {p.device}")
    if act not in ("silu", None):
        raise ValueError(f"act: expected 'silu' or None, got {act!r}")
    if backend == "auto" and forced_backend() is None:
        # Training: the native backward is a composite of PyTorch ops and measured slower than
        # eager group_norm's fused backward, so "auto" keeps the reference until a fused one exists.
        training = torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in (x, weight, bias, temb))
        # The native CPU kernel vectorizes float32 only; in bf16 (16x64x32x32 channels_last) it
        # measured 4.7 ms against the reference's 1.0 ms.
        cpu_half = x.device.type == "cpu" and x.dtype in _CPU_HALF_TYPES
        if training or cpu_half:
            backend = "reference"
    return _impl(backend, x.device).group_norm_act(x, weight, bias, groups, eps, temb, act)
