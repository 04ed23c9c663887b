"""The Python entry points of a compiled backend: the csrc ``fastddpm::`` ops and the Triton
``fastddpm_triton::`` ops have the same schemas, so one class binds either namespace to the backend
interface :mod:`fastddpm.ops` dispatches to. The noise has been resolved by the caller: a tensor,
or a :class:`PhiloxState` whose stream the kernel draws in-kernel (then advanced)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .layout import dense_memory_format
from .philox import PhiloxState


class CompiledOps:
    """The backend functions of :mod:`fastddpm.ops` over the ops of one namespace."""

    def __init__(self, namespace: str):
        self.namespace = namespace

    @property
    def _ops(self):
        return getattr(torch.ops, self.namespace)

    def q_sample(self, x0, t, table, noise: Optional[torch.Tensor] = None, *, rng: Optional[PhiloxState] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``q_sample`` of this backend; see :func:`fastddpm.ops.q_sample`."""
        xt, drawn = self._ops.q_sample(x0, t, table, noise, rng.tensor if noise is None else None)
        if noise is None:
            rng.advance()
            return xt, drawn
        return xt, noise

    def ddpm_step(self, x, model_out, t, coeffs, noise: Optional[torch.Tensor] = None, clip: Optional[float] = None,
                  *, out: Optional[torch.Tensor] = None, rng: Optional[PhiloxState] = None) -> torch.Tensor:
        """``ddpm_step`` of this backend; see :func:`fastddpm.ops.ddpm_step`."""
        rng_state = rng.tensor if noise is None else None
        if out is not None and out.dtype == x.dtype and out.is_contiguous(memory_format=dense_memory_format(x)):
            self._ops.ddpm_step_out(x, model_out, t, coeffs, noise, rng_state, clip, out)
            result = out
        else:
            result = self._ops.ddpm_step(x, model_out, t, coeffs, noise, rng_state, clip)
            if out is not None:
                result = out.copy_(result)
        if noise is None:
            rng.advance()
        return result

    def group_norm_act(self, x, weight, bias, groups, eps=1e-6, temb=None, act="silu") -> torch.Tensor:
        """``group_norm_act`` of this backend; see :func:`fastddpm.ops.group_norm_act`."""
        return self._ops.group_norm_act(x, weight, bias, groups, float(eps), temb, act == "silu")[0]
