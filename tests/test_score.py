"""Prediction conversions (score, eps, x0, v, flow) against analytic truth (docs/concepts.md, Scores, noise, data and velocity).

Truth used here, independent of the library's formulas:

* the kernel ``x = m x0 + s eps`` with known ``x0`` and ``eps``;
* the flow (flow-matching velocity) is ``d/dt [m(t) x0 + s(t) eps]``, taken by autograd through
  ``sde.mean_coeff`` / ``sde.marginal_std``;
* the v prediction is the angular velocity ``d/dphi (x / c)`` with ``c = sqrt(m^2 + s^2)``,
  ``phi = atan2(s, m)`` (Salimans & Ho's ``alpha eps - sigma x0``; for VP, ``c = 1``);
* for data ``N(0, v I)``: posterior mean ``E[x0|x] = m v x / (m^2 v + s^2)`` and score
  ``-x / (m^2 v + s^2)``.
"""

import math

import pytest
import torch
from problems import T64, gen

import sdediff
from sdediff import score as sc

PREDICTIONS = sc.PREDICTIONS
VAR = 0.7  # data variance for the Gaussian-data checks


def numeric_sde():
    """A LinearSDE with no closed form: m, s integrated numerically and interpolated."""
    return sdediff.LinearSDE(drift_coef=lambda t: -(0.25 + 2.0 * t), diffusion=lambda t: torch.sqrt(0.5 + 4.0 * t),
                             initial_std=0.02)


SDES = {"vp": sdediff.VPSDE, "subvp": sdediff.SubVPSDE, "ve": sdediff.VESDE, "numeric": numeric_sde}


@pytest.fixture(scope="module", params=sorted(SDES))
def sde(request):
    return SDES[request.param]()


def kernel(sde, t):
    return sde.mean_coeff(t)[:, None], sde.marginal_std(t)[:, None]


def setup(sde, n=64, d=3, seed=0, t_min=1e-3):
    """Per-sample times in [t_min, T] (both ends included), clean data x0, noise eps and x = m x0 + s eps.

    Conversions through x0 lose about log10(|x| / (s |eps|)) digits to cancellation in x - m x0 (sub-VP
    has s^2 ~ 1e-8 at t = 1e-3), so the checks at 1e-10 that go through x0 start at t_min = 1e-2.
    """
    g = gen(seed)
    t = t_min + (sde.T - t_min) * torch.rand(n, generator=g, dtype=T64)
    t[:2] = torch.tensor([t_min, sde.T])
    x0 = torch.randn(n, d, generator=g, dtype=T64)
    eps = torch.randn(n, d, generator=g, dtype=T64)
    m, s = kernel(sde, t)
    return t, x0, eps, m * x0 + s * eps


def kernel_derivatives(sde, t):
    """(m', s') by autograd through the SDE's own m(t), s(t) (not through the library's m' = a m formula)."""
    with torch.enable_grad():  # also inside sdediff.sample, which runs under no_grad
        t = t.detach().clone().requires_grad_(True)
        m = sde.mean_coeff(t) + 0 * t  # (+0*t: VE's m is a constant without a graph)
        s = sde.marginal_std(t)
        (dm,) = torch.autograd.grad(m.sum(), t)
        (ds,) = torch.autograd.grad(s.sum(), t)
    return dm[:, None], ds[:, None]


def gaussian_truth(sde, x, t):
    """For data N(0, VAR I): exact posterior mean E[x0|x], implied noise, and the score."""
    m, s = kernel(sde, t)
    total = m**2 * VAR + s**2
    return m * VAR * x / total, s * x / total, -x / total


def assert_close(a, b, tol=1e-10):
    scale = max(1.0, float(b.abs().max()))
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale)


# --- against truth ------------------------------------------------------------------------------------
def test_from_data_and_noise_matches_truth(sde):
    t, x0, eps, x = setup(sde)
    m, s = kernel(sde, t)
    dm, ds = kernel_derivatives(sde, t)
    c = (m**2 + s**2).sqrt()
    truth = {
        "eps": eps,
        "x0": x0,
        "score": -eps / s,  # the conditional score grad_x log N(x; m x0, s^2 I)
        "v": (m * eps - s * x0) / c,
        "flow": dm * x0 + ds * eps,  # d x_t / dt of the interpolation
    }
    for prediction in PREDICTIONS:
        pred = sc.from_data_and_noise(x0, eps, x, t, sde, prediction)
        assert_close(pred, truth[prediction], tol=1e-8 if prediction == "flow" else 1e-12)
        # and every kind decodes back to the true (x0, eps)
        x0_back, eps_back = sc.to_data_and_noise(pred, x, t, sde, prediction)
        assert_close(x0_back, x0, tol=1e-8)
        assert_close(eps_back, eps, tol=1e-8)


def test_flow_is_finite_difference_time_derivative(sde):
    """The flow prediction equals a central finite difference of x_t = m(t) x0 + s(t) eps."""
    t, x0, eps, x = setup(sde, seed=1)
    t = t.clamp(1e-2, sde.T - 1e-2)
    m, s = kernel(sde, t)
    x = m * x0 + s * eps
    h = 1e-5
    (mp, sp), (mm, sm) = kernel(sde, t + h), kernel(sde, t - h)
    fd = ((mp - mm) * x0 + (sp - sm) * eps) / (2 * h)
    flow = sc.from_data_and_noise(x0, eps, x, t, sde, "flow")
    torch.testing.assert_close(flow, fd, rtol=1e-6, atol=1e-6 * float(fd.abs().max()))


def test_v_is_angular_velocity(sde):
    """v = d(x/c)/dphi with c = sqrt(m^2 + s^2), phi = atan2(s, m): the chain rule through autograd in t."""
    t, x0, eps, x = setup(sde, seed=2)
    tt = t.clone().requires_grad_(True)
    m, s = sde.mean_coeff(tt) + 0 * tt, sde.marginal_std(tt)
    c, phi = (m**2 + s**2).sqrt(), torch.atan2(s, m)
    (dphi,) = torch.autograd.grad(phi.sum(), tt, retain_graph=True)
    (dm_c,) = torch.autograd.grad((m / c).sum(), tt, retain_graph=True)
    (ds_c,) = torch.autograd.grad((s / c).sum(), tt)
    v_true = (dm_c[:, None] * x0 + ds_c[:, None] * eps) / dphi[:, None]
    assert_close(sc.from_data_and_noise(x0, eps, x, t, sde, "v"), v_true, tol=1e-9)
    if isinstance(sde, sdediff.VPSDE) and not isinstance(sde, sdediff.SubVPSDE):
        # Salimans & Ho: v = alpha eps - sigma x0 with alpha = sqrt(abar) = m, sigma = sqrt(1 - abar) = s
        m, s = kernel(sde, t)
        assert_close(sc.from_data_and_noise(x0, eps, x, t, sde, "v"), m * eps - s * x0, tol=1e-12)


def test_gaussian_data_exact_score_from_every_prediction(sde):
    """Data N(0, v I): the exact posterior mean, expressed as any prediction, converts to the exact score."""
    t, _, _, x = setup(sde, seed=3, t_min=1e-2)
    x0_hat, eps_hat, score = gaussian_truth(sde, x, t)
    for prediction in PREDICTIONS:
        pred = sc.from_data_and_noise(x0_hat, eps_hat, x, t, sde, prediction)
        assert_close(sc.to_score(pred, x, t, sde, prediction), score, tol=1e-9)
        assert_close(sc.convert(pred, x, t, sde, prediction, "score"), score, tol=1e-9)
    # Tweedie, written out: score = (m E[x0|x] - x) / s^2
    m, s = kernel(sde, t)
    assert_close(sc.to_score(x0_hat, x, t, sde, "x0"), (m * x0_hat - x) / s**2, tol=1e-12)


# --- round trips --------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", PREDICTIONS)
def test_round_trips(sde, source):
    t, _, _, x = setup(sde, seed=4, t_min=1e-2)
    pred = torch.randn(x.shape, generator=gen(5), dtype=T64)
    for target in PREDICTIONS:
        there = sc.convert(pred, x, t, sde, source, target)
        back = sc.convert(there, x, t, sde, target, source)
        assert_close(back, pred, tol=1e-10)
    assert_close(sc.convert(pred, x, t, sde, source, source), pred, tol=1e-12)


def test_scalar_time_broadcasts(sde):
    _, x0, eps, _ = setup(sde, seed=6)
    t = 0.3
    m, s = kernel(sde, torch.full((x0.shape[0],), t, dtype=T64))
    x = m * x0 + s * eps
    for prediction in PREDICTIONS:
        a = sc.from_data_and_noise(x0, eps, x, t, sde, prediction)
        b = sc.from_data_and_noise(x0, eps, x, torch.full((x0.shape[0],), t, dtype=T64), sde, prediction)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_event_shapes(sde):
    """(batch, c, h, w) inputs with per-sample times: the same numbers as the flat (batch, d) computation."""
    t, x0, eps, x = setup(sde, n=8, d=12, seed=7)
    for prediction in PREDICTIONS:
        flat = sc.from_data_and_noise(x0, eps, x, t, sde, prediction)
        image = sc.from_data_and_noise(x0.reshape(8, 3, 2, 2), eps.reshape(8, 3, 2, 2), x.reshape(8, 3, 2, 2), t,
                                       sde, prediction)
        assert image.shape == (8, 3, 2, 2)
        torch.testing.assert_close(image.reshape(8, 12), flat, rtol=1e-14, atol=1e-14)


# --- ScoreModel ---------------------------------------------------------------------------------------
class ExactGaussianNet(torch.nn.Module):
    """Outputs the exact prediction of kind ``prediction`` for data N(0, VAR I), computed by hand.

    It sees the network time ``time_input(t)`` and inverts it with ``untime`` to find the schedule.
    """

    def __init__(self, sde, prediction, untime=lambda u: u):
        super().__init__()
        self.sde, self.prediction, self.untime = sde, prediction, untime
        self.seen = []

    def forward(self, x, u):
        self.seen.append(u.detach().clone())
        t = self.untime(u)
        x0_hat, eps_hat, score = gaussian_truth(self.sde, x, t)
        m, s = kernel(self.sde, t)
        dm, ds = kernel_derivatives(self.sde, t)
        return {
            "score": score,
            "eps": -s * score,
            "x0": x0_hat,
            "v": (m * eps_hat - s * x0_hat) / (m**2 + s**2).sqrt(),
            "flow": dm * x0_hat + ds * eps_hat,
        }[self.prediction]


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_score_model_gives_exact_score(sde, prediction):
    t, _, _, x = setup(sde, seed=8, t_min=1e-2)
    model = sdediff.score.ScoreModel(ExactGaussianNet(sde, prediction), sde, prediction=prediction)
    _, _, score = gaussian_truth(sde, x, t)
    assert_close(model(x, t), score, tol=1e-8 if prediction == "flow" else 1e-10)
    x0_hat = gaussian_truth(sde, x, t)[0]
    assert_close(model.predict(x, t, "x0"), x0_hat, tol=1e-8)


def test_score_model_applies_time_input():
    sde = sdediff.VPSDE()
    t, _, _, x = setup(sde, seed=9)
    net = ExactGaussianNet(sde, "eps", untime=lambda u: u / 999.0)
    model = sdediff.score.ScoreModel(net, sde, prediction="eps", time_input=lambda t: 999.0 * t)
    out = model(x, t)
    torch.testing.assert_close(net.seen[-1], 999.0 * t, rtol=1e-15, atol=0)
    assert_close(out, gaussian_truth(sde, x, t)[2], tol=1e-10)
    # a scalar time reaches the network as a (batch,) tensor, also through predict()
    model.predict(x, 0.5, "v")
    torch.testing.assert_close(net.seen[-1], torch.full((x.shape[0],), 499.5, dtype=T64))


def test_score_model_drives_sampler_like_exact_score():
    """An eps-network wrapped in ScoreModel is a score_fn: PF-ODE samples equal the closed-form flow map."""
    sde = sdediff.VPSDE()
    model = sdediff.score.ScoreModel(ExactGaussianNet(sde, "eps"), sde, prediction="eps")
    x_init = torch.randn(16, 3, generator=gen(10), dtype=T64)  # p_T of N(0, VAR I) data is N(0, ~I)
    eps = 1e-3
    out = sdediff.sample(sde, model, x_init.shape, solver="ode", x_init=x_init, eps=eps, rtol=1e-9, atol=1e-9)
    te, tT = torch.tensor([eps], dtype=T64), torch.tensor([sde.T], dtype=T64)
    ratio = math.sqrt(float((sde.mean_coeff(te) ** 2 * VAR + sde.marginal_std(te) ** 2)
                            / (sde.mean_coeff(tT) ** 2 * VAR + sde.marginal_std(tT) ** 2)))
    torch.testing.assert_close(out, ratio * x_init, rtol=0, atol=1e-6)


# --- errors -------------------------------------------------------------------------------------------
def test_unknown_prediction_raises():
    sde = sdediff.VPSDE()
    x, t = torch.zeros(2, 3, dtype=T64), torch.full((2,), 0.5, dtype=T64)
    with pytest.raises(ValueError, match="prediction"):
        sdediff.score.ScoreModel(lambda x, t: x, sde, prediction="noise")
    with pytest.raises(ValueError, match="prediction"):
        sc.convert(x, x, t, sde, "eps", "velocity")
    with pytest.raises(ValueError, match="prediction"):
        sc.convert(x, x, t, sde, "epsilon", "score")
    with pytest.raises(ValueError, match="prediction"):
        sc.to_score(x, x, t, sde, "x_0")
    with pytest.raises(ValueError, match="prediction"):
        sc.from_data_and_noise(x, x, x, t, sde, "")


def test_non_linear_sde_rejected():
    class OU(sdediff.SDE):
        def drift(self, x, t):
            return -x

        def diffusion(self, t):
            return torch.ones_like(t)

        def prior_sample(self, shape, generator=None, device=None, dtype=None):
            return torch.randn(shape, generator=generator, dtype=dtype)

        def prior_log_prob(self, z):
            return sdediff.sdes.gaussian_log_prob(z, 1.0)

    x, t = torch.zeros(2, 3, dtype=T64), torch.full((2,), 0.5, dtype=T64)
    with pytest.raises(TypeError, match="linear"):
        sc.to_score(x, x, t, OU(), "eps")
