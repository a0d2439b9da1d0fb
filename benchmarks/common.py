"""Helpers shared by the benchmark scripts: solver specs (as data), the registry check, NFE counting,
timing, and k-diffusion's noise levels (its loader and denoiser adapter come from sdediff.interop.kdiffusion);
for the scripts that train a model and write results: common options, the run preamble (:func:`start_run`),
timed training, the likelihood ODE in chunks and the results files.

Nothing here is part of the ``sdediff`` package; the scripts import this file by its plain name (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import sdediff
from sdediff._io import atomic_write
from sdediff.interop.kdiffusion import KDiffusionDenoiser, load_sampling, sigma_of_time
from sdediff.likelihood.engine import cat_results
from sdediff.solvers import get_solver

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: the plots the documentation shows live here, once: a full run into RESULTS_DIR writes them here directly
DOCS_IMG = Path(__file__).resolve().parent.parent / "docs" / "img"


def plot_path(out: Path, stem: str, docs_name: str) -> Path:
    """Where a benchmark writes its plot: ``docs/img/<docs_name>.png`` when the run's output stem is ``docs_name`` (a
    full run) and its folder is the default results folder (the docs show that plot, and it is stored only there),
    else ``<out>/<stem>.png`` next to the run's other outputs."""
    if stem == docs_name and out.resolve() == RESULTS_DIR:
        return DOCS_IMG / f"{docs_name}.png"
    return out / f"{stem}.png"


def with_plot(text: str, md: Path, png: Path) -> str:
    """The markdown ``text`` of the results page ``md`` with a last paragraph showing the plot ``png`` (a relative link:
    it renders wherever the repository is browsed)."""
    link = Path(os.path.relpath(png.resolve(), md.resolve().parent)).as_posix()
    return f"{text.rstrip()}\n\nPlot: ![{png.stem}]({link})\n"


# --------------------------------------------------------------------------------------------------
# Solver specs
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SolverSpec:
    """One sdediff configuration to benchmark.

    ``nfe_per_step`` turns a NFE budget into ``steps = budget // nfe_per_step`` (``None``: measured by
    running 4 and 8 steps on a tiny batch, for solvers whose cost per step is not known in advance).
    Adaptive solvers instead run a ladder of tolerances (``options[key] = tol`` for ``tol_keys``) and
    each NFE budget shows the best run that stayed within it.
    """

    label: str
    solver: str
    kind: str  # "ode" (deterministic: pathwise error) or "sde" (distributional error)
    nfe_per_step: int | None = 1
    options: dict[str, Any] = field(default_factory=dict)
    time_grid: str = "uniform"
    adaptive: bool = False
    tol_keys: tuple[str, ...] = ("rtol", "atol")

    @property
    def family(self) -> str:
        return self.solver.partition(":")[0]

    def build_options(self, tol: float | None = None) -> dict[str, Any]:
        opts = dict(self.options)
        if self.adaptive:
            for key in self.tol_keys:
                opts[key] = 1e-3 if tol is None else tol
        return opts


def _dpm_solver_specs() -> list[SolverSpec]:
    specs = []
    for pred in ("data", "noise"):
        specs.append(SolverSpec(f"dpm_solver-1 ({pred})", "dpm_solver", "ode", 1,
                                {"order": 1, "method": "multistep", "prediction": pred}, time_grid="log_snr"))
        for order in (2, 3):
            for method, per_step, tag in (("singlestep", order, "S"), ("multistep", 1, "M")):
                specs.append(SolverSpec(f"dpm_solver-{order}{tag} ({pred})", "dpm_solver", "ode", per_step,
                                        {"order": order, "method": method, "prediction": pred}, time_grid="log_snr"))
    return specs


#: Everything the benchmarks try, registered or not (unregistered names are skipped with a note).
#: Option names of solvers that are not merged yet are our best guess: edit them here when they land.
SPECS: list[SolverSpec] = [
    # --- probability-flow ODE solvers (pathwise error against a tight reference) ---
    SolverSpec("euler", "euler", "ode", 1),
    SolverSpec("heun", "heun", "ode", 2),
    SolverSpec("heun (karras grid)", "heun", "ode", 2, time_grid="karras"),
    SolverSpec("heun (log-SNR grid)", "heun", "ode", 2, time_grid="log_snr"),
    SolverSpec("ode (dopri5, adaptive)", "ode", "ode", None, {"method": "dopri5"}, adaptive=True),
    *_dpm_solver_specs(),
    SolverSpec("ddim", "ddim", "ode", 1, time_grid="log_snr"),
    SolverSpec("lms (karras grid)", "lms", "ode", 1, time_grid="karras"),
    # UniPC on each grid the k-diffusion peers also get (the plot shows the best grid, as for them)
    *[SolverSpec(f"unipc-3 [{grid}]", "unipc", "ode", 1, {"order": 3}, time_grid=grid)
      for grid in ("uniform", "quadratic", "log_snr", "karras")],
    SolverSpec("unipc-2 [uniform]", "unipc", "ode", 1, {"order": 2}),
    SolverSpec("edm_heun (karras grid)", "edm_heun", "ode", 2, time_grid="karras"),
    SolverSpec("dpm_solver-2M midpoint (data)", "dpm_solver", "ode", 1, {"order": 2, "solver_type": "midpoint"},
               time_grid="log_snr"),
    # iPNDM and DEIS on the same four grids
    *[SolverSpec(f"{name} [{grid}]", name, "ode", 1, time_grid=grid)
      for name in ("ipndm", "deis") for grid in ("uniform", "quadratic", "log_snr", "karras")],
    SolverSpec("adaptive_ode", "adaptive_ode", "ode", None, adaptive=True),
    # --- reverse-SDE samplers (distance to exact samples) ---
    SolverSpec("euler_maruyama", "euler_maruyama", "sde", 1),
    SolverSpec("reverse_diffusion", "reverse_diffusion", "sde", 1),
    SolverSpec("ancestral", "ancestral", "sde", 1),
    SolverSpec("pc (rd + 1 langevin)", "pc", "sde", 2, {"snr": 0.16, "corrector_steps": 1}),
    SolverSpec("langevin", "langevin", "sde", 1, {"snr": 0.16}),
    SolverSpec("ddpm", "ddpm", "sde", 1),
    SolverSpec("sde_dpm_solver", "sde_dpm_solver", "sde", None, time_grid="log_snr"),
    SolverSpec("torchsde:euler", "torchsde:euler", "sde", None),
    SolverSpec("torchsde:srk", "torchsde:srk", "sde", None),
    SolverSpec("torchsde:reversible_heun", "torchsde:reversible_heun", "sde", None),
    SolverSpec("adaptive_sde", "adaptive_sde", "sde", None, adaptive=True),
]


def spec_status(spec: SolverSpec) -> str | None:
    """``None`` when ``spec`` can run now, else why not (its solver is not registered, or rejects the options)."""
    families = {name.partition(":")[0] for name in sdediff.available_solvers()}
    if spec.family not in families:
        return f"solver {spec.family!r} is not registered yet"
    try:
        get_solver(spec.solver, **spec.build_options())
    except (TypeError, ValueError) as err:
        return f"solver {spec.solver!r} rejects the spec's options: {err}"
    return None


def runnable_specs(specs: Sequence[SolverSpec], log: Callable[[str], None] = print) -> list[SolverSpec]:
    """The specs that can run now; prints a note for each one skipped."""
    out = []
    for spec in specs:
        why = spec_status(spec)
        if why is None:
            out.append(spec)
        else:
            log(f"  skip {spec.label!r}: {why}")
    return out


@dataclass
class SolverRun:
    """The common start of the solver benchmarks (:func:`start_solver_run`)."""

    device: torch.device
    env: str
    notes: list[str]  # optional solver modules missing or broken
    specs: list[SolverSpec]  # the runnable specs selected
    skipped: list[str]  # why the other selected specs were skipped
    kds: types.ModuleType | None  # k_diffusion.sampling, or None
    kd_note: str


def start_solver_run(device: str, only: str | None) -> SolverRun:
    """One CPU thread on ``device``, the specs whose label matches the regular expression ``only`` (all without)
    that can run, and k-diffusion loaded; each step printed."""
    dev, env = setup_torch(device)
    print(env)
    notes: list[str] = []
    skipped: list[str] = []
    specs = runnable_specs([s for s in SPECS if only is None or re.search(only, s.label)],
                           log=lambda m: (print(m), skipped.append(m.strip()[5:])))
    kds, kd_note = load_kdiffusion()
    print(kd_note)
    return SolverRun(dev, env, notes, specs, skipped, kds, kd_note)


def steps_for_budget(nfe: int, per_step: float, fixed: float = 0.0) -> int:
    """The most steps whose cost ``per_step * steps + fixed`` stays within ``nfe`` (0: not even one step fits)."""
    return max(0, int(math.floor((nfe - fixed) / per_step + 1e-9)))


class Counted:
    """Wrap a callable and count its calls (each call on a whole batch counts once)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.fn(*args, **kwargs)


# --------------------------------------------------------------------------------------------------
# Timing and environment
# --------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """``(wall, cpu)`` seconds of one call of ``fn``, device-synchronised.

    ``cpu`` is the calling thread's CPU time (:func:`time.thread_time`): with ``torch.set_num_threads(1)``
    all of torch's CPU work runs on this thread, so on a CPU device it measures the work done, unaffected by
    other processes competing for the cores (which inflate wall times). Meaningless for CUDA work.
    """
    synchronize(device)
    w0, c0 = time.perf_counter(), time.thread_time()
    fn()
    synchronize(device)
    return time.perf_counter() - w0, time.thread_time() - c0


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def setup_torch(device: str) -> tuple[torch.device, str]:
    """One CPU thread (so that timings do not depend on the machine's core count); a line describing the setup."""
    torch.set_num_threads(1)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but CUDA is not available")
    what = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (cpu_name() or platform.processor() or "CPU")
    return dev, (f"torch {torch.__version__}, device {dev} ({what}), torch.set_num_threads(1) "
                 f"[{torch.get_num_threads()} CPU thread], python {platform.python_version()}")


def cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}e}"


# --------------------------------------------------------------------------------------------------
# Scripts that train a model and write results (digits_*.py)
# --------------------------------------------------------------------------------------------------
def add_run_args(p: argparse.ArgumentParser, *, steps: int, quick_steps: int, batch_size: int, lr: float,
                 ema_decay: float = 0.999) -> None:
    """The options every training benchmark takes: ``--quick --steps --out --device --seed --batch-size --lr
    --ema-decay`` (``--steps`` defaults to ``steps``, or ``quick_steps`` with ``--quick``: see :func:`start_run`)."""
    p.add_argument("--quick", action="store_true", help="smoke run: few steps and evaluations, *_quick.* outputs")
    p.add_argument("--steps", type=int, default=None, help=f"training steps (default {steps}; {quick_steps} with --quick)")
    p.set_defaults(default_steps=(steps, quick_steps))
    p.add_argument("--out", default=str(RESULTS_DIR), help="results folder (default benchmarks/results)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--ema-decay", type=float, default=ema_decay)


def add_likelihood_args(p: argparse.ArgumentParser, *, bound_t: int) -> None:
    """Options of the test-set scoring: ``--t-eps --n-test --tol --nll-batch --bound-t``."""
    p.add_argument("--t-eps", type=float, default=1e-5, help="smallest training time, ODE start and bound t_eps")
    p.add_argument("--n-test", type=int, default=None, help="test images scored (default all 359; 16 with --quick)")
    p.add_argument("--tol", type=float, default=None,
                   help="accuracy of the ODE likelihood in nats (log_likelihood's tol; default its own: 3e-4 nats per "
                        "dimension with Hutchinson's trace, 1e-4 with the exact trace)")
    p.add_argument("--nll-batch", type=int, default=180, help="test images per log_likelihood call")
    p.add_argument("--bound-t", type=int, default=bound_t, help="Monte Carlo times per image for the bound")


@dataclass
class ScriptRun:
    """A benchmark run: its device, results folder and file suffix, environment and command lines, start time."""

    name: str
    device: torch.device
    out: Path
    suffix: str
    env: str
    command: str
    start: float

    def seconds(self) -> float:
        """Wall seconds since :func:`start_run`."""
        return time.perf_counter() - self.start

    def write(self, result: dict[str, Any], md: str, extra: str = "") -> None:
        """Print ``md`` and write ``{name}{suffix}.json`` and ``.md`` atomically into the results folder."""
        print()
        print(md)
        stem = self.out / f"{self.name}{self.suffix}"
        atomic_write(stem.with_suffix(".json"), json.dumps(result, indent=1, default=str))
        atomic_write(stem.with_suffix(".md"), md)
        print(f"wrote {stem.with_suffix('.md')}, .json{extra}")


def command_line(name: str, argv: list[str] | None) -> str:
    """The command that ran ``benchmarks/<name>.py`` with ``argv`` (the process's own arguments when ``None``)."""
    return " ".join([f"python benchmarks/{name}.py", *(sys.argv[1:] if argv is None else argv)])


def start_run(name: str, args: argparse.Namespace, argv: list[str] | None) -> ScriptRun:
    """One CPU thread, the device (checked), ``args.steps`` filled in from :func:`add_run_args`'s defaults, and the
    environment and command lines printed; ``name`` is the script's file stem."""
    torch.set_num_threads(1)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but CUDA is not available")
    steps, quick_steps = args.default_steps
    del args.default_steps  # not an option: kept out of the results' "args"
    if args.steps is None:
        args.steps = quick_steps if args.quick else steps
    env = (f"sdediff {sdediff.__version__}, torch {torch.__version__}, device {device}, torch.set_num_threads(1), "
           f"python {platform.python_version()}")
    command = command_line(name, argv)
    print(env)
    print(command)
    return ScriptRun(name, device, Path(args.out), "_quick" if args.quick else "", env, command, time.perf_counter())


def fit_logged(trainer: sdediff.Trainer, tag: str = "", resume: bool = False) -> float:
    """``trainer.fit(resume=resume)``, then its log printed (prefixed by ``tag``); returns the wall seconds."""
    tic = time.perf_counter()
    trainer.fit(resume=resume)
    seconds = time.perf_counter() - tic
    for entry in trainer.log:
        print(f"  {tag}step {entry['step']:6d}  loss {entry['loss']:.4f}  lr {entry['lr']:.2e}  "
              f"{entry['steps_per_second']:.2f} steps/s")
    return seconds


@dataclass
class ODELikelihood:
    """What :func:`ode_log_probs` measured: the result over all chunks, the NFE of each chunk's calls, wall seconds."""

    result: Any  # sdediff.LikelihoodResult of all the points, chunks concatenated
    chunk_nfe: list[int]
    seconds: float

    @property
    def log_prob(self) -> Tensor:
        """float64 log-densities on the CPU."""
        return self.result.log_prob.detach().double().cpu()

    def summary(self) -> dict[str, Any]:
        """The JSON-ready cost figures: NFE per point (mean, max), calls per chunk, seconds, the method."""
        return {"method": self.result.method, "tol": self.result.tol, "nfe_per_point_mean": self.result.nfe_mean,
                "nfe_per_point_max": self.result.nfe_max, "nfe": self.chunk_nfe, "seconds": self.seconds,
                "integration_error_mean": float(self.result.integration_error.double().mean())}


def ode_log_probs(sde: Any, score: Callable[[Tensor, Tensor], Tensor], x: Tensor, args: argparse.Namespace,
                  generator: torch.Generator, trace: str = "hutchinson", **options: Any) -> ODELikelihood:
    """:func:`sdediff.log_likelihood` of ``x`` in chunks of ``args.nll_batch`` from ``args.t_eps`` with ``tol =
    args.tol`` (``options``, e.g. ``method="dopri5", rtol=1e-5, atol=1e-5``, replace it)."""
    kwargs = {"tol": args.tol} | options
    tic = time.perf_counter()
    parts = [sdediff.log_likelihood(sde, score, chunk, eps=args.t_eps, trace=trace, generator=generator, **kwargs)
             for chunk in x.split(args.nll_batch)]
    seconds = time.perf_counter() - tic
    return ODELikelihood(cat_results(parts), [r.nfe for r in parts], seconds)


# --------------------------------------------------------------------------------------------------
# k-diffusion
# --------------------------------------------------------------------------------------------------
# The loader of k_diffusion/sampling.py (the full package import needs k-diffusion's training stack), the map
# t -> sigma and the denoiser adapter live in sdediff.interop.kdiffusion; the names here are kept for the scripts.
load_kdiffusion = load_sampling
KDenoiser = KDiffusionDenoiser


#: k-diffusion samplers: name -> (function name, kind, NFE per step on a sigma sequence that ends above 0)
KD_SAMPLERS: dict[str, tuple[str, str, int]] = {
    "euler": ("sample_euler", "ode", 1),
    "heun": ("sample_heun", "ode", 2),
    "dpm_2": ("sample_dpm_2", "ode", 2),
    "lms": ("sample_lms", "ode", 1),
    "dpmpp_2m": ("sample_dpmpp_2m", "ode", 1),
    "dpmpp_2m_sde": ("sample_dpmpp_2m_sde", "sde", 1),
    "dpmpp_sde": ("sample_dpmpp_sde", "sde", 2),
}


def kd_sigmas(kds: types.ModuleType, sde: sdediff.LinearSDE, steps: int, eps: float, schedule: str,
              device: torch.device) -> Tensor:
    """``steps + 1`` decreasing noise levels from :math:`\\sigma(T)` to :math:`\\sigma(eps)` (no appended zero).

    ``"time"`` / ``"quadratic"``: the levels of sdediff's uniform / quadratic time grid; ``"karras"`` /
    ``"exponential"``: k-diffusion's own ``get_sigmas_karras`` (rho = 7) / ``get_sigmas_exponential``
    (uniform in log sigma, i.e. in log-SNR) between the same end levels, computed in float64.
    """
    sig_max, sig_min = (float(v) for v in sigma_of_time(sde, torch.tensor([sde.T, eps], dtype=torch.float64)))
    if schedule in ("time", "quadratic"):
        grid = sdediff.solvers.grids.uniform if schedule == "time" else sdediff.solvers.grids.quadratic
        sigmas = sigma_of_time(sde, grid(sde, steps, eps))
    elif schedule in ("karras", "exponential"):
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            fn = kds.get_sigmas_karras if schedule == "karras" else kds.get_sigmas_exponential
            sigmas = fn(steps + 1, sig_min, sig_max)[:-1].to(torch.float64)
        finally:
            torch.set_default_dtype(old)
    else:
        raise ValueError(f"unknown k-diffusion schedule {schedule!r}")
    sigmas[0], sigmas[-1] = sig_max, sig_min
    return sigmas.to(device)


def kd_noise_sampler(kds: types.ModuleType, kd_name: str, y: Tensor, sigmas: Tensor,
                     generator: torch.Generator) -> Any:
    """k-diffusion's default noise for ``kd_name`` with its seed drawn from ``generator`` (reproducible):
    a Brownian tree for the DPM++ SDE samplers, ``None`` (k-diffusion's default) otherwise."""
    if kd_name in ("dpmpp_sde", "dpmpp_2m_sde"):
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        return kds.BrownianTreeNoiseSampler(y, sigmas[-1], sigmas[0], seed=seed)
    return None
