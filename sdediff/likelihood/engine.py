r""":func:`log_likelihood`: the method, its options and checks, chunks of points, and the result with error bars."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._utils import all_finite, work_dtype
from .._validate import check_bool, check_choice, check_float, check_int
from ..processes import ScoreFn
from ..sampling import check_eps
from ..sdes.base import SDE
from ..sdes.linear import LinearSDE
from ..solvers.ode import ODE_METHODS, odeint
from .adams import AdamsLikelihood, state_columns
from .divergence import NOISES, draw_probes
from .flows import DEFAULT_NOISE_RANGE, NoiseLevelFlow, TimeFlow, ensure_finite

__all__ = ["LikelihoodResult", "log_likelihood", "cat_results", "auto_trace", "METHODS", "TRACES", "DEFAULT_TOL",
           "DEFAULT_HUTCHINSON_TOL_PER_DIM", "ADAMS_OPTIONS", "AUTO_EXACT_MAX_DIM"]

TRACES = ("exact", "hutchinson", "auto")
#: ``trace="auto"`` takes the exact trace up to this many dimensions per point and Hutchinson's estimate above
AUTO_EXACT_MAX_DIM = 16
#: ``"adams"`` (the default) and torchdiffeq's adaptive methods, which integrate the whole batch with one step size in t
METHODS = ("adams", *sorted(m for m, adaptive in ODE_METHODS.items() if adaptive))
#: the default accuracy with the exact trace: bound on each step's log-density error estimate, nats
DEFAULT_TOL = 1e-4
#: the default accuracy with Hutchinson's trace, nats per dimension of a point (its probe noise grows with the
#: dimension and is usually far above ``DEFAULT_TOL``)
DEFAULT_HUTCHINSON_TOL_PER_DIM = 3e-4
#: the options of ``method="adams"`` and their defaults
ADAMS_OPTIONS: dict[str, Any] = {"time": "noise", "noise_range": DEFAULT_NOISE_RANGE, "order": 5,
                                 "quadrature_order": 6, "first_step": 1e-2, "max_steps": 10_000}


@dataclass
class LikelihoodResult:
    r"""What :func:`log_likelihood` returns (one entry per point of the batch).

    Attributes
    ----------
    log_prob : Tensor
        ``(batch,)`` :math:`\log p_\epsilon(x)` in nats: ``prior_log_prob + delta_log_prob``.
    latent : Tensor
        :math:`x_T`, where the probability flow carries ``x``; like ``x``.
    nfe : int
        Score evaluations made (calls of ``score_fn``, each on all the points still being integrated).
    prior_log_prob : Tensor
        ``(batch,)`` :math:`\log p_T(x_T)` under the SDE's prior; replace it by your own density of ``latent`` to
        correct a prior that is only approximately :math:`p_T`.
    delta_log_prob : Tensor
        ``(batch,)`` :math:`\int_\epsilon^T \nabla\cdot v(x_t,t)\,dt` (the mean over the probes with Hutchinson's trace).
    nfe_per_point : Tensor
        ``(batch,)`` int64: the score evaluations each point took part in (every stage and every rejected step
        counted). Its mean and maximum are the cost per point.
    integration_error : Tensor
        ``(batch,)`` the method's estimate of the integration error of ``log_prob`` in nats: the sum of the moduli of
        its local error estimates (``method="adams"``; NaN for the torchdiffeq methods, which give none).
    std_error : Tensor
        ``(batch,)`` the standard error of ``log_prob`` due to the Hutchinson probes (zero for the exact trace, NaN with
        a single probe, whose spread cannot be seen): with ``method="adams"``,
        :math:`\sqrt{\sum_j W_j^2 s_j^2/k}` over the nodes :math:`j` of the point's path, with :math:`W_j` the node's
        quadrature weight and :math:`s_j` the spread of its ``k`` probes; with a torchdiffeq method (probes fixed along
        the path) :math:`s/\sqrt k` from the spread :math:`s` of the ``k`` probes' integrals.
    num_probes : int
        Hutchinson probes per point (0 for the exact trace).
    method : str
        The integrator that ran.
    tol : float or None
        The ``tol`` it ran with (after the defaults; ``None`` where only ``rtol``/``atol`` bounded its steps, or
        for the torchdiffeq methods).
    """

    log_prob: Tensor
    latent: Tensor
    nfe: int
    prior_log_prob: Tensor
    delta_log_prob: Tensor
    nfe_per_point: Tensor
    integration_error: Tensor
    std_error: Tensor
    num_probes: int = 0
    method: str = "adams"
    tol: float | None = None

    def to(self, device: torch.device | str) -> LikelihoodResult:
        """The result with its tensors on ``device``."""
        fields = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in vars(self).items()}
        return LikelihoodResult(**fields)

    @property
    def nfe_mean(self) -> float:
        """Mean score evaluations per point."""
        return float(self.nfe_per_point.double().mean()) if self.nfe_per_point.numel() else 0.0

    @property
    def nfe_max(self) -> int:
        """Most score evaluations any point took."""
        return int(self.nfe_per_point.max()) if self.nfe_per_point.numel() else 0


def _check_points(x: Any) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1:
        got = f"a {x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point tensor of shape (batch, ...), got {got}")
    if x.numel() and not all_finite(x):
        bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
        rows = bad.nonzero().flatten().tolist()
        raise FloatingPointError(f"x is not finite at point(s) {rows[:10]}{' ...' if len(rows) > 10 else ''} "
                                 "(NaN or Inf in the data, at t = eps)")
    return x


def _check_model(score_fn: Any, x: Tensor) -> None:
    """A clear error when ``score_fn`` is a module whose parameters are in another dtype or on another device than ``x``."""
    if not isinstance(score_fn, nn.Module):
        return
    param = next((p for p in score_fn.parameters() if p.is_floating_point()), None)
    if param is None:
        return
    if param.device != x.device:
        raise ValueError(f"x is on {x.device} but the model's parameters are on {param.device}; move one to the "
                         f"other (x.to({str(param.device)!r}) or model.to({str(x.device)!r}))")
    if param.dtype != x.dtype:
        raise TypeError(f"x is {x.dtype} but the model's parameters are {param.dtype}; cast one to the other "
                        f"(x.to({param.dtype}) or model.to({x.dtype}))")


def _adams_options(options: dict[str, Any] | None) -> dict[str, Any]:
    opts = dict(ADAMS_OPTIONS)
    unknown = set(options or {}) - set(opts)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for method 'adams'; it accepts {sorted(opts)}")
    opts.update(options or {})
    check_choice("time", opts["time"], ("noise", "t"))
    noise_range = opts["noise_range"]
    if not (isinstance(noise_range, (tuple, list)) and len(noise_range) == 2):
        raise ValueError(f"noise_range must be a pair (a, b) with 0 < a < b, got {noise_range!r}")
    return opts


def log_likelihood(sde: SDE, score_fn: ScoreFn, x: Tensor, eps: float = 1e-5, rtol: float | None = None,
                   atol: float | None = None, trace: str = "exact", generator: torch.Generator | None = None, *,
                   tol: float | None = None, num_probes: int = 1, noise: str = "rademacher", method: str = "adams",
                   options: dict[str, Any] | None = None, batch_size: int | None = None,
                   progress: bool = False) -> LikelihoodResult:
    r"""Log-density :math:`\log p_\epsilon(x)` (nats, per point) through the probability-flow ODE.

    The instantaneous change of variables along the flow :math:`dx/dt = v(x,t) = f(x,t) - \tfrac12 g(t)^2
    s_\theta(x,t)` from :math:`t = \epsilon` to :math:`T`:

    .. math::  \log p_\epsilon(x) = \log p_T(x_T) + \int_\epsilon^T \nabla\cdot v(x_t, t)\,dt.

    The default method, ``"adams"``, gives every point its own steps (the score is evaluated only on the points
    still being integrated) of a variable-step Adams predictor–corrector that costs one score evaluation per step,
    and controls the error of the log-density itself; for a :class:`~sdediff.LinearSDE` it integrates in the model's
    noise level (:class:`~sdediff.likelihood.flows.NoiseLevelFlow`), where the flow is smooth whatever the schedule.
    See :mod:`sdediff.likelihood.adams` and docs/likelihood.md.

    Parameters
    ----------
    sde : SDE
        The forward SDE; its prior gives :math:`\log p_T`.
    score_fn : callable
        ``score_fn(x, t)``; must be differentiable in ``x`` (a :class:`~torch.nn.parallel.DistributedDataParallel`
        module is evaluated through its ``.module``, so that ranks with different numbers of steps never wait on
        each other).
    x : Tensor
        Points ``(batch, ...)`` to evaluate (any shape; an empty batch gives empty results).
    eps : float
        Start time in ``(0, T)``; the result is the density of :math:`p_\epsilon`.
    rtol, atol : float, optional
        Mixed tolerance on the latent and the integral (give both). With ``method="adams"`` they add to ``tol``
        (and replace its default when ``tol`` is not given); for the torchdiffeq methods they are its tolerances
        (default ``1e-5``, or ``tol`` when that is given).
    trace : {"exact", "hutchinson", "auto"}
        Exact divergence (``D`` vector–Jacobian products per evaluation, batched; small ``D``) or Hutchinson's
        unbiased estimate (one vector–Jacobian product per probe, through one forward pass; with ``method="adams"``
        one more, the control probe its error control uses, see :mod:`sdediff.likelihood.adams`); ``"auto"``
        chooses by the dimension ``D`` of a point (:func:`auto_trace`).
    generator : torch.Generator, optional
        Draws the Hutchinson probes.
    tol : float, optional
        The accuracy in nats: the bound on every step's estimated log-density error (unless ``rtol``/``atol``
        are given, default :data:`DEFAULT_TOL`, 1e-4, with the exact trace and
        :data:`DEFAULT_HUTCHINSON_TOL_PER_DIM` times the dimension ``D`` of a point, 3e-4 D, with Hutchinson's, whose
        own noise per point, ``std_error``, grows with ``D`` and is usually far larger: integrating more finely
        than that buys nothing the estimate can show). On Gaussian mixtures the mean absolute error comes
        out close to ``tol``; ``integration_error`` reports the estimate point by point (the sum over a point's
        steps, which grows with their number).
    num_probes : int
        Hutchinson probes per point: drawn afresh at every evaluation with ``method="adams"``, fixed along the path
        with the torchdiffeq methods; with two or more, ``std_error`` is their standard error.
    noise : {"rademacher", "gaussian"}
        Hutchinson probe distribution (Rademacher has the lower variance).
    method : str
        ``"adams"``, or one of torchdiffeq's adaptive methods (``"dopri5"``, ``"dopri8"``, ``"bosh3"``,
        ``"fehlberg2"``, ``"adaptive_heun"``), which integrate the batch in ``t`` with one shared step size (the
        formulation of score_sde and of earlier sdediff). Fixed-step methods are refused: they would take one step.
    options : dict, optional
        For ``"adams"``: ``time`` (``"noise"``, default for linear SDEs, or ``"t"``), ``noise_range`` (``(a, b)``, the
        noise levels between which the noise-level time is logarithmic), ``order`` (5), ``quadrature_order`` (6),
        ``first_step`` (the first attempted step as a fraction of the span, 0.01), ``max_steps``. For torchdiffeq
        methods: passed to ``torchdiffeq.odeint``.
    batch_size : int, optional
        Integrate the points in chunks of this many (memory grows with it; the results do not depend on it but for
        floating-point rounding, except that with Hutchinson's trace and ``method="adams"`` the probes drawn differ);
        default all at once.
    progress : bool
        Show a progress bar over the points.

    Returns
    -------
    LikelihoodResult
        ``log_prob``, ``latent``, ``nfe``, ``prior_log_prob``, ``delta_log_prob``, ``nfe_per_point``,
        ``integration_error``, ``std_error``.

    Raises
    ------
    NotDifferentiableError
        If the score is not differentiable in ``x`` (detached, computed under ``no_grad``, integer-valued or rounded).
    FloatingPointError
        If ``x`` or the flow is not finite (naming the point and the time).

    Notes
    -----
    For quantised data turn nats into bits/dim with :func:`~sdediff.likelihood.bits_per_dim`.
    """
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdediff.SDE, got {type(sde).__name__}")
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable as score_fn(x, t), got {type(score_fn).__name__}")
    x = _check_points(x)
    eps = check_eps(eps, sde)
    check_choice("trace", trace, TRACES)
    if trace == "auto":
        trace = auto_trace(math.prod(x.shape[1:]))
    check_choice("noise", noise, NOISES)
    num_probes = check_int("num_probes", num_probes)
    batch_size = check_int("batch_size", batch_size, optional=True)
    check_bool("progress", progress)
    tol = check_float("tol", tol, 0.0, low_open=True, optional=True)
    rtol = check_float("rtol", rtol, 0.0, low_open=True, optional=True)
    atol = check_float("atol", atol, 0.0, low_open=True, optional=True)
    if (rtol is None) != (atol is None):
        raise ValueError("give rtol and atol together (or neither)")
    if not isinstance(method, str) or method not in METHODS:
        fixed = isinstance(method, str) and method in ODE_METHODS
        why = ("is a fixed-step method, which log_likelihood would run with one step" if fixed else "is not a method")
        raise ValueError(f"method {method!r} {why}; methods: {', '.join(METHODS)}")
    if method == "adams":
        opts = _adams_options(options)
        if tol is None and rtol is None:
            tol = DEFAULT_HUTCHINSON_TOL_PER_DIM * math.prod(x.shape[1:]) if trace == "hutchinson" else DEFAULT_TOL
    else:
        opts = dict(options or {})
        if rtol is None:
            rtol = atol = tol if tol is not None else 1e-5
    if isinstance(score_fn, nn.parallel.DistributedDataParallel):
        score_fn = score_fn.module
    _check_model(score_fn, x)
    k = num_probes if trace == "hutchinson" else 0
    ran_tol = tol if method == "adams" else None  # what the result reports
    n = x.shape[0]
    chunk = batch_size or max(n, 1)
    parts = []
    bar = tqdm(total=n, desc="log_likelihood", unit="point", disable=not progress, leave=False)
    try:
        for start in range(0, n, chunk):
            xc = x[start:start + chunk].detach()
            if method == "adams":
                part = _adams(sde, score_fn, xc, start, eps, tol, rtol, atol, k, noise, generator, opts)
            else:
                probes = draw_probes(xc, k, noise, generator) if k else None
                part = _torchdiffeq(sde, score_fn, xc, start, eps, rtol, atol, probes, method, opts)
            parts.append(_result(sde, part, k, method, ran_tol))
            bar.update(len(xc))
    finally:
        bar.close()
    return cat_results(parts) if parts else _result(sde, _empty(x), k, method, ran_tol)


def auto_trace(dim: int) -> str:
    """The trace ``trace="auto"`` runs for points of ``dim`` dimensions: ``"exact"`` up to
    :data:`AUTO_EXACT_MAX_DIM` (its cost, ``dim`` vector–Jacobian products per evaluation, is then small),
    ``"hutchinson"`` above."""
    dim = check_int("dim", dim)
    return "exact" if dim <= AUTO_EXACT_MAX_DIM else "hutchinson"


def cat_results(results: list[LikelihoodResult]) -> LikelihoodResult:
    """The results of consecutive chunks of points as one (``nfe`` adds up: the calls of every chunk)."""
    if not results:
        raise ValueError("cat_results needs at least one result")
    first = results[0]
    tensors = {k: torch.cat([getattr(r, k) for r in results]) for k, v in vars(first).items() if isinstance(v, Tensor)}
    return LikelihoodResult(**tensors, nfe=sum(r.nfe for r in results), num_probes=first.num_probes, method=first.method,
                            tol=first.tol)


def _result(sde: SDE, part: Part, num_probes: int, method: str, tol: float | None) -> LikelihoodResult:
    latent, delta, nfe, nfe_per_point, integration_error, std_error = part
    prior = sde.prior_log_prob(latent) if latent.shape[0] else delta.new_zeros(0)
    return LikelihoodResult(log_prob=prior + delta, latent=latent, nfe=nfe, prior_log_prob=prior, delta_log_prob=delta,
                            nfe_per_point=nfe_per_point, integration_error=integration_error, std_error=std_error,
                            num_probes=num_probes, method=method, tol=tol)


#: latent, delta (n,), nfe, nfe per point, integration error, probe standard error
Part = tuple[Tensor, Tensor, int, Tensor, Tensor, Tensor]


def _empty(x: Tensor) -> Part:
    zeros = x.new_zeros(0)
    return x[:0], zeros, 0, torch.zeros(0, dtype=torch.long, device=x.device), zeros, zeros


def _adams(sde: SDE, score_fn: ScoreFn, x: Tensor, first_point: int, eps: float, tol: float | None,
           rtol: float | None, atol: float | None, num_probes: int, noise: str, generator: torch.Generator | None,
           opts: dict[str, Any]) -> Part:
    # The state and the times are kept in float64 whatever the data's dtype (the score is called in that): in
    # float32 the rounding of a state near the data, times a score of order 1/sigma(eps), is already more than a
    # tolerance such as 1e-4 nats in a few hundred dimensions, and no step would be small enough.
    event, dtype = tuple(x.shape[1:]), x.dtype
    x = x.to(work_dtype(x.device))
    if isinstance(sde, LinearSDE) and opts["time"] == "noise":
        flow: NoiseLevelFlow | TimeFlow = NoiseLevelFlow(sde, score_fn, eps, event, tuple(opts["noise_range"]),
                                                         score_dtype=dtype)
    else:
        flow = TimeFlow(sde, score_fn, eps, event, score_dtype=dtype)
    solver = AdamsLikelihood(flow, tol=tol, rtol=rtol, atol=atol, order=opts["order"],
                             quadrature_order=opts["quadrature_order"], first_step=opts["first_step"],
                             max_steps=opts["max_steps"], num_probes=num_probes, noise=noise, generator=generator,
                             first_point=first_point)
    state = torch.cat([flow.initial_state(x), x.new_zeros(x.shape[0], 3)], 1)
    try:
        sol = solver.solve(None, state, flow.span(x))
    except (FloatingPointError, RuntimeError) as err:
        if str(err).startswith("log_likelihood"):
            raise
        where = "the noise-level time" if isinstance(flow, NoiseLevelFlow) else "t"
        raise type(err)(f"log_likelihood (method 'adams', integrating in {where}): {err}") from err
    zs, ells, errs, vars_ = state_columns(flow.dim)
    latent, delta = flow.finish(sol.x[:, zs], sol.x[:, ells])
    std_error = sol.x[:, vars_].sqrt() if num_probes != 1 else torch.full_like(delta, math.nan)
    return (latent.to(dtype), delta.to(dtype), solver.calls, sol.stats["nfe_per_sample"], sol.x[:, errs].to(dtype),
            std_error.to(dtype))


def _torchdiffeq(sde: SDE, score_fn: ScoreFn, x: Tensor, first_point: int, eps: float, rtol: float, atol: float,
                 probes: Tensor | None, method: str, options: dict[str, Any]) -> Part:
    flow = TimeFlow(sde, score_fn, eps, tuple(x.shape[1:]))
    calls = [0]
    rows = torch.arange(x.shape[0], device=x.device)

    def augmented(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        calls[0] += 1
        tau = t.clamp(0.0, sde.T).expand(state[0].shape[0])
        ev = flow.evaluate(state[0], tau, probes, check=calls[0] == 1)
        ensure_finite(ev, rows, first_point)
        return ev.f, ev.h

    columns = 1 if probes is None else probes.shape[1]
    state0 = (flow.initial_state(x), x.new_zeros(x.shape[0], columns))
    xs, ells = odeint(augmented, state0, flow.span(x), rtol=rtol, atol=atol, method=method, options=options,
                      what="log_likelihood")
    latent, ell = flow.finish(xs[-1], ells[-1])
    k = ell.shape[1]
    std_error = ell.std(1) / math.sqrt(k) if k > 1 else torch.full_like(ell[:, 0], math.nan if probes is not None else 0.0)
    nfe = torch.full((x.shape[0],), calls[0], dtype=torch.long, device=x.device)
    return latent, ell.mean(1), calls[0], nfe, torch.full_like(std_error, math.nan), std_error
