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

Each attempt checks the flow's values (one host synchronisation, beside the loop's own) and raises a
:class:`FloatingPointError` naming the point and the time where they are not finite.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from .._validate import check_float, check_int
from ..solvers.per_sample import Attempt, PerSampleAdaptiveSolver, Start, rms_norm
from .flows import Evaluation, NoiseLevelFlow, TimeFlow, ensure_finite
from .quadrature import divided_difference_weights, lagrange_integrals, node_polynomial_integral

__all__ = ["AdamsLikelihood", "AdamsCarry", "state_columns"]


class AdamsCarry(NamedTuple):
    """What a point carries from one step to the next (rows of the per-sample loop)."""

    tau: Tensor  #: ``(n, S)`` times of the last nodes, newest first
    f: Tensor  #: ``(n, order + 1, D)`` the state's derivative there
    h: Tensor  #: ``(n, S, k)`` the divergence integrand there
    count: Tensor  #: ``(n,)`` nodes so far (the start is one)
    index: Tensor  #: ``(n,)`` the point's row in the batch
    probes: Tensor | None  #: ``(n, k, ...)`` its Hutchinson probes, fixed along its path


def state_columns(dim: int, num_probes: int) -> tuple[slice, slice, int]:
    """Columns of the loop's flat state: the flow's state ``z`` (``dim``), the integrals ``ell`` (one per probe) and
    the integration-error estimate."""
    return slice(0, dim), slice(dim, dim + num_probes), dim + num_probes


class AdamsLikelihood(PerSampleAdaptiveSolver):
    """Variable-step, variable-order Adams PEC on the augmented flow with error control on the log-density (module
    docstring).

    Parameters
    ----------
    flow : NoiseLevelFlow or TimeFlow
        The flow and its coordinates.
    probes : Tensor, optional
        ``(n, k, ...)`` the Hutchinson probes of the ``n`` points to solve (``None``: the exact trace).
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
    """

    safety = 0.8
    max_factor = 10.0  #: the growth bound while the order builds up; :attr:`growth` after
    growth = 2.0

    def __init__(self, flow: NoiseLevelFlow | TimeFlow, tol: float | None = 1e-4, rtol: float | None = None,
                 atol: float | None = None, order: int = 5, quadrature_order: int = 6, first_step: float = 1e-4,
                 max_steps: int = 10_000, probes: Tensor | None = None) -> None:
        super().__init__(max_steps=max_steps)
        self.flow, self.probes = flow, probes
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
        self.exponent = 1.0 / (self.order + 1)
        self.floor = (self.safety / self.growth) ** (self.order + 1)  # an error this small grows the step by `growth`
        self.slots = max(self.order + 1, self.quadrature_order + 1)
        self.calls = 0  # batched score evaluations

    name = "adams"

    def evaluate(self, z: Tensor, tau: Tensor, carry: AdamsCarry) -> Evaluation:
        """The flow at ``(z, tau)``; raises :class:`FloatingPointError` naming the first point where it is not finite."""
        self.calls += 1
        ev = self.flow.evaluate(z, tau, carry.probes)
        ensure_finite(ev, self.flow.time(tau), carry.index)
        return ev

    def begin(self, process: Any, x: Tensor, t: Tensor) -> Start:
        """One evaluation at the start; the carry holds it as the first node. Raises
        :class:`~sdediff.likelihood.flows.NotDifferentiableError` if the score's Jacobian is exactly zero at every
        point (a rounded, piecewise-constant score)."""
        n, d = x.shape[0], self.flow.dim
        k = 1 if self.probes is None else self.probes.shape[1]
        carry = AdamsCarry(tau=t[:, None].repeat(1, self.slots), f=x.new_zeros(n, self.order + 1, d),
                           h=x.new_zeros(n, self.slots, k), count=torch.ones(n, dtype=torch.long, device=x.device),
                           index=torch.arange(n, device=x.device), probes=self.probes)
        self.calls += 1
        ev = self.flow.evaluate(x[:, :d], t, self.probes, check=True)
        ensure_finite(ev, self.flow.time(t), carry.index)
        carry.f[:, 0] = ev.f
        carry.h[:, 0] = ev.h
        return Start(carry=carry, nfe=1)

    def attempt(self, process: Any, workspace: Any, x: Tensor, t: Tensor, h: Tensor, t_next: Tensor,
                carry: AdamsCarry) -> Attempt:
        K, P, S = self.order, self.quadrature_order, self.slots
        d, k = self.flow.dim, carry.h.shape[2]
        zs, ells, errs = state_columns(d, k)
        z, ell = x[:, zs], x[:, ells]
        slot = torch.arange(S, device=x.device)[None]
        count = carry.count[:, None]
        history = slot < count  # (n, S): nodes that exist
        tau_all = torch.cat([t_next[:, None], carry.tau], 1)  # the new node, then the history
        yes = torch.ones_like(history[:, :1])

        def nodes(m: int, new: bool) -> Tensor:
            """Validity of the first ``m`` history nodes (the ``m`` newest that exist), after the new one if ``new``."""
            own = history & (slot < m)
            return torch.cat([yes, own], 1) if new else own

        order_now = carry.count.clamp(max=K)
        pred = history & (slot < order_now[:, None])
        corr = torch.cat([yes, pred], 1)
        beta = lagrange_integrals(carry.tau, pred, t, t_next)  # (n, S)
        gamma = lagrange_integrals(tau_all, corr, t, t_next)  # (n, S + 1)
        z_pred = z + torch.einsum("ns,nsd->nd", beta[:, :K + 1], carry.f)
        ev = self.evaluate(z_pred, t_next, carry)
        f_all = torch.cat([ev.f[:, None], carry.f], 1)  # (n, K + 2, D)
        z_corr = z + torch.einsum("ns,nsd->nd", gamma[:, :K + 2], f_all)
        h_all = torch.cat([ev.h[:, None], carry.h], 1)  # (n, S + 1, k)

        # the state's error: divided difference over the corrector's nodes and one more, or the P-C difference
        full = carry.count >= K + 1
        dd = divided_difference_weights(tau_all[:, :K + 2], nodes(K + 1, True)[:, :K + 2])
        omega = node_polynomial_integral(tau_all, corr, t, t_next)
        dz = torch.where(full[:, None], torch.einsum("ns,nsd->nd", dd, f_all) * omega[:, None], z_corr - z_pred)
        e_state = (ev.grad * dz).sum(1).abs()

        # the divergence quadrature and its error
        quad = nodes(P - 1, True)
        w = lagrange_integrals(tau_all, quad, t, t_next)
        ell_next = ell + (w[:, :, None] * h_all).sum(1)
        mean_h = h_all.mean(2)
        pc = ((gamma - torch.cat([torch.zeros_like(beta[:, :1]), beta], 1)) * mean_h).sum(1).abs()
        omega_q = node_polynomial_integral(tau_all, quad, t, t_next)
        dd_now = (divided_difference_weights(tau_all, nodes(P, True)) * mean_h).sum(1)
        dd_prev = (divided_difference_weights(tau_all[:, 1:], nodes(P + 1, False)) * mean_h[:, 1:]).sum(1)
        dd_prev = torch.where(carry.count >= P + 1, dd_prev, torch.zeros_like(dd_prev))
        e_quad = torch.where(carry.count >= P, torch.maximum(torch.maximum(dd_now.abs(), dd_prev.abs()) * omega_q.abs(),
                                                             0.1 * pc), pc)
        est = e_state + e_quad

        error = est / self.tol if self.tol is not None else torch.zeros_like(est)
        if self.rtol is not None:
            scale = self.flow.x_scale(t_next)[:, None]
            x_now, x_new = z * scale, z_corr * scale
            e_x = rms_norm(dz * scale / (self.atol + self.rtol * torch.maximum(x_now.abs(), x_new.abs())))
            e_ell = (e_quad / (self.atol + self.rtol * ell_next.abs().mean(1)))
            error = torch.maximum(error, torch.maximum(e_x, e_ell))
        # the controller's exponent is 1/(K+1): an error of order q+1 is raised to (K+1)/(q+1) (monotone, 1 stays 1)
        error = error ** ((K + 1) / (order_now + 1).to(error.dtype))
        error = torch.where(full, error.clamp(min=self.floor), error)

        proposal = torch.cat([z_corr, ell_next, (x[:, errs] + est)[:, None]], 1)

        def update(ok: Tensor) -> AdamsCarry:
            def shift(old: Tensor, new: Tensor) -> Tensor:
                moved = torch.cat([new[:, None], old[:, :-1]], 1)
                return torch.where(ok.reshape(-1, *[1] * (old.dim() - 1)), moved, old)

            return carry._replace(tau=shift(carry.tau, t_next), f=shift(carry.f, ev.f), h=shift(carry.h, ev.h),
                                  count=carry.count + ok.long())

        return Attempt(x=proposal, error=error, update=update, nfe=1)
