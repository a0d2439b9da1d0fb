r"""The per-sample adaptive loop: every sample has its own time and step size.

A batched adaptive solver (torchdiffeq, solver ``"ode"``) moves the whole batch with one step size,
so the hardest sample sets the pace for all of them. Here each sample :math:`i` carries its own time
:math:`t_i` and step :math:`h_i`; a step is accepted or rejected per sample, samples that reach the
final time leave the loop, and the score is evaluated only on the samples still active (the batch is
indexed, never looped over in Python).

One loop, :meth:`PerSampleAdaptiveSolver.solve`, is shared by the per-sample solvers
(:mod:`sdediff.solvers.adaptive_ode`, :mod:`sdediff.solvers.adaptive_sde`); a solver only says how to
*attempt* one step from ``(x, t)`` with step ``h``: a proposal and a scaled error norm :math:`E \ge 0`
per sample (:math:`E \le 1` means "within tolerance"). The loop then applies the standard controller
to every active sample:

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
and ``adaptive_sde``'s Brownian memory one every few iterations
(:class:`~sdediff.solvers.adaptive_sde.BrownianMemory`). When every sample is active the batch is used
as is; otherwise the active rows are gathered with ``index_select`` and written back with ``index_copy_``.

Tolerance semantics: every sample meets the tolerance *on its own*, as if it were solved alone. A
batched solver with a per-sample max norm (``"ode"``) is often more accurate on its hardest samples at
the same tolerance, because the other samples force small steps on them; per-sample control does
not give that accuracy away for free (ill-conditioned samples, e.g. on a boundary between modes,
amplify local errors by orders of magnitude), so compare at equal error, not equal ``rtol``.

Every per-sample solver reports per-sample figures in :attr:`~sdediff.solvers.Solution.stats` (and so in
``SampleResult.stats``): ``"nfe_per_sample"`` (score evaluations each sample took part in),
``"steps_per_sample"`` (accepted steps) and ``"rejected_per_sample"``, all ``(batch,)`` int64 tensors.
``SampleResult.nfe`` counts batched score calls, as for every solver.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._utils import all_finite, expand_as
from .._validate import check_float, check_int
from ..processes import ReverseProcess
from .base import Callback, Solution, Solver

__all__ = ["PerSampleAdaptiveSolver", "Start", "Attempt", "Carry", "rms_norm"]

#: Per-sample values a solver carries from one step to the next (an FSAL derivative, a previous proposal,
#: a Brownian path): a tuple (a ``NamedTuple``, for names) whose fields are batch-first tensors, ``None``
#: or tuples of the same kind. The loop gathers and writes back the rows of the active samples.
Carry = tuple


def rms_norm(e: Tensor) -> Tensor:
    r"""Per-sample root mean square :math:`\sqrt{\tfrac1D\sum_j e_j^2}` over every element of a sample,
    ``(batch, ...) -> (batch,)``."""
    return e.reshape(e.shape[0], -1).pow(2).mean(dim=1).sqrt()


def _map_tensors(fn: Callable[[Tensor], Tensor], carry: Any) -> Any:
    """``carry`` with ``fn`` applied to each of its tensors, same structure (``None`` stays ``None``)."""
    if carry is None:
        return None
    if isinstance(carry, Tensor):
        return fn(carry)
    values = [_map_tensors(fn, v) for v in carry]
    return carry._make(values) if hasattr(carry, "_make") else tuple(values)


def _tensors(carry: Any) -> list[Tensor]:
    """The tensors of ``carry``, depth first."""
    if carry is None:
        return []
    if isinstance(carry, Tensor):
        return [carry]
    return [t for v in carry for t in _tensors(v)]


class Start(NamedTuple):
    """What :meth:`PerSampleAdaptiveSolver.begin` returns.

    Attributes
    ----------
    workspace : Any
        Values of the run that are not per sample (scratch buffers, counters), handed as they are to
        :meth:`~PerSampleAdaptiveSolver.prepare` and :meth:`~PerSampleAdaptiveSolver.attempt`.
    carry : Carry
        The carried values of every sample at the start (see :data:`Carry`).
    nfe : int
        Score evaluations the start cost (each on the whole batch).
    """

    workspace: Any = None
    carry: Carry = ()
    nfe: int = 0


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
        ``update(accepted) -> carry``: the carried values of the active samples after the step (the
        structure :meth:`~PerSampleAdaptiveSolver.begin` started), given the ``(n,)`` boolean mask of
        accepted steps.
    nfe : int
        Score evaluations the attempt made (each on the active samples).
    """

    x: Tensor
    error: Tensor
    update: Callable[[Tensor], Carry]
    nfe: int


class Progress(NamedTuple):
    """The loop's own per-sample state, ``(batch,)`` tensors."""

    t: Tensor  #: the sample's time
    h: Tensor  #: the (signed) step it attempts next
    stop: Tensor  #: index in the requested times of its next stop
    nfe: Tensor  #: score evaluations it took part in
    accepted: Tensor  #: accepted steps
    rejected: Tensor  #: rejected steps
    done: Tensor  #: it has left the loop (finished or stuck)
    stuck: Tensor  #: its step size underflowed
    retrying: Tensor  #: its last attempt was rejected


class PerSampleAdaptiveSolver(Solver):
    r"""Base class: the per-sample adaptive loop, shared by every solver that supplies :meth:`attempt`.

    Subclasses set :attr:`exponent` (the :math:`r` of the controller), implement :meth:`attempt` and,
    when they carry per-sample values from one step to the next or keep scratch for the run,
    :meth:`begin` (and :meth:`prepare`).

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
        self.first_step = check_float("first_step", first_step, 0.0, low_open=True, optional=True)
        self.max_steps = check_int("max_steps", max_steps)

    # what a solver provides ---------------------------------------------------------------------------
    def begin(self, process: ReverseProcess, x: Tensor, t: Tensor) -> Start:
        """The run's workspace, the carried values of every sample at the start (``x`` at times ``t``,
        ``(batch,)``) and the score evaluations that cost."""
        return Start()

    def prepare(self, workspace: Any, carry: Carry) -> Carry:
        """Called on the whole batch's carry before each iteration (e.g. to grow a buffer)."""
        return carry

    def attempt(self, process: ReverseProcess, workspace: Any, x: Tensor, t: Tensor, h: Tensor, t_next: Tensor,
                carry: Carry) -> Attempt:
        """Attempt one step for the active samples.

        ``x`` holds the active samples only, ``t``, ``h`` and ``t_next`` are ``(n,)`` with
        ``t_next = t + h`` (exactly the stop where the step was clipped to one), and ``carry`` holds the
        carried values of the same samples.
        """
        raise NotImplementedError

    # the loop -----------------------------------------------------------------------------------------
    def solve(self, process: ReverseProcess, x: Tensor, ts: Tensor, *, callback: Callback | None = None,
              progress: bool = False, keep_trajectory: bool = False) -> Solution:
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
        workspace, carry, nfe0 = self.begin(process, x, t)
        carry = _map_tensors(torch.clone, carry)  # written in place below: own the storage

        def flags() -> Tensor:
            return torch.zeros(n, dtype=torch.bool, device=device)

        state = Progress(
            t=t, h=torch.full((n,), direction * (self.first_step or 0.01 * abs(span)), dtype=x.dtype, device=device),
            stop=torch.ones(n, dtype=long, device=device), nfe=torch.full((n,), nfe0, dtype=long, device=device),
            accepted=torch.zeros(n, dtype=long, device=device), rejected=torch.zeros(n, dtype=long, device=device),
            done=flags(), stuck=flags(), retrying=flags())
        trajectory = None
        if record:
            trajectory = x.new_empty((n_targets, *x.shape))
            trajectory[0] = x
        emitted = 0
        bar = tqdm(total=n, desc=self.name, unit="sample", disable=not progress, leave=False)

        def emit() -> int:
            reached, i = int(state.stop.min()) - 1, emitted  # every sample has passed targets[reached]
            while callback is not None and i < reached:
                i += 1
                callback(i - 1, targets[i], trajectory[i])
            return i

        try:
            for iteration in itertools.count():
                idx = torch.nonzero(~state.done).squeeze(1)  # the one host sync of an iteration
                n_active = idx.numel()
                bar.update(n - n_active - bar.n)
                if callback is not None:
                    emitted = emit()
                if n_active == 0:
                    break
                if iteration >= self.max_steps:
                    slowest = float((state.t[idx] - targets[-1]).abs().max())
                    raise RuntimeError(
                        f"solver {self.name!r}: {n_active} of {n} samples did not reach t = {float(targets[-1]):.6g} "
                        f"within max_steps={self.max_steps} step attempts (accepted + rejected); the furthest is "
                        f"{slowest:.3g} away; raise max_steps or loosen the tolerances")
                full = n_active == n

                def take(values: Any, full: bool = full, idx: Tensor = idx) -> Any:
                    """The rows of the active samples (the tensors themselves when every sample is active)."""
                    return values if full else _map_tensors(lambda v: v.index_select(0, idx), values)

                now, xa = take(state), take(x)
                target = targets[now.stop]
                remaining = target - now.t
                clipped = now.h * direction >= remaining * direction  # the step would reach the next stop
                hs = torch.where(clipped, remaining, now.h)
                t_next = torch.where(clipped, target, now.t + hs)
                carry = self.prepare(workspace, carry)
                res = self.attempt(process, workspace, xa, now.t, hs, t_next, take(carry))

                error = torch.where(torch.isfinite(res.error), res.error, torch.full_like(res.error, math.inf))
                ok = error <= 1
                # the power in float64: torch's CPU kernels compute it in vector registers for most elements and in
                # scalar code for the tail, whose results differ by an ulp; rounded back to float32 they agree, so a
                # float32 sample's steps do not depend on its position in the batch
                factor = (self.safety * error.double().pow(-self.exponent)).clamp(self.min_factor, self.max_factor)
                factor = factor.to(error.dtype)
                factor = torch.where(now.retrying, factor.clamp(max=1.0), factor)
                h_new = hs * factor
                arrived = ok & clipped
                # a step shortened to land on a stop says nothing against the step proposed before it
                h_new = torch.where(arrived & (now.h.abs() > h_new.abs()), now.h, h_new)
                t_new = torch.where(ok, t_next, now.t)
                stop_new = now.stop + arrived.to(long)
                finished = stop_new == n_targets
                underflow = ~finished & (t_new + h_new == t_new)
                ia = rows if full else idx
                x_rows.index_copy_(0, torch.where(ok, ia, n), res.x)  # accepted proposals into x, the rest to the spare row
                if trajectory is not None:  # store the states that just landed on a stop
                    landed = torch.where(expand_as(arrived, xa), res.x, trajectory[now.stop, ia])
                    trajectory.index_put_((now.stop, ia), landed)
                new = Progress(t=t_new, h=h_new, stop=stop_new, nfe=now.nfe + res.nfe,
                               accepted=now.accepted + ok.to(long), rejected=now.rejected + (~ok).to(long),
                               done=now.done | finished | underflow, stuck=now.stuck | underflow, retrying=~ok)
                for dest, value in zip(_tensors((state, carry)), _tensors((new, res.update(ok))), strict=True):
                    if full:
                        dest.copy_(value)
                    else:
                        dest.index_copy_(0, idx, value)
        finally:
            bar.close()

        stats = {"nfe_per_sample": state.nfe, "steps_per_sample": state.accepted, "rejected_per_sample": state.rejected}
        if bool(state.stuck.any()):
            where = state.t[state.stuck]
            raise FloatingPointError(
                f"solver {self.name!r}: the step size underflowed for {int(state.stuck.sum())} of {n} samples (at t in "
                f"[{float(where.min()):.6g}, {float(where.max()):.6g}]); the drift is non-finite or too stiff there "
                "(check the score function and eps)")
        if not all_finite(x):
            raise FloatingPointError(f"solver {self.name!r} produced non-finite values; check the score function and eps")
        return Solution(x, trajectory, stats)
