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

from .._utils import all_finite, randn_like
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
    in ``start``), ``out`` to a buffer that :meth:`buffer` hands out, ``owned`` to the step's input state
    when the loop may let the step overwrite it (see :meth:`buffer`), and ``observed`` to whether anyone
    sees the states a step returns besides the next step (a callback, a kept trajectory): a solver whose
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
    owned: Tensor | None = None
    _noise: Tensor | None = field(default=None, repr=False)

    def buffer(self, like: Tensor, inplace: bool = False) -> Tensor:
        """A tensor like ``like`` for ``step`` to write its new state into (``out=`` / in-place ops).

        Inside :func:`integrate` this is a buffer reused from step to step (or the trajectory's slot), which
        shares no memory with the step's input state: writing into it allocates nothing. A solver that
        uses it must take it at most once per step, return it as the new state, and keep no earlier
        state across steps (two steps later the buffer is written again). Elsewhere it is a new tensor.

        With ``inplace=True`` it is ``like`` itself where ``like`` is :attr:`owned`, the step's input state when
        the loop made it and nobody else holds it (no callback or trajectory sees it, and it is not the
        caller's start): the update then reads and writes the state in the same pass, which saves a pass
        over memory per step. Ask for it only once the step has read all it needs of its input (evaluated
        the score at it), or for an elementwise update of it.
        """
        if inplace and like is self.owned:
            return like
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

    Runs ``solver.step`` over consecutive pairs of ``ts`` with no host synchronisation. Each step copies
    the first element of every sample of its new state into a preallocated record (the cheapest tensor
    operation there is; a reduction over the whole state costs a pass more per step). At the end one
    pass checks the whole final state, and a :class:`FloatingPointError` names the first step whose
    record went non-finite: non-finite values are absorbing (every update scales the state, and a network
    spreads a NaN in one element over its sample), so a step that produces them shows in its record or
    the next one, and always in the final state. Without a callback the loop lends the solver (through
    :meth:`Context.buffer`) the state of two steps back, which the loop made and nobody else holds (or the
    step's own input, to a step that asks to update in place), or with ``keep_trajectory`` the trajectory's
    own slot, so a step that writes into it allocates nothing.

    Returns
    -------
    (x, trajectory) : the state at ``ts[-1]`` and, with ``keep_trajectory``, a tensor
    ``(len(ts), *x.shape)`` of the states at every time in ``ts`` (else ``None``).
    """
    n = len(ts) - 1
    solver.start(ctx, x, ts)
    first = (slice(None),) + (0,) * (x.dim() - 1)  # x[first]: the first element of every sample, a view
    firsts = torch.empty((n, x.shape[0]), dtype=x.dtype, device=x.device)
    trajectory = torch.empty((n + 1, *x.shape), dtype=x.dtype, device=x.device) if keep_trajectory else None
    if trajectory is not None:
        trajectory[0].copy_(x)
    reuse = trajectory is None and callback is None  # a callback may keep the states it is given
    ctx.observed = not reuse
    spare = None  # a state made by an earlier step, free to be written again
    times, records = ts.unbind(), firsts.unbind()  # views, made once: a step indexes Python tuples
    try:
        for i in tqdm(range(n), desc=solver.name, leave=False) if progress else range(n):  # no bar object unless shown
            out = trajectory[i + 1] if trajectory is not None else spare
            ctx.index, ctx.out, ctx.owned = i, out, x if reuse and i > 0 else None
            x_new = solver.step(ctx, x, times[i], times[i + 1])
            if trajectory is not None and x_new is not out:
                out.copy_(x_new)
            if reuse and i > 0 and x_new is not x:  # x came from step i - 1, not from the caller
                spare = x
            x = x_new
            records[i].copy_(x[first])
            if callback is not None:
                callback(i, times[i + 1], x)
    finally:
        ctx.out, ctx.observed, ctx.owned = None, True, None
    bad = ~torch.isfinite(firsts).all(1)
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
