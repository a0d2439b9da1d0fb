r"""Time grids: decreasing sequences :math:`T = t_0 > t_1 > \dots > t_N = \epsilon` for fixed-step solvers.

Each is a plain function ``grid(sde, steps, eps) -> tensor of steps + 1 times`` in float64 on the CPU;
:func:`make_grid` resolves a name, a callable or explicit times and moves them to the samples'
device and dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..sdes.base import SDE
from ..sdes.linear import require_linear

GridFn = Callable[[SDE, int, float], Tensor]


def uniform(sde: SDE, steps: int, eps: float) -> Tensor:
    r"""Uniform in time: :math:`t_i = T - (i/N)(T - \epsilon)`."""
    return torch.linspace(sde.T, eps, steps + 1, dtype=torch.float64)


def quadratic(sde: SDE, steps: int, eps: float) -> Tensor:
    r"""Quadratic in time, denser near :math:`\epsilon`: :math:`t_i = \epsilon + (T - \epsilon)(1 - i/N)^2`."""
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return eps + (sde.T - eps) * u**2


def _pinned(sde: SDE, ts: Tensor, eps: float) -> Tensor:
    ts[0], ts[-1] = sde.T, eps
    return ts


def log_snr(sde: SDE, steps: int, eps: float) -> Tensor:
    r"""Uniform in log-SNR :math:`\lambda(t) = \log(m^2/s^2)` between :math:`\lambda(T)` and :math:`\lambda(\epsilon)`."""
    sde = require_linear(sde, "time_grid='log_snr'")
    lam_T, lam_eps = sde.log_snr(torch.tensor([sde.T, eps], dtype=torch.float64))
    lam = torch.linspace(float(lam_T), float(lam_eps), steps + 1, dtype=torch.float64)
    return _pinned(sde, sde.time_of_log_snr(lam, eps), eps)


def karras(sde: SDE, steps: int, eps: float, rho: float = 7.0) -> Tensor:
    r"""EDM's grid (Karras et al. 2022) in noise level :math:`\sigma = s/m = e^{-\lambda/2}`:

    :math:`\sigma_i = \big(\sigma_{max}^{1/\rho} + \tfrac iN(\sigma_{min}^{1/\rho} - \sigma_{max}^{1/\rho})\big)^\rho`,
    with :math:`\sigma_{max}, \sigma_{min}` the levels at ``T`` and ``eps``, mapped back to times.
    """
    sde = require_linear(sde, "time_grid='karras'")
    sig_max, sig_min = (-0.5 * sde.log_snr(torch.tensor([sde.T, eps], dtype=torch.float64))).exp()
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    sigma = (sig_max ** (1 / rho) + u * (sig_min ** (1 / rho) - sig_max ** (1 / rho))) ** rho
    return _pinned(sde, sde.time_of_log_snr(-2 * sigma.log(), eps), eps)


GRIDS: dict[str, GridFn] = {"uniform": uniform, "quadratic": quadratic, "log_snr": log_snr, "karras": karras}


def make_grid(sde: SDE, steps: int, eps: float, grid: str | GridFn | Sequence[float] | Tensor = "uniform",
              device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """Resolve ``grid`` (a name in :data:`GRIDS`, a callable ``(sde, steps, eps)`` or explicit times) to a
    strictly decreasing tensor of ``steps + 1`` times from ``T`` to ``eps``, on ``device`` in ``dtype``.

    Explicit times set the number of steps themselves (``len(grid) - 1``, whatever ``steps`` says); a callable
    must return exactly ``steps + 1`` times from ``T`` to ``eps`` (up to a relative ``1e-6``), else the samples
    would silently come from another number of steps or another final time."""
    if isinstance(grid, str):
        if grid not in GRIDS:
            raise ValueError(f"unknown time_grid {grid!r}; known grids: {', '.join(GRIDS)}")
        ts = GRIDS[grid](sde, steps, eps)
    elif callable(grid):
        times = grid(sde, steps, eps)
        try:
            ts = torch.as_tensor(times, dtype=torch.float64).cpu()
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"time_grid: the callable must return a sequence or tensor of times, which "
                            f"torch.as_tensor could not read: {err}") from err
        if ts.shape != (steps + 1,):
            raise ValueError(f"time_grid: the callable returned {ts.numel()} times (shape {tuple(ts.shape)}) for "
                             f"steps={steps}; it must return steps + 1 = {steps + 1} times from T to eps")
        if bool(torch.isfinite(ts).all()) and not (math.isclose(float(ts[0]), sde.T, rel_tol=1e-6)
                                                    and math.isclose(float(ts[-1]), eps, rel_tol=1e-6)):
            raise ValueError(f"time_grid: the callable's times must run from T={sde.T:g} to eps={eps:g}, got "
                             f"{float(ts[0]):g} to {float(ts[-1]):g}")
    else:
        try:
            ts = torch.as_tensor(grid, dtype=torch.float64).cpu()
        except (TypeError, ValueError, RuntimeError):
            ts = None
        if ts is None or ts.dim() == 0:
            raise TypeError(f"time_grid must be a grid name ({', '.join(GRIDS)}), a callable (sde, steps, eps) or a "
                            f"sequence of times, got {grid!r}")
    if not bool(torch.isfinite(ts).all()):
        raise ValueError("time_grid holds NaN or infinite times")
    if ts.dim() != 1 or len(ts) < 2:
        raise ValueError(f"time_grid must give a 1-d sequence of at least 2 times, got shape {tuple(ts.shape)}")
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError("time_grid must be strictly decreasing (from T towards eps)")
    if float(ts[0]) > sde.T or float(ts[-1]) <= 0:
        raise ValueError(f"time_grid must lie in (0, T={sde.T}], got [{float(ts[-1])}, {float(ts[0])}]")
    return ts.to(device=device, dtype=dtype or torch.get_default_dtype())
