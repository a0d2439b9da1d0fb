"""Reverse-time processes and the probability flow against analytic truth (docs/concepts.md, Reverse-time processes).

Gaussian data N(0, v I) make everything linear: p_t = N(0, V(t) I) with V = m^2 v + s^2, the score is
-x / V, and the probability flow maps quantiles to quantiles, x_t = sqrt(V(t) / V(T)) x_T.
"""

import math

import pytest
import torch
import torchdiffeq
import torchsde
from problems import SDES, T64, gen

import sdediff
from sdediff.processes import CountedScore, ReverseProcess, TorchSDEAdapter

VAR = 0.5  # data variance


def variance(sde, t):
    """V(t) = m(t)^2 v + s(t)^2, the variance of p_t for data N(0, VAR I)."""
    t = torch.as_tensor(t, dtype=T64).reshape(-1)
    return sde.mean_coeff(t) ** 2 * VAR + sde.marginal_std(t) ** 2


def gaussian_score(sde):
    def score_fn(x, t):
        return -x / variance(sde, t).reshape(-1, *[1] * (x.dim() - 1))

    return score_fn


def hand_coefficients(name, t):
    """(a(t), g(t)^2) of f = a x written out from the defaults of sdediff.VPSDE and VESDE (VP: beta = 0.1 + 19.9 t)."""
    if name == "ve":
        sigma = 0.01 * 5000.0**t
        return torch.zeros_like(t), sigma**2 * 2 * math.log(5000.0)
    beta = 0.1 + 19.9 * t
    if name == "vp":
        return -0.5 * beta, beta
    m = torch.exp(-0.25 * t**2 * 19.9 - 0.5 * t * 0.1)
    return -0.5 * beta, beta * (1 - m**4)


def wiggly_score(x, t):
    """Any score-like field (not a true score): the drift formula must hold for it too."""
    return torch.sin(3 * x) * (1 + t.reshape(-1, *[1] * (x.dim() - 1))) - 0.5 * x


# --- the drift / diffusion formula --------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SDES))
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 2.0])
def test_drift_and_diffusion_by_hand(name, lam):
    sde = SDES[name]()
    t = torch.linspace(1e-3, 1.0, 9, dtype=T64)
    x = torch.randn(9, 2, 3, generator=gen(0), dtype=T64)
    a, g2 = hand_coefficients(name, t)
    s = wiggly_score(x, t)
    expected = a[:, None, None] * x - 0.5 * (1 + lam**2) * g2[:, None, None] * s
    rev = sde.reverse(wiggly_score, noise_scale=lam)
    torch.testing.assert_close(rev.drift(x, t), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rev.diffusion(t), lam * g2.sqrt(), rtol=1e-12, atol=1e-12)
    # the torchdiffeq convention f(t, x) at a scalar t
    torch.testing.assert_close(rev(t[4], x), a[4] * x - 0.5 * (1 + lam**2) * g2[4] * wiggly_score(x, t[4].expand(9)),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(SDES))
def test_probability_flow_is_noise_scale_zero(name):
    sde = SDES[name]()
    t = torch.linspace(1e-3, 1.0, 9, dtype=T64)
    x = torch.randn(9, 4, generator=gen(1), dtype=T64)
    ode, zero = sde.probability_flow(wiggly_score), sde.reverse(wiggly_score, noise_scale=0.0)
    assert isinstance(ode, ReverseProcess) and ode.noise_scale == 0.0
    a, g2 = hand_coefficients(name, t)
    torch.testing.assert_close(ode.drift(x, t), a[:, None] * x - 0.5 * g2[:, None] * wiggly_score(x, t),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ode.drift(x, t), zero.drift(x, t), rtol=0, atol=0)
    assert (ode.diffusion(t) == 0).all()
    # default noise_scale is Anderson's reverse SDE (lambda = 1): drift f - g^2 s
    torch.testing.assert_close(sde.reverse(wiggly_score).drift(x, t), a[:, None] * x - g2[:, None] * wiggly_score(x, t),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(SDES))
@pytest.mark.parametrize("lam", [0.0, 0.7, 1.0, 3.0])
def test_every_member_keeps_the_gaussian_marginals(name, lam):
    """Gaussian data: with drift k(t) x and diffusion lambda g, the variance obeys dV/dt = 2 k V - (lambda g)^2
    in reverse time; it must equal the forward dV/dt of p_t for every lambda (the Fokker-Planck argument)."""
    sde = SDES[name]()
    t = torch.linspace(1e-3, 1.0, 17, dtype=T64)
    rev = sde.reverse(gaussian_score(sde), noise_scale=lam)
    x = torch.ones(17, 1, dtype=T64)
    k = rev.drift(x, t)[:, 0]  # the drift is linear: k(t) x
    tt = t.clone().requires_grad_(True)
    (dv,) = torch.autograd.grad(variance(sde, tt).sum(), tt)
    torch.testing.assert_close(2 * k * variance(sde, t) - rev.diffusion(t) ** 2, dv, rtol=1e-9, atol=1e-9)


def test_score_reuse_and_nfe():
    sde = sdediff.VPSDE()
    rev = sde.reverse(wiggly_score, noise_scale=1.0)
    x, t = torch.randn(5, 3, generator=gen(2), dtype=T64), torch.full((5,), 0.3, dtype=T64)
    s = wiggly_score(x, t)
    d1 = rev.drift(x, t, score=s)
    assert rev.nfe == 0
    d2 = rev.drift(x, t)
    assert rev.nfe == 1
    rev(torch.tensor(0.3, dtype=T64), x)
    assert rev.nfe == 2
    torch.testing.assert_close(d1, d2, rtol=0, atol=0)


@pytest.mark.parametrize("t_out", [-0.01, -45.0, 1.5])
def test_vector_field_outside_0_T_uses_the_nearest_end(t_out):
    """torchdiffeq's adaptive steps overshoot the last output time (and may try a huge first step): outside
    [0, T] the field takes the value at the nearest end instead of NaN (VP's 1 - m^2 < 0 for t < 0)."""
    sde = sdediff.VPSDE()
    pf = sde.probability_flow(gaussian_score(sde))
    x = torch.randn(4, 3, generator=gen(3), dtype=T64)
    out = pf(torch.tensor(t_out, dtype=T64), x)
    end = torch.tensor(min(max(t_out, 0.0), sde.T), dtype=T64)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, pf(end, x), rtol=0, atol=0)


# --- torchdiffeq ----------------------------------------------------------------------------------------
def closed_form_flow(sde, x_T, eps):
    return torch.sqrt(variance(sde, eps) / variance(sde, sde.T)) * x_T


def prior_draw(sde, shape, seed):
    """Exact p_T samples for data N(0, VAR I)."""
    return torch.sqrt(variance(sde, sde.T)) * torch.randn(shape, generator=gen(seed), dtype=T64)


@pytest.mark.parametrize("name", sorted(SDES))
@pytest.mark.parametrize("eps", [1e-3, 1e-5])
def test_torchdiffeq_probability_flow_closed_form(name, eps):
    sde = SDES[name]()
    score_fn = gaussian_score(sde)
    x_T = prior_draw(sde, (16, 3), seed=4)
    ts = torch.tensor([sde.T, eps], dtype=T64)
    out = torchdiffeq.odeint(sde.probability_flow(score_fn), x_T, ts, rtol=1e-9, atol=1e-9)
    assert out.shape == (2, 16, 3)
    truth = closed_form_flow(sde, x_T, eps)
    torch.testing.assert_close(out[0], x_T, rtol=0, atol=0)
    torch.testing.assert_close(out[-1], truth, rtol=0, atol=1e-6)
    # the library's adaptive sampler lands on the same point
    samples = sdediff.sample(sde, score_fn, x_T.shape, solver="ode", x_init=x_T, eps=eps, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(samples, truth, rtol=0, atol=1e-6)
    torch.testing.assert_close(samples, out[-1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(SDES))
def test_torchdiffeq_default_tolerances_and_event_shape(name):
    """The plain call of the docstring, torchdiffeq's default tolerances (rtol 1e-7, atol 1e-9), image-shaped
    states: it runs to eps (VP used to die with 'underflow in dt' after stepping below t = 0)."""
    sde = SDES[name]()
    eps = 1e-3
    x_T = prior_draw(sde, (4, 2, 2, 2), seed=5)
    out = torchdiffeq.odeint(sde.probability_flow(gaussian_score(sde)), x_T, torch.tensor([sde.T, eps], dtype=T64))
    torch.testing.assert_close(out[-1], closed_form_flow(sde, x_T, eps), rtol=0, atol=1e-4)


def test_torchdiffeq_intermediate_times():
    """A whole trajectory: at every output time the state is the closed-form quantile map."""
    sde = sdediff.VPSDE()
    x_T = prior_draw(sde, (8, 2), seed=6)
    ts = torch.linspace(sde.T, 1e-3, 7, dtype=T64)
    out = torchdiffeq.odeint(sde.probability_flow(gaussian_score(sde)), x_T, ts, rtol=1e-9, atol=1e-9)
    for i, t in enumerate(ts):
        torch.testing.assert_close(out[i], closed_form_flow(sde, x_T, float(t)), rtol=0, atol=1e-6)


# --- torchsde ----------------------------------------------------------------------------------------------
def test_torchsde_adapter_fields_by_hand():
    """f(u, y) = -drift(y, T - u) flattened, g(u, y) = lambda g(T - u) on the diagonal."""
    sde = sdediff.VESDE()
    lam = 0.8
    rev = sde.reverse(wiggly_score, noise_scale=lam)
    adapter = rev.as_torchsde((5, 2, 3))
    assert isinstance(adapter, TorchSDEAdapter)
    assert adapter.noise_type == "diagonal" and adapter.sde_type == "ito"
    y = torch.randn(5, 6, generator=gen(7), dtype=T64)
    u = torch.tensor(0.25, dtype=T64)
    t = torch.full((5,), 0.75, dtype=T64)
    a, g2 = hand_coefficients("ve", t)
    x = y.reshape(5, 2, 3)
    drift = a[:, None, None] * x - 0.5 * (1 + lam**2) * g2[:, None, None] * wiggly_score(x, t)
    torch.testing.assert_close(adapter.f(u, y), -drift.reshape(5, 6), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(adapter.g(u, y), (lam * g2.sqrt())[:, None].expand(5, 6), rtol=1e-12, atol=1e-12)
    assert adapter.unflatten(y).shape == (5, 2, 3)
    with pytest.raises(ValueError, match="sde_type"):
        rev.as_torchsde((5, 2, 3), sde_type="ito_or_not")


@pytest.mark.parametrize("name,sde_type,method,lam", [
    ("vp", "ito", "euler", 1.0),
    ("ve", "ito", "euler", 1.0),
    ("subvp", "ito", "euler", 1.0),
    ("vp", "stratonovich", "midpoint", 1.0),
    ("ve", "stratonovich", "midpoint", 0.5),
])
def test_torchsde_reverse_sde_reaches_p_eps(name, sde_type, method, lam):
    """Reverse SDE from exact p_T samples with torchsde in forward time u = T - t: the samples at t = eps
    have the exact p_eps second moment V(eps) and mean 0, within 4.5 standard errors (n = 4000 x 4 coords)."""
    sde = SDES[name]()
    eps, n = 1e-3, 4000
    x_T = prior_draw(sde, (n, 2, 2), seed=8)
    rev = sde.reverse(gaussian_score(sde), noise_scale=lam)
    adapter = rev.as_torchsde(x_T.shape, sde_type=sde_type)
    bm = torchsde.BrownianInterval(t0=0.0, t1=sde.T - eps, size=(n, 4), dtype=T64, entropy=9)
    ys = torchsde.sdeint(adapter, x_T.flatten(1), torch.tensor([0.0, sde.T - eps], dtype=T64), method=method,
                         dt=5e-3, bm=bm)
    x = adapter.unflatten(ys[-1])
    assert x.shape == (n, 2, 2) and torch.isfinite(x).all()
    v_eps = float(variance(sde, eps))
    second_moment = float((x**2).mean())
    se_moment = v_eps * math.sqrt(2 / x.numel())
    assert abs(second_moment - v_eps) < 4.5 * se_moment, (second_moment, v_eps, se_moment)
    assert float(x.mean().abs()) < 4.5 * math.sqrt(v_eps / x.numel())
    # and it did move: the p_T variance is far from p_eps's (VE: 2500 vs 0.5; VP/sub-VP: ~1 vs 0.5)
    assert abs(float(variance(sde, sde.T)) - v_eps) > 20 * se_moment
    assert rev.nfe > 0


# --- the score wrapper and argument checks ---------------------------------------------------------------
def test_counted_score_counts_and_checks_shapes():
    calls = []

    def score_fn(x, t):
        calls.append(t)
        return -x

    counted = CountedScore(score_fn)
    x = torch.randn(3, 2, generator=gen(10))
    for _ in range(4):
        torch.testing.assert_close(counted(x, 0.5), -x)
    assert counted.nfe == 4 == len(calls)
    assert calls[0].shape == (3,) and float(calls[0][0]) == 0.5  # a float time reaches score_fn as (batch,)
    # wrapping a CountedScore does not double count
    again = CountedScore(counted)
    again(x, 0.5)
    assert again.nfe == 1 and len(calls) == 5

    with pytest.raises(ValueError, match="shaped like x"):
        CountedScore(lambda x, t: x[:, :1])(x, 0.5)
    with pytest.raises(ValueError, match="shaped like x"):
        CountedScore(lambda x, t: x.flatten())(x, 0.5)
    with pytest.raises(ValueError, match="shaped like x"):
        CountedScore(lambda x, t: x.numpy())(x, 0.5)
    with pytest.raises(TypeError, match="callable"):
        CountedScore("not a function")


def test_wrong_shape_score_fails_through_the_process():
    sde = sdediff.VPSDE()
    rev = sde.reverse(lambda x, t: x.sum(dim=1), noise_scale=1.0)
    x = torch.randn(3, 2, dtype=T64)
    with pytest.raises(ValueError, match="shaped like x"):
        rev.drift(x, torch.full((3,), 0.5, dtype=T64))
    with pytest.raises(ValueError, match="shaped like x"):
        torchdiffeq.odeint(sde.probability_flow(lambda x, t: x[:, :1]), x, torch.tensor([1.0, 0.5], dtype=T64))


@pytest.mark.parametrize("bad", [-1e-9, -1.0, float("nan"), float("inf"), True, "1", None])
def test_bad_noise_scale(bad):
    with pytest.raises(ValueError if isinstance(bad, float) else TypeError, match="noise_scale"):
        sdediff.VPSDE().reverse(wiggly_score, noise_scale=bad)


def test_bad_sde_rejected():
    with pytest.raises(TypeError, match="SDE"):
        ReverseProcess("vp", wiggly_score)
