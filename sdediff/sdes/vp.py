"""Variance-preserving SDEs: VP (the continuous limit of DDPM) and sub-VP."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._validate import check_float
from .linear import LinearSDE


def _check_betas(beta_min: float, beta_max: float) -> tuple[float, float]:
    """``(beta_min, beta_max)`` as floats, with 0 <= beta_min <= beta_max and beta_max > 0."""
    beta_min = check_float("beta_min", beta_min, 0)
    beta_max = check_float("beta_max", beta_max, 0, low_open=True)
    if beta_min > beta_max:
        raise ValueError(f"beta_min must not exceed beta_max, got beta_min={beta_min:g} > beta_max={beta_max:g}")
    return beta_min, beta_max


class VPSDE(LinearSDE):
    r"""Variance-preserving SDE :math:`dx = -\tfrac12\beta(t)x\,dt + \sqrt{\beta(t)}\,dw`.

    With :math:`\beta(t) = \beta_{min} + (t/T)(\beta_{max} - \beta_{min})` the kernel is

    .. math::  m(t) = \exp\big(-\tfrac14 (t^2/T)(\beta_{max}-\beta_{min}) - \tfrac12 t\beta_{min}\big),
               \qquad s(t)^2 = 1 - m(t)^2,

    and the prior is :math:`N(0, I)`. Euler–Maruyama on it with :math:`\beta_i = \beta(t_i)/N` is
    DDPM's :math:`x_i = \sqrt{1-\beta_i}\,x_{i-1} + \sqrt{\beta_i}\,z`, and :math:`\bar\alpha_t = m(t)^2`.

    Parameters
    ----------
    beta_min, beta_max : float
        Endpoints of the linear noise rate (defaults 0.1 and 20, as in DDPM / score SDE).
    T : float
        End time.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, T: float = 1.0) -> None:
        beta_min, beta_max = _check_betas(beta_min, beta_max)
        super().__init__(T=T, prior_std=1.0)
        self.beta_min, self.beta_max = beta_min, beta_max

    def beta(self, t: Tensor) -> Tensor:
        r""":math:`\beta(t) = \beta_{min} + (t/T)(\beta_{max}-\beta_{min})`."""
        return self.beta_min + t / self.T * (self.beta_max - self.beta_min)

    def log_mean_coeff(self, t: Tensor) -> Tensor:
        r""":math:`\log m(t) = -\tfrac12\int_0^t\beta = -\tfrac14 (t^2/T)(\beta_{max}-\beta_{min}) - \tfrac12 t\beta_{min}`."""
        return -0.25 * t**2 / self.T * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def drift_coef(self, t: Tensor) -> Tensor:
        r""":math:`a(t) = -\tfrac12\beta(t)`."""
        return -0.5 * self.beta(t)

    def diffusion(self, t: Tensor) -> Tensor:
        r""":math:`g(t) = \sqrt{\beta(t)}`."""
        return self.beta(t).sqrt()

    def mean_coeff(self, t: Tensor) -> Tensor:
        """Closed-form ``m(t)``."""
        return self.log_mean_coeff(t).exp()

    def marginal_std(self, t: Tensor) -> Tensor:
        r""":math:`s(t) = \sqrt{1 - m(t)^2}`, computed as ``sqrt(-expm1(2 log m))`` for accuracy at small t."""
        return torch.sqrt(-torch.expm1(2 * self.log_mean_coeff(t)))

    def time_of_log_snr(self, log_snr: Tensor, lo: Tensor | float = 0.0, hi: Tensor | float | None = None) -> Tensor:
        r"""Closed-form inverse of :math:`\lambda(t)`, clipped to ``[lo, hi]``: :math:`m^2 = \mathrm{sigmoid}(\lambda)`
        gives :math:`L = -\log m = \tfrac12\,\mathrm{softplus}(-\lambda)`, and :math:`L = q t^2 + p t` with
        :math:`q = (\beta_{max}-\beta_{min})/(4T)`, :math:`p = \beta_{min}/2` is solved as
        :math:`t = 2L/(p + \sqrt{p^2 + 4qL})` (no cancellation). Subclasses with another schedule fall back to
        :meth:`LinearSDE.time_of_log_snr`'s bisection."""
        if not _own_schedule(self, VPSDE):
            return super().time_of_log_snr(log_snr, lo, hi)
        return self._time_of_neg_log_mean(0.5 * torch.nn.functional.softplus(-log_snr), lo, hi)

    def _time_of_neg_log_mean(self, L: Tensor, lo: Tensor | float, hi: Tensor | float | None) -> Tensor:
        r"""The time where :math:`-\log m(t) = L`, clipped to ``[lo, hi]``."""
        q, p = 0.25 * (self.beta_max - self.beta_min) / self.T, 0.5 * self.beta_min
        t = 2 * L / (p + (p**2 + 4 * q * L).sqrt())
        lo = torch.as_tensor(lo, dtype=t.dtype, device=t.device)
        hi = torch.as_tensor(self.T if hi is None else hi, dtype=t.dtype, device=t.device)
        return torch.minimum(torch.maximum(t, lo), hi)

    def to_config(self) -> dict[str, Any]:
        """``{"class": ..., "params": {"beta_min", "beta_max", "T"}}`` (see :meth:`sdediff.SDE.to_config`)."""
        return {"class": type(self).__name__, "params": {"beta_min": self.beta_min, "beta_max": self.beta_max, "T": self.T}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(beta_min={self.beta_min}, beta_max={self.beta_max}, T={self.T})"


class SubVPSDE(VPSDE):
    r"""Sub-VP SDE :math:`dx = -\tfrac12\beta(t)x\,dt + \sqrt{\beta(t)(1 - m(t)^4)}\,dw`.

    Same drift and mean as :class:`VPSDE`; the variance :math:`s(t)^2 = (1 - m(t)^2)^2` is below VP's
    at every t. Prior :math:`N(0, I)`.
    """

    def diffusion(self, t: Tensor) -> Tensor:
        r""":math:`g(t) = \sqrt{\beta(t)(1 - e^{-2\int_0^t\beta})} = \sqrt{\beta(t)(1 - m(t)^4)}`."""
        return torch.sqrt(self.beta(t) * -torch.expm1(4 * self.log_mean_coeff(t)))

    def marginal_std(self, t: Tensor) -> Tensor:
        r""":math:`s(t) = 1 - m(t)^2`."""
        return -torch.expm1(2 * self.log_mean_coeff(t))

    def time_of_log_snr(self, log_snr: Tensor, lo: Tensor | float = 0.0, hi: Tensor | float | None = None) -> Tensor:
        r"""Closed-form inverse of :math:`\lambda(t) = 2\log(m/(1 - m^2))`, clipped to ``[lo, hi]``: with
        :math:`u = e^{\lambda/2}`, :math:`m = 2u/(1 + \sqrt{1 + 4u^2})`, i.e. :math:`-\log m = \operatorname{asinh}(1/(2u))`,
        then the quadratic of :meth:`VPSDE.time_of_log_snr`."""
        if not _own_schedule(self, SubVPSDE):
            return LinearSDE.time_of_log_snr(self, log_snr, lo, hi)
        return self._time_of_neg_log_mean(torch.asinh(0.5 * torch.exp(-0.5 * log_snr)), lo, hi)


def _own_schedule(sde: VPSDE, cls: type) -> bool:
    """Whether ``sde`` computes its kernel as ``cls`` does (a subclass may bring its own schedule)."""
    return all(getattr(type(sde), k) is getattr(cls, k)
               for k in ("beta", "log_mean_coeff", "mean_coeff", "marginal_std", "log_snr"))
