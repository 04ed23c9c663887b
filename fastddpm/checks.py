"""Checks of scalar arguments, shared by every public entry point (the ops, sampling, training), so
a bad argument is reported the same way everywhere (docs/errors.md):

- ``TypeError``: not of an accepted Python type (a str or a bool where a number is expected);
- ``ValueError``: the right type with a wrong value (out of range, not finite).

Each message starts with the argument's name, then says what was expected and what was got.
Tensor checks live with the ops (:mod:`fastddpm.ops.checks`).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence


def type_name(v) -> str:
    """The name of ``v``'s type, module-qualified unless it is a builtin ("numpy.ndarray", "list")."""
    cls = type(v)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def real(name: str, v) -> float:
    """``v`` as a float; it must be a real number (an int or a float, not a bool)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type_name(v)}")
    return float(v)


def finite_float(name: str, v) -> float:
    """``v`` as a finite float (a real number, not NaN or infinite)."""
    f = real(name, v)
    if not math.isfinite(f):
        raise ValueError(f"{name}: expected a finite number, got {v!r}")
    return f


def positive_float(name: str, v, finite: bool = True) -> float:
    """``v`` as a float > 0 (and finite if ``finite``; never NaN)."""
    f = real(name, v)
    if not (f > 0 and (math.isfinite(f) or not finite)):
        raise ValueError(f"{name}: expected a {'finite ' if finite else ''}float > 0, got {v!r}")
    return f


def integer(name: str, v, low: int = 0, high: Optional[int] = None) -> int:
    """``v``, an int (not a bool) in ``[low, high)`` (``high`` None: unbounded)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type_name(v)}")
    if v < low or (high is not None and v >= high):
        bound = f"an int >= {low}" if high is None else f"an int in [{low}, {high})"
        raise ValueError(f"{name}: expected {bound}, got {v!r}")
    return int(v)


def choice(name: str, v, choices: Sequence) -> None:
    """``v`` is one of ``choices`` (compared by equality; a value of another type is just not one)."""
    if not any(v is c or (type(v) is type(c) and v == c) for c in choices):
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {v!r}")
