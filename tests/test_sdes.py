"""Forward SDEs against their closed forms (docs/concepts.md, Forward SDEs and their kernels)."""

import math

import numpy as np
import pytest
import torch
from problems import T64, gen

import sdediff
from sdediff.sdes import gaussian_log_prob


def times(n=33, lo=0.0, hi=1.0):
    return torch.linspace(lo, hi, n, dtype=T64)


def test_vp_closed_form():
    sde = sdediff.VPSDE(beta_min=0.1, beta_max=20.0)
    t = times()
    tn = t.numpy()
    m = np.exp(-0.25 * tn**2 * 19.9 - 0.5 * tn * 0.1)
    torch.testing.assert_close(sde.mean_coeff(t), torch.from_numpy(m), rtol=1e-12, atol=0)
    torch.testing.assert_close(sde.marginal_std(t), torch.from_numpy(np.sqrt(1 - m**2)), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(sde.diffusion(t), torch.from_numpy(np.sqrt(0.1 + tn * 19.9)))
    x = torch.randn(33, 3, generator=gen(0), dtype=T64)
    torch.testing.assert_close(sde.drift(x, t), -0.5 * (0.1 + t * 19.9)[:, None] * x)
    assert sde.prior_std == 1.0 and sde.T == 1.0


def test_subvp_closed_form():
    sde = sdediff.SubVPSDE()
    t = times()
    m = sde.mean_coeff(t)
    torch.testing.assert_close(m, sdediff.VPSDE().mean_coeff(t))
    torch.testing.assert_close(sde.marginal_std(t), 1 - m**2)
    torch.testing.assert_close(sde.diffusion(t) ** 2, sde.beta(t) * (1 - m**4))
    assert (sde.marginal_std(t) <= sdediff.VPSDE().marginal_std(t) + 1e-15).all()


def test_ve_closed_form():
    sde = sdediff.VESDE(sigma_min=0.01, sigma_max=50.0)
    t = times()
    sigma = 0.01 * (5000.0 ** t)
    torch.testing.assert_close(sde.marginal_std(t), sigma)
    torch.testing.assert_close(sde.mean_coeff(t), torch.ones_like(t))
    torch.testing.assert_close(sde.diffusion(t), sigma * math.sqrt(2 * math.log(5000.0)))
    x = torch.randn(33, 2, generator=gen(1), dtype=T64)
    assert (sde.drift(x, t) == 0).all()
    assert sde.prior_std == 50.0


@pytest.mark.parametrize("make", [sdediff.VPSDE, sdediff.SubVPSDE, sdediff.VESDE])
def test_kernel_solves_its_moment_odes(make):
    """m' = a m and d(s^2)/dt = 2 a s^2 + g^2, checked by autograd on the closed forms."""
    sde = make()
    t = times(17, 0.01, 0.99).requires_grad_(True)
    m, s2 = sde.mean_coeff(t) + 0 * t, sde.marginal_std(t) ** 2  # (+0*t: VE's m is constant)
    dm = torch.autograd.grad(m.sum(), t)[0]
    ds2 = torch.autograd.grad(s2.sum(), t)[0]
    a, g = sde.drift_coef(t), sde.diffusion(t)
    torch.testing.assert_close(dm, (a * m).detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ds2, (2 * a * s2 + g**2).detach(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("make", [sdediff.VPSDE, sdediff.SubVPSDE, sdediff.VESDE])
def test_numerical_kernel_matches_closed_form(make):
    """A LinearSDE given only a(t), g(t) (and s(0)) integrates the same kernel to 1e-6 (in fact ~1e-10)."""
    ref = make()
    numeric = sdediff.LinearSDE(drift_coef=ref.drift_coef, diffusion=ref.diffusion,
                                initial_std=float(ref.marginal_std(torch.zeros(1, dtype=T64))))
    t = torch.cat([torch.tensor([0.0, 1e-5, 1e-3]), torch.rand(200, generator=gen(2)), torch.tensor([1.0])]).to(T64)
    m_err = (numeric.mean_coeff(t) - ref.mean_coeff(t)).abs().max()
    s_ref = ref.marginal_std(t)
    s_err = ((numeric.marginal_std(t) - s_ref).abs() / s_ref.clamp_min(1e-3)).max()
    assert m_err < 1e-8 and s_err < 1e-6, (m_err, s_err)
    # float32 evaluation uses the same table
    t32 = t.float()
    torch.testing.assert_close(numeric.mean_coeff(t32), ref.mean_coeff(t32), rtol=1e-5, atol=1e-6)


def test_custom_linear_sde_subclass():
    """A LinearSDE subclass defining only drift_coef and diffusion: OU with its known kernel."""
    theta, sigma = 1.5, 0.8

    class OU(sdediff.LinearSDE):
        def drift_coef(self, t):
            return torch.full_like(t, -theta)

        def diffusion(self, t):
            return torch.full_like(t, sigma)

    sde = OU(T=2.0)
    t = times(41, 0.0, 2.0)
    torch.testing.assert_close(sde.mean_coeff(t), torch.exp(-theta * t), rtol=1e-9, atol=1e-12)
    var = sigma**2 / (2 * theta) * (1 - torch.exp(-2 * theta * t))
    torch.testing.assert_close(sde.marginal_std(t) ** 2, var, rtol=1e-8, atol=1e-12)
    assert abs(sde.prior_std - math.sqrt(var[-1].item())) < 1e-9


def test_shapes_scalar_time_and_dtype(sde):
    for shape in [(4,), (4, 3), (4, 2, 5), (4, 1, 3, 3)]:
        x = torch.randn(shape, generator=gen(3))
        assert sde.drift(x, torch.full((4,), 0.3)).shape == x.shape
        assert sde.drift(x, 0.3).shape == x.shape  # scalar time broadcast
        mean, std = sde.marginal(x, torch.full((4,), 0.3))
        assert mean.shape == x.shape and std.shape == (4,) and mean.dtype == torch.float32
        z = sde.prior_sample(shape, generator=gen(4), dtype=T64)
        assert z.dtype == T64 and z.shape == shape
        assert sde.prior_log_prob(z).shape == (4,)
    with pytest.raises(ValueError, match="batch"):
        sde.drift(torch.zeros(4, 2), torch.zeros(3))


def test_prior_log_prob_is_gaussian(sde):
    z = sde.prior_sample((64, 3), generator=gen(5), dtype=T64)
    ref = torch.distributions.Normal(0.0, sde.prior_std).log_prob(z).sum(1)
    torch.testing.assert_close(sde.prior_log_prob(z), ref)
    assert abs(z.std().item() / sde.prior_std - 1) < 0.15


def test_transition_is_exact_and_composes(sde):
    """The exact step t-dt -> t composes: two half steps give the kernel of the whole step."""
    t, dt = torch.full((3,), 0.7, dtype=T64), torch.full((3,), 0.2, dtype=T64)
    r, sig = sde.transition(t, dt)
    r1, sig1 = sde.transition(t - 0.1, torch.full_like(t, 0.1))
    r2, sig2 = sde.transition(t, torch.full_like(t, 0.1))
    torch.testing.assert_close(r, r1 * r2)
    torch.testing.assert_close(sig**2, r2**2 * sig1**2 + sig2**2)
    # with the kernel from 0: m(t) = r m(t-dt), s(t)^2 = r^2 s(t-dt)^2 + sigma^2
    torch.testing.assert_close(sde.mean_coeff(t), r * sde.mean_coeff(t - dt))
    torch.testing.assert_close(sde.marginal_std(t) ** 2, r**2 * sde.marginal_std(t - dt) ** 2 + sig**2)


def test_vp_discrete_step_is_ddpm():
    """VP's exact step is DDPM's x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z with 1 - beta_i = alpha_i."""
    sde = sdediff.VPSDE()
    t, dt = torch.tensor([0.5], dtype=T64), torch.tensor([1e-3], dtype=T64)
    x = torch.randn(1, 4, generator=gen(6), dtype=T64)
    f, G = sde.discretize(x, t, dt)
    alpha = sde.discrete_alpha(t, dt)
    beta_i = 1 - alpha
    torch.testing.assert_close(x + f, alpha.sqrt() * x)
    torch.testing.assert_close(G, beta_i.sqrt())
    # and beta_i ~ beta(t) dt to first order
    assert abs(beta_i.item() / (sde.beta(t).item() * 1e-3) - 1) < 1e-2


def test_ve_discrete_step_is_smld():
    sde = sdediff.VESDE()
    t, dt = torch.tensor([0.5], dtype=T64), torch.tensor([0.01], dtype=T64)
    f, G = sde.discretize(torch.ones(1, 2, dtype=T64), t, dt)
    assert (f == 0).all()
    torch.testing.assert_close(G**2, sde.sigma(t) ** 2 - sde.sigma(t - dt) ** 2)
    assert sde.discrete_alpha(t, dt).item() == 1.0


def test_tweedie_denoise_on_gaussian_data(sde):
    """For data N(0, v I), E[x0 | x_t] = m v / (m^2 v + s^2) x_t exactly."""
    v = 0.3
    x = torch.randn(8, 2, generator=gen(7), dtype=T64)
    t = torch.full((8,), 0.2, dtype=T64)
    m, s = sde.mean_coeff(t)[:, None], sde.marginal_std(t)[:, None]
    score = -x / (m**2 * v + s**2)
    torch.testing.assert_close(sde.denoise(x, t, score), m * v / (m**2 * v + s**2) * x)


def test_log_snr_decreasing(sde):
    lam = sde.log_snr(times(50, 1e-3, 1.0))
    assert (lam[1:] < lam[:-1]).all()


@pytest.mark.parametrize("kwargs", [dict(beta_min=-0.1), dict(beta_min=2.0, beta_max=1.0), dict(T=0.0), dict(T=-1),
                                    dict(beta_min=True), dict(beta_max=float("nan")), dict(beta_max=float("inf")),
                                    dict(T=True)])
def test_vp_rejects_bad_parameters(kwargs):
    with pytest.raises(TypeError if any(isinstance(v, bool) for v in kwargs.values()) else ValueError):
        sdediff.VPSDE(**kwargs)


@pytest.mark.parametrize("cls", [sdediff.VPSDE, sdediff.SubVPSDE])
def test_beta_min_above_beta_max_is_refused(cls):
    with pytest.raises(ValueError, match="beta_min must not exceed beta_max, got beta_min=2 > beta_max=1"):
        cls(beta_min=2.0, beta_max=1.0)
    assert cls(beta_min=1.0, beta_max=1.0).beta_max == 1.0  # a constant rate is allowed


@pytest.mark.parametrize("kwargs", [dict(sigma_min=0.0), dict(sigma_min=5.0, sigma_max=1.0), dict(T=float("nan")),
                                    dict(sigma_min=True), dict(sigma_min=float("nan")), dict(sigma_max=float("nan")),
                                    dict(sigma_max=float("inf")), dict(sigma_min=1.0, sigma_max=1.0)])
def test_ve_rejects_bad_parameters(kwargs):
    with pytest.raises(TypeError if any(isinstance(v, bool) for v in kwargs.values()) else ValueError,
                       match="sigma_m|T must"):
        sdediff.VESDE(**kwargs)


def test_linear_sde_without_schedule_explains():
    with pytest.raises(NotImplementedError, match="drift_coef"):
        sdediff.LinearSDE().drift(torch.zeros(2, 1), torch.zeros(2))
    with pytest.raises(TypeError, match="diffusion"):
        sdediff.LinearSDE(diffusion=3.0)


def test_general_sde_has_no_marginal_but_discretizes_with_euler_maruyama():
    class Cubic(sdediff.SDE):
        def drift(self, x, t):
            return -(x**3)

        def diffusion(self, t):
            return torch.ones_like(t)

        def prior_sample(self, shape, generator=None, device=None, dtype=None):
            return torch.randn(shape, generator=generator, device=device, dtype=dtype)

        def prior_log_prob(self, z):
            return gaussian_log_prob(z, 1.0)

    sde = Cubic()
    x = torch.randn(5, 2, generator=gen(8), dtype=T64)
    t, dt = torch.full((5,), 0.5, dtype=T64), torch.full((5,), 0.01, dtype=T64)
    f, G = sde.discretize(x, t, dt)
    torch.testing.assert_close(f, -(x**3) * 0.01)
    torch.testing.assert_close(G, torch.full((5,), 0.1, dtype=T64))
    with pytest.raises(NotImplementedError, match="LinearSDE"):
        sde.marginal(x, t)
    with pytest.raises(TypeError):
        sdediff.SDE()  # abstract


def test_numerical_kernel_clamps_times_outside_the_table():
    vp = sdediff.VPSDE()
    numeric = sdediff.LinearSDE(drift_coef=vp.drift_coef, diffusion=vp.diffusion)
    t = torch.tensor([-0.5, 0.0, 1.0, 5.2], dtype=T64)
    m = numeric.mean_coeff(t)
    assert torch.isfinite(m).all() and m[0] == m[1] and m[2] == m[3]


@pytest.mark.parametrize("t", [1.5, -0.1, torch.tensor([0.5, 1.2])])
def test_times_outside_0_T_are_rejected_at_the_entry_points(t):
    from sdediff.data import GaussianMixture

    sde = sdediff.VPSDE()
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"t must lie in \[0, T=1\]"):
        sde.marginal(x, t)
    with pytest.raises(ValueError, match=r"t must lie in \[0, T=1\]"):
        sde.denoise(x, t, x)
    with pytest.raises(ValueError, match=r"t must lie in \[0, T=1\]"):
        GaussianMixture.ring(2).score(x, t, sde)
    with pytest.raises(ValueError, match=r"t must lie in \[0, T=1\]"):
        sdediff.dsm_loss(sde, lambda x, t: x, x, t=t)
    sde.marginal(x, 1.0)  # both ends are allowed
    sde.marginal(x, 0.0)
