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
nodes add up coherently (measured in benchmarks/likelihood.py; see docs/likelihood.md).
With two probes or more, :math:`\mathrm{Var}(\bar H_j)` is estimated from their spread and the sum is each point's
probe variance. The averaged integrand is noisy from node to node, so its divided differences say nothing of the
quadrature's error; that error is estimated instead on a **control probe**, one more probe per point that is drawn
at the start and kept along the path: :math:`u^\top J(\tau) u` is as smooth in :math:`\tau` as the trace (its
expectation), so the quadrature's error estimate and the step control are those of the exact trace applied to it.
The control probe costs one more vector–Jacobian product per evaluation (through the same forward pass) and does
not enter :math:`\ell`, which keeps its variance. Without it the steps would follow the state's error alone, and the
quadrature's error of the trace, which the probes' mean carries as a bias, would not be bounded by ``tol``.

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
    """What a point carries from one step to the next (rows of the per-sample loop).

    The last ``S`` nodes are kept in ring buffers: slot ``head`` holds the newest node, slot ``head - j`` (mod ``S``)
    the one ``j`` steps older (its *age*). A step writes one slot instead of shifting the buffers, and since the
    quadrature weights of a set of nodes do not depend on the order they are listed in, the buffers are used in
    their slot order.
    """

    tau: Tensor  #: ``(n, S)`` times of the last nodes
    f: Tensor  #: ``(n, S, D)`` the state's derivative there
    h: Tensor  #: ``(n, S)`` the divergence integrand there (the mean over the probes)
    h_var: Tensor  #: ``(n, S)`` the variance of that mean due to the probes (zero for the exact trace)
    smooth: Tensor  #: ``(n, S)`` the integrand along the control probe (``h`` itself for the exact trace)
    weight: Tensor  #: ``(n, S)`` the quadrature weight each node has collected so far
    head: Tensor  #: ``(n,)`` the slot of the newest node
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
    first_point : int
        The batch row of the first point being solved, so that errors name points as the caller numbers them (the
        chunks of :func:`~sdediff.likelihood.log_likelihood`'s ``batch_size``).
    """

    name = "adams"
    safety = 0.8
    max_factor = 10.0  #: the growth bound while the order builds up; :attr:`growth` after
    growth = 2.0

    def __init__(self, flow: NoiseLevelFlow | TimeFlow, tol: float | None = 1e-4, rtol: float | None = None,
                 atol: float | None = None, order: int = 5, quadrature_order: int = 6, first_step: float = 1e-2,
                 max_steps: int = 10_000, num_probes: int = 0, noise: str = "rademacher",
                 generator: torch.Generator | None = None, first_point: int = 0) -> None:
        fraction = check_float("first_step", first_step, 0.0, 1.0, low_open=True)
        lo, hi = flow.span(torch.zeros((), dtype=torch.float64)).tolist()
        super().__init__(first_step=fraction * abs(hi - lo), max_steps=max_steps)
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
        self.num_probes = check_int("num_probes", num_probes, 0)
        self.noise, self.generator = noise, generator
        self.first_point = check_int("first_point", first_point, 0)
        self.exponent = 1.0 / (self.order + 1)
        self.floor = (self.safety / self.growth) ** (self.order + 1)  # an error this small grows the step by `growth`
        self.slots = max(self.order + 1, self.quadrature_order + 1)
        self.calls = 0  # batched score evaluations
        self.rows = 0  # rows of the chunk being solved (probes are drawn for all of them)
        self.control: Tensor | None = None  # (rows, 1, *event): each point's control probe, fixed along its path

    def probe_like(self, z: Tensor) -> Tensor:
        """An empty ``(rows, *event)`` tensor in the dtype the score is called in, which the probes are drawn in."""
        return torch.empty(self.rows, *self.flow.event_shape, dtype=self.flow.score_dtype or z.dtype, device=z.device)

    def evaluate(self, z: Tensor, tau: Tensor, index: Tensor,
                 check: bool = False) -> tuple[Evaluation, Tensor, Tensor, Tensor]:
        """The flow at ``(z, tau)`` for the points of rows ``index``: the evaluation, the mean of the divergence
        integrand over the probes with its variance, and the integrand along the control probe, ``(n,)`` each (the
        exact integrand, zero and the exact integrand again for the exact trace). Raises
        :class:`FloatingPointError` naming the first point where the flow is not finite."""
        self.calls += 1
        probes = None
        if self.num_probes:
            probes = draw_probes(self.probe_like(z), self.num_probes, self.noise, self.generator)
            if len(index) < self.rows:  # every row is drawn for, so that a point's draws do not depend on the others
                probes = probes[index]
            probes = torch.cat([probes, self.control[index]], 1)
        ev = self.flow.evaluate(z, tau, probes, check=check)
        ensure_finite(ev, index, self.first_point)
        if not self.num_probes:
            return ev, ev.h[:, 0], torch.zeros_like(ev.h[:, 0]), ev.h[:, 0]
        h, k = ev.h[:, :-1], self.num_probes
        h_var = h.var(1) / k if k > 1 else torch.zeros_like(h[:, 0])  # one probe: no spread to see
        return ev, h.mean(1), h_var, ev.h[:, -1]

    def begin(self, process: Any, x: Tensor, t: Tensor) -> Start:
        """One evaluation at the start; the carry holds it as the first node. Raises
        :class:`~sdediff.likelihood.flows.NotDifferentiableError` if the score's Jacobian is exactly zero at every
        point (a rounded, piecewise-constant score)."""
        n, d, S = x.shape[0], self.flow.dim, self.slots
        self.rows, self.end = n, self.flow.span(x)[1]
        index = torch.arange(n, device=x.device)
        if self.num_probes:
            self.control = draw_probes(self.probe_like(x), 1, self.noise, self.generator)
        ev, h, h_var, smooth = self.evaluate(x[:, :d], t, index, check=True)
        f = x.new_zeros(n, S, d)
        f[:, 0] = ev.f
        zero = torch.zeros(n, dtype=torch.long, device=x.device)
        carry = AdamsCarry(tau=t[:, None].repeat(1, S), f=f, h=F.pad(h[:, None], (0, S - 1)),
                           h_var=F.pad(h_var[:, None], (0, S - 1)), smooth=F.pad(smooth[:, None], (0, S - 1)),
                           weight=x.new_zeros(n, S), head=zero,
                           count=zero + 1, index=index)
        return Start(carry=carry, nfe=1)

    def attempt(self, process: Any, workspace: Any, x: Tensor, t: Tensor, h: Tensor, t_next: Tensor,
                carry: AdamsCarry) -> Attempt:
        K, P, S = self.order, self.quadrature_order, self.slots
        zs, ells, errs, vars_ = state_columns(self.flow.dim)
        z, ell = x[:, zs], x[:, ells]
        slots = torch.arange(S, device=x.device)
        age = (carry.head[:, None] - slots) % S  # (n, S): how many steps older than the newest each slot is
        exists = age < carry.count[:, None]
        order_now = carry.count.clamp(max=K)

        # every rule's coefficients at once (they depend on the times only), over [new node, history slots]
        nodes = torch.cat([t_next[:, None], carry.tau], 1)

        def rule(m: Tensor | int, new: bool = True) -> Tensor:
            own = exists & (age < (m[:, None] if isinstance(m, Tensor) else m))
            return F.pad(own, (1, 0), value=new)

        pred, corr, quad = rule(order_now, False), rule(order_now), rule(P - 1)
        lag = lagrange_integrals(nodes, torch.stack([pred, corr, quad], 1), t, t_next)  # (n, 3, S + 1)
        omega = node_polynomial_integral(nodes, torch.stack([corr, quad], 1), t, t_next)  # (n, 2)
        dd = divided_difference_weights(nodes, torch.stack([rule(K + 1), rule(P), rule(P + 1, False)], 1))  # (n, 3, S+1)

        # the history's parts of the predictor, the corrector and the divided difference of f over the corrector's
        # nodes and one more, in one pass over the buffer
        past = torch.bmm(torch.stack([lag[:, 0, 1:], lag[:, 1, 1:], dd[:, 0, 1:]], 1), carry.f)  # (n, 3, D)
        z_pred = past[:, 0].add_(z)
        ev, h_new, var_new, smooth_new = self.evaluate(z_pred, t_next, carry.index)
        z_corr = past[:, 1].add_(z).addcmul_(lag[:, 1, :1], ev.f)
        full = carry.count >= K + 1
        dz = past[:, 2].addcmul_(dd[:, 0, :1], ev.f).mul_(omega[:, :1])  # the corrector's local error
        if not bool(full.all()):  # too few nodes for the divided difference: the P-C difference instead
            dz = torch.where(full[:, None], dz, z_corr - z_pred)
        est = torch.linalg.vecdot(ev.grad, dz).abs()  # its effect on the log-density

        # the divergence quadrature, its weights collected per node, and its error (on the control probe's integrand)
        w = lag[:, 2]
        ell_next = ell + w[:, 0] * h_new + (w[:, 1:] * carry.h).sum(1)
        weight = carry.weight + w[:, 1:]
        h_all = torch.cat([smooth_new[:, None], carry.smooth], 1)
        pc = ((lag[:, 1] - lag[:, 0]) * h_all).sum(1).abs()  # corrector minus predictor rule on h
        dd_h = (dd[:, 1:] * h_all[:, None]).sum(2)  # (n, 2): the current window's and the previous one's
        dd_h[:, 1] = torch.where(carry.count >= P + 1, dd_h[:, 1], torch.zeros_like(dd_h[:, 1]))
        e_quad = torch.where(carry.count >= P, torch.maximum(dd_h.abs().amax(1) * omega[:, 1].abs(), 0.1 * pc), pc)
        est = est + e_quad
        # the probes' variance of every node whose weight is now final: the one leaving the window, or all at the end
        final = t_next == self.end
        done = quad[:, 1:] & (final[:, None] | (age == P - 2))
        var_next = (x[:, vars_] + torch.where(done, weight**2 * carry.h_var, torch.zeros_like(weight)).sum(1)
                    + torch.where(final, w[:, 0] ** 2 * var_new, torch.zeros_like(var_new)))

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
            # accepted points write the new node into the slot after their head (their oldest node's); the others
            # write their newest node back onto itself
            head = torch.where(ok, (carry.head + 1) % S, carry.head)
            rows = torch.arange(len(ok), device=ok.device)
            f_row = ev.f if bool(ok.all()) else torch.where(ok[:, None], ev.f, carry.f[rows, carry.head])
            carry.f[rows, head] = f_row

            def put(buffer: Tensor, value: Tensor) -> Tensor:
                out = buffer.clone()
                out[rows, head] = torch.where(ok, value, buffer[rows, carry.head])
                return out

            new_weight = torch.where(ok[:, None], weight, carry.weight)
            new_weight[rows, head] = torch.where(ok, w[:, 0], carry.weight[rows, carry.head])
            return carry._replace(tau=put(carry.tau, t_next), h=put(carry.h, h_new), h_var=put(carry.h_var, var_new),
                                  smooth=put(carry.smooth, smooth_new), weight=new_weight, head=head,
                                  count=carry.count + ok.long())

        return Attempt(x=proposal, error=error, update=update, nfe=1)

