r"""Which solver and time grid suit *this* model, per budget of score evaluations (NFE), by measurement.

:func:`compare_on_model` takes any ``(sde, score_fn)`` (a trained run's, :func:`sdediff.load_run`, or an exact
score) and, from one batch of prior draws :math:`x_T^{(1..n)}`:

1. solves the probability flow tightly from them (the adaptive ``"ode"`` solver at ``reference_tol``, and once at
   ten times that tolerance to show how far the reference itself moves): the reference end points
   :math:`x_\epsilon^{(i)}`;
2. at every budget :math:`B` runs every deterministic solver (:data:`ODE_SOLVERS` and any other registered
   deterministic fixed-step solver) on every standard grid (:data:`sdediff.solvers.grids.GRIDS`) with the most
   steps whose NFE fits :math:`B` (the NFE per step is measured once per solver), and scores it by the pathwise
   error :math:`\mathrm{RMSE} = \big(\frac{1}{nD}\sum_i \|\hat x^{(i)} - x_\epsilon^{(i)}\|^2\big)^{1/2}`, the
   median over samples of :math:`\|\hat x^{(i)} - x_\epsilon^{(i)}\|/\sqrt D`, the wall time and, given held-out
   data, the sliced 2-Wasserstein distance :math:`SW_2` (:func:`sdediff.metrics.sliced_wasserstein`) of the
   samples to as many data points;
3. fits a grid to the model (:func:`sdediff.calibrate_grid`, on separate pilot draws) for the budget's best
   solver and scores it the same way;
4. runs the stochastic solvers (:data:`SDE_SOLVERS`) at each budget and reports their :math:`SW_2` to the data and
   to the reference ODE samples, next to the reference ODE samples' own :math:`SW_2` to the data and the *data
   floor* (:math:`SW_2` between two held-out sets of the same size, :func:`sdediff.metrics.noise_floor`);
5. recommends, per budget, the deterministic (solver, grid) with the lowest pathwise RMSE, on a standard grid and
   overall (the calibrated grid included).

``sdediff bench --run RUN`` runs it on a trained run, writes the tables, a JSON and a plot, and can save the
winning calibrated grids into the run (:func:`sdediff.calibrate.save_calibrated_grid`), where
``sdediff sample --time-grid calibrated`` finds them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ._io import atomic_write_file
from ._validate import check_float, check_int
from .calibrate import calibrate_grid
from .compare import markdown_table
from .metrics import Sampler, noise_floor, sliced_wasserstein
from .sampling import sample
from .sdes import SDE, LinearSDE
from .sdes.base import ScoreFn
from .solvers import available_solvers, get_solver
from .solvers.base import FixedStepSolver
from .solvers.grids import GRIDS

__all__ = ["SolverConfig", "ODE_SOLVERS", "SDE_SOLVERS", "ModelRow", "ModelComparison", "compare_on_model",
           "deterministic_solvers"]


@dataclass(frozen=True)
class SolverConfig:
    """A solver and its options, as :func:`compare_on_model` runs it (``label`` names its rows)."""

    solver: str
    options: dict[str, Any] = field(default_factory=dict)
    label: str | None = None

    @property
    def name(self) -> str:
        """The label, else the solver name with its options (``unipc order=2``)."""
        return self.label or " ".join([self.solver, *(f"{k}={v}" for k, v in sorted(self.options.items()))])


#: the deterministic solvers compared by default (other registered deterministic fixed-step solvers are added with
#: their default options by :func:`deterministic_solvers`)
ODE_SOLVERS: tuple[SolverConfig, ...] = (
    SolverConfig("euler"), SolverConfig("heun"), SolverConfig("ddim"),
    SolverConfig("dpm_solver", {"order": 2}, "dpm_solver-2M"), SolverConfig("dpm_solver", {"order": 3}, "dpm_solver-3M"),
    SolverConfig("lms"), SolverConfig("unipc", {"order": 2}, "unipc-2"), SolverConfig("unipc", {"order": 3}, "unipc-3"),
    SolverConfig("edm_heun"), SolverConfig("ipndm"), SolverConfig("deis"),
)
#: the stochastic solvers compared by default
SDE_SOLVERS: tuple[SolverConfig, ...] = (
    SolverConfig("euler_maruyama"), SolverConfig("reverse_diffusion"), SolverConfig("ancestral"),
    SolverConfig("sde_dpm_solver"), SolverConfig("pc"),
)


def deterministic_solvers(base: Sequence[SolverConfig] = ODE_SOLVERS) -> list[SolverConfig]:
    """``base`` (those registered) plus every other registered deterministic fixed-step solver with its defaults."""
    names = available_solvers()
    out = [c for c in base if c.solver in names]
    for name in names:
        if any(c.solver == name for c in base):
            continue
        try:
            solver = get_solver(name)
        except (TypeError, ValueError):  # a family placeholder such as "torchsde:<method>"
            continue
        if isinstance(solver, FixedStepSolver) and not solver.stochastic:
            out.append(SolverConfig(name))
    return out


@dataclass
class ModelRow:
    """One run of :func:`compare_on_model`.

    ``kind``: ``"ode"`` (deterministic: ``rmse``, ``median`` against the reference) or ``"sde"`` (``sw2_reference``:
    :math:`SW_2` to the reference ODE samples); ``grid``: a grid name or ``"calibrated"``; ``sw2``: :math:`SW_2` to
    held-out data (``None`` without data); ``error``: why the run failed (its figures are then ``None``).
    """

    budget: int
    kind: str
    label: str
    solver: str
    options: dict[str, Any]
    grid: str
    steps: int
    nfe: int | None = None
    seconds: float | None = None
    rmse: float | None = None
    median: float | None = None
    sw2: float | None = None
    sw2_reference: float | None = None
    error: str | None = None


@dataclass
class ModelComparison:
    """What :func:`compare_on_model` returns: its rows, calibrations and recommendations.

    Attributes
    ----------
    rows : list of ModelRow
    calibrations : dict of int to dict
        Per budget, the calibration (:class:`~sdediff.calibrate.CalibratedGrid` figures, ``times``, ``solver``,
        ``options``, ``label``, ``steps``, ``seconds``).
    recommended, recommended_standard : dict of int to ModelRow
        Per budget, the deterministic row with the lowest pathwise RMSE (any grid / standard grids only).
    budgets, n, eps : the settings.
    x_init : Tensor
        The prior draws every run started from.
    reference : dict
        The reference solve: ``tol``, ``nfe``, ``seconds``, ``check_rmse`` (RMS change at ten times the tolerance),
        ``rms`` (RMS of the end points), ``sw2`` (its samples to the data), ``data_floor`` and ``data_floor_sd``.
    """

    rows: list[ModelRow]
    calibrations: dict[int, dict[str, Any]]
    recommended: dict[int, ModelRow]
    recommended_standard: dict[int, ModelRow]
    budgets: tuple[int, ...]
    n: int
    eps: float
    reference: dict[str, Any]
    x_init: Tensor

    def as_dict(self) -> dict[str, Any]:
        """Everything but the prior draws as plain data (for a JSON document)."""
        return {"budgets": list(self.budgets), "n": self.n, "eps": self.eps, "reference": self.reference,
                "rows": [asdict(r) for r in self.rows], "calibrations": {str(k): v for k, v in self.calibrations.items()},
                "recommended": {str(b): asdict(r) for b, r in self.recommended.items()},
                "recommended_standard": {str(b): asdict(r) for b, r in self.recommended_standard.items()}}

    def recommendation_table(self) -> str:
        """Markdown: per budget, the recommended solver and grid, standard and overall."""
        rows = []
        for b in self.budgets:
            std, best = self.recommended_standard.get(b), self.recommended.get(b)
            rows.append({"b": b, "std": _pick(std), "std_rmse": _fmt(std.rmse if std else None),
                         "best": _pick(best), "best_rmse": _fmt(best.rmse if best else None)})
        return markdown_table(rows, [("b", "NFE ≤"), ("std", "recommended, standard grid"), ("std_rmse", "RMSE"),
                                     ("best", "recommended"), ("best_rmse", "RMSE")])

    def solver_table(self) -> str:
        """Markdown: each deterministic solver's pathwise RMSE on its best standard grid per budget (and the grid),
        then the calibrated grid's; each stochastic solver's sliced W2 to the data (or to the reference samples)."""
        def cell(rows: list[ModelRow], key: str) -> str:
            ok = [r for r in rows if r.error is None and getattr(r, key) is not None]
            if not ok:
                return "—" if not rows else "failed"
            r = min(ok, key=lambda r: getattr(r, key))
            return f"{_fmt(getattr(r, key), 4 if key != 'rmse' else 3)} ({r.grid})" if r.kind == "ode" else \
                _fmt(getattr(r, key), 4)

        table = []
        for kind, key in (("ode", "rmse"), ("sde", "sw2" if self.reference.get("sw2") is not None else "sw2_reference")):
            for label in dict.fromkeys(r.label for r in self.rows if r.kind == kind):
                mine = [r for r in self.rows if r.label == label and r.kind == kind and r.grid != "calibrated"]
                what = {"rmse": "pathwise RMSE (grid)", "sw2": "sliced W2 to data",
                        "sw2_reference": "sliced W2 to the reference samples"}[key]
                table.append({"label": label, "what": what,
                              **{str(b): cell([r for r in mine if r.budget == b], key) for b in self.budgets}})
        cal = [r for r in self.rows if r.grid == "calibrated"]
        if cal:
            table.append({"label": "calibrated grid", "what": "pathwise RMSE (solver)",
                          **{str(b): next((f"{_fmt(r.rmse)} ({r.label})" for r in cal if r.budget == b and r.rmse
                                           is not None), "—") for b in self.budgets}})
        if self.reference.get("sw2") is not None and any(r.kind == "sde" for r in self.rows):
            for label, value in (("reference ODE samples", self.reference["sw2"]),
                                 ("data floor (two held-out sets)", self.reference["data_floor"])):
                table.append({"label": label, "what": "sliced W2 to data", **{str(b): _fmt(value, 4) for b in self.budgets}})
        return markdown_table(table, [("label", "solver"), ("what", "figure"), *((str(b), f"NFE ≤ {b}")
                                                                                  for b in self.budgets)])

    def markdown(self) -> str:
        """The recommendation, each solver's best grid per budget, then every run."""
        ref = self.reference
        with_data = ref.get("sw2") is not None
        lines = [f"Reference: adaptive dopri5 at rtol = atol = {ref['tol']:g}, {ref['nfe']} NFE, {ref['seconds']:.1f} s; "
                 f"RMS change at 10x the tolerance {ref['check_rmse']:.1e} (RMS of the end points {ref['rms']:.3g})."
                 + (f" Its samples' sliced W2 to held-out data: {ref['sw2']:.4f}; data floor (two held-out sets of "
                    f"{self.n}): {ref['data_floor']:.4f} ± {ref['data_floor_sd']:.4f}." if with_data else ""), "",
                 self.recommendation_table(), "", self.solver_table(), ""]
        columns = [("label", "solver"), ("grid", "grid"), ("steps", "steps"), ("nfe", "NFE"), ("rmse", "pathwise RMSE"),
                   ("median", "median error"), ("seconds", "time (s)")] + ([("sw2", "sliced W2 to data")] if with_data else [])
        for kind, title in (("ode", "Deterministic solvers: pathwise error against the reference"),
                            ("sde", "Stochastic solvers: sliced W2")):
            rows = _sorted([r for r in self.rows if r.kind == kind], self.budgets)
            if not rows:
                continue
            cols = columns if kind == "ode" else [c for c in columns if c[0] not in ("rmse", "median")] + \
                [("sw2_reference", "sliced W2 to the reference ODE samples")]
            table = [{"budget": r.budget, "label": r.label, "grid": r.grid, "steps": r.steps,
                      "nfe": "—" if r.nfe is None else r.nfe,
                      "rmse": _fmt(r.rmse) if r.error is None else f"failed: {r.error[:60]}", "median": _fmt(r.median),
                      "seconds": "—" if r.seconds is None else f"{r.seconds:.2f}", "sw2": _fmt(r.sw2, 4),
                      "sw2_reference": _fmt(r.sw2_reference, 4) if r.error is None else f"failed: {r.error[:60]}"}
                     for r in rows]
            lines += [f"### {title}", "", markdown_table(table, [("budget", "NFE ≤"), *cols]), ""]
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path | None:
        """Error against NFE (log-log): each solver at its best standard grid per budget, the calibrated grids, and
        (with data) the stochastic solvers' sliced W2 beside the reference and the floor; ``None`` without matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        sde_rows = [r for r in self.rows if r.kind == "sde" and r.sw2 is not None]
        fig, axes = plt.subplots(1, 2 if sde_rows else 1, figsize=(11 if sde_rows else 6, 4.2), squeeze=False)
        ax = axes[0][0]
        labels = list(dict.fromkeys(r.label for r in self.rows if r.kind == "ode" and r.grid != "calibrated"))
        for label in labels:
            pts = []
            for b in self.budgets:
                ok = [r for r in self.rows if r.label == label and r.budget == b and r.grid != "calibrated"
                      and r.rmse is not None and math.isfinite(r.rmse) and r.rmse > 0]
                if ok:
                    pts.append(min(ok, key=lambda r: r.rmse))
            if pts:
                ax.plot([r.nfe for r in pts], [r.rmse for r in pts], "o-", ms=3, lw=1, label=label)
        cal = [r for r in self.rows if r.grid == "calibrated" and r.rmse is not None and r.rmse > 0]
        if cal:
            ax.plot([r.nfe for r in cal], [r.rmse for r in cal], "k*", ms=9, label="calibrated grid")
        ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="pathwise RMSE (best standard grid)",
               title="deterministic solvers")
        _budget_ticks(ax, self.budgets)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        if sde_rows:
            ax = axes[0][1]
            for label in dict.fromkeys(r.label for r in sde_rows):
                pts = [r for r in sde_rows if r.label == label]
                ax.plot([r.nfe for r in pts], [r.sw2 for r in pts], "s-", ms=3, lw=1, label=label)
            ax.axhline(self.reference["sw2"], color="k", ls="--", lw=1, label="reference ODE samples")
            ax.axhline(self.reference["data_floor"], color="grey", ls=":", lw=1, label="data floor")
            ax.set(xscale="log", xlabel="NFE", ylabel="sliced W2 to held-out data", title="stochastic solvers")
            _budget_ticks(ax, self.budgets)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(path)
        atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
        plt.close(fig)
        return path


def _budget_ticks(ax: Any, budgets: Sequence[int]) -> None:
    import matplotlib.ticker

    ax.set_xticks(list(budgets), [str(b) for b in budgets])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def _pick(r: ModelRow | None) -> str:
    return "—" if r is None else f"`{r.label}` on `{r.grid}` ({r.steps} steps)"


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "—"
    return "inf" if not math.isfinite(x) else (f"{x:.{digits}f}" if digits == 4 else f"{x:.{digits}g}")


def _order(r: ModelRow) -> tuple[float, str]:
    return (math.inf if r.rmse is None else r.rmse) if r.kind == "ode" else (math.inf if r.sw2 is None else r.sw2), r.label


def _sorted(rows: list[ModelRow], budgets: Sequence[int]) -> list[ModelRow]:
    return [r for b in budgets for r in sorted((r for r in rows if r.budget == b), key=_order)]


def compare_on_model(sde: SDE, score_fn: ScoreFn, shape: Sequence[int], budgets: Sequence[int] = (5, 10, 20, 50), *,
                     solvers: Sequence[SolverConfig] | None = None, stochastic: Sequence[SolverConfig] | None = None,
                     grids: Sequence[str] | None = None, n: int = 512, eps: float = 1e-3,
                     data: Sampler | Tensor | None = None, calibrate: bool = True, calibration_pilot: int = 256,
                     calibration_evals: int = 200, reference_tol: float | None = None,
                     generator: torch.Generator | None = None, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None, progress: bool = False,
                     report: Callable[[ModelRow], None] | None = None) -> ModelComparison:
    r"""Compare every solver and grid on one model at each NFE budget (module docstring) and recommend one per budget.

    Parameters
    ----------
    sde : SDE
        The forward SDE (grids other than ``"uniform"`` and the calibration need a :class:`~sdediff.LinearSDE`).
    score_fn : callable
        ``score_fn(x, t)``: the model.
    shape : sequence of int
        The shape of one sample, e.g. ``(2,)`` or ``(1, 8, 8)``.
    budgets : sequence of int
        NFE budgets; each solver gets the most steps whose NFE fits.
    solvers, stochastic : sequence of SolverConfig, optional
        Deterministic solvers (default :func:`deterministic_solvers`) and stochastic ones (default the registered
        :data:`SDE_SOLVERS`; ``()`` for none).
    grids : sequence of str, optional
        Standard grids (default every name in :data:`~sdediff.solvers.grids.GRIDS`).
    n : int
        Prior draws, shared by every run.
    eps : float
        Final time.
    data : callable or Tensor, optional
        Held-out data: ``data(k, generator)`` drawing ``k`` points, or a tensor of them (at least ``2 n`` rows; drawn
        from at random). Without it no sliced W2 to data is reported.
    calibrate : bool
        Fit a grid for each budget's best solver (linear SDEs).
    calibration_pilot, calibration_evals : int
        Pilot draws of the calibration (seeded apart from the ``n`` draws) and solver runs of its search.
    reference_tol : float, optional
        Tolerance of the reference solve (default ``1e-8`` in float64, else ``1e-5``).
    generator : torch.Generator, optional
        Seeds every draw (prior, pilot, solver noise, data, projections): the result is reproducible given its state.
    device, dtype : optional
        Of the prior draws (and so of every run).
    progress : bool
        A progress bar over the runs (and the calibrations' own).
    report : callable, optional
        Called with each :class:`ModelRow` as soon as it is measured.

    Returns
    -------
    ModelComparison
    """
    budgets = tuple(sorted({check_int("budgets", b) for b in budgets}))
    if not budgets:
        raise ValueError("budgets must hold at least one NFE budget")
    n, calibration_pilot = check_int("n", n, 2), check_int("calibration_pilot", calibration_pilot, 2)
    calibration_evals = check_int("calibration_evals", calibration_evals)
    check_float("eps", eps, 0, sde.T, low_open=True, high_open=True)
    shape, grids = tuple(shape), list(GRIDS) if grids is None else list(grids)
    unknown = [g for g in grids if g not in GRIDS]
    if unknown or not grids:
        raise ValueError(f"grids must name grids among {', '.join(GRIDS)}, got {list(grids)!r}")
    configs = deterministic_solvers() if solvers is None else list(solvers)
    noisy = [c for c in SDE_SOLVERS if c.solver in available_solvers()] if stochastic is None else list(stochastic)
    seed = 0 if generator is None else int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    device = torch.device(device) if device is not None else torch.device("cpu")

    def gen(k: int) -> torch.Generator:
        return torch.Generator(device).manual_seed(seed + k)

    x_T = sde.prior_sample((n, *shape), generator=gen(0), device=device, dtype=dtype)
    tol = reference_tol if reference_tol is not None else (1e-8 if x_T.dtype == torch.float64 else 1e-5)
    start = time.perf_counter()
    ref = sample(sde, score_fn, x_T.shape, solver="ode", eps=eps, x_init=x_T, rtol=tol, atol=tol, return_info=True)
    seconds = time.perf_counter() - start
    check = sample(sde, score_fn, x_T.shape, solver="ode", eps=eps, x_init=x_T, rtol=10 * tol, atol=10 * tol)
    x_ref = ref.samples
    reference: dict[str, Any] = {"tol": tol, "nfe": ref.nfe, "seconds": seconds,
                                 "check_rmse": float((check - x_ref).pow(2).mean().sqrt()),
                                 "rms": float(x_ref.pow(2).mean().sqrt()), "sw2": None}
    held, draw = None, _data_sampler(data, n)
    if draw is not None:
        held = draw(n, gen(3)).to(x_ref)
        floor = noise_floor(draw, n, repeats=4, generator=gen(4))
        reference.update(sw2=float(sliced_wasserstein(x_ref, held, generator=gen(5))), data_floor=float(floor.mean()),
                         data_floor_sd=float(floor.std()))

    costs = {c.name: _cost(sde, score_fn, c, x_T[:2], eps) for c in [*configs, *noisy]}
    total = sum(len(grids) for c in configs for b in budgets if _steps(costs[c.name], b)) + \
        sum(1 for c in noisy for b in budgets if _steps(costs[c.name], b)) + (len(budgets) if calibrate else 0)
    bar = tqdm(total=total, desc="comparing solvers", disable=not progress, leave=False)
    rows: list[ModelRow] = []

    def run(kind: str, c: SolverConfig, b: int, steps: int, grid: Any, grid_name: str) -> ModelRow:
        row = ModelRow(budget=b, kind=kind, label=c.name, solver=c.solver, options=dict(c.options), grid=grid_name,
                       steps=steps)
        try:
            t0 = time.perf_counter()
            info = sample(sde, score_fn, x_T.shape, solver=c.solver, steps=steps, eps=eps, x_init=x_T, generator=gen(2),
                          time_grid=grid, return_info=True, **c.options)
            row.seconds, row.nfe, x = time.perf_counter() - t0, info.nfe, info.samples
            if not bool(torch.isfinite(x).all()):
                raise FloatingPointError("non-finite samples")
            if kind == "ode":
                err = (x - x_ref).reshape(n, -1).pow(2).mean(1)
                row.rmse, row.median = float(err.mean().sqrt()), float(err.sqrt().median())
            else:
                row.sw2_reference = float(sliced_wasserstein(x, x_ref, generator=gen(6)))
            if held is not None:
                row.sw2 = float(sliced_wasserstein(x, held, generator=gen(5)))
        except (ValueError, RuntimeError, FloatingPointError, TypeError) as err:
            row.error = f"{type(err).__name__}: {err}".splitlines()[0]
        rows.append(row)
        bar.update()
        if report is not None:
            report(row)
        return row

    for b in budgets:
        for c in configs:
            steps = _steps(costs[c.name], b)
            for g in grids if steps else ():
                run("ode", c, b, steps, g, g)
    calibrations: dict[int, dict[str, Any]] = {}
    if calibrate and isinstance(sde, LinearSDE):
        pilot = sde.prior_sample((calibration_pilot, *shape), generator=gen(1), device=device, dtype=dtype)
        pilot_ref = sample(sde, score_fn, pilot.shape, solver="ode", eps=eps, x_init=pilot, rtol=tol, atol=tol)
        for b in budgets:
            best = _best([r for r in rows if r.kind == "ode" and r.budget == b])
            if best is None or best.steps < 2:
                bar.update()
                continue
            c = next(c for c in configs if c.name == best.label)
            t0 = time.perf_counter()
            try:
                cal = calibrate_grid(sde, score_fn, pilot, best.steps, c.solver, eps=eps, reference=pilot_ref,
                                     max_evals=calibration_evals, progress=progress, **c.options)
            except (ValueError, RuntimeError, FloatingPointError) as err:  # e.g. the solver failed on every grid
                calibrations[b] = {"label": c.name, "solver": c.solver, "error": f"{type(err).__name__}: {err}"}
                bar.update()
                continue
            calibrations[b] = {"label": c.name, "solver": c.solver, "options": dict(c.options), "steps": best.steps,
                               "eps": eps, "times": cal.times.tolist(), "pilot": calibration_pilot, "pilot_rmse": cal.rmse,
                               "start": cal.start, "start_rmse": cal.start_rmse[cal.start], "accepted": cal.accepted,
                               "holdout_rmse": cal.holdout_rmse, "start_holdout_rmse": cal.start_holdout_rmse,
                               "evals": cal.evals, "search_nfe": cal.search_nfe, "seconds": time.perf_counter() - t0}
            run("ode", c, b, best.steps, cal.times, "calibrated")
    for b in budgets:
        for c in noisy:
            steps = _steps(costs[c.name], b)
            if steps:
                run("sde", c, b, steps, "uniform", "uniform")
    bar.close()
    ode = [r for r in rows if r.kind == "ode"]
    recommended = {b: r for b in budgets if (r := _best([r for r in ode if r.budget == b])) is not None}
    standard = {b: r for b in budgets if (r := _best([r for r in ode if r.budget == b and r.grid != "calibrated"]))}
    return ModelComparison(rows=rows, calibrations=calibrations, recommended=recommended, recommended_standard=standard,
                           budgets=budgets, n=n, eps=eps, reference=reference, x_init=x_T)


def _data_sampler(data: Sampler | Tensor | None, n: int) -> Sampler | None:
    """``data`` as a sampler ``(k, generator) -> Tensor`` (a tensor is drawn from without replacement)."""
    if data is None or callable(data):
        return data
    if not isinstance(data, Tensor) or data.dim() < 2 or len(data) < 2 * n:
        raise ValueError(f"data must be a sampler (k, generator) -> Tensor or a tensor of at least 2 n = {2 * n} points")

    def draw(k: int, generator: torch.Generator | None) -> Tensor:
        idx = torch.randperm(len(data), generator=None if generator is None else
                             torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator))))
        return data[idx[:k]]

    return draw


def _cost(sde: SDE, score_fn: ScoreFn, c: SolverConfig, x: Tensor, eps: float) -> tuple[float, float] | None:
    """NFE ``= a steps + b`` of ``c`` from runs of 4 and 8 steps on ``x``; ``None`` if it cannot run here."""
    try:
        n4, n8 = (sample(sde, score_fn, x.shape, solver=c.solver, steps=k, eps=eps, x_init=x, return_info=True,
                         **c.options).nfe for k in (4, 8))
    except (ValueError, RuntimeError, FloatingPointError, TypeError):
        return None
    a = (n8 - n4) / 4
    return (a, n4 - 4 * a) if a > 0 else None


def _steps(cost: tuple[float, float] | None, budget: int) -> int:
    """The most steps whose NFE fits ``budget`` (0: none, or the solver cannot run)."""
    if cost is None:
        return 0
    return max(0, int(math.floor((budget - cost[1]) / cost[0] + 1e-9)))


def _best(rows: list[ModelRow]) -> ModelRow | None:
    ok = [r for r in rows if r.error is None and r.rmse is not None and math.isfinite(r.rmse)]
    return min(ok, key=lambda r: r.rmse) if ok else None
