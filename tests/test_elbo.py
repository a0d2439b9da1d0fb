"""The continuous-time evidence bound `sdediff.elbo` against analytic truth (issue 8).

* Gaussian data N(0, V I) with the exact score: the mean bound has a closed form (test_losses' notes).
* Gaussian-mixture data with the exact score: the model is not p_0 itself (prior mismatch at T, decoder blur),
  but E_p0[bound] >= E_p0[-log p_theta] >= E_p0[-log p_0] (cross-entropy >= entropy), and the gap is small.
* Discrete data (point masses on an L-level grid, a GaussianMixture with zero covariances, exact score): the
  discrete-decoder bound must bound the entropy H of the level distribution, and be close to it.
"""

import math

import pytest
import torch
from problems import MIXTURE, SDES, T64, V, exact_model, gaussian_data, gen, kernel

import sdediff
from sdediff.data import GaussianMixture

LEVELS = 8
LEVEL_POINTS = torch.tensor([[1, 2], [5, 5], [3, 6], [7, 0]])
LEVEL_WEIGHTS = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=T64)


def test_nll_bound_is_the_gaussian_decoder_elbo():
    """sdediff.training.nll_bound is a wrapper of the same bound: identical draws for the same generator."""
    sde = sdediff.VPSDE()
    x = gaussian_data(64, seed=32)
    bound = sdediff.training.nll_bound(sde, exact_model(sde), x, prediction="score", t_eps=1e-3, num_t=4,
                                       generator=gen(33))
    res = sdediff.elbo(sde, exact_model(sde), x, t_eps=1e-3, num_t=4, generator=gen(33))
    assert torch.equal(bound, res.nats)


@pytest.mark.parametrize("name", sorted(SDES))
def test_mean_bound_for_gaussian_data_is_exact(name):
    sde, d, t_eps = SDES[name](), 3, 1e-3
    x = gaussian_data(3000, seed=30)
    res = sdediff.elbo(sde, exact_model(sde), x, t_eps=t_eps, num_t=8, generator=gen(31))
    (m_e, s_e, _), (m_T, s_T, _) = kernel(sde, t_eps), kernel(sde, sde.T)
    sig_e, sig_T, var_pi = m_e**2 * V + s_e**2, m_T**2 * V + s_T**2, float(sde.prior_std) ** 2
    truth = 0.5 * d * (math.log(2 * math.pi * sig_e / m_e**2) + sig_T / var_pi + math.log(var_pi / sig_T))
    mean, se = res.mean()
    assert abs(mean - truth) < 4 * se, (mean, truth, se)
    torch.testing.assert_close(res.nats, res.prior + res.diffusion + res.reconstruction)
    torch.testing.assert_close(res.bits_per_dim, res.nats / (d * math.log(2)))
    assert res.num_dims == d and (res.std_error > 0).all()


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_bound_bounds_the_exact_nll_of_a_mixture(name):
    """Mean bound >= mean exact -log p_0 within Monte Carlo error, and the gap is small (< 0.25 nats in 2-D)."""
    sde, n = SDES[name](), 4000
    x = MIXTURE.sample(n, generator=gen(32), dtype=T64)
    res = sdediff.elbo(sde, MIXTURE.score_fn(sde), x, t_eps=1e-5 if name != "ve" else 1e-3, num_t=8,
                       generator=gen(33))
    gap = res.nats + MIXTURE.log_prob(x)
    mean, se = float(gap.mean()), float(gap.std() / math.sqrt(n))
    assert mean > -3 * se, (mean, se)
    assert mean < 0.25 + 3 * se, (mean, se)
    worse = sdediff.elbo(sde, lambda x, t: 0.8 * MIXTURE.score(x, t, sde), x, t_eps=1e-5 if name != "ve" else 1e-3,
                         num_t=8, generator=gen(33))
    excess = worse.nats - res.nats  # paired: the same times and noise
    assert float(excess.mean()) > 4 * float(excess.std() / math.sqrt(n))


def test_importance_sampling_lowers_the_standard_error():
    sde = sdediff.VPSDE()
    x = MIXTURE.sample(1000, generator=gen(34), dtype=T64)
    kw = dict(t_eps=1e-5, num_t=8)
    imp = sdediff.elbo(sde, MIXTURE.score_fn(sde), x, t_sampling="importance", generator=gen(35), **kw)
    uni = sdediff.elbo(sde, MIXTURE.score_fn(sde), x, t_sampling="uniform", generator=gen(35), **kw)
    assert float(imp.std_error.pow(2).mean().sqrt()) < 0.75 * float(uni.std_error.pow(2).mean().sqrt())


def test_discrete_decoder_bounds_the_entropy_of_quantised_data():
    sde, n = sdediff.VPSDE(), 3000
    centres = (-1 + 2 * (LEVEL_POINTS + 0.5) / LEVELS).to(T64)
    points = GaussianMixture(LEVEL_WEIGHTS, centres, torch.zeros(4, 2, 2, dtype=T64))
    k = LEVEL_POINTS[torch.multinomial(LEVEL_WEIGHTS, n, replacement=True, generator=gen(36))]
    entropy = float(-(LEVEL_WEIGHTS * LEVEL_WEIGHTS.log()).sum())
    res = sdediff.elbo(sde, points.score_fn(sde), k, decoder="discrete", levels=LEVELS, num_t=8, generator=gen(37))
    mean, se = res.mean()
    assert entropy - 3 * se < mean < entropy + 0.05 + 3 * se, (mean, se, entropy)
    torch.testing.assert_close(res.bits_per_dim, res.nats / (2 * math.log(2)))
    # bins twice too wide for the data: the decoder still finds the level, a score for the wrong grid does not
    assert float(res.reconstruction.max()) < 1e-3
    wrong = sdediff.elbo(sde, points.score_fn(sde), (k + 1) % LEVELS, decoder="discrete", levels=LEVELS, num_t=4,
                         generator=gen(37))
    assert wrong.mean()[0] > mean + 10


def test_bits_per_dim_of_dequantised_levels_and_float32():
    sde = sdediff.VPSDE()
    x = gaussian_data(64, shape=(2, 2), seed=38).float()
    res = sdediff.elbo(sde, exact_model(sde), x, levels=17, generator=gen(39))
    assert res.nats.dtype == torch.float32 and res.nats.shape == (64,)
    torch.testing.assert_close(res.bits_per_dim, sdediff.data.bits_per_dim_levels(-res.nats, 4, 17, 2.0))


def test_bad_arguments():
    sde = sdediff.VPSDE()
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="num_t"):
        sdediff.elbo(sde, exact_model(sde), x, num_t=1)
    with pytest.raises(ValueError, match="decoder"):
        sdediff.elbo(sde, exact_model(sde), x, decoder="laplace")
    with pytest.raises(ValueError, match="levels"):
        sdediff.elbo(sde, exact_model(sde), x, decoder="discrete")
    with pytest.raises(ValueError, match="integer levels"):
        sdediff.elbo(sde, exact_model(sde), x + 0.5, decoder="discrete", levels=4)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        sdediff.elbo(sde, exact_model(sde), x + 4, decoder="discrete", levels=4)
    with pytest.raises(TypeError, match="floating"):
        sdediff.elbo(sde, exact_model(sde), x.long())
    with pytest.raises(ValueError, match="t_sampling"):
        sdediff.elbo(sde, exact_model(sde), x, t_sampling="sobol")
    with pytest.raises(TypeError, match="LinearSDE"):
        sdediff.elbo(object(), exact_model(sde), x)


def test_any_t_eps_works_with_importance_sampling():
    """Regression: a t_eps whose 10**log10 round-trip misses it by an ulp gave a zero-width table cell."""
    sde = sdediff.VPSDE()
    for t_eps in (0.0021234567891, 3.3e-4, 0.01234):
        t, w = sdediff.training.sample_time(sde, 1000, t_sampling="importance", t_eps=t_eps, generator=gen(60),
                                            dtype=T64)
        assert (t >= t_eps).all() and (t <= 1).all() and torch.isfinite(w).all()
        assert abs(float(w.mean()) - 1) < 0.1  # E_q[w] = 1
