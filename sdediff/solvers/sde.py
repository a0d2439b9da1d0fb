r"""Stochastic samplers of the reverse SDE: Euler–Maruyama, reverse diffusion, ancestral.

Each takes one score evaluation per step, at the start of the step. Times run backwards, so the
step :math:`h = t_{next} - t` is negative.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._utils import expand_as
from .._validate import check_choice, check_float
from ..processes import ReverseProcess
from ..sdes.linear import LinearSDE
from .base import FixedStepSolver, register_solver
from .ode import linear_flow
from .tables import LinearScheme, work_dtype


@register_solver("euler_maruyama")
class EulerMaruyama(FixedStepSolver):
    r"""Euler–Maruyama on the reverse process with noise scale :math:`\lambda`.

    .. math::  x \leftarrow x + [f(x,t) - \tfrac12(1+\lambda^2) g(t)^2 s_\theta(x,t)]\,h
               + \lambda g(t)\sqrt{|h|}\,z, \qquad h = t_{next} - t < 0.

    ``noise_scale=1`` (default) is the reverse SDE; ``0`` gives Euler on the probability flow.
    """

    stochastic = True

    def __init__(self, noise_scale: float = 1.0) -> None:
        self.noise_scale = check_float("noise_scale", noise_scale, 0.0)

    def step(self, process: ReverseProcess, state: None, x: Tensor, t: Tensor, t_next: Tensor) -> tuple[Tensor, None]:
        h = t_next - t
        x_next = x + h * process.drift(x, t)
        if self.noise_scale == 0:
            return x_next, state
        g = expand_as(process.diffusion(t.expand(x.shape[0])), x)
        return x_next + g * (-h).sqrt() * process.noise(x), state

    def coefficients(self, sde: LinearSDE, ts: Tensor) -> LinearScheme:
        r""":math:`x \leftarrow (1 + h a_t)\,x + h b_t\,s_\theta(x, t) + \lambda g(t)\sqrt{|h|}\,z` with
        :math:`b = -\tfrac12(1+\lambda^2)g^2`."""
        h, a, b = linear_flow(sde, ts, self.noise_scale)
        g = sde.diffusion(ts[:-1].to(h))
        noise = None if self.noise_scale == 0 else self.noise_scale * g * (-h).sqrt()
        return LinearScheme.one_step(ts, 1 + h * a[:-1], h * b[:-1], noise)


@register_solver("reverse_diffusion")
class ReverseDiffusion(FixedStepSolver):
    r"""Reverse-diffusion predictor: reverse the forward SDE's own discrete step.

    With the forward step :math:`x_t = x_{t_{next}} + f_i + G_i z` from :meth:`SDE.discretize`
    (exact for linear SDEs: DDPM's for VP, SMLD's for VE),

    .. math::  x \leftarrow x - f_i + G_i^2\,s_\theta(x, t) + G_i z.
    """

    stochastic = True

    def step(self, process: ReverseProcess, state: None, x: Tensor, t: Tensor, t_next: Tensor) -> tuple[Tensor, None]:
        tb = t.expand(x.shape[0])
        f, g = process.sde.discretize(x, tb, (t - t_next).expand(x.shape[0]))
        g = expand_as(g, x)
        return x - f + g**2 * process.score(x, tb) + g * process.noise(x), state

    def coefficients(self, sde: LinearSDE, ts: Tensor) -> LinearScheme:
        r"""For a linear SDE :math:`f_i = (r_i - 1)\,x` is linear in ``x``:
        :math:`x \leftarrow (1 - f_i(1))\,x + G_i^2 s_\theta + G_i z`."""
        t = ts.to(work_dtype(ts.device))
        f, g = sde.discretize(torch.ones_like(t)[:-1, None], t[:-1], t[:-1] - t[1:])
        return LinearScheme.one_step(t, 1 - f[:, 0], g**2, g)


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
        self.variance = check_choice("variance", variance, self.VARIANCES)

    def coefficients(self, sde: LinearSDE, ts: Tensor) -> LinearScheme:
        t = ts.to(work_dtype(ts.device))
        r, sigma = sde.transition(t[:-1], t[:-1] - t[1:])
        noise = sigma * (sde.marginal_std(t[1:]) / sde.marginal_std(t[:-1])) if self.variance == "posterior" else sigma
        return LinearScheme.one_step(t, 1 / r, sigma**2 / r, noise)
