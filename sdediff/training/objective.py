r"""The objective the trainer minimises: its config's loss on one drawn batch.

For a batch :math:`(x_0, t, w, \varepsilon, y)` (data, times, importance weights of the times, noise, labels) and
:math:`D` elements per sample (:math:`D = 1` without ``reduce_mean``):

* ``"dsm"``: :func:`~sdediff.training.dsm_loss` at the batch's times and noise;
* ``"ssm"``: the batch mean of :math:`w\,\ell_{SSM}(x_t, t) / D` with :math:`x_t = m(t)\,x_0 + s(t)\,\varepsilon`
  (:func:`~sdediff.training.ssm.ssm_loss`; the noise only makes :math:`x_t`, the loss never sees it);
* ``"elbo"``: the batch mean of the evidence bound per sample divided by :math:`D`: prior KL + diffusion term
  :math:`\tfrac12 (T - t_\epsilon)\,w\,\frac{g^2}{s^2}\,\|\hat\varepsilon - \varepsilon\|^2` + Gaussian
  reconstruction (:mod:`sdediff.elbo`). While a learned schedule trains, the mean of
  :math:`(\text{diffusion}/D)^2` comes with it: the gradient of the estimate's variance in the schedule's shape
  (VDM).

This module sits above :mod:`~sdediff.training.losses`, :mod:`~sdediff.training.ssm` and :mod:`sdediff.elbo`,
which all build on the former, so it cannot live in :mod:`~sdediff.training.losses` itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .._utils import flat_dim
from ..elbo import gaussian_reconstruction, prior_kl
from .config import TrainConfig
from .losses import dsm_loss
from .ssm import ssm_loss

__all__ = ["TrainingBatch", "training_loss"]


class TrainingBatch(NamedTuple):
    """One rank's share of a drawn training batch."""

    x0: Tensor
    """Clean data ``(batch, ...)``."""
    t: Tensor
    """Times ``(batch,)``."""
    t_weight: Tensor
    """Importance weights of the times ``(batch,)`` (1 for uniform times)."""
    noise: Tensor
    """Noise :math:`\\varepsilon` shaped like ``x0``."""
    cond: Tensor | None
    """Class labels ``(batch,)`` given to the network, or ``None``."""


def training_loss(config: TrainConfig, sde, net: nn.Module, batch: TrainingBatch, *,
                  time_input: Callable[[Tensor], Tensor] | None = None, generator: torch.Generator | None = None,
                  trains_schedule: bool = False) -> tuple[Tensor, Tensor | None]:
    """The loss ``config.loss`` of ``net`` on ``batch`` (module notes), and the variance term of a learned schedule.

    Parameters
    ----------
    config : TrainConfig
        Gives ``loss``, ``prediction``, ``weighting``, ``reduce_mean`` and ``t_eps``.
    sde : LinearSDE
        The forward SDE (a learned schedule is differentiated through).
    net : nn.Module
        The network (or its DDP wrapper), called as ``net(x_t, t)`` or ``net(x_t, t, cond)``.
    batch : TrainingBatch
        Data, times, time weights, noise and labels.
    time_input : callable, optional
        Maps ``t`` to the network's time input.
    generator : torch.Generator, optional
        Draws the projections of sliced score matching (the other losses draw nothing).
    trains_schedule : bool
        Whether the schedule's parameters are being trained (then, with ``loss="elbo"`` and a schedule that has
        ``shape_parameters``, the variance term is returned too).

    Returns
    -------
    (loss, variance) : Tensor, Tensor or None
        The scalar loss and the scalar variance term (``None`` unless a learned schedule's shape trains).
    """
    x0, t, w, noise, cond = batch
    if config.loss == "dsm":
        return dsm_loss(sde, net, x0, prediction=config.prediction, weighting=config.weighting,
                        reduce_mean=config.reduce_mean, cond=cond, time_input=time_input, t=t, noise=noise,
                        t_weight=w), None
    scale = flat_dim(x0) if config.reduce_mean else 1
    if config.loss == "ssm":
        mean, std = sde.marginal(x0, t)
        xt = mean + std.reshape(-1, *[1] * (x0.dim() - 1)) * noise
        per = ssm_loss(net, xt, t, sde=sde, prediction=config.prediction, weighting=config.weighting,
                       generator=generator, reduction="none", time_input=time_input)
        return (w * per).mean() / scale, None
    diffusion = 0.5 * (sde.T - config.t_eps) * dsm_loss(
        sde, net, x0, prediction=config.prediction, weighting="likelihood", reduce_mean=False, reduction="none",
        cond=cond, time_input=time_input, t=t, noise=noise, t_weight=w)
    bound = prior_kl(sde, x0) + diffusion + gaussian_reconstruction(sde, x0, config.t_eps)
    shape = getattr(sde, "shape_parameters", None)
    return bound.mean() / scale, (diffusion / scale).pow(2).mean() if shape is not None and trains_schedule else None
