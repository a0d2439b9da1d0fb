r"""Sliced score matching (SSM): the Fisher divergence to the data's score without knowing that score or any noise.

For samples :math:`x \sim p` and a model score :math:`s_\theta`, integration by parts turns the Fisher
divergence into an expectation over :math:`p` alone (Hyvärinen), and random projections
:math:`v` with :math:`E[vv^\top] = I` make the trace of the Jacobian one vector–Jacobian product (Song et al. 2019):

.. math::  \tfrac12 E_p\|s_\theta(x) - \nabla\log p(x)\|^2 = E_p E_v\big[v^\top \nabla_x(v^\top s_\theta(x))
           + \tfrac12 (v^\top s_\theta(x))^2\big] + \tfrac12 E_p\|\nabla\log p\|^2.

With ``variance_reduction`` (SSM-VR) the second term is replaced by its expectation over :math:`v`,
:math:`\tfrac12\|s_\theta(x)\|^2`. The minimiser is the score of whatever law produced ``x``: raw data for an
un-noised model ``model(x)``, or noised data :math:`x_t` (from any forward process, e.g. :func:`sdediff.simulate`,
whose noise need not be known) for a time-dependent ``model(x, t)``, weighted by :math:`\lambda(t)` as in
denoising score matching.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._utils import batch_time, randn, sum_except_batch
from .._validate import check_choice, check_int
from ..score import PREDICTIONS, to_score
from .losses import REDUCTIONS

SSM_WEIGHTINGS = ("none", "simple", "likelihood")
PROJECTIONS = ("rademacher", "gaussian")


def ssm_loss(model: Callable[..., Tensor], x: Tensor, t: Tensor | float | None = None, *, sde=None,
             prediction: str = "score", weighting: str = "none", num_projections: int = 1,
             projection: str = "rademacher", variance_reduction: bool = True, generator: torch.Generator | None = None,
             reduction: str = "mean", time_input: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    r"""Sliced score-matching loss of ``model`` on samples ``x`` (any shape ``(batch, ...)``).

    Per sample, averaged over ``num_projections`` draws of :math:`v`,

    .. math::  \ell = \lambda(t)\Big[v^\top \nabla_x\big(v^\top s_\theta(x, t)\big) + \tfrac12\|s_\theta(x,t)\|^2\Big]

    (:math:`\tfrac12 (v^\top s_\theta)^2` in place of :math:`\tfrac12\|s_\theta\|^2` without
    ``variance_reduction``). Its expectation is :math:`\lambda\,(\tfrac12 E\|s_\theta - \nabla\log p\|^2 -
    \tfrac12 E\|\nabla\log p\|^2)`: at the exact score it equals :math:`-\tfrac12\lambda E\|\nabla\log p\|^2`.

    Parameters
    ----------
    model : callable
        ``model(x)`` (un-noised, ``t=None``) or ``model(x, t)`` returning a prediction shaped like ``x``.
    x : Tensor
        Samples, floating point.
    t : Tensor or float, optional
        Times of noised samples (a scalar or ``(batch,)``).
    sde : LinearSDE, optional
        Needed to convert a non-score ``prediction`` and for the ``"simple"`` / ``"likelihood"`` weightings.
    prediction : {"score", "eps", "x0", "v", "flow"}
        What the model outputs (converted to a score with ``sde``'s kernel).
    weighting : {"none", "simple", "likelihood"}
        :math:`\lambda = 1`, :math:`s(t)^2` or :math:`g(t)^2`.
    num_projections : int
        Draws of :math:`v` per sample.
    projection : {"rademacher", "gaussian"}
        Distribution of :math:`v` (both have :math:`E[vv^\top] = I`).
    variance_reduction : bool
        SSM-VR (default) or plain SSM.
    generator : torch.Generator, optional
        Draws :math:`v`.
    reduction : {"mean", "sum", "none"}
        Over the batch.
    time_input : callable, optional
        Maps ``t`` to the network's time input.

    Returns
    -------
    Tensor
        A scalar, or ``(batch,)`` with ``reduction="none"``; differentiable in the model's parameters.
    """
    check_choice("weighting", weighting, SSM_WEIGHTINGS)
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("projection", projection, PROJECTIONS)
    check_choice("reduction", reduction, REDUCTIONS)
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError("x must be a floating-point tensor of shape (batch, ...)")
    check_int("num_projections", num_projections)
    needs_sde = prediction != "score" or weighting != "none"
    if needs_sde and (sde is None or t is None):
        raise ValueError(f"prediction={prediction!r} with weighting={weighting!r} needs sde= and t=")
    if t is not None:
        t = batch_time(t, x)
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        if t is None:
            out = model(x)
        else:
            out = model(x, t if time_input is None else time_input(t))
        if not isinstance(out, Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"model must return a tensor shaped like x {tuple(x.shape)}, got {got}")
        score = out if prediction == "score" else to_score(out, x, t, sde, prediction)
        loss = x.new_zeros(x.shape[0])
        for _ in range(num_projections):
            v = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            if projection == "rademacher":
                v = v.sign()
            vs = sum_except_batch(v * score)
            (jvp,) = torch.autograd.grad(vs.sum(), x, create_graph=True)
            loss = loss + sum_except_batch(v * jvp) + (0.5 * sum_except_batch(score**2) if variance_reduction
                                                       else 0.5 * vs**2)
    loss = loss / num_projections
    if weighting != "none":
        lam = sde.marginal_std(t) ** 2 if weighting == "simple" else sde.diffusion(t) ** 2
        loss = loss * lam
    if reduction == "none":
        return loss
    return loss.mean() if reduction == "mean" else loss.sum()
