"""sdediff.check_sde: consistent SDEs pass, and each kind of inconsistency is caught and named."""

import math

import numpy as np
import pytest
import torch
from problems import gen

import sdediff
from sdediff.data import GaussianMixture
from sdediff.interop.diffusers import DiscreteVPSDE
from sdediff.sdes import gaussian_log_prob

T64 = torch.float64


def check(sde, **kw):
    return sdediff.check_sde(sde, generator=gen(0), **kw)


def failed(result):
    return {f.quantity for f in result.failures}


# --- SDEs that are consistent ----------------------------------------------------------------------------------------
class OU(sdediff.SDE):
    """The Ornstein–Uhlenbeck example of sdediff.SDE's docstring."""

    def __init__(self, theta=1.0, sigma=1.0, T=3.0):
        super().__init__(T=T)
        self.theta, self.sigma = theta, sigma

    def drift(self, x, t):
        return -self.theta * x

    def diffusion(self, t):
        return torch.full_like(t, self.sigma)

    def prior_sample(self, shape, generator=None, device=None, dtype=None):
        std = self.sigma / (2 * self.theta) ** 0.5
        return std * torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def prior_log_prob(self, z):
        return gaussian_log_prob(z, self.sigma / (2 * self.theta) ** 0.5)


class DeclaredOU(OU):
    """OU towards ``centre`` (an affine drift) with its exact Gaussian kernel declared through ``marginal``."""

    def __init__(self, centre=0.0, std_factor=1.0, T=3.0):
        super().__init__(T=T)
        self.centre, self.std_factor = centre, std_factor

    def drift(self, x, t):
        return -self.theta * (x - self.centre)

    def marginal(self, x0, t):
        t = torch.as_tensor(t, dtype=x0.dtype).expand(x0.shape[0])
        decay = torch.exp(-self.theta * t).reshape(-1, *[1] * (x0.dim() - 1))
        var = self.sigma**2 / (2 * self.theta) * -torch.expm1(-2 * self.theta * t)
        return self.centre + decay * (x0 - self.centre), self.std_factor * var.sqrt()

    def prior_sample(self, shape, generator=None, device=None, dtype=None):
        return self.centre + super().prior_sample(shape, generator, device, dtype)

    def prior_log_prob(self, z):
        return super().prior_log_prob(z - self.centre)


class Quartic(sdediff.SDE):
    """dx = -x^3 dt + sqrt(2) dw with its stationary prior p ∝ exp(-x^4/4) (docs/custom_sde.md)."""

    log_z = math.log(2 * math.gamma(1.25) * 4**0.25)

    def __init__(self, wrong_log_prob=False):
        super().__init__(T=1.0)
        self.wrong_log_prob = wrong_log_prob

    def drift(self, x, t):
        return -(x**3)

    def diffusion(self, t):
        return torch.full_like(t, math.sqrt(2.0))

    def prior_sample(self, shape, generator=None, device=None, dtype=None):
        size = math.prod(shape)
        kept = torch.empty(0, dtype=T64)
        while kept.numel() < size:
            z = torch.randn(2 * size, generator=generator, dtype=T64)
            u = torch.rand(2 * size, generator=generator, dtype=T64)
            kept = torch.cat([kept, z[u < torch.exp(-((z**2 - 1) ** 2) / 4)]])
        return kept[:size].reshape(tuple(shape)).to(device=device, dtype=dtype or torch.get_default_dtype())

    def prior_log_prob(self, z):
        power = 2 if self.wrong_log_prob else 4
        return (-(z.abs() ** power) / power - self.log_z).flatten(1).sum(1)


def integrated_vp():
    return sdediff.LinearSDE(drift_coef=lambda t: -0.5 * (0.1 + 19.9 * t), diffusion=lambda t: (0.1 + 19.9 * t).sqrt())


def discrete_vp():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=T64)
    return DiscreteVPSDE(torch.cumprod(1 - betas, 0))


CONSISTENT = {
    "vp": sdediff.VPSDE, "subvp": sdediff.SubVPSDE, "ve": sdediff.VESDE, "learned": sdediff.LearnedScheduleSDE,
    "discrete_vp": discrete_vp, "integrated": integrated_vp, "ou": OU, "declared_ou": DeclaredOU,
    "declared_affine_ou": lambda: DeclaredOU(centre=1.5, T=8.0), "quartic": Quartic,
}


@pytest.mark.parametrize("name", sorted(CONSISTENT))
def test_consistent_sdes_pass(name):
    result = check(CONSISTENT[name]())
    assert result.ok, str(result)
    assert result.failures == [] and result.checked
    result.raise_if_failed()
    assert "consistent" in str(result)


def test_what_cannot_be_checked_is_said():
    quartic = check(Quartic())
    assert any("declares no marginal" in u for u in quartic.unchecked)
    assert any("normalisation of prior_log_prob" in u for u in quartic.unchecked)
    assert any("Stein" in c for c in quartic.checked)
    ou = check(OU())
    assert any("integrated from a noise-free x_0" in u for u in ou.unchecked)
    affine = check(DeclaredOU(centre=1.5, T=8.0))  # an affine drift is not linear: moments by Monte Carlo
    assert any("Monte Carlo" in c for c in affine.checked)
    assert any("Gaussian shape" in u for u in affine.unchecked)
    assert any("d Cov(x_i, x_j)/dt" in c for c in check(DeclaredOU()).checked)
    assert any("m(T) = 1" in u for u in check(sdediff.VESDE()).unchecked)  # VE's prior leaves out the data
    short = check(DeclaredOU(centre=1.5, T=3.0))  # e^-3 of x0 is left at T: at x0 = 0 the mean has not reached 1.5
    assert failed(short) == {"prior mean"} and any("m(T) = 0.0498" in u for u in short.unchecked)


def test_finite_differences_where_autograd_cannot_differentiate():
    """A kernel computed in numpy has no autograd derivative: finite differences take over, and at the knots of a
    piecewise-constant beta they say so instead of failing."""

    class NumpyVP(sdediff.VPSDE):
        def mean_coeff(self, t):
            return torch.from_numpy(np.exp(self.log_mean_coeff(t.detach()).numpy()))

    assert check(NumpyVP()).ok

    class NumpyDiscrete(DiscreteVPSDE):
        def marginal_std(self, t):
            return torch.from_numpy(super().marginal_std(t.detach()).numpy())

    betas = torch.linspace(0.1, 0.9, 10, dtype=T64)
    sde = NumpyDiscrete(torch.cumprod(1 - betas, 0))  # knots at k / 10: the check times 0.1, 0.2, ... sit on them
    result = sdediff.check_sde(sde, num_times=10, generator=gen(0))
    assert result.ok, str(result)
    assert any("finite differences disagree" in u for u in result.unchecked)


# --- SDEs that are not -----------------------------------------------------------------------------------------------
class WrongStd(sdediff.VPSDE):
    def marginal_std(self, t):  # sub-VP's s(t) on VP's drift and diffusion
        return -torch.expm1(2 * self.log_mean_coeff(t))


class LoudDiffusion(sdediff.VPSDE):
    def __init__(self, factor=1.1):
        super().__init__()
        self.factor = factor

    def diffusion(self, t):
        return self.factor * super().diffusion(t)


class CubicDrift(sdediff.VPSDE):
    def drift(self, x, t):
        return super().drift(x, t) - 0.1 * x**3


class WrongMean(sdediff.VPSDE):
    def mean_coeff(self, t):
        return torch.exp(0.9 * self.log_mean_coeff(t))


class WrongLogSNR(sdediff.VPSDE):
    def log_snr(self, t):
        return 0.9 * super().log_snr(t)


class WrongTimeOfLogSNR(sdediff.VPSDE):
    def time_of_log_snr(self, log_snr, lo=0.0, hi=None):
        return 0.9 * super().time_of_log_snr(log_snr, lo, hi)


class WidePrior(sdediff.VPSDE):
    def prior_sample(self, shape, generator=None, device=None, dtype=None):
        return 2 * super().prior_sample(shape, generator, device, dtype)


class WrongPriorDensity(sdediff.VPSDE):
    def prior_log_prob(self, z):
        return gaussian_log_prob(z, 2.0)


class AnisotropicOU(DeclaredOU):
    """Rates 1 and 2 in the two coordinates, and the right mean, but the isotropic variance of rate 1."""

    rates = torch.tensor([1.0, 2.0], dtype=T64)

    def drift(self, x, t):
        return -self.rates * x

    def marginal(self, x0, t):
        t = torch.as_tensor(t, dtype=x0.dtype).expand(x0.shape[0])
        return torch.exp(-self.rates * t[:, None]) * x0, super().marginal(x0, t)[1]


class CubicDeclaredOU(DeclaredOU):
    def drift(self, x, t):
        return -self.theta * x - 0.2 * x**3


@pytest.mark.parametrize("make, quantity", [
    (WrongStd, "d(s^2)/dt"),
    (LoudDiffusion, "d(s^2)/dt"),
    (CubicDrift, "drift homogeneity"),
    (CubicDrift, "drift additivity"),
    (CubicDrift, "drift = drift_coef(t) x"),
    (WrongMean, "d log m/dt"),
    (WrongLogSNR, "log-SNR"),
    (WrongTimeOfLogSNR, "time_of_log_snr"),
    (WidePrior, "prior std"),
    (WrongPriorDensity, "prior_log_prob"),
    (lambda: DeclaredOU(std_factor=1.1), "d(s^2)/dt"),
    (lambda: DeclaredOU(centre=1.0, std_factor=1.1), "d(s^2)/dt"),
    (AnisotropicOU, "d(s^2)/dt"),
    (CubicDeclaredOU, "d mean/dt"),
    (lambda: Quartic(wrong_log_prob=True), "prior E[z . grad log p(z)]/D (Stein)"),
])
def test_inconsistencies_are_named(make, quantity):
    result = check(make())
    assert not result.ok
    assert quantity in failed(result), str(result)
    with pytest.raises(ValueError, match="disagree"):
        result.raise_if_failed()


def test_only_the_wrong_part_is_blamed():
    assert failed(check(WrongMean())) == {"d log m/dt"}
    assert failed(check(LoudDiffusion())) == {"d(s^2)/dt"}
    assert failed(check(WidePrior())) == {"prior std"}


def test_failure_record_names_time_and_values():
    sde = LoudDiffusion()
    result = check(sde)
    (record,) = result.failures
    assert isinstance(record, sdediff.sdes.CheckFailure)
    t = torch.tensor([record.time], dtype=T64)
    a, g, s = sde.drift_coef(t), sdediff.VPSDE().diffusion(t), sde.marginal_std(t)
    declared = float(2 * a * s**2 + g**2)  # what VP's kernel satisfies: s' from the closed form
    implied = float(2 * a * s**2 + (1.1 * g) ** 2)
    assert record.declared == pytest.approx(declared, rel=1e-8)
    assert record.implied == pytest.approx(implied, rel=1e-8)
    assert record.rel_error == pytest.approx(abs(declared - implied) / max(abs(declared), abs(implied)), rel=1e-8)
    assert record.num_bad == record.num_points == 68  # every check time, T/64 apart plus 1e-4, 1e-3, 1e-2 and T
    text = str(result)
    assert f"d(s^2)/dt at t={record.time:.4g}: declared" in text and "relative error" in text


def test_heun_and_dpm_solver_disagree_on_an_inconsistent_sde():
    """heun integrates the drift and diffusion, dpm_solver uses the kernel m(t), s(t): on an SDE where the two
    disagree (the diffusion at half its kernel's value) their samples are far apart, and check_sde names why."""
    gm = GaussianMixture.ring(num_components=4, radius=2.0, std=0.3)

    def gap(sde):
        score = gm.score_fn(sde)
        heun = sdediff.sample(sde, score, (500, 2), solver="heun", steps=100, generator=gen(1))
        dpm = sdediff.sample(sde, score, (500, 2), solver="dpm_solver", steps=100, generator=gen(1))
        return float((heun - dpm).norm(dim=1).mean())

    bad = LoudDiffusion(factor=0.5)
    assert gap(sdediff.VPSDE()) < 0.05  # consistent: both solve the same problem
    assert gap(bad) > 5.0  # the data sit at radius 2: five is far outside them
    result = check(bad)
    assert failed(result) == {"d(s^2)/dt"}
    assert result.failures[0].rel_error > 0.5


def test_argument_and_contract_errors():
    with pytest.raises(TypeError, match="sde must be"):
        sdediff.check_sde(object())
    for kw, match in [({"num_times": 1}, "num_times"), ({"rtol": 0.0}, "rtol"), ({"num_samples": 4}, "num_samples"),
                      ({"event_shape": (0,)}, "event_shape"), ({"num_se": -1.0}, "num_se")]:
        with pytest.raises(ValueError, match=match):
            sdediff.check_sde(sdediff.VPSDE(), **kw)

    class FlatDiffusion(sdediff.VPSDE):
        def diffusion(self, t):
            return super().diffusion(t)[:, None]

    with pytest.raises(ValueError, match="diffusion"):
        sdediff.check_sde(FlatDiffusion())


def test_batch_dependent_drift_is_caught():
    class BatchNormDrift(sdediff.VPSDE):
        def drift(self, x, t):
            return super().drift(x - x.mean(0), t)

    assert "drift batch independence" in failed(check(BatchNormDrift()))


def test_images_shape():
    assert sdediff.check_sde(sdediff.VPSDE(), event_shape=(1, 3, 3), generator=gen(0)).ok
    assert sdediff.check_sde(DeclaredOU(), event_shape=(2, 2), generator=gen(0)).ok
