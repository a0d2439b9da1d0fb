"""Which sdediff solver and grid to recommend per NFE budget, chosen by measurement, and how they compare with the best
k-diffusion and diffusers samplers on their best standard schedules, on a standard grid and calibrated.

**Selection.** Nine problems (VP, VE and sub-VP; d = 2, 16, 64; random 8-component Gaussian mixtures with full
covariances, mixture seed 1; the exact score; float64) as in ``accuracy_per_nfe.py``: from the same exact samples of
p_T, every deterministic sdediff solver (``sdediff.compare_model.deterministic_solvers``) on every standard grid
(``sdediff.solvers.grids.GRIDS``) and on ``EXTRA_GRIDS``, k-diffusion's ODE samplers on its four schedules and
diffusers' schedulers on their own schedules run at 5, 10 and 20 NFE. Per budget, the recommended (solver, grid) is
the one with the lowest geometric mean over the nine problems of its pathwise RMSE divided by the best peer's (the
lower of the best k-diffusion and the best diffusers RMSE).

**Check.** Nine other problems (mixture seed 2, never used to choose): the recommended (solver, grid) of each budget
against the best k-diffusion sampler and the best diffusers scheduler, each on its best standard schedule for that
problem (ratios of RMSE and of median per-sample error, sdediff's over the peer's); then ``calibrate_grid`` for the
recommended solver on a pilot of separate prior draws, with the pathwise loss (mean squared error, and ``trimmed``),
GITS's and Align Your Steps' objectives, each scored on the evaluation starts against the same peers.

    python benchmarks/defaults_per_budget.py            # full run (about an hour on one CPU thread)
    python benchmarks/defaults_per_budget.py --quick    # small run: d = 2 and 16, n = 128, NFE 5 and 10
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
import tables
import torch

import sdediff
from sdediff._io import atomic_write
from sdediff.calibrate import calibrate_grid
from sdediff.compare_model import deterministic_solvers

NFES = (5, 10, 20)
SDES, DIMS = ("vp", "ve", "subvp"), (2, 16, 64)
KD_ODE = ("euler", "heun", "dpm_2", "lms", "dpmpp_2m")
#: calibration objectives compared: (objective, loss); the first is calibrate_grid's default
OBJECTIVES = (("pathwise", "mse"), ("pathwise", "trimmed"), ("gits", "mse"), ("ays", "mse"))


def sigma_poly3(sde: sdediff.LinearSDE, steps: int, eps: float):
    """Karras's grid with rho = 3 (polynomial in sigma, less crowded at small noise than rho = 7)."""
    return sdediff.solvers.grids.karras(sde, steps, eps, rho=3.0)


#: candidate grids beyond the standard ones, tried in the selection
EXTRA_GRIDS = {"sigma_poly3": sigma_poly3}


def candidate_specs() -> list[Any]:
    """Every deterministic sdediff solver on every standard and extra grid (NFE per step measured)."""
    grids = {**{g: g for g in sdediff.solvers.grids.GRIDS}, **EXTRA_GRIDS}
    return [common.SolverSpec(f"{c.name} [{g}]", c.solver, "ode", None, dict(c.options), time_grid=grid)
            for c in deterministic_solvers() for g, grid in grids.items()]


def problems(seed: int, dims: tuple[int, ...]) -> list[Any]:
    return [apn.Problem(sde, d, n=1000, seed=seed) for sde in SDES for d in dims]


def run_set(probs: list[Any], specs: list[Any], nfes: tuple[int, ...], n: int, log=print) -> tuple[list, list]:
    """Every spec and the k-diffusion and diffusers peers on every problem: (problem infos, records)."""
    infos, records = [], []
    for problem in probs:
        t0 = time.perf_counter()
        setup = apn.prepare(problem, torch.device("cpu"), n=n, floor_repeats=1, log=log)
        recs = apn.run_problem(setup, specs, nfes, kd_samplers=KD_ODE, torchdiffeq_methods=(), torchsde_methods=(),
                               torchode_methods=(), diffusers_custom=False, log=lambda m: None)
        records += recs
        infos.append({"name": problem.name, "key": problem.key, "info": setup.info, "seconds": time.perf_counter() - t0})
        log(f"  {problem.name}: {len(recs)} runs in {time.perf_counter() - t0:.0f} s")
    return infos, records


def best_peer(recs: list[dict[str, Any]], budget: int) -> dict[str, Any] | None:
    cands = [r for r in (tables.best_by_impl(recs, "ode", impl, budget) for impl in ("k-diffusion", "diffusers")) if r]
    return min(cands, key=lambda r: r["rmse"]) if cands else None


def select(infos: list[dict], records: list[dict], nfes: tuple[int, ...]) -> dict[int, list[dict[str, Any]]]:
    """Per budget, every sdediff candidate with its geometric-mean and largest RMSE ratio to the best peer, best first."""
    out = {}
    for budget in nfes:
        scores: dict[str, list[float]] = {}
        for info in infos:
            recs = [r for r in records if r["problem"] == info["name"]]
            peer = best_peer(recs, budget)
            for r in recs:
                if r["impl"] == "sdediff" and r.get("budget") == budget and peer is not None:
                    ok = "error" not in r and math.isfinite(r.get("rmse", math.nan))
                    scores.setdefault(r["label"], []).append(r["rmse"] / peer["rmse"] if ok else math.inf)
        ranked = [{"label": label, "geomean": math.exp(sum(map(math.log, v)) / len(v)), "max": max(v), "n": len(v)}
                  for label, v in scores.items() if len(v) == len(infos) and all(math.isfinite(x) for x in v)]
        out[budget] = sorted(ranked, key=lambda r: r["geomean"])
    return out


def calibrations(probs: list[Any], picks: dict[int, Any], steps_of: dict[int, int], n: int, pilot_n: int, max_evals: int,
                 log=print) -> list:
    """calibrate_grid with every objective for each budget's recommended solver (``steps_of[budget]`` steps), scored on
    the evaluation starts."""
    rows = []
    for problem in probs:
        setup = apn.prepare(problem, torch.device("cpu"), n=n, floor_repeats=1, log=lambda m: None)
        sde, eps = setup.sde, problem.eps
        pilot = setup.mixture.marginal(sde, sde.T).sample(pilot_n, generator=torch.Generator().manual_seed(problem.seed + 100),
                                                          dtype=torch.float64)
        pilot_ref = sdediff.sample(sde, setup.score, pilot.shape, solver="ode", method="dopri8", rtol=1e-10, atol=1e-10,
                                   x_init=pilot, eps=eps)
        for budget, spec in picks.items():
            steps = steps_of[budget]
            for objective, loss in OBJECTIVES:
                t0 = time.perf_counter()
                cal = calibrate_grid(sde, setup.score, pilot, steps, spec.solver, eps=eps, reference=pilot_ref,
                                     max_evals=max_evals, objective=objective, loss=loss,
                                     generator=torch.Generator().manual_seed(problem.seed + 200), **spec.options)
                x = sdediff.sample(sde, setup.score, setup.x_T.shape, solver=spec.solver, steps=steps, eps=eps,
                                   x_init=setup.x_T, time_grid=cal.times, **spec.options)
                errs = apn.evaluate(setup, x, "ode")
                rows.append({"problem": problem.name, "budget": budget, "solver": spec.label, "objective": objective,
                             "loss": loss, "rmse": errs["rmse"], "median": errs["rmse_median_sample"],
                             "accepted": cal.accepted, "start": cal.start, "pilot_rmse": cal.rmse, "evals": cal.evals,
                             "seconds": time.perf_counter() - t0, "times": cal.times.tolist()})
                log(f"    {problem.name} NFE {budget} {objective}/{loss}: {errs['rmse']:.3g} (accepted {cal.accepted}, "
                    f"{time.perf_counter() - t0:.0f} s)")
    return rows


def _ratio(a: float | None, b: float | None) -> float:
    return a / b if a is not None and b else math.nan


def _geomean(values: list[float]) -> float:
    ok = [v for v in values if math.isfinite(v) and v > 0]
    return math.exp(sum(map(math.log, ok)) / len(ok)) if ok else math.nan


def markdown(res: dict[str, Any]) -> str:
    out = ["# Recommended solver and grid per NFE budget", "",
           f"Run: `{res['command']}` on {res['environment']}; float64; {res['seconds']:.0f} s.", "",
           "Pathwise RMSE against a dopri8 reference at rtol = atol = 1e-10 from the same exact p_T samples "
           f"({res['n']} per problem), median per-sample error in brackets. Ratios are sdediff's error over the peer's "
           "(below 1: sdediff's is lower); a peer's entry is its best sampler on its best standard schedule for that "
           "problem and budget (k-diffusion: euler, heun, dpm_2, lms, dpmpp_2m on Karras, exponential and our uniform "
           "and quadratic noise levels; diffusers: every scheduler of `peers.SCHEDULERS` on its own schedules).", "",
           f"## Selection (mixture seed {res['select_seed']}: {', '.join(p['name'] for p in res['select_problems'])})", "",
           "Per budget, the five sdediff (solver, grid) with the lowest geometric mean over the problems of RMSE / best "
           "peer's RMSE, and their largest ratio:", "", "| NFE | rank | solver [grid] | geometric mean | largest |",
           "|---|---|---|---|---|"]
    for budget, ranked in res["selection"].items():
        for i, r in enumerate(ranked[:5]):
            out.append(f"| {budget} | {i + 1} | `{r['label']}` | {r['geomean']:.2f} | {r['max']:.2f} |")
    out += ["", "The same selection problems with every library at its best per problem and budget (sdediff too: the best "
            "of its solvers and grids for that problem, as the peers get):", "",
            "| NFE | problem | best sdediff | RMSE (median) | best k-diffusion | RMSE (median) | best diffusers | "
            "RMSE (median) | / k-diffusion | / diffusers |", "|---|---|---|---|---|---|---|---|---|---|"]
    for budget in res["nfes"]:
        for p in res["select_problems"]:
            recs = [r for r in res["select_records"] if r["problem"] == p["name"]]
            ours, kd, hf = (tables.best_by_impl(recs, "ode", impl, budget) for impl in ("sdediff", "k-diffusion", "diffusers"))
            if ours is not None:
                out.append(f"| {budget} | {p['name']} | {_peer(ours)} | {_peer(kd)} | {_peer(hf)} | "
                           f"{_ratio(ours['rmse'], kd and kd['rmse']):.2f} | {_ratio(ours['rmse'], hf and hf['rmse']):.2f} |")
    out += ["", f"## Check (mixture seed {res['check_seed']}: problems not used to choose)", "",
            "### Recommended solver on its standard grid", "",
            "| NFE | problem | sdediff | RMSE (median) | best k-diffusion | RMSE (median) | best diffusers | RMSE (median) | "
            "/ k-diffusion | / diffusers | median / k-diffusion | median / diffusers |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    cal_rows = res["calibrations"]
    summary = []
    for budget in res["nfes"]:
        ratios: dict[str, list[float]] = {}
        for p in res["check_problems"]:
            recs = [r for r in res["check_records"] if r["problem"] == p["name"]]
            ours = next((r for r in recs if r["impl"] == "sdediff" and r.get("budget") == budget
                         and r["label"] == res["picks"][str(budget)] and "error" not in r), None)
            kd, hf = (tables.best_by_impl(recs, "ode", impl, budget) for impl in ("k-diffusion", "diffusers"))
            if ours is None:
                continue
            vals = {"kd": _ratio(ours["rmse"], kd and kd["rmse"]), "hf": _ratio(ours["rmse"], hf and hf["rmse"]),
                    "kd_med": _ratio(ours["rmse_median_sample"], kd and kd["rmse_median_sample"]),
                    "hf_med": _ratio(ours["rmse_median_sample"], hf and hf["rmse_median_sample"])}
            for k, v in vals.items():
                ratios.setdefault(k, []).append(v)
            out.append(f"| {budget} | {p['name']} | `{ours['label']}` | {_err(ours)} | {_peer(kd)} | {_peer(hf)} | "
                       f"{vals['kd']:.2f} | {vals['hf']:.2f} | {vals['kd_med']:.2f} | {vals['hf_med']:.2f} |")
            for c in (c for c in cal_rows if c["problem"] == p["name"] and c["budget"] == budget):
                c.update(kd=_ratio(c["rmse"], kd and kd["rmse"]), hf=_ratio(c["rmse"], hf and hf["rmse"]),
                         kd_med=_ratio(c["median"], kd and kd["rmse_median_sample"]),
                         hf_med=_ratio(c["median"], hf and hf["rmse_median_sample"]))
        summary.append((budget, "standard grid", {k: _geomean(v) for k, v in ratios.items()},
                        {k: max(v) for k, v in ratios.items()}))
    if cal_rows:
        out += ["", "### Calibrated grids for the recommended solver", "",
                "Each objective's grid on the evaluation starts (pilot RMSE on separate prior draws decides nothing "
                "here); `start grid`: the holdout check returned the best standard grid.", "",
                "| NFE | problem | objective | RMSE (median) | / k-diffusion | / diffusers | median / k-diffusion | "
                "median / diffusers | returned | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
        for c in cal_rows:
            out.append(f"| {c['budget']} | {c['problem']} | {c['objective']}" + (f" ({c['loss']})" if c["loss"] != "mse"
                                                                                 else "")
                       + f" | {c['rmse']:.3g} ({c['median']:.3g}) | {c.get('kd', math.nan):.2f} | {c.get('hf', math.nan):.2f} "
                       f"| {c.get('kd_med', math.nan):.2f} | {c.get('hf_med', math.nan):.2f} | "
                       f"{'searched' if c['accepted'] else 'start grid'} | {c['seconds']:.0f} |")
        for budget in res["nfes"]:
            for objective, loss in OBJECTIVES:
                mine = [c for c in cal_rows if c["budget"] == budget and (c["objective"], c["loss"]) == (objective, loss)]
                if mine:
                    name = objective + (f" ({loss})" if loss != "mse" else "")
                    summary.append((budget, f"calibrated: {name}", {k: _geomean([c[k] for c in mine if k in c])
                                                                  for k in ("kd", "hf", "kd_med", "hf_med")},
                                    {k: max(c.get(k, math.nan) for c in mine) for k in ("kd", "hf", "kd_med", "hf_med")}))
        wins: dict[tuple[int, str], int] = {}
        for budget in res["nfes"]:
            for p in res["check_problems"]:
                mine = [c for c in cal_rows if c["budget"] == budget and c["problem"] == p["name"]]
                if mine:
                    best = min(mine, key=lambda c: c["rmse"])
                    key = (budget, best["objective"] + (f" ({best['loss']})" if best["loss"] != "mse" else ""))
                    wins[key] = wins.get(key, 0) + 1
        out += ["", "Lowest RMSE among the objectives, problems won per budget: " + "; ".join(
            f"NFE {b}: " + ", ".join(f"{name} {k}" for (bb, name), k in sorted(wins.items()) if bb == b)
            for b in res["nfes"]) + "."]
    out += ["", "### Summary over the check problems", "",
            "Geometric mean (largest) over the problems of sdediff's error / the peer's:", "",
            "| NFE | sdediff | RMSE / k-diffusion | RMSE / diffusers | median / k-diffusion | median / diffusers |",
            "|---|---|---|---|---|---|"]
    for budget, what, gm, mx in summary:
        out.append(f"| {budget} | {what} | " + " | ".join(f"{gm.get(k, math.nan):.2f} ({mx.get(k, math.nan):.2f})"
                                                        for k in ("kd", "hf", "kd_med", "hf_med")) + " |")
    return "\n".join(out)


def _err(r: dict[str, Any]) -> str:
    return f"{r['rmse']:.3g} ({r['rmse_median_sample']:.3g})"


def _peer(r: dict[str, Any] | None) -> str:
    return "— | —" if r is None else f"`{r['label']}` | {_err(r)}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small run: d = 2 and 16, n = 128, NFE 5 10, pilot 128, 40 runs")
    p.add_argument("--n", type=int, default=None, help="evaluation starts per problem (default 1000)")
    p.add_argument("--nfe", type=int, nargs="+", default=None, help=f"budgets (default {' '.join(map(str, NFES))})")
    p.add_argument("--dims", type=int, nargs="+", default=None, help=f"dimensions (default {' '.join(map(str, DIMS))})")
    p.add_argument("--select-seed", type=int, default=1, help="mixture seed of the selection problems")
    p.add_argument("--check-seed", type=int, default=2, help="mixture seed of the check problems")
    p.add_argument("--pilot", type=int, default=1024, help="pilot draws of each calibration (3/4 fit, 1/4 holdout)")
    p.add_argument("--max-evals", type=int, default=200, help="solver runs of each pathwise calibration")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="output folder (default benchmarks/results)")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.pilot, args.max_evals = args.n or 128, 128, 40
        args.nfe, args.dims = args.nfe or [5, 10], args.dims or [2, 16]
    nfes, dims, n = tuple(args.nfe or NFES), tuple(args.dims or DIMS), args.n or 1000
    dev, env = common.setup_torch("cpu")
    command = "python benchmarks/defaults_per_budget.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(env)
    t0 = time.perf_counter()
    specs = common.runnable_specs(candidate_specs())
    print(f"selection: {len(specs)} sdediff candidates on mixture seed {args.select_seed}")
    select_infos, select_records = run_set(problems(args.select_seed, dims), specs, nfes, n)
    ranked = select(select_infos, select_records, nfes)
    by_label = {s.label: s for s in specs}
    picks = {b: by_label[r[0]["label"]] for b, r in ranked.items()}
    for b, spec in picks.items():
        print(f"  NFE {b}: {spec.label} (geometric mean ratio to the best peer {ranked[b][0]['geomean']:.2f})")
    print(f"check on mixture seed {args.check_seed}")
    check_infos, check_records = run_set(problems(args.check_seed, dims), list({s.label: s for s in picks.values()}.values()),
                                         nfes, n)
    check_records = [r for r in check_records if r["impl"] != "sdediff" or r["label"] == picks[r["budget"]].label]
    steps_of = {r["budget"]: r["steps"] for r in check_records if r["impl"] == "sdediff"}
    cal = calibrations(problems(args.check_seed, dims), picks, steps_of, n, args.pilot, args.max_evals)
    res = {"command": command, "environment": env, "seconds": time.perf_counter() - t0, "nfes": list(nfes), "n": n,
           "select_seed": args.select_seed, "check_seed": args.check_seed, "pilot": args.pilot,
           "max_evals": args.max_evals, "select_problems": select_infos, "check_problems": check_infos,
           "selection": {b: r for b, r in ranked.items()}, "picks": {str(b): s.label for b, s in picks.items()},
           "select_records": select_records, "check_records": check_records, "calibrations": cal}
    text = markdown(res)
    stem = args.out / ("defaults_per_budget" + ("_quick" if args.quick else ""))
    atomic_write(stem.with_suffix(".md"), text + "\n")
    atomic_write(stem.with_suffix(".json"), json.dumps(res, indent=1, default=str) + "\n")
    print()
    print(text)
    print(f"\nwrote {stem}.md, .json in {res['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
