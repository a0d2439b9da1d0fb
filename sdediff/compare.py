r"""Comparing solvers on one model: the same prior draws through every solver, scored against the law they aim at.

:func:`compare_solvers` starts every candidate from the same draws :math:`x_T \sim p_T` and reports, per candidate,
the score evaluations per sample (NFE), the wall time and, where the target law is known,

- the sliced 2-Wasserstein distance :math:`SW_2` (:func:`sdediff.metrics.sliced_wasserstein`) between the samples
  and as many reference samples, next to its *noise floor*: the same distance between two independent reference
  sets of that size (:func:`sdediff.metrics.noise_floor`), below which the test cannot tell a solver from exact
  sampling;
- with an exact Gaussian mixture (``truth``), the mean log-density gap
  :math:`\frac1n\sum_i\log p_\epsilon(x_i) - E_{p_\epsilon}[\log p_\epsilon]` (positive: samples too close to the
  modes; negative: too spread out) with its standard error, and the largest error in the share of samples per
  mixture component (each sample assigned to its most probable component).

:func:`compare_likelihood` checks :func:`sdediff.log_likelihood` against the exact log-density of such a mixture;
:func:`distance_to_reference` and :func:`nearest_class_accuracy` score one set of samples. ``sdediff bench`` runs
these on an analytic mixture; docs/compare_solvers.md shows a comparison written by hand.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._validate import check_int
from .data.mixture import GaussianMixture
from .likelihood import log_likelihood
from .metrics import noise_floor, sliced_wasserstein
from .sampling import SampleResult, sample
from .sdes import SDE
from .sdes.base import ScoreFn

__all__ = ["Candidate", "DEFAULT_SOLVERS", "ComparisonRow", "ComparisonResult", "compare_solvers", "LikelihoodComparison",
           "compare_likelihood", "distance_to_reference", "nearest_class_accuracy", "mean_nfe", "markdown_table"]

#: ``sampler(k, generator) -> Tensor`` of ``k`` samples of the law the solvers aim at
Sampler = Callable[[int, torch.Generator], Tensor]


@dataclass(frozen=True)
class Candidate:
    """One solver configuration of a comparison.

    Attributes
    ----------
    solver : str
        A registered solver name (:func:`sdediff.available_solvers`).
    steps : int or None
        Time steps; ``None`` for a solver that chooses its own steps (``"ode"``, ``"adaptive_ode"``).
    options : dict
        Solver options (e.g. ``{"snr": 0.16}`` for ``"pc"``, ``{"rtol": 1e-5}`` for ``"ode"``).
    time_grid : str
        The time grid of a fixed-step solver (see :func:`sdediff.sample`).
    label : str, optional
        The row's name (default: the solver's).
    """

    solver: str
    steps: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    time_grid: str = "uniform"
    label: str | None = None

    @property
    def name(self) -> str:
        """The label, else the solver name."""
        return self.label or self.solver


#: the candidates of ``sdediff bench``: a reverse SDE, predictor-corrector, fixed-step and adaptive ODE
DEFAULT_SOLVERS: tuple[Candidate, ...] = (
    Candidate("euler_maruyama", 500),
    Candidate("pc", 500, {"snr": 0.16}),
    Candidate("heun", 50),
    Candidate("ode", None, {"rtol": 1e-5, "atol": 1e-5}),
)


@dataclass
class ComparisonRow:
    """The figures of one candidate (distances and gaps are ``None`` where the target law is not given).

    Attributes
    ----------
    label, solver, steps, options, time_grid
        The :class:`Candidate`.
    nfe : float
        Score evaluations per sample (the mean over samples for solvers with per-sample adaptive steps).
    seconds : float
        Wall time of the sampling call.
    finite : bool
        Whether every sample is finite.
    sliced_w2 : float or None
        :math:`SW_2` to the reference samples, the mean over the splits (``inf`` for non-finite samples).
    sliced_w2_sd : float or None
        Its standard deviation over the splits (``nan`` with one split).
    sliced_w2_splits : list of float
        The distance of each split.
    noise_floor : float or None
        The mean noise floor of :math:`SW_2` at the split size (the same for every row).
    logp_gap, logp_gap_se : float or None
        Mean exact log-density of the samples minus its expectation under :math:`p_\\epsilon`, and the standard error.
    mode_error : float or None
        Largest absolute error in the share of samples per mixture component.
    """

    label: str
    solver: str
    steps: int | None
    options: dict[str, Any]
    time_grid: str
    nfe: float
    seconds: float
    finite: bool
    sliced_w2: float | None = None
    sliced_w2_sd: float | None = None
    sliced_w2_splits: list[float] = field(default_factory=list)
    noise_floor: float | None = None
    logp_gap: float | None = None
    logp_gap_se: float | None = None
    mode_error: float | None = None

    @property
    def ratio(self) -> float | None:
        """``sliced_w2 / noise_floor`` (1 is as good as exact sampling can show at this size)."""
        if self.sliced_w2 is None or not self.noise_floor:
            return None
        return self.sliced_w2 / self.noise_floor

    def as_dict(self) -> dict[str, Any]:
        """The fields (and ``ratio``) as a plain dictionary."""
        return {**asdict(self), "ratio": self.ratio}


@dataclass
class ComparisonResult:
    """What :func:`compare_solvers` returns.

    Attributes
    ----------
    rows : list of ComparisonRow
        One per candidate, in order.
    samples : dict of str to Tensor
        Each candidate's samples by label.
    x_init : Tensor
        The prior draws every candidate started from.
    reference : Tensor or None
        The reference samples the distances were measured to (the splits' sets, concatenated).
    noise_floor, noise_floor_sd : float or None
        Mean and standard deviation of the :math:`SW_2` noise floor at the split size.
    n, splits, eps : int, int, float
        Samples per candidate, number of splits, final time.
    """

    rows: list[ComparisonRow]
    samples: dict[str, Tensor]
    x_init: Tensor
    reference: Tensor | None
    noise_floor: float | None
    noise_floor_sd: float | None
    n: int
    splits: int
    eps: float

    def markdown(self) -> str:
        """The rows as a markdown table: steps, NFE, time and, where measured, the distances and gaps."""
        with_sw = any(r.sliced_w2 is not None for r in self.rows)
        with_truth = any(r.logp_gap is not None for r in self.rows)
        columns = [("label", "solver"), ("steps", "steps"), ("nfe", "NFE"), ("seconds", "time (s)")]
        if with_sw:
            columns += [("sliced_w2", "sliced W2"), ("noise_floor", "noise floor")]
        if with_truth:
            columns += [("logp_gap", "mean log p gap"), ("logp_gap_se", "± s.e."), ("mode_error", "max mode error")]
        table = []
        for r in self.rows:
            sw = _number(r.sliced_w2)
            if self.splits > 1 and r.sliced_w2_sd is not None:
                sw += f" ± {_number(r.sliced_w2_sd)}"
            table.append({"label": r.label, "steps": "adaptive" if r.steps is None else r.steps, "nfe": f"{round(r.nfe, 1):g}",
                          "seconds": f"{r.seconds:.2f}", "sliced_w2": sw, "noise_floor": _number(r.noise_floor),
                          "logp_gap": _number(r.logp_gap), "logp_gap_se": _number(r.logp_gap_se),
                          "mode_error": _number(r.mode_error)})
        return markdown_table(table, columns)


def compare_solvers(sde: SDE, score_fn: ScoreFn, shape: Sequence[int], solvers: Sequence[Candidate] = DEFAULT_SOLVERS,
                    *, n: int = 2000, eps: float = 1e-3, truth: GaussianMixture | None = None,
                    reference: Sampler | None = None, splits: int = 1, floor_repeats: int = 8,
                    generator: torch.Generator | None = None, reference_generator: torch.Generator | None = None,
                    device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                    progress: bool = False, report: Callable[[ComparisonRow], None] | None = None) -> ComparisonResult:
    r"""Sample ``n`` points with every candidate from the same prior draws and score them (module docstring).

    Random numbers are drawn in a fixed order: the reference sets, the noise floor and (with ``truth``) the
    :math:`10^5` exact samples of :math:`E_{p_\epsilon}[\log p_\epsilon]` from ``reference_generator``; the prior
    draws and every solver's noise from ``generator``; then, per candidate, the projections of :math:`SW_2` from
    ``reference_generator``. Given the two generators' seeds the result is reproducible.

    Parameters
    ----------
    sde : SDE
        The forward SDE.
    score_fn : callable
        ``score_fn(x, t)``: a network's score or an exact one (:meth:`GaussianMixture.score_fn`).
    shape : sequence of int
        The shape of one sample, e.g. ``(2,)``.
    solvers : sequence of Candidate
        What to compare (default :data:`DEFAULT_SOLVERS`).
    n : int
        Samples per candidate.
    eps : float
        Final time of the solvers.
    truth : GaussianMixture, optional
        The data law :math:`p_0` when it is an exact mixture (and ``sde`` linear): the target is its marginal
        :math:`p_\epsilon`, which also gives the log-density gaps and mode errors.
    reference : callable, optional
        ``reference(k, generator)`` drawing ``k`` samples of the target law (e.g. held-out data); default with
        ``truth``: exact samples of :math:`p_\epsilon`. Without either, only NFE and time are reported.
    splits : int
        The samples are compared in this many equal splits, each with its own reference set of ``n // splits``
        points; ``sliced_w2`` is the mean over the splits.
    floor_repeats : int
        Pairs of reference sets behind the noise floor.
    generator, reference_generator : torch.Generator, optional
        The solvers' generator (also the prior draws) and the reference side's (default: ``generator``).
    device, dtype : optional
        Of the prior draws (and so of the samples).
    progress : bool
        Progress bars of the solvers.
    report : callable, optional
        Called with each :class:`ComparisonRow` as soon as it is measured (e.g. to print it).

    Returns
    -------
    ComparisonResult
    """
    n, splits = check_int("n", n), check_int("splits", splits)
    floor_repeats = check_int("floor_repeats", floor_repeats)
    if splits > 1 and n < 2 * splits:
        raise ValueError(f"n={n} is too small for splits={splits}: need at least 2 samples per split")
    for c in solvers:
        if not isinstance(c, Candidate):
            raise TypeError(f"solvers must be Candidate objects, got {c!r}")
    shape = tuple(shape)
    ref_gen = generator if reference_generator is None else reference_generator
    exact = truth.marginal(sde, eps) if truth is not None else None
    if reference is None and exact is not None:
        def reference(k: int, g: torch.Generator | None) -> Tensor:
            return exact.sample(k, generator=g, device=device, dtype=dtype)

    size = n // splits
    refs, floor, expected_logp = None, None, None
    if reference is not None:
        refs = [reference(size, ref_gen) for _ in range(splits)]
        floor = noise_floor(reference, size, repeats=floor_repeats, generator=ref_gen)
    if exact is not None:
        expected_logp = float(exact.log_prob(exact.sample(100_000, generator=ref_gen, device=device,
                                                          dtype=torch.float64)).mean())
    x_init = sde.prior_sample((size * splits, *shape), generator=generator, device=device, dtype=dtype)

    rows, samples = [], {}
    for c in solvers:
        start = time.perf_counter()
        info = sample(sde, score_fn, x_init.shape, solver=c.solver, steps=1 if c.steps is None else c.steps, eps=eps,
                      x_init=x_init, generator=generator, time_grid=c.time_grid, return_info=True, progress=progress,
                      **c.options)
        seconds = time.perf_counter() - start
        x = info.samples
        samples[c.name] = x
        row = ComparisonRow(label=c.name, solver=c.solver, steps=c.steps, options=dict(c.options), time_grid=c.time_grid,
                            nfe=mean_nfe(info), seconds=seconds, finite=bool(torch.isfinite(x).all()))
        if refs is not None:
            if row.finite:
                sw = torch.stack([sliced_wasserstein(x[i * size:(i + 1) * size], refs[i].to(x), generator=ref_gen)
                                  for i in range(splits)])
                row.sliced_w2_splits = sw.tolist()
                row.sliced_w2 = float(sw.mean())
                row.sliced_w2_sd = float(sw.std()) if splits > 1 else math.nan
            else:
                row.sliced_w2, row.sliced_w2_sd = math.inf, math.nan
            row.noise_floor = float(floor.mean())
        if exact is not None and row.finite:
            logp = exact.log_prob(x.double())
            shares = torch.bincount(exact.component_posterior(x).argmax(1), minlength=len(exact.weights)).double() / len(x)
            row.logp_gap = float(logp.mean()) - expected_logp
            row.logp_gap_se = float(logp.std() / math.sqrt(len(x)))
            row.mode_error = float((shares.to(exact.weights) - exact.weights).abs().max())
        rows.append(row)
        if report is not None:
            report(row)
    return ComparisonResult(rows=rows, samples=samples, x_init=x_init,
                            reference=None if refs is None else torch.cat(refs),
                            noise_floor=None if floor is None else float(floor.mean()),
                            noise_floor_sd=None if floor is None else float(floor.std()),
                            n=size * splits, splits=splits, eps=eps)


@dataclass
class LikelihoodComparison:
    """What :func:`compare_likelihood` returns.

    Attributes
    ----------
    points, nfe, seconds : int, int, float
        Points scored, score evaluations, wall time.
    mean_log_prob, mean_exact_log_prob : float
        Mean :math:`\\log p_\\epsilon` from the probability-flow ODE and the exact mean.
    max_abs_error_with_exact_prior : float
        Largest :math:`|\\log p - \\log p_\\epsilon|` after swapping the prior's density at the latent for the exact
        :math:`\\log p_T`: the error of the ODE solve itself, without the prior mismatch.
    """

    points: int
    nfe: int
    seconds: float
    mean_log_prob: float
    mean_exact_log_prob: float
    max_abs_error_with_exact_prior: float


def compare_likelihood(sde: SDE, score_fn: ScoreFn, truth: GaussianMixture, x: Tensor, eps: float = 1e-3,
                       rtol: float = 1e-6, atol: float = 1e-6) -> LikelihoodComparison:
    r""":func:`sdediff.log_likelihood` (exact trace) of ``x`` against the exact :math:`\log p_\epsilon(x)` of ``truth``.

    The ODE gives :math:`\log p = \log\pi(x_T) + \Delta`; replacing the prior :math:`\pi` by the exact marginal
    :math:`p_T` of the mixture, :math:`\log p_T(x_T) + \Delta`, leaves only the error of the solve.
    """
    start = time.perf_counter()
    res = log_likelihood(sde, score_fn, x, eps=eps, rtol=rtol, atol=atol)
    seconds = time.perf_counter() - start
    exact_lp = truth.log_prob(x, sde, eps)
    corrected = res.log_prob - res.prior_log_prob + truth.marginal(sde, sde.T).log_prob(res.latent)
    return LikelihoodComparison(points=len(x), nfe=res.nfe, seconds=seconds, mean_log_prob=float(res.log_prob.mean()),
                                mean_exact_log_prob=float(exact_lp.mean()),
                                max_abs_error_with_exact_prior=float((corrected - exact_lp).abs().max()))


def distance_to_reference(samples: Tensor, reference: Sampler, generator: torch.Generator | None = None,
                          floor_repeats: int = 8) -> dict[str, float]:
    """:math:`SW_2` of ``samples`` to as many fresh reference samples, and the noise floor at that size.

    Returns ``{"sliced_w2", "noise_floor", "noise_floor_sd"}`` (the floor's mean and standard deviation over
    ``floor_repeats`` pairs), ready for a JSON document.
    """
    k = samples.shape[0]
    held = reference(k, generator).to(samples)
    floor = noise_floor(reference, k, repeats=floor_repeats, generator=generator)
    return {"sliced_w2": float(sliced_wasserstein(samples, held, generator=generator)),
            "noise_floor": float(floor.mean()), "noise_floor_sd": float(floor.std())}


def nearest_class_accuracy(samples: Tensor, labels: Tensor, reference: Tensor, reference_labels: Tensor,
                           chunk: int = 512) -> dict[str, Any]:
    """The share of class-conditional samples whose nearest reference point (Euclidean) has the class asked for.

    Returns ``{"class_accuracy": share, "class_accuracy_per_class": {class: share}}``.
    """
    reference, reference_labels = reference.to(samples), reference_labels.to(samples.device)
    labels = labels.to(samples.device)
    nearest = torch.cat([torch.cdist(part, reference).argmin(1) for part in samples.split(chunk)])
    hit = (reference_labels[nearest] == labels).double()
    per_class = {int(k): float(hit[labels == k].mean()) for k in labels.unique()}
    return {"class_accuracy": float(hit.mean()), "class_accuracy_per_class": per_class}


def mean_nfe(info: SampleResult) -> float:
    """Score evaluations per sample of a :func:`sdediff.sample` result: the mean of ``stats["nfe_per_sample"]``
    for solvers with per-sample steps, else ``nfe``."""
    per_sample = info.stats.get("nfe_per_sample") if isinstance(info.stats, dict) else None
    if isinstance(per_sample, Tensor) and per_sample.numel():
        return float(per_sample.double().mean())
    return float(info.nfe)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A markdown table of ``rows`` (dictionaries), one column per ``(key, title)``."""
    head = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(str(row[key]) for key, _ in columns) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def _number(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.4f}"
