"""Variance-exploding SDE (the continuous limit of SMLD / NCSN)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .._validate import check_float
from .linear import LinearSDE


class VESDE(LinearSDE):
    r"""Variance-exploding SDE :math:`dx = \sigma(t)\sqrt{2\log(\sigma_{max}/\sigma_{min})}\,dw`.

    :math:`\sigma(t) = \sigma_{min}(\sigma_{max}/\sigma_{min})^t`; no drift, so :math:`m(t) = 1`.
    Following the field's convention the kernel standard deviation is :math:`s(t) = \sigma(t)`
    (the SDE alone from a noise-free start gives :math:`\sigma(t)^2 - \sigma_{min}^2`: the data are
    taken as already carrying :math:`\sigma_{min}` of noise). Prior :math:`N(0, \sigma_{max}^2 I)`.
    Its exact discrete step is SMLD's :math:`x_i = x_{i-1} + \sqrt{\sigma_i^2 - \sigma_{i-1}^2}\,z`.

    Parameters
    ----------
    sigma_min, sigma_max : float
        Noise levels at ``t = 0`` and ``t = T`` (defaults 0.01 and 50).
    T : float
        End time.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, T: float = 1.0) -> None:
        sigma_min = check_float("sigma_min", sigma_min, 0, low_open=True)
        sigma_max = check_float("sigma_max", sigma_max, 0, low_open=True)
        if not sigma_max > sigma_min:
            raise ValueError(f"sigma_max must exceed sigma_min, got sigma_min={sigma_min:g}, sigma_max={sigma_max:g}")
        super().__init__(T=T, initial_std=sigma_min, prior_std=sigma_max)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t: Tensor) -> Tensor:
        r""":math:`\sigma(t) = \sigma_{min}(\sigma_{max}/\sigma_{min})^{t/T}`."""
        return self.sigma_min * torch.exp(t / self.T * self._log_ratio)

    def drift_coef(self, t: Tensor) -> Tensor:
        """``a(t) = 0``."""
        return torch.zeros_like(t)

    def diffusion(self, t: Tensor) -> Tensor:
        r""":math:`g(t) = \sigma(t)\sqrt{2\log(\sigma_{max}/\sigma_{min})/T}`, so that :math:`d(\sigma^2)/dt = g^2`."""
        return self.sigma(t) * math.sqrt(2 * self._log_ratio / self.T)

    def mean_coeff(self, t: Tensor) -> Tensor:
        """``m(t) = 1``."""
        return torch.ones_like(t)

    def marginal_std(self, t: Tensor) -> Tensor:
        r""":math:`s(t) = \sigma(t)`."""
        return self.sigma(t)

    def time_of_log_snr(self, log_snr: Tensor, lo: Tensor | float = 0.0, hi: Tensor | float | None = None) -> Tensor:
        r"""Closed-form inverse of :math:`\lambda(t) = -2\log\sigma(t)`, clipped to ``[lo, hi]``:
        :math:`t = T(-\lambda/2 - \log\sigma_{min})/\log(\sigma_{max}/\sigma_{min})`. Subclasses with another
        schedule fall back to :meth:`LinearSDE.time_of_log_snr`'s bisection."""
        if any(getattr(type(self), k) is not getattr(VESDE, k) for k in ("sigma", "mean_coeff", "marginal_std", "log_snr")):
            return super().time_of_log_snr(log_snr, lo, hi)
        t = self.T * (-0.5 * log_snr - math.log(self.sigma_min)) / self._log_ratio
        lo = torch.as_tensor(lo, dtype=t.dtype, device=t.device)
        hi = torch.as_tensor(self.T if hi is None else hi, dtype=t.dtype, device=t.device)
        return torch.minimum(torch.maximum(t, lo), hi)

    def to_config(self) -> dict[str, Any]:
        """``{"class": ..., "params": {"sigma_min", "sigma_max", "T"}}`` (see :meth:`sdediff.SDE.to_config`)."""
        return {"class": type(self).__name__,
                "params": {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "T": self.T}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, T={self.T})"
