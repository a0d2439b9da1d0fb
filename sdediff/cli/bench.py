"""``sdediff bench``: the built-in solver comparison, :func:`sdediff.compare.compare_solvers` on an analytic 2-D
Gaussian mixture with its exact score (so every error is the solver's), and :func:`sdediff.compare.compare_likelihood`
of the exact ODE likelihood; writes metrics.json, table.md and samples.png. With ``--run RUN``: which solver and grid
suit that trained model per NFE budget (:func:`sdediff.compare_model.compare_on_model`), written as table.md,
metrics.json and error_vs_nfe.png, the winning calibrated grids optionally saved into the run
(:func:`sdediff.calibrate.save_calibrated_grid`). It needs only the installed package; the fuller benchmark scripts
against other libraries are ``python benchmarks/NAME.py`` in a source checkout."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from .._io import atomic_write
from ..calibrate import save_calibrated_grid
from ..compare import DEFAULT_SOLVERS, ComparisonRow, compare_likelihood, compare_solvers
from ..compare_model import ModelComparison, compare_on_model
from ..data import GaussianMixture
from ..data.toy import TOY_DATASETS, make_toy
from .common import (
    add_plot,
    check_output_folder,
    make_sde,
    open_run,
    pick_device,
    print_written,
    scatter_png,
    set_threads,
    write_json,
)

EPS = 1e-3  # final time of the solvers and start of the likelihood ODE
LIKELIHOOD_POINTS = 256  # at most this many reference points go through the exact likelihood


def bench_mixture() -> GaussianMixture:
    """The benchmark's data law: 8 isotropic components (std 0.35) on a circle of radius 4."""
    return GaussianMixture.ring(num_components=8, radius=4.0, std=0.35)


def run(args: argparse.Namespace) -> int:
    """``sdediff bench``: sample the analytic mixture with several solvers and check against exact samples; with
    ``--run``, compare solvers on that run's model."""
    if args.run is not None or args.checkpoint is not None:
        return run_model(args)
    args.n = args.n or 2000
    device = pick_device(args.device)
    check_output_folder(args.out or "sdediff-bench")  # before the comparison, so that a finished result is not lost
    threads = set_threads(args.threads, device, small=True)
    dtype = torch.float64 if args.float64 else torch.float32
    sde = make_sde(args)
    truth = bench_mixture()
    score = truth.score_fn(sde)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    print(f"sdediff {__version__} bench: {args.n} samples of an 8-component 2-D Gaussian mixture under {sde!r}, exact "
          f"score; device={device}, dtype={dtype}, {threads}")
    result = compare_solvers(sde, score, (2,), DEFAULT_SOLVERS, n=args.n, eps=EPS, truth=truth, generator=gen,
                             device=device, dtype=dtype, progress=args.progress)
    points = result.reference[:LIKELIHOOD_POINTS].double()
    lik = compare_likelihood(sde, score, truth, points, eps=EPS)
    likelihood = {"points": lik.points, "nfe": lik.nfe, "seconds": round(lik.seconds, 2),
                  "mean_log_prob": round(lik.mean_log_prob, 4), "mean_exact_log_prob": round(lik.mean_exact_log_prob, 4),
                  "max_abs_error_with_exact_prior": lik.max_abs_error_with_exact_prior}
    table = result.markdown()
    lik_line = (f"exact likelihood via the probability-flow ODE ({lik.points} points, float64, exact trace): "
                f"{lik.nfe} NFE, {likelihood['seconds']} s, mean log p = {likelihood['mean_log_prob']} "
                f"(exact {likelihood['mean_exact_log_prob']}); with the exact p_T at the latent, max error "
                f"{lik.max_abs_error_with_exact_prior:.1e} nats")
    print()
    print(table)
    print()
    print(lik_line)

    out = Path(args.out or "sdediff-bench")
    write_json(out / "metrics.json", {"sde": repr(sde), "n": args.n, "seed": args.seed, "eps": EPS,
                                      "solvers": [_row_record(r) for r in result.rows], "likelihood": likelihood})
    atomic_write(out / "table.md", table + "\n\n" + lik_line + "\n")
    written: list[Path | None] = [out / "metrics.json", out / "table.md"]
    if args.plot:
        add_plot(written, scatter_png(out / "samples.png", {"exact p_eps": result.reference, **result.samples},
                                      reference="exact p_eps"))
    print()
    print_written(written)
    return 0


def run_model(args: argparse.Namespace) -> int:
    """``sdediff bench --run RUN``: :func:`~sdediff.compare_model.compare_on_model` on the run's model, held-out data
    from its toy set (where it has one), tables, JSON, plot and, with ``--save-grids``, the winning calibrated grids."""
    device = pick_device(args.device)
    trained = open_run(args.run, args.checkpoint, device, ema=not args.raw_weights)
    check_output_folder(args.out or trained.directory / "bench")  # before the comparison: a finished result is kept
    threads = set_threads(args.threads, device, small=len(trained.shape) == 1)
    dtype = torch.float64 if args.float64 else torch.float32
    if args.float64:
        for module in (trained.net, trained.sde):
            if isinstance(module, nn.Module):
                module.double()
    n = args.n or 512
    data = None
    if trained.data in TOY_DATASETS:
        def data(k: int, generator: torch.Generator | None) -> torch.Tensor:
            return make_toy(trained.data, k, generator, dtype=dtype)
    print(f"sdediff {__version__} bench: {trained.describe()}; {n} prior draws, budgets {', '.join(map(str, args.budgets))} "
          f"NFE, device={device}, dtype={dtype}, {threads}")
    result = compare_on_model(trained.sde, trained.score, trained.shape, args.budgets, n=n, eps=args.eps, data=data,
                              calibrate=args.calibrate, calibration_pilot=args.calibration_pilot,
                              calibration_evals=args.calibration_evals, reference_tol=args.reference_tol,
                              generator=torch.Generator(device).manual_seed(args.seed), device=device, dtype=dtype,
                              progress=args.progress)
    out = Path(args.out) if args.out else trained.directory / "bench"
    table = f"# Solvers on {trained.checkpoint.name} (step {trained.step})\n\n{result.markdown()}"
    print()
    print(result.recommendation_table())
    print()
    print(result.solver_table())
    saved = _save_grids(result, trained, args.run or trained.directory) if args.save_grids else []
    doc = {"checkpoint": str(trained.checkpoint), "step": trained.step, "sde": repr(trained.sde), "seed": args.seed,
           "dtype": str(dtype).replace("torch.", ""), **result.as_dict(), "saved_grids": saved}
    written: list[Path | None] = [write_json(out / "metrics.json", doc), atomic_write(out / "table.md", table + "\n")]
    if args.plot:
        written.append(result.plot(out / "error_vs_nfe.png"))
    print()
    print_written(written)
    return 0


def _save_grids(result: ModelComparison, trained: Any, run_arg: Any) -> list[dict[str, Any]]:
    """Save each budget's calibrated grid that is the recommended (solver, grid) there into the run; print how to use
    it; the saved entries."""
    saved = []
    for budget, row in result.recommended.items():
        cal = result.calibrations.get(budget)
        if row.grid != "calibrated" or cal is None:
            continue
        info = {k: cal[k] for k in ("pilot", "pilot_rmse", "start", "start_rmse", "accepted", "holdout_rmse",
                                    "start_holdout_rmse", "evals", "search_nfe", "seconds")}
        path = save_calibrated_grid(trained.directory, cal["times"], solver=cal["solver"], options=cal["options"],
                                    steps=cal["steps"], eps=cal["eps"], checkpoint=trained.checkpoint.name,
                                    info={**info, "budget": budget, "rmse": row.rmse})
        options = "".join(f" --solver-option {k}={v}" for k, v in cal["options"].items())
        command = (f"sdediff sample --run {run_arg} --solver {cal['solver']}{options} --steps {cal['steps']} --eps "
                   f"{cal['eps']:g} --time-grid calibrated")
        print(f"saved the calibrated {cal['steps']}-step grid of {cal['label']} (NFE <= {budget}, RMSE {row.rmse:.3g}) "
              f"in {path}; use it with: {command}")
        saved.append({"budget": budget, "solver": cal["solver"], "options": cal["options"], "steps": cal["steps"],
                      "file": str(path), "command": command})
    if not saved:
        print("no calibrated grid beat the standard grids here: nothing saved")
    return saved


def _row_record(row: ComparisonRow) -> dict[str, Any]:
    """A row of metrics.json (the keys ``sdediff bench`` has always written, figures to 4 decimals)."""
    return {"solver": row.solver, "steps": "adaptive" if row.steps is None else row.steps, "nfe": row.nfe,
            "seconds": round(row.seconds, 2), "sliced_w2": _round(row.sliced_w2), "floor": _round(row.noise_floor),
            "logp_gap": _round(row.logp_gap), "logp_se": _round(row.logp_gap_se), "mode_err": _round(row.mode_error),
            "finite": row.finite}


def _round(x: float | None) -> float | None:
    return x if x is None or not math.isfinite(x) else round(x, 4)
