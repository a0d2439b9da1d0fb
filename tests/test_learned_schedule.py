"""LearnedScheduleSDE (VDM's learned gamma) and its joint training with the score network (issue 8).

Truth: the closed-form kernel m^2 = sigmoid(-gamma), s^2 = sigmoid(gamma) must be the kernel of the SDE it
defines (a = -gamma' sigmoid(gamma)/2, g^2 = gamma' sigmoid(gamma)), checked against LinearSDE's numerical
integration of that drift and diffusion; samplers and the ODE likelihood with the exact Gaussian-mixture score
under this kernel must reproduce the exact marginals.
"""

import math

import pytest
import torch
from problems import EPS, MIXTURE, T64, gen

import sdediff
from sdediff.metrics import noise_floor, sliced_wasserstein
from sdediff.training import MLP, TrainConfig, Trainer


def shaped_sde(seed=0):
    """A learned schedule with a visibly non-linear, random shape (as after training)."""
    sde = sdediff.LearnedScheduleSDE(gamma_min=-10.0, gamma_max=6.0, num_features=8)
    g = gen(seed)
    with torch.no_grad():
        sde.c.copy_(torch.randn(8, generator=g))
        sde.d.copy_(3 * torch.randn(8, generator=g))
    return sde.requires_grad_(False)


def test_gamma_is_monotone_with_learnable_endpoints():
    sde = shaped_sde()
    t = torch.linspace(0, 1, 2001, dtype=T64)
    gamma, dgamma = sde.gamma_and_derivative(t)
    assert (gamma.diff() > 0).all() and (dgamma > 0).all()
    torch.testing.assert_close(gamma[[0, -1]], torch.tensor([-10.0, 6.0], dtype=T64))
    # derivative against central differences; log-SNR is -gamma
    h = 1e-6
    torch.testing.assert_close(dgamma[1:-1], (sde.gamma(t[1:-1] + h) - sde.gamma(t[1:-1] - h)) / (2 * h), rtol=1e-6,
                               atol=1e-6)
    torch.testing.assert_close(sde.log_snr(t), -gamma)
    # gradients reach both endpoints and the shape
    sde.requires_grad_(True)
    sde.gamma(torch.tensor([0.0, 0.3, 1.0])).sum().backward()
    for p in sde.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert sde.gamma_min.grad == pytest.approx(3.0) and sde.gamma_gap.grad > 0
    with pytest.raises(ValueError, match="gamma_max"):
        sdediff.LearnedScheduleSDE(gamma_min=1.0, gamma_max=0.0)
    with pytest.raises(ValueError, match="num_features"):
        sdediff.LearnedScheduleSDE(num_features=0)


def test_kernel_is_the_kernel_of_its_sde():
    sde = shaped_sde(1)
    t = torch.linspace(0, 1, 9, dtype=T64)
    zero = torch.zeros(1, dtype=T64)
    m0, s0 = float(sde.mean_coeff(zero)), float(sde.marginal_std(zero))
    numeric = sdediff.LinearSDE(drift_coef=sde.drift_coef, diffusion=sde.diffusion, initial_std=s0, prior_std=1.0)
    torch.testing.assert_close(m0 * numeric.mean_coeff(t), sde.mean_coeff(t), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(numeric.marginal_std(t), sde.marginal_std(t), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(sde.mean_coeff(t) ** 2 + sde.marginal_std(t) ** 2, torch.ones_like(t))
    torch.testing.assert_close((sde.diffusion(t) / sde.marginal_std(t)) ** 2, sde.gamma_and_derivative(t)[1])


@pytest.mark.parametrize("solver,steps,options", [
    ("euler_maruyama", 500, {}), ("pc", 200, {"snr": 0.16}), ("heun", 50, {}), ("ode", 1, {"rtol": 1e-6, "atol": 1e-6}),
    ("ancestral", 200, {}), ("dpm_solver", 20, {}),
])
def test_solvers_sample_the_exact_marginal(solver, steps, options):
    sde, n = shaped_sde(), 3000
    exact = MIXTURE.marginal(sde, EPS)
    x = sdediff.sample(sde, MIXTURE.score_fn(sde), (n, 2), solver=solver, steps=steps, eps=EPS, generator=gen(50),
                       dtype=T64, **options)
    sw = sliced_wasserstein(x, exact.sample(n, generator=gen(51), dtype=T64), n_projections=128, generator=gen(52))
    floor = noise_floor(lambda k, generator: exact.sample(k, generator=generator, dtype=T64), n, repeats=4,
                        n_projections=128, generator=gen(53)).mean()
    assert sw < 2 * floor, (solver, float(sw), float(floor))


def test_every_solver_runs_and_the_ode_likelihood_is_exact():
    sde = shaped_sde()
    score = MIXTURE.score_fn(sde)
    for name in sdediff.available_solvers():
        name = name.replace("<method>", "euler")
        x = sdediff.sample(sde, score, (16, 2), solver=name, steps=8, eps=EPS, generator=gen(54), dtype=T64)
        assert x.shape == (16, 2) and torch.isfinite(x).all(), name
    x = MIXTURE.marginal(sde, EPS).sample(64, generator=gen(55), dtype=T64)
    res = sdediff.log_likelihood(sde, score, x, eps=EPS, rtol=1e-7, atol=1e-7)
    # gamma(T) = 6: p_T is not quite the N(0, I) prior, so put the exact log p_T of the latent in its place
    exact_flow = MIXTURE.log_prob(res.latent, sde, sde.T) + res.delta_log_prob
    torch.testing.assert_close(exact_flow, MIXTURE.log_prob(x, sde, EPS), rtol=0, atol=2e-4)
    bound = sdediff.elbo(sde, score, MIXTURE.sample(2000, generator=gen(56), dtype=T64), t_eps=EPS, generator=gen(57))
    gap = bound.nats + MIXTURE.log_prob(MIXTURE.sample(2000, generator=gen(56), dtype=T64))
    assert float(gap.mean()) > -3 * float(gap.std()) / math.sqrt(2000)


def _trainer(steps=40, **overrides):
    torch.manual_seed(0)
    sde = sdediff.LearnedScheduleSDE(num_features=4)
    data = MIXTURE.sample(512, generator=gen(58)) / 4
    options = dict(steps=steps, batch_size=64, lr=3e-3, loss="elbo", weighting="likelihood", progress=False,
                   log_every=10, t_eps=1e-3, ema_decay=0.9)
    options.update(overrides)
    return Trainer(MLP(2, hidden=32, depth=2), sde, data, config=TrainConfig(**options), time_input=sde.noise_level)


def test_joint_training_updates_the_schedule_by_bound_and_variance():
    trainer = _trainer()
    sde = trainer.sde
    before = {k: v.detach().clone() for k, v in sde.state_dict().items()}
    # the gradients of one step: network and endpoints from the bound, shape from the mean squared diffusion term
    x0, t, w, noise, cond = trainer._draw_batch()
    loss, variance = trainer._loss(x0, t, w, noise, cond)
    shape, ends = sde.shape_parameters(), sde.endpoint_parameters()
    expected = dict(zip(shape, torch.autograd.grad(variance, shape, retain_graph=True), strict=True))
    expected.update(zip(ends, torch.autograd.grad(loss, ends), strict=True))
    trainer.generator.manual_seed(trainer.config.seed)  # the same batch again
    seen, step = {}, trainer.optimizer.step
    trainer.optimizer.step = lambda: (seen.update({p: p.grad.clone() for p in sde.parameters()}), step())
    trainer.train_step()
    trainer.optimizer.step = step
    assert len(expected) == len(seen) == 6
    for p, grad in expected.items():
        torch.testing.assert_close(seen[p], grad)
    losses = trainer.fit()
    assert all(math.isfinite(v) for v in losses)
    after = sde.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)
    t = torch.linspace(0, 1, 101)
    with torch.no_grad():
        assert (sde.gamma(t).diff() > 0).all()
    res = trainer.evaluate()
    assert math.isfinite(res["nll"]) and math.isfinite(res["nll_bound"])
    assert all(p.requires_grad for p in sde.parameters())


def test_schedule_is_averaged_with_the_weights():
    """The EMA schedule follows the trained one with the weights' decay (and warm-up), and the EMA score function
    uses it, time input included; the raw score function keeps the raw schedule."""
    trainer = _trainer(steps=12, ema_decay=0.8)
    sde, ema_sde = trainer.sde, trainer.ema_sde
    assert ema_sde is not sde and not any(p.requires_grad for p in ema_sde.parameters())
    expected = [p.detach().clone() for p in sde.parameters()]
    for k in range(12):
        trainer.train_step()
        decay = min(0.8, (k + 1) / (k + 10))
        expected = [e + (1 - decay) * (p.detach() - e) for e, p in zip(expected, sde.parameters(), strict=True)]
    for e, p in zip(expected, ema_sde.parameters(), strict=True):
        torch.testing.assert_close(p, e, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(p, q) for p, q in zip(ema_sde.parameters(), sde.parameters(), strict=True))
    ema, raw = trainer.score_fn(ema=True), trainer.score_fn(ema=False)
    assert ema.sde is ema_sde and ema.time_input.__self__ is ema_sde
    assert raw.sde is sde and raw.time_input.__self__ is sde
    fixed = Trainer(MLP(2, hidden=32, depth=2), sdediff.VPSDE(), MIXTURE.sample(64, generator=gen(3)),
                    config=TrainConfig(steps=1, progress=False))
    assert fixed.ema_sde is fixed.sde  # nothing to average


def test_schedule_is_checkpointed_and_resumed(tmp_path):
    a = _trainer(steps=20, out_dir=str(tmp_path))
    a.fit(stop_at=10)
    b = _trainer(steps=20, out_dir=str(tmp_path))
    b.fit(resume=True, stop_at=10)
    for mine, theirs in ((a.sde, b.sde), (a.ema_sde, b.ema_sde)):
        for k, v in mine.state_dict().items():
            assert torch.equal(v, theirs.state_dict()[k]), k
    a.fit()
    b.fit()
    assert a.history == b.history
    for k, v in a.ema_sde.state_dict().items():
        assert torch.equal(v, b.ema_sde.state_dict()[k]), k


def test_trainer_losses_and_errors():
    with pytest.raises(ValueError, match="learned schedule"):
        _trainer(loss="dsm")
    torch.manual_seed(0)
    vp = Trainer(MLP(2, hidden=32, depth=2), sdediff.VPSDE(), MIXTURE.sample(256, generator=gen(59)),
                 config=TrainConfig(steps=15, batch_size=64, loss="ssm", weighting="simple", progress=False))
    assert all(math.isfinite(v) for v in vp.fit())
    fixed = Trainer(MLP(2, hidden=32, depth=2), sdediff.VPSDE(), MIXTURE.sample(256, generator=gen(59)),
                    config=TrainConfig(steps=15, batch_size=64, loss="elbo", progress=False))
    assert all(math.isfinite(v) for v in fixed.fit())
    with pytest.raises(ValueError, match="loss"):
        TrainConfig(loss="nce")
