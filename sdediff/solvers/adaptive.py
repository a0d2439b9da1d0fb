r"""Adaptive solvers in which every sample has its own time and step size.

A batched adaptive solver (torchdiffeq, solver ``"ode"``) moves the whole batch with one step size,
so the hardest sample sets the pace for all of them. Here each sample :math:`i` carries its own time
:math:`t_i` and step :math:`h_i`; a step is accepted or rejected per sample, samples that reach the
final time leave the loop, and the score is evaluated only on the samples still active (the batch is
indexed, never looped over in Python).

One loop, :meth:`PerSampleAdaptiveSolver.solve`, is shared by the solvers in this module; a solver
only says how to *attempt* one step from ``(x, t)`` with step ``h``: a proposal and a scaled error
norm :math:`E \ge 0` per sample (:math:`E \le 1` means "within tolerance"). The loop then applies
the standard controller to every active sample:

.. math::  \text{accept} \iff E \le 1, \qquad
           h \leftarrow h \cdot \operatorname{clip}\big(\theta\, E^{-r},\ 0.2,\ 10\big),

with safety factor :math:`\theta = 0.9` and exponent :math:`r` (:math:`1/(q+1)` for an embedded pair
whose lower order is :math:`q`); the step after a rejection may not grow (as in Hairer's codes). A
rejected sample keeps its state and retries with the smaller step.
Steps are clipped per sample so that no sample steps past the next requested time (``eps``, or every
grid time when a trajectory or a callback is asked for): those times are hit exactly. A step clipped
this way does not shrink the next one.

Costs and synchronisation: each loop iteration makes one host synchronisation (the set of active
samples, which also answers "is any sample still running?"); the stages of a step make none. With a
``callback`` the loop makes one more per iteration, to know when every sample has passed a grid time,
and ``adaptive_sde``'s Brownian memory one every few iterations (:class:`BrownianMemory`). When every
sample is active the batch is used as is; otherwise the active rows are gathered with ``index_select``
and written back with ``index_copy_``.

Tolerance semantics: every sample meets the tolerance *on its own*, as if it were solved alone. A
batched solver with a per-sample max norm (``"ode"``) is often more accurate on its hardest samples at
the same tolerance, because the other samples force small steps on them; per-sample control does
not give that accuracy away for free (ill-conditioned samples, e.g. on a boundary between modes,
amplify local errors by orders of magnitude), so compare at equal error, not equal ``rtol``.

Registered solvers: ``"adaptive_ode"`` (embedded Runge–Kutta on the probability flow, option
``method``) and ``"adaptive_sde"`` (the reverse-SDE solver of
Jolicoeur-Martineau et al. 2021). Both report per-sample figures in ``SampleResult.stats``:
``"nfe_per_sample"`` (score evaluations each sample took part in), ``"steps_per_sample"`` (accepted
steps) and ``"rejected_per_sample"``, all ``(batch,)`` int64 tensors. ``SampleResult.nfe`` counts
batched score calls, as for every solver.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._utils import all_finite, expand_as, randn_like
from ..sdes.linear import LinearSDE
from .base import Callback, Context, Solver, register_solver
from .ode import pf_drift

__all__ = ["PerSampleAdaptiveSolver", "Attempt", "AdaptiveRungeKutta", "AdaptiveReverseSDE", "ButcherTableau",
           "TABLEAUX", "DOPRI5", "BOSH3", "BrownianMemory", "rms_norm"]


# --- option checks --------------------------------------------------------------------------------------
def _positive_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")
    return float(value)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def rms_norm(e: Tensor) -> Tensor:
    r"""Per-sample root mean square :math:`\sqrt{\tfrac1D\sum_j e_j^2}` over every element of a sample,
    ``(batch, ...) -> (batch,)``."""
    return e.reshape(e.shape[0], -1).pow(2).mean(dim=1).sqrt()


# --- the shared loop ------------------------------------------------------------------------------------
Carry = dict[str, Tensor]


class Attempt(NamedTuple):
    """What :meth:`PerSampleAdaptiveSolver.attempt` returns for the active samples.

    Attributes
    ----------
    x : Tensor
        The proposed state at ``t + h`` (used only where the step is accepted).
    error : Tensor
        ``(n,)`` scaled error norm; the step is accepted where ``error <= 1``. Non-finite values count
        as a rejection.
    update : callable
        ``update(accepted) -> carry``: the carried values of the active samples after the step, given
        the ``(n,)`` boolean mask of accepted steps.
    nfe : int
        Score evaluations the attempt made (each on the active samples).
    """

    x: Tensor
    error: Tensor
    update: Callable[[Tensor], Carry]
    nfe: int


class PerSampleAdaptiveSolver(Solver):
    r"""Base class: the per-sample adaptive loop, shared by every solver that supplies :meth:`attempt`.

    Subclasses set :attr:`exponent` (the :math:`r` of the controller), implement :meth:`attempt` and,
    when they carry per-sample values from one step to the next (an FSAL derivative, a previous
    proposal, a Brownian path), :meth:`begin`.

    The controller is the one in the module docstring, with one addition from Hairer's codes: the
    step that follows a rejection may not grow (a reject–grow–reject cycle wastes evaluations).

    Parameters
    ----------
    first_step : float, optional
        Magnitude of every sample's first attempted step; default 1% of the time span.
    max_steps : int
        Most step attempts (accepted + rejected) any one sample may take before the solve raises.
    """

    #: safety factor :math:`\theta` of the controller
    safety: float = 0.9
    #: bounds on the factor by which one step changes ``h``
    min_factor: float = 0.2
    max_factor: float = 10.0
    #: exponent :math:`r` of the controller
    exponent: float = 0.5

    def __init__(self, first_step: float | None = None, max_steps: int = 10_000) -> None:
        self.first_step = None if first_step is None else _positive_float(first_step, "first_step")
        self.max_steps = _positive_int(max_steps, "max_steps")

    # what a solver provides ---------------------------------------------------------------------------
    def begin(self, ctx: Context, x: Tensor, t: Tensor) -> tuple[Carry, int]:
        """Carried values for every sample at the start (batch-first tensors), and the score
        evaluations that cost."""
        return {}, 0

    def prepare(self, ctx: Context, carry: Carry) -> Carry:
        """Called on the whole batch's carry before each iteration (e.g. to grow a buffer)."""
        return carry

    def attempt(self, ctx: Context, x: Tensor, t: Tensor, h: Tensor, t_next: Tensor, carry: Carry) -> Attempt:
        """Attempt one step for the active samples.

        ``x`` holds the active samples only, ``t``, ``h`` and ``t_next`` are ``(n,)`` with
        ``t_next = t + h`` (exactly the stop where the step was clipped to one), and ``carry`` holds the
        carried values of the same samples.
        """
        raise NotImplementedError

    # the loop -----------------------------------------------------------------------------------------
    def solve(self, ctx: Context, x: Tensor, ts: Tensor, *, callback: Callback | None = None,
              progress: bool = False, keep_trajectory: bool = False) -> tuple[Tensor, Tensor | None]:
        """Integrate every sample from ``ts[0]`` to ``ts[-1]`` with its own steps.

        Without a trajectory or callback only the end points of ``ts`` matter; with either, every
        sample steps exactly onto every time of ``ts`` (which constrains its steps), the states there are
        stored, and ``callback(i, ts[i + 1], x)`` is called once every sample has reached ``ts[i + 1]``.

        Raises
        ------
        RuntimeError
            If a sample needs more than ``max_steps`` attempts.
        FloatingPointError
            If a sample's step size underflows (a non-finite or extremely stiff drift).
        """
        record = keep_trajectory or callback is not None
        targets = (ts if record else ts[[0, -1]]).to(device=x.device, dtype=x.dtype)
        n_targets, n = len(targets), x.shape[0]
        span = float(targets[-1] - targets[0])
        if span == 0 or not math.isfinite(span):
            raise ValueError(f"solver {self.name!r} needs distinct finite start and end times, got {ts[0]} and {ts[-1]}")
        direction = math.copysign(1.0, span)
        if record and not bool(((targets[1:] - targets[:-1]) * direction > 0).all()):
            raise ValueError(f"solver {self.name!r}: the time grid must be strictly monotone")

        device, long = x.device, torch.long
        x_rows = torch.cat([x, x[:1]])  # the state, plus a spare row that rejected proposals are written to
        x, rows = x_rows[:n], torch.arange(n, device=device)
        t = targets[0].expand(n).clone()
        h = torch.full((n,), direction * (self.first_step or 0.01 * abs(span)), dtype=x.dtype, device=device)
        k = torch.ones(n, dtype=long, device=device)  # index in `targets` of each sample's next stop
        carry, nfe0 = self.begin(ctx, x, t)
        carry = {key: v.clone() for key, v in carry.items()}  # updated in place below: own the storage
        nfe = torch.full((n,), nfe0, dtype=long, device=device)
        accepted = torch.zeros(n, dtype=long, device=device)
        rejected = torch.zeros(n, dtype=long, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        stuck = torch.zeros(n, dtype=torch.bool, device=device)
        retrying = torch.zeros(n, dtype=torch.bool, device=device)  # the sample's last attempt was rejected
        trajectory = None
        if record:
            trajectory = x.new_empty((n_targets, *x.shape))
            trajectory[0] = x
        emitted = 0
        bar = tqdm(total=n, desc=self.name, unit="sample", disable=not progress, leave=False)

        def emit() -> int:
            reached, i = int(k.min()) - 1, emitted  # every sample has passed targets[reached]
            while callback is not None and i < reached:
                i += 1
                callback(i - 1, targets[i], trajectory[i])
            return i

        try:
            for iteration in itertools.count():
                idx = torch.nonzero(~done).squeeze(1)  # the one host sync of an iteration
                n_active = idx.numel()
                bar.update(n - n_active - bar.n)
                if callback is not None:
                    emitted = emit()
                if n_active == 0:
                    break
                if iteration >= self.max_steps:
                    slowest = float((t[idx] - targets[-1]).abs().max())
                    raise RuntimeError(
                        f"solver {self.name!r}: {n_active} of {n} samples did not reach t = {float(targets[-1]):.6g} "
                        f"within max_steps={self.max_steps} step attempts (accepted + rejected); the furthest is "
                        f"{slowest:.3g} away; raise max_steps or loosen the tolerances")
                full = n_active == n

                def take(v: Tensor, full: bool = full, idx: Tensor = idx) -> Tensor:
                    return v if full else v.index_select(0, idx)

                xa, ta, ha, ka = take(x), take(t), take(h), take(k)
                target = targets[ka]
                remaining = target - ta
                clipped = ha * direction >= remaining * direction  # the step would reach the next stop
                hs = torch.where(clipped, remaining, ha)
                t_next = torch.where(clipped, target, ta + hs)
                carry = self.prepare(ctx, carry)
                res = self.attempt(ctx, xa, ta, hs, t_next, {key: take(v) for key, v in carry.items()})

                error = torch.where(torch.isfinite(res.error), res.error, torch.full_like(res.error, math.inf))
                ok = error <= 1
                factor = (self.safety * error.pow(-self.exponent)).clamp(self.min_factor, self.max_factor)
                factor = torch.where(take(retrying), factor.clamp(max=1.0), factor)
                h_new = hs * factor
                arrived = ok & clipped
                # a step shortened to land on a stop says nothing against the step proposed before it
                h_new = torch.where(arrived & (ha.abs() > h_new.abs()), ha, h_new)
                t_new = torch.where(ok, t_next, ta)
                k_new = ka + arrived.to(long)
                finished = k_new == n_targets
                underflow = ~finished & (t_new + h_new == t_new)
                ia = rows if full else idx
                x_rows.index_copy_(0, torch.where(ok, ia, n), res.x)  # accepted proposals into x, the rest to the spare row
                if trajectory is not None:  # store the states that just landed on a stop
                    landed = torch.where(expand_as(arrived, xa), res.x, trajectory[ka, ia])
                    trajectory.index_put_((ka, ia), landed)
                updates = [(t, t_new), (h, h_new), (k, k_new), (nfe, take(nfe) + res.nfe),
                           (accepted, take(accepted) + ok.to(long)), (rejected, take(rejected) + (~ok).to(long)),
                           (done, take(done) | finished | underflow), (stuck, take(stuck) | underflow),
                           (retrying, ~ok)]
                updates += [(carry[key], v) for key, v in res.update(ok).items()]
                for dest, value in updates:
                    if full:
                        dest.copy_(value)
                    else:
                        dest.index_copy_(0, idx, value)
        finally:
            bar.close()

        ctx.stats["nfe_per_sample"] = nfe
        ctx.stats["steps_per_sample"] = accepted
        ctx.stats["rejected_per_sample"] = rejected
        if bool(stuck.any()):
            where = t[stuck]
            raise FloatingPointError(
                f"solver {self.name!r}: the step size underflowed for {int(stuck.sum())} of {n} samples (at t in "
                f"[{float(where.min()):.6g}, {float(where.max()):.6g}]); the drift is non-finite or too stiff there "
                "(check the score function and eps)")
        if not all_finite(x):
            raise FloatingPointError(f"solver {self.name!r} produced non-finite values; check the score function and eps")
        return x, trajectory


# --- embedded Runge–Kutta pairs on the probability flow ------------------------------------------------
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
    on the samples still stepping, so a sample's result does not depend on the rest of the batch.

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
    ``ctx.stats["nfe_per_sample"]`` counts 1 (the first derivative) plus ``s - 1`` per attempt.
    With ``keep_trajectory`` or a ``callback`` every sample also steps exactly onto each grid time
    (no interpolation), so each grid interval costs at least one step: ask for a coarse grid
    (``steps=10``, say), not :func:`sdediff.sample`'s default of 1000.
    """

    def __init__(self, rtol: float = 1e-5, atol: float = 1e-5, method: str = "dopri5",
                 first_step: float | None = None, max_steps: int = 10_000) -> None:
        super().__init__(first_step=first_step, max_steps=max_steps)
        self.rtol = _positive_float(rtol, "rtol")
        self.atol = _positive_float(atol, "atol")
        if method not in TABLEAUX:
            raise ValueError(f"unknown method {method!r} for solver 'adaptive_ode'; known: {', '.join(TABLEAUX)}")
        self.method = method
        self._tableau = TABLEAUX[method]
        self.exponent = 1.0 / (self._tableau.low_order + 1)

    def begin(self, ctx: Context, x: Tensor, t: Tensor) -> tuple[Carry, int]:
        tab, n = self._tableau, x.shape[0]
        # scratch reused by every attempt (its first n rows when n samples are active), one allocation: the stage
        # derivatives k_1..k_s (a stage's input is one batched matrix product over them), the stage input (then
        # the error) and the proposal
        ctx.state["rk_k"] = x.new_empty((tab.stages + 2, *x.shape))
        ctx.state["rk_rows"] = torch.arange(n, device=x.device)
        # row i < s: a_i (stage i's input is x + h sum_j a_ij k_j); row s: the error weights b - b_hat
        ctx.state["rk_coef"] = torch.tensor([*(list(r) + [0.0] * (tab.stages - i) for i, r in enumerate(tab.a)),
                                             tab.error_weights], dtype=x.dtype, device=x.device)
        sde = ctx.sde
        ctx.state["rk_linear"] = isinstance(sde, LinearSDE) and type(sde).drift is LinearSDE.drift
        return {"k1": pf_drift(ctx, x, t)}, 1

    def attempt(self, ctx: Context, x: Tensor, t: Tensor, h: Tensor, t_next: Tensor, carry: Carry) -> Attempt:
        tab, st = self._tableau, ctx.state
        n, stages = x.shape[0], self._tableau.stages
        k_all = st["rk_k"]
        ks = k_all[:stages, :n]  # ks[j - 1] = k_j, contiguous (the first n rows of a buffer)
        y, proposal = k_all[stages:, :n]
        k_rows = ks.view(stages, n, -1).transpose(0, 1)  # (n, s, D): sample r's k_1..k_s, a strided view (no copy)
        x_row = x.reshape(n, 1, -1)
        coef = h[:, None, None] * st["rk_coef"]  # (n, s + 1, s): h a_ij, then h (b_j - b_hat_j)
        times = torch.stack([t_next if c == 1 else t + c * h for c in tab.c[1:]])  # t + c_i h, i = 1..s-1
        linear = st["rk_linear"]
        if linear:  # v = a(t) x - (g(t)^2 / 2) s(x, t), the coefficients of every stage at once
            flat = times.reshape(-1)
            a_t = torch.broadcast_to(ctx.sde.drift_coef(flat), flat.shape).reshape(times.shape)
            half_g2 = (0.5 * torch.broadcast_to(ctx.sde.diffusion(flat), flat.shape) ** 2).reshape(times.shape)
        ks[0].copy_(carry["k1"])
        for i in range(1, stages):  # y = x + sum_j (h a_ij) k_j (one batched product), k_i = v(y, t + c_i h)
            y_i = proposal if i == stages - 1 else y
            torch.baddbmm(x_row, coef[:, i:i + 1, :i], k_rows[:, :i], out=y_i.view(n, 1, -1))
            # k_i = f(y, t_i) - (g(t_i)^2 / 2) s(y, t_i) (pf_drift), both paths with the same operations
            if linear:
                torch.mul(y_i, expand_as(a_t[i - 1], y_i), out=ks[i])
                g2 = half_g2[i - 1]
            else:
                ks[i].copy_(ctx.sde.drift(y_i, times[i - 1]))
                g2 = 0.5 * ctx.sde.diffusion(times[i - 1]) ** 2
            ks[i].addcmul_(ctx.score(y_i, times[i - 1]), expand_as(g2, y_i), value=-1)
        # FSAL: the last stage's input is the order-p solution and its derivative the next k1
        err, scale, tmp = y, ks[1], ks[2]  # free now (only k_1 and k_s are needed after the error)
        torch.bmm(coef[:, stages:], k_rows, out=err.view(n, 1, -1))  # h sum_j (b_j - b_hat_j) k_j
        torch.maximum(torch.abs(x, out=scale), torch.abs(proposal, out=tmp), out=scale)
        err.div_(scale.mul_(self.rtol).add_(self.atol))  # / (atol + rtol max(|x|, |y|))
        error = torch.linalg.vector_norm(err.view(n, -1), dim=1).div_(math.sqrt(err[0].numel()))  # rms_norm
        rows = st["rk_rows"][:n]
        last = (stages - 1) * k_all.shape[1]  # where k_s of sample 0 is among the rows of k_all

        def update(ok: Tensor) -> Carry:  # k_s where accepted, else k_1: a row gather (torch.where is slower)
            return {"k1": torch.index_select(k_all.view(-1, *x.shape[1:]), 0, torch.where(ok, rows + last, rows),
                                             out=carry["k1"])}

        return Attempt(x=proposal, error=error, nfe=stages - 1, update=update)


# --- the adaptive reverse-SDE solver ---------------------------------------------------------------------
class BrownianMemory:
    r"""The Brownian path of each sample, as far as its attempts have drawn it ("rejection sampling with
    memory", Rackauckas & Nie 2017).

    Time is measured per sample as the elapsed :math:`s = |t - t_0|`. The carry holds the sample's
    position :math:`s_{now}` and :math:`W(s_{now})` (``"bm_now"``, ``"bm_w0"``) and the points
    :math:`(s_m, W(s_m))` drawn ahead of it by earlier attempts (``"bm_s"``, ``"bm_w"``; a slot with
    :math:`s_m \le s_{now}` is free). An attempt to :math:`s_1` reads :math:`W(s_1)` off this path: from
    the Brownian bridge between the known points :math:`s_l < s_1 \le s_r` around it,

    .. math::  W(s_1) \sim N\Big(W(s_l) + \tfrac{s_1 - s_l}{s_r - s_l}\big(W(s_r) - W(s_l)\big),\
               \tfrac{(s_1 - s_l)(s_r - s_1)}{s_r - s_l}\Big),

    or, beyond the last known point, :math:`W(s_l) + N(0, s_1 - s_l)`, and records it. An accepted step
    moves :math:`s_{now}` to :math:`s_1`; a rejected one leaves the new point in place, so the retry
    with a shorter step reads the same path. The solver thus integrates one Brownian path whatever
    its accept/reject decisions, and the increments it uses are Brownian.

    A step costs two gathers and one scatter of a state-sized tensor. The capacity ``cap`` (points per
    sample) doubles when needed; as an attempt adds at most one point, checking it costs a host
    synchronisation only once every ``cap - used`` iterations.
    """

    def __init__(self, ctx: Context, x: Tensor, t: Tensor, cap: int = 4) -> None:
        ctx.state["bm_headroom"] = cap - 1  # attempts that certainly fit before the next check
        n = x.shape[0]
        self.carry = {"bm_t0": t.clone(), "bm_now": torch.zeros_like(t), "bm_w0": torch.zeros_like(x),
                      "bm_s": torch.full((n, cap), -math.inf, dtype=t.dtype, device=t.device),
                      "bm_w": x.new_zeros((n, cap, *x.shape[1:]))}

    @staticmethod
    def reserve(ctx: Context, carry: Carry) -> Carry:
        """Make sure one more point fits in every sample's memory (doubling ``cap`` if not)."""
        if ctx.state["bm_headroom"] > 0:
            ctx.state["bm_headroom"] -= 1
            return carry
        s, w = carry["bm_s"], carry["bm_w"]
        cap = s.shape[1]
        used = int((s > carry["bm_now"][:, None]).sum(1).max())
        if used >= cap // 2:
            s = torch.cat([s, torch.full_like(s, -math.inf)], 1)
            w = torch.cat([w, torch.zeros_like(w)], 1)
            cap *= 2
        ctx.state["bm_headroom"] = cap - used - 2
        return {**carry, "bm_s": s, "bm_w": w}

    @staticmethod
    def draw(carry: Carry, t_next: Tensor, z: Tensor) -> tuple[Tensor, Callable[[Tensor], Carry]]:
        """The increment :math:`W(s_1) - W(s_{now})` to ``t_next`` for the active samples, from standard
        normal ``z`` where the path is new, and the carry update."""
        now, w_now, s_pts, w_pts = carry["bm_now"], carry["bm_w0"], carry["bm_s"], carry["bm_w"]
        s1 = (t_next - carry["bm_t0"]).abs()
        rows = torch.arange(s_pts.shape[0], device=s_pts.device)
        ahead = s_pts > now[:, None]
        after = ahead & (s_pts >= s1[:, None])
        before = ahead & ~after
        s_r, r = torch.where(after, s_pts, math.inf).min(1)
        s_l, l_idx = torch.where(before, s_pts, -math.inf).max(1)
        has_r, has_l = torch.isfinite(s_r), torch.isfinite(s_l)
        s_l = torch.where(has_l, s_l, now)
        w_l = torch.where(expand_as(has_l, w_now), w_pts[rows, l_idx], w_now)
        gap = torch.where(has_r, s_r - s_l, torch.ones_like(s1))
        frac = torch.where(has_r, (s1 - s_l) / gap, torch.zeros_like(s1))
        var = torch.where(has_r, (s1 - s_l) * (s_r - s1) / gap, s1 - s_l).clamp(min=0)
        w1 = w_l + expand_as(frac, z) * (w_pts[rows, r] - w_l) + expand_as(var.sqrt(), z) * z
        free = (~ahead).to(torch.uint8).argmax(1)  # a slot behind the sample (one is free: reserve)
        s_new = s_pts.index_put((rows, free), torch.where(has_r & (s_r == s1), -math.inf, s1))
        w_new = w_pts.index_put((rows, free), w1)

        def update(ok: Tensor) -> Carry:
            return {"bm_now": torch.where(ok, s1, now), "bm_w0": torch.where(expand_as(ok, w1), w1, w_now),
                    "bm_s": s_new, "bm_w": w_new}

        return w1 - w_now, update


@register_solver("adaptive_sde")
class AdaptiveReverseSDE(PerSampleAdaptiveSolver):
    r"""Adaptive reverse-SDE solver of Jolicoeur-Martineau et al. (2021), "Gotta Go Fast When
    Generating Data with Score-Based Models", with a step size per sample.

    With the reverse drift :math:`\mu(x,t) = f(x,t) - g(t)^2 s_\theta(x,t)`, :math:`h = t_{next} - t < 0`
    and one Brownian increment :math:`\Delta W \sim N(0, |h| I)`, a step proposes the Euler–Maruyama
    and the improved-Euler (stochastic Heun) solutions sharing :math:`\Delta W`:

    .. math::
        x' &= x + h\,\mu(x, t) + g(t)\,\Delta W, \\
        \tilde x &= x + h\,\mu(x', t + h) + g(t + h)\,\Delta W, \qquad x'' = \tfrac12 (x' + \tilde x),

    (two score evaluations), with the mixed tolerance and scaled error

    .. math::  \delta = \max\big(\mathrm{atol},\ \mathrm{rtol}\,\max(|x'|, |x'_{prev}|)\big), \qquad
               E = \sqrt{\tfrac1D \textstyle\sum_j \big((x'_j - x''_j)/\delta_j\big)^2},

    :math:`x'_{prev}` being the Euler–Maruyama proposal of the sample's last accepted step (the start
    state before the first). Where :math:`E \le 1` the step is accepted with the higher-order
    :math:`x''` (extrapolation); in every case :math:`h \leftarrow h\,\operatorname{clip}(0.9\,E^{-r}, 0.2, 10)`.
    (The paper's update has no clip; here it guards against a zero error estimate.)

    Parameters
    ----------
    rtol : float
        Relative tolerance, 0.05 by default as in the paper (its "fast" setting; smaller is slower and
        more accurate).
    atol : float
        Absolute tolerance, in the units of the data. The paper uses 0.0078 (about one 8-bit level,
        2/256) for images scaled to [-1, 1]; the default 0.01 suits data of unit scale; scale it with
        the data.
    exponent : float
        Controller exponent :math:`r` (> 0), 0.5 by default.
    noise : {"bridge", "fresh"}
        What a retry after a rejected step uses for :math:`\Delta W`. ``"bridge"`` (default): the same
        Brownian path, refined by a Brownian bridge (:class:`BrownianMemory`). ``"fresh"``: new noise,
        the rejected step's noise is discarded, as in the paper.
    first_step : float, optional
        Magnitude of the first attempted step; default 1% of ``T - eps`` (the paper's 0.01 for T = 1).
    max_steps : int
        Most step attempts (accepted + rejected) per sample.

    Notes
    -----
    Why ``"bridge"`` is the default: the error estimate depends on the noise, so with ``"fresh"`` a
    large draw tends to be rejected and redrawn, and the accepted increments are smaller than
    Brownian ones. The controller keeps a steady share of attempts near the threshold whatever the
    tolerance, so this bias does not shrink as ``rtol`` does. In high dimension (the paper's images)
    the error norm averages thousands of independent coordinates, the decision hardly depends on the
    draw and the bias is negligible; in low dimension it is not: on the 2-D Gaussian mixture of the
    tests ``"fresh"`` gets the mode weights wrong by several percent on VE, and tightening ``rtol``
    makes it worse. ``"bridge"`` integrates one Brownian path whatever the decisions and has no such
    bias (test_brownian_memory_keeps_the_path_brownian); with no rejection both use the same draws.
    It keeps ``cap`` (4, doubled when needed) points of every sample's path, i.e. ``cap + 1``
    state-sized tensors.

    Measured on that mixture (4000 samples, defaults): ``"bridge"`` passes the exact-sample checks with
    140 (VP) and 232 (VE) score evaluations per sample, about 30% of attempts rejected (the 2-D error
    estimate is noisy). Euler–Maruyama passes the same checks with 50 (VP) to 70 (VE) steps, so in
    2-D the adaptive solver spends 2-3x *more* evaluations; the paper's savings (2-10x) are measured
    on images, where the error norm averages thousands of coordinates.
    On VE the samples come out slightly too concentrated as ``rtol`` grows (mean exact log-density
    z-score +2.4 at 0.05, +3 to +4 at 0.1-0.2, 4000 samples), like fixed-step improved Euler with
    25 steps (+1.9): the scheme's own discretisation error at coarse steps.

    Noise is drawn with ``ctx.generator`` for the samples still stepping, so a sample's path depends
    on the rest of the batch (the same seed and batch reproduce it exactly).
    """

    stochastic = True

    def __init__(self, rtol: float = 0.05, atol: float = 0.01, exponent: float = 0.5, noise: str = "bridge",
                 first_step: float | None = None, max_steps: int = 10_000) -> None:
        super().__init__(first_step=first_step, max_steps=max_steps)
        self.rtol = _positive_float(rtol, "rtol")
        self.atol = _positive_float(atol, "atol")
        self.exponent = _positive_float(exponent, "exponent")
        if noise not in ("bridge", "fresh"):
            raise ValueError(f"noise must be 'bridge' or 'fresh', got {noise!r}")
        self.noise = noise

    def begin(self, ctx: Context, x: Tensor, t: Tensor) -> tuple[Carry, int]:
        carry = {"x_prev": x}
        if self.noise == "bridge":
            carry.update(BrownianMemory(ctx, x, t).carry)
        return carry, 0

    def prepare(self, ctx: Context, carry: Carry) -> Carry:
        return BrownianMemory.reserve(ctx, carry) if self.noise == "bridge" else carry

    def attempt(self, ctx: Context, x: Tensor, t: Tensor, h: Tensor, t_next: Tensor, carry: Carry) -> Attempt:
        hx = expand_as(h, x)
        z = randn_like(x, ctx.generator)
        if self.noise == "bridge":
            dw, update_path = BrownianMemory.draw(carry, t_next, z)
        else:
            dw, update_path = expand_as(h.abs().sqrt(), x) * z, None
        g0, g1 = (expand_as(ctx.sde.diffusion(s), x) for s in (t, t_next))
        x_low = x + hx * (ctx.sde.drift(x, t) - g0**2 * ctx.score(x, t)) + g0 * dw
        x_tilde = x + hx * (ctx.sde.drift(x_low, t_next) - g1**2 * ctx.score(x_low, t_next)) + g1 * dw
        x_high = 0.5 * (x_low + x_tilde)
        x_prev = carry["x_prev"]
        delta = torch.clamp(self.rtol * torch.maximum(x_low.abs(), x_prev.abs()), min=self.atol)

        def update(ok: Tensor) -> Carry:
            new = {"x_prev": torch.where(expand_as(ok, x_low), x_low, x_prev)}
            return {**new, **update_path(ok)} if update_path is not None else new

        return Attempt(x=x_high, error=rms_norm((x_low - x_high) / delta), update=update, nfe=2)
