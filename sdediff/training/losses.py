r"""Denoising score matching (DSM) for linear SDEs, with the ε ("simple") and likelihood weightings.

For a linear SDE with kernel :math:`x_t = m(t)\,x_0 + s(t)\,\varepsilon` the conditional score is
:math:`\nabla\log p_{0t}(x_t|x_0) = -\varepsilon/s`, and the DSM objective (Vincent, 2011; Song et al., 2021,
§3.3) is

.. math::  L(\theta) = E_t\,E_{x_0}\,E_\varepsilon\big[\lambda(t)\,\|s_\theta(x_t, t) + \varepsilon/s(t)\|^2\big].

Any prediction (score, ε, x₀, v, flow) is first turned into the network's implied noise
:math:`\hat\varepsilon = -s\,s_\theta` (:func:`sdediff.score.to_data_and_noise`), and since
:math:`\|s_\theta + \varepsilon/s\|^2 = \|\hat\varepsilon - \varepsilon\|^2 / s^2` the loss is computed in
ε-space as :math:`w(t)\,\|\hat\varepsilon - \varepsilon\|^2` with :math:`w = \lambda/s^2`:

* ``"simple"``: :math:`\lambda = s^2`, :math:`w = 1` — DDPM's ε-MSE;
* ``"likelihood"``: :math:`\lambda = g^2`, :math:`w = g^2/s^2` — makes the time integral an upper
  bound on the negative log-likelihood (see :func:`sdediff.elbo` and :func:`sdediff.training.nll_bound`).

Times are drawn uniformly on :math:`[t_\epsilon, T]` or by importance sampling with density
:math:`q(t) \propto g(t)^2/s(t)^2`. Because :math:`\frac{d}{dt}\log\frac{s^2}{m^2} = \frac{g^2}{s^2}`
(from :math:`d(s^2)/dt = 2as^2 + g^2`, :math:`m' = am`), the CDF of :math:`q` is the normalised
negative log-SNR, :math:`F(t) = (\gamma(t) - \gamma(t_\epsilon))/(\gamma(T) - \gamma(t_\epsilon))` with
:math:`\gamma = \log(s^2/m^2)`: importance sampling is sampling uniformly in log-SNR. It is tabulated once
per SDE and inverted by linear interpolation; each draw carries the weight
:math:`1/((T - t_\epsilon)\,\tilde q(t))` with :math:`\tilde q` the exact (piecewise-constant) density
of that interpolation, so the importance-sampled loss is an unbiased estimate of the uniform-t loss.
With the likelihood weighting the weighted loss is then nearly constant in ``t``, which removes most of
the variance that the :math:`1/t` blow-up of :math:`g^2/s^2` near 0 (VP) causes under uniform sampling.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from .._utils import batch_time, expand_as, randn
from .._validate import check_choice, check_float, check_int
from ..score import PREDICTIONS, ScoreModel, to_data_and_noise
from ..sdes.linear import require_linear

WEIGHTINGS = ("simple", "likelihood")
T_SAMPLINGS = ("uniform", "importance")
REDUCTIONS = ("mean", "sum", "none")

_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_GRID = 4096


def check_t_eps(t_eps: float, sde) -> float:
    """``t_eps`` as a float if it lies in the open interval ``(0, sde.T)`` (the smallest time of a loss or bound)."""
    return check_float("t_eps", t_eps, 0, sde.T, low_open=True, high_open=True)


def importance_table(sde, t_eps: float, device: torch.device | None = None) -> tuple[Tensor, Tensor, float]:
    r"""The importance distribution of the likelihood weighting, :math:`q(t) \propto g(t)^2/s(t)^2` on
    :math:`[t_\epsilon, T]`, tabulated once per ``(sde, t_eps, device)``.

    Returns
    -------
    (t_grid, F, Z) : a float64 grid of times, the CDF :math:`F` of :math:`q` on it, and the normaliser
    :math:`Z = \int g^2/s^2\,dt`.
    """
    per_sde = _TABLES.setdefault(sde, {})
    device = torch.device(device or "cpu")
    if (t_eps, device) in per_sde:
        return per_sde[(t_eps, device)]
    if t_eps not in per_sde:
        # geometric near t_eps (where g^2/s^2 ~ 1/t for VP) merged with uniform elsewhere
        grid = torch.cat([torch.logspace(math.log10(t_eps), math.log10(sde.T), _GRID, dtype=torch.float64),
                          torch.linspace(t_eps, sde.T, _GRID, dtype=torch.float64)])
        grid = torch.unique(grid.clamp(t_eps, sde.T))
        # drop points a rounding error from their successor (10**log10(t_eps) may miss t_eps by an ulp), keep T
        grid = grid[torch.cat([grid.diff() > 1e-12 * grid[1:], torch.tensor([True])])]
        with torch.no_grad():  # a learned schedule: the table is a fixed proposal, no graph to its parameters
            gamma = 2 * (sde.marginal_std(grid).log() - sde.mean_coeff(grid).log())  # log(s^2 / m^2) = -log SNR
        dgamma = gamma.diff()
        if not bool(torch.isfinite(gamma).all()) or not bool((dgamma > 0).all()):
            raise ValueError(f"importance sampling needs a log-SNR that decreases strictly on [t_eps, T] for "
                             f"{sde!r}; check its diffusion (g > 0) or use t_sampling='uniform'")
        z = float(gamma[-1] - gamma[0])
        per_sde[t_eps] = (grid, (gamma - gamma[0]) / z, z)
    grid, cdf, z = per_sde[t_eps]
    per_sde[(t_eps, device)] = (grid.to(device), cdf.to(device), z)
    return per_sde[(t_eps, device)]


def sample_time(sde, n: int, *, t_sampling: str = "uniform", t_eps: float = 1e-5,
                generator: torch.Generator | None = None, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    r"""Draw ``n`` training times and their importance weights relative to :math:`U(t_\epsilon, T)`.

    Parameters
    ----------
    sde : LinearSDE
        The forward SDE.
    n : int
        Number of times.
    t_sampling : {"uniform", "importance"}
        ``"uniform"``: :math:`t \sim U(t_\epsilon, T)`, weight 1. ``"importance"``:
        :math:`t \sim \tilde q \approx g^2/s^2 / Z` (uniform in log-SNR, see the module notes), weight
        :math:`1/((T - t_\epsilon)\tilde q(t))`, so :math:`E_{\tilde q}[w\,\ell(t)] = E_{U}[\ell(t)]` for any
        :math:`\ell`.
    t_eps : float
        Smallest time, in ``(0, T)``.
    generator : torch.Generator, optional
        Source of the draws (made on its device).
    device, dtype : optional
        Of the returned tensors (default: the generator's device, the default dtype).

    Returns
    -------
    (t, weight) : two ``(n,)`` tensors.
    """
    require_linear(sde, "the denoising loss")
    check_choice("t_sampling", t_sampling, T_SAMPLINGS)
    t_eps = check_t_eps(t_eps, sde)
    check_int("n", n, 1)
    dtype = dtype or torch.get_default_dtype()
    draw_device = generator.device if generator is not None else torch.device(device or "cpu")
    u = torch.rand(n, generator=generator, device=draw_device, dtype=torch.float64)
    if t_sampling == "uniform":
        t = t_eps + (sde.T - t_eps) * u
        weight = torch.ones_like(u)
    else:
        grid, cdf, _ = importance_table(sde, t_eps, draw_device)
        i = (torch.searchsorted(cdf, u, right=True) - 1).clamp(0, len(grid) - 2)
        dF, dt = cdf[i + 1] - cdf[i], grid[i + 1] - grid[i]
        t = grid[i] + (u - cdf[i]) / dF * dt
        weight = dt / (dF * (sde.T - t_eps))  # 1 / ((T - t_eps) q~(t)),  q~ = dF / dt on the cell
    out = {"device": device if device is not None else draw_device, "dtype": dtype}
    return t.to(**out), weight.to(**out)


def _resolve_model(model, prediction: str | None, time_input):
    if isinstance(model, ScoreModel):
        if prediction is not None and prediction != model.prediction:
            raise ValueError(f"prediction={prediction!r} contradicts the ScoreModel's prediction {model.prediction!r}")
        return model.net, model.prediction, model.time_input if time_input is None else time_input
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t) (an nn.Module), got {type(model).__name__}")
    prediction = "eps" if prediction is None else prediction
    check_choice("prediction", prediction, PREDICTIONS)
    return model, prediction, time_input


def dsm_loss(sde, model: Callable[..., Tensor], x0: Tensor, *, prediction: str | None = None,
             weighting: str = "simple", t_sampling: str = "uniform", t_eps: float = 1e-5,
             generator: torch.Generator | None = None, reduce_mean: bool = True, reduction: str = "mean",
             cond: Tensor | None = None, time_input: Callable[[Tensor], Tensor] | None = None,
             t: Tensor | None = None, noise: Tensor | None = None, t_weight: Tensor | None = None) -> Tensor:
    r"""Denoising score-matching loss of a network on a batch of clean data ``x0`` of any shape.

    Per sample, with :math:`x_t = m\,x_0 + s\,\varepsilon` and the network's implied noise
    :math:`\hat\varepsilon = -s\,s_\theta(x_t, t)`,

    .. math::  \ell = w_{IS}(t)\,\lambda(t)\,\|s_\theta(x_t,t) + \varepsilon/s\|^2
                    = w_{IS}(t)\,\frac{\lambda(t)}{s^2}\,\|\hat\varepsilon - \varepsilon\|^2,

    :math:`\lambda = s^2` (``"simple"``: the ε-MSE) or :math:`g^2` (``"likelihood"``), and
    :math:`w_{IS}` the importance weight of ``t`` (1 for uniform ``t``). For Gaussian data
    :math:`N(0, vI)` in ``D`` dimensions and the exact score the minimum over the network at fixed ``t``
    is :math:`E\|s^* + \varepsilon/s\|^2 = D\,m^2 v / (s^2 (m^2 v + s^2))` (= :math:`D/s^2 - D/\sigma_t^2`).

    Parameters
    ----------
    sde : LinearSDE
        Forward SDE with a Gaussian kernel.
    model : callable or ScoreModel
        The network, ``model(x_t, t)`` (``model(x_t, t, cond)`` when ``cond`` is given) returning a
        prediction of kind ``prediction`` shaped like ``x0``. A :class:`sdediff.score.ScoreModel` is
        unwrapped (its ``net``, ``prediction`` and ``time_input`` are used).
    x0 : Tensor
        Clean data ``(batch, ...)``, floating point.
    prediction : {"eps", "score", "x0", "v", "flow"}, optional
        What the network predicts (default ``"eps"``, or the ScoreModel's).
    weighting : {"simple", "likelihood"}
        :math:`\lambda(t)` as above.
    t_sampling : {"uniform", "importance"}
        How ``t`` is drawn (see :func:`sample_time`); importance sampling is meant for the likelihood
        weighting, where it makes :math:`w_{IS}\lambda/s^2` constant.
    t_eps : float
        Smallest time.
    generator : torch.Generator, optional
        Draws ``t`` and ``ε``.
    reduce_mean : bool
        Reduce the squared error over the non-batch dimensions by the mean (default) instead of the sum
        (the sum is the likelihood-bound scale; the mean keeps the loss O(1) whatever the data size).
    reduction : {"mean", "sum", "none"}
        Over the batch: the mean (a scalar), the sum, or the ``(batch,)`` per-sample losses.
    cond : Tensor, optional
        Conditioning (e.g. class labels) passed as the network's third argument.
    time_input : callable, optional
        Maps ``t`` to what the network expects (as in :class:`~sdediff.score.ScoreModel`).
    t, noise, t_weight : Tensor, optional
        Times ``(batch,)``, noise like ``x0`` and importance weights ``(batch,)`` drawn elsewhere (e.g.
        one global batch shared across data-parallel ranks, or a fixed ``t`` to evaluate the per-time
        loss); drawn here when omitted (``t_weight`` defaults to 1 for a given ``t``).

    Returns
    -------
    Tensor
        A scalar, or ``(batch,)`` with ``reduction="none"``.
    """
    require_linear(sde, "the denoising loss")
    check_choice("weighting", weighting, WEIGHTINGS)
    check_choice("reduction", reduction, REDUCTIONS)
    net, prediction, time_input = _resolve_model(model, prediction, time_input)
    if not isinstance(x0, Tensor) or not x0.is_floating_point() or x0.dim() < 1:
        raise TypeError("x0 must be a floating-point tensor of shape (batch, ...)")
    batch = x0.shape[0]
    if t is None:
        if t_weight is not None:
            raise ValueError("t_weight needs t: pass both or neither")
        t, t_weight = sample_time(sde, batch, t_sampling=t_sampling, t_eps=t_eps, generator=generator,
                                  device=x0.device, dtype=x0.dtype)
    else:
        t = batch_time(t, x0)
    if noise is None:
        noise = randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise must be shaped like x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
    mean, std = sde.marginal(x0, t)
    s = expand_as(std, x0)
    xt = mean + s * noise
    t_in = t if time_input is None else time_input(t)
    pred = net(xt, t_in) if cond is None else net(xt, t_in, cond)
    if not isinstance(pred, Tensor) or pred.shape != x0.shape:
        got = tuple(pred.shape) if isinstance(pred, Tensor) else type(pred).__name__
        raise ValueError(f"model must return a tensor shaped like x0 {tuple(x0.shape)}, got {got}")
    pred = pred.to(x0.dtype)  # autocast outputs: the loss itself in full precision
    eps_hat = pred if prediction == "eps" else to_data_and_noise(pred, xt, t, sde, prediction)[1]
    sq = (eps_hat - noise).pow(2).reshape(batch, -1)
    err = sq.mean(1) if reduce_mean else sq.sum(1)
    if weighting == "likelihood":
        err = err * (sde.diffusion(t) / std) ** 2
    if t_weight is not None:
        err = err * t_weight.to(err)
    if reduction == "none":
        return err
    return err.mean() if reduction == "mean" else err.sum()

