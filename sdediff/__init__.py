"""sdediff: continuous-time diffusion models in PyTorch.

Forward SDEs (:class:`VPSDE`, :class:`SubVPSDE`, :class:`VESDE`, any :class:`LinearSDE` or custom
:class:`SDE`), reverse-time processes and probability-flow ODEs around any score function,
pluggable solvers behind :func:`sample`, and exact likelihoods through :func:`log_likelihood`.
"""

from . import data, metrics, score, solvers, training
from .likelihood import LikelihoodResult, bits_per_dim, dequantize, log_likelihood
from .processes import ReverseProcess
from .sampling import SampleResult, sample
from .sdes import SDE, VESDE, VPSDE, LinearSDE, SubVPSDE
from .solvers import available_solvers, register_solver
from .training import MLP, TrainConfig, Trainer, UNet, dsm_loss

__version__ = "0.1.0"

__all__ = [
    "SDE", "LinearSDE", "VPSDE", "SubVPSDE", "VESDE", "ReverseProcess", "sample", "SampleResult",
    "log_likelihood", "LikelihoodResult", "bits_per_dim", "dequantize", "available_solvers",
    "register_solver", "Trainer", "TrainConfig", "dsm_loss", "MLP", "UNet", "data", "metrics", "score", "solvers",
    "training", "__version__",
]
