"""The fused ops of DESIGN (docs/design.md section 3), behind one interface.

Each op has exactly one public function here, which validates its inputs once, so every backend
sees well-formed tensors. ``backend`` selects the implementation: ``"reference"`` (pure PyTorch,
always available), ``"native"`` (the compiled csrc kernels, when built), ``"triton"`` (CUDA
tensors, or CPU under ``TRITON_INTERPRET=1``) or ``"auto"`` (:func:`auto_backend`).

Noise is resolved here, once, into what the backends take: the given ``noise`` tensor; or
``torch.randn`` from ``generator`` (bit-compatible with the reference sampler's draws); or the
counter-based Philox stream of ``rng`` (a :class:`PhiloxState`), drawn inside the kernels. With
none of them, a Philox state is seeded from torch's global RNG for the call.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import native, reference, winograd
from .dispatch import (BACKENDS, CUDA_PREFERENCE, auto_backend, available_backends, forced_backend, implementation,
                       use_backend)
from .memory_pool import cpu_memory_pool
from .philox import PhiloxState, philox_normal
from .winograd import winograd_conv3x3

__all__ = ["BACKENDS", "CUDA_PREFERENCE", "PhiloxState", "auto_backend", "available_backends", "cpu_memory_pool",
           "ddpm_step", "forced_backend", "group_norm_act", "native_status", "philox_normal", "q_sample",
           "triton_status", "use_backend", "winograd_conv3x3"]

_CPU_HALF_TYPES = (torch.bfloat16, torch.float16)


def native_status() -> str:
    """One line on the native extension: what it carries, or why it is unavailable."""
    if not native.AVAILABLE:
        return f"unavailable ({native.ERROR})"
    isa = torch.ops.fastddpm.cpu_simd_isa()  # which hand-vectorized CPU path runs here
    return f"cpu ({isa}) + cuda kernels" if native.cuda_available() else f"cpu kernels ({isa})"


def triton_status() -> str:
    """One line on the Triton backend: where it runs, or why it is unavailable."""
    from . import triton as triton_backend

    if not triton_backend.AVAILABLE:
        return f"unavailable ({triton_backend.ERROR})"
    import triton

    where = "cuda" if torch.cuda.is_available() else "no GPU: cpu only under TRITON_INTERPRET=1"
    return f"triton {triton.__version__} ({where})"


def _resolve_noise(x: torch.Tensor, noise: Optional[torch.Tensor], generator: Optional[torch.Generator],
                   rng: Optional[PhiloxState]) -> Tuple[Optional[torch.Tensor], Optional[PhiloxState]]:
    """(noise tensor, None) or (None, Philox state to draw in-kernel from): the one place an op's
    noise source is decided."""
    given = [name for name, v in (("noise", noise), ("generator", generator), ("rng", rng)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"noise / generator / rng: give at most one noise source, got {' and '.join(given)}")
    if noise is not None:
        _check_like("noise", noise, x)
        return noise, None
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype), None
    if rng is not None:
        if not isinstance(rng, PhiloxState):
            raise TypeError(f"rng: expected a fastddpm.ops.PhiloxState, got {type(rng).__name__}")
        if rng.device != x.device:
            raise ValueError(f"rng: expected a PhiloxState on {x.device}, got one on {rng.device}")
        return None, rng
    return None, PhiloxState(device=x.device)


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
    noise, rng = _resolve_noise(x0, noise, generator, rng)
    return implementation(backend, x0.device).q_sample(x0, t, table, noise, rng=rng)


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
    _check_like("out", out, x)
    if clip is not None and not (isinstance(clip, (int, float)) and clip > 0):
        raise ValueError(f"clip: expected None or a positive float, got {clip!r}")
    noise, rng = _resolve_noise(x, noise, generator, rng)
    return implementation(backend, x.device).ddpm_step(x, model_out, t, coeffs, noise, clip, out=out, rng=rng)


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
        # Training: the native backward is a composite of PyTorch ops, slower than eager
        # group_norm's fused backward, so "auto" keeps the reference until a fused one exists.
        training = torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in (x, weight, bias, temb))
        # The native CPU kernel vectorizes float32 only: in bf16/fp16 the reference is faster.
        cpu_half = x.device.type == "cpu" and x.dtype in _CPU_HALF_TYPES
        if training or cpu_half:
            backend = "reference"
    return implementation(backend, x.device).group_norm_act(x, weight, bias, groups, eps, temb, act)
