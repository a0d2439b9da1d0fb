"""Forward SDEs: the abstract :class:`SDE`, :class:`LinearSDE`, the built-in VP, sub-VP and VE, and :func:`check_sde`."""

from .base import SDE, gaussian_log_prob, gaussian_sample
from .check import CheckFailure, SDECheck, check_sde
from .learned import LearnedScheduleSDE
from .linear import LinearSDE, require_linear
from .ve import VESDE
from .vp import VPSDE, SubVPSDE

__all__ = ["SDE", "LinearSDE", "VPSDE", "SubVPSDE", "VESDE", "gaussian_log_prob", "gaussian_sample", "require_linear",
           "LearnedScheduleSDE", "check_sde", "SDECheck", "CheckFailure"]
