"""GaussianMixture against analytic truth: scipy densities, autograd scores, Bayes, sample moments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from problems import gen
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from sdediff.data import GaussianMixture


class VPStandIn:
    """VP schedule beta(t) = 0.1 + 19.9 t: log m = -19.9 t^2 / 4 - 0.1 t / 2, s = sqrt(1 - m^2)."""

    T = 1.0

    def _log_m(self, t: torch.Tensor) -> torch.Tensor:
        return -(t**2) * 19.9 / 4 - 0.1 * t / 2

    def mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self._log_m(t))

    def marginal_std(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(-torch.expm1(2 * self._log_m(t)))


class VEStandIn:
    """VE schedule m = 1, s = 0.01 * 5000^t."""

    T = 1.0

    def mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(t)

    def marginal_std(self, t: torch.Tensor) -> torch.Tensor:
        return 0.01 * 5000.0**t


SDES = [VPStandIn(), VEStandIn()]


def noisy_component(mu: torch.Tensor, cov: torch.Tensor, m: float, s: float):
    """scipy's N(m mu, m^2 Sigma + s^2 I)."""
    return multivariate_normal(m * mu.numpy(), m**2 * cov.numpy() + s**2 * np.eye(len(mu)))


def scipy_log_prob(gm: GaussianMixture, x: torch.Tensor, m: float = 1.0, s: float = 0.0) -> np.ndarray:
    """log p_t(x) for one time, summing scipy's densities of N(m mu_k, m^2 Sigma_k + s^2 I)."""
    terms = [math.log(w) + noisy_component(mu, cov, m, s).logpdf(x.numpy())
             for w, mu, cov in zip(gm.weights.tolist(), gm.means, gm.covs, strict=True)]
    return logsumexp(np.stack(terms, axis=1), axis=1)


def kernel(sde: VPStandIn | VEStandIn, t: float) -> tuple[float, float]:
    tt = torch.tensor([t], dtype=torch.float64)
    return float(sde.mean_coeff(tt)), float(sde.marginal_std(tt))


def autograd_score(gm: GaussianMixture, x: torch.Tensor, t: torch.Tensor | float,
                   sde: object) -> torch.Tensor:
    x = x.detach().requires_grad_()
    (grad,) = torch.autograd.grad(gm.log_prob(x, sde, t).sum(), x)
    return grad


@pytest.fixture(scope="module")
def gm() -> GaussianMixture:
    return GaussianMixture.random(4, 3, generator=gen(0))


# --- construction -------------------------------------------------------------------------------------------
def test_construction_normalises_weights_and_keeps_parameters() -> None:
    covs = torch.stack([torch.eye(2), 2 * torch.eye(2)])
    gm = GaussianMixture([1.0, 3.0], [[0.0, 0.0], [1.0, 2.0]], covs)
    assert gm.dim == 2 and gm.num_components == 2
    torch.testing.assert_close(gm.weights, torch.tensor([0.25, 0.75], dtype=torch.float64))
    torch.testing.assert_close(gm.covs, covs.double())
    torch.testing.assert_close(gm.mean(), torch.tensor([0.75, 1.5], dtype=torch.float64))


def test_ring_constructor() -> None:
    gm = GaussianMixture.ring(num_components=6, radius=2.0, std=0.3, dim=3)
    torch.testing.assert_close(gm.means[:, :2].norm(dim=1), torch.full((6,), 2.0, dtype=torch.float64))
    assert torch.all(gm.means[:, 2] == 0)
    torch.testing.assert_close(gm.covs, 0.09 * torch.eye(3, dtype=torch.float64).expand(6, 3, 3))
    torch.testing.assert_close(gm.mean(), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_mixture_covariance_formula(gm: GaussianMixture) -> None:
    w, mu, cov = gm.weights, gm.means, gm.covs
    mean = (w[:, None] * mu).sum(0)
    expected = sum(w[k] * (cov[k] + torch.outer(mu[k] - mean, mu[k] - mean))
                   for k in range(gm.num_components))
    torch.testing.assert_close(gm.covariance(), expected, rtol=1e-12, atol=1e-12)


# --- densities ----------------------------------------------------------------------------------------------
def test_log_prob_p0_matches_scipy(gm: GaussianMixture) -> None:
    x = 3 * torch.randn(50, 3, generator=gen(1), dtype=torch.float64)
    np.testing.assert_allclose(gm.log_prob(x).numpy(), scipy_log_prob(gm, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sde", SDES, ids=["vp", "ve"])
@pytest.mark.parametrize("t", [1e-3, 0.3, 1.0])
def test_noisy_log_prob_matches_scipy(gm: GaussianMixture, sde: object, t: float) -> None:
    m, s = kernel(sde, t)
    x = m * gm.sample(40, generator=gen(2), dtype=torch.float64) + s * torch.randn(40, 3, generator=gen(3),
                                                                                 dtype=torch.float64)
    np.testing.assert_allclose(gm.log_prob(x, sde, t).numpy(), scipy_log_prob(gm, x, m, s),
                               rtol=1e-10, atol=1e-10)


def test_marginal_log_prob_equals_noisy_log_prob(gm: GaussianMixture) -> None:
    sde, t = VPStandIn(), 0.4
    marginal = gm.marginal(sde, t)
    x = torch.randn(30, 3, generator=gen(4), dtype=torch.float64)
    torch.testing.assert_close(marginal.log_prob(x), gm.log_prob(x, sde, t), rtol=1e-12, atol=1e-12)
    m, _ = kernel(sde, t)
    torch.testing.assert_close(marginal.mean(), m * gm.mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(marginal.weights, gm.weights)


def test_log_prob_per_sample_t_matches_scalar_t(gm: GaussianMixture) -> None:
    sde = VEStandIn()
    t = torch.tensor([0.01, 0.2, 0.5, 0.9], dtype=torch.float64)
    x = torch.randn(4, 3, generator=gen(5), dtype=torch.float64)
    rows = torch.cat([gm.log_prob(x[i:i + 1], sde, float(t[i])) for i in range(4)])
    torch.testing.assert_close(gm.log_prob(x, sde, t), rows, rtol=1e-13, atol=1e-13)


# --- scores -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sde", SDES, ids=["vp", "ve"])
@pytest.mark.parametrize("t", [1e-4, 0.05, 0.5, 1.0])
def test_score_matches_autograd_float64(gm: GaussianMixture, sde: object, t: float) -> None:
    m, s = kernel(sde, t)
    x = m * gm.sample(64, generator=gen(6), dtype=torch.float64) + s * torch.randn(64, 3, generator=gen(7),
                                                                                 dtype=torch.float64)
    torch.testing.assert_close(gm.score(x, t, sde), autograd_score(gm, x, t, sde), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("sde", SDES, ids=["vp", "ve"])
def test_score_per_sample_t(gm: GaussianMixture, sde: object) -> None:
    t = torch.rand(128, generator=gen(8), dtype=torch.float64) * 0.999 + 1e-3
    x = 2 * torch.randn(128, 3, generator=gen(9), dtype=torch.float64)
    score = gm.score(x, t, sde)
    torch.testing.assert_close(score, autograd_score(gm, x, t, sde), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(score[5:6], gm.score(x[5:6], float(t[5]), sde), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(score[7:8], gm.score(x[7:8], t[7], sde), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sde", SDES, ids=["vp", "ve"])
def test_score_float32_close_to_float64(gm: GaussianMixture, sde: object) -> None:
    t = torch.rand(256, generator=gen(10), dtype=torch.float64) * 0.99 + 0.01
    x = 2 * torch.randn(256, 3, generator=gen(11), dtype=torch.float64)
    reference = gm.score(x, t, sde)
    score32 = gm.score(x.float(), t.float(), sde)
    assert score32.dtype == torch.float32
    assert gm.log_prob(x.float(), sde, t.float()).dtype == torch.float32
    scale = reference.norm(dim=1, keepdim=True) + 1.0
    assert ((score32.double() - reference) / scale).abs().max() < 1e-4


def test_score_stable_at_small_t_with_singular_covariance() -> None:
    # Component 0 lives on a line (rank 1), component 1 is nearly singular.
    direction = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64) / math.sqrt(6.0)
    covs = torch.stack([torch.outer(direction, direction), torch.diag(torch.tensor([1.0, 1.0, 1e-12]))])
    gm = GaussianMixture([0.5, 0.5], [[0.0, 0.0, 0.0], [3.0, 0.0, 0.0]], covs.double())
    sde, t = VPStandIn(), 1e-5
    _, s = kernel(sde, t)
    assert 5e-4 < s < 2e-3
    x = gm.sample(512, generator=gen(12), dtype=torch.float64) + s * torch.randn(512, 3, generator=gen(13),
                                                                                dtype=torch.float64)
    score = gm.score(x, t, sde)
    assert torch.isfinite(score).all()
    torch.testing.assert_close(score, autograd_score(gm, x, t, sde), rtol=1e-8, atol=1e-6)
    # Near a point of component 0's line, far from component 1, the score is that of
    # N(0, m^2 Sigma_0 + s^2 I).
    offset = torch.tensor([1e-3, 0.0, 0.0], dtype=torch.float64)
    offset = offset - (offset @ direction) * direction
    m, s = kernel(sde, t)
    point = (0.7 * m * direction + offset)[None]
    cov = m**2 * covs[0] + s**2 * torch.eye(3, dtype=torch.float64)
    expected = -torch.linalg.solve(cov, point.T).T
    torch.testing.assert_close(gm.score(point, t, sde), expected, rtol=1e-8, atol=1e-6)
    score32 = gm.score(x.float(), t, sde)
    assert torch.isfinite(score32).all()
    assert ((score32.double() - score).norm(dim=1) / score.norm(dim=1)).max() < 1e-2
    with pytest.raises(ValueError, match="singular"):
        gm.log_prob(x)


def test_score_fn_with_event_shape() -> None:
    gm = GaussianMixture.random(3, 4, generator=gen(14))
    sde = VEStandIn()
    score_fn = gm.score_fn(sde)
    x = torch.randn(16, 2, 2, generator=gen(15), dtype=torch.float64)
    t = torch.full((16,), 0.3, dtype=torch.float64)
    out = score_fn(x, t)
    assert out.shape == (16, 2, 2)
    torch.testing.assert_close(out.reshape(16, 4), gm.score(x.reshape(16, 4), t, sde))
    torch.testing.assert_close(gm.log_prob(x, sde, 0.3), gm.log_prob(x.reshape(16, 4), sde, 0.3))
    torch.testing.assert_close(out, autograd_score(gm, x, t, sde), rtol=1e-8, atol=1e-8)


def test_large_batch_per_sample_t() -> None:
    gm = GaussianMixture.random(8, 64, generator=gen(16))
    sde = VPStandIn()
    t = torch.rand(2000, generator=gen(17), dtype=torch.float64)
    x = gm.sample(2000, generator=gen(18), dtype=torch.float64)
    torch.testing.assert_close(gm.score(x, t, sde), autograd_score(gm, x, t, sde), rtol=1e-8, atol=1e-8)


# --- posterior ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [None, 0.2])
def test_component_posterior_is_bayes(gm: GaussianMixture, t: float | None) -> None:
    sde = None if t is None else VPStandIn()
    m, s = (1.0, 0.0) if t is None else kernel(sde, t)
    x = 2 * torch.randn(25, 3, generator=gen(19), dtype=torch.float64)
    post = gm.component_posterior(x, t, sde)
    assert post.shape == (25, gm.num_components)
    torch.testing.assert_close(post.sum(1), torch.ones(25, dtype=torch.float64))
    joint = np.stack([w * noisy_component(mu, cov, m, s).pdf(x.numpy())
                      for w, mu, cov in zip(gm.weights.tolist(), gm.means, gm.covs, strict=True)], axis=1)
    np.testing.assert_allclose(post.numpy(), joint / joint.sum(1, keepdims=True), rtol=1e-9, atol=1e-12)


# --- sampling -----------------------------------------------------------------------------------------------
def test_sample_moments_and_labels(gm: GaussianMixture) -> None:
    n = 200_000
    x, labels = gm.sample(n, generator=gen(20), dtype=torch.float64, return_labels=True)
    assert x.shape == (n, 3) and labels.shape == (n,) and labels.dtype == torch.int64
    mean_err = (x.mean(0) - gm.mean()).abs()
    assert (mean_err < 5 * x.std(0) / math.sqrt(n)).all()
    centred = x - gm.mean()
    products = centred[:, :, None] * centred[:, None, :]
    cov_err = (products.mean(0) - gm.covariance()).abs()
    assert (cov_err < 5 * products.std(0) / math.sqrt(n) + 1e-12).all()
    freq = torch.bincount(labels, minlength=gm.num_components).double() / n
    w = gm.weights
    assert ((freq - w).abs() < 5 * torch.sqrt(w * (1 - w) / n)).all()
    for k in range(gm.num_components):
        xk = x[labels == k]
        assert ((xk.mean(0) - gm.means[k]).abs() < 5 * xk.std(0) / math.sqrt(len(xk))).all()


def test_sample_determinism_dtype_and_device() -> None:
    gm = GaussianMixture.ring()
    a = gm.sample(100, generator=gen(21), dtype=torch.float64)
    b = gm.sample(100, generator=gen(21), dtype=torch.float64)
    c = gm.sample(100, generator=gen(21), dtype=torch.float32, device="cpu")
    assert torch.equal(a, b)
    assert c.dtype == torch.float32 and torch.equal(c, a.float())
    assert not torch.equal(a, gm.sample(100, generator=gen(22), dtype=torch.float64))
    assert gm.sample(5).dtype == torch.get_default_dtype()


def test_sample_singular_component_lies_on_subspace() -> None:
    covs = torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64))[None]
    x = GaussianMixture([1.0], [[0.0, 2.0]], covs).sample(1000, generator=gen(23), dtype=torch.float64)
    assert torch.all(x[:, 1] == 2.0) and x[:, 0].std() > 0.5


# --- validation ---------------------------------------------------------------------------------------------
EYE2 = torch.eye(2).expand(2, 2, 2)


@pytest.mark.parametrize(("args", "name"), [
    (([1.0, -1.0], torch.zeros(2, 2), EYE2), "weights"),
    (([[1.0, 1.0]], torch.zeros(2, 2), EYE2), "weights"),
    (([1.0, float("nan")], torch.zeros(2, 2), EYE2), "weights"),
    (([1.0, 1.0], torch.zeros(3, 2), EYE2), "means"),
    (([1.0, 1.0], torch.zeros(2), EYE2), "means"),
    (([1.0, 1.0], torch.zeros(2, 2), torch.eye(3).expand(2, 3, 3)), "covs"),
    (([1.0, 1.0], torch.zeros(2, 2), torch.tensor([[[1.0, 0.5], [0.0, 1.0]]] * 2)), "covs"),
    (([1.0, 1.0], torch.zeros(2, 2), torch.tensor([[[1.0, 2.0], [2.0, 1.0]]] * 2)), "covs"),
])
def test_invalid_parameters_raise(args: tuple, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        GaussianMixture(*args)


def test_invalid_types_raise() -> None:
    with pytest.raises(TypeError, match="weights"):
        GaussianMixture("abc", torch.zeros(1, 2), torch.eye(2)[None])
    with pytest.raises(TypeError, match="covs"):
        GaussianMixture([1.0], torch.zeros(1, 2), torch.eye(2, dtype=torch.complex64)[None])


def test_invalid_call_arguments_raise(gm: GaussianMixture) -> None:
    sde = VPStandIn()
    x = torch.zeros(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="x must have shape"):
        gm.log_prob(torch.zeros(4, 5))
    with pytest.raises(ValueError, match="x must have shape"):
        gm.log_prob(torch.zeros(3))
    with pytest.raises(TypeError, match="x must be"):
        gm.log_prob(torch.zeros(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="t must be"):
        gm.score(x, torch.zeros(3), sde)
    with pytest.raises(ValueError, match="t must be"):
        gm.score(x, torch.zeros(4, 1), sde)
    with pytest.raises(TypeError, match="t must be"):
        gm.score(x, "0.5", sde)
    with pytest.raises(ValueError, match="together"):
        gm.log_prob(x, sde)
    with pytest.raises(ValueError, match="together"):
        gm.component_posterior(x, 0.5)
    with pytest.raises(ValueError, match="t must be a scalar"):
        gm.marginal(sde, torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="n must be"):
        gm.sample(0)
    with pytest.raises(TypeError, match="sde"):
        gm.score_fn(object())
    with pytest.raises(ValueError, match="dim"):
        GaussianMixture.ring(dim=1)
