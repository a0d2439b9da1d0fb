r"""Langevin correctors and the predictor–corrector samplers built on them.

A corrector runs MCMC at a fixed time ``t`` whose stationary law is :math:`p_t`; the
predictor–corrector sampler alternates one predictor step with a few corrector steps, and annealed
Langevin dynamics is the corrector alone over a decreasing noise sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._utils import expand_as
from .._validate import check_float, check_int
from ..processes import ReverseProcess
from ..sdes.base import SDE
from .base import FixedStepSolver, StepRun, get_solver, register_solver
from .tables import SchemeRun, work_dtype


class LangevinCorrector:
    r"""Langevin MCMC with its step set by a target signal-to-noise ratio :math:`r`.

    .. math::  \epsilon = 2\alpha_i\Big(\frac{r\,\|z\|}{\|s_\theta(x,t)\|}\Big)^2, \qquad
               x \leftarrow x + \epsilon\,s_\theta(x,t) + \sqrt{2\epsilon}\,z,

    with :math:`\alpha_i` from :meth:`SDE.discrete_alpha` (DDPM's :math:`1-\beta_i` for VP, 1 for VE).

    Parameters
    ----------
    snr : float
        Target ratio :math:`r` of the noise norm to the drift norm (``> 0``; 0.16 for VE on images,
        smaller for VP).
    steps : int
        Langevin steps per time step (``>= 1``).
    norm : {"batch", "sample"}
        ``"batch"`` (default, as in score_sde, where the published ``snr`` values come from) uses the
        norms averaged over the batch, one step size for all samples. ``"sample"`` uses each sample's
        own norms, so a sample's path does not depend on the rest of the batch; it suits
        high-dimensional data, where :math:`\|z\|` and :math:`\|s_\theta\|` concentrate, but in low
        dimensions a sample whose score is near zero takes a huge step.
    """

    NORMS = ("batch", "sample")

    def __init__(self, snr: float = 0.16, steps: int = 1, norm: str = "batch") -> None:
        if not isinstance(norm, str) or norm not in self.NORMS:
            raise ValueError(f"unknown langevin norm {norm!r}; known: {', '.join(self.NORMS)}")
        self.snr = check_float("snr", snr, 0.0, low_open=True)
        self.steps = check_int("corrector_steps", steps)
        self.norm = norm

    def correct(self, process: ReverseProcess, x: Tensor, t: Tensor, alpha: Tensor) -> Tensor:
        """Run :attr:`steps` Langevin steps at time ``t`` (0-d) from ``x`` (not modified), with :math:`\alpha_i` of
        the forward step that ends at ``t + dt`` when the sampler just stepped from ``t + dt`` to ``t``."""
        tb = t.expand(x.shape[0])
        for _ in range(self.steps):
            score = process.score(x, tb)
            z = process.noise(x)
            z_norm, s_norm = z.reshape(len(z), -1).norm(dim=1), score.reshape(len(z), -1).norm(dim=1)
            if self.norm == "batch":
                z_norm, s_norm = z_norm.mean(), s_norm.mean()
            ratio = z_norm / s_norm.clamp_min(torch.finfo(x.dtype).tiny)
            step = expand_as(2 * alpha * (self.snr * ratio) ** 2, x)
            x = torch.addcmul(x, step, score).addcmul_((2 * step).sqrt(), z)
        return x

    def __repr__(self) -> str:
        return f"LangevinCorrector(snr={self.snr}, steps={self.steps}, norm={self.norm!r})"


@register_solver("pc")
class PredictorCorrector(FixedStepSolver):
    """Predictor–corrector sampling: per time step, one predictor step then Langevin corrector steps.

    The predictor moves from ``t`` to ``t_next``; the corrector then runs at ``t_next``, so the
    returned samples are corrected at the final time. Cost per step: the predictor's score
    evaluations plus ``corrector_steps``.

    Parameters
    ----------
    predictor : str
        Name of any registered fixed-step solver (default ``"reverse_diffusion"``), or ``"none"``
        for corrector-only (annealed Langevin) sampling.
    snr : float
        Langevin target signal-to-noise ratio (see :class:`LangevinCorrector`).
    corrector_steps : int
        Langevin steps per time step.
    langevin_norm : {"batch", "sample"}
        How the Langevin step size is set (see :class:`LangevinCorrector`).
    """

    stochastic = True

    def __init__(self, predictor: str = "reverse_diffusion", snr: float = 0.16, corrector_steps: int = 1,
                 langevin_norm: str = "batch") -> None:
        self.predictor = None if predictor == "none" else get_solver(predictor)
        if self.predictor is not None and not isinstance(self.predictor, FixedStepSolver):
            raise ValueError(f"predictor must be a fixed-step solver or 'none', got {predictor!r}")
        self.corrector = LangevinCorrector(snr=snr, steps=corrector_steps, norm=langevin_norm)

    @property
    def noise_scale(self) -> float:  # type: ignore[override]
        """The predictor's reverse process (the corrector only evaluates the score)."""
        return 0.0 if self.predictor is None else self.predictor.noise_scale

    def start(self, sde: SDE, ts: Tensor, x: Tensor) -> PCState:
        t = ts.to(work_dtype(ts.device))
        alpha = sde.discrete_alpha(t[:-1], t[:-1] - t[1:]).to(x)
        predictor = None if self.predictor is None else self.predictor.runner(sde, ts, x, observed=False)
        return PCState(predictor=predictor, alpha=alpha, ts=ts)

    def step(self, process: ReverseProcess, state: PCState, x: Tensor, t: Tensor, t_next: Tensor) -> tuple[Tensor, PCState]:
        if state.predictor is not None:
            x = state.predictor.advance(process, x, state.ts, state.index)
        x = self.corrector.correct(process, x, t_next, state.alpha[state.index])
        state.index += 1
        return x, state


@dataclass
class PCState:
    """The predictor's own run (its state or coefficient table), the corrector's :math:`\alpha_i` per step, the
    grid, and the index of the next step."""

    predictor: StepRun | SchemeRun | None
    alpha: Tensor
    ts: Tensor
    index: int = 0


@register_solver("langevin")
class AnnealedLangevin(PredictorCorrector):
    """Annealed Langevin dynamics: the Langevin corrector alone, run at each time of the grid
    (SMLD / NCSN's sampler when used with :class:`~sdediff.VESDE`)."""

    def __init__(self, snr: float = 0.16, corrector_steps: int = 1, langevin_norm: str = "batch") -> None:
        super().__init__(predictor="none", snr=snr, corrector_steps=corrector_steps, langevin_norm=langevin_norm)
