"""The argument checks of the public ops (:mod:`fastddpm.ops`), one function per kind of check, so
every op and every backend reports a bad argument the same way.

Only two exception classes come out of them, as the ops document:

- ``TypeError``: the argument is not of an accepted Python type (a numpy array where a tensor is
  expected, a bool or a float where an int is);
- ``ValueError``: the right type with a wrong value (dtype, shape, device, layout, range).

Each message starts with the argument's name, then says what was expected and what was got. The
C++ checks of csrc/include/fastddpm/checks.h raise the same classes (``TORCH_CHECK_VALUE``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..checks import choice, integer, positive_float, real, type_name  # noqa: F401  (the ops use them as checks.*)

# The dtypes every backend computes in (float8 types are floating point too, but no kernel takes them).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_NAMES = "float16, bfloat16, float32 or float64"


def tensor(name: str, v) -> torch.Tensor:
    """``v`` itself, which must be a torch.Tensor."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type_name(v)}")
    return v


def optional_tensor(name: str, v) -> Optional[torch.Tensor]:
    """``v`` itself, which must be None or a torch.Tensor."""
    return None if v is None else tensor(name, v)


def floating(name: str, v) -> torch.Tensor:
    """``v``, a tensor of one of the dtypes the kernels compute in (:data:`FLOAT_DTYPES`)."""
    if tensor(name, v).dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a {_FLOAT_NAMES} tensor, got {v.dtype}")
    return v


def on_device(name: str, v: torch.Tensor, device: torch.device) -> None:
    """``v`` lives on ``device`` (the device of the op's main input)."""
    if v.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} like x, got one on {v.device}")


def batch(name: str, x: torch.Tensor, min_dim: int = 1, nonempty_batch: bool = True) -> None:
    """``x`` is ``[B, ...]`` with at least ``min_dim`` dims and, if ``nonempty_batch``, ``B >= 1``
    (the elementwise kernels gather one timestep per sample and need one)."""
    if x.dim() < min_dim:
        raise ValueError(f"{name}: expected a [B, ...] tensor with at least {min_dim} dims, got "
                         f"{x.dim()} dims {tuple(x.shape)}")
    if nonempty_batch and x.shape[0] < 1:
        raise ValueError(f"{name}: expected a non-empty batch (B >= 1), got shape {tuple(x.shape)}")


def like(name: str, y, x: torch.Tensor, x_name: str = "x") -> Optional[torch.Tensor]:
    """``y`` is None or a tensor of ``x``'s shape, device and dtype."""
    if optional_tensor(name, y) is None:
        return None
    if y.shape != x.shape:
        raise ValueError(f"{name}: expected shape {tuple(x.shape)} like {x_name}, got {tuple(y.shape)}")
    on_device(name, y, x.device)
    if y.dtype != x.dtype:
        raise ValueError(f"{name}: expected dtype {x.dtype} like {x_name}, got {y.dtype}")
    return y


def writable(name: str, y: Optional[torch.Tensor]) -> None:
    """``y`` (None or an output tensor) has no two elements in one memory location: no expanded dims."""
    if y is not None and any(s == 0 and n > 1 for s, n in zip(y.stride(), y.shape)):
        raise ValueError(f"{name}: expected a tensor whose elements do not share memory, got strides "
                         f"{y.stride()} for shape {tuple(y.shape)}")


def device(name: str, v) -> torch.device:
    """``v`` (a torch.device, or a string such as ``"cpu"`` or ``"cuda:0"``) as a torch.device."""
    if not isinstance(v, (torch.device, str)):
        raise TypeError(f"{name}: expected a torch.device or a str, got {type_name(v)}")
    try:
        return torch.device(v)
    except RuntimeError:
        raise ValueError(f"{name}: expected a device such as 'cpu' or 'cuda:0', got {v!r}") from None


def table(name: str, v, cols: int, dev: torch.device) -> torch.Tensor:
    """``v``: a contiguous float32 ``[T, cols]`` schedule table, ``T >= 1``, on ``dev``."""
    tensor(name, v)
    if (v.dtype != torch.float32 or v.dim() != 2 or v.shape[0] < 1 or v.shape[1] != cols
            or not v.is_contiguous()):
        raise ValueError(f"{name}: expected a contiguous float32 [T, {cols}] table with T >= 1, got "
                         f"{'a non-contiguous ' if not v.is_contiguous() else ''}{v.dtype} {tuple(v.shape)}")
    on_device(name, v, dev)
    return v


def timesteps(t, x: torch.Tensor, tab: torch.Tensor, check_range: bool) -> torch.Tensor:
    """``t``: an int64 ``[B]`` tensor of timesteps on x's device; with ``check_range``, also that its
    values index ``tab``'s rows (read on the host: only asked for where that is free)."""
    tensor("t", t)
    if t.dtype != torch.int64 or t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t: expected an int64 tensor of shape [{x.shape[0]}], got {t.dtype} {tuple(t.shape)}")
    on_device("t", t, x.device)
    if check_range and t.numel() and not (0 <= int(t.min()) and int(t.max()) < tab.shape[0]):
        raise ValueError(f"t: expected timesteps in [0, {tab.shape[0]}), got {t.tolist()}")
    return t
