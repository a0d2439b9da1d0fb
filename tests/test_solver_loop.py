"""The fixed-step loop, the shared update's buffers and the solvers' coefficient tables.

For a linear SDE, Euler, Heun, Euler–Maruyama and reverse diffusion run their coefficient tables
(:meth:`~sdediff.solvers.FixedStepSolver.coefficients`); for any other SDE their steps evaluate drift and
diffusion. Wrapping a
linear SDE so that it no longer *is* a :class:`~sdediff.LinearSDE` runs the general path on the same
process, so the two must agree to rounding (same noise draws, in float64). Ancestral sampling, which
has no general path, is checked against its textbook formula.
"""

import math

import pytest
import torch
from problems import gen

import sdediff
from sdediff.solvers import FixedStepSolver, SchemeRun, register_solver


class Wrapped(sdediff.SDE):
    """The same forward SDE behind the plain :class:`sdediff.SDE` interface (no kernel, no linearity)."""

    def __init__(self, inner: sdediff.LinearSDE) -> None:
        super().__init__(inner.T)
        self.inner = inner

    def drift(self, x, t):
        return self.inner.drift(x, t)

    def diffusion(self, t):
        return self.inner.diffusion(t)

    def prior_sample(self, shape, generator=None, device=None, dtype=None):
        return self.inner.prior_sample(shape, generator, device, dtype)

    def prior_log_prob(self, z):
        return self.inner.prior_log_prob(z)

    def discretize(self, x, t, dt):  # the exact linear step, computed per call from x
        return self.inner.discretize(x, t, dt)

    def discrete_alpha(self, t, dt):
        return self.inner.discrete_alpha(t, dt)


def _score(x, t):
    """A non-linear score-like field, so that a wrong coefficient on ``x`` or on the score shows."""
    return -x / (1 + t.reshape(-1, *[1] * (x.dim() - 1))) + 0.3 * torch.sin(2 * x)


SOLVERS = [("euler", {}), ("heun", {}), ("euler_maruyama", {}), ("euler_maruyama", {"noise_scale": 0.5}),
           ("euler_maruyama", {"noise_scale": 0.0}), ("reverse_diffusion", {}), ("pc", {}),
           ("pc", {"predictor": "heun", "corrector_steps": 2}), ("langevin", {"langevin_norm": "sample"})]


@pytest.mark.parametrize("name,options", SOLVERS, ids=[f"{n}{o}" for n, o in SOLVERS])
@pytest.mark.parametrize("make_sde", [sdediff.VPSDE, sdediff.VESDE, sdediff.SubVPSDE], ids=["vp", "ve", "subvp"])
def test_precomputed_linear_step_matches_the_general_step(name, options, make_sde):
    sde = make_sde()
    x = sde.prior_sample((5, 2, 3), generator=gen(0), dtype=torch.float64)
    fast, slow = (sdediff.sample(s, _score, x.shape, solver=name, steps=7, x_init=x, generator=gen(1),
                                 time_grid=sdediff.solvers.grids.quadratic(sde, 7, 1e-3), **options)
                  for s in (sde, Wrapped(sde)))
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, slow, rtol=1e-11, atol=1e-11 * float(x.abs().max()))


@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_ancestral_step_is_the_posterior_formula(variance):
    sde, n = sdediff.VPSDE(), 4
    x = sde.prior_sample((n, 3), generator=gen(2), dtype=torch.float64)
    ts = torch.tensor([1.0, 0.6, 0.25, 0.01], dtype=torch.float64)
    got = sdediff.sample(sde, _score, x.shape, solver="ancestral", x_init=x, generator=gen(3), time_grid=ts,
                         steps=3, variance=variance)
    g, want = gen(3), x
    for t, t_next in zip(ts[:-1], ts[1:], strict=True):
        tb = t.expand(n)
        r, sigma = sde.transition(tb, (t - t_next).expand(n))
        mean = (want + sigma[:, None] ** 2 * _score(want, tb)) / r[:, None]
        if variance == "posterior":
            sigma = sigma * sde.marginal_std(t_next.expand(n)) / sde.marginal_std(tb)
        want = mean + sigma[:, None] * torch.randn(want.shape, generator=g, dtype=want.dtype)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


LOOP_SOLVERS = [("euler", {}), ("heun", {}), ("euler_maruyama", {}), ("ancestral", {}), ("pc", {}), ("langevin", {}),
                ("dpm_solver", {}), ("dpm_solver", {"method": "singlestep", "order": 3}), ("ddim", {"eta": 0.5}),
                ("lms", {}), ("edm_heun", {}), ("sde_dpm_solver", {}), ("unipc", {}), ("reverse_diffusion", {}),
                ("ddpm", {})]


@pytest.mark.parametrize("name,options", LOOP_SOLVERS, ids=[f"{n}{o}" for n, o in LOOP_SOLVERS])
def test_loop_buffers_never_touch_what_the_caller_holds(name, options):
    sde = sdediff.VPSDE()
    x = sde.prior_sample((6, 4), generator=gen(4))
    x_copy = x.clone()
    plain = sdediff.sample(sde, _score, x.shape, solver=name, steps=9, x_init=x, generator=gen(5), **options)
    assert torch.equal(x, x_copy)  # x_init is read, never written
    seen = []
    res = sdediff.sample(sde, _score, x.shape, solver=name, steps=9, x_init=x, generator=gen(5),
                         keep_trajectory=True, callback=lambda i, t, y: seen.append(y), **options)
    # states handed to a callback stay as they were given, and match the trajectory and the plain run
    assert len(seen) == 9 and len({s.data_ptr() for s in seen}) == 9
    torch.testing.assert_close(torch.stack(seen), res.trajectory[1:], rtol=0, atol=0)
    torch.testing.assert_close(res.trajectory[0], x, rtol=0, atol=0)
    torch.testing.assert_close(res.samples, plain, rtol=0, atol=0)
    seen.clear()
    out = sdediff.sample(sde, _score, x.shape, solver=name, steps=9, x_init=x, generator=gen(5),
                         callback=lambda i, t, y: seen.append(y), **options)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    assert len({s.data_ptr() for s in seen}) == 9


@pytest.mark.parametrize("name,options", [("euler", {}), ("heun", {}), ("dpm_solver", {"order": 3}), ("unipc", {})])
def test_the_shared_update_alternates_two_buffers_and_never_writes_its_start(name, options):
    sde, x = sdediff.VPSDE(), torch.ones(3, 2, dtype=torch.float64)
    ts = sdediff.solvers.grids.make_grid(sde, 8, 1e-3, "uniform", dtype=x.dtype)
    process = sde.reverse(_score, 0.0)
    run = SchemeRun(sdediff.solvers.get_solver(name, **options).coefficients(sde, ts), x, observed=False)
    states, y = [], x
    for t, t_next in zip(ts[:-1], ts[1:], strict=True):
        y = run.advance(process, y, t, t_next)
        states.append(y.data_ptr())
    assert torch.equal(x, torch.ones(3, 2, dtype=torch.float64))
    assert x.data_ptr() not in states and len(set(states)) <= 2  # two buffers take turns, the start is never one
    assert process.nfe == sdediff.sample(sde, _score, x.shape, solver=name, steps=8, x_init=x, return_info=True,
                                         **options).nfe


def test_a_step_solver_sees_its_own_state_and_the_counted_process():
    @register_solver("test_state_probe")
    class Probe(FixedStepSolver):
        r"""Scaled identity :math:`x \leftarrow 0.5\,x`, counting its steps in its state and evaluating the drift once."""

        def start(self, sde, ts, x):
            return 0

        def step(self, process, state, x, t, t_next):
            process.drift(x, t)
            return 0.5 * x, state + 1

    try:
        x = torch.ones(3, 2)
        seen = []
        res = sdediff.sample(sdediff.VPSDE(), _score, x.shape, solver="test_state_probe", steps=6, x_init=x,
                             return_info=True, callback=lambda i, t, y: seen.append(y))
        assert torch.equal(res.samples, torch.full_like(x, 0.5**6)) and torch.equal(x, torch.ones(3, 2))
        assert res.nfe == 6 and [float(y[0, 0]) for y in seen] == [0.5 ** (k + 1) for k in range(6)]
    finally:
        sdediff.solvers.base._REGISTRY.pop("test_state_probe")


@pytest.mark.parametrize("name,options", LOOP_SOLVERS, ids=[f"{n}{o}" for n, o in LOOP_SOLVERS])
def test_a_score_that_returns_its_input_is_not_overwritten(name, options):
    """A score function that returns x itself (or a view of it): the shared update never writes into a state it
    reads, so runs with and without a callback (which reuse buffers or not) agree bit for bit."""
    x = torch.randn(4, 2, dtype=torch.float64, generator=gen(2))
    runs = [sdediff.sample(sdediff.VPSDE(), score, x.shape, solver=name, steps=6, x_init=x, generator=gen(3),
                           callback=callback, **options)
            for score in (lambda y, t: y, lambda y, t: y[:, :]) for callback in (None, lambda i, t, y: None)]
    for other in runs[1:]:
        torch.testing.assert_close(other, runs[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["euler", "euler_maruyama", "ancestral", "dpm_solver", "sde_dpm_solver"])
def test_first_non_finite_step_is_named(name):
    def score(x, t):
        return torch.where(t[:, None] < 0.5, math.nan, -x)

    with pytest.raises(FloatingPointError, match=r"step 6 of 10 \(t = 0.46 -> 0.37\)"):
        sdediff.sample(sdediff.VPSDE(), score, (3, 2), solver=name, steps=10, eps=0.1, generator=gen(6))


def test_non_finite_values_outside_the_record_are_caught_at_the_end():
    """The per-step record holds the first element of every sample; a NaN or Inf elsewhere that the score does
    not spread (an elementwise score) is caught by the check of the whole final state, without a step."""
    for bad in (math.nan, math.inf):
        def score(x, t, bad=bad):
            s = -x.clone()
            s[:, 1:, 2] = torch.where(t[:, None] < 0.5, bad, s[:, 1:, 2])
            return s

        with pytest.raises(FloatingPointError, match="by the end of the run .* step is not known"):
            sdediff.sample(sdediff.VPSDE(), score, (3, 2, 4), solver="euler", steps=10, eps=0.1, generator=gen(6))


def test_the_record_follows_any_memory_format():
    """The per-step record reads the first element of every sample of a channels-last state as of any other."""
    x = torch.randn(2, 3, 4, 5, generator=gen(1))
    runs = [sdediff.sample(sdediff.VPSDE(), lambda y, t: -y, x.shape, solver="euler", steps=4,
                           x_init=x.contiguous(memory_format=fmt)) for fmt in (torch.contiguous_format, torch.channels_last)]
    assert torch.allclose(runs[0], runs[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("make_sde", [sdediff.VPSDE, sdediff.SubVPSDE, sdediff.VESDE,
                                      lambda: sdediff.VPSDE(beta_min=0.0, beta_max=5.0, T=2.0)],
                         ids=["vp", "subvp", "ve", "vp-T2"])
def test_closed_form_time_of_log_snr_matches_the_bisection(make_sde):
    sde = make_sde()
    t = torch.cat([torch.tensor([1e-6, 1e-4], dtype=torch.float64), torch.linspace(0, sde.T, 201, dtype=torch.float64)[1:]])
    lam = sde.log_snr(t)
    bisect = sdediff.LinearSDE.time_of_log_snr(sde, lam)
    torch.testing.assert_close(sde.time_of_log_snr(lam), bisect, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(sde.time_of_log_snr(lam), t, rtol=1e-9, atol=0)
    lo, hi = torch.full_like(t, 0.3), torch.full_like(t, 0.6)  # clipped to [lo, hi] like the bisection
    torch.testing.assert_close(sde.time_of_log_snr(lam, lo, hi), sdediff.LinearSDE.time_of_log_snr(sde, lam, lo, hi),
                               rtol=1e-12, atol=1e-15)


def test_a_subclass_with_its_own_schedule_keeps_the_bisection():
    class Cosine(sdediff.VPSDE):
        def log_mean_coeff(self, t):
            return torch.log(torch.cos(0.5 * math.pi * (t + 0.008) / 1.008) / math.cos(0.5 * math.pi * 0.008 / 1.008))

    sde = Cosine()
    t = torch.linspace(0.01, 0.9, 50, dtype=torch.float64)
    torch.testing.assert_close(sde.time_of_log_snr(sde.log_snr(t)), t, rtol=1e-9, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_finite_sees_every_nan_and_inf(dtype):
    from sdediff._utils import all_finite

    x = torch.randn(4, 3, 5, generator=gen(0), dtype=dtype)
    assert all_finite(x) and all_finite(x[:0])
    for bad in (math.nan, math.inf, -math.inf):
        for index in ((0, 0, 0), (3, 2, 4), (1, 1, 2)):
            y = x.clone()
            y[index] = bad
            assert not all_finite(y) and not all_finite(y.transpose(0, 2)), (bad, index)
