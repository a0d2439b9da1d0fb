r"""Forward simulation of an SDE: the path of :math:`dx = f(x,t)\,dt + g(t)\,dw` at requested times.

:func:`simulate` integrates the *forward* SDE of any :class:`~sdediff.SDE` (built-in, linear or custom)
from a state ``x0`` at ``t0`` and returns the states at the requested times. It is the Monte Carlo side
of the Fokker–Planck equation :math:`\partial_t p = -\nabla\cdot(f p) + \tfrac12 g^2\Delta p`: for a linear
SDE its samples must follow the closed-form kernel :meth:`~sdediff.LinearSDE.marginal`, which the tests
check. It also draws noised data for losses that do not know the noise (sliced score matching).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torchsde
from torch import Tensor

from ._utils import all_finite, batch_time, expand_as
from ._validate import check_float
from .processes import ReverseProcess
from .sdes.base import SDE
from .sdes.linear import require_linear
from .solvers.base import FixedStepSolver, integrate
from .solvers.stochastic import TORCHSDE_METHODS

SOLVERS = ("euler_maruyama", "exact", "torchsde:<method>")


class _ForwardEulerMaruyama(FixedStepSolver):
    r"""Euler–Maruyama on the forward SDE: :math:`x \leftarrow x + f(x,t)\,h + g(t)\sqrt h\,z`, :math:`h > 0`."""

    name = "simulate:euler_maruyama"

    def step(self, process: ReverseProcess, state: None, x: Tensor, t: Tensor, t_next: Tensor) -> tuple[Tensor, None]:
        sde, tb = process.sde, t.expand(x.shape[0])
        h = t_next - t
        x_new = torch.addcmul(x, h, sde.drift(x, tb))
        return torch.addcmul(x_new, expand_as(sde.diffusion(tb) * h.sqrt(), x), process.noise(x)), state


class _ForwardExact(FixedStepSolver):
    r"""The exact Gaussian transition of a linear SDE: :math:`x \leftarrow r\,x + \sigma z` with
    :math:`r = m(t_{next})/m(t)`, :math:`\sigma^2 = s(t_{next})^2 - r^2 s(t)^2` (:meth:`LinearSDE.transition`)."""

    name = "simulate:exact"

    def start(self, sde: SDE, ts: Tensor, x: Tensor) -> None:
        require_linear(sde, "solver 'exact'")

    def step(self, process: ReverseProcess, state: None, x: Tensor, t: Tensor, t_next: Tensor) -> tuple[Tensor, None]:
        nb = t_next.expand(x.shape[0])
        r, sigma = process.sde.transition(nb, (t_next - t).expand(x.shape[0]))
        return torch.addcmul(expand_as(r, x) * x, expand_as(sigma, x), process.noise(x)), state


class _TorchSDEForward(torch.nn.Module):
    """The forward SDE on flat ``(batch, d)`` states for torchsde (additive diagonal noise)."""

    noise_type = "diagonal"

    def __init__(self, sde: SDE, shape: tuple[int, ...], sde_type: str) -> None:
        super().__init__()
        self.sde, self.shape, self.sde_type = sde, shape, sde_type

    def f(self, t: Tensor, y: Tensor) -> Tensor:
        x = y.reshape(self.shape)
        return self.sde.drift(x, batch_time(t, x)).reshape(y.shape)

    def g(self, t: Tensor, y: Tensor) -> Tensor:
        return self.sde.diffusion(batch_time(t, y))[:, None].expand_as(y)


def _no_score(x: Tensor, t: Tensor) -> Tensor:
    raise RuntimeError("forward simulation uses no score")


def _check_times(ts: Sequence[float] | Tensor, t0: float, sde: SDE) -> Tensor:
    times = torch.as_tensor(ts, dtype=torch.float64).detach().cpu()
    if times.dim() != 1 or len(times) < 1 or not bool(torch.isfinite(times).all()):
        raise ValueError(f"ts must be a non-empty 1-d sequence of finite times, got {ts!r}")
    if float(times[0]) < t0 or bool((times.diff() < 0).any()) or float(times[-1]) > sde.T:
        raise ValueError(f"ts must be non-decreasing times in [t0={t0}, T={sde.T}], got {times.tolist()}")
    return times


def simulate(sde: SDE, x0: Tensor, ts: Sequence[float] | Tensor, solver: str = "euler_maruyama", *,
             t0: float = 0.0, dt: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    r"""Integrate the forward SDE :math:`dx = f(x,t)\,dt + g(t)\,dw` from ``x0`` at ``t0``; the path at ``ts``.

    Each interval between consecutive output times is split into :math:`\lceil \Delta t / dt\rceil` equal
    steps of

    * ``"euler_maruyama"``: :math:`x \leftarrow x + f(x,t)\,h + g(t)\sqrt h\,z` (any SDE; weak order 1);
    * ``"exact"``: the exact Gaussian transition :math:`x \leftarrow r x + \sigma z`,
      :math:`r = m(t+h)/m(t)`, :math:`\sigma^2 = s(t+h)^2 - r^2 s(t)^2` (linear SDEs only: no
      discretisation error, so it takes one step per interval and ignores ``dt``);
    * ``"torchsde:<method>"``: ``torchsde.sdeint`` with that method (``euler``, ``milstein``, ``srk``,
      ``heun``, ``midpoint``, ...) and fixed step ``dt``; the noise is additive, so Itô and Stratonovich agree.

    Parameters
    ----------
    sde : SDE
        Any forward SDE (a custom one needs only ``drift`` and ``diffusion``).
    x0 : Tensor
        The state at ``t0``, ``(batch, ...)``, floating point.
    ts : sequence of float or Tensor
        Non-decreasing output times in ``[t0, T]``.
    solver : str
        ``"euler_maruyama"`` (default), ``"exact"`` or ``"torchsde:<method>"``.
    t0 : float
        Time of ``x0`` (default 0).
    dt : float, optional
        Largest step (default ``T / 1000``).
    generator : torch.Generator, optional
        Source of the noise (for torchsde: one seed drawn from it seeds its Brownian interval).

    Returns
    -------
    Tensor
        ``(len(ts), *x0.shape)``: the states at ``ts`` (``x0`` itself where a time equals ``t0``).
    """
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdediff.SDE, got {type(sde).__name__}")
    if not isinstance(x0, Tensor) or not x0.is_floating_point() or x0.dim() < 1:
        raise TypeError("x0 must be a floating-point tensor of shape (batch, ...)")
    t0 = check_float("t0", t0, 0.0, sde.T, high_open=True)
    dt = sde.T / 1000 if dt is None else check_float("dt", dt, 0.0, low_open=True)
    times = _check_times(ts, t0, sde)
    family, _, method = solver.partition(":") if isinstance(solver, str) else ("", "", "")
    if family == "torchsde":
        return _simulate_torchsde(sde, x0, times, float(t0), float(dt), method, generator)
    if solver not in ("euler_maruyama", "exact"):
        raise ValueError(f"unknown solver {solver!r}; known: {', '.join(SOLVERS)}")
    stepper = _ForwardEulerMaruyama() if solver == "euler_maruyama" else _ForwardExact()
    # a grid through t0 and every output time, each interval cut into equal steps of at most dt
    knots = torch.cat([torch.tensor([float(t0)], dtype=torch.float64), times])
    pieces, out_index = [knots[:1]], [0]
    step = math.inf if solver == "exact" else dt  # the exact transition needs no sub-steps
    for a, b in zip(knots[:-1].tolist(), knots[1:].tolist(), strict=True):
        n = max(1, math.ceil((b - a) / step - 1e-9)) if b > a else 0
        pieces.append(torch.linspace(a, b, n + 1, dtype=torch.float64)[1:])
        out_index.append(out_index[-1] + n)
    grid = torch.cat(pieces).to(device=x0.device, dtype=x0.dtype)
    wanted = {i: [] for i in out_index[1:]}
    for k, i in enumerate(out_index[1:]):
        wanted[i].append(k)
    states: list[Tensor | None] = [x0 if i == 0 else None for i in out_index[1:]]

    def record(i: int, t: Tensor, x: Tensor) -> None:
        for k in wanted.get(i + 1, ()):
            states[k] = x

    # the steppers read only the SDE and the noise of the process (the forward SDE needs no score)
    integrate(stepper, ReverseProcess(sde, _no_score, noise_scale=0.0, generator=generator), x0, grid, callback=record)
    return torch.stack(states)


def _simulate_torchsde(sde: SDE, x0: Tensor, times: Tensor, t0: float, dt: float, method: str,
                       generator: torch.Generator | None) -> Tensor:
    if method not in TORCHSDE_METHODS:
        raise ValueError(f"unknown torchsde method {method!r}; for additive diagonal noise torchsde offers: "
                         f"{', '.join(sorted(TORCHSDE_METHODS))}")
    sde_type, levy_area = TORCHSDE_METHODS[method]
    u = torch.unique(torch.cat([torch.tensor([t0], dtype=torch.float64), times]))  # torchsde wants increasing times
    flat = x0.reshape(x0.shape[0], -1)
    if len(u) == 1:
        return x0.expand(len(times), *x0.shape).clone()
    gen_device = generator.device if generator is not None else "cpu"
    seed = int(torch.randint(2**62, (1,), generator=generator, device=gen_device))
    bm = torchsde.BrownianInterval(t0=float(u[0]), t1=float(u[-1]), size=tuple(flat.shape), dtype=x0.dtype,
                                   device=x0.device, entropy=seed, dt=dt, levy_area_approximation=levy_area)
    ys = torchsde.sdeint(_TorchSDEForward(sde, tuple(x0.shape), sde_type), flat, u, bm=bm,
                         method=method, dt=dt)
    out = ys[torch.searchsorted(u, times).to(ys.device)].reshape(len(times), *x0.shape)
    if not all_finite(out):
        raise FloatingPointError(f"simulate with 'torchsde:{method}' produced non-finite values; check the SDE "
                                 "and dt")
    return out
