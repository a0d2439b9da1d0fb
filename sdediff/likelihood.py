r"""Exact likelihoods through the probability-flow ODE, and bits/dim for quantised data.

The probability flow :math:`dx/dt = v(x,t)` is a continuous normalising flow; along its paths the
instantaneous change of variables gives

.. math::  \log p_\epsilon(x_\epsilon) = \log p_T(x_T) + \int_\epsilon^T \nabla\cdot v(x_t, t)\,dt.

:func:`log_likelihood` integrates the augmented ODE :math:`[x, \int\nabla\cdot v]` from
:math:`\epsilon` to :math:`T` with an adaptive solver, with the divergence computed exactly or
estimated by Hutchinson's trick.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._utils import randn, sum_except_batch
from ._validate import check_choice, check_float, check_int
from .processes import ScoreFn
from .sampling import check_eps
from .sdes.base import SDE
from .solvers.ode import AdaptiveODE, odeint

TRACES = ("exact", "hutchinson")
NOISES = ("rademacher", "gaussian")


@dataclass
class LikelihoodResult:
    r"""What :func:`log_likelihood` returns.

    Attributes
    ----------
    log_prob : Tensor
        ``(batch,)`` :math:`\log p_\epsilon(x)` in nats: ``prior_log_prob + delta_log_prob``.
    latent : Tensor
        :math:`x_T`, where the probability flow carries ``x``; like ``x``.
    nfe : int
        Score evaluations used.
    prior_log_prob : Tensor
        ``(batch,)`` :math:`\log p_T(x_T)` under the SDE's prior; replace it by your own density of
        ``latent`` to correct a prior that is only approximately :math:`p_T`.
    delta_log_prob : Tensor
        ``(batch,)`` :math:`\int_\epsilon^T \nabla\cdot v(x_t,t)\,dt`.
    """

    log_prob: Tensor
    latent: Tensor
    nfe: int
    prior_log_prob: Tensor
    delta_log_prob: Tensor


def divergence_exact(fn: Any, x: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(v, ∇·v)`` for ``v = fn(x)``, the divergence exactly, by one backward pass per dimension.

    :math:`\nabla\cdot v = \sum_i \partial v_i / \partial x_i`; costs ``D`` vector–Jacobian products,
    so it suits small dimensions ``D``.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = fn(x)
        flat_v = v.reshape(v.shape[0], -1)
        div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        d = flat_v.shape[1]
        for i in range(d):
            (grad,) = torch.autograd.grad(flat_v[:, i].sum(), x, retain_graph=i < d - 1)
            div = div + grad.reshape(x.shape[0], -1)[:, i]
    return v.detach(), div


def divergence_hutchinson(fn: Any, x: Tensor, probe: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(v, z^T (∂v/∂x) z)``: Hutchinson's unbiased estimate of :math:`\nabla\cdot v` with probe ``z``.

    :math:`E_z[z^\top J z] = \operatorname{tr} J` for any probe with :math:`E[zz^\top] = I`
    (Rademacher or standard Gaussian); one vector–Jacobian product.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = fn(x)
        (vjp,) = torch.autograd.grad(v, x, grad_outputs=probe)
    return v.detach(), sum_except_batch(vjp * probe)


def log_likelihood(sde: SDE, score_fn: ScoreFn, x: Tensor, eps: float = 1e-5, rtol: float = 1e-5,
                   atol: float = 1e-5, trace: str = "exact", generator: torch.Generator | None = None, *,
                   noise: str = "rademacher", method: str = "dopri5", options: dict[str, Any] | None = None,
                   progress: bool = False) -> LikelihoodResult:
    r"""Log-density :math:`\log p_\epsilon(x)` (nats, per sample) through the probability-flow ODE.

    Integrates :math:`d[x, \ell]/dt = [v(x,t), \nabla\cdot v(x,t)]` from :math:`t=\epsilon` to
    :math:`T` and returns :math:`\log p_T(x_T) + \ell_T`.

    Parameters
    ----------
    sde : SDE
        The forward SDE; its prior gives :math:`\log p_T`.
    score_fn : callable
        ``score_fn(x, t)``; must be differentiable in ``x``.
    x : Tensor
        Points ``(batch, ...)`` to evaluate.
    eps : float
        Start time in ``(0, T)``; the result is the density of :math:`p_\epsilon`.
    rtol, atol : float
        Tolerances of the adaptive solver.
    trace : {"exact", "hutchinson"}
        Exact divergence (``D`` backward passes per evaluation; small ``D``) or Hutchinson's
        unbiased estimate (one backward pass; the probe is drawn once per solve).
    generator : torch.Generator, optional
        Draws the Hutchinson probe.
    noise : {"rademacher", "gaussian"}
        Hutchinson probe distribution (Rademacher has lower variance).
    method : str
        torchdiffeq method (default ``"dopri5"``).
    options : dict, optional
        Passed to ``torchdiffeq.odeint``.
    progress : bool
        Show a progress bar over ``t``.

    Returns
    -------
    LikelihoodResult
        ``log_prob``, ``latent``, ``nfe``, ``prior_log_prob``, ``delta_log_prob``.

    Notes
    -----
    For quantised data turn nats into bits/dim with :func:`bits_per_dim`.
    """
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdediff.SDE, got {type(sde).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError("x must be a floating-point tensor of shape (batch, ...)")
    eps = check_eps(eps, sde)
    check_choice("trace", trace, TRACES)
    check_choice("noise", noise, NOISES)
    AdaptiveODE(rtol=rtol, atol=atol, method=method)  # validates the tolerances and the method
    flow = sde.probability_flow(score_fn)  # v(x, t) = f(x, t) - g(t)^2 s(x, t) / 2; counts the score evaluations
    probe = None
    if trace == "hutchinson":
        probe = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if noise == "rademacher":
            probe = probe.sign()

    def augmented(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        def v(z: Tensor) -> Tensor:
            return flow.drift(z, t)

        if probe is None:
            return divergence_exact(v, state[0])
        return divergence_hutchinson(v, state[0], probe)

    ts = torch.tensor([eps, sde.T], dtype=x.dtype, device=x.device)
    state0 = (x.detach(), torch.zeros(x.shape[0], dtype=x.dtype, device=x.device))
    xs, ells = odeint(augmented, state0, ts, rtol=rtol, atol=atol, method=method, options=options, progress=progress,
                      what="log_likelihood")
    latent, delta = xs[-1], ells[-1]
    prior = sde.prior_log_prob(latent)
    return LikelihoodResult(log_prob=prior + delta, latent=latent, nfe=flow.nfe, prior_log_prob=prior,
                            delta_log_prob=delta)


def bits_per_dim(log_prob: Tensor, num_dims: int, bits: int = 8, data_width: float = 2.0) -> Tensor:
    r"""Bits per dimension of ``b``-bit data from a log-density of its dequantised, rescaled version.

    Integer data :math:`k \in \{0, \dots, 2^b-1\}^D` dequantised and mapped to an interval of width
    :math:`w` by :math:`x = x_{lo} + w(k+u)/2^b` (see :func:`dequantize`; :math:`w = 2` for
    :math:`[-1, 1]`) have, by the change of scale, density
    :math:`p(k+u) = p(x)\,(w/2^b)^D`, so

    .. math::  \text{bits/dim} = -\frac{\log p(x)}{D\ln 2} + b - \log_2 w,

    i.e. :math:`-\log p(x)/(D\ln 2) + b - 1` on :math:`[-1,1]`. With uniform dequantisation it upper
    bounds the discrete code length. Averaging bits/dim over several draws of ``u`` only reduces its
    variance; to tighten the bound, average the *densities* over the draws (log-mean-exp of
    ``log_prob``) before converting.

    Parameters
    ----------
    log_prob : Tensor
        Log-density of the model at ``x``, in nats (e.g. ``log_likelihood(...).log_prob``).
    num_dims : int
        ``D``, elements per sample.
    bits : int
        Bit depth ``b`` of the raw data (8 for images).
    data_width : float
        Width ``w`` of the interval the data were mapped to (2 for ``[-1, 1]``, 1 for ``[0, 1]``).
    """
    check_int("num_dims", num_dims)
    check_int("bits", bits)
    check_float("data_width", data_width, 0.0, low_open=True)
    return -log_prob / (num_dims * math.log(2)) + bits - math.log2(data_width)


def dequantize(k: Tensor, bits: int = 8, generator: torch.Generator | None = None,
               data_range: tuple[float, float] = (-1.0, 1.0), dtype: torch.dtype | None = None) -> Tensor:
    r"""Uniform dequantisation :math:`x = x_{lo} + (x_{hi} - x_{lo})(k + u)/2^b`, :math:`u \sim U(0,1)^D`.

    ``k`` holds integers in ``[0, 2^b - 1]``; the default range maps to :math:`[-1, 1]`, i.e.
    :math:`x = 2(k+u)/2^b - 1`. Pair with :func:`bits_per_dim` using ``data_width = x_hi - x_lo``.
    """
    lo, hi = data_range
    if not hi > lo:
        raise ValueError(f"data_range must be (lo, hi) with hi > lo, got {data_range!r}")
    check_int("bits", bits)
    if k.is_floating_point() and not bool((k == k.round()).all()):
        raise ValueError("k must hold integer values")
    if bool(((k < 0) | (k > 2**bits - 1)).any()):
        raise ValueError(f"k must lie in [0, {2**bits - 1}] for bits={bits}")
    dtype = dtype or (k.dtype if k.is_floating_point() else torch.get_default_dtype())
    u = torch.rand(k.shape, generator=generator, device=generator.device if generator is not None else k.device,
                   dtype=dtype)
    k = k.to(dtype)
    x = lo + (hi - lo) * (k + u.to(k.device)) / 2**bits
    # In floating point, k + u rounds up to k + 1 when u is within half an ulp of 1 (float32: about one
    # draw in 10^5 for k >= 128), which would put x on the left edge of the next bin. Keep every x in its
    # own half-open bin [lo + w k / 2^b, lo + w (k + 1) / 2^b).
    upper = lo + (hi - lo) * (k + 1) / 2**bits
    return torch.minimum(x, torch.nextafter(upper, torch.full_like(upper, -math.inf)))
