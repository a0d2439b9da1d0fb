"""Solvers of the reverse-time processes, registered by name for :func:`sdediff.sample`.

Importing this package registers the built-in solvers (one module per family).
"""

from . import (
    adaptive_ode,
    adaptive_sde,
    correctors,
    exponential,
    grids,
    multistep,
    ode,
    per_sample,
    sde,
    stochastic,
    tables,
    unipc,
)
from .adaptive_ode import AdaptiveRungeKutta
from .adaptive_sde import AdaptiveReverseSDE
from .base import FixedStepSolver, Solution, Solver, StepRun, available_solvers, get_solver, integrate, register_solver
from .correctors import AnnealedLangevin, LangevinCorrector, PredictorCorrector
from .exponential import DDIM, LMS, DPMSolver, EDMHeun
from .multistep import DEIS, IPNDM
from .ode import AdaptiveODE, Euler, Heun
from .sde import Ancestral, EulerMaruyama, ReverseDiffusion
from .stochastic import DDPM, SDEDPMSolver, TorchSDE
from .tables import LinearScheme, SchemeRun
from .unipc import UniPC

__all__ = [
    "Solver", "FixedStepSolver", "Solution", "StepRun", "integrate", "register_solver", "get_solver",
    "available_solvers", "LinearScheme", "SchemeRun",
    "EulerMaruyama", "ReverseDiffusion", "Ancestral", "LangevinCorrector", "PredictorCorrector",
    "AnnealedLangevin", "Euler", "Heun", "AdaptiveODE", "DPMSolver", "DDIM", "LMS", "EDMHeun",
    "AdaptiveRungeKutta", "AdaptiveReverseSDE", "DDPM", "SDEDPMSolver", "TorchSDE", "UniPC", "IPNDM", "DEIS",
    "grids", "adaptive_ode", "adaptive_sde", "per_sample", "correctors", "exponential", "multistep", "ode", "sde",
    "stochastic", "tables", "unipc",
]
