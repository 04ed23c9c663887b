"""Partial diffusion and reverse: noise real images to x_t, then run the reverse process back."""

from __future__ import annotations

from typing import Tuple, Union

import torch

from .common import EditRun


@torch.no_grad()
def reconstruct(model_or_path, x0: torch.Tensor, t: int, *, return_xt: bool = False,
                **run_options) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Diffuse ``x0`` (images in [-1, 1]) to x_t with q(x_t | x_0), then run the reverse process
    from there back to x_0. Larger ``t`` (in [0, T]) = further from the input; t = 0 returns it.

    ``run_options`` are :func:`fastddpm.sample`'s (``steps`` = reverse steps from t, respaced;
    ``sampler``, ``variance``, ``clip``, ``eta``, ``seed``, ``generator``, ``noise_source``,
    ``device``, speed options, ``reuse``, ``progress``). The noise of x_t is the first draw of the
    run's noise source, then every step's, as a textbook loop draws them.
    Returns the reconstructions, and x_t too with ``return_xt``.

    Example::

        x0 = fastddpm.data.load_mnist_data()[0][:8]
        rec = fastddpm.reconstruct("mnist", x0, 250, steps=50, seed=0)
    """
    run = EditRun(model_or_path, **run_options)
    x0 = run.images("x0", x0)
    t = run.timestep(t)
    if t == 0:
        out, xt = x0.clone(), x0.clone()
    else:
        xt = run.diffuse(x0, t)
        out = run.reverse(xt, t)
    return (out, xt) if return_xt else out
