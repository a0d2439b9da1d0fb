"""Property-based search over the public API with good and bad arguments mixed: ``sample``, ``log_likelihood``,
``elbo``, ``simulate``, ``calibrate_grid`` and the data helpers.

Every argument is drawn either valid or bad (a wrong type, a value out of range, NaN, a wrong shape, an unknown
name). With only valid arguments the call must give a correct result: the right shape, dtype and finiteness, and,
where the answer is known in closed form (data N(0, v I), whose score and log-density are exact for any linear SDE),
the right numbers. With a bad one it must raise one of the clear error types, and where exactly one argument is bad,
name it. Nothing else (no AttributeError from deep inside, no silent result) passes.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sdediff
from sdediff.data import GaussianMixture, dequantize_levels, digits_to_model, make_toy, model_to_digits

CLEAR = (ValueError, TypeError, FloatingPointError)
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SDE = sdediff.VPSDE()
V = 0.5  # the data variance


def gaussian_score(sde, v=V):
    """The exact score of data N(0, v I) under a linear SDE: -x / (m^2 v + s^2)."""
    def score(x, t):
        m, s = sde.mean_coeff(t), sde.marginal_std(t)
        return -x / (m**2 * v + s**2).reshape(-1, *[1] * (x.dim() - 1))

    return score


def gaussian_log_prob(sde, x, t, v=V):
    tt = torch.full((x.shape[0],), t, dtype=x.dtype)
    var = (sde.mean_coeff(tt) ** 2 * v + sde.marginal_std(tt) ** 2).reshape(-1, *[1] * (x.dim() - 1))
    return (-0.5 * (x**2 / var + torch.log(2 * math.pi * var))).reshape(x.shape[0], -1).sum(1)


class Arg:
    """A drawn argument: its name, value and whether it is valid."""

    def __init__(self, name, value, ok):
        self.name, self.value, self.ok = name, value, ok


def arg(name, good, bad):
    """A strategy of :class:`Arg`: mostly (about 4 in 5) from ``good``, else from ``bad``."""
    return st.one_of(*[good.map(lambda v: Arg(name, v, True))] * 4, bad.map(lambda v: Arg(name, v, False)))


def check_outcome(args, call, check_result):
    """Run ``call()``: correct (``check_result``) when every argument is valid, else a clear error naming the one
    bad argument."""
    bad = [a for a in args if not a.ok]
    if not bad:
        check_result(call())
        return
    with pytest.raises(CLEAR) as info:
        call()
    if len(bad) == 1:
        assert bad[0].name in str(info.value), (bad[0].name, bad[0].value, str(info.value))


nonfinite = st.sampled_from([float("nan"), float("inf"), -float("inf")])
wrong_types = st.sampled_from(["1", None, True, [1.0], object()])
rest_shapes = st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple)
batches = st.integers(1, 5)
float_dtypes = st.sampled_from([torch.float32, torch.float64])
bad_dtypes = st.sampled_from([torch.int64, torch.bool, torch.complex64, torch.uint8, "float32"])


# --- sample ------------------------------------------------------------------------------------------------
SOLVERS = ["euler", "heun", "euler_maruyama", "ddim", "dpm_solver", "unipc", "adaptive_ode", "ode"]


@SETTINGS
@given(data=st.data(), solver=st.sampled_from(SOLVERS), batch=batches, rest=rest_shapes)
def test_sample_gives_a_correct_result_or_a_clear_error(data, solver, batch, rest):
    shape = (batch, *rest)
    steps = data.draw(arg("steps", st.integers(1, 6), st.one_of(st.integers(-3, 0), st.just(2.5), st.just(True))))
    eps = data.draw(arg("eps", st.floats(1e-3, 0.5), st.one_of(st.floats(1.0, 5.0), st.floats(-1.0, 0.0), nonfinite,
                                                                 st.just("0.1"))))
    dtype = data.draw(arg("dtype", float_dtypes, bad_dtypes))
    grid = data.draw(arg("time_grid", st.sampled_from(["uniform", "quadratic", "log_snr", "karras"]),
                         st.sampled_from(["cosine", 3, (lambda s, n, e: torch.linspace(s.T, e, n))])))
    batch_size = data.draw(arg("batch_size", st.one_of(st.none(), st.integers(1, 6)),
                               st.one_of(st.integers(-2, 0), st.just(1.5))))
    denoise = data.draw(arg("denoise", st.booleans(), st.sampled_from(["yes", 1, None])))
    generator = data.draw(arg("generator", st.integers(0, 99).map(lambda s: torch.Generator().manual_seed(s)),
                              st.sampled_from([7, "seed"])))
    device = data.draw(arg("device", st.sampled_from([None, "cpu", torch.device("cpu")]),
                           st.sampled_from(["bogus", 3.5] + ([] if torch.cuda.is_available() else ["cuda"]))))
    x_init_kind = data.draw(st.sampled_from(["none"] * 4 + ["nan", "shape", "int"]))
    x_init = {"none": None, "nan": torch.full(shape, float("nan")), "shape": torch.zeros(batch + 1, *rest),
              "int": torch.zeros(shape, dtype=torch.int64)}[x_init_kind]
    args = [steps, eps, dtype, grid, batch_size, denoise, generator, device,
            Arg("x_init", x_init, x_init_kind == "none")]

    def call():
        return sdediff.sample(SDE, gaussian_score(SDE), shape, solver=solver, steps=steps.value, eps=eps.value,
                              dtype=dtype.value, time_grid=grid.value, batch_size=batch_size.value,
                              denoise=denoise.value, generator=generator.value, device=device.value, x_init=x_init)

    def check(x):
        assert x.shape == shape and x.dtype == dtype.value and x.device.type == "cpu"
        assert torch.isfinite(x).all()

    check_outcome(args, call, check)


@SMALL
@given(batch=batches, rest=rest_shapes, steps=st.integers(2, 5))
def test_sample_refuses_a_score_of_the_wrong_kind(batch, rest, steps):
    shape = (batch, *rest)
    for bad in (lambda x, t: x.to(torch.int64), lambda x, t: (-x).to(torch.complex64), lambda x, t: torch.cat([x, x]),
                lambda x, t: x > 0, lambda x, t: 1.0):
        with pytest.raises((TypeError, ValueError), match="score"):
            sdediff.sample(SDE, bad, shape, solver="heun", steps=steps)


# --- log_likelihood ----------------------------------------------------------------------------------------
@SMALL
@given(data=st.data(), batch=st.integers(1, 4), rest=st.lists(st.integers(1, 2), min_size=0, max_size=2).map(tuple))
def test_log_likelihood_is_exact_on_gaussian_data_or_a_clear_error(data, batch, rest):
    shape = (batch, *rest)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))),
                    dtype=torch.float64) * math.sqrt(V)
    eps = data.draw(arg("eps", st.floats(1e-3, 0.1), st.one_of(st.floats(1.0, 3.0), st.just(0.0), nonfinite)))
    rtol = data.draw(arg("rtol", st.just(1e-6), st.one_of(st.floats(-1.0, 0.0), nonfinite, wrong_types)))
    trace = data.draw(arg("trace", st.just("exact"), st.sampled_from(["bogus", "Exact", 3])))
    kind = data.draw(st.sampled_from(["ok"] * 5 + ["nan", "int", "list"]))
    points = {"ok": x, "nan": x.clone().fill_(float("nan")), "int": x.to(torch.int64), "list": x.tolist()}[kind]
    args = [eps, rtol, trace, Arg("x", points, kind == "ok")]

    def call():
        return sdediff.log_likelihood(SDE, gaussian_score(SDE), points, eps=eps.value, rtol=rtol.value, atol=1e-6,
                                      trace=trace.value)

    def check(res):
        assert res.log_prob.shape == (batch,) and torch.isfinite(res.log_prob).all()
        torch.testing.assert_close(res.log_prob, gaussian_log_prob(SDE, x, eps.value), rtol=0, atol=2e-3)

    if kind == "nan" and all(a.ok for a in args[:3]):  # a NaN point has no density: a clear error, any wording
        with pytest.raises(CLEAR):
            call()
        return
    check_outcome(args, call, check)


# --- elbo --------------------------------------------------------------------------------------------------
@SMALL
@given(data=st.data(), batch=st.integers(1, 4), rest=rest_shapes)
def test_elbo_bounds_the_exact_nll_or_raises_clearly(data, batch, rest):
    x = torch.randn((batch, *rest), generator=torch.Generator().manual_seed(1), dtype=torch.float64) * math.sqrt(V)
    t_eps = data.draw(arg("t_eps", st.floats(1e-4, 1e-2), st.one_of(st.floats(1.0, 2.0), st.just(-1e-3), nonfinite)))
    num_t = data.draw(arg("num_t", st.integers(8, 32), st.one_of(st.integers(-2, 0), st.just(4.5))))
    args = [t_eps, num_t]

    def call():
        return sdediff.elbo(SDE, gaussian_score(SDE), x, t_eps=t_eps.value, num_t=num_t.value,
                            generator=torch.Generator().manual_seed(2))

    def check(res):
        assert res.nats.shape == (batch,) and torch.isfinite(res.nats).all()
        exact = -gaussian_log_prob(SDE, x, 0.0)  # the bound is on -log p_0(x): above it up to Monte Carlo noise
        assert bool((res.nats + 6 * res.std_error + 0.1 >= exact).all())

    check_outcome(args, call, check)


# --- simulate ----------------------------------------------------------------------------------------------
@SMALL
@given(data=st.data(), batch=batches, rest=rest_shapes)
def test_simulate_gives_the_path_or_raises_clearly(data, batch, rest):
    x0 = torch.randn((batch, *rest), generator=torch.Generator().manual_seed(3))
    increasing = st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4).map(sorted)
    ts = data.draw(arg("ts", increasing, st.one_of(st.just([0.5, 0.2]), st.just([0.1, 2.0]), st.just([float("nan")]))))
    solver = data.draw(arg("solver", st.sampled_from(["euler_maruyama", "exact"]), st.sampled_from(["bogus", 3])))
    dt = data.draw(arg("dt", st.one_of(st.none(), st.floats(0.01, 0.2)), st.one_of(st.floats(-1.0, 0.0), nonfinite)))
    args = [ts, solver, dt]

    def call():
        return sdediff.simulate(SDE, x0, ts.value, solver=solver.value, dt=dt.value,
                                generator=torch.Generator().manual_seed(4))

    def check(path):
        assert path.shape == (len(ts.value), *x0.shape) and torch.isfinite(path).all()

    check_outcome(args, call, check)


# --- calibrate_grid ----------------------------------------------------------------------------------------
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_calibrate_grid_gives_a_grid_or_raises_clearly(data):
    x_T = SDE.prior_sample((8, 2), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    steps = data.draw(arg("steps", st.integers(2, 3), st.one_of(st.integers(-1, 1), st.just(2.5))))
    solver = data.draw(arg("solver", st.sampled_from(["heun", "dpm_solver"]), st.sampled_from(["pc", "bogus"])))
    max_evals = data.draw(arg("max_evals", st.integers(4, 8), st.one_of(st.integers(-1, 0), st.just("many"))))
    args = [steps, solver, max_evals]

    def call():
        return sdediff.calibrate_grid(SDE, gaussian_score(SDE), x_T, steps.value, solver.value,
                                      max_evals=max_evals.value)

    def check(cal):
        ts = cal.times
        assert ts.shape == (steps.value + 1,) and bool((ts[1:] < ts[:-1]).all())
        assert math.isclose(float(ts[0]), SDE.T) and math.isclose(float(ts[-1]), 1e-3, rel_tol=1e-6)

    check_outcome(args, call, check)


# --- data helpers ------------------------------------------------------------------------------------------
@SETTINGS
@given(data=st.data())
def test_make_toy_gives_points_or_raises_clearly(data):
    name = data.draw(arg("toy data set", st.sampled_from(sdediff.data.TOY_DATASETS), st.sampled_from(["moon", 3])))
    n = data.draw(arg("n", st.integers(1, 50), st.one_of(st.integers(-3, 0), st.just(2.5))))
    dtype = data.draw(arg("dtype", st.one_of(st.none(), float_dtypes), bad_dtypes))
    args = [name, n, dtype]

    def call():
        return make_toy(name.value, n.value, torch.Generator().manual_seed(0), dtype=dtype.value)

    def check(x):
        assert x.shape == (n.value, 2) and x.dtype == (dtype.value or torch.get_default_dtype())
        assert torch.isfinite(x).all()

    check_outcome(args, call, check)


@SETTINGS
@given(data=st.data())
def test_mixture_helpers_give_exact_values_or_raise_clearly(data):
    k = data.draw(arg("num_components", st.integers(1, 6), st.one_of(st.integers(-2, 0), st.just(2.5))))
    std = data.draw(arg("std", st.floats(0.1, 2.0), st.one_of(st.floats(-1.0, 0.0), nonfinite)))
    n = data.draw(st.integers(1, 20))

    def call():
        mix = GaussianMixture.ring(k.value, radius=3.0, std=std.value)
        return mix, mix.sample(n, torch.Generator().manual_seed(0), dtype=torch.float64)

    def check(result):
        mix, x = result
        assert x.shape == (n, 2)
        lp = mix.log_prob(x)
        assert lp.shape == (n,) and torch.isfinite(lp).all()
        if k.value == 1:  # one component at (3, 0): an isotropic Gaussian
            mean = torch.tensor([3.0, 0.0], dtype=torch.float64)
            exact = -((x - mean) ** 2).sum(1) / (2 * std.value**2) - math.log(2 * math.pi * std.value**2)
            torch.testing.assert_close(lp, exact)

    check_outcome([k, std], call, check)


@SETTINGS
@given(data=st.data(), shape=st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple))
def test_dequantisation_stays_in_its_bin_or_raises_clearly(data, shape):
    levels = data.draw(arg("levels", st.integers(2, 20), st.one_of(st.integers(-1, 1), st.just(3.5))))
    top = levels.value if levels.ok else 5
    kind = data.draw(st.sampled_from(["ok"] * 4 + ["high", "negative", "fraction", "list"]))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
    k = torch.randint(0, top, shape, generator=g)
    values = {"ok": k, "high": k + top, "negative": k - top, "fraction": k + 0.5, "list": k.tolist()}[kind]
    dtype = data.draw(arg("dtype", st.one_of(st.none(), float_dtypes), bad_dtypes))
    args = [levels, dtype, Arg("k", values, kind == "ok")]

    def call():
        return dequantize_levels(values, levels.value, generator=g, dtype=dtype.value)

    def check(x):
        assert x.shape == shape and torch.isfinite(x).all()
        bins = torch.floor((x.double() + 1) / 2 * levels.value).long()
        assert torch.equal(bins, k)

    check_outcome(args, call, check)


@SETTINGS
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple), seed=st.integers(0, 99))
def test_digits_round_trip(shape, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, 17, shape, generator=g)
    assert torch.equal(model_to_digits(digits_to_model(k, g)).long(), k)
