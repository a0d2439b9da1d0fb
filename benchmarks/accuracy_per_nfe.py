"""Accuracy per score evaluation (NFE) of every sampler, on Gaussian mixtures with the exact score.

For each problem (VP and VE, d = 2 and d = 64 by default; sub-VP and other dimensions and mixture seeds with
``--problems``) every method starts from the *same* exact samples of p_T and ends at t = eps:

* deterministic (probability-flow ODE) solvers: pathwise RMSE against a tight reference solve
  (``sdediff.sample(solver="ode", method="dopri8", rtol=atol=1e-10)`` in float64) from the same x_T;
* stochastic (reverse-SDE) solvers: sliced W2 to exact samples of p_eps (with the noise floor of two
  exact sample sets of the same size) and the mean exact log-density gap
  ``mean log p_eps(samples) - E_{p_eps}[log p_eps]`` with its standard error.

The same problem goes through k-diffusion's samplers (denoiser convention in sigma-space, on the
sigma levels of sdediff's uniform and quadratic time grids and on k-diffusion's exponential and Karras
schedules: the grids the ``unipc-3 [grid]`` rows use; each cell shows the best schedule), diffusers' schedulers
through their own ``set_timesteps``/``step`` loops (``peers.py``: its own schedules, and sdediff's grids where a
scheduler accepts custom ``timesteps=``/``sigmas=``), torchdiffeq's ``odeint``, torchode's per-sample adaptive
solvers (also next to ``adaptive_ode`` at equal tolerances) and torchsde's ``sdeint``. Every score/denoiser call
is counted by a wrapper; tables show the NFE each run used. Writes ``accuracy_per_nfe.{md,json}`` into
``benchmarks/results/`` and the plot into ``docs/img/accuracy_per_nfe.png``, where the solver guide shows it
(``--quick`` or ``--out``: all three into that folder).

    python benchmarks/accuracy_per_nfe.py            # full run (minutes)
    python benchmarks/accuracy_per_nfe.py --quick    # small run
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common  # a sibling script (benchmarks/README.md)
import peers
import tables
import torch
from torch import Tensor

import sdediff
from sdediff._io import atomic_write
from sdediff.data import GaussianMixture
from sdediff.metrics import noise_floor, sliced_wasserstein

NFES = (5, 10, 20, 50, 100)
#: tolerances tried by adaptive solvers, loosest first; a ladder stops once a run exceeds the largest budget
TOL_LADDER = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7, 1e-7)
#: sdediff's adaptive_ode and torchode's solvers are also run at these tolerances, whatever their NFE
EQUAL_TOLS = (1e-3, 1e-5, 1e-7)
#: k-diffusion runs on the sigma levels of the same four grids the UniPC rows use (see common.kd_sigmas)
KD_SCHEDULES = ("time", "quadratic", "exponential", "karras")
SCHEDULE_MARK = {"quadratic": "Q", "exponential": "E", "karras": "K"}
#: torchdiffeq methods on the same PF-ODE: name -> NFE per step (None: adaptive, tolerance ladder)
TORCHDIFFEQ_METHODS = {"euler": 1, "midpoint": 2, "rk4": 4, "dopri5": None}
TORCHSDE_METHODS = peers.TORCHSDE_METHODS
SDE_CLASSES = {"vp": sdediff.VPSDE, "ve": sdediff.VESDE, "subvp": sdediff.SubVPSDE}
SDE_NAMES = {"vp": "VP", "ve": "VE", "subvp": "sub-VP"}
#: final times: 1e-3 under VP and VE (noise level sigma = s/m of 0.0105 and 0.0101); sub-VP stops where its
#: sigma is VP's at 1e-3 (at 1e-3 it is 1e-4, which diffusers' float32 schedules cannot hold: 1 - beta rounds to 1)
EPS = {"vp": 1e-3, "ve": 1e-3, "subvp": 0.0278}


@dataclass(frozen=True)
class Problem:
    """A Gaussian mixture pushed through a linear SDE; its exact score is the 'network'."""

    sde: str  # "vp", "ve" or "subvp"
    dim: int
    n: int = 1000  # samples (and exact samples they are compared with)
    components: int = 8
    seed: int = 0  # of the mixture; the starts use seed + 1

    @property
    def eps(self) -> float:
        return EPS[self.sde]

    @property
    def key(self) -> str:
        """The ``--problems`` name, e.g. ``vp2`` (``vp2s1`` for mixture seed 1)."""
        return f"{self.sde}{self.dim}" + (f"s{self.seed}" if self.seed else "")

    @property
    def name(self) -> str:
        return f"{SDE_NAMES[self.sde]} d={self.dim}" + (f" (seed {self.seed})" if self.seed else "")

    def build(self) -> tuple[sdediff.LinearSDE, GaussianMixture]:
        sde = SDE_CLASSES[self.sde]()
        mixture = GaussianMixture.random(self.components, self.dim, generator=torch.Generator().manual_seed(self.seed))
        return sde, mixture


PROBLEMS = (Problem("vp", 2, n=2000), Problem("vp", 64), Problem("ve", 2, n=2000), Problem("ve", 64))


def parse_problem(key: str) -> Problem:
    """The problem of a ``--problems`` name (:attr:`Problem.key`): 2000 samples in d = 2, else 1000."""
    match = re.fullmatch(r"(vp|ve|subvp)(\d+)(?:s(\d+))?", key)
    if match is None:
        raise SystemExit(f"--problems: {key!r} is not SDE + dimension [+ s + seed], e.g. vp2, subvp16, ve64s1")
    sde, dim, seed = match[1], int(match[2]), int(match[3] or 0)
    return Problem(sde, dim, n=2000 if dim == 2 else 1000, seed=seed)


@dataclass
class Setup:
    """A prepared problem: the start x_T, the reference end state, exact p_eps samples and their statistics."""

    problem: Problem
    sde: sdediff.LinearSDE
    mixture: GaussianMixture
    score: Callable[[Tensor, Tensor], Tensor]
    x_T: Tensor
    x_ref: Tensor
    exact: Tensor
    logp_exact_mean: float
    logp_exact_var: float
    logp_exact_n: int
    info: dict[str, Any]
    device: torch.device
    seed: int

    def generator(self, salt: int = 0) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(self.seed * 1000 + 17 + salt)


def prepare(problem: Problem, device: torch.device, n: int | None = None, ref_tol: float = 1e-10,
            floor_repeats: int = 8, log: Callable[[str], None] = print) -> Setup:
    """Draw x_T ~ p_T exactly, solve the reference, draw exact p_eps samples and the SW2 noise floor."""
    n = n or problem.n
    sde, mixture = problem.build()
    score = mixture.score_fn(sde)
    gen = torch.Generator(device).manual_seed(problem.seed + 1)
    f64 = torch.float64
    x_T = mixture.marginal(sde, sde.T).sample(n, generator=gen, device=device, dtype=f64)
    p_eps = mixture.marginal(sde, problem.eps)
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = sdediff.sample(sde, score, x_T.shape, solver="ode", method="dopri8", rtol=ref_tol, atol=ref_tol,
                             x_init=x_T, eps=problem.eps, return_info=True)
        check = sdediff.sample(sde, score, x_T.shape, solver="ode", method="dopri8", rtol=10 * ref_tol,
                               atol=10 * ref_tol, x_init=x_T, eps=problem.eps, return_info=True)
    ref_seconds = time.perf_counter() - t0
    ref_check = float((ref.samples - check.samples).pow(2).mean().sqrt())
    exact = p_eps.sample(n, generator=gen, device=device, dtype=f64)
    big = p_eps.sample(4 * n, generator=gen, device=device, dtype=f64)
    logp_big = mixture.log_prob(big, sde, problem.eps)
    floor = noise_floor(lambda k, g: p_eps.sample(k, generator=g, device=device, dtype=f64), n,
                        repeats=floor_repeats, generator=torch.Generator(device).manual_seed(problem.seed + 2))
    info = {"n": n, "eps": problem.eps, "ref_tol": ref_tol, "ref_nfe": ref.nfe, "ref_check_tol": 10 * ref_tol,
            "ref_check_rmse": ref_check, "ref_seconds": ref_seconds, "x_ref_rms": float(ref.samples.pow(2).mean().sqrt()),
            "sw2_floor_mean": float(floor.mean()), "sw2_floor_std": float(floor.std()) if floor_repeats > 1 else 0.0}
    log(f"  {problem.name}: n={n}, reference dopri8 tol {ref_tol:g}: NFE {ref.nfe}, RMS change vs tol "
        f"{10 * ref_tol:g}: {ref_check:.1e}; SW2 noise floor {info['sw2_floor_mean']:.3g} ± {info['sw2_floor_std']:.2g}")
    return Setup(problem, sde, mixture, score, x_T, ref.samples, exact, float(logp_big.mean()), float(logp_big.var()),
                 len(big), info, device, problem.seed)


def evaluate(setup: Setup, x: Tensor, kind: str) -> dict[str, float]:
    """RMSE to the reference (ODE solvers), SW2 to exact samples, mean log-density gap and its standard error."""
    x = x.to(torch.float64)
    out: dict[str, float] = {}
    if kind == "ode":
        err = (x - setup.x_ref).reshape(len(x), -1).pow(2).mean(1)  # per-sample mean squared error
        out["rmse"] = float(err.mean().sqrt())
        # the RMSE mixes smooth error with rare samples that end in another mixture component; these show it
        out["rmse_median_sample"] = float(err.sqrt().median())
        out["rmse_max_sample"] = float(err.sqrt().max())
    if not bool(torch.isfinite(x).all()):
        out.update(sw2=math.inf, logp_gap=-math.inf, logp_gap_se=math.nan)
        return out
    out["sw2"] = float(sliced_wasserstein(x, setup.exact, 256, generator=torch.Generator(setup.device).manual_seed(7)))
    logp = setup.mixture.log_prob(x, setup.sde, setup.problem.eps)
    out["logp_gap"] = float(logp.mean()) - setup.logp_exact_mean
    out["logp_gap_se"] = math.sqrt(float(logp.var()) / len(logp) + setup.logp_exact_var / setup.logp_exact_n)
    return out


# --------------------------------------------------------------------------------------------------
# one run of each kind of method: (setup, steps or tol) -> (x_eps, nfe)
# --------------------------------------------------------------------------------------------------
def _sdediff_run(setup: Setup, spec: common.SolverSpec, steps: int, tol: float | None, x_T: Tensor | None = None):
    x_T = setup.x_T if x_T is None else x_T
    counted = common.Counted(setup.score)
    res = sdediff.sample(setup.sde, counted, x_T.shape, solver=spec.solver, steps=steps, eps=setup.problem.eps,
                         x_init=x_T, generator=setup.generator(), time_grid=spec.time_grid, return_info=True,
                         **spec.build_options(tol))
    if res.nfe != counted.calls:
        raise RuntimeError(f"sdediff reported NFE {res.nfe} but the score was called {counted.calls} times")
    per_sample = res.stats.get("nfe_per_sample") if isinstance(res.stats, dict) else None
    if isinstance(per_sample, Tensor):
        return res.samples, counted.calls, {"nfe_per_sample": float(per_sample.double().mean())}
    return res.samples, counted.calls


def kd_run(setup: Setup, kd_name: str, schedule: str, steps: int, x_T: Tensor | None = None,
           sigmas: Tensor | None = None) -> tuple[Tensor, int]:
    """k-diffusion's ``kd_name`` from x_T on ``schedule``'s ``steps + 1`` noise levels (or on ``sigmas``)."""
    kds, _ = common.load_kdiffusion()
    if sigmas is None:
        sigmas = common.kd_sigmas(kds, setup.sde, steps, setup.problem.eps, schedule, setup.device)
    return peers.kd_sample(setup.sde, setup.score, setup.x_T if x_T is None else x_T, setup.problem.eps, kd_name,
                           sigmas, setup.generator())


def _per_step_cost(run: Callable[[int, Tensor], int], x_small: Tensor) -> tuple[float, float]:
    """NFE = a * steps + b, measured from runs of 4 and 8 steps on a few samples."""
    n4, n8 = run(4, x_small), run(8, x_small)
    a = (n8 - n4) / 4
    if a <= 0:
        raise RuntimeError(f"cannot infer the NFE per step (4 steps: {n4}, 8 steps: {n8})")
    return a, n4 - 4 * a


# --------------------------------------------------------------------------------------------------
# the sweep over one problem
# --------------------------------------------------------------------------------------------------
def _record(setup: Setup, impl: str, label: str, kind: str, run: Callable[[], tuple[Any, ...]], *,
            budget: int | None = None, tol: float | None = None, steps: int | None = None,
            schedule: str | None = None) -> dict[str, Any]:
    rec: dict[str, Any] = {"problem": setup.problem.name, "impl": impl, "label": label, "kind": kind,
                           "budget": budget, "tol": tol, "steps": steps, "schedule": schedule}
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            x, nfe, *extra = run()  # (x, NFE) or (x, NFE, figures such as the NFE per sample)
        common.synchronize(setup.device)
        rec["seconds"] = time.perf_counter() - t0
        rec.update(nfe=nfe, n=len(x), **(extra[0] if extra else {}))
        rec.update(evaluate(setup, x, kind))
    except Exception as err:  # a method that blows up at a tiny budget is a result, not a crash
        rec["seconds"] = time.perf_counter() - t0
        rec["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        if not isinstance(err, (FloatingPointError, ValueError, RuntimeError, AssertionError)):
            rec["traceback"] = traceback.format_exc(limit=4)
    return rec


def _ladder(setup: Setup, impl: str, label: str, kind: str, run_tol: Callable[[float], tuple[Any, ...]],
            max_nfe: int, tols: Sequence[float]) -> list[dict[str, Any]]:
    out = []
    for tol in tols:
        rec = _record(setup, impl, label, kind, lambda tol=tol: run_tol(tol), tol=tol)
        out.append(rec)
        if rec.get("nfe", 0) > max_nfe:
            break
    return out


def run_problem(setup: Setup, specs: Sequence[common.SolverSpec], nfes: Sequence[int] = NFES, *,
                kdiffusion: bool = True, kd_samplers: Sequence[str] | None = None,
                kd_schedules: Sequence[str] = KD_SCHEDULES, torchdiffeq_methods: Sequence[str] | None = None,
                torchsde_methods: Sequence[str] | None = None, tols: Sequence[float] = TOL_LADDER,
                diffusers: bool = True, schedulers: Sequence[Any] | None = None, diffusers_custom: bool = True,
                torchode_methods: Sequence[str] | None = None, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every spec and peer at every NFE budget on one prepared problem; a list of result records
    (``schedulers``: diffusers' :class:`peers.SchedulerSpec` list, default all)."""
    records: list[dict[str, Any]] = []
    max_nfe = max(nfes)
    x_small = setup.x_T[:4]

    def budgets(per_step: float, fixed: float = 0.0) -> list[tuple[int, int]]:
        """(budget, steps) for the budgets that afford at least one step."""
        pairs = [(nfe, common.steps_for_budget(nfe, per_step, fixed)) for nfe in nfes]
        return [(nfe, steps) for nfe, steps in pairs if steps >= 1]

    def done(recs: list[dict[str, Any]]) -> None:
        records.extend(recs)
        if not recs:
            return
        r = recs[-1]
        log(f"    {r['impl']:>11} {r['label']:<28} " + ("ok" if "error" not in r else f"errors: {r['error']}"))

    equal_tol: dict[tuple[str, str], Callable[[float], tuple[Any, ...]]] = {}  # compared at EQUAL_TOLS too
    for spec in specs:
        if spec.adaptive:
            run_tol = lambda tol, spec=spec: _sdediff_run(setup, spec, 1, tol)  # noqa: E731
            done(_ladder(setup, "sdediff", spec.label, spec.kind, run_tol, max_nfe, tols))
            if spec.solver == "adaptive_ode":
                equal_tol["sdediff", spec.label] = run_tol
            continue
        try:
            if spec.nfe_per_step is None:
                a, b = _per_step_cost(lambda s, x, spec=spec: _sdediff_run(setup, spec, s, None, x)[1], x_small)
            else:
                a, b = spec.nfe_per_step, 0.0
        except Exception as err:
            done([{"problem": setup.problem.name, "impl": "sdediff", "label": spec.label, "kind": spec.kind,
                   "error": f"NFE probe failed: {type(err).__name__}: {err}"}])
            continue
        done([_record(setup, "sdediff", spec.label, spec.kind,
                      lambda spec=spec, steps=steps: _sdediff_run(setup, spec, steps, None), budget=nfe, steps=steps)
              for nfe, steps in budgets(a, b)])

    for method in (TORCHDIFFEQ_METHODS if torchdiffeq_methods is None else torchdiffeq_methods):
        per_step = TORCHDIFFEQ_METHODS[method]
        label = f"odeint {method}"
        if per_step is None:
            done(_ladder(setup, "torchdiffeq", label, "ode",
                         lambda tol, method=method: peers.torchdiffeq_sample(
                             setup.sde, setup.score, setup.x_T, setup.problem.eps, method, 0, tol), max_nfe, tols))
            continue
        done([_record(setup, "torchdiffeq", label, "ode",
                      lambda method=method, steps=steps: peers.torchdiffeq_sample(
                          setup.sde, setup.score, setup.x_T, setup.problem.eps, method, steps, None),
                      budget=nfe, steps=steps) for nfe, steps in budgets(per_step)])

    for method in (peers.TORCHODE_METHODS if torchode_methods is None else torchode_methods):
        if peers.load_torchode()[0] is None:
            break

        def torchode_run(tol: float, method: str = method) -> tuple[Tensor, int, dict[str, float]]:
            res = peers.torchode_solve(setup.sde, setup.score, setup.x_T, setup.problem.eps, method, tol, tol)
            return res.x, res.calls, {"nfe_per_sample": res.calls, "steps_per_sample": float(res.steps.double().mean())}

        done(_ladder(setup, "torchode", f"torchode {method}", "ode", torchode_run, max_nfe, tols))
        equal_tol["torchode", f"torchode {method}"] = torchode_run
    if len(equal_tol) > 1:
        for (impl, label), run_tol in equal_tol.items():
            ran = {r["tol"] for r in records if r["label"] == label}
            done([_record(setup, impl, label, "ode", lambda tol=tol, run_tol=run_tol: run_tol(tol), tol=tol)
                  for tol in EQUAL_TOLS if tol not in ran])

    if diffusers and peers.load_diffusers()[0] is not None:
        loop = peers.DiffusersLoop(setup.sde, setup.problem.eps)
        for spec, schedule, nfe, steps, _ in peers.diffusers_runs(loop, peers.SCHEDULERS if schedulers is None
                                                                   else schedulers, nfes, diffusers_custom):
            done([_record(setup, "diffusers", f"{spec.label} [{schedule}]", "ode",
                          lambda spec=spec, schedule=schedule, steps=steps: loop.sample(
                              spec, schedule, steps, setup.score, setup.x_T), budget=nfe, steps=steps,
                          schedule=schedule)])

    kds, _ = common.load_kdiffusion()
    if kdiffusion and kds is not None:
        for kd_name in (common.KD_SAMPLERS if kd_samplers is None else kd_samplers):
            _, kind, per_step = common.KD_SAMPLERS[kd_name]
            for schedule in kd_schedules:
                done([_record(setup, "k-diffusion", f"{kd_name} [{schedule}]", kind,
                              lambda kd_name=kd_name, schedule=schedule, steps=steps: kd_run(
                                  setup, kd_name, schedule, steps), budget=nfe, steps=steps, schedule=schedule)
                      for nfe, steps in budgets(per_step)])

    for method in (TORCHSDE_METHODS if torchsde_methods is None else torchsde_methods):
        label = f"sdeint {method}"
        try:
            a, b = _per_step_cost(lambda s, x, method=method: peers.torchsde_sample(
                setup.sde, setup.score, x, setup.problem.eps, method, s, setup.generator())[1], x_small)
        except Exception as err:
            done([{"problem": setup.problem.name, "impl": "torchsde", "label": label, "kind": "sde",
                   "error": f"NFE probe failed: {type(err).__name__}: {err}"}])
            continue
        done([_record(setup, "torchsde", label, "sde",
                      lambda method=method, steps=steps: peers.torchsde_sample(
                          setup.sde, setup.score, setup.x_T, setup.problem.eps, method, steps, setup.generator()),
                      budget=nfe, steps=steps)
              for nfe, steps in budgets(a, b)])
    return records


# --------------------------------------------------------------------------------------------------
# tables and plot
# --------------------------------------------------------------------------------------------------
def _cell(r: dict[str, Any] | None, metric: str) -> str:
    if r is None:
        return "—"
    if "error" in r:
        return "raised"
    value = r.get(metric)
    if metric == "logp_gap":
        text = f"{value:+.3f} ± {r['logp_gap_se']:.3f}" if math.isfinite(value) else "non-finite"
    else:
        text = common.fmt(value)
    extra = "*" if r.get("budget") is not None and r["nfe"] > r["budget"] else ""
    extra += f", tol {r['tol']:g}" if r.get("tol") is not None else ""
    if r["impl"] == "diffusers":
        extra += f", {r['schedule'].replace('custom:', '')}"
    elif r.get("schedule") in SCHEDULE_MARK:
        extra += f", {SCHEDULE_MARK[r['schedule']]}"
    return f"{text} ({r['nfe']}{extra})"


def summary_table(results: dict[str, Any]) -> list[str]:
    """Markdown rows: per problem and NFE budget, the best sdediff, k-diffusion and diffusers (own schedules) ODE runs
    and the ratios of sdediff's RMSE (and median per-sample error) to each peer's."""
    out = ["| problem | NFE ≤ | best sdediff ODE solver | RMSE | best k-diffusion | RMSE | best diffusers | RMSE | "
           "sdediff / k-diffusion | sdediff / diffusers | same, median per-sample error |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for prob in results["problems"]:
        recs = [r for r in results["records"] if r["problem"] == prob["name"]]
        for budget in results["nfes"]:
            ours = tables.best_by_impl(recs, "ode", "sdediff", budget)
            kd, hf = (tables.best_by_impl(recs, "ode", impl, budget) for impl in ("k-diffusion", "diffusers"))
            if ours is None or (kd is None and hf is None):
                continue
            (kd_r, kd_m), (hf_r, hf_m) = tables.versus(ours, kd), tables.versus(ours, hf)
            out.append(f"| {prob['name']} | {budget} | `{ours['label']}` | {ours['rmse']:.2e} | "
                       f"{_named(kd)} | {_named(hf)} | {kd_r} | {hf_r} | {kd_m} / {hf_m} |")
    return out


def _named(r: dict[str, Any] | None) -> str:
    if r is None:
        return "— | —"
    return f"`{r['label']}` | {r['rmse']:.2e}"


def markdown(results: dict[str, Any]) -> str:
    nfes = results["nfes"]
    out = ["# Accuracy per NFE", "",
           f"Run: `{results['command']}` on {results['environment']}; float64 throughout.", "",
           "Every method starts from the same exact samples of p_T and stops at t = eps (1e-3 under VP and VE; sub-VP: "
           f"{EPS['subvp']}, where its sigma = s/m is VP's at 1e-3). Each cell: error "
           "(NFE actually used; `tol` for adaptive runs, the best tolerance within the budget; for k-diffusion rows the best of "
           "its schedules: none = the sigma levels of sdediff's uniform time grid, `Q`: of its quadratic grid, `E`: "
           "k-diffusion's exponential (log-SNR uniform) schedule, `K`: its Karras schedule; diffusers rows: the best of "
           "the scheduler's own schedules, or of sdediff's grids passed as `timesteps=`/`sigmas=`/`trained_betas`, named "
           "in the cell; its loop is driven as benchmarks/peers.py describes, with the NFE it really used). `—`: nothing "
           "ran within that budget; `raised`: the run raised an exception, a non-finite state included (message in the "
           "JSON); `*`: the run used more NFE than its budget (the spec's NFE per step is too low).", "",
           f"k-diffusion: {results['kdiffusion']}; {results.get('diffusers', '')}; {results.get('torchode', '')}", ""]
    if results["skipped"]:
        out += ["Skipped: " + "; ".join(results["skipped"]), ""]
    out += ["## Summary: best probability-flow solvers", "",
            "Per budget, the sdediff ODE solver, the k-diffusion sampler (over its samplers and schedules) and the "
            "diffusers scheduler (over its own schedules) with the lowest pathwise RMSE, and the ratios of sdediff's "
            "error to theirs (below 1: sdediff's is lower). The RMSE at few NFE is dominated by the few paths that a "
            "solver sends to another mixture component; the median per-sample error shows the typical path.", "",
            *summary_table(results), ""]
    for prob in results["problems"]:
        recs = [r for r in results["records"] if r["problem"] == prob["name"]]
        info = prob["info"]
        out += [f"## {prob['name']}", "",
                f"n = {info['n']} samples; reference: dopri8 rtol = atol = {info['ref_tol']:g} ({info['ref_nfe']} NFE), "
                f"RMS change against tol {info['ref_check_tol']:g}: {info['ref_check_rmse']:.1e} (RMS of x_ref: "
                f"{info['x_ref_rms']:.3g}).", ""]
        head = "| solver | impl | " + " | ".join(f"NFE ≤ {n}" for n in nfes) + " |"
        rule = "|---|---|" + "---|" * len(nfes)
        for kind, metric, title in (("ode", "rmse", "Probability-flow ODE: pathwise RMSE to the reference"),
                                    ("sde", "sw2", f"SDE samplers: sliced W2 to {info['n']} exact p_eps samples "
                                                   f"(noise floor {info['sw2_floor_mean']:.3g} ± "
                                                   f"{info['sw2_floor_std']:.2g})"),
                                    ("sde", "logp_gap", "SDE samplers: mean log p_eps(x) minus its exact expectation "
                                                        "(nats, ± standard error)")):
            rows = tables.rows(recs, kind)
            if not rows:
                continue
            out += [f"### {title}", "", head, rule]
            for (impl, label), rr in rows.items():
                out.append(f"| {label} | {impl} | " + " | ".join(_cell(tables.cell_record(rr, n, metric), metric)
                                                              for n in nfes) + " |")
            out.append("")
        out += adaptive_table(recs)
    return "\n".join(out)


def adaptive_table(records: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown: sdediff's ``adaptive_ode`` and torchode's solvers at equal tolerances (every tolerance both ran)."""
    runs = {(r["label"], r["tol"]): r for r in records if r.get("tol") is not None and "error" not in r
            and (r["label"] == "adaptive_ode" or r["impl"] == "torchode")}
    labels = list(dict.fromkeys(label for label, _ in runs))
    tols = [tol for tol in EQUAL_TOLS if ("adaptive_ode", tol) in runs and any((lb, tol) in runs for lb in labels[1:])]
    if not tols or len(labels) < 2:
        return []
    out = ["### Per-sample adaptive solvers at equal tolerances (rtol = atol)", "",
           "NFE: score evaluations per sample (`adaptive_ode`: the mean over samples of its own count; torchode evaluates "
           "the whole batch at every iteration, so every sample pays its batch evaluations); time: wall seconds of the "
           "whole batch / samples.", "",
           "| tol | " + " | ".join(f"{lb}: NFE, RMSE, µs/sample" for lb in labels) + " |",
           "|---|" + "---|" * len(labels)]
    for tol in tols:
        cells = []
        for lb in labels:
            r = runs.get((lb, tol))
            cells.append("—" if r is None else f"{r.get('nfe_per_sample', r['nfe']):.0f}, {r['rmse']:.2e}, "
                                               f"{1e6 * r['seconds'] / r['n']:.0f}")
        out.append(f"| {tol:g} | " + " | ".join(cells) + " |")
    return [*out, ""]


def plot(results: dict[str, Any], path: Path) -> bool:
    """Log-log error vs NFE: one column per problem, ODE (RMSE) on top, SDE (SW2) below; peers dashed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    problems = results["problems"]
    nfes = results["nfes"]
    fig, axes = plt.subplots(2, len(problems), figsize=(4.2 * len(problems) + 3, 8), squeeze=False)
    labels_seen: dict[str, Any] = {}
    palette = [*plt.get_cmap("tab20").colors, *plt.get_cmap("tab20b").colors, *plt.get_cmap("Dark2").colors]
    keys = list(dict.fromkeys((r["impl"], r["label"].split(" [")[0]) for r in results["records"]))
    color = {k: palette[i % len(palette)] for i, k in enumerate(keys)}
    marker = {"sdediff": "o", "k-diffusion": "s", "torchdiffeq": "^", "torchsde": "v"}
    for col, prob in enumerate(problems):
        recs = [r for r in results["records"] if r["problem"] == prob["name"]]
        for row, kind in enumerate(("ode", "sde")):
            ax = axes[row][col]
            metric = tables.PRIMARY[kind]
            groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
            for (impl, label), rr in tables.rows(recs, kind).items():
                groups.setdefault((impl, label.split(" [")[0]), []).extend(rr)  # k-diffusion: best schedule
            for key, rr in groups.items():
                pts = {}
                for n in nfes:
                    r = tables.cell_record(rr, n, metric)
                    if r is not None and "error" not in r and math.isfinite(r.get(metric, math.nan)) and r[metric] > 0:
                        pts[r["nfe"]] = r[metric]
                if not pts:
                    continue
                xs = sorted(pts)
                name = key[1] if key[0] == "sdediff" else f"{key[0]}: {key[1]}"
                (line,) = ax.plot(xs, [pts[x] for x in xs], marker=marker.get(key[0], "o"), ms=3, color=color[key],
                                  ls="-" if key[0] == "sdediff" else "--", label=name)
                labels_seen.setdefault(name, line)
            if kind == "sde":
                ax.axhline(prob["info"]["sw2_floor_mean"], color="grey", ls=":", lw=1)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(list(nfes))
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("NFE")
            ax.set_ylabel("pathwise RMSE" if kind == "ode" else "sliced W2 (dotted: noise floor)")
            ax.set_title(f"{prob['name']}: {'PF-ODE' if kind == 'ode' else 'SDE'}")
            ax.grid(True, which="both", alpha=0.3)
    fig.legend(list(labels_seen.values()), list(labels_seen), loc="center right", fontsize=7, frameon=False)
    fig.suptitle("Error vs NFE from the same exact p_T samples (solid: sdediff; dashed: peers; k-diffusion and "
                 "unipc-3 at the best of the same four grids)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.8 / (4.2 * len(problems) + 3), 0.97))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return True


# --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true", help="small run: n=256, NFE 5/10/20, d=2 and d=64, reference tol 1e-9")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--n", type=int, default=None, help="samples per problem (default 2000 for d=2, 1000 for d=64)")
    p.add_argument("--nfe", type=int, nargs="+", default=None, help=f"NFE budgets (default {' '.join(map(str, NFES))})")
    p.add_argument("--problems", nargs="+", default=None, metavar="NAME",
                   help="problems as SDE + dimension [+ s + mixture seed], e.g. vp2 ve64 subvp16 vp16s1 (default: vp2 vp64 "
                        "ve2 ve64)")
    p.add_argument("--only", default=None, metavar="REGEX", help="only sdediff specs whose label matches this regular expression")
    p.add_argument("--no-peers", action="store_true", help="skip k-diffusion, diffusers, torchdiffeq, torchode and torchsde")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="output folder (default benchmarks/results)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = common.start_solver_run(args.device, args.only)
    device, specs = run.device, run.specs
    nfes = tuple(args.nfe or ((5, 10, 20) if args.quick else NFES))
    problems = list(PROBLEMS) if args.problems is None else [parse_problem(key) for key in args.problems]
    results: dict[str, Any] = {"command": "python benchmarks/accuracy_per_nfe.py " + " ".join(argv or sys.argv[1:]),
                               "environment": run.env, "nfes": list(nfes), "kdiffusion": run.kd_note,
                               "diffusers": peers.load_diffusers()[1], "torchode": peers.load_torchode()[1],
                               "skipped": run.skipped, "optional_modules": run.notes, "problems": [], "records": []}
    t0 = time.perf_counter()
    for problem in problems:
        n = args.n or (256 if args.quick else None)
        setup = prepare(problem, device, n=n, ref_tol=1e-9 if args.quick else 1e-10,
                        floor_repeats=4 if args.quick else 8)
        results["problems"].append({"name": problem.name, "sde": problem.sde, "dim": problem.dim, "info": setup.info})
        others = None if not args.no_peers else ()
        results["records"] += run_problem(setup, specs, nfes, kdiffusion=not args.no_peers, diffusers=not args.no_peers,
                                          torchdiffeq_methods=others, torchsde_methods=others, torchode_methods=others)
    results["seconds"] = time.perf_counter() - t0
    stem = "accuracy_per_nfe" + ("_quick" if args.quick else "")
    png = common.plot_path(args.out, stem, "accuracy_per_nfe")
    plotted = plot(results, png)
    text = common.with_plot(markdown(results), args.out / f"{stem}.md", png) if plotted else markdown(results)
    atomic_write(args.out / f"{stem}.md", text + "\n")
    atomic_write(args.out / f"{stem}.json", json.dumps(results, indent=1, default=str) + "\n")
    print()
    print(text)
    print(f"\nwrote {args.out}/{stem}.md, .json" + (f", {png}" if plotted else " (no matplotlib: no plot)")
          + f" in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
