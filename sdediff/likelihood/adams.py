r"""The likelihood's default integrator: variable-step Adams predictor–corrector, every point with its own steps.

Each point :math:`i` carries its own time :math:`\tau_i`, step :math:`h_i` and the values of the flow at its last
nodes, and runs in the per-sample loop of :mod:`sdediff.solvers.per_sample` (points that have finished leave it,
and the score is evaluated only on the others). One step from :math:`\tau_n` to :math:`\tau_{n+1} = \tau_n + h` costs
one score evaluation (PEC: predict, evaluate, correct):

.. math::  z^P = z_n + \sum_{j=0}^{k-1} \beta_j f_{n-j}, \qquad
           F = f(z^P, \tau_{n+1}),\ H = h(z^P, \tau_{n+1}),\ \nabla\log p, \qquad
           z_{n+1} = z_n + \gamma_0 F + \sum_{j=0}^{k-1} \gamma_{j+1} f_{n-j},

with :math:`\beta, \gamma` the integrals over :math:`[\tau_n, \tau_{n+1}]` of the Lagrange polynomials through the
:math:`k` last nodes (order :math:`k`) and through those and the new one (order :math:`k+1`,
:func:`~sdediff.likelihood.quadrature.lagrange_integrals`); :math:`F` becomes :math:`f_{n+1}`. The order grows from 1
at the start to ``order`` as nodes accumulate. The divergence is not fed back into the state, so it is integrated by
its own rule, the polynomial through the new node and the ``quadrature_order - 1`` last ones:
:math:`\ell_{n+1} = \ell_n + \sum_j w_j H_{n+1-j}`.

**Error control in nats.** A local error :math:`\delta` of the state changes the final log-density by
:math:`\nabla\log p\cdot\delta` (the rest of the solve computes the log-density of the perturbed point), and an
error of the quadrature adds to it directly. Both are estimated from the next divided difference
(:math:`\int_{\tau_n}^{\tau_{n+1}} (y - p) \approx y[\text{nodes}, \tau_*] \int\omega`), the quadrature's as the
larger of two neighbouring ones and never below a tenth of its predictor–corrector difference, so that a divided
difference that happens to vanish does not let the step grow unchecked:

.. math::  E_n = |\nabla\log p\cdot\hat\delta_z| + |\hat\delta_\ell| \le \mathrm{tol}.

The step is accepted where :math:`E_n \le \mathrm{tol}` and scaled by :math:`\operatorname{clip}(0.8\,(\mathrm{tol}/E_n)^
{1/(q+1)}, 0.2, g)` with :math:`q` the current order; :math:`g = 10` while the order builds up and 2 after. With
``rtol``/``atol`` the state and :math:`\ell` must also meet the mixed tolerance
:math:`|\delta x| \le \mathrm{atol} + \mathrm{rtol}\,|x|` (root mean square over a point's elements).
:math:`\sum_n E_n` over the accepted steps is each point's integration-error estimate, in nats.

**Hutchinson's trace** draws fresh probes at every evaluation (``num_probes`` per point, their estimates
averaged). The quadrature weights do not depend on the probes, so :math:`\ell` stays unbiased, and the errors of
different nodes are independent: its variance is :math:`\sum_j W_j^2\,\mathrm{Var}(\bar H_j)` with :math:`W_j` the
total weight of node :math:`j`, much less than with one probe kept along the path, where the errors of all the
nodes add up coherently (about 10-20 times less on Gaussian mixtures and a trained network, see docs/likelihood.md).
With two probes or more, :math:`\mathrm{Var}(\bar H_j)` is estimated from their spread and the sum is each point's
probe variance. The noisy integrand carries no information on the quadrature's error, so the steps are then
controlled by the state's error alone (and ``rtol``/``atol``); the integration-error estimate is the state's part.

Each attempt checks the flow's values (one host synchronisation, beside the loop's own) and raises a
:class:`FloatingPointError` naming the point and the time where they are not finite. Probes are drawn for every
row of the chunk at each iteration (the active rows then use theirs), so a point's draws do not depend on how long
the other points take.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validate import check_float, check_int
from ..solvers.per_sample import Attempt, PerSampleAdaptiveSolver, Start, rms_norm
from .divergence import draw_probes
from .flows import Evaluation, NoiseLevelFlow, TimeFlow, ensure_finite
from .quadrature import divided_difference_weights, lagrange_integrals, node_polynomial_integral

__all__ = ["AdamsLikelihood", "AdamsCarry", "state_columns"]


class AdamsCarry(NamedTuple):
    """What a point carries from one step to the next (rows of the per-sample loop)."""

    tau: Tensor  #: ``(n, S)`` times of the last nodes, newest first
    f: Tensor  #: ``(n, order + 1, D)`` the state's derivative there
    h: Tensor  #: ``(n, S)`` the divergence integrand there (the mean over the probes)
    h_var: Tensor  #: ``(n, S)`` the variance of that mean due to the probes (zero for the exact trace)
    weight: Tensor  #: ``(n, S)`` the quadrature weight each node has collected so far
    count: Tensor  #: ``(n,)`` nodes so far (the start is one)
    index: Tensor  #: ``(n,)`` the point's row in the batch


def state_columns(dim: int) -> tuple[slice, int, int, int]:
    """Columns of the loop's flat state: the flow's state ``z`` (``dim``), the integral ``ell``, the
    integration-error estimate and the probes' variance of ``ell``."""
    return slice(0, dim), dim, dim + 1, dim + 2


class AdamsLikelihood(PerSampleAdaptiveSolver):
    """Variable-step, variable-order Adams PEC on the augmented flow with error control on the log-density (module
    docstring).

    Parameters
    ----------
    flow : NoiseLevelFlow or TimeFlow
        The flow and its coordinates.
    tol : float, optional
        Bound on each step's log-density error estimate, in nats.
    rtol, atol : float, optional
        Mixed tolerance on the state and on the integral as well.
    order : int
        Highest order of the state's corrector (its predictor has one less), 1 to 8.
    quadrature_order : int
        Order of the divergence quadrature, 2 to 9.
    first_step : float
        First step as a fraction of the time span.
    max_steps : int
        Most step attempts per point.
    num_probes : int
        Hutchinson probes per point and evaluation (0: the exact trace).
    noise : {"rademacher", "gaussian"}
        Their distribution.
    generator : torch.Generator, optional
        Their source.
    """

    name = "adams"
    safety = 0.8
    max_factor = 10.0  #: the growth bound while the order builds up; :attr:`growth` after
    growth = 2.0

    def __init__(self, flow: NoiseLevelFlow | TimeFlow, tol: float | None = 1e-4, rtol: float | None = None,
                 atol: float | None = None, order: int = 5, quadrature_order: int = 6, first_step: float = 1e-4,
                 max_steps: int = 10_000, num_probes: int = 0, noise: str = "rademacher",
                 generator: torch.Generator | None = None) -> None:
        super().__init__(max_steps=max_steps)
        self.flow = flow
        self.tol = check_float("tol", tol, 0.0, low_open=True, optional=True)
        self.rtol = check_float("rtol", rtol, 0.0, low_open=True, optional=True)
        self.atol = check_float("atol", atol, 0.0, low_open=True, optional=True)
        if (self.rtol is None) != (self.atol is None):
            raise ValueError("give rtol and atol together")
        if self.tol is None and self.rtol is None:
            raise ValueError("give tol, or rtol and atol")
        self.order = check_int("order", order, 1, 8)
        self.quadrature_order = check_int("quadrature_order", quadrature_order, 2, 9)
        self.first_fraction = check_float("first_step", first_step, 0.0, 1.0, low_open=True)
        self.num_probes = check_int("num_probes", num_probes, 0)
        self.noise, self.generator = noise, generator
        self.exponent = 1.0 / (self.order + 1)
        self.floor = (self.safety / self.growth) ** (self.order + 1)  # an error this small grows the step by `growth`
        self.slots = max(self.order + 1, self.quadrature_order + 1)
        self.calls = 0  # batched score evaluations
        self.rows = 0  # rows of the chunk being solved (probes are drawn for all of them)

    def evaluate(self, z: Tensor, tau: Tensor, index: Tensor, check: bool = False) -> tuple[Evaluation, Tensor, Tensor]:
        """The flow at ``(z, tau)`` for the points of rows ``index``: the evaluation and the mean of the divergence
        integrand over the probes with its variance, ``(n,)`` each. Raises :class:`FloatingPointError` naming the
        first point where the flow is not finite."""
        self.calls += 1
        probes = None
        if self.num_probes:
            shape = (self.rows, *self.flow.event_shape)
            probes = draw_probes(z.new_empty(shape), self.num_probes, self.noise, self.generator)[index]
        ev = self.flow.evaluate(z, tau, probes, check=check)
        ensure_finite(ev, self.flow.time(tau), index)
        k = ev.h.shape[1]
        h_var = ev.h.var(1) / k if k > 1 else torch.zeros_like(ev.h[:, 0])  # one probe: no spread to see
        return ev, ev.h.mean(1), h_var

    def begin(self, process: Any, x: Tensor, t: Tensor) -> Start:
        """One evaluation at the start; the carry holds it as the first node. Raises
        :class:`~sdediff.likelihood.flows.NotDifferentiableError` if the score's Jacobian is exactly zero at every
        point (a rounded, piecewise-constant score)."""
        n, d, S = x.shape[0], self.flow.dim, self.slots
        self.rows, self.end = n, self.flow.span(x)[1]
        index = torch.arange(n, device=x.device)
        ev, h, h_var = self.evaluate(x[:, :d], t, index, check=True)
        f = x.new_zeros(n, self.order + 1, d)
        f[:, 0] = ev.f
        carry = AdamsCarry(tau=t[:, None].repeat(1, S), f=f, h=F.pad(h[:, None], (0, S - 1)),
                           h_var=F.pad(h_var[:, None], (0, S - 1)), weight=x.new_zeros(n, S),
                           count=torch.ones(n, dtype=torch.long, device=x.device), index=index)
        return Start(carry=carry, nfe=1)

    def attempt(self, process: Any, workspace: Any, x: Tensor, t: Tensor, h: Tensor, t_next: Tensor,
                carry: AdamsCarry) -> Attempt:
        K, P, S = self.order, self.quadrature_order, self.slots
        zs, ells, errs, vars_ = state_columns(self.flow.dim)
        z, ell = x[:, zs], x[:, ells]
        slot = torch.arange(S, device=x.device)[None]
        history = slot < carry.count[:, None]  # (n, S): nodes that exist
        tau_all = torch.cat([t_next[:, None], carry.tau], 1)  # the new node, then the history
        yes = torch.ones_like(history[:, :1])

        def nodes(m: int, new: bool) -> Tensor:
            """Validity of the ``m`` newest history nodes that exist, after the new one if ``new``."""
            own = history & (slot < m)
            return torch.cat([yes, own], 1) if new else own

        order_now = carry.count.clamp(max=K)
        pred = history & (slot < order_now[:, None])
        corr = torch.cat([yes, pred], 1)
        beta = lagrange_integrals(carry.tau, pred, t, t_next)  # (n, S)
        gamma = lagrange_integrals(tau_all, corr, t, t_next)  # (n, S + 1)
        z_pred = z + torch.einsum("ns,nsd->nd", beta[:, :K + 1], carry.f)
        ev, h_new, var_new = self.evaluate(z_pred, t_next, carry.index)
        f_all = torch.cat([ev.f[:, None], carry.f], 1)  # (n, K + 2, D)
        z_corr = z + torch.einsum("ns,nsd->nd", gamma[:, :K + 2], f_all)
        h_all = torch.cat([h_new[:, None], carry.h], 1)  # (n, S + 1)
        var_all = torch.cat([var_new[:, None], carry.h_var], 1)

        # the state's error: divided difference over the corrector's nodes and one more, or the P-C difference
        full = carry.count >= K + 1
        dd = divided_difference_weights(tau_all[:, :K + 2], nodes(K + 1, True)[:, :K + 2])
        omega = node_polynomial_integral(tau_all, corr, t, t_next)
        dz = torch.where(full[:, None], torch.einsum("ns,nsd->nd", dd, f_all) * omega[:, None], z_corr - z_pred)
        est = (ev.grad * dz).sum(1).abs()

        # the divergence quadrature, its weights collected per node, and (exact trace) its error
        quad = nodes(P - 1, True)
        w = lagrange_integrals(tau_all, quad, t, t_next)
        ell_next = ell + (w * h_all).sum(1)
        weight_all = torch.cat([torch.zeros_like(w[:, :1]), carry.weight], 1) + w
        e_quad = torch.zeros_like(est)
        if not self.num_probes:
            pc = ((gamma - F.pad(beta, (1, 0))) * h_all).sum(1).abs()
            omega_q = node_polynomial_integral(tau_all, quad, t, t_next)
            dd_now = (divided_difference_weights(tau_all, nodes(P, True)) * h_all).sum(1)
            dd_prev = (divided_difference_weights(tau_all[:, 1:], nodes(P + 1, False)) * h_all[:, 1:]).sum(1)
            dd_prev = torch.where(carry.count >= P + 1, dd_prev, torch.zeros_like(dd_prev))
            e_quad = torch.where(carry.count >= P,
                                 torch.maximum(torch.maximum(dd_now.abs(), dd_prev.abs()) * omega_q.abs(), 0.1 * pc), pc)
            est = est + e_quad
        # the probes' variance of every node whose weight is now final: the oldest of the window, or all at the end
        final = t_next == self.end
        done = torch.where(final[:, None], quad, quad & (torch.arange(S + 1, device=x.device)[None] == P - 1))
        var_next = x[:, vars_] + torch.where(done, weight_all**2 * var_all, torch.zeros_like(var_all)).sum(1)

        error = est / self.tol if self.tol is not None else torch.zeros_like(est)
        if self.rtol is not None:
            scale = self.flow.x_scale(t_next)[:, None]
            e_x = rms_norm(dz * scale / (self.atol + self.rtol * torch.maximum((z * scale).abs(), (z_corr * scale).abs())))
            e_ell = e_quad / (self.atol + self.rtol * ell_next.abs())
            error = torch.maximum(error, torch.maximum(e_x, e_ell))
        # the controller's exponent is 1/(K+1): an error of order q+1 is raised to (K+1)/(q+1) (monotone, 1 stays 1)
        error = error ** ((K + 1) / (order_now + 1).to(error.dtype))
        error = torch.where(full, error.clamp(min=self.floor), error)

        proposal = torch.cat([z_corr, ell_next[:, None], (x[:, errs] + est)[:, None], var_next[:, None]], 1)

        def update(ok: Tensor) -> AdamsCarry:
            def shift(old: Tensor, new: Tensor) -> Tensor:
                moved = torch.cat([new[:, None], old[:, :-1]], 1)
                return torch.where(ok.reshape(-1, *[1] * (old.dim() - 1)), moved, old)

            return carry._replace(tau=shift(carry.tau, t_next), f=shift(carry.f, ev.f), h=shift(carry.h, h_new),
                                  h_var=shift(carry.h_var, var_new),
                                  weight=torch.where(ok[:, None], weight_all[:, :S], carry.weight),
                                  count=carry.count + ok.long())

        return Attempt(x=proposal, error=error, update=update, nfe=1)
