r"""Calibrated time grids: the fixed-step grid that minimises a solver's own error on pilot paths.

A probability-flow solver with :math:`N` steps is only as good as where it puts them, and the standard
grids (uniform in time, quadratic, uniform in log-SNR, Karras) are rules of thumb that suit some models
and not others. :func:`calibrate_grid` fits the grid to the model and the solver instead. It solves the
PF-ODE tightly from a pilot batch of prior draws :math:`x_T^{(j)}`, :math:`j = 1..J`, and searches

.. math::

    \min_{T = t_0 > t_1 > \dots > t_N = \epsilon}\;
    \frac{1}{J D}\sum_{j=1}^{J} \big\|\Phi_{t_0 \dots t_N}(x_T^{(j)}) - x_\epsilon^{(j)}\big\|^2,

where :math:`\Phi` is the solver run on that grid and :math:`x_\epsilon^{(j)}` the reference end point.
The grid lives in normalised log-SNR :math:`u(t) = (\lambda(t) - \lambda(T)) / (\lambda(\epsilon) - \lambda(T))
\in [0, 1]` with :math:`u_i = \sum_{k < i} e^{z_k} / \sum_{k} e^{z_k}` and :math:`z_0 = 0`, so any real
:math:`z_1 \dots z_{N-1}` give a strictly decreasing grid with the right ends; Powell's derivative-free
method (:func:`scipy.optimize.minimize`) searches them on the logarithm of the error. It starts from the
standard grid with the lowest pilot error, so the result is never worse than those on the pilot batch.

The same idea, with other objectives, is behind per-model step schedules such as dynamic programming over
the ELBO (Watson et al. 2021), Align Your Steps (Sabour et al. 2024), GITS (Chen et al. 2024), LD3 (Tong et
al. 2024) and the time part of Bespoke solvers (Shaul et al. 2023). The pathwise loss above is LD3's objective
with its slack set to zero (LD3 descends its gradient through the solver; here Powell's method searches it).
Two others are offered as ``objective=``, each solved exactly by dynamic programming over a lattice of ``lattice``
times uniform in log-SNR (:math:`\tau_0 = T > \dots > \tau_{K-1} = \epsilon`): the grid is the :math:`N`-step
path through the lattice that minimises a sum of per-step costs :math:`C_{ab}` (:math:`a < b`), whatever the
solver that then runs on it. In the variance-exploding form :math:`y = x/m`, :math:`\sigma = s/m`, with Tweedie's
denoiser :math:`D(y, \sigma)`:

- ``"gits"`` (GITS): :math:`C_{ab}` is the mean squared error of one DDIM step from the reference trajectory of
  the pilot at :math:`\tau_a` to :math:`\tau_b`, :math:`y_b \approx D_a + (\sigma_b/\sigma_a)(y_a - D_a)`;
- ``"ays"`` (Align Your Steps' KL upper bound for the linearised sampler):
  :math:`C_{ab} = \sum_{a < k \le b} (\sigma_{k-1} - \sigma_k)\,\sigma_k^{-3}\,
  E\|D(x_0 + \sigma_k\varepsilon, \sigma_k) - D(x_0 + \sigma_a\varepsilon, \sigma_a)\|^2`, a Riemann sum of
  :math:`\int\sigma^{-3}\,E\|D(\sigma) - D(\sigma_a)\|^2 d\sigma` over the step, with :math:`x_0` the
  pilot's reference end points and one fixed :math:`\varepsilon` per path.

``loss="trimmed"`` drops the ``trim`` share of pilot paths with the largest error from the pathwise loss: in high
dimension a few paths that switch mixture component can dominate the mean.

The cost, one tight reference solve of the pilot batch plus at most ``max_evals`` solver runs on it (with
``"gits"``: a solve onto the lattice and ``lattice`` score evaluations; ``"ays"``: ``lattice`` score
evaluations), is paid once per (model, solver, steps); the grid is then passed as
``time_grid=`` to :func:`sdediff.sample` for every later batch. Check it on held-out starts: with few
pilot paths the calibrated grid can fit their particular errors (``CalibratedGrid.rmse`` is the pilot
error, an optimistic estimate); the share of the pilot kept out of the search (``holdout``) catches the
worst of it and then returns the standard grid instead.

A grid fitted for a trained run can be kept with it: :func:`save_calibrated_grid` adds it to the run folder's
``calibrated_grids.json`` (keyed by solver, options, steps, final time and checkpoint) and
:func:`load_calibrated_grid` finds it again; ``sdediff bench --run RUN --save-grids`` writes them and
``sdediff sample --time-grid calibrated`` uses a matching one instead of calibrating again.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor
from tqdm.auto import tqdm

from ._io import atomic_write, json_safe
from ._validate import check_choice, check_float, check_int
from .sampling import sample
from .sdes.base import SDE
from .sdes.linear import require_linear
from .solvers.base import FixedStepSolver, Solver, get_solver
from .solvers.grids import GRIDS

__all__ = ["CalibratedGrid", "calibrate_grid", "save_calibrated_grid", "load_calibrated_grid", "GRID_FILE"]

#: what a grid can be fitted to (module docstring)
OBJECTIVES = ("pathwise", "gits", "ays")
LOSSES = ("mse", "trimmed")
#: the file of a run folder that holds its calibrated grids
GRID_FILE = "calibrated_grids.json"
GRID_FORMAT = "sdediff-calibrated-grids"

#: a solver given as a function: (times from T to eps, x_T) -> x_eps
Runner = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class CalibratedGrid:
    """Result of :func:`calibrate_grid`.

    Attributes
    ----------
    times : Tensor
        ``steps + 1`` strictly decreasing times from ``T`` to ``eps`` (float64, CPU); pass them as
        ``time_grid=`` to :func:`sdediff.sample`.
    rmse : float
        Root-mean-square error per coordinate of the solver with ``times`` on the pilot starts the search
        used (all but the held-out share).
    start : str
        The standard grid the search started from (the one with the lowest pilot error).
    start_rmse : dict
        Pilot RMSE of each standard grid tried, by name.
    evals : int
        Solver runs of the search, the standard grids included.
    accepted : bool
        Whether the searched grid is returned; ``False`` when it did worse than the start grid on the
        held-out pilot starts (``holdout``), and ``times`` is then the start grid.
    holdout_rmse, start_holdout_rmse : float or None
        RMSE of the searched grid and of the start grid on the held-out pilot starts (``None`` without
        a holdout).
    reference_nfe : int or None
        Score evaluations of the reference solve (``None`` when ``reference`` was given).
    search_nfe : int or None
        Score evaluations of all solver runs of the search (``None`` for a solver given as a function).
    """

    times: Tensor
    rmse: float
    start: str
    start_rmse: dict[str, float] = field(default_factory=dict)
    evals: int = 0
    accepted: bool = True
    holdout_rmse: float | None = None
    start_holdout_rmse: float | None = None
    reference_nfe: int | None = None
    search_nfe: int | None = None


def calibrate_grid(sde: SDE, score_fn: Callable[[Tensor, Tensor], Tensor], x_T: Tensor, steps: int,
                   solver: str | Solver | Runner = "unipc", *, eps: float = 1e-3, reference: Tensor | None = None,
                   reference_tol: float | None = None, starts: Sequence[str] = ("uniform", "quadratic", "log_snr", "karras"),
                   max_evals: int = 1000, holdout: float = 0.25, progress: bool = False,
                   objective: str = "pathwise", loss: str = "mse", trim: float = 0.1, lattice: int = 100,
                   generator: torch.Generator | None = None, **solver_options: Any) -> CalibratedGrid:
    r"""Find the ``steps``-step time grid on which ``solver`` best reproduces the probability-flow ODE.

    Minimises the pilot mean squared error :math:`\frac{1}{JD}\sum_j \|\Phi(x_T^{(j)}) - x_\epsilon^{(j)}\|^2`
    over grids :math:`T = t_0 > \dots > t_N = \epsilon` (module docstring: parameterisation and method).
    The last ``holdout`` share of the pilot starts is kept out of the search and decides at the end
    between the searched grid and the standard grid it started from, whichever does better there: a grid
    fitted to a few hundred paths can learn their particular errors (in high dimension, which rare paths
    switch mixture component), and this check keeps such a grid from being returned.

    Parameters
    ----------
    sde : LinearSDE
        The forward SDE (its log-SNR parameterises the grid).
    score_fn : callable
        ``score_fn(x, t)``, the model the grid is calibrated for.
    x_T : Tensor
        Pilot starts ``(J, ...)`` drawn from the prior (e.g. ``sde.prior_sample``); a few hundred paths.
        Their dtype is used throughout (float64 gives the cleanest reference).
    steps : int
        Number of steps of the grid (at least 2).
    solver : str, Solver or callable
        A deterministic fixed-step solver of :func:`sdediff.sample` (name or instance, options in
        ``**solver_options``), or a function ``(times, x_T) -> x_eps`` running any other sampler on the
        given times (for example a k-diffusion sampler on the matching noise levels).
    eps : float
        Final time.
    reference : Tensor, optional
        The exact (tightly solved) end points of the pilot starts; by default solved here with the
        adaptive ``"ode"`` solver (dopri5) at ``rtol = atol = reference_tol``.
    reference_tol : float, optional
        Tolerance of that reference solve (default ``1e-8`` for float64 pilots, ``1e-5`` otherwise).
    starts : sequence of str
        Standard grids (names in :data:`sdediff.solvers.grids.GRIDS`) tried as starting points.
    max_evals : int
        Budget of solver runs for the search (Powell's method stops earlier once converged).
    holdout : float
        Share of the pilot starts (the last rows of ``x_T``) kept for that final check, in ``[0, 1)``;
        ``0`` returns the searched grid unchecked.
    progress : bool
        Show a progress bar over solver runs.
    objective : {"pathwise", "gits", "ays"}
        What the grid minimises (module docstring): the solver's pilot error (searched by Powell's method), or
        GITS's or Align Your Steps' cost, solved by dynamic programming on the lattice.
    loss : {"mse", "trimmed"}
        The pilot error: the mean squared error per coordinate, or that mean over all but the ``trim`` share of
        paths with the largest error (``rmse`` and the holdout figures are then its square root too).
    trim : float
        Share of paths ``loss="trimmed"`` leaves out, in ``[0, 1)``.
    lattice : int
        Lattice times of the dynamic programming objectives (more than ``steps``).
    generator : torch.Generator, optional
        The noise :math:`\varepsilon` of ``objective="ays"``.
    **solver_options
        Options of the solver (e.g. ``order=3``).

    Returns
    -------
    CalibratedGrid
        ``times`` for ``time_grid=``, the pilot RMSE and the cost of the search.

    Raises
    ------
    ValueError
        For fewer than 2 steps, a stochastic or adaptive solver, an empty pilot batch (or one too small to
        split for ``holdout``), a reference of the wrong shape, unknown start grids or a non-positive budget.
    """
    sde = require_linear(sde, "calibrate_grid")
    check_int("steps", steps, 2)
    if not isinstance(x_T, Tensor) or x_T.dim() < 1 or x_T.shape[0] < 1:
        raise ValueError("x_T must be a tensor of pilot starts with shape (batch, ...), batch >= 1")
    check_float("eps", eps, 0, sde.T, low_open=True, high_open=True)
    check_int("max_evals", max_evals)
    check_float("holdout", holdout, 0, 1, high_open=True)
    n_hold = math.ceil(holdout * x_T.shape[0])
    if x_T.shape[0] - n_hold < 1 or (holdout > 0 and n_hold < 1):
        raise ValueError(f"x_T has {x_T.shape[0]} pilot starts, too few to keep a share of {holdout} for the holdout")
    check_choice("objective", objective, OBJECTIVES)
    check_choice("loss", loss, LOSSES)
    check_float("trim", trim, 0, 1, high_open=True)
    if objective != "pathwise":
        check_int("lattice", lattice, steps + 1)
    unknown = [s for s in starts if s not in GRIDS]
    if unknown or not starts:
        raise ValueError(f"starts must name grids among {', '.join(GRIDS)}, got {list(starts)!r}")

    nfe = [0]  # score evaluations of the search's solver runs
    run = _runner(sde, score_fn, solver, steps, eps, solver_options, nfe)
    reference_nfe = None
    if reference_tol is None:
        reference_tol = 1e-8 if x_T.dtype == torch.float64 else 1e-5
    if reference is None:
        ref = _sample(sde, score_fn, x_T, "ode", 1, eps, None, {"rtol": reference_tol, "atol": reference_tol})
        reference, reference_nfe = ref.samples, ref.nfe
    elif not isinstance(reference, Tensor) or reference.shape != x_T.shape:
        got = tuple(reference.shape) if isinstance(reference, Tensor) else type(reference).__name__
        raise ValueError(f"reference must be a tensor shaped like x_T {tuple(x_T.shape)}, got {got}")

    lam_T, lam_eps = (float(v) for v in sde.log_snr(torch.tensor([sde.T, eps], dtype=torch.float64)))
    bar = tqdm(total=max_evals, desc=f"calibrating a {steps}-step grid", disable=not progress, leave=False)
    best: dict[str, Any] = {"loss": math.inf, "times": None}
    evals = 0

    def times_of(z: np.ndarray) -> Tensor:
        w = np.exp(np.concatenate([[0.0], z]) - max(0.0, float(z.max())))
        u = np.concatenate([[0.0], np.cumsum(w) / w.sum()])
        ts = sde.time_of_log_snr(torch.as_tensor(lam_T + (lam_eps - lam_T) * u, dtype=torch.float64), eps)
        ts[0], ts[-1] = sde.T, eps
        return ts

    def log_mse(ts: Tensor, x: Tensor, ref: Tensor) -> float:
        try:
            out = run(ts, x)
        except (FloatingPointError, RuntimeError):  # a grid that makes the solver blow up is just a bad grid
            return math.inf
        per_path = (out.to(ref.dtype) - ref).reshape(len(ref), -1).pow(2).mean(1)
        if loss == "trimmed":
            per_path = per_path.sort().values[:max(1, math.ceil((1 - trim) * len(per_path)))]
        mse = float(per_path.mean())
        return math.log(mse) if math.isfinite(mse) and mse > 0 else (-math.inf if mse == 0 else math.inf)

    def evaluate(ts: Tensor) -> float:
        """log of the pilot loss (``inf`` for a grid that is not strictly decreasing or a failed run)."""
        nonlocal evals
        if evals >= max_evals or not bool((ts[1:] < ts[:-1]).all()):
            return math.inf
        evals += 1
        bar.update()
        value = log_mse(ts, x_fit, ref_fit)
        if value < best["loss"]:
            best.update(loss=value, times=ts.clone())
        return value

    x_fit, ref_fit = x_T[:len(x_T) - n_hold], reference[:len(x_T) - n_hold]
    start_rmse, start_times = {}, {}
    z0, start = None, starts[0]
    for name in starts:
        ts = start_times[name] = GRIDS[name](sde, steps, eps)
        value = evaluate(ts)
        start_rmse[name] = math.exp(value / 2) if math.isfinite(value) else math.inf
        if z0 is None or start_rmse[name] < start_rmse[start]:
            u = (sde.log_snr(ts) - lam_T) / (lam_eps - lam_T)
            inc = torch.diff(u).clamp_min(1e-12).log()
            z0, start = (inc[1:] - inc[0]).numpy(), name
    if objective != "pathwise":
        lat = sde.time_of_log_snr(torch.linspace(lam_T, lam_eps, lattice, dtype=torch.float64), eps)
        lat[0], lat[-1] = sde.T, eps
        cost = (_gits_cost if objective == "gits" else _ays_cost)(sde, score_fn, x_fit, ref_fit, lat, reference_tol,
                                                                   generator)
        evaluate(lat[_cheapest_path(cost, steps)])
    elif evals < max_evals:
        minimize(lambda z: evaluate(times_of(z)), z0, method="Powell",
                 options={"maxfev": max_evals - evals, "xtol": 1e-3, "ftol": 1e-4})
    bar.close()
    if best["times"] is None:
        raise FloatingPointError("the solver failed on every grid tried (non-finite results or errors)")
    times, rmse, accepted, hold, start_hold = best["times"], math.exp(best["loss"] / 2), True, None, None
    if n_hold:
        x_hold, ref_hold = x_T[len(x_T) - n_hold:], reference[len(x_T) - n_hold:]
        hold, start_hold = (math.exp(log_mse(ts, x_hold, ref_hold) / 2) for ts in (times, start_times[start]))
        if not hold < start_hold:
            times, rmse, accepted = start_times[start], start_rmse[start], False
    return CalibratedGrid(times=times, rmse=rmse, start=start, start_rmse=start_rmse, evals=evals, accepted=accepted,
                          holdout_rmse=hold, start_holdout_rmse=start_hold, reference_nfe=reference_nfe,
                          search_nfe=None if _is_function(solver) else nfe[0])


def _cheapest_path(cost: Tensor, steps: int) -> Tensor:
    r"""Indices ``0 = i_0 < ... < i_N = K - 1`` minimising :math:`\sum_n C_{i_{n-1} i_n}` (dynamic programming;
    ``cost[a, b]`` for ``a < b``)."""
    k = cost.shape[0]
    step_cost = torch.where(torch.ones(k, k, dtype=torch.bool).triu(1), cost, torch.full_like(cost, math.inf))
    best = torch.full((k,), math.inf, dtype=cost.dtype)
    best[0] = 0.0
    back = []
    for _ in range(steps):  # best[b]: cheapest path from node 0 to b with the steps so far
        best, arg = (best[:, None] + step_cost).min(0)
        back.append(arg)
    path = [k - 1]
    for arg in reversed(back):
        path.append(int(arg[path[-1]]))
    return torch.tensor(path[::-1])


@torch.no_grad()
def _denoised(sde: SDE, score_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: float) -> Tensor:
    r"""Tweedie's :math:`\hat x_0` at ``(x, t)``."""
    tt = torch.full((len(x),), t, dtype=x.dtype, device=x.device)
    return sde.denoise(x, tt, score_fn(x, tt))


def _sigmas_and_means(sde: SDE, times: Tensor) -> tuple[Tensor, Tensor]:
    m, s = sde.mean_coeff(times), sde.marginal_std(times)
    return s / m, m


def _gits_cost(sde: SDE, score_fn: Callable[[Tensor, Tensor], Tensor], x_T: Tensor, ref: Tensor, times: Tensor,
               tol: float, generator: torch.Generator | None) -> Tensor:
    """GITS: mean squared error of one DDIM step between the pilot's reference trajectory at the lattice times."""
    traj = sample(sde, score_fn, x_T.shape, solver="ode", steps=len(times) - 1, eps=float(times[-1]), x_init=x_T,
                  time_grid=times.to(x_T.dtype), keep_trajectory=True, rtol=tol, atol=tol).trajectory
    sigma, m = _sigmas_and_means(sde, times)
    y = torch.stack([traj[k] / float(m[k]) for k in range(len(times))]).flatten(2).double()
    den = torch.stack([_denoised(sde, score_fn, traj[k], float(times[k])) for k in range(len(times))]).flatten(2).double()
    cost = torch.zeros(len(times), len(times), dtype=torch.float64)
    for a in range(len(times) - 1):
        ratio = (sigma[a + 1:] / sigma[a]).to(y)[:, None, None]
        pred = den[a] + ratio * (y[a] - den[a])  # DDIM from lattice time a to every later one, in y = x / m
        cost[a, a + 1:] = ((pred - y[a + 1:]) * m[a + 1:, None, None].to(y)).pow(2).mean((1, 2))
    return cost


def _ays_cost(sde: SDE, score_fn: Callable[[Tensor, Tensor], Tensor], x_T: Tensor, ref: Tensor, times: Tensor,
              tol: float, generator: torch.Generator | None) -> Tensor:
    """Align Your Steps: the KL upper bound of each step, a Riemann sum over the lattice (module docstring)."""
    sigma, m = _sigmas_and_means(sde, times)
    noise = torch.randn(ref.shape, generator=generator, dtype=ref.dtype, device=ref.device)
    den = torch.stack([_denoised(sde, score_fn, float(m[k]) * (ref + float(sigma[k]) * noise), float(times[k]))
                       for k in range(len(times))]).flatten(2).double()
    weight = torch.zeros(len(times), dtype=torch.float64)
    weight[1:] = (sigma[:-1] - sigma[1:]) / sigma[1:] ** 3
    cost = torch.zeros(len(times), len(times), dtype=torch.float64)
    for a in range(len(times) - 1):
        gap = (den[a + 1:] - den[a]).pow(2).sum(2).mean(1)  # E ||D(sigma_k) - D(sigma_a)||^2, k > a
        cost[a, a + 1:] = torch.cumsum(weight[a + 1:] * gap, 0)
    return cost


def _is_function(solver: object) -> bool:
    return callable(solver) and not isinstance(solver, (str, Solver))


def _sample(sde: SDE, score_fn: Callable[[Tensor, Tensor], Tensor], x_T: Tensor, solver: str | Solver, steps: int,
            eps: float, time_grid: Tensor | None, options: dict[str, Any]) -> Any:
    return sample(sde, score_fn, x_T.shape, solver=solver, steps=steps, eps=eps, x_init=x_T, return_info=True,
                  time_grid="uniform" if time_grid is None else time_grid, **options)


def _runner(sde: SDE, score_fn: Callable[[Tensor, Tensor], Tensor], solver: str | Solver | Runner, steps: int,
            eps: float, options: dict[str, Any], nfe: list[int]) -> Runner:
    """``(times, x_T) -> x_eps`` for ``solver``; runs of sdediff solvers add their NFE to ``nfe[0]``."""
    if _is_function(solver):
        if options:
            raise ValueError("solver options go into the function itself when solver is a function")
        return solver  # type: ignore[return-value]
    if not isinstance(solver, (str, Solver)):
        raise TypeError(f"solver must be a solver name, a Solver or a function (times, x_T) -> x_eps, got {solver!r}")
    instance = get_solver(solver, **options)
    if instance.stochastic:
        raise ValueError(f"calibrate_grid needs a deterministic fixed-step solver; {instance.name!r} is stochastic")
    if not isinstance(instance, FixedStepSolver):
        raise ValueError(f"calibrate_grid needs a deterministic fixed-step solver; {instance.name!r} chooses its own steps")

    def run(ts: Tensor, x: Tensor) -> Tensor:
        res = _sample(sde, score_fn, x, instance, steps, eps, ts, {})
        nfe[0] += res.nfe
        return res.samples

    return run


# --- calibrated grids kept in a run folder ------------------------------------------------------------------
def _grid_key(solver: str, options: dict[str, Any], steps: int, eps: float, checkpoint: str | None) -> dict[str, Any]:
    return {"solver": solver, "options": json_safe(dict(options)), "steps": int(steps), "eps": float(eps),
            "checkpoint": checkpoint}


def _read_grids(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is damaged (not valid JSON): {err}") from err
    if not isinstance(doc, dict) or doc.get("format") != GRID_FORMAT or not isinstance(doc.get("grids"), list):
        raise ValueError(f"{path} is not a calibrated-grid file (format {GRID_FORMAT!r})")
    return [g for g in doc["grids"] if isinstance(g, dict)]


def save_calibrated_grid(directory: str | os.PathLike, times: Tensor | Sequence[float], *, solver: str,
                         options: dict[str, Any] | None = None, steps: int, eps: float, checkpoint: str | None = None,
                         info: dict[str, Any] | None = None) -> Path:
    """Add a calibrated grid to ``directory/calibrated_grids.json`` (written atomically), replacing one with the same
    solver, options, steps, final time and checkpoint (the checkpoint's file name: a grid belongs to the weights it
    was fitted on). ``info`` (e.g. the calibration's figures) is stored beside it. Returns the file's path."""
    times = [float(t) for t in (times.tolist() if isinstance(times, Tensor) else times)]
    if len(times) != steps + 1 or any(b >= a for a, b in zip(times, times[1:], strict=False)):
        raise ValueError(f"times must be {steps + 1} strictly decreasing times for a {steps}-step grid")
    path = Path(directory) / GRID_FILE
    key = _grid_key(solver, options or {}, steps, eps, checkpoint)
    grids = [g for g in _read_grids(path) if {k: g.get(k) for k in key} != key]
    grids.append({**key, "times": times, **json_safe(dict(info or {}))})
    atomic_write(path, json.dumps({"format": GRID_FORMAT, "grids": grids}, indent=1) + "\n")
    return path


def load_calibrated_grid(directory: str | os.PathLike, *, solver: str, options: dict[str, Any] | None = None,
                         steps: int, eps: float, checkpoint: str | None = None) -> dict[str, Any] | None:
    """The entry of ``directory/calibrated_grids.json`` for this solver, options, steps, final time and checkpoint
    (``times`` and the stored figures), or ``None``. The file is JSON only; nothing in it is executed.

    Raises
    ------
    ValueError
        If the file exists but is damaged, or the matching entry's times are not a valid grid.
    """
    key = _grid_key(solver, options or {}, steps, eps, checkpoint)
    path = Path(directory) / GRID_FILE
    for g in reversed(_read_grids(path)):
        if {k: g.get(k) for k in key} == key:
            times = g.get("times")
            if not (isinstance(times, list) and len(times) == steps + 1 and all(isinstance(t, (int, float)) for t in times)
                    and all(b < a for a, b in zip(times, times[1:], strict=False))):
                raise ValueError(f"{path}: the grid for {solver} with {steps} steps is not {steps + 1} decreasing times")
            return g
    return None
