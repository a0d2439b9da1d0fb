r"""Langevin correctors and the predictor–corrector samplers built on them.

A corrector runs MCMC at a fixed time ``t`` whose stationary law is :math:`p_t`; the
predictor–corrector sampler alternates one predictor step with a few corrector steps, and annealed
Langevin dynamics is the corrector alone over a decreasing noise sequence.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._utils import expand_as
from .base import Context, FixedStepSolver, get_solver, register_solver
from .exponential import _work_dtype


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
        if norm not in self.NORMS:
            raise ValueError(f"unknown langevin norm {norm!r}; known: {', '.join(self.NORMS)}")
        if isinstance(snr, bool) or not isinstance(snr, (int, float)) or not math.isfinite(snr) or snr <= 0:
            raise ValueError(f"snr must be a positive float, got {snr!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"corrector_steps must be a positive integer, got {steps!r}")
        self.snr, self.steps, self.norm = float(snr), steps, norm

    def correct(self, ctx: Context, x: Tensor, t: Tensor, dt: Tensor, alpha: Tensor | None = None,
                out: Tensor | None = None) -> Tensor:
        """Run :attr:`steps` Langevin steps at time ``t`` (0-d), reached by a step of length ``dt`` from ``t + dt``.

        :math:`\alpha_i` is that of the step just taken, the forward step from ``t`` to ``t + dt``; pass it
        as ``alpha`` when it is precomputed. The result is written into ``out`` when given (which may be
        ``x`` itself: the update is elementwise), else into a new tensor.
        """
        tb = t.expand(x.shape[0])
        if alpha is None:
            alpha = ctx.sde.discrete_alpha((t + dt).expand(x.shape[0]), dt.expand(x.shape[0]))
        for _ in range(self.steps):
            score = ctx.score(x, tb)
            z = ctx.noise(x)
            z_norm, s_norm = z.reshape(len(z), -1).norm(dim=1), score.reshape(len(z), -1).norm(dim=1)
            if self.norm == "batch":
                z_norm, s_norm = z_norm.mean(), s_norm.mean()
            ratio = z_norm / s_norm.clamp_min(torch.finfo(x.dtype).tiny)
            step = expand_as(2 * alpha * (self.snr * ratio) ** 2, x)
            x = torch.addcmul(x, step, score, out=torch.empty_like(x) if out is None else out)
            x.addcmul_((2 * step).sqrt(), z)
            out = x  # the later steps update it in place
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

    def start(self, ctx: Context, x: Tensor, ts: Tensor) -> None:
        if self.predictor is not None:
            self.predictor.start(ctx, x, ts)
        t = ts.to(_work_dtype(ts.device))
        ctx.state["langevin_alpha"] = ctx.sde.discrete_alpha(t[:-1], t[:-1] - t[1:]).to(x)

    def step(self, ctx: Context, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        if self.predictor is not None:
            x = self.predictor.step(ctx, x, t, t_next)
        # the predictor's output may be updated in place only when no one else holds it: the loop's buffer, or the
        # step's input state that the loop owns (where the predictor updated it in place, or there is none)
        out = x if (ctx.out is not None and x is ctx.out) or x is ctx.owned else ctx.buffer(x)
        return self.corrector.correct(ctx, x, t_next, t - t_next, ctx.state["langevin_alpha"][ctx.index], out)


@register_solver("langevin")
class AnnealedLangevin(PredictorCorrector):
    """Annealed Langevin dynamics: the Langevin corrector alone, run at each time of the grid
    (SMLD / NCSN's sampler when used with :class:`~sdediff.VESDE`)."""

    def __init__(self, snr: float = 0.16, corrector_steps: int = 1, langevin_norm: str = "batch") -> None:
        super().__init__(predictor="none", snr=snr, corrector_steps=corrector_steps, langevin_norm=langevin_norm)
