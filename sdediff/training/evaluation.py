r"""The trainer's periodic evaluation: samples from the model, the exact NLL of held-out points and its bound.

At an evaluation the score model (the EMA weights with their schedule) is measured on

* ``eval_samples`` samples drawn with ``eval_solver`` in ``eval_sample_steps`` steps (denoised at the end): their
  mean, standard deviation and whether all are finite (the samples are saved when a path is given);
* the first ``eval_nll_points`` held-out points :math:`x` (after the data ``transform``): the exact
  :math:`-\log p(x)` from the probability-flow ODE (:func:`sdediff.log_likelihood`, ``trace="auto"``: exact for
  :math:`D \le 16` dimensions, Hutchinson's estimate above; the engine's default tolerance) and the bound
  :func:`~sdediff.training.nll_bound`, both in nats and per dimension (divided by :math:`D`).

Every random draw comes from one generator, in that order: the transform, the samples, the NLL, the bound.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._io import save_safetensors
from .._utils import flat_dim
from ..elbo import nll_bound
from ..likelihood import log_likelihood
from ..sampling import sample
from ..score import ScoreModel
from .config import TrainConfig

__all__ = ["evaluate_model", "requires_grad_off"]


@contextlib.contextmanager
def requires_grad_off(params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Turn ``requires_grad`` off for those of ``params`` that have it while the block runs (e.g. a learned
    schedule during evaluation, so no graph to it is built), and back on afterwards."""
    frozen = [p for p in params if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def evaluate_model(score: ScoreModel, reference: Tensor, config: TrainConfig, generator: torch.Generator, *,
                   device: torch.device, dtype: torch.dtype,
                   transform: Callable[[Tensor, torch.Generator], Tensor] | None = None,
                   samples_path: Path | None = None) -> tuple[dict[str, Any], Tensor | None]:
    """Sample statistics, exact NLL and NLL bound of ``score`` (module notes).

    Parameters
    ----------
    score : ScoreModel
        The model; its ``sde`` is the schedule sampled from and scored under.
    reference : Tensor
        Held-out data ``(N, ...)``; its first ``max(config.eval_nll_points, 1)`` points are used.
    config : TrainConfig
        Gives ``eval_samples``, ``eval_solver``, ``eval_sample_steps``, ``eval_nll_points`` and ``t_eps``.
    generator : torch.Generator
        Source of every random draw.
    device, dtype
        Of the samples and of the points.
    transform : callable, optional
        ``transform(points, generator)`` applied to the held-out points first (e.g. dequantisation).
    samples_path : Path, optional
        Where the samples are written (safetensors, key ``"samples"``, atomically).

    Returns
    -------
    (metrics, samples) : dict, Tensor or None
        ``sample_mean``, ``sample_std``, ``samples_finite`` (with ``eval_samples``) and ``nll``, ``nll_per_dim``,
        ``nll_nfe``, ``nll_bound``, ``nll_bound_per_dim`` (with ``eval_nll_points``); the samples, if drawn.
    """
    sde = score.sde
    metrics: dict[str, Any] = {}
    samples = None
    points = reference[: max(config.eval_nll_points, 1)]
    if transform is not None:
        points = transform(points, generator)
    points = points.to(dtype)
    if config.eval_samples:
        with torch.no_grad():
            samples = sample(sde, score, (config.eval_samples, *points.shape[1:]), solver=config.eval_solver,
                             steps=config.eval_sample_steps, generator=generator, device=device, dtype=dtype,
                             denoise=True)
        metrics["sample_mean"] = float(samples.mean())
        metrics["sample_std"] = float(samples.std())
        metrics["samples_finite"] = bool(torch.isfinite(samples).all())
        if samples_path is not None:
            save_safetensors(samples_path, {"samples": samples.detach().cpu().contiguous()})
    if config.eval_nll_points:
        d = flat_dim(points)
        res = log_likelihood(sde, score, points, eps=config.t_eps, trace="auto", generator=generator)
        nll = float(-res.log_prob.mean())
        with torch.no_grad():
            bound = float(nll_bound(sde, score, points, t_eps=config.t_eps, generator=generator).mean())
        metrics.update({"nll": nll, "nll_per_dim": nll / d, "nll_nfe": res.nfe, "nll_bound": bound,
                        "nll_bound_per_dim": bound / d})
    return metrics, samples
