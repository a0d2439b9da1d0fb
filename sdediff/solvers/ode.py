r"""Solvers of the probability-flow ODE :math:`dx/dt = v(x,t) = f(x,t) - \tfrac12 g(t)^2 s_\theta(x,t)`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torchdiffeq
from torch import Tensor
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.solvers import AdaptiveStepsizeODESolver
from tqdm.auto import tqdm

from .._utils import all_finite, batch_time, expand_as
from ..sdes.base import SDE
from ..sdes.linear import LinearSDE
from .base import Callback, Context, FixedStepSolver, Solver, register_solver
from .exponential import _work_dtype

_ODE_METHODS = {k: v for k, v in SOLVERS.items() if k != "scipy_solver"}


def pf_drift(ctx: Context, x: Tensor, t: Tensor) -> Tensor:
    r"""The probability-flow velocity :math:`v(x,t) = f(x,t) - \tfrac12 g(t)^2 s_\theta(x,t)`."""
    t = batch_time(t, x)
    return ctx.sde.drift(x, t) - expand_as(0.5 * ctx.sde.diffusion(t) ** 2, x) * ctx.score(x, t)


def batch_max_norm(state: Tensor | tuple[Tensor, ...]) -> Tensor:
    """Error norm for torchdiffeq: the RMS over each sample's own elements, then the max over the batch.

    torchdiffeq's default is the RMS over the whole state, which lets a few hard samples of a large
    batch carry errors far above the tolerance. With this norm every sample meets ``rtol``/``atol``.
    A tuple state (the likelihood's ``(x, log-det)``) takes the max over its tensors.
    """
    tensors = state if isinstance(state, tuple) else (state,)
    return torch.stack([t.reshape(t.shape[0], -1).pow(2).mean(1).sqrt().max() for t in tensors]).max()


def odeint_options(method: str, options: dict[str, Any] | None, t_start: Tensor, t_end: Tensor) -> dict[str, Any] | None:
    """torchdiffeq options: per-sample error control, and steps kept inside ``[t_start, t_end]``.

    The error norm is :func:`batch_max_norm`. torchdiffeq also guesses the first step from the drift
    at the start, and steps past the last output time before interpolating back; where the flow is
    nearly still (the prior end of a diffusion) the guess can be huge, and past ``eps`` or ``T`` the
    schedule may be undefined (VP's :math:`\beta(t)` turns negative below 0). So the first step
    defaults to 1% of the span and ``t_end`` is a forced step point (``step_t``) that no step crosses.
    """
    options = dict(options or {})
    if issubclass(_ODE_METHODS[method], AdaptiveStepsizeODESolver):
        options.setdefault("norm", batch_max_norm)
        options.setdefault("first_step", 0.01 * abs(float(t_end - t_start)))
        options.setdefault("step_t", t_end.reshape(1))
    return options or None


def linear_flow(sde: SDE, ts: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    r"""For a linear SDE, the probability-flow velocity on the grid ``ts`` as :math:`v(x, t_i) = a_i x + b_i s_\theta(x, t_i)`.

    Returns ``(h, a, b)`` in float64 (where the device has it): the steps :math:`h_i = t_{i+1} - t_i` and, at
    every grid time, :math:`a = f(1, t)` (the drift is linear in ``x``) and :math:`b = -\tfrac12 g(t)^2`;
    ``None`` for an SDE that is not a :class:`~sdediff.LinearSDE`. Solvers use it to precompute their
    per-step coefficients once, in ``start``.
    """
    if not isinstance(sde, LinearSDE):
        return None
    t = ts.to(_work_dtype(ts.device))
    return t.diff(), sde.drift(torch.ones_like(t)[:, None], t)[:, 0], -0.5 * sde.diffusion(t) ** 2


@register_solver("euler")
class Euler(FixedStepSolver):
    r"""Euler's method on the probability flow: :math:`x \leftarrow x + h\,v(x, t)` (order 1, 1 NFE/step).

    For a linear SDE (:math:`v = a\,x + b\,s_\theta`) the step is taken as
    :math:`x \leftarrow (1 + h a)\,x + h b\,s_\theta(x, t)`, with the coefficients precomputed per grid step.
    """

    def start(self, ctx: Context, x: Tensor, ts: Tensor) -> None:
        flow = linear_flow(ctx.sde, ts)
        if flow is not None:
            h, a, b = flow
            flow = ((1 + h * a[:-1]).to(x).unbind(), (h * b[:-1]).to(x).unbind())  # per step: index a tuple
        ctx.state["euler"] = flow

    def step(self, ctx: Context, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        coef = ctx.state.get("euler")
        if coef is None:
            return torch.addcmul(x, t_next - t, pf_drift(ctx, x, t))
        i = ctx.index
        score = ctx.score(x, t.expand(x.shape[0]))
        return torch.mul(x, coef[0][i], out=ctx.buffer(x, inplace=True)).addcmul_(coef[1][i], score)


@register_solver("heun")
class Heun(FixedStepSolver):
    r"""Heun's method (explicit trapezoid) on the probability flow, order 2, 2 NFE per step.

    .. math::  \tilde x = x + h\,v(x,t), \qquad x \leftarrow x + \tfrac h2\,[v(x,t) + v(\tilde x, t+h)].

    For a linear SDE (:math:`v = a\,x + b\,s_\theta`), with :math:`h\,v(x, t) = \tilde x - x`, the step is
    taken as :math:`\tilde x = (1 + h a_t)\,x + h b_t\,s_\theta(x, t)`,
    :math:`x \leftarrow \tfrac12 x + \tfrac12(1 + h a_{t+h})\,\tilde x + \tfrac h2 b_{t+h}\,s_\theta(\tilde x, t+h)`,
    with the coefficients precomputed per grid step.
    """

    def start(self, ctx: Context, x: Tensor, ts: Tensor) -> None:
        flow = linear_flow(ctx.sde, ts)
        if flow is not None:
            h, a, b = flow
            flow = tuple(c.to(x).unbind() for c in (1 + h * a[:-1], h * b[:-1], 0.5 * (1 + h * a[1:]), 0.5 * h * b[1:]))
            ctx.state["heun_x"] = torch.empty_like(x)  # the Euler predictor, reused every step
        ctx.state["heun"] = flow

    def step(self, ctx: Context, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        coef = ctx.state.get("heun")
        if coef is None:
            h = t_next - t
            d = pf_drift(ctx, x, t)
            d_next = pf_drift(ctx, torch.addcmul(x, h, d), t_next)
            return torch.addcmul(x, 0.5 * h, d + d_next)
        i, n = ctx.index, x.shape[0]
        x_euler = torch.mul(x, coef[0][i], out=ctx.state["heun_x"]).addcmul_(coef[1][i], ctx.score(x, t.expand(n)))
        score = ctx.score(x_euler, t_next.expand(n))
        return torch.mul(x, 0.5, out=ctx.buffer(x, inplace=True)).addcmul_(coef[2][i], x_euler).addcmul_(coef[3][i], score)


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
        for name, tol in (("rtol", rtol), ("atol", atol)):
            if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol <= 0:
                raise ValueError(f"{name} must be a positive float, got {tol!r}")
        known = sorted(_ODE_METHODS)
        if method not in known:
            raise ValueError(f"unknown ODE method {method!r}; torchdiffeq knows: {', '.join(known)}")
        self.rtol, self.atol, self.method = float(rtol), float(atol), method
        self.options = dict(options or {})

    def solve(self, ctx: Context, x: Tensor, ts: Tensor, *, callback: Callback | None = None,
              progress: bool = False, keep_trajectory: bool = False) -> tuple[Tensor, Tensor | None]:
        # adaptive methods only need the end points; fixed-grid ones step on the sampler's grid
        adaptive = issubclass(_ODE_METHODS[self.method], AdaptiveStepsizeODESolver)
        times = ts if (keep_trajectory or callback is not None or not adaptive) else ts[[0, -1]]
        out = odeint(lambda t, y: pf_drift(ctx, y, t), x, times, rtol=self.rtol, atol=self.atol, method=self.method,
                     options=self.options, progress=progress, what=f"solver 'ode' ({self.method})")
        if callback is not None:
            for i in range(1, len(times)):
                callback(i - 1, times[i], out[i])
        return out[-1], (out if keep_trajectory else None)


State = Tensor | tuple[Tensor, ...]


def odeint(field: Callable[[Tensor, State], State], state: State, times: Tensor, *, rtol: float, atol: float,
           method: str, options: dict[str, Any] | None = None, progress: bool = False,
           what: str = "ODE solve") -> State:
    """``torchdiffeq.odeint`` with sdediff's defaults (:func:`odeint_options`), a progress bar over ``t``,
    and clear errors: a step-size underflow or a non-finite result raises :class:`FloatingPointError`
    naming the time reached."""
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
        if "underflow in dt" not in str(err):
            raise
        raise FloatingPointError(f"{what}: the step size underflowed near t = {float(last_t[0]):.6g}; the drift is "
                                 "non-finite or too stiff there (check the score function and eps)") from err
    finally:
        bar.close()
    final = out if isinstance(out, tuple) else (out,)
    if not all(all_finite(o[-1]) for o in final):
        raise FloatingPointError(f"{what} produced non-finite values; check the score function and eps")
    return out
