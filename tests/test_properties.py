"""Property-based tests: random shapes, dtypes and SDE parameters through every solver and the likelihood.

Data are N(0, v I), whose score is exact for any linear SDE (-x / (m^2 v + s^2)), so every output can be
checked for shape, dtype, finiteness and, for the deterministic solvers, against the closed-form flow.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sdediff

FAMILY_DEFAULTS = {"torchsde": "euler"}


def solver_names():
    names = []
    for name in sdediff.available_solvers():
        family, _, option = name.partition(":")
        names.append(f"{family}:{FAMILY_DEFAULTS[family]}" if option else name)
    return names


def gaussian_score(sde, v):
    def score(x, t):
        m, s = sde.mean_coeff(t), sde.marginal_std(t)
        return -x / (m**2 * v + s**2).reshape(-1, *[1] * (x.dim() - 1))

    return score


shapes = st.integers(1, 17).flatmap(
    lambda b: st.lists(st.integers(1, 4), min_size=0, max_size=4).map(lambda rest: (b, *rest)))
dtypes = st.sampled_from([torch.float32, torch.float64])


@st.composite
def linear_sdes(draw):
    kind = draw(st.sampled_from(["vp", "subvp", "ve"]))
    if kind == "ve":
        lo = draw(st.floats(1e-3, 0.5))
        return sdediff.VESDE(sigma_min=lo, sigma_max=lo * draw(st.floats(2.0, 2000.0)))
    lo = draw(st.floats(0.01, 1.0))
    cls = sdediff.VPSDE if kind == "vp" else sdediff.SubVPSDE
    return cls(beta_min=lo, beta_max=lo + draw(st.floats(1.0, 30.0)))


SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("solver", solver_names())
@SETTINGS
@given(shape=shapes, dtype=dtypes, sde=linear_sdes(), v=st.floats(0.05, 4.0), seed=st.integers(0, 2**31))
def test_every_solver_gives_finite_samples_of_the_right_shape(solver, shape, dtype, sde, v, seed):
    x = sdediff.sample(sde, gaussian_score(sde, v), shape, solver=solver, steps=8, eps=1e-2, dtype=dtype,
                       generator=torch.Generator().manual_seed(seed))
    assert x.shape == shape and x.dtype == dtype and x.device.type == "cpu"
    assert torch.isfinite(x).all()


@SETTINGS
@given(shape=shapes, sde=linear_sdes(), v=st.floats(0.05, 4.0), seed=st.integers(0, 2**31))
def test_probability_flow_is_the_closed_form_map(shape, sde, v, seed):
    """For N(0, v I) data the flow scales x by sqrt(V(t)/V(T)), V = m^2 v + s^2: any shape, any parameters."""
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = sdediff.sample(sde, gaussian_score(sde, v), shape, solver="ode", eps=1e-2, x_init=x_T, rtol=1e-8,
                       atol=1e-8)
    var = [sde.mean_coeff(torch.tensor(t, dtype=torch.float64)) ** 2 * v
           + sde.marginal_std(torch.tensor(t, dtype=torch.float64)) ** 2 for t in (1e-2, sde.T)]
    torch.testing.assert_close(x, x_T * (var[0] / var[1]).sqrt(), rtol=1e-5, atol=1e-6)


@SETTINGS
@given(shape=shapes, dtype=dtypes, sde=linear_sdes(), v=st.floats(0.05, 4.0), seed=st.integers(0, 2**31),
       trace=st.sampled_from(["exact", "hutchinson"]))
def test_likelihood_any_shape_and_dtype(shape, dtype, sde, v, seed, trace):
    gen = torch.Generator().manual_seed(seed)
    x = (v**0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    res = sdediff.log_likelihood(sde, gaussian_score(sde, v), x, eps=1e-2, rtol=1e-5, atol=1e-5, trace=trace,
                                 generator=gen)
    assert res.log_prob.shape == (shape[0],) and res.log_prob.dtype == dtype
    assert res.latent.shape == shape and torch.isfinite(res.log_prob).all() and res.nfe > 0
