"""Fake (meta) kernels of the compiled ops, so torch.compile traces them without graph breaks: the
shapes, dtypes and layouts each op returns, written once for the csrc and Triton namespaces."""

from __future__ import annotations

import torch

from .layout import dense_empty_like, stat_dtype


def register_fakes(namespace: str) -> None:
    """Fake kernels for ``q_sample``, ``ddpm_step``, ``ddpm_step_out`` and ``group_norm_act`` of ``namespace``."""
    @torch.library.register_fake(f"{namespace}::q_sample")
    def _q_sample_fake(x0, t, table, noise, rng_state):
        return dense_empty_like(x0), (dense_empty_like(x0) if noise is None else x0.new_empty(0))

    @torch.library.register_fake(f"{namespace}::ddpm_step")
    def _ddpm_step_fake(x, model_out, t, coeffs, noise, rng_state, clip):
        return dense_empty_like(x)

    @torch.library.register_fake(f"{namespace}::ddpm_step_out")
    def _ddpm_step_out_fake(x, model_out, t, coeffs, noise, rng_state, clip, out):
        return None

    @torch.library.register_fake(f"{namespace}::group_norm_act")
    def _group_norm_act_fake(x, weight, bias, groups, eps, temb, silu):
        stats = x.new_empty((x.shape[0], groups), dtype=stat_dtype(x))
        return dense_empty_like(x), stats, stats.clone()

    if hasattr(getattr(torch.ops, namespace), "group_norm_act_backward"):
        @torch.library.register_fake(f"{namespace}::group_norm_act_backward")
        def _group_norm_act_backward_fake(grad, x, weight, bias, temb, mean, rstd, groups, silu):
            return (dense_empty_like(x),) + tuple(x.new_empty(0) if p is None else p.new_empty(p.shape)
                                                  for p in (weight, bias, temb))


def register_winograd_fake() -> None:
    """Fake kernel of ``fastddpm::winograd_conv3x3`` (CPU only; output of x's dtype, K = U.shape[2]
    channels, in channels_last)."""
    @torch.library.register_fake("fastddpm::winograd_conv3x3")
    def _winograd_fake(x, U, bias):
        N, _, H, W = x.shape
        return x.new_empty((N, U.shape[2], H, W)).contiguous(memory_format=torch.channels_last)
