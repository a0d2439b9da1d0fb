"""Forward SDEs: the abstract :class:`SDE`, :class:`LinearSDE`, the built-in VP, sub-VP and VE, rebuilding an SDE
from its configuration (:func:`sde_from_config`), and :func:`check_sde`."""

from .base import SDE, gaussian_log_prob, gaussian_sample
from .check import CheckFailure, SDECheck, check_sde
from .learned import LearnedScheduleSDE
from .linear import LinearSDE, require_linear
from .registry import register_sde, registered_sdes, sde_from_config
from .ve import VESDE
from .vp import VPSDE, SubVPSDE

__all__ = ["SDE", "LinearSDE", "VPSDE", "SubVPSDE", "VESDE", "gaussian_log_prob", "gaussian_sample", "require_linear",
           "LearnedScheduleSDE", "sde_from_config", "register_sde", "registered_sdes", "check_sde", "SDECheck",
           "CheckFailure"]
