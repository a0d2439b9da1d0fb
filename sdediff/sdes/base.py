"""The forward-SDE base class.

A forward SDE on ``[0, T]`` is

    dx = f(x, t) dt + g(t) dw,

and a user-defined one needs only :meth:`SDE.drift`, :meth:`SDE.diffusion` and a prior
(:meth:`SDE.prior_sample`, :meth:`SDE.prior_log_prob`) to be sampled in reverse time and to give
likelihoods through its probability-flow ODE. SDEs with a linear drift and a Gaussian kernel
derive from :class:`sdediff.sdes.LinearSDE` instead and gain closed-form marginals.
"""

from __future__ import annotations

import abc
import math
from typing import Any

import torch
from torch import Tensor

from .._utils import batch_time, expand_as, flat_dim, randn, sum_except_batch
from .._validate import check_float
from ..processes import ReverseProcess, ScoreFn


class SDE(abc.ABC):
    r"""Abstract forward SDE :math:`dx = f(x, t)\,dt + g(t)\,dw` on ``[0, T]``.

    Subclasses implement :meth:`drift`, :meth:`diffusion`, :meth:`prior_sample` and
    :meth:`prior_log_prob`. Times are ``(batch,)`` tensors (a float or 0-d tensor is broadcast);
    states are tensors of any shape ``(batch, ...)``.

    Parameters
    ----------
    T : float
        End time of the forward process (``> 0``).

    Examples
    --------
    An Ornstein–Uhlenbeck process written in a few lines::

        class OU(sdediff.SDE):
            def __init__(self, theta=1.0, sigma=1.0):
                super().__init__(T=3.0)
                self.theta, self.sigma = theta, sigma
            def drift(self, x, t):
                return -self.theta * x
            def diffusion(self, t):
                return torch.full_like(t, self.sigma)
            def prior_sample(self, shape, generator=None, device=None, dtype=None):
                std = self.sigma / (2 * self.theta) ** 0.5
                return std * torch.randn(shape, generator=generator, device=device, dtype=dtype)
            def prior_log_prob(self, z):
                return sdediff.sdes.gaussian_log_prob(z, self.sigma / (2 * self.theta) ** 0.5)
    """

    def __init__(self, T: float = 1.0) -> None:
        self.T = check_float("T", T, 0, low_open=True)

    # --- what a subclass provides -------------------------------------------------------------
    @abc.abstractmethod
    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        """Drift ``f(x, t)``, a tensor like ``x``; ``t`` has shape ``(batch,)``."""

    @abc.abstractmethod
    def diffusion(self, t: Tensor) -> Tensor:
        """Diffusion coefficient ``g(t)``, shape ``(batch,)`` like ``t``."""

    @abc.abstractmethod
    def prior_sample(self, shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """Draw ``x_T`` from the prior ``p_T`` (the distribution the reverse process starts from)."""

    @abc.abstractmethod
    def prior_log_prob(self, z: Tensor) -> Tensor:
        """Log-density of the prior at ``z``, shape ``(batch,)``, in nats."""

    # --- derived ------------------------------------------------------------------------------
    def marginal(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation of ``x_t | x_0``; only linear SDEs have it in closed form."""
        raise NotImplementedError(
            f"{type(self).__name__} has no closed-form marginal; derive from sdediff.LinearSDE for a "
            "linear drift, where the Gaussian kernel is computed for you")

    def discretize(self, x: Tensor, t: Tensor, dt: Tensor) -> tuple[Tensor, Tensor]:
        r"""Discrete forward step of length ``dt`` ending at ``t``: :math:`x_t \approx x + f_i + G_i z`.

        The Euler–Maruyama discretisation :math:`f_i = f(x, t)\,\Delta t`,
        :math:`G_i = g(t)\sqrt{\Delta t}`. Linear SDEs override it with their exact Gaussian transition.

        Returns
        -------
        (f_i, G_i) : tensor like ``x`` and ``(batch,)`` tensor.
        """
        t, dt = batch_time(t, x), batch_time(dt, x)
        return self.drift(x, t) * expand_as(dt, x), self.diffusion(t) * dt.sqrt()

    def discrete_alpha(self, t: Tensor, dt: Tensor) -> Tensor:
        r"""Fraction :math:`\alpha_i` of signal variance kept over a forward step of length ``dt`` ending at ``t``.

        It scales the Langevin corrector's step (``1`` for SDEs without a known kernel; for VP it is
        DDPM's :math:`1 - \beta_i`).
        """
        return torch.ones_like(t)

    def denoise(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        r"""Estimate of ``x_0`` from ``x_t`` and the score at ``t``.

        Without a known kernel this is one noise-free Euler step of the reverse SDE from ``t`` to 0,
        :math:`x - [f(x, t) - g(t)^2 s]\,t`; linear SDEs use Tweedie's formula instead.
        """
        t = batch_time(t, x)
        drift = self.reverse(lambda y, s: score, noise_scale=1.0).drift(x, t, score=score)
        return x - drift * expand_as(t, x)

    def reverse(self, score_fn: ScoreFn, noise_scale: float = 1.0,
                generator: torch.Generator | None = None) -> ReverseProcess:
        r"""The reverse-time process with noise scale :math:`\lambda`.

        :math:`dx = [f(x,t) - \tfrac12(1+\lambda^2) g(t)^2 \nabla\log p_t(x)]\,dt + \lambda g(t)\,d\bar w`;
        ``noise_scale=1`` is Anderson's reverse SDE, ``0`` the probability-flow ODE. All members share
        the marginals ``p_t`` of the forward SDE. ``generator`` is the source of the process's noise draws.
        """
        return ReverseProcess(self, score_fn, noise_scale=noise_scale, generator=generator)

    def probability_flow(self, score_fn: ScoreFn, generator: torch.Generator | None = None) -> ReverseProcess:
        r"""The probability-flow ODE :math:`dx/dt = f(x,t) - \tfrac12 g(t)^2 \nabla\log p_t(x)`."""
        return self.reverse(score_fn, noise_scale=0.0, generator=generator)

    # --- serialisation ------------------------------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        """The SDE's class name and constructor arguments, ``{"class": name, "params": {argument: value}}``.

        Plain JSON values only, so the result can go into a checkpoint or a ``run.json``;
        :func:`sdediff.sdes.sde_from_config` rebuilds the SDE from it (``type(sde)(**params)``, the class found
        among the registered ones). The built-in SDEs implement it; a custom SDE that should be saved and rebuilt
        overrides it and registers its class with :func:`sdediff.sdes.register_sde`. Learned parameters (an
        ``nn.Module`` SDE's ``state_dict``) are not part of the configuration.

        Raises
        ------
        NotImplementedError
            Here, in the base class: the SDE does not say how to rebuild itself.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not define to_config(); to save it and rebuild it, override to_config() to "
            f"return {{'class': {type(self).__name__!r}, 'params': {{constructor arguments}}}} and register the class "
            "with sdediff.sdes.register_sde")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(T={self.T})"


def gaussian_log_prob(z: Tensor, std: float | Tensor) -> Tensor:
    r"""Log-density of :math:`N(0, \sigma^2 I)` at ``z``, summed over all but the batch dimension.

    :math:`\log p(z) = -\frac{\|z\|^2}{2\sigma^2} - \frac{D}{2}\log(2\pi\sigma^2)`, with ``D`` the
    number of elements of one sample.
    """
    std = torch.as_tensor(std, dtype=z.dtype, device=z.device)
    d = flat_dim(z)
    return -0.5 * sum_except_batch(z**2) / std**2 - 0.5 * d * torch.log(2 * math.pi * std**2)


def gaussian_sample(shape: tuple[int, ...] | torch.Size, std: float, generator: torch.Generator | None,
                    device: torch.device | str | None, dtype: torch.dtype | None) -> Tensor:
    r"""Draw from :math:`N(0, \sigma^2 I)` with the given generator, on ``device`` in ``dtype``."""
    return std * randn(tuple(shape), generator=generator, device=device, dtype=dtype)
