"""Helpers shared by the benchmark scripts: solver specs (as data), the registry check, NFE counting,
timing, the k-diffusion loader and its denoiser adapter.

Nothing here is part of the ``sdediff`` package; the scripts load this file by path.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import math
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import sdediff
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
KD_PACKAGE = "sdediff_bench_kdiffusion"


@cache
def load_kdiffusion() -> tuple[types.ModuleType | None, str]:
    """``k_diffusion.sampling`` and a note on how it was loaded (``None`` and why, when it cannot be).

    k-diffusion's package ``__init__`` imports its whole training stack (torchvision, clean-fid, kornia,
    scikit-image, wandb, ...), which we do not install (see benchmarks/README.md). Its ``sampling.py``
    needs only torch, scipy, torchdiffeq, torchsde, tqdm and one helper of ``k_diffusion.utils``. When the
    full import fails, we load the installed ``sampling.py`` file itself under a private package name,
    beside a stand-in ``utils`` module holding only the helpers ``sampling.py`` uses, compiled from the
    installed ``utils.py`` source. ``sys.modules['k_diffusion']`` is left untouched.
    """
    try:
        from importlib.metadata import PackageNotFoundError, version
        try:
            ver = version("k-diffusion")
        except PackageNotFoundError:
            return None, "k-diffusion is not installed (pip install --no-deps k-diffusion==0.1.1.post1)"
        try:
            import k_diffusion.sampling as kds  # a full install with all its dependencies
            return kds, f"k-diffusion {ver} (full import)"
        except ImportError as err:
            first_error = f"{type(err).__name__}: {err}"
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None or not spec.submodule_search_locations:
            return None, f"k-diffusion {ver} installed but not importable ({first_error})"
        root = Path(next(iter(spec.submodule_search_locations)))
        sampling_src = (root / "sampling.py").read_text()
        utils_src = (root / "utils.py").read_text()
        wanted = {node.attr for node in ast.walk(ast.parse(sampling_src))
                  if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "utils"}
        defs = [node for node in ast.parse(utils_src).body
                if isinstance(node, ast.FunctionDef) and node.name in wanted]
        if {d.name for d in defs} != wanted:
            return None, f"k-diffusion {ver}: sampling.py needs utils.{sorted(wanted)}, not all found"
        package = types.ModuleType(KD_PACKAGE)
        package.__path__ = []  # a package with no files of its own
        utils = types.ModuleType(f"{KD_PACKAGE}.utils")
        utils.__dict__.update({"torch": torch, "math": math})
        exec(compile(ast.Module(body=defs, type_ignores=[]), str(root / "utils.py"), "exec"), utils.__dict__)
        package.utils = utils
        sys.modules[KD_PACKAGE] = package
        sys.modules[utils.__name__] = utils
        mod_spec = importlib.util.spec_from_file_location(f"{KD_PACKAGE}.sampling", root / "sampling.py")
        kds = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_spec.name] = kds
        mod_spec.loader.exec_module(kds)
        package.sampling = kds
        return kds, (f"k-diffusion {ver}: k_diffusion/sampling.py loaded alone (utils.{', '.join(sorted(wanted))} "
                     f"from its utils.py); the full package import fails here ({first_error})")
    except Exception as err:  # never let a peer's packaging break our benchmark
        return None, f"k-diffusion could not be loaded: {type(err).__name__}: {err}"


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


def sigma_of_time(sde: sdediff.LinearSDE, t: Tensor) -> Tensor:
    r""":math:`\sigma(t) = s(t)/m(t) = e^{-\lambda(t)/2}`, in float64."""
    return (-0.5 * sde.log_snr(t.to(torch.float64))).exp()


class KDenoiser:
    r"""A score function seen through k-diffusion's convention.

    A linear SDE has :math:`x_t = m(t)(x_0 + \sigma\varepsilon)` with :math:`\sigma = s/m`, so k-diffusion
    runs on the scaled state :math:`y = x/m` and calls :math:`D(y, \sigma) = \hat x_0 = (x + s^2\nabla\log
    p_t(x))/m` at :math:`x = m\,y` and the time :math:`t(\sigma)` where :math:`\lambda(t) = -2\log\sigma`
    (:meth:`LinearSDE.time_of_log_snr`, vectorised bisection on ``[t_lo, T]``; Tweedie's formula is
    :meth:`LinearSDE.denoise`).
    """

    def __init__(self, sde: sdediff.LinearSDE, score_fn: Callable[[Tensor, Tensor], Tensor], t_lo: float) -> None:
        self.sde, self.score_fn, self.t_lo = sde, score_fn, float(t_lo)

    def time_of(self, sigma: Tensor) -> Tensor:
        return self.sde.time_of_log_snr(-2 * sigma.to(torch.float64).log(), self.t_lo)

    def __call__(self, y: Tensor, sigma: Tensor) -> Tensor:
        t = self.time_of(sigma).to(y.dtype)
        x = self.sde.mean_coeff(t).reshape(-1, *([1] * (y.dim() - 1))) * y
        return self.sde.denoise(x, t, self.score_fn(x, t))


def kd_sigmas(kds: types.ModuleType, sde: sdediff.LinearSDE, steps: int, eps: float, schedule: str,
              device: torch.device) -> Tensor:
    """``steps + 1`` decreasing noise levels from :math:`\\sigma(T)` to :math:`\\sigma(eps)` (no appended zero).

    ``"time"``: the levels of sdediff's uniform time grid; ``"karras"``: k-diffusion's own
    ``get_sigmas_karras`` (rho = 7) between the same end levels, computed in float64.
    """
    sig_max, sig_min = (float(v) for v in sigma_of_time(sde, torch.tensor([sde.T, eps], dtype=torch.float64)))
    if schedule == "time":
        sigmas = sigma_of_time(sde, torch.linspace(sde.T, eps, steps + 1, dtype=torch.float64))
    elif schedule == "karras":
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            sigmas = kds.get_sigmas_karras(steps + 1, sig_min, sig_max)[:-1].to(torch.float64)
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
