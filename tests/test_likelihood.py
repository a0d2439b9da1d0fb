"""Exact likelihoods, bits/dim and dequantisation against analytic truth (docs/likelihood.md).

The reference is :class:`sdediff.data.GaussianMixture`: under any linear SDE p_t is again a mixture with
known density and score. The probability flow with the exact score is then exactly the flow of p_t, so
``log_likelihood`` must reproduce ``log p_eps(x)`` up to ODE tolerance once the prior term is replaced by
the exact density of p_T at the returned latent.
"""

import math

import pytest
import torch
from problems import SDES, T64, gen

import sdediff
from sdediff.data import GaussianMixture
from sdediff.sdes import gaussian_log_prob

EPS = 1e-5
TOL = 1e-7  # rtol = atol of the adaptive solver in the accuracy tests (achieved error ~1e-6 nats)


def corrected(res, gm, sde):
    """log p_eps(x) with the prior term replaced by the exact p_T density at the latent."""
    return res.log_prob - res.prior_log_prob + gm.log_prob(res.latent, sde, sde.T)


def mixture_points(gm, sde, n, seed, dtype=T64):
    return gm.marginal(sde, EPS).sample(n, generator=gen(seed), dtype=dtype)


def isotropic(d, var):
    """N(0, var I) as a one-component mixture."""
    return GaussianMixture(torch.ones(1), torch.zeros(1, d), var * torch.eye(d)[None])


# --- exact trace against the mixture density ----------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SDES))
@pytest.mark.parametrize("d,n", [(2, 16), (16, 8)])
def test_exact_trace_matches_mixture_density(name, d, n):
    sde = SDES[name]()
    gm = GaussianMixture.random(4, d, generator=gen(d))
    x = mixture_points(gm, sde, n, seed=100 + d)
    res = sdediff.log_likelihood(sde, gm.score_fn(sde), x, eps=EPS, rtol=TOL, atol=TOL)
    truth = gm.log_prob(x, sde, EPS)
    err = float((corrected(res, gm, sde) - truth).abs().max())
    assert err < 1e-3, f"max |error| = {err:.3g} nats"
    # bookkeeping of the result
    assert res.log_prob.shape == (n,) and res.latent.shape == x.shape and res.nfe > 0
    torch.testing.assert_close(res.log_prob, res.prior_log_prob + res.delta_log_prob, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.prior_log_prob, sde.prior_log_prob(res.latent), rtol=0, atol=1e-12)
    # the latent is distributed as p_T, which is close to the prior: the uncorrected answer is close too
    assert float((res.log_prob - truth).abs().max()) < 1.0


@pytest.mark.parametrize("name", sorted(SDES))
def test_gaussian_data_closed_form(name):
    """Data N(0, v I): the flow is x_T = r x with r = sqrt(V(T)/V(eps)), V = m^2 v + s^2, so the latent is r x
    and the divergence integral is d log r for every x (change of variables of a scaling)."""
    sde, d, v = SDES[name](), 3, 0.3
    gm = isotropic(d, v)
    x = torch.randn(6, d, generator=gen(1), dtype=T64) * 2
    res = sdediff.log_likelihood(sde, gm.score_fn(sde), x, eps=EPS, rtol=1e-8, atol=1e-8)
    te, tT = torch.tensor([EPS], dtype=T64), torch.tensor([sde.T], dtype=T64)
    var_eps = sde.mean_coeff(te) ** 2 * v + sde.marginal_std(te) ** 2
    var_T = sde.mean_coeff(tT) ** 2 * v + sde.marginal_std(tT) ** 2
    r = torch.sqrt(var_T / var_eps)
    torch.testing.assert_close(res.latent, r * x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.delta_log_prob, (d * r.log()).expand(6), rtol=0, atol=1e-5)
    torch.testing.assert_close(corrected(res, gm, sde), gaussian_log_prob(x, var_eps.sqrt()), rtol=0, atol=1e-5)


def test_custom_nonlinear_api_sde():
    """A user SDE with only drift, diffusion and a prior (an OU process, no mean_coeff): Gaussian data
    N(0, v I) has p_t = N(0, V(t) I), V = v e^{-2 theta t} + sigma^2 (1 - e^{-2 theta t}) / (2 theta)."""
    theta, sigma, v, T = 1.5, 0.8, 2.0, 2.0

    class OU(sdediff.SDE):
        def drift(self, x, t):
            return -theta * x

        def diffusion(self, t):
            return torch.full_like(t, sigma)

        def prior_sample(self, shape, generator=None, device=None, dtype=None):
            return sigma / math.sqrt(2 * theta) * torch.randn(shape, generator=generator, device=device, dtype=dtype)

        def prior_log_prob(self, z):
            return gaussian_log_prob(z, sigma / math.sqrt(2 * theta))

    def var(t):
        e = torch.exp(-2 * theta * torch.as_tensor(t, dtype=T64))
        return v * e + sigma**2 * (1 - e) / (2 * theta)

    def score_fn(x, t):
        return -x / var(t)[:, None]

    sde = OU(T=T)
    x = torch.randn(8, 2, generator=gen(2), dtype=T64) * math.sqrt(v)
    res = sdediff.log_likelihood(sde, score_fn, x, eps=1e-3, rtol=1e-8, atol=1e-8)
    exact_prior = gaussian_log_prob(res.latent, var(T).sqrt())
    torch.testing.assert_close(res.log_prob - res.prior_log_prob + exact_prior,
                               gaussian_log_prob(x, var(1e-3).sqrt()), rtol=0, atol=1e-5)


def test_latent_decodes_back_to_data():
    """The latent is the probability-flow image of x: solving the flow back from it returns x."""
    sde = sdediff.VPSDE()
    gm = GaussianMixture.random(3, 2, generator=gen(3))
    eps = 1e-3
    x = gm.marginal(sde, eps).sample(8, generator=gen(4), dtype=T64)
    res = sdediff.log_likelihood(sde, gm.score_fn(sde), x, eps=eps, rtol=1e-9, atol=1e-9)
    back = sdediff.sample(sde, gm.score_fn(sde), x.shape, solver="ode", x_init=res.latent, eps=eps, rtol=1e-9,
                          atol=1e-9)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-5)


# --- Hutchinson -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
@pytest.mark.parametrize("name", ["vp", "ve"])
def test_hutchinson_is_unbiased(name, noise):
    """Each of 4 points repeated 500 times, every row with its own probe: the mean of the estimates lies
    within 4 standard errors of the exact-trace value."""
    sde, d, points, reps = SDES[name](), 4, 4, 500
    gm = GaussianMixture.random(3, d, generator=gen(5))
    score_fn = gm.score_fn(sde)
    x = mixture_points(gm, sde, points, seed=6)
    exact = sdediff.log_likelihood(sde, score_fn, x, eps=EPS, rtol=TOL, atol=TOL)
    est = sdediff.log_likelihood(sde, score_fn, x.repeat(reps, 1), eps=EPS, rtol=1e-5, atol=1e-5,
                                 trace="hutchinson", noise=noise, generator=gen(7))
    est_log_prob = est.log_prob.reshape(reps, points)
    mean, std = est_log_prob.mean(0), est_log_prob.std(0)
    se = std / math.sqrt(reps)
    assert (std > 1e-3).all(), "each row must get its own probe"
    assert (se < 0.75).all(), se  # the check below has power (VP ~0.1 nats, VE with Gaussian probes ~0.5)
    z = (mean - exact.log_prob) / se
    assert (z.abs() < 4).all(), z
    # the state part of the flow does not depend on the probe (but for the steps the probe's integrand asks for)
    torch.testing.assert_close(est.latent, exact.latent.repeat(reps, 1), rtol=2e-3, atol=1e-4)
    torch.testing.assert_close(est.prior_log_prob, exact.prior_log_prob.repeat(reps), rtol=0, atol=1e-2)


def test_hutchinson_reproducible():
    sde = sdediff.VPSDE()
    gm = GaussianMixture.random(2, 3, generator=gen(8))
    x = mixture_points(gm, sde, 6, seed=9)

    def run(seed, noise="rademacher"):
        return sdediff.log_likelihood(sde, gm.score_fn(sde), x, eps=EPS, trace="hutchinson", noise=noise,
                                      generator=gen(seed)).log_prob

    torch.testing.assert_close(run(11), run(11), rtol=0, atol=0)
    torch.testing.assert_close(run(11, "gaussian"), run(11, "gaussian"), rtol=0, atol=0)
    assert (run(11) - run(12)).abs().max() > 1e-3
    assert (run(11) - run(11, "gaussian")).abs().max() > 1e-3
    # the exact trace draws nothing: the generator does not matter
    a = sdediff.log_likelihood(sde, gm.score_fn(sde), x, eps=EPS, generator=gen(1)).log_prob
    b = sdediff.log_likelihood(sde, gm.score_fn(sde), x, eps=EPS, generator=gen(2)).log_prob
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- dtypes, shapes, NFE ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vp", "ve"])
def test_float32(name):
    sde = SDES[name]()
    gm = GaussianMixture.random(3, 2, generator=gen(10))
    x = mixture_points(gm, sde, 16, seed=11, dtype=torch.float32)
    res = sdediff.log_likelihood(sde, gm.score_fn(sde), x, eps=EPS, rtol=1e-5, atol=1e-5)
    assert res.log_prob.dtype == res.latent.dtype == torch.float32
    truth = gm.log_prob(x.double(), sde, EPS)
    latent_term = gm.log_prob(res.latent.double(), sde, sde.T)
    err = (res.log_prob.double() - res.prior_log_prob.double() + latent_term - truth).abs().max()
    assert err < 1e-2, err


def test_event_shape():
    """(batch, 2, 2) states: the same answer as the flat (batch, 4) computation, and the truth."""
    sde = sdediff.VPSDE()
    gm = GaussianMixture.random(3, 4, generator=gen(12))
    x = mixture_points(gm, sde, 8, seed=13)
    flat = sdediff.log_likelihood(sde, gm.score_fn(sde), x, eps=EPS, rtol=TOL, atol=TOL)
    image = sdediff.log_likelihood(sde, gm.score_fn(sde), x.reshape(8, 2, 2), eps=EPS, rtol=TOL, atol=TOL)
    assert image.latent.shape == (8, 2, 2) and image.log_prob.shape == (8,)
    torch.testing.assert_close(image.log_prob, flat.log_prob, rtol=0, atol=1e-9)
    torch.testing.assert_close(image.latent.reshape(8, 4), flat.latent, rtol=0, atol=1e-9)
    err = (image.log_prob - image.prior_log_prob + gm.log_prob(image.latent, sde, sde.T) - gm.log_prob(x, sde, EPS))
    assert err.abs().max() < 1e-3
    hutch = sdediff.log_likelihood(sde, gm.score_fn(sde), x.reshape(8, 2, 2), eps=EPS, trace="hutchinson",
                                   generator=gen(14))
    assert hutch.latent.shape == (8, 2, 2) and torch.isfinite(hutch.log_prob).all()


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_nfe_counts_score_calls(trace):
    sde = sdediff.VESDE()
    gm = GaussianMixture.random(2, 3, generator=gen(15))
    inner = gm.score_fn(sde)
    calls = []

    def score_fn(x, t):
        calls.append((x.shape[0], t.shape))
        return inner(x, t)

    x = mixture_points(gm, sde, 5, seed=16)
    res = sdediff.log_likelihood(sde, score_fn, x, eps=EPS, trace=trace, generator=gen(17))
    assert res.nfe > 0 and res.nfe == len(calls)
    assert all(t_shape == (n,) for n, t_shape in calls)  # t reaches the score as a (batch,) tensor
    assert calls[0][0] == 5  # the first evaluation is on every point, the others on those still integrating
    # every point takes part in as many evaluations as its own steps need; the calls add up
    assert sum(n for n, _ in calls) == int(res.nfe_per_point.sum()) and res.nfe_max <= res.nfe
    assert res.latent.shape == x.shape


def test_input_not_modified_and_graph_free():
    sde = sdediff.VPSDE()
    gm = GaussianMixture.random(2, 2, generator=gen(18))
    x = mixture_points(gm, sde, 4, seed=19)
    x_copy = x.clone()
    res = sdediff.log_likelihood(sde, gm.score_fn(sde), x, eps=EPS)
    assert torch.equal(x, x_copy)
    assert not res.log_prob.requires_grad and not res.latent.requires_grad


# --- bits/dim and dequantisation ------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 5, 8, 16])
@pytest.mark.parametrize("num_dims", [1, 3, 3072])
def test_bits_per_dim_of_uniform_density(bits, num_dims):
    """Uniform on [-1, 1]^D (log p = -D ln 2) is b bits/dim for b-bit data (offset b - 1); uniform on
    [0, 1]^D (log p = 0) with data_width = 1 too (offset b)."""
    log_p = torch.full((2,), -num_dims * math.log(2), dtype=T64)
    torch.testing.assert_close(sdediff.bits_per_dim(log_p, num_dims, bits=bits), torch.full((2,), float(bits),
                               dtype=T64), rtol=0, atol=1e-12)
    zero = torch.zeros(2, dtype=T64)
    torch.testing.assert_close(sdediff.bits_per_dim(zero, num_dims, bits=bits, data_width=1.0),
                               torch.full((2,), float(bits), dtype=T64), rtol=0, atol=1e-12)
    torch.testing.assert_close(sdediff.bits_per_dim(zero, num_dims, bits=bits), torch.full((2,), bits - 1.0,
                               dtype=T64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("data_range", [(-1.0, 1.0), (0.0, 1.0), (-3.0, 5.0)])
def test_bits_per_dim_is_the_code_length_of_a_histogram_model(data_range):
    """A product of categoricals P_i(k) over b-bit data, dequantised, has the piecewise-constant density
    p(x) = prod_i P_i(k_i) (2^b / w); then bits/dim equals the exact discrete code length -log2 P(k) / D."""
    bits, dims, n = 3, 5, 64
    lo, hi = data_range
    width = hi - lo
    probs = torch.softmax(torch.randn(dims, 2**bits, generator=gen(20), dtype=T64), dim=1)
    k = torch.multinomial(probs, n, replacement=True, generator=gen(21)).T  # (n, dims)
    x = sdediff.dequantize(k, bits=bits, generator=gen(22), data_range=data_range, dtype=T64)
    k_back = torch.floor((x - lo) / width * 2**bits).long()
    assert torch.equal(k_back, k)
    log_p = probs.log().gather(1, k_back.T).T.sum(1) + dims * math.log(2**bits / width)
    code_length = -probs.log().gather(1, k.T).T.sum(1) / (dims * math.log(2))
    torch.testing.assert_close(sdediff.bits_per_dim(log_p, dims, bits=bits, data_width=width), code_length,
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("bits", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("data_range", [(-1.0, 1.0), (0.0, 1.0), (-0.5, 3.5)])
def test_dequantize_lands_in_its_bin(bits, dtype, data_range):
    lo, hi = data_range
    k = torch.randint(0, 2**bits, (20000, 3), generator=gen(23))
    x = sdediff.dequantize(k, bits=bits, generator=gen(24), data_range=data_range, dtype=dtype)
    assert x.dtype == dtype and x.shape == k.shape
    x64, k64 = x.double(), k.double()
    # dyadic ranges: the float64 bin edges are exact
    lower, upper = lo + (hi - lo) * k64 / 2**bits, lo + (hi - lo) * (k64 + 1) / 2**bits
    assert (x64 >= lower).all() and (x64 < upper).all()
    # the position inside the bin is U(0, 1): mean 1/2, variance 1/12, half of them in each half
    u = ((x64 - lower) / (upper - lower)).flatten()
    se = math.sqrt(1 / 12 / u.numel())
    assert abs(float(u.mean()) - 0.5) < 4 * se
    assert abs(float(u.var()) - 1 / 12) < 4 * math.sqrt(1 / 180 / u.numel())
    assert abs(float((u < 0.5).double().mean()) - 0.5) < 4 * math.sqrt(0.25 / u.numel())


def test_dequantize_top_bin_float32_stays_half_open():
    """float32 k + u rounds to k + 1 for u within half an ulp of 1 (~8e-6 of draws at k = 255): those must
    not land on the right edge of [-1, 1] (or of their bin)."""
    k = torch.full((2_000_000,), 255.0)
    x = sdediff.dequantize(k, bits=8, generator=gen(25))
    assert x.dtype == torch.float32
    assert float(x.max()) < 1.0
    assert float(x.min()) >= 1.0 - 2 / 256


def test_dequantize_deterministic_and_dtypes():
    k = torch.randint(0, 256, (4, 3, 2, 2), generator=gen(26))
    a = sdediff.dequantize(k, generator=gen(27))
    b = sdediff.dequantize(k, generator=gen(27))
    c = sdediff.dequantize(k, generator=gen(28))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.get_default_dtype() and a.shape == k.shape
    assert sdediff.dequantize(k.double(), generator=gen(27)).dtype == T64
    assert sdediff.dequantize(k, generator=gen(27), dtype=T64).dtype == T64
    # integer-valued floats are accepted and give the same numbers as integer k
    torch.testing.assert_close(sdediff.dequantize(k.float(), generator=gen(27)), a, rtol=0, atol=0)


@pytest.mark.parametrize("k", [[-1], [256], [0.5], [float("nan")], [3, 300]])
def test_dequantize_rejects_bad_k(k):
    with pytest.raises(ValueError, match="k must"):
        sdediff.dequantize(torch.tensor(k), bits=8)


def test_dequantize_and_bits_per_dim_reject_bad_arguments():
    k = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="data_range"):
        sdediff.dequantize(k, data_range=(1.0, -1.0))
    with pytest.raises(ValueError, match="bits"):
        sdediff.dequantize(k, bits=0)
    lp = torch.zeros(2)
    with pytest.raises(ValueError, match="num_dims"):
        sdediff.bits_per_dim(lp, 0)
    with pytest.raises(ValueError, match="bits"):
        sdediff.bits_per_dim(lp, 3, bits=0)
    with pytest.raises(ValueError, match="data_width"):
        sdediff.bits_per_dim(lp, 3, data_width=0.0)


# --- argument checks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,word", [
    ({"trace": "approximate"}, "trace"),
    ({"trace": "hutchinson", "noise": "uniform"}, "noise"),
    ({"noise": "normal"}, "noise"),
    ({"eps": 0.0}, "eps"),
    ({"eps": -1e-3}, "eps"),
    ({"eps": 1.0}, "eps"),
    ({"eps": 1.5}, "eps"),
    ({"eps": float("nan")}, "eps"),
    ({"rtol": 0.0}, "rtol"),
    ({"rtol": -1e-5}, "rtol"),
    ({"atol": 0.0}, "atol"),
    ({"method": "magic"}, "method"),
])
def test_bad_arguments(kwargs, word):
    sde = sdediff.VPSDE()
    calls = []

    def score_fn(x, t):
        calls.append(1)
        return -x

    with pytest.raises(ValueError, match=word):
        sdediff.log_likelihood(sde, score_fn, torch.zeros(2, 2, dtype=T64), **kwargs)
    assert not calls  # rejected before any work
