r"""Reverse-time processes built from a forward SDE and a score function.

For a forward SDE :math:`dx = f(x,t)\,dt + g(t)\,dw`, the family

.. math::  dx = \big[f(x,t) - \tfrac12(1+\lambda^2)\,g(t)^2\,\nabla\log p_t(x)\big]\,dt + \lambda\,g(t)\,d\bar w,
           \qquad \lambda \ge 0,

run from ``t = T`` down to ``0`` has the same marginals :math:`p_t` for every :math:`\lambda`
(all satisfy the forward Fokker–Planck equation). :math:`\lambda = 1` is Anderson's reverse SDE,
:math:`\lambda = 0` the deterministic probability-flow ODE.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ._utils import batch_time, expand_as, randn_like
from ._validate import check_float

if TYPE_CHECKING:
    from .sdes.base import SDE

ScoreFn = Callable[[Tensor, Tensor], Tensor]


def score_weight(sde: SDE, t: Tensor, noise_scale: float) -> Tensor:
    r"""The weight :math:`b(t) = -\tfrac12(1+\lambda^2)\,g(t)^2` of the score in the reverse-time drift
    :math:`f(x,t) + b(t)\,\nabla\log p_t(x)` of noise scale :math:`\lambda`, shape like ``t``."""
    return -0.5 * (1 + noise_scale**2) * sde.diffusion(t) ** 2


def linear_drift_coef(sde: SDE, t: Tensor) -> Tensor:
    r""":math:`a(t)` of a linear SDE's drift :math:`f(x, t) = a(t)\,x`, read off the drift itself as :math:`f(1, t)`
    (so an SDE that overrides ``drift`` is read correctly), shape like the 1-d ``t``."""
    return sde.drift(torch.ones_like(t)[:, None], t)[:, 0]


class CountedScore:
    """A score function wrapper that counts evaluations and checks what the function returns.

    Wrapping a :class:`CountedScore` again counts at both levels: every call through the outer counter
    is also a call of the inner one, so the number of evaluations is right however the score is wrapped.

    Parameters
    ----------
    score_fn : callable
        ``score_fn(x, t) -> tensor like x`` with ``t`` a ``(batch,)`` tensor (any ``nn.Module`` works).

    Attributes
    ----------
    nfe : int
        Number of calls so far (each call on a batch counts once).
    """

    def __init__(self, score_fn: ScoreFn) -> None:
        if not callable(score_fn):
            raise TypeError(f"score_fn must be callable as score_fn(x, t), got {type(score_fn).__name__}")
        self.score_fn = score_fn
        self.nfe = 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        out = self.score_fn(x, batch_time(t, x))
        self.nfe += 1
        if not isinstance(out, Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"score_fn must return a tensor shaped like x {tuple(x.shape)}, got {got}")
        if out.dtype != x.dtype:
            raise TypeError(f"score_fn must return a tensor of the state's dtype {x.dtype}, got {out.dtype}; "
                            "cast the network's output (or sample in the network's dtype with dtype=)")
        return out


class ReverseProcess:
    r"""The reverse-time process with noise scale :math:`\lambda` for ``(sde, score_fn)``.

    Drift and diffusion are written for time running *backwards*: a step from ``t`` to
    ``t + h`` with ``h < 0`` is :math:`x + \mathrm{drift}(x,t)\,h + \mathrm{diffusion}(t)\sqrt{|h|}\,z`.

    Parameters
    ----------
    sde : SDE
        The forward SDE.
    score_fn : callable
        ``score_fn(x, t)``, an approximation of :math:`\nabla_x\log p_t(x)`.
    noise_scale : float
        :math:`\lambda \ge 0`; ``1`` is the reverse SDE, ``0`` the probability-flow ODE.

    Notes
    -----
    A :class:`ReverseProcess` is a torchdiffeq-compatible vector field: ``process(t, x)`` returns the
    drift for a scalar ``t``, so ``torchdiffeq.odeint(sde.probability_flow(score_fn), x_T,
    torch.tensor([T, eps]))`` integrates the probability flow. :meth:`as_torchsde` gives a
    torchsde-compatible object for the stochastic members.
    """

    def __init__(self, sde: SDE, score_fn: ScoreFn, noise_scale: float = 1.0,
                 generator: torch.Generator | None = None) -> None:
        if not all(callable(getattr(sde, name, None)) for name in ("drift", "diffusion", "prior_sample")):
            raise TypeError(f"sde must be an sdediff.SDE, got {type(sde).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.sde = sde
        self.score = CountedScore(score_fn)
        self.noise_scale = check_float("noise_scale", noise_scale, 0.0)
        self.generator = generator

    @property
    def nfe(self) -> int:
        """Score evaluations made through this process."""
        return self.score.nfe

    def score_weight(self, t: Tensor) -> Tensor:
        r""":math:`b(t) = -\tfrac12(1+\lambda^2)\,g(t)^2`, the weight of the score in the drift (:func:`score_weight`)."""
        return score_weight(self.sde, t, self.noise_scale)

    def drift(self, x: Tensor, t: Tensor, score: Tensor | None = None) -> Tensor:
        r""":math:`f(x,t) + b(t)\,s_\theta(x,t)` with :math:`b = -\tfrac12(1+\lambda^2)g(t)^2`; pass ``score`` to
        reuse an evaluation. The one formula of the reverse-time drift: every solver that evaluates the drift
        calls this, and the coefficient tables of linear SDEs use :meth:`score_weight`."""
        t = batch_time(t, x)
        if score is None:
            score = self.score(x, t)
        return self.sde.drift(x, t) + expand_as(self.score_weight(t), x) * score

    def noise(self, like: Tensor) -> Tensor:
        """Standard normal draws shaped like ``like``, from :attr:`generator` (the Brownian increments are
        ``diffusion(t) * sqrt(|h|) * noise(x)``)."""
        return randn_like(like, self.generator)

    def diffusion(self, t: Tensor) -> Tensor:
        r""":math:`\lambda\,g(t)`, shape ``(batch,)``."""
        return self.noise_scale * self.sde.diffusion(t)

    def __call__(self, t: Tensor, x: Tensor) -> Tensor:
        """torchdiffeq convention ``f(t, x)``: the drift at a scalar time ``t``.

        ``t`` is clamped to ``[0, T]``: torchdiffeq's adaptive methods step past the last output time
        and interpolate back (and may try a huge first step), and outside ``[0, T]`` a schedule can be
        undefined (VP's :math:`1 - m(t)^2 < 0` for ``t < 0``), which would poison the step-size control
        with NaNs. Inside ``[0, T]`` the field is unchanged.
        """
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).clamp(0.0, self.sde.T)
        return self.drift(x, batch_time(t, x))

    def as_torchsde(self, shape: tuple[int, ...] | torch.Size, sde_type: str = "ito") -> TorchSDEAdapter:
        """A torchsde-compatible SDE for states of ``shape`` in reversed time ``u = T - t`` (see
        :class:`TorchSDEAdapter`)."""
        return TorchSDEAdapter(self, shape, sde_type=sde_type)

    def __repr__(self) -> str:
        return f"ReverseProcess({self.sde!r}, noise_scale={self.noise_scale})"


class TorchSDEAdapter(torch.nn.Module):
    r"""The reverse process as a torchsde SDE, in forward time :math:`u = T - t`.

    torchsde integrates forward in time on flat ``(batch, d)`` states, so with :math:`t = T - u`:

    .. math::  dy = -\mathrm{drift}(y, T - u)\,du + \lambda g(T - u)\,dW_u.

    The noise is additive (it does not depend on ``y``), so the Itô and Stratonovich readings agree
    and either ``sde_type`` is exact; ``noise_type`` is ``"diagonal"``. Solve from ``u = 0``
    (``t = T``) to ``u = T - eps``, then reshape with :meth:`unflatten`.
    """

    noise_type = "diagonal"

    def __init__(self, process: ReverseProcess, shape: tuple[int, ...] | torch.Size,
                 sde_type: str = "ito") -> None:
        super().__init__()
        if sde_type not in ("ito", "stratonovich"):
            raise ValueError(f"sde_type must be 'ito' or 'stratonovich', got {sde_type!r}")
        self.process = process
        self.sde_type = sde_type
        self.shape = tuple(shape)

    def unflatten(self, y: Tensor) -> Tensor:
        """Reshape a flat ``(batch, d)`` state back to ``shape``."""
        return y.reshape(self.shape)

    def f(self, u: Tensor, y: Tensor) -> Tensor:
        """Drift in forward time ``u``."""
        x = self.unflatten(y)
        t = batch_time(self.process.sde.T - u, x)
        return -self.process.drift(x, t).reshape(y.shape)

    def g(self, u: Tensor, y: Tensor) -> Tensor:
        """Diagonal diffusion in forward time ``u``."""
        t = batch_time(self.process.sde.T - u, y)
        return self.process.diffusion(t)[:, None].expand_as(y)
