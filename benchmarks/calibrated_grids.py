"""Calibrated time grids (``sdediff.calibrate_grid``) against the standard grids, k-diffusion and diffusers.

Same problems as ``accuracy_per_nfe.py`` (Gaussian mixtures with the exact score, VP/VE, d = 2 and 64 by default,
any of its ``--problems`` names, float64; the same evaluation starts x_T and reference end points, so its
standard-grid figures match that benchmark's). For each NFE budget:

* **standard**: the best sdediff PF-ODE solver (``SOLVERS`` below) on the four standard grids, the best
  k-diffusion ODE sampler (euler, heun, dpm_2, lms, dpmpp_2m) over its Karras and exponential schedules and our
  uniform and quadratic noise levels, and the best diffusers scheduler (``peers.SCHEDULERS``) on its own schedules;
* **calibrated**: ``calibrate_grid`` fits a grid for each candidate on a *separate* pilot batch of prior
  draws (its own seed); the candidate with the lowest *pilot* error is then run once on the evaluation
  starts. Nothing is selected on the evaluation set;
* for transparency, k-diffusion's ``dpmpp_2m`` on a grid calibrated for it the same way (through
  ``calibrate_grid``'s function interface): a k-diffusion user could do that with our tool.

Writes ``calibrated_grids.{md,json}`` into ``benchmarks/results/`` and the plot into
``docs/img/calibrated_grids.png``, where the solver guide shows it (``--quick``, ``--tag`` or ``--out``: all three
into that folder).

    python benchmarks/calibrated_grids.py                    # full run (hours on one CPU thread: split it as below)
    python benchmarks/calibrated_grids.py --quick            # smoke run

    # the reported run, in three processes, then one table from their records
    python benchmarks/calibrated_grids.py --problems vp2 ve2 --tag d2
    python benchmarks/calibrated_grids.py --problems vp64 --nfe 10 20 --n 4000 --candidates unipc-3 --tag vp64
    python benchmarks/calibrated_grids.py --problems ve64 --nfe 10 20 --n 4000 --candidates unipc-3 --tag ve64
    python benchmarks/calibrated_grids.py --merge benchmarks/results/calibrated_grids_{d2,vp64,ve64}.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import accuracy_per_nfe as apn  # a sibling script (benchmarks/README.md)
import common
import peers
import torch
from torch import Tensor

import sdediff
from sdediff._io import atomic_write, atomic_write_file
from sdediff.calibrate import calibrate_grid
from sdediff.interop.kdiffusion import sigma_of_time
from sdediff.solvers import grids

NFES = (5, 10, 20)
#: sdediff solvers on the standard grids: label -> (solver, options); each is 1 NFE per step
SOLVERS = {
    "unipc-3": ("unipc", {"order": 3}),
    "unipc-2": ("unipc", {"order": 2}),
    "dpm_solver-3M (data)": ("dpm_solver", {"order": 3, "prediction": "data"}),
    "dpm_solver-3M (noise)": ("dpm_solver", {"order": 3, "prediction": "noise"}),
}
#: the ones calibrated (the most accurate on standard grids in accuracy_per_nfe.py); the first, sdediff's default
#: solver (unipc, order 3), is the one the summary reports, chosen before any result was seen
CANDIDATES = ("unipc-3", "unipc-2")
KD_ODE = ("euler", "heun", "dpm_2", "lms", "dpmpp_2m")
KD_CALIBRATED = "dpmpp_2m"


def rmse(setup: Any, x: Tensor) -> list[float]:
    """``[RMSE, median per-sample RMS error]`` against the reference (``inf`` for non-finite samples)."""
    if not bool(torch.isfinite(x).all()):
        return [math.inf, math.inf]
    err = (x.to(torch.float64) - setup.x_ref).reshape(len(x), -1).pow(2).mean(1)
    return [float(err.mean().sqrt()), float(err.sqrt().median())]


def sdediff_run(setup: Any, label: str, steps: int, grid: Any, x_T: Tensor) -> Tensor:
    solver, options = SOLVERS[label]
    return sdediff.sample(setup.sde, setup.score, x_T.shape, solver=solver, steps=steps, eps=setup.problem.eps,
                          x_init=x_T, time_grid=grid, **options)


def kd_on_times(setup: Any, kd_name: str, times: Tensor, x_T: Tensor) -> Tensor:
    sigmas = sigma_of_time(setup.sde, times).to(x_T.device)
    return apn.kd_run(setup, kd_name, "", len(times) - 1, x_T, sigmas=sigmas)[0]


def run_problem(setup: Any, nfes: tuple[int, ...], pilot_n: int, max_evals: int, candidates: tuple[str, ...] = CANDIDATES,
                log=print) -> list[dict[str, Any]]:
    sde, eps = setup.sde, setup.problem.eps
    pilot = setup.mixture.marginal(sde, sde.T).sample(pilot_n, generator=torch.Generator().manual_seed(setup.seed + 100),
                                                      dtype=torch.float64).to(setup.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        pilot_ref = sdediff.sample(sde, setup.score, pilot.shape, solver="ode", method="dopri8", rtol=1e-10, atol=1e-10,
                                   x_init=pilot, eps=eps)
    log(f"  pilot: {pilot_n} starts, reference in {time.perf_counter() - t0:.0f} s")
    hf_loop = peers.DiffusersLoop(sde, eps) if peers.load_diffusers()[0] is not None else None
    rows = []
    for nfe in nfes:
        steps = nfe
        row: dict[str, Any] = {"problem": setup.problem.name, "nfe": nfe, "n_eval": len(setup.x_T), "standard": {},
                               "kd_standard": {}, "hf_standard": {}, "calibrated": {}}
        with torch.no_grad():
            for label in SOLVERS:
                for grid in grids.GRIDS:
                    row["standard"][f"{label} [{grid}]"] = rmse(setup, sdediff_run(setup, label, steps, grid, setup.x_T))
            for kd_name in KD_ODE:
                per_step = common.KD_SAMPLERS[kd_name][2]
                kd_steps = common.steps_for_budget(nfe, per_step)
                for schedule in apn.KD_SCHEDULES:
                    if kd_steps >= 1:
                        x, _ = apn.kd_run(setup, kd_name, schedule, kd_steps)
                        row["kd_standard"][f"{kd_name} [{schedule}]"] = rmse(setup, x)
            if hf_loop is not None:  # diffusers' schedulers on their own schedules
                for spec, schedule, _, hf_steps, _ in peers.diffusers_runs(hf_loop, peers.SCHEDULERS, [nfe], custom=False):
                    x, _ = hf_loop.sample(spec, schedule, hf_steps, setup.score, setup.x_T)
                    row["hf_standard"][f"{spec.label} [{schedule}]"] = rmse(setup, x)
        for label in candidates:
            solver, options = SOLVERS[label]
            t1 = time.perf_counter()
            cal = calibrate_grid(sde, setup.score, pilot, steps, solver, eps=eps, reference=pilot_ref, max_evals=max_evals,
                                 **options)
            with torch.no_grad():
                held_out = rmse(setup, sdediff_run(setup, label, steps, cal.times, setup.x_T))
            row["calibrated"][label] = {"pilot_rmse": cal.rmse, "rmse": held_out[0], "median": held_out[1],
                                        "start": cal.start,
                                        "accepted": cal.accepted, "holdout_rmse": cal.holdout_rmse,
                                        "start_holdout_rmse": cal.start_holdout_rmse,
                                        "evals": cal.evals, "search_nfe": cal.search_nfe,
                                        "seconds": time.perf_counter() - t1, "times": cal.times.tolist()}
            log(f"    NFE {nfe} {label:<22} pilot {cal.rmse:.3g} (from {cal.start} {cal.start_rmse[cal.start]:.3g}), "
                f"holdout {cal.holdout_rmse:.3g} vs {cal.start_holdout_rmse:.3g} (accepted: {cal.accepted}), "
                f"evaluation {held_out[0]:.3g}, {cal.evals} runs, {time.perf_counter() - t1:.0f} s")
        t1 = time.perf_counter()
        cal = calibrate_grid(sde, setup.score, pilot, steps, lambda ts, x: kd_on_times(setup, KD_CALIBRATED, ts, x),
                             eps=eps, reference=pilot_ref, max_evals=max_evals)
        with torch.no_grad():
            held_out = rmse(setup, kd_on_times(setup, KD_CALIBRATED, cal.times, setup.x_T))
        row["kd_calibrated"] = {KD_CALIBRATED: {"pilot_rmse": cal.rmse, "rmse": held_out[0], "median": held_out[1],
                                                "start": cal.start,
                                                "accepted": cal.accepted, "holdout_rmse": cal.holdout_rmse,
                                                "start_holdout_rmse": cal.start_holdout_rmse,
                                                "evals": cal.evals, "seconds": time.perf_counter() - t1,
                                                "times": cal.times.tolist()}}
        log(f"    NFE {nfe} k-diffusion {KD_CALIBRATED} calibrated: pilot {cal.rmse:.3g}, held-out {held_out[0]:.3g}")
        rows.append(row)
    return rows


def summarise(row: dict[str, Any]) -> dict[str, Any]:
    """Best entries of a row as ``(label, [RMSE, median])``; the calibrated sdediff entry is the default solver's
    (``CANDIDATES[0]``); ratios are sdediff's RMSE over the peer's."""
    def best(entries: dict[str, list[float]]) -> tuple[str, list[float]] | None:
        return min(entries.items(), key=lambda kv: kv[1][0]) if entries else None

    std, kd, hf = best(row["standard"]), best(row["kd_standard"]), best(row.get("hf_standard", {}))
    pick = row["calibrated"][CANDIDATES[0]]
    cal = (CANDIDATES[0], [pick["rmse"], pick["median"]])
    kd_cal = row["kd_calibrated"][KD_CALIBRATED]
    return {"standard": std, "kd": kd, "hf": hf, "calibrated": cal, "kd_calibrated": [kd_cal["rmse"], kd_cal["median"]],
            "ratio_kd": cal[1][0] / kd[1][0], "ratio_standard_kd": std[1][0] / kd[1][0],
            "ratio_hf": cal[1][0] / hf[1][0] if hf else math.nan,
            "ratio_standard_hf": std[1][0] / hf[1][0] if hf else math.nan,
            "ratio_both_calibrated": cal[1][0] / kd_cal["rmse"]}


def _entry(e: tuple[str, list[float]] | None) -> str:
    return "— | —" if e is None else f"`{e[0]}` | {e[1][0]:.3g} ({e[1][1]:.3g})"


def markdown(results: dict[str, Any]) -> str:
    lines = ["# Calibrated time grids", "", f"Run: `{results['command']}`; {results['environment']}; float64; "
             f"{results['seconds']:.0f} s{' (sum over the parts, run side by side)' if 'merged' in results else ''}.", "",
             f"Pilot batch: {results['pilot_n']} prior draws (seed distinct from the evaluation starts), reference "
             "dopri8 at rtol = atol = 1e-10; each calibration (`calibrate_grid` defaults) searches on the first 3/4 "
             f"with at most {results['max_evals']} solver runs (Powell) and keeps the searched grid only if it beats "
             "its start grid on the last 1/4. Evaluation: the starts and reference of "
             "`accuracy_per_nfe.py` unless `--n` asks for more. The summary's calibrated sdediff solver is "
             f"`{CANDIDATES[0]}` (the default `unipc`, fixed in advance); every calibration is listed below. Standard grids "
             f"({', '.join(f'`{c}`' for c in SOLVERS)}): uniform, quadratic, "
             "log-SNR, Karras for sdediff; Karras, exponential and our uniform and quadratic noise levels for "
             f"k-diffusion ({', '.join(KD_ODE)}); diffusers' schedulers on their own schedules (`peers.py`: "
             f"{', '.join(dict.fromkeys(s.cls.replace('Scheduler', '') for s in peers.SCHEDULERS))}). Errors: pathwise "
             "RMSE (median per-sample error in brackets); ratios: sdediff's RMSE / the peer's (below 1: sdediff's "
             "error is lower).", "",
             "| problem | NFE | best sdediff, standard grid | RMSE (median) | best k-diffusion, standard schedule | "
             "RMSE (median) | best diffusers, own schedule | RMSE (median) | sdediff calibrated | RMSE (median) | "
             "calibrated / k-diffusion | calibrated / diffusers | standard / k-diffusion | standard / diffusers | k-diffusion "
             f"`{KD_CALIBRATED}`, calibrated: RMSE | both calibrated: ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        s = summarise(row)
        lines.append(f"| {row['problem']} | {row['nfe']} | {_entry(s['standard'])} | {_entry(s['kd'])} | {_entry(s['hf'])} | "
                     f"{_entry(s['calibrated'])} | **{s['ratio_kd']:.2f}** | **{s['ratio_hf']:.2f}** | "
                     f"{s['ratio_standard_kd']:.2f} | {s['ratio_standard_hf']:.2f} | {s['kd_calibrated'][0]:.3g} | "
                     f"{s['ratio_both_calibrated']:.2f} |")
    lines += ["", "Evaluation starts per problem: " + ", ".join(
        f"{name} {n}" for name, n in dict.fromkeys((r["problem"], r.get("n_eval")) for r in results["rows"])) + ".",
        "", "## Every calibration", "",
              "| problem | NFE | method | start grid | pilot RMSE (fit part) | holdout RMSE: searched / start grid | "
              "returned | evaluation RMSE (median) | solver runs | seconds |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        for label, c in [*row["calibrated"].items(), *((f"k-diffusion {k}", v) for k, v in row["kd_calibrated"].items())]:
            lines.append(f"| {row['problem']} | {row['nfe']} | `{label}` | {c['start']} | {c['pilot_rmse']:.3g} | "
                         f"{c['holdout_rmse']:.3g} / {c['start_holdout_rmse']:.3g} | "
                         f"{'searched' if c['accepted'] else 'start grid'} | {c['rmse']:.3g} ({c['median']:.3g}) | "
                         f"{c['evals']} | {c['seconds']:.0f} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    names = list(dict.fromkeys(r["problem"] for r in results["rows"]))
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        rows = [r for r in results["rows"] if r["problem"] == name]
        nfe = [r["nfe"] for r in rows]
        summ = [summarise(r) for r in rows]
        ax.loglog(nfe, [s["standard"][1][0] for s in summ], "o-", color="C0", label="sdediff, best standard grid")
        ax.loglog(nfe, [s["calibrated"][1][0] for s in summ], "o-", color="C3", label="sdediff, calibrated grid")
        ax.loglog(nfe, [s["kd"][1][0] for s in summ], "s--", color="C2", label="k-diffusion, best schedule")
        if all(s["hf"] for s in summ):
            ax.loglog(nfe, [s["hf"][1][0] for s in summ], "^--", color="C1", label="diffusers, best own schedule")
        ax.loglog(nfe, [s["kd_calibrated"][0] for s in summ], "s:", color="C7",
                  label=f"k-diffusion {KD_CALIBRATED}, calibrated")
        ax.set_title(name)
        ax.set_xlabel("NFE")
        ax.set_xticks(nfe, [str(v) for v in nfe])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("pathwise RMSE (held-out starts)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: d=2 VP only, n=256, pilot 128, 60 runs, NFE 5 10")
    p.add_argument("--problems", nargs="+", default=None, metavar="NAME", help="subset, e.g. vp2 ve64 (default all four)")
    p.add_argument("--nfe", type=int, nargs="+", default=None, help=f"NFE budgets (default {' '.join(map(str, NFES))})")
    p.add_argument("--pilot", type=int, default=2730, help="pilot starts per problem (default 2730: 2047 to fit, 683 held out)")
    p.add_argument("--max-evals", type=int, default=600, help="solver runs per calibration (default 600)")
    p.add_argument("--n", type=int, default=None, help="evaluation starts per problem (default: accuracy_per_nfe.py's)")
    p.add_argument("--candidates", nargs="+", choices=CANDIDATES, default=list(CANDIDATES),
                   help=f"sdediff solvers to calibrate (the first of {CANDIDATES} is always included)")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="output folder (default benchmarks/results)")
    p.add_argument("--tag", default=None, help="write calibrated_grids_TAG.* (a part of a run split over processes)")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                   help="only write one table and plot from the records of these earlier (tagged) runs")
    args = p.parse_args(argv)
    if args.merge:
        parts = [json.loads(path.read_text()) for path in args.merge]
        results = {**parts[0], "rows": [row for part in parts for row in part["rows"]],
                   "seconds": sum(part["seconds"] for part in parts),
                   "command": "; ".join(part["command"] for part in parts) + "; then --merge of their records",
                   "merged": [str(path) for path in args.merge]}
        return write(results, args.out / "calibrated_grids")
    torch.set_num_threads(1)
    device = torch.device("cpu")
    if args.quick:
        args.problems, args.pilot, args.max_evals, args.nfe = args.problems or ["vp2"], 128, 60, args.nfe or [5, 10]
    nfes = tuple(args.nfe or NFES)
    problems = list(apn.PROBLEMS) if args.problems is None else [apn.parse_problem(key) for key in args.problems]
    command = "python benchmarks/calibrated_grids.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results: dict[str, Any] = {"command": command,
                               "environment": f"torch {torch.__version__}, cpu ({common.cpu_name()}), "
                                              "torch.set_num_threads(1) [1 CPU thread]",
                               "pilot_n": args.pilot, "max_evals": args.max_evals, "nfes": list(nfes), "rows": []}
    print(results["environment"])
    t0 = time.perf_counter()
    for problem in problems:
        setup = apn.prepare(problem, device, n=256 if args.quick else args.n, floor_repeats=1)
        candidates = tuple(dict.fromkeys([CANDIDATES[0], *args.candidates]))
        results["rows"] += run_problem(setup, nfes, args.pilot, args.max_evals, candidates)
    results["seconds"] = time.perf_counter() - t0
    return write(results, args.out / ("calibrated_grids" + ("_quick" if args.quick else "")
                                      + (f"_{args.tag}" if args.tag else "")))


def write(results: dict[str, Any], stem: Path) -> int:
    """Print the table and write ``stem.{md,json}`` and the plot (:func:`common.plot_path`) atomically."""
    png = common.plot_path(stem.parent, stem.name, "calibrated_grids")
    plotted = plot(results, png)
    md = stem.with_suffix(".md")
    text = common.with_plot(markdown(results), md, png) if plotted else markdown(results)
    atomic_write(md, text + "\n")
    atomic_write(stem.with_suffix(".json"), json.dumps(results, indent=1, default=str) + "\n")
    print()
    print(text)
    print(f"\nwrote {stem}.md, .json" + (f", {png}" if plotted else " (no matplotlib: no plot)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
