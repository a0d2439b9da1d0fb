r"""Solvers of the probability-flow ODE :math:`dx/dt = v(x,t) = f(x,t) - \tfrac12 g(t)^2 s_\theta(x,t)`.

``euler`` and ``heun`` are written as their step maths on ``process.drift`` (any SDE); for a linear SDE,
where :math:`v = a(t)\,x + b(t)\,s_\theta`, the same steps are also given as coefficient tables
(:mod:`sdediff.solvers.tables`), which the loop runs instead. ``ode`` hands the flow to torchdiffeq.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torchdiffeq
from torch import Tensor
from tqdm.auto import tqdm

from .._utils import all_finite
from .._validate import check_float
from ..processes import ReverseProcess, linear_drift_coef, score_weight
from ..sdes.linear import LinearSDE
from .base import Callback, FixedStepSolver, Solution, Solver, register_solver
from .tables import LinearScheme, rows_from_stages, work_dtype

#: torchdiffeq's methods (its public ``method=`` names), and whether each chooses its own steps
ODE_METHODS: dict[str, bool] = {
    "dopri8": True, "dopri5": True, "bosh3": True, "fehlberg2": True, "adaptive_heun": True,
    "euler": False, "midpoint": False, "heun2": False, "heun3": False, "rk4": False,
    "explicit_adams": False, "implicit_adams": False, "fixed_adams": False,
}


def linear_flow(sde: LinearSDE, ts: Tensor, noise_scale: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    r"""The reverse drift on the grid ``ts`` as :math:`a_i x + b_i s_\theta(x, t_i)`: ``(h, a, b)`` in float64
    (where the device has it), with the steps :math:`h_i = t_{i+1} - t_i`, :math:`a = f(1, t)` and
    :math:`b = -\tfrac12(1+\lambda^2)g(t)^2` at every grid time."""
    t = ts.to(work_dtype(ts.device))
    return t.diff(), linear_drift_coef(sde, t), score_weight(sde, t, noise_scale)


@register_solver("euler")
class Euler(FixedStepSolver):
    r"""Euler's method on the probability flow: :math:`x \leftarrow x + h\,v(x, t)` (order 1, 1 NFE/step)."""

    def step(self, process: ReverseProcess, state: None, x: Tensor, t: Tensor, t_next: Tensor) -> tuple[Tensor, None]:
        return x + (t_next - t) * process.drift(x, t), state

    def coefficients(self, sde: LinearSDE, ts: Tensor) -> LinearScheme:
        r""":math:`x \leftarrow (1 + h a_t)\,x + h b_t\,s_\theta(x, t)`."""
        h, a, b = linear_flow(sde, ts)
        return LinearScheme.one_step(ts, 1 + h * a[:-1], h * b[:-1])


@register_solver("heun")
class Heun(FixedStepSolver):
    r"""Heun's method (explicit trapezoid) on the probability flow, order 2, 2 NFE per step.

    .. math::  \tilde x = x + h\,v(x,t), \qquad x \leftarrow x + \tfrac h2\,[v(x,t) + v(\tilde x, t+h)].
    """

    def step(self, process: ReverseProcess, state: None, x: Tensor, t: Tensor, t_next: Tensor) -> tuple[Tensor, None]:
        h = t_next - t
        d = process.drift(x, t)
        x_euler = x + h * d
        return x + 0.5 * h * (d + process.drift(x_euler, t_next)), state

    def coefficients(self, sde: LinearSDE, ts: Tensor) -> LinearScheme | None:
        r"""The step with :math:`v = a x + b s_\theta` multiplied out, stages relative to :math:`x_i`:
        :math:`\tilde x = (1 + h a_0) x + h b_0 s_0` and
        :math:`x_{i+1} = [1 + \tfrac h2 a_0 + \tfrac h2 a_1(1 + h a_0)]\,x + \tfrac h2 b_0(1 + h a_1)\,s_0 + \tfrac h2 b_1 s_1`.
        ``None`` (the step above) where :math:`1 + h a_0` is near 0."""
        h, a, b = linear_flow(sde, ts)
        a0, a1, b0, b1 = a[:-1], a[1:], b[:-1], b[1:]
        alpha = torch.stack([torch.ones_like(h), 1 + h * a0, 1 + 0.5 * h * a0 + 0.5 * h * a1 * (1 + h * a0)], dim=1)
        if bool((alpha[:, 1].abs() < 1e-3).any()):
            return None
        beta = h.new_zeros((len(h), 3, 2))
        beta[:, 1, 0], beta[:, 2, 0], beta[:, 2, 1] = h * b0, 0.5 * h * b0 * (1 + h * a1), 0.5 * h * b1
        zero, one = torch.zeros_like(alpha[:, :2]), torch.ones_like(alpha[:, :2])
        return rows_from_stages(torch.stack([ts[:-1], ts[1:]], dim=1).to(h), alpha, beta, zero, one)


@register_solver("ode")
class AdaptiveODE(Solver):
    """Adaptive-step integration of the probability flow with torchdiffeq.

    Parameters
    ----------
    rtol, atol : float
        Relative and absolute tolerances of the embedded error estimate (``> 0``).
    method : str
        Any torchdiffeq method; adaptive ones (``"dopri5"``, ``"dopri8"``, ``"bosh3"``,
        ``"adaptive_heun"``) choose their own steps, fixed-grid ones (``"rk4"``, ``"midpoint"``, ...)
        step on the sampler's time grid.
    options : dict, optional
        Passed to ``torchdiffeq.odeint`` (e.g. ``{"max_num_steps": 10_000}``).

    Notes
    -----
    The batch shares one step size, but the error is controlled per sample (see
    :func:`batch_max_norm`): every sample meets the tolerance, not just the batch on average. The
    step-size decisions sync with the host, as any adaptive solver's must.
    """

    def __init__(self, rtol: float = 1e-5, atol: float = 1e-5, method: str = "dopri5",
                 options: dict[str, Any] | None = None) -> None:
        self.rtol = check_float("rtol", rtol, 0.0, low_open=True)
        self.atol = check_float("atol", atol, 0.0, low_open=True)
        if not isinstance(method, str) or method not in ODE_METHODS:
            raise ValueError(f"unknown ODE method {method!r}; torchdiffeq knows: {', '.join(sorted(ODE_METHODS))}")
        self.method = method
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"options must be a dict of torchdiffeq options or None, got {type(options).__name__}")
        self.options = dict(options or {})

    def solve(self, process: ReverseProcess, x: Tensor, ts: Tensor, *, callback: Callback | None = None,
              progress: bool = False, keep_trajectory: bool = False) -> Solution:
        # adaptive methods only need the end points; fixed-grid ones step on the sampler's grid
        adaptive = ODE_METHODS[self.method]
        times = ts if (keep_trajectory or callback is not None or not adaptive) else ts[[0, -1]]
        out = odeint(process, x, times, rtol=self.rtol, atol=self.atol, method=self.method, options=self.options,
                     progress=progress, what=f"solver 'ode' ({self.method})")
        if callback is not None:
            for i in range(1, len(times)):
                callback(i - 1, times[i], out[i])
        return Solution(out[-1], out if keep_trajectory else None)


def batch_max_norm(state: Tensor | tuple[Tensor, ...]) -> Tensor:
    """Error norm for torchdiffeq: the RMS over each sample's own elements, then the max over the batch.

    torchdiffeq's default is the RMS over the whole state, which lets a few hard samples of a large
    batch carry errors far above the tolerance. With this norm every sample meets ``rtol``/``atol``.
    A tuple state (the likelihood's ``(x, log-det)``) takes the max over its tensors.
    """
    tensors = state if isinstance(state, tuple) else (state,)
    return torch.stack([t.reshape(t.shape[0], -1).pow(2).mean(1).sqrt().max() for t in tensors]).max()


def odeint_options(method: str, options: dict[str, Any] | None, t_start: Tensor, t_end: Tensor) -> dict[str, Any] | None:
    r"""torchdiffeq options: per-sample error control, and steps kept inside ``[t_start, t_end]``.

    The error norm is :func:`batch_max_norm`. torchdiffeq also guesses the first step from the drift
    at the start, and steps past the last output time before interpolating back; where the flow is
    nearly still (the prior end of a diffusion) the guess can be huge, and past ``eps`` or ``T`` the
    schedule may be undefined (VP's :math:`\beta(t)` turns negative below 0). So the first step
    defaults to 1% of the span and ``t_end`` is a forced step point (``step_t``) that no step crosses.
    """
    options = dict(options or {})
    if ODE_METHODS[method]:
        options.setdefault("norm", batch_max_norm)
        options.setdefault("first_step", 0.01 * abs(float(t_end - t_start)))
        options.setdefault("step_t", t_end.reshape(1))
    return options or None


State = Tensor | tuple[Tensor, ...]


def odeint(field: Callable[[Tensor, State], State], state: State, times: Tensor, *, rtol: float, atol: float,
           method: str, options: dict[str, Any] | None = None, progress: bool = False,
           what: str = "ODE solve") -> State:
    """``torchdiffeq.odeint`` with sdediff's defaults (:func:`odeint_options`), a progress bar over ``t``,
    and clear errors: a step-size underflow or a non-finite result raises :class:`FloatingPointError`
    naming the time reached, and running out of ``options["max_num_steps"]`` a :class:`RuntimeError` naming
    the option and the time reached (torchdiffeq raises an ``AssertionError`` for both)."""
    bar = tqdm(total=abs(float(times[-1] - times[0])), desc=what, disable=not progress, leave=False)
    last_t = [times[0]]

    def tracked(t: Tensor, y: State) -> State:
        last_t[0] = t
        if progress:
            bar.n = abs(float(t - times[0]))
            bar.refresh()
        return field(t, y)

    try:
        out = torchdiffeq.odeint(tracked, state, times, rtol=rtol, atol=atol, method=method,
                                 options=odeint_options(method, options, times[0], times[-1]))
    except AssertionError as err:
        if "max_num_steps exceeded" in str(err):
            limit = (options or {}).get("max_num_steps")
            raise RuntimeError(f"{what} did not reach t = {float(times[-1]):.6g} within max_num_steps={limit} steps "
                               f"(the furthest it got is t = {float(last_t[0]):.6g}); raise options['max_num_steps'] "
                               "or loosen rtol/atol") from None
        if "underflow in dt" not in str(err):
            raise
        raise FloatingPointError(f"{what}: the step size underflowed near t = {float(last_t[0]):.6g}; the drift is "
                                 "non-finite or too stiff there (check the score function and eps)") from None
    finally:
        bar.close()
    final = out if isinstance(out, tuple) else (out,)
    if not all(all_finite(o[-1]) for o in final):
        raise FloatingPointError(f"{what} produced non-finite values; check the score function and eps")
    return out
