r"""The augmented probability flow in the coordinates the likelihood integrates in.

Integrating the change of variables needs, at a state and a time, three things from one score evaluation: the
state's derivative ``f``, the divergence integrand ``h`` (exact, or one Hutchinson estimate per probe) and the
gradient of the log-density with respect to the state, ``grad`` (the score, in the state's coordinates), which turns
a state error into a log-density error: a local error :math:`\delta` of the state changes the result by
:math:`\nabla\log p\cdot\delta` to first order. Two flows provide them.

:class:`NoiseLevelFlow`, for a :class:`~sdediff.LinearSDE`, works in the model's own noise level. With
:math:`\hat y = x/m(t)` and :math:`\sigma = s(t)/m(t)` the probability flow is :math:`d\hat y/d\sigma =
\hat\varepsilon = -s\,\nabla\log p_t(x)`, whatever the schedule (the time enters only through :math:`t(\sigma)`,
so a schedule with kinks costs nothing more). It integrates in

.. math::  \tau(\sigma) = \kappa \log\frac{\sigma + a}{\sigma + b}, \qquad \kappa = \frac{b}{b - a}, \qquad
           z = \frac{b}{\sigma + b}\,\hat y,

for a **noise range** :math:`a < b`: :math:`\tau` is :math:`\log\sigma` (half the negative log-SNR) up to a
constant between :math:`a` and :math:`b`, proportional to :math:`\sigma` below :math:`a` and to :math:`-1/\sigma`
above :math:`b`. Where :math:`\sigma` is far below the data's scale the flow is a power series in :math:`\sigma`, and
far above it a power series in :math:`1/\sigma`, so in :math:`\tau` both ends are smooth polynomial-like arcs rather
than the exponential tails they are in :math:`\log\sigma`, and :math:`z` stays of the data's size. Then

.. math::  \frac{dz}{d\tau} = \frac{\sigma + a}{b}\,(b\,\hat\varepsilon - z), \qquad
           \frac{d\ell}{d\tau} = \nabla_z\cdot\frac{dz}{d\tau} = \frac{\sigma + a}{b}\Big(\frac{\sigma + b}{\sigma}\,G - D\Big),
           \qquad G = -s^2\,\nabla_x\cdot\nabla\log p_t(x),

and :math:`\log p_\epsilon(x) = \log p_T(x_T) + \ell + D\log\frac{m(T)(\sigma_T + b)}{m(\epsilon)(\sigma_\epsilon + b)}`
(the change of scale between :math:`x` and :math:`z` at both ends).

:class:`TimeFlow` works in the SDE's own time :math:`t` on :math:`x` itself, for any :class:`~sdediff.SDE`:
:math:`dx/dt = v(x,t)`, :math:`d\ell/dt = \nabla\cdot v`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .._utils import all_finite, expand_as
from .._validate import check_float
from ..processes import ScoreFn, score_weight
from ..sdes.base import SDE
from ..sdes.linear import LinearSDE
from .divergence import divergence_exact, divergence_hutchinson

__all__ = ["Evaluation", "NoiseLevelFlow", "TimeFlow", "NotDifferentiableError", "DEFAULT_NOISE_RANGE", "checked_score",
           "check_jacobian", "ensure_finite"]

#: the default noise range ``(a, b)`` of :class:`NoiseLevelFlow`
DEFAULT_NOISE_RANGE = (0.2, 5.0)


class NotDifferentiableError(TypeError):
    """The score function is not differentiable in ``x``, so the divergence of the flow cannot be taken."""


class Evaluation(NamedTuple):
    """What one score evaluation gives the integrator, for ``n`` states of ``D`` elements."""

    f: Tensor  #: ``(n, D)`` the state's derivative in the integration time
    h: Tensor  #: ``(n, k)`` the divergence integrand, one column per Hutchinson probe (``k = 1`` for the exact trace)
    grad: Tensor  #: ``(n, D)`` the gradient of the log-density with respect to the state
    t: Tensor  #: ``(n,)`` the SDE times of the states


def checked_score(score_fn: ScoreFn, x: Tensor, t: Tensor) -> Tensor:
    """``score_fn(x, t)``, checked: a floating tensor shaped like ``x`` in its dtype that autograd can differentiate
    in ``x`` (when ``x`` requires a gradient).

    Raises
    ------
    NotDifferentiableError
        If the output does not depend on ``x`` through autograd (computed under ``torch.no_grad()``, detached, or
        converted from an integer tensor).
    """
    out = score_fn(x, t)
    if not isinstance(out, Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"score_fn must return a tensor shaped like x {tuple(x.shape)}, got {got}")
    if not out.is_floating_point():
        raise NotDifferentiableError(f"score_fn returned an integer tensor ({out.dtype}); the likelihood needs the "
                                     "divergence of the score, so the score must be a floating tensor differentiable in x")
    if out.dtype != x.dtype:
        raise TypeError(f"score_fn must return a tensor of the input's dtype {x.dtype}, got {out.dtype}; cast the "
                        "network's output, or x to the network's dtype")
    if x.requires_grad and not out.requires_grad:
        raise NotDifferentiableError(
            "score_fn(x, t) is not differentiable in x: its output does not depend on x through autograd (was it "
            "computed under torch.no_grad(), detached, or rounded to integers?). log_likelihood needs the divergence "
            "of the score; pass a score function that autograd can differentiate")
    return out


def ensure_finite(ev: Evaluation, index: Tensor, first_point: int = 0) -> None:
    """Raise :class:`FloatingPointError` naming the first point (its row ``index`` of a chunk whose first point is
    ``first_point`` of the batch) and its time where the flow's values are not finite (one host synchronisation)."""
    if all_finite(ev.f) and all_finite(ev.h):
        return
    bad = ~(torch.isfinite(ev.f).all(1) & torch.isfinite(ev.h).all(1))
    i = int(bad.nonzero()[0, 0])
    raise FloatingPointError(
        f"log_likelihood: the probability flow is not finite at point {first_point + int(index[i])} at t = {float(ev.t[i]):.6g} "
        f"({int(bad.sum())} point(s) of this evaluation): score_fn returned NaN or Inf there, or the state blew up "
        "(check the score function and eps)")


def check_jacobian(score: Tensor, div: Tensor) -> None:
    """Raise :class:`NotDifferentiableError` if the divergence of a non-zero score is exactly zero at every point: a
    piecewise-constant (rounded) score, whose autograd Jacobian vanishes although the density's does not."""
    if bool((div == 0).all()) and bool((score != 0).any()):
        raise NotDifferentiableError(
            "the Jacobian of score_fn in x is exactly zero at every point: the score is piecewise constant in x "
            "(rounded or integer-valued?), so autograd cannot give the divergence of the flow; pass a differentiable "
            "score")


def _divergence(fn: Callable[[Tensor], Tensor], x: Tensor, probes: Tensor | None,
                dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """``(fn(x), div)`` with ``div`` ``(n, 1)`` exact, or ``(n, k)`` Hutchinson estimates for ``probes`` ``(n, k, ...)``.

    ``fn`` and its derivatives are evaluated at ``x`` cast to ``dtype`` (the score's, with the probes drawn in it),
    the divergence's sums taken and both results returned in ``x``'s dtype: the state is kept wider than the network
    computes.
    """
    x_in = x if dtype is None else x.to(dtype)
    if probes is None:
        out, div = divergence_exact(fn, x_in, dtype=x.dtype)
        return out.to(x.dtype), div[:, None]
    out, est = divergence_hutchinson(fn, x_in, probes.transpose(0, 1), dtype=x.dtype)
    return out.to(x.dtype), est.transpose(0, 1)


class NoiseLevelFlow:
    r"""The probability flow of a :class:`~sdediff.LinearSDE` in the noise-level time :math:`\tau` and the scaled
    state :math:`z` (module docstring), from :math:`t = \epsilon` to :math:`T`.

    Parameters
    ----------
    sde : LinearSDE
        The forward SDE.
    score_fn : callable
        ``score_fn(x, t)``.
    eps : float
        Start time.
    event_shape : tuple of int
        Shape of one sample (the states are flat ``(n, D)``; the score sees ``(n, *event_shape)``).
    noise_range : (float, float)
        :math:`(a, b)` with :math:`0 < a < b`.
    score_dtype : torch.dtype, optional
        The dtype ``score_fn`` is called in, when the states are kept in a wider one.
    """

    def __init__(self, sde: LinearSDE, score_fn: ScoreFn, eps: float, event_shape: tuple[int, ...],
                 noise_range: tuple[float, float] = DEFAULT_NOISE_RANGE, score_dtype: torch.dtype | None = None
                 ) -> None:
        a, b = noise_range
        check_float("noise_range[0]", a, 0.0, low_open=True)
        check_float("noise_range[1]", b, a, low_open=True)
        self.sde, self.score_fn, self.eps, self.event_shape = sde, score_fn, eps, tuple(event_shape)
        self.score_dtype = score_dtype
        self.a, self.b, self.kappa = float(a), float(b), b / (b - a)
        self.dim = math.prod(self.event_shape)

    def sigma_at_time(self, t: Tensor) -> Tensor:
        r""":math:`\sigma(t) = s(t)/m(t)`."""
        return self.sde.marginal_std(t) / self.sde.mean_coeff(t)

    def tau_of_sigma(self, sigma: Tensor) -> Tensor:
        r""":math:`\tau = \kappa\log((\sigma + a)/(\sigma + b))` (negative, increasing in :math:`\sigma`)."""
        return self.kappa * torch.log((sigma + self.a) / (sigma + self.b))

    def sigma(self, tau: Tensor) -> Tensor:
        r"""The inverse, :math:`\sigma = (qb - a)/(1 - q)` with :math:`q = e^{\tau/\kappa}`."""
        u = tau / self.kappa
        return (torch.exp(u) * self.b - self.a) / -torch.expm1(u)

    def time(self, tau: Tensor) -> Tensor:
        r"""The SDE time where :math:`\sigma(t) = \sigma(\tau)`, in :math:`[\epsilon, T]`."""
        return self.sde.time_of_log_snr(-2 * torch.log(self.sigma(tau)), self.eps, self.sde.T)

    def span(self, like: Tensor) -> Tensor:
        """``[tau(eps), tau(T)]`` in the dtype and device of ``like``."""
        t = torch.tensor([self.eps, self.sde.T], dtype=like.dtype, device=like.device)
        return self.tau_of_sigma(self.sigma_at_time(t))

    def x_scale(self, tau: Tensor) -> Tensor:
        r"""``(n,)`` factor :math:`m(t)(\sigma + b)/b` with :math:`x = ` factor :math:`\cdot z`."""
        return self.sde.mean_coeff(self.time(tau)) * (self.sigma(tau) + self.b) / self.b

    def initial_state(self, x: Tensor) -> Tensor:
        """``z`` at :math:`\\epsilon` for the points ``x``, flat ``(n, D)``."""
        t = torch.full((x.shape[0],), self.eps, dtype=x.dtype, device=x.device)
        scale = self.sde.mean_coeff(t) * (self.sigma_at_time(t) + self.b) / self.b
        return x.reshape(x.shape[0], -1) / scale[:, None]

    def finish(self, z: Tensor, ell: Tensor) -> tuple[Tensor, Tensor]:
        r"""``(latent, delta)``: :math:`x_T` like the data and :math:`\int_\epsilon^T\nabla\cdot v\,dt` per column of ``ell``."""
        t = torch.tensor([self.eps, self.sde.T], dtype=z.dtype, device=z.device)
        m, sigma = self.sde.mean_coeff(t), self.sigma_at_time(t)
        scale = m * (sigma + self.b) / self.b
        latent = (z * scale[1]).reshape(z.shape[0], *self.event_shape)
        return latent, ell + self.dim * torch.log(scale[1] / scale[0])

    def evaluate(self, z: Tensor, tau: Tensor, probes: Tensor | None, check: bool = False) -> Evaluation:
        """``f``, ``h`` and ``grad`` at the states ``z`` ``(n, D)`` and times ``tau`` ``(n,)`` (one score evaluation).
        With ``check``, raise :class:`NotDifferentiableError` if the score's Jacobian is zero at every point."""
        a, b = self.a, self.b
        sigma = self.sigma(tau)
        t = self.time(tau)
        m, s = self.sde.mean_coeff(t), self.sde.marginal_std(t)
        x_scale = m * (sigma + b) / b
        x = (z * x_scale[:, None]).reshape(z.shape[0], *self.event_shape)
        t_in = t.to(self.score_dtype or t.dtype)
        score, div = _divergence(lambda q: checked_score(self.score_fn, q, t_in), x, probes, self.score_dtype)
        score = score.reshape(z.shape)
        if check:
            check_jacobian(score, div)
        c = ((sigma + a) / b)[:, None]
        f = torch.mul(score, -(b * s)[:, None] * c).addcmul_(z, c, value=-1)  # (sigma + a)/b (b eps_hat - z)
        h = c * (-((sigma + b) / sigma * s**2)[:, None] * div - self.dim)
        return Evaluation(f=f, h=h, grad=score.mul_(x_scale[:, None]), t=t)


class TimeFlow:
    r"""The probability flow :math:`dx/dt = v(x,t) = f(x,t) - \tfrac12 g(t)^2 s_\theta(x,t)` of any SDE in its own time.

    The state is :math:`x` itself (flat ``(n, D)``), ``h`` the divergence :math:`\nabla\cdot v` (the drift's part by
    autograd too, so a non-linear drift is handled) and ``grad`` the score.
    """

    def __init__(self, sde: SDE, score_fn: ScoreFn, eps: float, event_shape: tuple[int, ...],
                 score_dtype: torch.dtype | None = None) -> None:
        self.sde, self.score_fn, self.eps, self.event_shape = sde, score_fn, eps, tuple(event_shape)
        self.score_dtype = score_dtype
        self.dim = math.prod(self.event_shape)

    def time(self, tau: Tensor) -> Tensor:
        """The SDE time (the integration time itself)."""
        return tau

    def span(self, like: Tensor) -> Tensor:
        """``[eps, T]``."""
        return torch.tensor([self.eps, self.sde.T], dtype=like.dtype, device=like.device)

    def x_scale(self, tau: Tensor) -> Tensor:
        """``1``: the state is ``x``."""
        return torch.ones_like(tau)

    def initial_state(self, x: Tensor) -> Tensor:
        """``x`` flat, ``(n, D)``."""
        return x.reshape(x.shape[0], -1)

    def finish(self, z: Tensor, ell: Tensor) -> tuple[Tensor, Tensor]:
        """``(latent, delta)``."""
        return z.reshape(z.shape[0], *self.event_shape), ell

    def evaluate(self, z: Tensor, tau: Tensor, probes: Tensor | None, check: bool = False) -> Evaluation:
        """``v``, ``∇·v`` and the score at the states ``z`` and times ``tau`` (one score evaluation); ``check`` is
        accepted for symmetry with :meth:`NoiseLevelFlow.evaluate` (the drift's divergence hides the score's here)."""
        x = z.reshape(z.shape[0], *self.event_shape)
        t_in = tau.to(self.score_dtype or tau.dtype)
        weight = score_weight(self.sde, t_in, 0.0)
        scores: list[Tensor] = []

        def velocity(q: Tensor) -> Tensor:
            scores.append(checked_score(self.score_fn, q, t_in))
            return self.sde.drift(q, t_in) + expand_as(weight, q) * scores[-1]

        v, div = _divergence(velocity, x, probes, self.score_dtype)
        grad = scores[-1].detach().to(z.dtype).reshape(z.shape)
        return Evaluation(f=v.reshape(z.shape), h=div, grad=grad, t=tau)
