r"""The continuous-time evidence bound (ELBO) of a diffusion model, per sample, with its standard error.

For a linear SDE with kernel :math:`q(x_t|x) = N(m_t x, s_t^2 I)` the model is: the prior
:math:`\pi = N(0, \sigma_\pi^2 I)` at ``T``, the reverse SDE driven by the score :math:`s_\theta` down to
:math:`t_\epsilon`, and a decoder :math:`p(x|x_\epsilon)`. For data of ``D`` dimensions (VDM's decomposition;
Girsanov's theorem gives the same bound for the reverse SDE)

.. math::  -\log p_\theta(x) \le \underbrace{KL\big(q(x_T|x)\,\|\,\pi\big)}_{\text{prior}}
           + \underbrace{\tfrac12\int_{t_\epsilon}^T g^2\,E\|s_\theta(x_t,t) + \varepsilon/s_t\|^2\,dt}_{\text{diffusion}}
           + \underbrace{E_{q(x_\epsilon|x)}\big[-\log p(x|x_\epsilon)\big]}_{\text{reconstruction}},

with :math:`x_t = m_t x + s_t\varepsilon`. Since :math:`g^2/s^2 = d\gamma/dt` for :math:`\gamma = \log(s^2/m^2)` (the
negative log-SNR), the diffusion term is VDM's :math:`\tfrac12\int \gamma'(t)\,E\|\hat\varepsilon - \varepsilon\|^2 dt`.

* prior, exact: :math:`\tfrac12\big[(m_T^2\|x\|^2 + D s_T^2)/\sigma_\pi^2 - D - D\log(s_T^2/\sigma_\pi^2)\big]`;
* diffusion, Monte Carlo over ``num_t`` times per sample, drawn uniformly or by importance sampling
  :math:`q(t) \propto g^2/s^2` (uniform in log-SNR, :func:`~sdediff.training.sample_time`), which makes the
  integrand nearly constant in ``t`` and its estimate far less noisy; for continuous data a control variate
  removes most of the remaining noise at high SNR (:func:`diffusion_draws`);
* reconstruction, ``decoder="gaussian"`` (continuous data): :math:`p(x|x_\epsilon) = N(x_\epsilon/m_\epsilon,
  (s_\epsilon/m_\epsilon)^2 I)`, exactly :math:`\tfrac D2\log(2\pi e\,s_\epsilon^2/m_\epsilon^2)`;
  ``decoder="discrete"`` (``L``-level data, :math:`L = 2^b` for ``b``-bit data, as in VDM): each coordinate of
  :math:`x` is a bin centre :math:`c_k = x_{lo} + w(k + \tfrac12)/L` and
  :math:`p(k|x_\epsilon) \propto \exp\big(-(x_\epsilon/m_\epsilon - c_k)^2 / (2 s_\epsilon^2/m_\epsilon^2)\big)`
  over the ``L`` levels, estimated with ``num_t`` draws of :math:`x_\epsilon`. The bound is then on the discrete
  :math:`-\log P(k)` itself: bits/dim :math:`= \text{nats}/(D\ln 2)`, no dequantisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._utils import flat_dim, randn
from ._validate import check_choice, check_int
from .data.digits import bits_per_dim_levels
from .score import ScoreModel
from .sdes.linear import require_linear
from .training.losses import T_SAMPLINGS, check_t_eps, dsm_loss, sample_time

DECODERS = ("gaussian", "discrete")


@dataclass
class ELBOResult:
    r"""What :func:`elbo` returns; every field but ``num_dims`` is a ``(batch,)`` tensor.

    Attributes
    ----------
    nats : Tensor
        The bound on :math:`-\log p(x)`: ``prior + diffusion + reconstruction`` (Monte Carlo estimate,
        unbiased for the bound).
    bits_per_dim : Tensor
        ``nats`` in bits/dim (see :func:`elbo`'s ``levels``).
    std_error : Tensor
        Standard error of ``nats`` from the ``num_t`` Monte Carlo draws (nats).
    prior, diffusion, reconstruction : Tensor
        The three terms (nats).
    num_dims : int
        ``D``, elements per sample.
    """

    nats: Tensor
    bits_per_dim: Tensor
    std_error: Tensor
    prior: Tensor
    diffusion: Tensor
    reconstruction: Tensor
    num_dims: int

    def mean(self) -> tuple[float, float]:
        """Batch mean of ``nats`` and its standard error (data spread and Monte Carlo noise together)."""
        n = len(self.nats)
        se = float(self.nats.std() / math.sqrt(n)) if n > 1 else float(self.std_error[0])
        return float(self.nats.mean()), se


def _kernel_at(sde, x: Tensor, t: float) -> tuple[Tensor, Tensor]:
    """``(m(t), s(t))`` as 0-d tensors in ``x``'s dtype and device (differentiable for a learned schedule)."""
    tt = torch.tensor([t], dtype=x.dtype, device=x.device)
    return sde.mean_coeff(tt)[0], sde.marginal_std(tt)[0]


def prior_kl(sde, x: Tensor) -> Tensor:
    r""":math:`KL(N(m_T x, s_T^2 I)\,\|\,N(0, \sigma_\pi^2 I))` per sample:
    :math:`\tfrac12[(m_T^2\|x\|^2 + D s_T^2)/\sigma_\pi^2 - D - D\log(s_T^2/\sigma_\pi^2)]`."""
    d = flat_dim(x)
    m_T, s_T = _kernel_at(require_linear(sde, "the prior term"), x, sde.T)
    var_pi = float(sde.prior_std) ** 2
    sq = x.reshape(x.shape[0], -1).pow(2).sum(1)
    return 0.5 * ((m_T**2 * sq + d * s_T**2) / var_pi - d - d * torch.log(s_T**2 / var_pi))


def gaussian_reconstruction(sde, x: Tensor, t_eps: float) -> Tensor:
    r"""The Gaussian decoder's term, exact, as a ``(batch,)`` tensor:
    :math:`E[-\log N(x;\ x_\epsilon/m_\epsilon,\ (s_\epsilon/m_\epsilon)^2 I)]
    = \tfrac D2\log(2\pi e\,s_\epsilon^2/m_\epsilon^2)`."""
    m_eps, s_eps = _kernel_at(sde, x, t_eps)
    return (0.5 * flat_dim(x) * (math.log(2 * math.pi * math.e) + torch.log(s_eps**2 / m_eps**2))).expand(x.shape[0])


def _discrete_nll(sde, centres: Tensor, levels: int, data_range: tuple[float, float], t_eps: float, num_t: int,
                  generator: torch.Generator | None) -> Tensor:
    r"""``(batch, num_t)`` draws of :math:`-\log p(k|x_\epsilon)` for the discrete decoder (module notes)."""
    m_eps, s_eps = _kernel_at(sde, centres, t_eps)
    lo, hi = data_range
    grid = lo + (hi - lo) * (torch.arange(levels, dtype=centres.dtype, device=centres.device) + 0.5) / levels
    flat = centres.reshape(centres.shape[0], 1, -1)
    noise = randn((centres.shape[0], num_t, flat.shape[-1]), generator=generator, device=centres.device,
                  dtype=centres.dtype)
    x_hat = flat + (s_eps / m_eps) * noise  # x_eps / m_eps
    logits = -0.5 * (x_hat[..., None] - grid).pow(2) / (s_eps / m_eps) ** 2  # (batch, num_t, D, L)
    own = -0.5 * (x_hat - flat).pow(2) / (s_eps / m_eps) ** 2
    return (torch.logsumexp(logits, -1) - own).sum(-1)


def diffusion_draws(sde, model: Callable[..., Tensor], x: Tensor, num_t: int, *, prediction: str | None = "score",
                    t_sampling: str = "importance", t_eps: float = 1e-5, generator: torch.Generator | None = None,
                    time_input: Callable[[Tensor], Tensor] | None = None, control_variate: bool = True,
                    cond: Tensor | None = None) -> Tensor:
    r"""``(batch, num_t)`` unbiased draws of the diffusion term, with an optional control variate.

    Each draw is :math:`\tfrac12 (T - t_\epsilon)\,w(t)\,\gamma'(t)\,\big[\|\hat\varepsilon - \varepsilon\|^2 -
    \beta(t)(\|\varepsilon\|^2 - D)\big]` with :math:`\gamma' = g^2/s^2`, :math:`\|\hat\varepsilon - \varepsilon\|^2
    = s^2\|s_\theta(x_t,t) + \varepsilon/s\|^2` and :math:`w` the importance weight of ``t``. The control variate
    :math:`\|\varepsilon\|^2 - D` has mean zero, so the draws stay unbiased for any :math:`\beta(t)`; with
    :math:`\beta = (m^2/(m^2 + s^2))^2` — the regression coefficient of :math:`\|\hat\varepsilon - \varepsilon\|^2` on
    :math:`\|\varepsilon\|^2` for data of unit variance and the exact score — it removes the :math:`\chi^2_D` noise of
    :math:`\|\varepsilon\|^2` that dominates at high signal-to-noise ratio (where :math:`\hat\varepsilon \approx 0`),
    and fades out at low SNR (where :math:`\hat\varepsilon \approx \varepsilon`). That holds for data with a density;
    for discrete data (point masses) :math:`\hat\varepsilon \to \varepsilon` at high SNR too, and
    ``control_variate=False`` (:math:`\beta = 0`) is the better choice. ``model``, ``prediction``, ``time_input``
    and ``cond`` (per sample of ``x``) as in :func:`~sdediff.training.dsm_loss` (differentiable).
    """
    rep = x.repeat_interleave(num_t, dim=0)
    rep_cond = None if cond is None else cond.repeat_interleave(num_t, dim=0)
    t, w = sample_time(sde, rep.shape[0], t_sampling=t_sampling, t_eps=t_eps, generator=generator, device=x.device,
                       dtype=x.dtype)
    noise = randn(rep.shape, generator=generator, device=x.device, dtype=x.dtype)
    loss = dsm_loss(sde, model, rep, prediction=prediction, weighting="likelihood", reduce_mean=False, reduction="none",
                    t=t, noise=noise, t_weight=w, time_input=time_input, cond=rep_cond)
    if control_variate:
        m2, s2 = sde.mean_coeff(t) ** 2, sde.marginal_std(t) ** 2
        beta = (m2 / (m2 + s2)) ** 2
        loss = loss - w * sde.diffusion(t) ** 2 / s2 * beta * (noise.reshape(len(rep), -1).pow(2).sum(1) - flat_dim(x))
    return 0.5 * (sde.T - t_eps) * loss.reshape(x.shape[0], num_t)


def elbo(sde, score_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, *, t_eps: float = 1e-5, num_t: int = 16,
         t_sampling: str = "importance", decoder: str = "gaussian", levels: int | None = None,
         data_range: tuple[float, float] = (-1.0, 1.0), generator: torch.Generator | None = None) -> ELBOResult:
    r"""Per-sample upper bound on :math:`-\log p(x)` (nats and bits/dim) with its Monte Carlo standard error.

    Computes prior + diffusion + reconstruction (module notes) for a score model. Run it under
    ``torch.no_grad()`` for evaluation; it is differentiable otherwise (the score network and a learned
    schedule get gradients).

    Parameters
    ----------
    sde : LinearSDE
        Forward SDE with a Gaussian kernel (its prior is ``N(0, prior_std^2 I)``), e.g. a
        :class:`~sdediff.LearnedScheduleSDE`.
    score_fn : callable
        ``score_fn(x_t, t)``, an approximation of :math:`\nabla\log p_t`; for a network predicting ε, x₀ or v
        wrap it in :class:`sdediff.score.ScoreModel`.
    x : Tensor
        ``(batch, ...)``: continuous data (``decoder="gaussian"``; e.g. dequantised), or the integer levels
        ``k`` in ``[0, levels - 1]`` (``decoder="discrete"``), any dtype.
    t_eps : float
        Where the reverse SDE hands over to the decoder, in ``(0, T)``.
    num_t : int
        Monte Carlo times (and, for the discrete decoder, draws of :math:`x_\epsilon`) per sample, ``>= 2``.
    t_sampling : {"importance", "uniform"}
        How the times are drawn (importance sampling: far smaller standard error).
    decoder : {"gaussian", "discrete"}
        The reconstruction model (module notes).
    levels : int, optional
        Number of levels ``L`` of quantised data (``2**b`` for ``b``-bit data). Needed by the discrete decoder;
        with the Gaussian decoder it turns nats of dequantised data (mapped to ``data_range``) into bits/dim,
        :math:`\text{nats}/(D\ln 2) + \log_2 L - \log_2 w` (:func:`sdediff.data.bits_per_dim_levels`); without it
        bits/dim is :math:`\text{nats}/(D\ln 2)`.
    data_range : (float, float)
        ``(x_lo, x_hi)``, the interval of width ``w`` the levels are mapped to.
    generator : torch.Generator, optional
        Draws the times and the noise.

    Returns
    -------
    ELBOResult
        ``nats``, ``bits_per_dim``, ``std_error``, ``prior``, ``diffusion``, ``reconstruction``, ``num_dims``.
    """
    require_linear(sde, "the evidence bound")
    t_eps = check_t_eps(t_eps, sde)
    check_choice("t_sampling", t_sampling, T_SAMPLINGS)
    check_choice("decoder", decoder, DECODERS)
    check_int("num_t", num_t, 2)  # the standard error needs two draws
    check_int("levels", levels, 2, optional=True)
    lo, hi = data_range
    if not hi > lo:
        raise ValueError(f"data_range must be (lo, hi) with hi > lo, got {data_range!r}")
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise TypeError("x must be a tensor of shape (batch, ...)")
    if decoder == "discrete":
        if levels is None:
            raise ValueError("decoder='discrete' needs levels= (2**b for b-bit data)")
        if x.is_floating_point() and not bool((x == x.round()).all()):
            raise ValueError("with decoder='discrete', x must hold the integer levels k")
        if bool(((x < 0) | (x > levels - 1)).any()):
            raise ValueError(f"with decoder='discrete', x must lie in [0, {levels - 1}] for levels={levels}")
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        x = lo + (hi - lo) * (x.to(dtype) + 0.5) / levels  # bin centres
    elif not x.is_floating_point():
        raise TypeError("with decoder='gaussian', x must be floating point (dequantise integer data first)")
    d = flat_dim(x)
    # a ScoreModel is unwrapped by dsm_loss: its network's own prediction is compared with the noise directly
    prediction = None if isinstance(score_fn, ScoreModel) else "score"
    draws = diffusion_draws(sde, score_fn, x, num_t, prediction=prediction, t_sampling=t_sampling, t_eps=t_eps,
                            generator=generator, control_variate=decoder == "gaussian")
    diffusion = draws.mean(1)
    if decoder == "gaussian":
        recon = gaussian_reconstruction(sde, x, t_eps)
    else:
        recon_draws = _discrete_nll(sde, x, levels, data_range, t_eps, num_t, generator)
        recon = recon_draws.mean(1)
        draws = draws + recon_draws
    prior = prior_kl(sde, x)
    nats = prior + diffusion + recon
    std_error = draws.std(1) / math.sqrt(num_t)
    if decoder == "discrete" or levels is None:
        bpd = nats / (d * math.log(2))
    else:
        bpd = bits_per_dim_levels(-nats, d, levels, hi - lo)
    return ELBOResult(nats=nats, bits_per_dim=bpd, std_error=std_error, prior=prior, diffusion=diffusion,
                      reconstruction=recon, num_dims=d)


def nll_bound(sde, model: Callable[..., Tensor], x0: Tensor, *, prediction: str | None = None,
              t_eps: float = 1e-5, num_t: int = 16, generator: torch.Generator | None = None,
              cond: Tensor | None = None, time_input: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    r"""Upper bound on :math:`-\log p_\theta(x_0)` in nats, per sample: the Gaussian-decoder bound of :func:`elbo`
    for a network of any prediction (also exported as ``sdediff.training.nll_bound``).

    The same bound as ``elbo(..., decoder="gaussian").nats`` (module notes): prior KL + diffusion term + Gaussian
    reconstruction, which together equal Girsanov's form

    .. math::  E\big[-\log\pi(x_T)\big] + \tfrac12\int_{t_\epsilon}^T g^2\,E\|s_\theta(x_t,t) + \varepsilon/s\|^2\,dt
               - \tfrac D2\log\frac{m_\epsilon^2\,s_T^2}{s_\epsilon^2},

    with the diffusion term estimated by :func:`diffusion_draws` (``num_t`` importance-sampled times per sample, with
    the control variate). Unlike :func:`elbo` it takes the raw network with its ``prediction``, ``cond`` and
    ``time_input`` (as :func:`~sdediff.training.dsm_loss` does), allows ``num_t = 1`` and returns the bound only.
    With the exact score of data :math:`N(0, vI)` its mean is :math:`\tfrac D2[\log(2\pi\sigma_\epsilon^2/m_\epsilon^2)
    + \sigma_T^2/\sigma_\pi^2 + \log(\sigma_\pi^2/\sigma_T^2)]`, :math:`\sigma_t^2 = m^2v + s^2`.

    Parameters
    ----------
    sde : LinearSDE
        Forward SDE (its prior must be ``N(0, prior_std^2 I)``, as for every LinearSDE).
    model, prediction, cond, time_input
        As in :func:`~sdediff.training.dsm_loss` (a :class:`~sdediff.score.ScoreModel` is unwrapped).
    x0 : Tensor
        Data ``(batch, ...)``, floating point.
    t_eps : float
        Where the reverse SDE stops and the decoder takes over, in ``(0, T)``.
    num_t : int
        Monte Carlo times per sample, ``>= 1``.
    generator : torch.Generator, optional
        Draws times and noise.

    Returns
    -------
    Tensor
        ``(batch,)`` bounds in nats (Monte Carlo estimates: unbiased for the bound itself).
    """
    require_linear(sde, "the evidence bound")
    t_eps = check_t_eps(t_eps, sde)
    check_int("num_t", num_t, 1)
    if not isinstance(x0, Tensor) or not x0.is_floating_point() or x0.dim() < 1:
        raise TypeError("x0 must be a floating-point tensor of shape (batch, ...)")
    diffusion = diffusion_draws(sde, model, x0, num_t, prediction=prediction, t_eps=t_eps, generator=generator,
                                time_input=time_input, cond=cond).mean(1)
    return prior_kl(sde, x0) + diffusion + gaussian_reconstruction(sde, x0, t_eps)
