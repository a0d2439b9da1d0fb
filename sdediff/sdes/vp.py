"""Variance-preserving SDEs: VP (the continuous limit of DDPM) and sub-VP."""

from __future__ import annotations

import torch
from torch import Tensor

from .linear import LinearSDE


def _check_betas(beta_min: float, beta_max: float) -> None:
    if not (isinstance(beta_min, (int, float)) and beta_min >= 0):
        raise ValueError(f"beta_min must be a float >= 0, got {beta_min!r}")
    if not (isinstance(beta_max, (int, float)) and beta_max > 0 and beta_max >= beta_min):
        raise ValueError(f"beta_max must be a positive float >= beta_min={beta_min}, got {beta_max!r}")


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
        _check_betas(beta_min, beta_max)
        super().__init__(T=T, prior_std=1.0)
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

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
