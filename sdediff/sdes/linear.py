"""Linear forward SDEs with a Gaussian perturbation kernel.

For a linear drift ``f(x, t) = a(t) x`` the kernel is Gaussian,

    x_t | x_0 ~ N(m(t) x_0, s(t)^2 I),   m(t) = exp(∫_0^t a),   d(s^2)/dt = 2 a s^2 + g^2,

and every solver in sdediff is written against ``(m, s)``. A subclass gives ``a(t)`` and ``g(t)``
and, where known, closed forms of ``m`` and ``s``; otherwise both are integrated numerically once,
cached on a grid and interpolated with cubic Hermite polynomials that use their exact derivatives.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from .._utils import batch_time, check_time, expand_as
from .._validate import check_float, check_int
from .base import SDE, gaussian_log_prob, gaussian_sample

TimeFn = Callable[[Tensor], Tensor]


class LinearSDE(SDE):
    r"""Forward SDE :math:`dx = a(t)\,x\,dt + g(t)\,dw` with Gaussian kernel :math:`N(m(t) x_0, s(t)^2 I)`.

    Give ``a`` and ``g`` either as callables or by overriding :meth:`drift_coef` and
    :meth:`diffusion`. The kernel is

    .. math::  m(t) = \exp\Big(\int_0^t a\Big), \qquad
               s(t)^2 = m(t)^2\Big(s_0^2 + \int_0^t \frac{g(u)^2}{m(u)^2}\,du\Big),

    the solution of :math:`d(s^2)/dt = 2a s^2 + g^2` from :math:`s(0) = s_0`. Subclasses with closed
    forms override :meth:`mean_coeff` and :meth:`marginal_std`; otherwise both are computed once on
    a uniform grid of ``grid_size`` intervals (refined geometrically near ``t = 0``) with an adaptive
    8th-order Runge–Kutta solve (relative tolerance 1e-12) and interpolated by cubic Hermite
    polynomials using the exact derivatives (error ``O(h^4)``; ~1e-10 relative for the VP schedule).

    Parameters
    ----------
    drift_coef : callable, optional
        ``a(t)`` for a ``(batch,)`` tensor ``t``.
    diffusion : callable, optional
        ``g(t)`` for a ``(batch,)`` tensor ``t``.
    T : float
        End time.
    initial_std : float
        ``s(0)``, the noise already present at ``t = 0`` (``0`` for VP; VE uses ``sigma_min``).
    prior_std : float, optional
        Standard deviation of the Gaussian prior ``N(0, prior_std^2 I)``; defaults to ``s(T)``.
    grid_size : int
        Number of intervals of the interpolation table used when there is no closed form.
    """

    def __init__(self, drift_coef: TimeFn | None = None, diffusion: TimeFn | None = None, T: float = 1.0,
                 initial_std: float = 0.0, prior_std: float | None = None, grid_size: int = 4096) -> None:
        super().__init__(T)
        for name, fn in (("drift_coef", drift_coef), ("diffusion", diffusion)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be a callable t -> tensor, got {type(fn).__name__}")
        if drift_coef is not None:
            self.drift_coef = drift_coef  # type: ignore[method-assign]
        if diffusion is not None:
            self.diffusion = diffusion  # type: ignore[method-assign]
        self._initial_std = check_float("initial_std", initial_std, 0)
        self._prior_std = check_float("prior_std", prior_std, 0, low_open=True, optional=True)
        self.grid_size = check_int("grid_size", grid_size, 16)
        self._table: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    # --- the schedule ---------------------------------------------------------------------------
    def drift_coef(self, t: Tensor) -> Tensor:
        """Linear drift coefficient ``a(t)``, so that ``f(x, t) = a(t) x``."""
        raise NotImplementedError(f"{type(self).__name__} must define drift_coef(t) or pass drift_coef=")

    def diffusion(self, t: Tensor) -> Tensor:
        """Diffusion coefficient ``g(t)``."""
        raise NotImplementedError(f"{type(self).__name__} must define diffusion(t) or pass diffusion=")

    def mean_coeff(self, t: Tensor) -> Tensor:
        r"""Kernel mean coefficient :math:`m(t) = \exp\int_0^t a`, shaped like ``t``."""
        return self._interpolate(t)[0].exp()

    def marginal_std(self, t: Tensor) -> Tensor:
        r"""Kernel standard deviation :math:`s(t)`, shaped like ``t``."""
        return self._interpolate(t)[1].clamp_min(0).sqrt()

    def log_snr(self, t: Tensor) -> Tensor:
        r"""Log signal-to-noise ratio :math:`\lambda(t) = \log(m(t)^2 / s(t)^2)`."""
        return 2 * (self.mean_coeff(t).log() - self.marginal_std(t).log())

    def time_of_log_snr(self, log_snr: Tensor, lo: Tensor | float = 0.0, hi: Tensor | float | None = None) -> Tensor:
        r"""The times in ``[lo, hi]`` (elementwise) where the decreasing :math:`\lambda(t) = \log(m^2/s^2)`
        equals ``log_snr``.

        Bisection with a fixed number of halvings (64, float64 precision): vectorised, and with no host
        synchronisation, so it can run on the device.
        """
        lo = torch.as_tensor(lo, dtype=log_snr.dtype, device=log_snr.device).expand_as(log_snr)
        hi = torch.as_tensor(self.T if hi is None else hi, dtype=log_snr.dtype,
                             device=log_snr.device).expand_as(log_snr)
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            early = self.log_snr(mid) > log_snr  # the log-SNR decreases with t: mid is still too early
            lo, hi = torch.where(early, mid, lo), torch.where(early, hi, mid)
        return 0.5 * (lo + hi)

    @property
    def initial_std(self) -> float:
        """``s(0)``, the noise already present at ``t = 0`` (where the numerical kernel starts)."""
        return self._initial_std

    @property
    def prior_std(self) -> float:
        """Standard deviation of the Gaussian prior ``p_T = N(0, prior_std^2 I)``."""
        if self._prior_std is None:
            self._prior_std = float(self.marginal_std(torch.tensor([self.T], dtype=torch.float64)))
        return self._prior_std

    # --- the SDE interface ----------------------------------------------------------------------
    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        """Drift ``f(x, t) = a(t) x``."""
        return expand_as(self.drift_coef(batch_time(t, x)), x) * x

    def marginal(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean ``m(t) x0`` (like ``x0``) and standard deviation ``s(t)`` (shape ``(batch,)``) of ``x_t | x_0``.

        ``t`` must lie in ``[0, T]`` (checked for Python numbers and CPU tensors, see :func:`check_time`).
        """
        check_time(t, self.T)
        t = batch_time(t, x0)
        return expand_as(self.mean_coeff(t), x0) * x0, self.marginal_std(t)

    def prior_sample(self, shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """Draw from ``N(0, prior_std^2 I)``."""
        return gaussian_sample(shape, self.prior_std, generator, device, dtype)

    def prior_log_prob(self, z: Tensor) -> Tensor:
        """Log-density of ``N(0, prior_std^2 I)`` at ``z``, shape ``(batch,)``."""
        return gaussian_log_prob(z, self.prior_std)

    def transition(self, t: Tensor, dt: Tensor) -> tuple[Tensor, Tensor]:
        r"""Exact forward transition from ``t - dt`` to ``t``: :math:`x_t = r\,x_{t-dt} + \sigma z`.

        :math:`r = m(t)/m(t-dt)` and :math:`\sigma^2 = s(t)^2 - r^2 s(t-dt)^2`, both ``(batch,)``.
        For VP this is DDPM's step with :math:`\beta_i = 1 - r^2`; for VE it is SMLD's
        :math:`\sigma^2 = \sigma_i^2 - \sigma_{i-1}^2`.
        """
        t_prev = t - dt
        r = self.mean_coeff(t) / self.mean_coeff(t_prev)
        var = self.marginal_std(t) ** 2 - (r * self.marginal_std(t_prev)) ** 2
        return r, var.clamp_min(0).sqrt()

    def discretize(self, x: Tensor, t: Tensor, dt: Tensor) -> tuple[Tensor, Tensor]:
        r"""Exact discrete step ending at ``t``: :math:`f_i = (r - 1)x`, :math:`G_i = \sigma` (see :meth:`transition`)."""
        r, sigma = self.transition(batch_time(t, x), batch_time(dt, x))
        return (expand_as(r, x) - 1) * x, sigma

    def discrete_alpha(self, t: Tensor, dt: Tensor) -> Tensor:
        r""":math:`\alpha_i = (m(t)/m(t-dt))^2`, DDPM's :math:`1 - \beta_i` for VP and ``1`` for VE."""
        return (self.mean_coeff(t) / self.mean_coeff(t - dt)) ** 2

    def denoise(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        r"""Tweedie's estimate :math:`\hat x_0 = (x + s(t)^2 \nabla\log p_t(x)) / m(t)`; ``t`` in ``[0, T]``."""
        check_time(t, self.T)
        t = batch_time(t, x)
        m, s = expand_as(self.mean_coeff(t), x), expand_as(self.marginal_std(t), x)
        return (x + s**2 * score) / m

    # --- numerical kernel -----------------------------------------------------------------------
    def _build_table(self) -> Tensor:
        """Integrate ``log m`` and ``s^2`` on a grid; rows: times, log m, s^2, and their time derivatives."""

        def coeffs(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            tt = torch.as_tensor(np.atleast_1d(t), dtype=torch.float64)
            a = torch.as_tensor(self.drift_coef(tt), dtype=torch.float64).expand_as(tt)
            g = torch.as_tensor(self.diffusion(tt), dtype=torch.float64).expand_as(tt)
            return a.numpy(), g.numpy()

        def rhs(t: float, y: np.ndarray) -> np.ndarray:
            # y = (log m, s^2 / m^2): d log m = a dt, d(s^2/m^2) = g^2 / m^2 dt
            a, g = coeffs(np.array([t]))
            return np.array([a[0], g[0] ** 2 * math.exp(-2 * y[0])])

        # uniform grid, refined geometrically inside the first interval so that s(t) stays relatively
        # accurate as t -> 0 even where s^2 vanishes faster than linearly (sub-VP: s^2 ~ t^2)
        h = self.T / self.grid_size
        grid = np.concatenate([[0.0], h * 2.0 ** -np.arange(40, 0, -1), np.linspace(h, self.T, self.grid_size)])
        sol = solve_ivp(rhs, (0.0, self.T), [0.0, self.initial_std**2], method="DOP853", t_eval=grid,
                        rtol=1e-12, atol=[1e-14, 1e-30])  # tiny atol: s^2 is relatively accurate near 0
        if not sol.success:
            raise RuntimeError(f"integrating the kernel of {type(self).__name__} failed: {sol.message}")
        log_m, ratio = sol.y
        var = ratio * np.exp(2 * log_m)
        a, g = coeffs(grid)
        table = np.stack([grid, log_m, var, a, 2 * a * var + g**2])
        if not np.isfinite(table).all():
            raise ValueError(f"the kernel of {type(self).__name__} is not finite on [0, T]; check drift_coef "
                             "and diffusion")
        return torch.as_tensor(table)

    def _interpolate(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Cubic Hermite interpolation of ``(log m(t), s(t)^2)`` from the cached table.

        Times outside ``[0, T]``, where the schedule is not tabulated, are clamped to it (checking
        them would cost a host synchronisation on every call; the public entry points validate times).
        """
        t = torch.as_tensor(t)
        if not t.is_floating_point():
            t = t.to(torch.get_default_dtype())
        t = t.clamp(0.0, self.T)
        key = (t.device, t.dtype)
        if key not in self._table:
            if not self._table:
                self._table[(torch.device("cpu"), torch.float64)] = self._build_table()
            self._table[key] = self._table[(torch.device("cpu"), torch.float64)].to(t.device, t.dtype)
        grid, log_m, var, dlog_m, dvar = self._table[key]
        i0 = (torch.searchsorted(grid, t.contiguous(), right=True) - 1).clamp(0, len(grid) - 2)
        i1 = i0 + 1
        h = grid[i1] - grid[i0]
        u = (t - grid[i0]) / h
        h00 = (1 + 2 * u) * (1 - u) ** 2
        h10 = u * (1 - u) ** 2
        h01 = u**2 * (3 - 2 * u)
        h11 = u**2 * (u - 1)
        log_m = h00 * log_m[i0] + h10 * h * dlog_m[i0] + h01 * log_m[i1] + h11 * h * dlog_m[i1]
        var = h00 * var[i0] + h10 * h * dvar[i0] + h01 * var[i1] + h11 * h * dvar[i1]
        return log_m, var

    def __repr__(self) -> str:
        return f"{type(self).__name__}(T={self.T}, initial_std={self.initial_std})"


def require_linear(sde: SDE, what: str) -> LinearSDE:
    """Return ``sde`` if it is a :class:`LinearSDE`, else raise a ``TypeError`` saying ``what`` needs its kernel."""
    if not isinstance(sde, LinearSDE):
        raise TypeError(f"{what} needs a linear SDE with a Gaussian kernel m(t), s(t) (sdediff.LinearSDE); "
                        f"{type(sde).__name__} has none")
    return sde
