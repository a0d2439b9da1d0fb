r"""Embedded Runge–Kutta pairs on the probability flow with a time and a step size per sample (``"adaptive_ode"``).

The pairs are :class:`ButcherTableau` objects (:data:`DOPRI5`, :data:`BOSH3`); :class:`AdaptiveRungeKutta`
runs one of them in the per-sample loop of :mod:`sdediff.solvers.per_sample`, on the drift of the
process it is given (:meth:`~sdediff.processes.ReverseProcess.drift`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .._utils import expand_as
from .._validate import check_choice, check_float
from ..processes import ReverseProcess, linear_drift_coef
from ..sdes.linear import LinearSDE
from .base import register_solver
from .per_sample import Attempt, PerSampleAdaptiveSolver, Start

__all__ = ["ButcherTableau", "DOPRI5", "BOSH3", "TABLEAUX", "AdaptiveRungeKutta", "RKWorkspace", "RKCarry"]


@dataclass(frozen=True)
class ButcherTableau:
    r"""An explicit embedded Runge–Kutta pair with the first-same-as-last (FSAL) property.

    For :math:`\dot y = v(y, t)` and a step :math:`h` the stages are

    .. math::  k_i = v\Big(y_0 + h\sum_{j<i} a_{ij} k_j,\ t + c_i h\Big), \qquad i = 1..s,

    the solution :math:`y_1 = y_0 + h\sum_i b_i k_i` (order :math:`p`) and the embedded one
    :math:`\hat y_1 = y_0 + h\sum_i \hat b_i k_i` (order :math:`q`), whose difference
    :math:`h\sum_i (b_i - \hat b_i) k_i` estimates the local error. FSAL: :math:`c_s = 1` and the last
    row of :math:`a` is :math:`b`, so the last stage is evaluated at :math:`(y_1, t + h)` and, after an
    accepted step, is the next step's :math:`k_1`: :math:`s - 1` evaluations per step.

    Attributes
    ----------
    c : tuple of float
        Nodes, ``c[0] == 0``.
    a : tuple of tuple of float
        Row ``i`` holds :math:`a_{i,0..i-1}` (row 0 is empty).
    b, b_low : tuple of float
        Weights of the propagated solution (order ``order``) and of the embedded one (order ``low_order``).
    """

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    b_low: tuple[float, ...]
    order: int
    low_order: int

    def __post_init__(self) -> None:
        s = len(self.c)
        if not (len(self.a) == len(self.b) == len(self.b_low) == s and all(len(r) == i for i, r in enumerate(self.a))):
            raise ValueError("a Butcher tableau needs s nodes, s weights of each kind and a strictly lower-triangular a")
        if any(abs(sum(r) - ci) > 1e-14 for r, ci in zip(self.a, self.c, strict=True)):
            raise ValueError("the rows of a must sum to c")
        if self.c[-1] != 1 or any(abs(x - y) > 1e-15 for x, y in zip(self.a[-1], self.b, strict=False)) or self.b[-1] != 0:
            raise ValueError("the adaptive loop needs a first-same-as-last tableau (c[-1] = 1, a[-1] = b, b[-1] = 0)")

    @property
    def stages(self) -> int:
        """The number of stages :math:`s`."""
        return len(self.c)

    @property
    def error_weights(self) -> tuple[float, ...]:
        r""":math:`b_i - \hat b_i`."""
        return tuple(x - y for x, y in zip(self.b, self.b_low, strict=True))


#: Dormand & Prince (1980), RK5(4)7FM: order 5 solution, order 4 embedded, 7 stages (6 evaluations/step)
DOPRI5 = ButcherTableau(
    c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    a=((),
       (1 / 5,),
       (3 / 40, 9 / 40),
       (44 / 45, -56 / 15, 32 / 9),
       (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
       (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
       (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)),
    b=(35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
    b_low=(5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40),
    order=5, low_order=4,
)

#: Bogacki & Shampine (1989): order 3 solution, order 2 embedded, 4 stages (3 evaluations/step)
BOSH3 = ButcherTableau(
    c=(0.0, 1 / 2, 3 / 4, 1.0),
    a=((), (1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
    b=(2 / 9, 1 / 3, 4 / 9, 0.0),
    b_low=(7 / 24, 1 / 4, 1 / 3, 1 / 8),
    order=3, low_order=2,
)

TABLEAUX: dict[str, ButcherTableau] = {"dopri5": DOPRI5, "bosh3": BOSH3}


@dataclass(frozen=True)
class RKWorkspace:
    r"""What every attempt of one :class:`AdaptiveRungeKutta` run reuses (its first ``n`` rows when ``n``
    samples are active): one allocation for the whole run.

    Attributes
    ----------
    buffer : Tensor
        ``(s + 2, batch, ...)``: the stage derivatives :math:`k_1..k_s` (a stage's input is one batched
        matrix product over them), the stage input (then the error) and the proposal.
    rows : Tensor
        ``arange(batch)``.
    coef : Tensor
        ``(s + 1, s)``: row ``i < s`` holds :math:`a_i` (stage ``i``'s input is :math:`x + h\sum_j a_{ij} k_j`),
        row ``s`` the error weights :math:`b - \hat b`.
    linear : bool
        Whether the drift is :math:`a(t)\,x + b(t)\,s_\theta` (a :class:`~sdediff.LinearSDE`): the
        coefficients of every stage are then evaluated at once.
    """

    buffer: Tensor
    rows: Tensor
    coef: Tensor
    linear: bool


class RKCarry(NamedTuple):
    """What a sample carries from one Runge–Kutta step to the next."""

    k1: Tensor  #: the drift at the sample's state: the first stage of its next step (FSAL)


@register_solver("adaptive_ode")
class AdaptiveRungeKutta(PerSampleAdaptiveSolver):
    r"""Embedded Runge–Kutta on the probability flow with a time and a step size per sample.

    Integrates :math:`dx/dt = v(x,t) = f(x,t) - \tfrac12 g(t)^2 s_\theta(x,t)` from ``T`` to ``eps``
    with the pair of :class:`ButcherTableau` ``method``. The error of sample :math:`i` is

    .. math::  E_i = \sqrt{\frac1D \sum_j \left(\frac{h\sum_l (b_l - \hat b_l) k_{l,j}}
               {\mathrm{atol} + \mathrm{rtol}\,\max(|y_{0,j}|, |y_{1,j}|)}\right)^2},

    the RMS over the sample's own ``D`` elements; the step is accepted where :math:`E_i \le 1` (the
    order-:math:`p` solution is kept: local extrapolation) and :math:`h_i` scales by
    :math:`\operatorname{clip}(0.9\,E_i^{-1/(q+1)}, 0.2, 10)`. Every sample meets the tolerance on
    its own, and an easy sample is not dragged along at a hard one's step: the score is evaluated only
    on the samples still stepping, so a sample's result does not depend on the rest of the batch
    as far as the arithmetic allows. The solver's own operations act on each sample's row alone (the
    controller's power is taken in float64, where torch's vectorised and scalar CPU code would otherwise
    round a float32 factor differently by position); with a score function whose row ``i`` depends on
    sample ``i`` alone, bit for bit (the exact mixture score of the tests), a sample solved alone and
    inside a batch agree bit for bit in float32 and to about 1e-15 in float64
    (``tests/test_reliability.py::test_adaptive_ode_sample_does_not_depend_on_the_batch``). A network
    is often not row-independent in float32: torch's CPU ``nn.Linear`` rounds a row differently at batch
    1 and batch 24 (by about one unit in the last place), and through the accept/reject decisions
    that moves a sample by up to about the tolerance (relative 3e-4 at ``rtol = atol = 1e-3``, 3e-5
    at ``1e-5``, for a random 2-D MLP; in float64, by about 1e-12).

    Parameters
    ----------
    rtol, atol : float
        Relative and absolute tolerances (``> 0``).
    method : {"dopri5", "bosh3"}
        Dormand–Prince 5(4) (6 evaluations per step) or Bogacki–Shampine 3(2) (3 per step), both FSAL.
    first_step : float, optional
        Magnitude of the first attempted step; default 1% of ``T - eps``.
    max_steps : int
        Most step attempts (accepted + rejected) per sample.

    Notes
    -----
    ``stats["nfe_per_sample"]`` counts 1 (the first derivative) plus ``s - 1`` per attempt.
    With ``keep_trajectory`` or a ``callback`` every sample also steps exactly onto each grid time
    (no interpolation), so each grid interval costs at least one step: ask for a coarse grid
    (``steps=10``, say), not :func:`sdediff.sample`'s default of 1000.
    """

    def __init__(self, rtol: float = 1e-5, atol: float = 1e-5, method: str = "dopri5",
                 first_step: float | None = None, max_steps: int = 10_000) -> None:
        super().__init__(first_step=first_step, max_steps=max_steps)
        self.rtol = check_float("rtol", rtol, 0.0, low_open=True)
        self.atol = check_float("atol", atol, 0.0, low_open=True)
        self.method = check_choice("method", method, tuple(TABLEAUX))
        self._tableau = TABLEAUX[method]
        self.exponent = 1.0 / (self._tableau.low_order + 1)

    def begin(self, process: ReverseProcess, x: Tensor, t: Tensor) -> Start:
        tab = self._tableau
        coef = torch.tensor([*(list(r) + [0.0] * (tab.stages - i) for i, r in enumerate(tab.a)), tab.error_weights],
                            dtype=x.dtype, device=x.device)
        workspace = RKWorkspace(buffer=x.new_empty((tab.stages + 2, *x.shape)),
                                rows=torch.arange(x.shape[0], device=x.device), coef=coef,
                                linear=isinstance(process.sde, LinearSDE))
        return Start(workspace=workspace, carry=RKCarry(k1=process.drift(x, t)), nfe=1)

    def attempt(self, process: ReverseProcess, workspace: RKWorkspace, x: Tensor, t: Tensor, h: Tensor,
                t_next: Tensor, carry: RKCarry) -> Attempt:
        tab = self._tableau
        n, stages = x.shape[0], tab.stages
        k_all = workspace.buffer
        ks = k_all[:stages, :n]  # ks[j - 1] = k_j, contiguous (the first n rows of a buffer)
        y, proposal = k_all[stages:, :n]
        k_rows = ks.view(stages, n, -1).transpose(0, 1)  # (n, s, D): sample r's k_1..k_s, a strided view (no copy)
        x_row = x.reshape(n, 1, -1)
        coef = h[:, None, None] * workspace.coef  # (n, s + 1, s): h a_ij, then h (b_j - b_hat_j)
        times = torch.stack([t_next if c == 1 else t + c * h for c in tab.c[1:]])  # t + c_i h, i = 1..s-1
        if workspace.linear:  # v = a(t) x + b(t) s(x, t): the coefficients of every stage at once
            flat = times.reshape(-1)
            a_t = linear_drift_coef(process.sde, flat).reshape(times.shape)
            b_t = torch.broadcast_to(process.score_weight(flat), flat.shape).reshape(times.shape)
        ks[0].copy_(carry.k1)
        for i in range(1, stages):  # y = x + sum_j (h a_ij) k_j (one batched product), k_i = v(y, t + c_i h)
            y_i = proposal if i == stages - 1 else y
            torch.baddbmm(x_row, coef[:, i:i + 1, :i], k_rows[:, :i], out=y_i.view(n, 1, -1))
            if workspace.linear:
                torch.mul(y_i, expand_as(a_t[i - 1], y_i), out=ks[i])
                ks[i].addcmul_(process.score(y_i, times[i - 1]), expand_as(b_t[i - 1], y_i))
            else:
                ks[i].copy_(process.drift(y_i, times[i - 1]))
        # FSAL: the last stage's input is the order-p solution and its derivative the next k1
        err, scale, tmp = y, ks[1], ks[2]  # free now (only k_1 and k_s are needed after the error)
        torch.bmm(coef[:, stages:], k_rows, out=err.view(n, 1, -1))  # h sum_j (b_j - b_hat_j) k_j
        torch.maximum(torch.abs(x, out=scale), torch.abs(proposal, out=tmp), out=scale)
        err.div_(scale.mul_(self.rtol).add_(self.atol))  # / (atol + rtol max(|x|, |y|))
        error = torch.linalg.vector_norm(err.view(n, -1), dim=1).div_(math.sqrt(err[0].numel()))  # rms_norm
        rows = workspace.rows[:n]
        last = (stages - 1) * k_all.shape[1]  # where k_s of sample 0 is among the rows of k_all

        def update(ok: Tensor) -> RKCarry:  # k_s where accepted, else k_1: a row gather (torch.where is slower)
            return RKCarry(k1=torch.index_select(k_all.view(-1, *x.shape[1:]), 0, torch.where(ok, rows + last, rows),
                                                 out=carry.k1))

        return Attempt(x=proposal, error=error, nfe=stages - 1, update=update)
