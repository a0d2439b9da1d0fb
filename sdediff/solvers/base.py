"""Solver objects, the registry of names, and the one fixed-step time loop they share.

A fixed-step solver is a small object with a :meth:`FixedStepSolver.step` that maps the state at
``t`` to the state at ``t_next < t``; :func:`integrate` owns the loop (progress bar, callbacks,
trajectory, finiteness check) for all of them. Solvers that choose their own steps (adaptive ODE)
override :meth:`Solver.solve` instead.
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

from .._utils import randn_like
from ..processes import CountedScore
from ..sdes.base import SDE

Callback = Callable[[int, Tensor, Tensor], None]

_REGISTRY: dict[str, type[Solver]] = {}


@dataclass
class Context:
    """What a solver sees during one run.

    ``state`` is scratch space for the solver (e.g. a multistep history; reset it in ``start``);
    ``stats`` is reported to the user in :attr:`sdediff.SampleResult.stats`. :func:`integrate` sets
    ``index`` to the number of the grid step being taken (so ``step`` can read coefficients precomputed
    in ``start``), ``out`` to a buffer that :meth:`buffer` hands out, and ``observed`` to whether anyone sees
    the states a step returns besides the next step (a callback, a kept trajectory): a solver whose
    internal state differs from the one it reports (UniPC carries its predictor) forms the reported
    state only then.
    """

    sde: SDE
    score: CountedScore
    generator: torch.Generator | None = None
    state: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    index: int = 0
    out: Tensor | None = None
    observed: bool = True
    _noise: Tensor | None = field(default=None, repr=False)

    def buffer(self, like: Tensor) -> Tensor:
        """A tensor like ``like`` for ``step`` to write its new state into (``out=`` / in-place ops).

        Inside :func:`integrate` this is a buffer reused from step to step (or the trajectory's slot), which
        shares no memory with the step's input state: writing into it allocates nothing. A solver that
        uses it must take it at most once per step, return it as the new state, and keep no earlier
        state across steps (two steps later the buffer is written again). Elsewhere it is a new tensor.
        """
        out = self.out
        return torch.empty_like(like) if out is None else out

    def noise(self, like: Tensor) -> Tensor:
        """Standard normal noise like ``like``, drawn with :attr:`generator` (the numbers of
        :func:`sdediff._utils.randn_like`) into a buffer that the next call overwrites: use it within the step."""
        buf = self._noise
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._noise = torch.empty_like(like, memory_format=torch.contiguous_format)
        gen = self.generator
        if gen is None or (gen.device.type == buf.device.type and buf.device.index in (None, gen.device.index)):
            return torch.randn(buf.shape, generator=gen, out=buf)
        return buf.copy_(randn_like(buf, gen))


class Solver:
    """Base class of all solvers. Subclasses set ``name`` and register with :func:`register_solver`."""

    name: str = ""
    #: whether the solver draws random numbers (and so uses the generator)
    stochastic: bool = False
    #: for a family registered as ``"family"``: the option that ``"family:value"`` sets (e.g. ``"method"``)
    name_option: str | None = None

    def solve(self, ctx: Context, x: Tensor, ts: Tensor, *, callback: Callback | None = None,
              progress: bool = False, keep_trajectory: bool = False) -> tuple[Tensor, Tensor | None]:
        """Integrate from ``ts[0]`` to ``ts[-1]``; return the final state and, if asked, the states at ``ts``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


class FixedStepSolver(Solver):
    """A solver that advances on a given time grid; subclasses implement :meth:`step`."""

    def start(self, ctx: Context, x: Tensor, ts: Tensor) -> None:
        """Called once before the loop: check the SDE suits the solver, reset per-run state."""

    def step(self, ctx: Context, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        """Advance ``x`` from time ``t`` to ``t_next`` (0-d tensors, ``t_next < t``)."""
        raise NotImplementedError

    def solve(self, ctx: Context, x: Tensor, ts: Tensor, *, callback: Callback | None = None,
              progress: bool = False, keep_trajectory: bool = False) -> tuple[Tensor, Tensor | None]:
        return integrate(self, ctx, x, ts, callback=callback, progress=progress,
                         keep_trajectory=keep_trajectory)


@torch.no_grad()
def integrate(solver: FixedStepSolver, ctx: Context, x: Tensor, ts: Tensor, *,
              callback: Callback | None = None, progress: bool = False,
              keep_trajectory: bool = False) -> tuple[Tensor, Tensor | None]:
    """The time loop every fixed-step solver shares (without autograd, see :func:`sdediff.sample`).

    Runs ``solver.step`` over consecutive pairs of ``ts`` with no host synchronisation. Each step's
    new state is summed into a preallocated record (one reduction: a NaN or Inf anywhere makes the sum
    non-finite), which is checked once, at the end, where a :class:`FloatingPointError` names the first
    step and time that went non-finite. Without a callback the loop lends the solver (through
    :meth:`Context.buffer`) the state of two steps back, which the loop made and nobody else holds, or
    with ``keep_trajectory`` the trajectory's own slot, so a step that writes into it allocates nothing.

    Returns
    -------
    (x, trajectory) : the state at ``ts[-1]`` and, with ``keep_trajectory``, a tensor
    ``(len(ts), *x.shape)`` of the states at every time in ``ts`` (else ``None``).
    """
    n = len(ts) - 1
    solver.start(ctx, x, ts)
    sums, dims = torch.empty(n, dtype=x.dtype, device=x.device), tuple(range(x.dim()))
    trajectory = torch.empty((n + 1, *x.shape), dtype=x.dtype, device=x.device) if keep_trajectory else None
    if trajectory is not None:
        trajectory[0].copy_(x)
    reuse = trajectory is None and callback is None  # a callback may keep the states it is given
    ctx.observed = not reuse
    spare = None  # a state made by an earlier step, free to be written again
    times, records = ts.unbind(), sums.unbind()  # 0-d views, made once: a step indexes Python tuples
    try:
        for i in tqdm(range(n), desc=solver.name, leave=False) if progress else range(n):  # no bar object unless shown
            out = trajectory[i + 1] if trajectory is not None else spare
            ctx.index, ctx.out = i, out
            x_new = solver.step(ctx, x, times[i], times[i + 1])
            if trajectory is not None and x_new is not out:
                out.copy_(x_new)
            if reuse and i > 0 and x_new is not x:  # x came from step i - 1, not from the caller
                spare = x
            x = x_new
            torch.sum(x, dims, out=records[i])
            if callback is not None:
                callback(i, times[i + 1], x)
    finally:
        ctx.out, ctx.observed = None, True
    bad = ~torch.isfinite(sums)
    if bool(bad.any()):
        k = int(bad.nonzero()[0, 0])
        raise FloatingPointError(
            f"solver {solver.name!r} produced non-finite values at step {k} of {n} (t = {float(ts[k]):.6g} -> "
            f"{float(ts[k + 1]):.6g}); check the score function and the time grid (eps)")
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
