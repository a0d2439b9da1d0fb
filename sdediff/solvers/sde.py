r"""Stochastic samplers of the reverse SDE: Euler–Maruyama, reverse diffusion, ancestral.

Each takes one score evaluation per step, at the start of the step. Times run backwards, so the
step :math:`h = t_{next} - t` is negative.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._utils import expand_as, randn_like
from ..sdes.linear import LinearSDE, require_linear
from .base import Context, FixedStepSolver, register_solver
from .exponential import _work_dtype
from .ode import linear_flow


def _check_noise_scale(noise_scale: float) -> float:
    if isinstance(noise_scale, bool) or not isinstance(noise_scale, (int, float)) \
            or not math.isfinite(noise_scale) or noise_scale < 0:
        raise ValueError(f"noise_scale must be a finite float >= 0, got {noise_scale!r}")
    return float(noise_scale)


@register_solver("euler_maruyama")
class EulerMaruyama(FixedStepSolver):
    r"""Euler–Maruyama on the reverse process with noise scale :math:`\lambda`.

    .. math::  x \leftarrow x + [f(x,t) - \tfrac12(1+\lambda^2) g(t)^2 s_\theta(x,t)]\,h
               + \lambda g(t)\sqrt{|h|}\,z, \qquad h = t_{next} - t < 0.

    ``noise_scale=1`` (default) is the reverse SDE; ``0`` gives Euler on the probability flow.
    """

    stochastic = True

    def __init__(self, noise_scale: float = 1.0) -> None:
        self.noise_scale = _check_noise_scale(noise_scale)

    def start(self, ctx: Context, x: Tensor, ts: Tensor) -> None:
        flow = linear_flow(ctx.sde, ts)
        if flow is not None:  # precompute x <- A x + B s + C z
            h, a, b = flow[0], flow[1][:-1], flow[2][:-1]
            lam2 = self.noise_scale**2
            flow = tuple(c.to(x) for c in (1 + h * a, (1 + lam2) * h * b, (2 * lam2 * h * b).sqrt()))
        ctx.state["euler_maruyama"] = flow

    def step(self, ctx: Context, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        tb = t.expand(x.shape[0])
        coef = ctx.state.get("euler_maruyama")
        if coef is not None:
            i = ctx.index
            score = ctx.score(x, tb)
            x = torch.mul(x, coef[0][i], out=ctx.buffer(x, inplace=True)).addcmul_(coef[1][i], score)
            return x if self.noise_scale == 0 else x.addcmul_(coef[2][i], ctx.noise(x))
        h = t_next - t
        g = ctx.sde.diffusion(tb)
        score = ctx.score(x, tb)
        drift = torch.addcmul(ctx.sde.drift(x, tb), expand_as(-0.5 * (1 + self.noise_scale**2) * g**2, x), score)
        x = torch.addcmul(x, h, drift)
        if self.noise_scale == 0:
            return x
        return torch.addcmul(x, expand_as(self.noise_scale * g * (-h).sqrt(), x), randn_like(x, ctx.generator))


@register_solver("reverse_diffusion")
class ReverseDiffusion(FixedStepSolver):
    r"""Reverse-diffusion predictor: reverse the forward SDE's own discrete step.

    With the forward step :math:`x_t = x_{t_{next}} + f_i + G_i z` from :meth:`SDE.discretize`
    (exact for linear SDEs: DDPM's for VP, SMLD's for VE),

    .. math::  x \leftarrow x - f_i + G_i^2\,s_\theta(x, t) + G_i z.
    """

    stochastic = True

    def start(self, ctx: Context, x: Tensor, ts: Tensor) -> None:
        coef = None
        if isinstance(ctx.sde, LinearSDE):  # f_i = (r_i - 1) x is linear in x: precompute x <- (2 - r) x + G^2 s + G z
            t = ts.to(_work_dtype(ts.device))
            f, G = ctx.sde.discretize(torch.ones_like(t)[:-1, None], t[:-1], t[:-1] - t[1:])
            coef = tuple(c.to(x) for c in (1 - f[:, 0], G**2, G))
        ctx.state["reverse_diffusion"] = coef

    def step(self, ctx: Context, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        tb = t.expand(x.shape[0])
        coef = ctx.state.get("reverse_diffusion")
        if coef is not None:
            i = ctx.index
            score = ctx.score(x, tb)
            x = torch.mul(x, coef[0][i], out=ctx.buffer(x, inplace=True)).addcmul_(coef[1][i], score)
            return x.addcmul_(coef[2][i], ctx.noise(x))
        f, G = ctx.sde.discretize(x, tb, (t - t_next).expand(x.shape[0]))
        G = expand_as(G, x)
        return x - f + G**2 * ctx.score(x, tb) + G * randn_like(x, ctx.generator)


@register_solver("ancestral")
class Ancestral(FixedStepSolver):
    r"""Ancestral sampling: draw from the Gaussian posterior :math:`q(x_{t_{next}} | x_t, \hat x_0)`.

    With the exact transition :math:`x_t = r\,x_{t_{next}} + \sigma z` (:meth:`LinearSDE.transition`)
    and :math:`\hat x_0` from Tweedie's formula, the posterior mean simplifies to

    .. math::  x \leftarrow \frac{x + \sigma^2 s_\theta(x, t)}{r} + \tilde\sigma\,z, \qquad
               \tilde\sigma^2 = \begin{cases} \sigma^2\,s(t_{next})^2 / s(t)^2 & \text{variance="posterior"} \\
                                               \sigma^2 & \text{variance="beta"} \end{cases}

    DDPM's step :math:`x_{t-1} = (x_t + \beta_t s_\theta)/\sqrt{1-\beta_t} + \sigma_t z` for VP
    (:math:`\sigma^2 = \beta_t = 1 - r^2`), with DDPM's two choices of :math:`\sigma_t^2`: the posterior
    variance :math:`\tilde\beta_t = \beta_t(1-\bar\alpha_{t-1})/(1-\bar\alpha_t)` (that of
    :math:`q(x_{t-1} | x_t, x_0)` itself) or the transition variance :math:`\beta_t` (a little more noise per
    step; both converge as the steps shrink). For VE it is SMLD's ancestral step. Needs a
    :class:`~sdediff.LinearSDE`; see also ``"ddpm"``, the same sampler with ``variance="beta"``.

    Parameters
    ----------
    variance : {"posterior", "beta"}
        The noise variance :math:`\tilde\sigma^2` above (default ``"posterior"``).
    """

    stochastic = True
    VARIANCES = ("posterior", "beta")

    def __init__(self, variance: str = "posterior") -> None:
        if variance not in self.VARIANCES:
            raise ValueError(f"variance must be one of {', '.join(map(repr, self.VARIANCES))}, got {variance!r}")
        self.variance = variance

    def start(self, ctx: Context, x: Tensor, ts: Tensor) -> None:
        sde = require_linear(ctx.sde, f"solver {self.name!r}")
        t = ts.to(_work_dtype(ts.device))
        r, sigma = sde.transition(t[:-1], t[:-1] - t[1:])
        noise = sigma * (sde.marginal_std(t[1:]) / sde.marginal_std(t[:-1])) if self.variance == "posterior" else sigma
        ctx.state["ancestral"] = tuple(c.to(x) for c in (1 / r, sigma**2 / r, noise))  # x <- A x + B s + C z

    def step(self, ctx: Context, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        (a, b, c), i = ctx.state["ancestral"], ctx.index
        score = ctx.score(x, t.expand(x.shape[0]))
        x = torch.mul(x, a[i], out=ctx.buffer(x, inplace=True)).addcmul_(b[i], score)
        return x.addcmul_(c[i], ctx.noise(x))
