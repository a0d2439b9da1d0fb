"""The denoising score-matching loss against analytic truth (docs/training.md, The loss).

Truth used here: for data N(0, v I) in D dimensions and the kernel x = m x0 + s eps, the noisy marginal is
N(0, sigma^2 I) with sigma^2 = m^2 v + s^2, the exact score is -x / sigma^2, and

    E || s*(x) + eps/s ||^2 = D / s^2 - D / sigma^2 = D m^2 v / (s^2 sigma^2)

(expand s* + eps/s = -m x0 / sigma^2 + eps (1/s - s/sigma^2)). Since d/dt log(s^2/m^2) = g^2/s^2 and
d/dt log(sigma^2/m^2) = g^2/sigma^2, the likelihood-weighted integral is closed-form too:

    int_a^b g^2 E||s* + eps/s||^2 dt = D [log(s^2/m^2) - log(sigma^2/m^2)]_a^b.
"""

import math

import pytest
import torch
from problems import T64, V, exact_model, gaussian_data, gen, kernel

import sdediff
from sdediff import score as sc
from sdediff.training import MLP, dsm_loss, nll_bound, sample_time
from sdediff.training.losses import importance_table


def mean_se(x):
    return float(x.mean()), float(x.std() / math.sqrt(len(x)))


@pytest.mark.parametrize("t", [0.01, 0.3, 0.9])
@pytest.mark.parametrize("weighting", ["simple", "likelihood"])
def test_per_time_loss_at_exact_score_equals_analytic_minimum(sde, t, weighting):
    d, n = 3, 20000
    x0 = gaussian_data(n)
    loss = dsm_loss(sde, exact_model(sde), x0, prediction="score", weighting=weighting, t=t, reduce_mean=False,
                    reduction="none", generator=gen(1))
    m, s, g = kernel(sde, t)
    sigma2 = m**2 * V + s**2
    lam = s**2 if weighting == "simple" else g**2
    truth = lam * d * m**2 * V / (s**2 * sigma2)
    mean, se = mean_se(loss)
    assert abs(mean - truth) < 4 * se, (mean, truth, se)


@pytest.mark.parametrize("t", [0.05, 0.5])
def test_any_perturbed_score_gives_a_larger_loss(sde, t):
    x0 = gaussian_data(20000)
    h = torch.tensor([0.3, -0.2, 0.1], dtype=T64)
    base = dsm_loss(sde, exact_model(sde), x0, prediction="score", t=t, reduce_mean=False, reduction="none",
                    generator=gen(2))
    worse = dsm_loss(sde, exact_model(sde, shift=h), x0, prediction="score", t=t, reduce_mean=False,
                     reduction="none", generator=gen(2))  # same t and noise: paired
    _, s, _ = kernel(sde, t)
    mean, se = mean_se(worse - base)
    truth = s**2 * float(h.pow(2).sum())  # lambda ||h||^2, the cross term has mean zero
    assert mean > 0 and abs(mean - truth) < 4 * se + 1e-12, (mean, truth, se)
    assert float(worse.mean()) > float(base.mean())


@pytest.mark.parametrize("weighting", ["simple", "likelihood"])
def test_every_prediction_gives_the_same_loss_for_the_same_score(sde, weighting):
    x0 = gaussian_data(256)
    t = 0.02 + 0.97 * torch.rand(256, generator=gen(3), dtype=T64)
    noise = torch.randn(x0.shape, generator=gen(4), dtype=T64)
    losses = {p: dsm_loss(sde, exact_model(sde, p, shift=0.1), x0, prediction=p, weighting=weighting, t=t,
                          noise=noise, reduction="none") for p in sc.PREDICTIONS}
    for p, value in losses.items():
        torch.testing.assert_close(value, losses["eps"], rtol=1e-8, atol=1e-10, msg=p)


def test_simple_loss_is_the_eps_mse():
    sde = sdediff.VPSDE()
    x0, noise = gaussian_data(64), torch.randn(64, 3, generator=gen(5), dtype=T64)
    t = torch.rand(64, generator=gen(6), dtype=T64) * 0.9 + 0.05

    def net(x, t):
        return torch.sin(x) + t[:, None]

    loss = dsm_loss(sde, net, x0, t=t, noise=noise)
    m, s = sde.mean_coeff(t)[:, None], sde.marginal_std(t)[:, None]
    truth = (net(m * x0 + s * noise, t) - noise).pow(2).mean()
    torch.testing.assert_close(loss, truth, rtol=1e-12, atol=0)


@pytest.mark.parametrize("shape", [(), (3,), (2, 3, 4)])
def test_any_tensor_shape(shape):
    sde = sdediff.SubVPSDE()
    d = math.prod(shape)
    x0 = torch.randn(8, *shape, generator=gen(7), dtype=T64)
    noise = torch.randn(x0.shape, generator=gen(8), dtype=T64)
    t = torch.linspace(0.1, 0.9, 8, dtype=T64)
    net = exact_model(sde, "eps", shift=0.2)
    per_mean = dsm_loss(sde, net, x0, t=t, noise=noise, reduction="none")
    per_sum = dsm_loss(sde, net, x0, t=t, noise=noise, reduction="none", reduce_mean=False)
    flat = dsm_loss(sde, lambda x, t: net(x.reshape(x0.shape), t).reshape(8, -1), x0.reshape(8, -1), t=t,
                    noise=noise.reshape(8, -1), reduction="none")
    assert per_mean.shape == (8,)
    torch.testing.assert_close(per_sum, d * per_mean)
    torch.testing.assert_close(flat, per_mean)
    torch.testing.assert_close(dsm_loss(sde, net, x0, t=t, noise=noise), per_mean.mean())
    torch.testing.assert_close(dsm_loss(sde, net, x0, t=t, noise=noise, reduction="sum"), per_mean.sum())


def test_importance_sampling_is_unbiased_and_has_lower_variance():
    sde, d, t_eps, n = sdediff.VPSDE(), 3, 1e-3, 40000
    x0 = gaussian_data(n, seed=9)
    net = exact_model(sde)
    kw = {"prediction": "score", "weighting": "likelihood", "t_eps": t_eps, "reduce_mean": False, "reduction": "none"}
    uniform = dsm_loss(sde, net, x0, t_sampling="uniform", generator=gen(10), **kw)
    importance = dsm_loss(sde, net, x0, t_sampling="importance", generator=gen(11), **kw)
    (m_a, s_a, _), (m_b, s_b, _) = kernel(sde, t_eps), kernel(sde, sde.T)
    gamma_s = math.log(s_b**2 / m_b**2) - math.log(s_a**2 / m_a**2)
    gamma_sigma = math.log((m_b**2 * V + s_b**2) / m_b**2) - math.log((m_a**2 * V + s_a**2) / m_a**2)
    truth = d * (gamma_s - gamma_sigma) / (sde.T - t_eps)  # the time average of g^2 E||s* + eps/s||^2
    for est in (uniform, importance):
        mean, se = mean_se(est)
        assert abs(mean - truth) < 4 * se, (mean, truth, se)
    assert importance.var() < 0.2 * uniform.var()


def test_importance_times_follow_the_log_snr():
    sde, t_eps = sdediff.VPSDE(), 1e-4
    t, w = sample_time(sde, 50000, t_sampling="importance", t_eps=t_eps, generator=gen(12), dtype=T64)
    assert float(t.min()) >= t_eps and float(t.max()) <= sde.T
    # CDF of q ∝ g^2/s^2 is the normalised -log SNR
    grid = torch.tensor([1e-3, 1e-2, 0.1, 0.3, 0.6, 0.9], dtype=T64)
    gamma = -sde.log_snr(torch.cat([torch.tensor([t_eps, sde.T], dtype=T64), grid]))
    cdf = (gamma[2:] - gamma[0]) / (gamma[1] - gamma[0])
    empirical = (t[:, None] <= grid).double().mean(0)
    assert float((empirical - cdf).abs().max()) < 0.01
    # the weight makes w * g^2/s^2 constant: Z / (T - t_eps)
    z = float(gamma[1] - gamma[0])
    ratio = w * (sde.diffusion(t) / sde.marginal_std(t)) ** 2 / (z / (sde.T - t_eps))
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=3e-3, atol=0)


def test_importance_sampling_for_ve_is_uniform():
    # for VE, g^2/s^2 = 2 log(sigma_max/sigma_min) is constant: q is uniform and every weight is 1
    t, w = sample_time(sdediff.VESDE(), 1000, t_sampling="importance", t_eps=1e-5, generator=gen(13), dtype=T64)
    torch.testing.assert_close(w, torch.ones_like(w), rtol=1e-9, atol=0)
    grid, cdf, _ = importance_table(sdediff.VESDE(), 1e-5)
    torch.testing.assert_close(cdf, (grid - 1e-5) / (1 - 1e-5), rtol=0, atol=1e-9)


def test_nll_bound_at_the_exact_score(sde):
    d, n, t_eps = 3, 4000, 1e-3
    x0 = gaussian_data(n, seed=14)
    bound = nll_bound(sde, exact_model(sde), x0, prediction="score", t_eps=t_eps, num_t=8, generator=gen(15))
    (m_e, s_e, _), (m_T, s_T, _) = kernel(sde, t_eps), kernel(sde, sde.T)
    sig_e, sig_T, var_pi = m_e**2 * V + s_e**2, m_T**2 * V + s_T**2, float(sde.prior_std) ** 2
    truth = 0.5 * d * (math.log(2 * math.pi * sig_e / m_e**2) + sig_T / var_pi + math.log(var_pi / sig_T))
    mean, se = mean_se(bound)
    assert abs(mean - truth) < 4 * se, (mean, truth, se)
    entropy = 0.5 * d * math.log(2 * math.pi * math.e * V)
    assert truth >= entropy
    worse = nll_bound(sde, exact_model(sde, shift=0.5), x0, prediction="score", t_eps=t_eps, num_t=8, generator=gen(15))
    assert float(worse.mean()) > mean + 4 * se


def test_gradients_flow_and_score_model_is_unwrapped():
    sde = sdediff.VPSDE()
    net = MLP(dim=4, hidden=32, depth=2)
    x0 = torch.randn(16, 4, generator=gen(16))
    loss = dsm_loss(sde, net, x0, weighting="likelihood", t_sampling="importance", generator=gen(17))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    wrapped = sc.ScoreModel(net, sde, prediction="x0")
    a = dsm_loss(sde, wrapped, x0, generator=gen(18))
    b = dsm_loss(sde, net, x0, prediction="x0", generator=gen(18))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="contradicts"):
        dsm_loss(sde, wrapped, x0, prediction="eps")


def test_conditioning_and_time_input_reach_the_network():
    sde, seen = sdediff.VPSDE(), {}

    def net(x, t, y):
        seen["t"], seen["y"] = t, y
        return torch.zeros_like(x)

    y = torch.arange(4)
    dsm_loss(sde, net, torch.zeros(4, 2), cond=y, time_input=lambda t: 999 * t, t=0.5)
    assert torch.equal(seen["y"], y) and torch.allclose(seen["t"], torch.full((4,), 499.5))


def test_bad_arguments_raise_clear_errors():
    sde, x0 = sdediff.VPSDE(), torch.zeros(4, 2)

    def net(x, t):
        return x

    with pytest.raises(ValueError, match="weighting"):
        dsm_loss(sde, net, x0, weighting="snr")
    with pytest.raises(ValueError, match="t_sampling"):
        dsm_loss(sde, net, x0, t_sampling="beta")
    with pytest.raises(ValueError, match="prediction"):
        dsm_loss(sde, net, x0, prediction="noise")
    with pytest.raises(ValueError, match="reduction"):
        dsm_loss(sde, net, x0, reduction="max")
    with pytest.raises(ValueError, match="t_eps"):
        dsm_loss(sde, net, x0, t_eps=0.0)
    with pytest.raises(TypeError, match="x0"):
        dsm_loss(sde, net, torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="shaped like x0"):
        dsm_loss(sde, lambda x, t: x[:, :1], x0)
    with pytest.raises(ValueError, match="noise"):
        dsm_loss(sde, net, x0, noise=torch.zeros(3, 2))
    with pytest.raises(TypeError, match="model"):
        dsm_loss(sde, "net", x0)

    class NotLinear(sdediff.SDE):
        def drift(self, x, t):
            return -x**3

        def diffusion(self, t):
            return torch.ones_like(t)

        def prior_sample(self, shape, generator=None, device=None, dtype=None):
            return torch.randn(shape)

        def prior_log_prob(self, z):
            return z.sum(1)

    with pytest.raises(TypeError, match="linear SDE"):
        dsm_loss(NotLinear(), net, x0)
    with pytest.raises(ValueError, match="n must"):
        sample_time(sde, 0)
