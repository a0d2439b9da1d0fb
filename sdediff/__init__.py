"""sdediff: continuous-time diffusion models in PyTorch.

Forward SDEs (:class:`VPSDE`, :class:`SubVPSDE`, :class:`VESDE`, any :class:`LinearSDE` or custom
:class:`SDE`), reverse-time processes and probability-flow ODEs around any score function,
pluggable solvers behind :func:`sample`, and exact likelihoods through :func:`log_likelihood`.
"""

from . import data, guidance, metrics, score, solvers, training
from .calibrate import CalibratedGrid, calibrate_grid
from .compare import ComparisonResult, compare_solvers
from .compare_model import ModelComparison, compare_on_model
from .elbo import ELBOResult, elbo
from .likelihood import LikelihoodResult, bits_per_dim, dequantize, log_likelihood
from .processes import ReverseProcess
from .runs import Run, load_run
from .sampling import SampleResult, sample
from .sdes import SDE, VESDE, VPSDE, LearnedScheduleSDE, LinearSDE, SDECheck, SubVPSDE, check_sde
from .simulate import simulate
from .solvers import available_solvers, register_solver
from .training import MLP, TrainConfig, Trainer, UNet, dsm_loss

__version__ = "0.1.0"

__all__ = [
    "SDE", "LinearSDE", "VPSDE", "SubVPSDE", "VESDE", "LearnedScheduleSDE", "check_sde", "SDECheck",
    "ReverseProcess", "sample", "SampleResult", "available_solvers", "register_solver",
    "log_likelihood", "LikelihoodResult", "bits_per_dim", "dequantize", "elbo", "ELBOResult", "simulate",
    "calibrate_grid", "CalibratedGrid", "compare_solvers", "ComparisonResult", "compare_on_model", "ModelComparison",
    "load_run", "Run",
    "Trainer", "TrainConfig", "dsm_loss", "MLP", "UNet",
    "data", "guidance", "metrics", "score", "solvers", "training", "__version__",
]


def __getattr__(name: str):
    """Load ``sdediff.interop`` (diffusers / k-diffusion interop) on first use; it imports neither library."""
    if name == "interop":
        import importlib

        return importlib.import_module(".interop", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
