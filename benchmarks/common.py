"""Helpers shared by the benchmark scripts: solver specs (as data), the registry check, NFE counting,
timing, and k-diffusion's noise levels (its loader and denoiser adapter come from sdediff.interop.kdiffusion).

Nothing here is part of the ``sdediff`` package; the scripts load this file by path.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import platform
import statistics
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import sdediff
from sdediff.interop.kdiffusion import KDiffusionDenoiser, load_sampling, sigma_of_time
from sdediff.solvers import get_solver

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Modules other engineers are adding; imported (when present) so that their solvers register.
OPTIONAL_SOLVER_MODULES = ("sdediff.solvers.exponential", "sdediff.solvers.stochastic", "sdediff.solvers.adaptive")


def import_optional_solvers() -> list[str]:
    """Import the optional solver modules that exist; return notes on those that are missing or broken."""
    notes = []
    for name in OPTIONAL_SOLVER_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is not None and name.startswith(err.name):
                notes.append(f"{name}: not present yet")
            else:
                notes.append(f"{name}: import failed ({err})")
        except Exception as err:  # a module in progress may be broken; say so and go on
            notes.append(f"{name}: import failed ({type(err).__name__}: {err})")
    return notes


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
