"""The likelihood engine (``sdediff.log_likelihood`` with its defaults: ``method="adams"``, exact trace) against exact
log-densities of Gaussian mixtures, its error bars against the errors and spreads they claim to describe, its refusals,
and its bookkeeping (chunks, per-point steps, counts).

Truth: under a linear SDE p_t of a Gaussian mixture is a Gaussian mixture, with exact density and score. With the exact
score the probability flow is exact, so ``log_prob - prior_log_prob + log p_T(latent)`` must equal ``log p_eps(x)`` up
to the integration error (the prior term is replaced by the exact density of p_T, so that the prior's mismatch, which
is no integration error, does not count). Points are drawn from every component's marginal at eps, so that every mode
is represented.
"""

import math
import re

import pytest
import torch
from problems import MIXTURE, SDES, T64, Counted, gen
from torch import nn

import sdediff
from sdediff.data import GaussianMixture
from sdediff.interop.diffusers import DiscreteVPSDE
from sdediff.likelihood import LikelihoodResult, NotDifferentiableError, bits_per_dim

EPS = 1e-5


def every_mode(gm, sde, per_mode, seed, eps=EPS):
    """``per_mode`` exact draws of p_eps from each component of ``gm`` (so every mode is represented)."""
    parts = []
    for k in range(gm.num_components):
        component = GaussianMixture(torch.ones(1), gm.means[k:k + 1], gm.covs[k:k + 1])
        parts.append(component.marginal(sde, eps).sample(per_mode, generator=gen(seed + k), dtype=T64))
    return torch.cat(parts)


def true_error(res, gm, sde, x, eps=EPS):
    """``|log p_eps(x) - engine|`` per point, with the prior term replaced by the exact density of p_T at the latent."""
    engine = res.log_prob - res.prior_log_prob + gm.log_prob(res.latent, sde, sde.T)
    return (engine - gm.log_prob(x, sde, eps)).abs()


def rows(res, index):
    """The result of the points ``index`` of ``res``."""
    tensors = {k: v[index] for k, v in vars(res).items() if isinstance(v, torch.Tensor)}
    return LikelihoodResult(**tensors, nfe=res.nfe, num_probes=res.num_probes, method=res.method)


# --- 1. accuracy against the exact log-density, and cost ---------------------------------------------------------
def check_accuracy(name, d, per_mode, seed):
    """Mean |error| <= 3 tol at tol = 1e-3 and 1e-5; integration_error >= |error| at >= 80% of the points; the tighter
    tol costs more evaluations. Measured (seeds 0, 1): mean |error| 0.47-0.70 tol in d = 2, 1.2-2.2 tol in d = 16,
    the estimate above the error at every point, 1.9-2.1 times the evaluations per point for 100 times the accuracy."""
    sde = SDES[name]()
    gm = GaussianMixture.random(4, d, generator=gen(d + 50 * seed))
    x = every_mode(gm, sde, per_mode, seed=100 + d + 50 * seed)
    cost = {}
    for tol in (1e-3, 1e-5):
        res = sdediff.log_likelihood(sde, gm.score_fn(sde), x, tol=tol)
        assert res.method == "adams" and res.num_probes == 0 and res.log_prob.dtype == T64
        err = true_error(res, gm, sde, x)
        covered = float((res.integration_error >= err).double().mean())
        msg = (f"{name} d={d} tol={tol:g}: mean |error| {err.mean():.3g} ({err.mean() / tol:.2f} tol), max "
               f"{err.max():.3g}, estimate >= error at {covered:.0%}, nfe/point {res.nfe_mean:.1f} (max {res.nfe_max})")
        print(msg)
        assert float(err.mean()) <= 3 * tol, msg
        assert covered >= 0.8, msg
        assert (res.std_error == 0).all()  # the exact trace has no probe noise
        cost[tol] = res.nfe_mean
    assert cost[1e-5] >= 1.5 * cost[1e-3], cost


@pytest.mark.parametrize("name", sorted(SDES))
@pytest.mark.parametrize("d,per_mode", [(2, 8), (16, 4)])
def test_accuracy_is_of_the_order_of_tol(name, d, per_mode):
    check_accuracy(name, d, per_mode, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(SDES))
@pytest.mark.parametrize("d,per_mode", [(2, 16), (8, 8), (16, 8)])
def test_accuracy_is_of_the_order_of_tol_on_more_mixtures(name, d, per_mode, seed):
    check_accuracy(name, d, per_mode, seed)


@pytest.mark.parametrize("trace,num_probes", [("exact", 1), ("hutchinson", 2)])
def test_nfe_counts_every_evaluation_and_is_reported_per_point(trace, num_probes):
    """``nfe`` is the number of calls of the score; ``nfe_per_point`` the calls each point took part in (their sum is
    the rows the score saw); nfe_mean and nfe_max are its mean and maximum; points of different difficulty differ."""
    sde = sdediff.VPSDE()
    gm = GaussianMixture.random(3, 2, generator=gen(1))
    x = every_mode(gm, sde, 3, seed=2)
    x[0] = torch.tensor([4.0, -4.0], dtype=T64)  # far out in a tail: more steps
    rows_seen = []

    def score(z, t):
        rows_seen.append(z.shape[0])
        return gm.score_fn(sde)(z, t)

    counted = Counted(score)
    res = sdediff.log_likelihood(sde, counted, x, trace=trace, num_probes=num_probes, generator=gen(3))
    assert res.nfe == counted.calls == len(rows_seen) > 0
    assert res.nfe_per_point.shape == (9,) and res.nfe_per_point.dtype == torch.long
    assert int(res.nfe_per_point.sum()) == sum(rows_seen)
    assert res.nfe_max == int(res.nfe_per_point.max()) == res.nfe  # the hardest point is in every call
    assert res.nfe_mean == pytest.approx(float(res.nfe_per_point.double().mean()), abs=1e-12)
    assert res.nfe_per_point[0] > 2 * res.nfe_per_point[1:].double().mean()
    # the torchdiffeq methods integrate the batch together: every point takes part in every call (all stages)
    counted = Counted(gm.score_fn(sde))
    res = sdediff.log_likelihood(sde, counted, x, method="dopri5", tol=1e-5)
    assert res.nfe == counted.calls and (res.nfe_per_point == res.nfe).all()
    assert res.integration_error.isnan().all()


# --- 2. error bars ----------------------------------------------------------------------------------------------
REPS = 200  # independent runs of each point (rows of one batch; every row draws its own probes)


@pytest.mark.parametrize("name,noise,num_probes", [("vp", "rademacher", 2), ("ve", "rademacher", 4),
                                                   ("vp", "gaussian", 4), ("ve", "gaussian", 2)])
def test_hutchinson_std_error_matches_the_spread_over_seeds_and_is_unbiased(name, noise, num_probes):
    """4 points, each run 200 times (every run its own probes): the reported standard error (root mean square over
    the runs) agrees with the standard deviation of log_prob over the runs within 20%, pooled over the points (the
    sampling error of that ratio is about 3% here); the mean over the runs lies within 4 standard errors of the
    exact-trace value. Measured: pooled ratios 0.96-1.08, per point 0.90-1.12."""
    sde = SDES[name]()
    gm = GaussianMixture.random(4, 2, generator=gen(5))
    score = gm.score_fn(sde)
    x = every_mode(gm, sde, 1, seed=6)  # one point per mode
    exact = sdediff.log_likelihood(sde, score, x, tol=1e-7)
    res = sdediff.log_likelihood(sde, score, x.repeat(REPS, 1), tol=1e-3, trace="hutchinson", num_probes=num_probes,
                                 noise=noise, generator=gen(7))
    assert res.num_probes == num_probes
    log_prob, se = res.log_prob.reshape(REPS, 4), res.std_error.reshape(REPS, 4)
    observed = log_prob.std(0)
    reported = se.pow(2).mean(0).sqrt()
    pooled = float(reported.pow(2).mean().sqrt() / observed.pow(2).mean().sqrt())
    msg = f"observed {observed.tolist()}, reported {reported.tolist()}, pooled ratio {pooled:.3f}"
    print(msg)
    assert (observed > 1e-2).all(), msg  # the probes do make a spread to compare with
    assert abs(pooled - 1) <= 0.2, msg
    assert ((reported / observed - 1).abs() <= 0.35).all(), msg
    z = (log_prob.mean(0) - exact.log_prob) / (observed / math.sqrt(REPS))
    assert (z.abs() < 4).all(), z


def test_one_probe_has_no_standard_error():
    sde = sdediff.VPSDE()
    gm = GaussianMixture.random(2, 2, generator=gen(8))
    res = sdediff.log_likelihood(sde, gm.score_fn(sde), every_mode(gm, sde, 2, seed=9), trace="hutchinson",
                                 generator=gen(10))
    assert res.std_error.isnan().all() and torch.isfinite(res.log_prob).all()


def test_bits_per_dim_standard_error_combines_probes_and_points():
    """bits/dim of a Hutchinson result (2 probes) over 16 fresh points of p_eps, 150 times over: the spread of the mean
    over the repetitions (points and probes both drawn anew) matches ``std_error`` (sd/sqrt(n) of the points), and the
    spread over the probes alone (the same points, new probes) matches ``probe_std_error`` (sqrt(sum se_i^2)/n),
    each within 20% (root mean square of the reported over the repetitions against the observed standard deviation;
    measured 1.05 and 0.95). The per-point figures are the nats' figures scaled by 1/(D ln 2)."""
    sde, reps, n, d = sdediff.VPSDE(), 150, 16, 2
    gm = GaussianMixture.random(3, d, generator=gen(11))
    score = gm.score_fn(sde)
    fresh_points = gm.marginal(sde, EPS).sample(reps * n, generator=gen(12), dtype=T64)
    same_points = fresh_points[:n].repeat(reps, 1)
    observed, reported = {}, {}
    for label, x in (("points", fresh_points), ("probes", same_points)):
        res = sdediff.log_likelihood(sde, score, x, tol=1e-3, trace="hutchinson", num_probes=2, generator=gen(13))
        parts = [bits_per_dim(rows(res, slice(r * n, (r + 1) * n)), d) for r in range(reps)]
        means = torch.tensor([p.mean for p in parts], dtype=T64)
        field = "std_error" if label == "points" else "probe_std_error"
        observed[label] = float(means.std())
        reported[label] = math.sqrt(sum(getattr(p, field) ** 2 for p in parts) / reps)
    first = parts[0]
    scale = 1 / (d * math.log(2))
    torch.testing.assert_close(first.per_point, -rows(res, slice(0, n)).log_prob * scale + 7, rtol=0, atol=1e-12)
    torch.testing.assert_close(first.per_point_std_error, rows(res, slice(0, n)).std_error * scale, rtol=0, atol=1e-15)
    assert first.probe_std_error == pytest.approx(float(first.per_point_std_error.pow(2).sum().sqrt()) / n)
    assert first.std_error == pytest.approx(float(first.per_point.std()) / math.sqrt(n))
    msg = f"observed {observed}, reported {reported}"
    print(msg)
    assert observed["points"] > 2 * observed["probes"], msg  # the points' spread dominates: the two checks differ
    for label in observed:
        assert abs(reported[label] / observed[label] - 1) <= 0.2, msg


# --- 3. honest failure ------------------------------------------------------------------------------------------
def _mixture_problem(name="vp"):
    """An SDE, the exact score of a 2-d mixture and 4 points of it."""
    sde = SDES[name]()
    gm = GaussianMixture.random(2, 2, generator=gen(14))
    return sde, gm.score_fn(sde), every_mode(gm, sde, 2, seed=15)


def _no_grad(score):
    def wrapped(x, t):
        with torch.no_grad():
            return score(x, t)
    return wrapped


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
@pytest.mark.parametrize("kind,words", [
    ("detached", "not differentiable in x"),
    ("no_grad", "not differentiable in x"),
    ("integer", "integer tensor"),
    ("rounded", "piecewise constant"),
])
def test_a_score_that_is_not_differentiable_is_refused(kind, words, trace):
    sde, score, x = _mixture_problem()
    bad = {"detached": lambda z, t: score(z, t).detach(), "no_grad": _no_grad(score),
           "integer": lambda z, t: score(z, t).round().long(), "rounded": lambda z, t: score(z, t).round()}[kind]
    with pytest.raises(NotDifferentiableError, match=words):
        sdediff.log_likelihood(sde, bad, x, trace=trace, generator=gen(0))
    assert issubclass(NotDifferentiableError, TypeError)


@pytest.mark.parametrize("method,words", [("euler", "is a fixed-step method"), ("rk4", "is a fixed-step method"),
                                          ("midpoint", "is a fixed-step method"),
                                          ("magic", "is not a method"), (3, "is not a method")])
def test_fixed_step_and_unknown_methods_are_refused(method, words):
    sde, score, x = _mixture_problem()
    counted = Counted(score)
    with pytest.raises(ValueError, match=f"method {re.escape(repr(method))} {words}.*adams"):
        sdediff.log_likelihood(sde, counted, x, method=method)
    assert counted.calls == 0


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_points_are_named(value):
    sde, score, x = _mixture_problem()
    x[2, 1] = value
    with pytest.raises(FloatingPointError, match=r"x is not finite at point\(s\) \[2\]"):
        sdediff.log_likelihood(sde, score, x)


@pytest.mark.parametrize("method", ["adams", "dopri5"])
@pytest.mark.parametrize("batch_size", [None, 2])
def test_a_score_that_turns_nan_names_the_point_and_the_time(method, batch_size):
    """The score is NaN at point 3 (far out, so that it is told apart from the others by its value) from t = 0.3 on:
    the error names point 3 of the batch (in whichever chunk it is integrated) and a time past 0.3."""
    sde, score, x = _mixture_problem("ve")
    x[3] = 1000.0

    def nan_late(z, t):
        return torch.where((z[:, :1] > 500) & (t[:, None] > 0.3), math.nan, score(z, t))

    with pytest.raises(FloatingPointError, match=r"not finite at point 3 at t = ") as info:
        sdediff.log_likelihood(sde, nan_late, x, method=method, batch_size=batch_size)
    t = float(re.search(r"at t = ([0-9.e+-]+)", str(info.value)).group(1))
    assert 0.3 < t <= sde.T, str(info.value)


@pytest.mark.parametrize("options", [{}, {"trace": "hutchinson", "num_probes": 2}, {"method": "dopri5"},
                                     {"batch_size": 3}])
def test_an_empty_batch_gives_empty_results(options):
    sde, score, _ = _mixture_problem()
    counted = Counted(score)
    x = torch.zeros(0, 2, 2, dtype=T64)
    res = sdediff.log_likelihood(sde, counted, x, generator=gen(0), **options)
    assert counted.calls == 0 and res.nfe == 0 and res.nfe_mean == 0.0 and res.nfe_max == 0
    assert res.latent.shape == (0, 2, 2)
    for field in ("log_prob", "prior_log_prob", "delta_log_prob", "nfe_per_point", "integration_error", "std_error"):
        assert getattr(res, field).shape == (0,), field
    assert res.log_prob.dtype == T64


class _Scaled(nn.Module):
    """A module with a parameter, in ``dtype``, around an exact score."""

    def __init__(self, score, dtype):
        super().__init__()
        self.score, self.scale = score, nn.Parameter(torch.ones((), dtype=dtype))

    def forward(self, x, t):
        return self.scale * self.score(x, t)


def test_points_of_the_wrong_dtype_get_a_clear_message():
    sde, score, x = _mixture_problem()
    with pytest.raises(TypeError, match="x must be a floating-point tensor.*torch.int64"):
        sdediff.log_likelihood(sde, score, x.round().long())
    with pytest.raises(TypeError, match="x is torch.float32 but the model's parameters are torch.float64"):
        sdediff.log_likelihood(sde, _Scaled(score, T64), x.float())
    with pytest.raises(TypeError, match="x is torch.float64 but the model's parameters are torch.float32"):
        sdediff.log_likelihood(sde, _Scaled(score, torch.float32), x)
    # a plain function that computes in float64 on float32 points
    with pytest.raises(TypeError, match="input's dtype torch.float32, got torch.float64"):
        sdediff.log_likelihood(sde, lambda z, t: score(z.double(), t.double()), x.float())
    with pytest.raises(TypeError, match="x must be a floating-point tensor.*list"):
        sdediff.log_likelihood(sde, score, x.tolist())


# --- 4. kinked schedules ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("interpolation", ["linear", "cubic"])
def test_a_diffusers_ddpm_schedule_costs_what_the_continuous_vp_sde_costs(interpolation):
    """diffusers' DDPMScheduler (1000 linear betas) as a DiscreteVPSDE: "linear" interpolation of log alpha_bar makes
    beta(t) piecewise constant (a kink in the kernel at every knot), "cubic" a smooth interpolant. At tol 1e-4 the mean
    |error| is at most 3 tol and the evaluations per point at most 1.5 times those of VPSDE(0.1, 20), its continuous
    limit. Measured on the skewed mixture (8 points per mode, eps = 1e-3): mean |error| 5.0e-5 (VPSDE 5.0e-5), nfe
    per point 37.5 against 37.5 (ratio 1.001, max 54 against 54). Integrating in t instead (options time="t") costs
    4.1 times the VPSDE's evaluations on the "linear" schedule (mean; 7.6 times at the hardest point)."""
    diffusers = pytest.importorskip("diffusers")
    eps, tol = 1e-3, 1e-4
    scheduler = diffusers.DDPMScheduler()
    cost, errors = {}, {}
    for label, sde in (("ddpm", DiscreteVPSDE(scheduler.alphas_cumprod, interpolation=interpolation)),
                       ("vp", sdediff.VPSDE(0.1, 20.0))):
        x = every_mode(MIXTURE, sde, 8, seed=20, eps=eps)
        res = sdediff.log_likelihood(sde, MIXTURE.score_fn(sde), x, eps=eps, tol=tol)
        err = true_error(res, MIXTURE, sde, x, eps=eps)
        errors[label], cost[label] = float(err.mean()), res.nfe_mean
    msg = f"{interpolation}: mean |error| {errors}, nfe per point {cost}, ratio {cost['ddpm'] / cost['vp']:.3f}"
    print(msg)
    assert errors["ddpm"] <= 3 * tol, msg
    assert cost["ddpm"] <= 1.5 * cost["vp"], msg


# --- 5. chunks, progress, per-point steps -----------------------------------------------------------------------
def _mixed_difficulty(name):
    sde = SDES[name]()
    gm = GaussianMixture.random(4, 3, generator=gen(21))
    x = every_mode(gm, sde, 3, seed=22)
    x[5] = torch.tensor([4.0, -4.0, 4.0], dtype=T64)  # far out in a tail, with several times the others' steps
    return sde, gm.score_fn(sde), x


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_chunks_progress_and_other_points_do_not_change_a_point(name):
    """Every point has its own steps: in chunks of 5 (with a progress bar), or alone, a point gets the same steps and the
    same log-density as in one batch with a much harder point (to float64 rounding: measured up to 5e-12 relative);
    nfe adds up the calls of the chunks."""
    sde, score, x = _mixed_difficulty(name)
    whole = sdediff.log_likelihood(sde, score, x)
    assert whole.nfe_per_point[5] > 2 * whole.nfe_per_point.double().median()
    counted = Counted(score)
    part = sdediff.log_likelihood(sde, counted, x, batch_size=5, progress=True)
    assert part.nfe == counted.calls >= whole.nfe
    assert torch.equal(part.nfe_per_point, whole.nfe_per_point)
    for field in ("log_prob", "latent", "delta_log_prob", "integration_error"):
        torch.testing.assert_close(getattr(part, field), getattr(whole, field), rtol=1e-10, atol=1e-10)
    for i in (0, 5, 11):
        alone = sdediff.log_likelihood(sde, score, x[i:i + 1])
        assert alone.nfe_per_point[0] == whole.nfe_per_point[i] == alone.nfe
        torch.testing.assert_close(alone.log_prob[0], whole.log_prob[i], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(alone.latent[0], whole.latent[i], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(alone.integration_error[0], whole.integration_error[i], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", ["vp", pytest.param("ve", marks=pytest.mark.slow)])
def test_hutchinson_has_no_integration_bias_at_tight_tol(name):
    """Hutchinson's estimate is unbiased only if the quadrature of its mean is accurate: 4 points, 1000 runs each at
    tol 1e-4, and the mean over the runs within 4 standard errors (about 7e-3 nats here) of the exact-trace value.
    Steps that follow the state's error alone leave the quadrature's error of the trace unchecked: measured 0.024
    nats (z = -10 over 2000 runs) at one of these points before the control probe; 6e-4 (|z| <= 1.1) with it."""
    sde, reps = SDES[name](), 1000
    gm = GaussianMixture.random(4, 2, generator=gen(5))
    score = gm.score_fn(sde)
    x = every_mode(gm, sde, 1, seed=6)
    exact = sdediff.log_likelihood(sde, score, x, tol=1e-7)
    res = sdediff.log_likelihood(sde, score, x.repeat(reps, 1), tol=1e-4, trace="hutchinson", num_probes=4,
                                 generator=gen(8))
    log_prob = res.log_prob.reshape(reps, 4)
    z = (log_prob.mean(0) - exact.log_prob) / (log_prob.std(0) / math.sqrt(reps))
    assert (z.abs() < 4).all(), z


def test_float32_points_in_high_dimension_reach_tol():
    """float32 points of a 784-d Gaussian (exact score computed in float32): the engine keeps its state in float64
    and calls the score in float32, so the steps do not underflow and the error stays of the order of tol. Kept in
    float32, the rounding of the state times a score of order 1/sigma(eps) exceeded 1e-4 nats at the first step.
    Measured: error 2.0e-4 nats (float64 points: 1.4e-4), 59.3 evaluations per point (59.5)."""
    sde, s0, tol = sdediff.VPSDE(), 0.5, 1e-4

    def variance(t):
        return sde.mean_coeff(t) ** 2 * s0**2 + sde.marginal_std(t) ** 2

    def score(x, t):
        return -x / variance(t).view(-1, 1, 1, 1).to(x.dtype)

    def log_p(x, t):
        v = variance(torch.full((x.shape[0], 1), t, dtype=T64))
        return (-0.5 * x.double().flatten(1) ** 2 / v - 0.5 * torch.log(2 * math.pi * v)).sum(1)

    x64 = torch.randn(4, 1, 28, 28, generator=gen(0), dtype=T64) * variance(torch.tensor(EPS, dtype=T64)).sqrt()
    nfe = {}
    for dtype in (T64, torch.float32):
        x = x64.to(dtype)
        res = sdediff.log_likelihood(sde, score, x, tol=tol)
        assert res.log_prob.dtype == dtype and torch.isfinite(res.log_prob).all()
        engine = res.log_prob.double() - res.prior_log_prob.double() + log_p(res.latent, sde.T)
        err = (engine - log_p(x, EPS)).abs()
        assert float(err.max()) < 5 * tol, (dtype, err)
        nfe[dtype] = res.nfe_mean
    assert nfe[torch.float32] <= 1.5 * nfe[T64], nfe


def test_the_default_tol_follows_the_trace_and_is_reported():
    """Exact trace: ``DEFAULT_TOL``; Hutchinson's: ``DEFAULT_HUTCHINSON_TOL_PER_DIM`` times the dimension (fewer
    evaluations than at 1e-4, whose accuracy the probes' noise would hide); ``result.tol`` says which ran, ``None``
    where only rtol/atol or a torchdiffeq method bounded the steps."""
    from sdediff.likelihood import DEFAULT_HUTCHINSON_TOL_PER_DIM, DEFAULT_TOL

    sde = sdediff.VPSDE()
    gm = GaussianMixture.random(4, 16, generator=gen(3))
    score, x = gm.score_fn(sde), every_mode(gm, sde, 1, seed=4)
    assert sdediff.log_likelihood(sde, score, x).tol == DEFAULT_TOL == 1e-4
    loose = sdediff.log_likelihood(sde, score, x, trace="hutchinson", generator=gen(5))
    assert loose.tol == pytest.approx(DEFAULT_HUTCHINSON_TOL_PER_DIM * 16)
    fine = sdediff.log_likelihood(sde, score, x, trace="hutchinson", tol=1e-4, generator=gen(5))
    assert fine.tol == 1e-4 and loose.nfe_mean < fine.nfe_mean
    assert sdediff.log_likelihood(sde, score, x, rtol=1e-4, atol=1e-4).tol is None
    assert sdediff.log_likelihood(sde, score, x, method="dopri5").tol is None


def test_the_first_step_option_sets_the_first_attempted_step():
    """``options={"first_step": f}`` starts every point at ``f`` times the span of the integration time (it was
    accepted but ignored, every point starting at 1% of the span); a different first step changes the steps."""
    from sdediff.likelihood.adams import AdamsLikelihood
    from sdediff.likelihood.flows import NoiseLevelFlow

    sde = sdediff.VPSDE()
    gm = GaussianMixture.random(4, 2, generator=gen(7))
    flow = NoiseLevelFlow(sde, gm.score_fn(sde), EPS, (2,))
    lo, hi = flow.span(torch.zeros((), dtype=T64)).tolist()
    assert AdamsLikelihood(flow, first_step=1e-3).first_step == pytest.approx(1e-3 * (hi - lo))
    x = every_mode(gm, sde, 2, seed=8)
    default = sdediff.log_likelihood(sde, gm.score_fn(sde), x, tol=1e-5)
    small = sdediff.log_likelihood(sde, gm.score_fn(sde), x, tol=1e-5, options={"first_step": 1e-4})
    assert not torch.equal(default.nfe_per_point, small.nfe_per_point)
    assert (small.log_prob - default.log_prob).abs().max() < 1e-4


def test_auto_trace_is_exact_up_to_16_dimensions_and_hutchinson_above():
    """``trace="auto"`` (what the CLI and the trainer's evaluation run): bit for bit the exact trace at D = 16, and
    Hutchinson's estimate, with the same draws as ``trace="hutchinson"``, at D = 17."""
    from sdediff.likelihood import auto_trace
    from sdediff.likelihood.engine import AUTO_EXACT_MAX_DIM

    assert AUTO_EXACT_MAX_DIM == 16
    assert [auto_trace(d) for d in (1, 16, 17, 784)] == ["exact", "exact", "hutchinson", "hutchinson"]
    with pytest.raises(ValueError, match="dim"):
        auto_trace(0)
    sde = sdediff.VPSDE()
    for d, expected in ((16, "exact"), (17, "hutchinson")):
        gm = GaussianMixture.random(2, d, generator=gen(d))
        score, x = gm.score_fn(sde), every_mode(gm, sde, 2, seed=d)
        auto = sdediff.log_likelihood(sde, score, x, trace="auto", generator=gen(1))
        named = sdediff.log_likelihood(sde, score, x, trace=expected, generator=gen(1))
        assert auto.num_probes == named.num_probes == (0 if expected == "exact" else 1)
        assert torch.equal(auto.log_prob, named.log_prob) and auto.tol == named.tol
