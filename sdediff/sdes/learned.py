r"""A variance-preserving SDE whose noise schedule is learned (variational diffusion models, VDM).

The schedule is the negative log-SNR :math:`\gamma_\eta(t) = \log(s^2/m^2)`, a monotone network with learnable
endpoints, and the kernel is in variance-preserving form

.. math::  m(t)^2 = \operatorname{sigmoid}(-\gamma(t)), \qquad s(t)^2 = \operatorname{sigmoid}(\gamma(t)).

The SDE itself follows from :math:`m' = a m` and :math:`d(s^2)/dt = 2 a s^2 + g^2`:

.. math::  a(t) = -\tfrac12\,\gamma'(t)\,\operatorname{sigmoid}(\gamma(t)), \qquad
           g(t)^2 = \gamma'(t)\,\operatorname{sigmoid}(\gamma(t)),

(VP with :math:`\beta = \gamma'\operatorname{sigmoid}(\gamma)`), and :math:`g^2/s^2 = \gamma'`. Everything is
closed-form and differentiable in the parameters :math:`\eta`, so the bound of :func:`sdediff.elbo` can be
minimised in :math:`\eta` jointly with the score network. The network is

.. math::  \tilde\gamma(u) = w_0 u + \sum_j c_j\,\operatorname{sigmoid}(b_j u + d_j), \quad u = t/T, \qquad
           \gamma(t) = \gamma_{min} + (\gamma_{max} - \gamma_{min})\,\frac{\tilde\gamma(u) - \tilde\gamma(0)}
           {\tilde\gamma(1) - \tilde\gamma(0)},

with :math:`w_0, c_j, b_j > 0` (softplus of free parameters), hence strictly increasing from
:math:`\gamma(0) = \gamma_{min}` to :math:`\gamma(T) = \gamma_{max} > \gamma_{min}`. In VDM's continuous-time
bound the diffusion term :math:`\tfrac12\int\gamma'\,E\|\hat\varepsilon - \varepsilon\|^2 dt` depends on the
schedule only through its endpoints when the network sees the noise level rather than ``t``
(``time_input=sde.noise_level``); the shape between them then only changes the variance of the Monte Carlo
estimate, and VDM trains the shape to minimise that variance (:meth:`shape_parameters`) and the endpoints to
minimise the bound (:meth:`endpoint_parameters`), as :class:`~sdediff.training.Trainer` does with ``loss="elbo"``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import check_float, check_int
from .linear import LinearSDE


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class LearnedScheduleSDE(nn.Module, LinearSDE):
    r"""Variance-preserving SDE with a learned monotone schedule :math:`\gamma_\eta(t) = -\log\mathrm{SNR}(t)`.

    An :class:`nn.Module` (its parameters train with the score network, ``state_dict`` saves them) and a
    :class:`~sdediff.LinearSDE` (every solver, :func:`sdediff.log_likelihood` and :func:`sdediff.elbo` use it
    unchanged). The prior is :math:`N(0, I)`. At ``t = 0`` the kernel already holds a little noise,
    :math:`s(0)^2 = \operatorname{sigmoid}(\gamma_{min})` (VDM's :math:`z_0`). Sample or compute likelihoods
    under ``torch.no_grad()`` or after ``sde.requires_grad_(False)`` so no graph to :math:`\eta` is built.

    Parameters
    ----------
    gamma_min, gamma_max : float
        Initial endpoints :math:`\gamma(0)` and :math:`\gamma(T)` (VDM's -13.3 and 5.0: SNR from
        :math:`e^{13.3}` down to :math:`e^{-5}`).
    num_features : int
        Number ``J`` of sigmoid features of the shape network (initially near zero: the schedule starts
        linear in :math:`\gamma`).
    T : float
        End time.
    """

    def __init__(self, gamma_min: float = -13.3, gamma_max: float = 5.0, num_features: int = 16,
                 T: float = 1.0) -> None:
        nn.Module.__init__(self)
        LinearSDE.__init__(self, T=T, prior_std=1.0)
        gamma_min, gamma_max = check_float("gamma_min", gamma_min), check_float("gamma_max", gamma_max)
        if not gamma_max > gamma_min:
            raise ValueError(f"gamma_max must exceed gamma_min={gamma_min}, got {gamma_max!r}")
        check_int("num_features", num_features)
        self.init_range = (float(gamma_min), float(gamma_max))
        self.config = {"gamma_min": float(gamma_min), "gamma_max": float(gamma_max), "num_features": num_features,
                       "T": float(T)}  # the constructor arguments: rebuilds the module before load_state_dict
        self.gamma_min = nn.Parameter(torch.tensor(float(gamma_min)))
        self.gamma_gap = nn.Parameter(torch.tensor(_inverse_softplus(gamma_max - gamma_min)))  # softplus: the range
        self.w0 = nn.Parameter(torch.tensor(_inverse_softplus(1.0)))
        self.c = nn.Parameter(torch.full((num_features,), -6.0))
        self.b = nn.Parameter(torch.full((num_features,), _inverse_softplus(10.0)))
        self.d = nn.Parameter(-10.0 * torch.linspace(0.0, 1.0, num_features))  # centres spread over [0, 1]

    # --- parameters -----------------------------------------------------------------------------
    def endpoint_parameters(self) -> list[nn.Parameter]:
        r"""The endpoints :math:`\gamma_{min}` and the range :math:`\gamma_{max} - \gamma_{min}`: trained on the bound."""
        return [self.gamma_min, self.gamma_gap]

    def shape_parameters(self) -> list[nn.Parameter]:
        """The shape network between the endpoints: trained on the variance of the bound's estimate (VDM)."""
        return [self.w0, self.c, self.b, self.d]

    # --- the schedule ---------------------------------------------------------------------------
    def gamma_and_derivative(self, t: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`(\gamma(t), \gamma'(t))`, shaped like ``t``, in ``t``'s dtype and device."""
        t = torch.as_tensor(t)
        if not t.is_floating_point():
            t = t.to(torch.get_default_dtype())
        p = {k: v.to(t) for k, v in (("g0", self.gamma_min), ("gap", self.gamma_gap), ("w0", self.w0),
                                     ("c", self.c), ("b", self.b), ("d", self.d))}
        w0, c, b = F.softplus(p["w0"]), F.softplus(p["c"]), F.softplus(p["b"])
        u = (t / self.T).clamp(0.0, 1.0)[..., None]

        def tilde(v: Tensor) -> Tensor:
            return w0 * v[..., 0] + (c * torch.sigmoid(b * v + p["d"])).sum(-1)

        ends = torch.stack([torch.zeros_like(w0), torch.ones_like(w0)])[:, None]
        lo, hi = tilde(ends)
        sig = torch.sigmoid(b * u + p["d"])
        dtilde = w0 + (c * b * sig * (1 - sig)).sum(-1)
        scale = F.softplus(p["gap"]) / (hi - lo)
        return p["g0"] + scale * (tilde(u) - lo), scale * dtilde / self.T

    def gamma(self, t: Tensor) -> Tensor:
        r""":math:`\gamma(t) = \log(s^2/m^2) = -\log\mathrm{SNR}(t)`."""
        return self.gamma_and_derivative(t)[0]

    def noise_level(self, t: Tensor) -> Tensor:
        r"""A network time input from the noise level: :math:`(\gamma(t) - \gamma_0)/(\gamma_1 - \gamma_0)` with the
        *initial* endpoints (``[0, 1]`` at initialisation), for ``Trainer(time_input=sde.noise_level)``."""
        lo, hi = self.init_range
        return (self.gamma(t) - lo) / (hi - lo)

    @property
    def initial_std(self) -> float:
        r""":math:`s(0) = \operatorname{sigmoid}(\gamma_{min})^{1/2}` with the current :math:`\gamma_{min}`."""
        return float(torch.sigmoid(self.gamma_min.detach().double()).sqrt())

    def mean_coeff(self, t: Tensor) -> Tensor:
        r""":math:`m(t) = \operatorname{sigmoid}(-\gamma)^{1/2}`."""
        return torch.exp(0.5 * F.logsigmoid(-self.gamma(t)))

    def marginal_std(self, t: Tensor) -> Tensor:
        r""":math:`s(t) = \operatorname{sigmoid}(\gamma)^{1/2}`."""
        return torch.exp(0.5 * F.logsigmoid(self.gamma(t)))

    def log_snr(self, t: Tensor) -> Tensor:
        r""":math:`\log(m^2/s^2) = -\gamma(t)`."""
        return -self.gamma(t)

    def drift_coef(self, t: Tensor) -> Tensor:
        r""":math:`a(t) = -\tfrac12\gamma'(t)\operatorname{sigmoid}(\gamma(t))`."""
        g, dg = self.gamma_and_derivative(t)
        return -0.5 * dg * torch.sigmoid(g)

    def diffusion(self, t: Tensor) -> Tensor:
        r""":math:`g(t) = (\gamma'(t)\operatorname{sigmoid}(\gamma(t)))^{1/2}`."""
        g, dg = self.gamma_and_derivative(t)
        return torch.sqrt(dg * torch.sigmoid(g))

    def to_config(self) -> dict[str, Any]:
        """``{"class": "LearnedScheduleSDE", "params": self.config}``: the constructor arguments, which rebuild the
        module before ``load_state_dict`` restores the trained schedule (see :meth:`sdediff.SDE.to_config`)."""
        return {"class": type(self).__name__, "params": dict(self.config)}

    def __repr__(self) -> str:
        with torch.no_grad():
            ends = self.gamma(torch.tensor([0.0, self.T])).tolist()
        return f"LearnedScheduleSDE(gamma(0)={ends[0]:.4g}, gamma(T)={ends[1]:.4g}, T={self.T})"
