"""The solver protocol, the registry of names, and the one fixed-step time loop every step solver shares.

A fixed-step solver is its step maths plus an explicit state::

    start(sde, ts, x) -> state                            # precompute what the maths needs (optional)
    step(process, state, x, t, t_next) -> (x_next, state)

``process`` is the reverse-time process the solver evaluates (``sde.reverse(score, noise_scale)``:
``process.drift``, ``process.score``, ``process.diffusion``, ``process.noise``); it counts score
evaluations. :func:`integrate` owns the loop (progress bar, callbacks, trajectory, finiteness check).
A solver of the linear families can instead give its coefficients as a table
(:meth:`FixedStepSolver.coefficients`, see :mod:`sdediff.solvers.tables`), run by the one shared update.
Solvers that choose their own steps (adaptive ones) override :meth:`Solver.solve`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._utils import all_finite
from ..processes import ReverseProcess
from ..sdes.base import SDE
from ..sdes.linear import LinearSDE, require_linear
from .tables import LinearScheme, SchemeRun

Callback = Callable[[int, Tensor, Tensor], None]

_REGISTRY: dict[str, type[Solver]] = {}


@dataclass
class Solution:
    """What :meth:`Solver.solve` returns: the final state, the states at every grid time (or ``None``)
    and solver-specific figures for :attr:`sdediff.SampleResult.stats` (e.g. ``"nfe_per_sample"``)."""

    x: Tensor
    trajectory: Tensor | None = None
    stats: dict[str, Tensor] = field(default_factory=dict)


class Solver:
    """Base class of all solvers. Subclasses set ``name`` by registering with :func:`register_solver`."""

    name: str = ""
    #: whether the solver draws random numbers (and so uses the generator)
    stochastic: bool = False
    #: the member of the reverse-time family the solver evaluates (``0``: the probability-flow ODE)
    noise_scale: float = 0.0
    #: for a family registered as ``"family"``: the option that ``"family:value"`` sets (e.g. ``"method"``)
    name_option: str | None = None

    def solve(self, process: ReverseProcess, x: Tensor, ts: Tensor, *, callback: Callback | None = None,
              progress: bool = False, keep_trajectory: bool = False) -> Solution:
        """Integrate ``process`` from ``ts[0]`` to ``ts[-1]`` starting at ``x`` (never modified)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


class FixedStepSolver(Solver):
    """A solver that advances on a given time grid; subclasses implement :meth:`step` (and may
    implement :meth:`start`), or, for the linear families, :meth:`coefficients`."""

    def start(self, sde: SDE, ts: Tensor, x: Tensor) -> Any:
        """Called once before the loop with the grid ``ts``; returns the first state :meth:`step` receives."""
        return None

    def step(self, process: ReverseProcess, state: Any, x: Tensor, t: Tensor, t_next: Tensor) -> tuple[Tensor, Any]:
        """Advance ``x`` from time ``t`` to ``t_next`` (0-d tensors, ``t_next < t``); return the new state too."""
        raise NotImplementedError(f"solver {self.name!r} defines neither step nor coefficients")

    def coefficients(self, sde: LinearSDE, ts: Tensor) -> LinearScheme | None:
        """The solver as a coefficient table on the grid ``ts`` (float64) for a linear SDE, or ``None``
        (the default) to run :meth:`step`. A solver that defines only this needs a :class:`~sdediff.LinearSDE`."""
        return None

    def runner(self, sde: SDE, ts: Tensor, x: Tensor, observed: bool = True) -> StepRun | SchemeRun:
        """What advances the state one grid step at a time: the shared update of the coefficient table
        where the solver has one for ``sde``, else :meth:`step` with its state. ``observed`` says whether
        anyone but the next step sees the states it returns (a callback, a trajectory)."""
        scheme = self.coefficients(sde, ts) if isinstance(sde, LinearSDE) else None
        if scheme is None and type(self).step is FixedStepSolver.step:
            require_linear(sde, f"solver {self.name!r}")  # a table-only solver on a non-linear SDE
        if scheme is not None:
            return SchemeRun(scheme, x, observed=observed)
        return StepRun(self, self.start(sde, ts, x))

    def solve(self, process: ReverseProcess, x: Tensor, ts: Tensor, *, callback: Callback | None = None,
              progress: bool = False, keep_trajectory: bool = False) -> Solution:
        x, trajectory = integrate(self, process, x, ts, callback=callback, progress=progress,
                                  keep_trajectory=keep_trajectory)
        return Solution(x, trajectory)


@dataclass
class StepRun:
    """A step solver and its current state: ``advance`` takes one grid step."""

    solver: FixedStepSolver
    state: Any

    def advance(self, process: ReverseProcess, x: Tensor, ts: Tensor, i: int) -> Tensor:
        """Step ``i`` of the grid ``ts``: from ``ts[i]`` to ``ts[i + 1]``."""
        x, self.state = self.solver.step(process, self.state, x, ts[i], ts[i + 1])
        return x


@torch.no_grad()
def integrate(solver: FixedStepSolver, process: ReverseProcess, x: Tensor, ts: Tensor, *,
              callback: Callback | None = None, progress: bool = False,
              keep_trajectory: bool = False) -> tuple[Tensor, Tensor | None]:
    """The time loop every fixed-step solver shares (without autograd, see :func:`sdediff.sample`).

    Runs the solver over consecutive pairs of ``ts`` with no host synchronisation. Each step writes the
    sum of the first element of every sample of its new state into a preallocated record of one number
    per step (a reduction over ``batch`` numbers, so memory grows with the steps by one scalar each). At
    the end one pass checks the whole final state, and a :class:`FloatingPointError` names the first step
    whose record went non-finite: non-finite values are absorbing (every update scales the state, and a
    network spreads a NaN in one element over its sample), so a step that produces them shows in its
    record or the next one, and always in the final state.

    Returns
    -------
    (x, trajectory) : the state at ``ts[-1]`` and, with ``keep_trajectory``, a tensor
    ``(len(ts), *x.shape)`` of the states at every time in ``ts`` (else ``None``).
    """
    n = len(ts) - 1
    run = solver.runner(process.sde, ts, x, observed=callback is not None or keep_trajectory)
    records = torch.empty(n, dtype=x.dtype, device=x.device)
    trajectory = torch.empty((n + 1, *x.shape), dtype=x.dtype, device=x.device) if keep_trajectory else None
    if trajectory is not None:
        trajectory[0].copy_(x)
    for i in tqdm(range(n), desc=solver.name, leave=False) if progress else range(n):  # no bar object unless shown
        x = run.advance(process, x, ts, i)
        firsts = x.as_strided((x.shape[0],), (x.stride(0),), x.storage_offset())  # each sample's first element
        torch.sum(firsts, dim=0, out=records[i])
        if trajectory is not None:
            trajectory[i + 1].copy_(x)
        if callback is not None:
            callback(i, ts[i + 1], x)
    bad = ~torch.isfinite(records)
    if bool(bad.any()):
        k = int(bad.nonzero()[0, 0])
        raise FloatingPointError(
            f"solver {solver.name!r} produced non-finite values at step {k} of {n} (t = {float(ts[k]):.6g} -> "
            f"{float(ts[k + 1]):.6g}); check the score function and the time grid (eps)")
    if not all_finite(x):
        raise FloatingPointError(
            f"solver {solver.name!r} produced non-finite values by the end of the run (t = {float(ts[-1]):.6g}) in "
            "elements the per-step record does not hold, so the step is not known; check the score function and "
            "the time grid (eps), or pass a callback to inspect the states")
    return x, trajectory


def register_solver(name: str) -> Callable[[type[Solver]], type[Solver]]:
    """Class decorator that makes a solver available to :func:`sdediff.sample` under ``name``."""

    def deco(cls: type[Solver]) -> type[Solver]:
        if name in _REGISTRY:
            raise ValueError(f"a solver named {name!r} is already registered ({_REGISTRY[name].__name__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_solvers() -> list[str]:
    """Names accepted by ``sdediff.sample(solver=...)`` (families as ``"family:<option>"``)."""
    return sorted(f"{k}:<{c.name_option}>" if c.name_option else k for k, c in _REGISTRY.items())


@functools.cache
def _options_of(cls: type[Solver]) -> frozenset[str]:
    """The option names a solver class accepts (its constructor's parameters; computed once per class)."""
    return frozenset(inspect.signature(cls).parameters)


def get_solver(name: str | Solver, **options: Any) -> Solver:
    """Build the solver registered as ``name`` with ``options`` (or return a solver instance as is).

    ``"family:value"`` builds the family's solver with its :attr:`Solver.name_option` set to ``value``
    (e.g. ``"torchsde:srk"`` is the ``torchsde`` solver with ``method="srk"``).
    """
    if isinstance(name, Solver):
        if options:
            raise TypeError(f"solver options {sorted(options)} given with a solver instance; set them on it")
        return name
    if not isinstance(name, str):
        raise TypeError(f"solver must be a name or a Solver instance, got {type(name).__name__}")
    family, _, value = name.partition(":")
    cls = _REGISTRY.get(family)
    if cls is None or (value and cls.name_option is None):
        raise ValueError(f"unknown solver {name!r}; known solvers: {', '.join(available_solvers())}")
    if value:
        if cls.name_option in options:
            raise TypeError(f"solver {name!r} names its {cls.name_option} already; do not pass {cls.name_option}=")
        options = {cls.name_option: value, **options}
    accepted = _options_of(cls)
    unknown = set(options) - accepted
    if unknown:
        raise TypeError(f"solver {name!r} got unknown option(s) {sorted(unknown)}; it accepts {sorted(accepted)}")
    return cls(**options)
