"""The fused ops of DESIGN (docs/design.md section 3), behind one interface.

Each op has exactly one public function here, which validates its inputs once, so every backend
sees well-formed tensors. ``backend`` selects the implementation: ``"reference"`` (pure PyTorch,
always available), ``"native"`` (the compiled csrc kernels, when built), ``"triton"`` (CUDA
tensors, or CPU under ``TRITON_INTERPRET=1``) or ``"auto"`` (:func:`auto_backend`).

Noise is resolved here, once, into what the backends take: the given ``noise`` tensor; or
``torch.randn`` from ``generator`` (bit-compatible with the reference sampler's draws); or the
counter-based Philox stream of ``rng`` (a :class:`PhiloxState`), drawn inside the kernels. With
none of them, a Philox state is seeded from torch's global RNG for the call.

Errors: a bad argument raises ``TypeError`` (not of an accepted Python type: a numpy array for a
tensor, a bool for an int) or ``ValueError`` (a wrong dtype, shape, device, layout or range),
whose message starts with the argument's name; the native kernels' own checks raise the same
classes. No other exception comes from an argument (:mod:`fastddpm.ops.checks`).

Timesteps: ``t`` is range-checked (``ValueError``) where reading it is free: CPU tensors, eager
mode, ``trusted_t=False``. Elsewhere (CUDA, where the read would be a host sync; a traced graph;
``trusted_t=True``) t is trusted, which means unchecked: an out-of-range value gives unspecified
values, never a crash or an out-of-bounds read, as every backend clamps t into ``[0, T)`` on the
device (the native CPU kernels still raise ``ValueError``, as reading t costs them nothing).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import checks, native, reference, winograd
from .dispatch import (BACKENDS, CUDA_PREFERENCE, auto_backend, available_backends, forced_backend, implementation,
                       use_backend)
from .memory_pool import cpu_memory_pool
from .philox import PhiloxState, philox_normal
from .winograd import winograd_conv3x3

__all__ = ["BACKENDS", "CUDA_PREFERENCE", "PhiloxState", "auto_backend", "available_backends", "cpu_memory_pool",
           "ddpm_step", "forced_backend", "group_norm_act", "native_status", "philox_normal", "q_sample",
           "triton_status", "use_backend", "winograd_conv3x3"]


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
                   rng: Optional[PhiloxState], x_name: str) -> Tuple[Optional[torch.Tensor], Optional[PhiloxState]]:
    """(noise tensor, None) or (None, Philox state to draw in-kernel from): the one place an op's
    noise source is decided."""
    given = [name for name, v in (("noise", noise), ("generator", generator), ("rng", rng)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"noise / generator / rng: give at most one noise source, got {' and '.join(given)}")
    if noise is not None:
        return checks.like("noise", noise, x, x_name), None
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator, got {checks.type_name(generator)}")
        if generator.device.type != x.device.type:
            raise ValueError(f"generator: expected a torch.Generator for {x.device.type} like {x_name}, "
                             f"got one for {generator.device.type}")
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype), None
    if rng is not None:
        if not isinstance(rng, PhiloxState):
            raise TypeError(f"rng: expected a fastddpm.ops.PhiloxState, got {checks.type_name(rng)}")
        if rng.device != x.device:
            raise ValueError(f"rng: expected a PhiloxState on {x.device} like {x_name}, got one on {rng.device}")
        return None, rng
    return None, PhiloxState(device=x.device)


def _check_step_inputs(x, x_name: str, t, table, table_name: str, cols: int, trusted_t: bool) -> None:
    """The inputs q_sample and ddpm_step share: a floating ``[B, ...]`` x with B >= 1, the table,
    and ``t`` (its range read only where that is free: on the CPU, eagerly, unless trusted)."""
    checks.floating(x_name, x)
    checks.batch(x_name, x)
    checks.table(table_name, table, cols, x.device)
    # On a GPU reading t would cost a host sync per call, and a traced graph cannot branch on it:
    # there t is not range-checked, and the backends clamp it instead (see the module docstring).
    check_range = not trusted_t and x.device.type == "cpu" and not torch.compiler.is_compiling()
    checks.timesteps(t, x, table, check_range)


def q_sample(x0: torch.Tensor, t: torch.Tensor, table: torch.Tensor,
             noise: Optional[torch.Tensor] = None, *, generator: Optional[torch.Generator] = None,
             rng: Optional[PhiloxState] = None, backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Noise ``x0`` to timestep ``t``: returns ``(x_t, noise)``.

    ``x0`` is a float16/bfloat16/float32/float64 ``[B, ...]`` tensor with ``B >= 1``; ``t`` an int64
    ``[B]`` tensor on its device; ``table`` is ``schedule.table("noising", device)`` (float32
    ``[T, 2]``, contiguous); ``noise`` (like ``x0``) is drawn when None. Raises TypeError / ValueError
    for bad arguments (module docstring), nothing else.
    """
    _check_step_inputs(x0, "x0", t, table, "table", 2, trusted_t=False)
    noise, rng = _resolve_noise(x0, noise, generator, rng, "x0")
    return implementation(backend, x0.device).q_sample(x0, t, table, noise, rng=rng)


def ddpm_step(x: torch.Tensor, model_out: torch.Tensor, t: torch.Tensor, coeffs: torch.Tensor,
              noise: Optional[torch.Tensor] = None, clip: Optional[float] = None, *,
              generator: Optional[torch.Generator] = None, out: Optional[torch.Tensor] = None,
              rng: Optional[PhiloxState] = None, backend: str = "auto", trusted_t: bool = False) -> torch.Tensor:
    """One reverse step of any sampler (DESIGN.md section 2) with coefficient table ``coeffs``.

    ``x`` is a float16/bfloat16/float32/float64 ``[B, ...]`` tensor with ``B >= 1``; ``model_out``,
    ``noise`` and ``out`` are like it (``out`` may be ``x`` itself, not an expanded view); ``t`` an
    int64 ``[B]`` tensor on its device; ``coeffs`` is ``schedule.table("step", device, ...)``
    (float32 ``[T, 6]``, contiguous); ``clip`` (a float > 0, or None) bounds x0 to ``[-clip, clip]``.
    ``trusted_t``: skip reading ``t`` to check its range (for loops that built ``t`` themselves:
    the check reads the tensor on the host); an out-of-range ``t`` then gives unspecified values
    (module docstring). Raises TypeError / ValueError for bad arguments, nothing else.
    """
    _check_step_inputs(x, "x", t, coeffs, "coeffs", 6, trusted_t)
    checks.like("model_out", checks.tensor("model_out", model_out), x)
    checks.like("out", out, x)
    checks.writable("out", out)
    if clip is not None:
        # inf is a valid bound (no clipping), as the samplers accept it; NaN is not
        clip = checks.positive_float("clip", clip, finite=False)
    noise, rng = _resolve_noise(x, noise, generator, rng, "x")
    return implementation(backend, x.device).ddpm_step(x, model_out, t, coeffs, noise, clip, out=out, rng=rng)


def _check_channel_param(name: str, p, shape: Tuple[int, ...], x: torch.Tensor) -> None:
    """weight / bias / temb of group_norm_act: None, or a floating tensor of ``shape`` on x's device."""
    if checks.optional_tensor(name, p) is None:
        return
    checks.floating(name, p)
    if tuple(p.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(p.shape)}")
    checks.on_device(name, p, x.device)


def group_norm_act(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   groups: int, eps: float = 1e-6, temb: Optional[torch.Tensor] = None,
                   act: Optional[str] = "silu", *, backend: str = "auto") -> torch.Tensor:
    """``act(GroupNorm(x + temb[:, :, None, None]) * weight + bias)`` in one op.

    ``x`` is a float16/bfloat16/float32/float64 ``[B, C, ...]`` tensor (at least 3 dims; C and the
    spatial sizes >= 1, B may be 0); ``weight`` and ``bias`` are floating ``[C]`` tensors or None;
    ``groups`` an int dividing C, each group holding more than one value; ``eps`` a finite float
    > 0; ``temb`` a floating ``[B, C]`` tensor or None; ``act`` is ``"silu"`` or None. Raises
    TypeError / ValueError for bad arguments (module docstring), nothing else.
    """
    checks.floating("x", x)
    checks.batch("x", x, min_dim=3, nonempty_batch=False)
    if 0 in x.shape[1:]:
        raise ValueError(f"x: expected [B, C, ...] with C and the spatial sizes >= 1, got {tuple(x.shape)}")
    B, C = x.shape[:2]
    groups = checks.integer("groups", groups, low=1)
    if C % groups:
        raise ValueError(f"groups: expected a positive divisor of C={C}, got {groups!r}")
    per_group = x.shape[1:].numel() // groups
    if per_group < 2:
        raise ValueError(f"groups: each group must hold more than one value; {groups} groups of "
                         f"x {tuple(x.shape)} hold {per_group}")
    eps = checks.positive_float("eps", eps)
    _check_channel_param("temb", temb, (B, C), x)
    _check_channel_param("weight", weight, (C,), x)
    _check_channel_param("bias", bias, (C,), x)
    checks.choice("act", act, ("silu", None))
    if backend == "auto" and forced_backend() is None:
        # On the CPU the native op runs in every dtype (bf16/fp16 rows through its float rows: still
        # fewer passes than the reference's norm, add and SiLU), in training with its fused backward
        # kernel. On CUDA its backward is a composite of PyTorch ops, slower than eager group_norm's,
        # so training there keeps the reference.
        training = torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in (x, weight, bias, temb))
        if training and not (x.device.type == "cpu" and native.AVAILABLE):
            backend = "reference"
    return implementation(backend, x.device).group_norm_act(x, weight, bias, groups, eps, temb, act)
