"""Samplers against the exact marginals of a Gaussian mixture (docs/sampling.md).

With the exact mixture score, every sampler's output should be indistinguishable from exact samples of
p_eps: the sliced-W2 distance to an exact sample of the same size is within twice the sampling-noise floor
(the mean SW2 between two independent exact samples of that size), the mode proportions are within 2%
of the weights, and the mean exact log-density of the samples matches its expectation (the negative
entropy of p_eps, from 100k exact samples) within 4 standard errors. The last is the sharpest of the
three: a score off by 5% fails it (test_wrong_score_is_detected).
"""

import math

import pytest
import torch
from problems import ALL_SDES, EPS, MIXTURE, OU, T64, Counted, assert_nfe_counts, assert_seeded, check_against_exact, gen, run

import sdediff


@pytest.mark.parametrize("name", sorted(ALL_SDES))
def test_euler_maruyama_matches_exact_samples(name):
    check_against_exact(name, run(name, "euler_maruyama", 10_000, 1000), f"{name} euler_maruyama")


@pytest.mark.parametrize("name", sorted(ALL_SDES))
def test_predictor_corrector_matches_exact_samples(name):
    check_against_exact(name, run(name, "pc", 10_000, 1000, snr=0.16), f"{name} pc")


@pytest.mark.parametrize("solver,steps,options", [
    ("reverse_diffusion", 500, {}),
    ("ancestral", 1000, {}),
    ("langevin", 1000, {"snr": 0.16, "corrector_steps": 1}),
    ("euler", 1000, {}),
    ("heun", 50, {}),
    ("ode", 1, {"rtol": 1e-6, "atol": 1e-6}),
    ("euler_maruyama", 500, {"noise_scale": 0.5}),
    ("pc", 300, {"predictor": "ancestral", "corrector_steps": 2, "snr": 0.1}),
])
@pytest.mark.parametrize("name", ["vp", "ve"])
def test_other_solvers_match_exact_samples(name, solver, steps, options):
    check_against_exact(name, run(name, solver, 4000, steps, **options), f"{name} {solver}")


def test_custom_sde_with_reverse_diffusion_and_langevin():
    """A general SDE (no kernel known to sdediff): EM-discretised reverse diffusion and Langevin."""
    check_against_exact("ou", run("ou", "reverse_diffusion", 4000, 1000), "ou reverse_diffusion")
    check_against_exact("ou", run("ou", "ode", 4000, 1), "ou ode")


def test_wrong_score_is_detected():
    """The statistical check has power: a score scaled by 0.95 fails it."""
    sde = sdediff.VPSDE()
    x = sdediff.sample(sde, lambda x, t: 0.95 * MIXTURE.score(x, t, sde), (10_000, 2), steps=1000, eps=EPS,
                       generator=gen(2), dtype=T64)
    with pytest.raises(AssertionError):
        check_against_exact("vp", x, "scaled score")


@pytest.mark.parametrize("name", ["vp", "ve", "subvp"])
def test_adaptive_ode_matches_tight_reference(name):
    """dopri5 at rtol = atol = 1e-6 vs dopri8 at 1e-10 from the same exact p_T samples: every sample within 1e-4
    (per-sample error control; at the default 1e-5 the worst sample is ~2e-4 off)."""
    sde = ALL_SDES[name]()
    score = MIXTURE.score_fn(sde)
    x_T = MIXTURE.marginal(sde, sde.T).sample(512, generator=gen(4), dtype=T64)
    x = sdediff.sample(sde, score, x_T.shape, solver="ode", eps=EPS, x_init=x_T, rtol=1e-6, atol=1e-6)
    ref = sdediff.sample(sde, score, x_T.shape, solver="ode", eps=EPS, x_init=x_T, rtol=1e-10, atol=1e-10,
                         method="dopri8")
    assert (x - ref).abs().max() < 1e-4


@pytest.mark.parametrize("solver,order", [("euler", 1), ("heun", 2)])
def test_fixed_step_ode_convergence_order(solver, order):
    """Halving the step divides the RMS pathwise error by ~2^order (reference: tight adaptive solve)."""
    sde = sdediff.VPSDE()
    score = MIXTURE.score_fn(sde)
    x_T = MIXTURE.marginal(sde, sde.T).sample(256, generator=gen(5), dtype=T64)
    ref = sdediff.sample(sde, score, x_T.shape, solver="ode", eps=0.1, x_init=x_T, rtol=1e-11, atol=1e-11,
                         method="dopri8")
    errs = [(sdediff.sample(sde, score, x_T.shape, solver=solver, steps=n, eps=0.1, x_init=x_T) - ref).pow(2).mean()
            .sqrt() for n in ((200, 400, 800) if order == 1 else (50, 100, 200))]
    rates = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert all(abs(r - order) < 0.3 for r in rates), (errs, rates)


def test_same_seed_same_samples_and_independent_of_global_rng():
    sde = sdediff.VPSDE()
    assert_seeded(sde, MIXTURE.score_fn(sde), ["euler_maruyama", "reverse_diffusion", "ancestral", "pc", "langevin"])


def test_nfe_counts_and_info():
    sde = sdediff.VPSDE()
    score = MIXTURE.score_fn(sde)
    expected = {"euler_maruyama": 10, "reverse_diffusion": 10, "ancestral": 10, "euler": 10, "heun": 20,
                "pc": 20, "langevin": 10}
    for solver, info in assert_nfe_counts(sde, score, expected).items():
        assert info.times[0] == sde.T and abs(info.times[-1].item() - 1e-3) < 1e-9, solver
    counted = Counted(score)
    info = sdediff.sample(sde, counted, (8, 2), solver="ode", generator=gen(0), return_info=True, denoise=True)
    assert info.nfe == counted.calls > 1


def test_trajectory_and_callback():
    sde = sdediff.VESDE()
    seen = []
    info = sdediff.sample(sde, MIXTURE.score_fn(sde), (16, 2), solver="heun", steps=12, generator=gen(0),
                          keep_trajectory=True, callback=lambda i, t, x: seen.append((i, float(t))))
    assert info.trajectory.shape == (13, 16, 2)
    assert torch.equal(info.trajectory[-1], info.samples)
    assert [i for i, _ in seen] == list(range(12))
    assert seen[-1][1] == pytest.approx(1e-3)
    info = sdediff.sample(sde, MIXTURE.score_fn(sde), (16, 2), solver="ode", steps=5, generator=gen(0),
                          keep_trajectory=True)
    assert info.trajectory.shape == (6, 16, 2) and torch.equal(info.trajectory[0], info.trajectory[0])


def test_progress_bar_runs(capsys):
    sde = sdediff.VPSDE()
    x = sdediff.sample(sde, MIXTURE.score_fn(sde), (8, 2), steps=5, generator=gen(0), progress=True)
    assert x.shape == (8, 2)
    x = sdediff.sample(sde, MIXTURE.score_fn(sde), (8, 2), solver="ode", generator=gen(0), progress=True)
    assert torch.isfinite(x).all()


def test_denoise_is_tweedie_and_improves():
    """denoise=True returns E[x0 | x_eps]; for the mixture it lands closer to p_0 than x_eps does."""
    sde = sdediff.VPSDE()
    score = MIXTURE.score_fn(sde)
    x_T = MIXTURE.marginal(sde, sde.T).sample(2000, generator=gen(3), dtype=T64)
    kwargs = dict(solver="ode", eps=0.05, x_init=x_T, rtol=1e-7, atol=1e-7)
    x_eps = sdediff.sample(sde, score, x_T.shape, **kwargs)
    x0 = sdediff.sample(sde, score, x_T.shape, denoise=True, **kwargs)
    m, s = sde.mean_coeff(torch.tensor(0.05, dtype=T64)), sde.marginal_std(torch.tensor(0.05, dtype=T64))
    torch.testing.assert_close(x0, (x_eps + s**2 * score(x_eps, torch.full((2000,), 0.05, dtype=T64))) / m)
    assert MIXTURE.log_prob(x0).mean() > MIXTURE.log_prob(x_eps).mean()


def test_any_shape_and_float32():
    sde = sdediff.VPSDE()
    v = 0.25

    def score(x, t):
        m, s = sde.mean_coeff(t), sde.marginal_std(t)
        return -x / (m**2 * v + s**2).reshape(-1, *[1] * (x.dim() - 1))

    for shape in [(6,), (6, 3), (6, 2, 4), (6, 1, 4, 4), (6, 2, 2, 2, 2)]:
        for solver in ["euler_maruyama", "pc", "heun", "ode", "ancestral"]:
            x = sdediff.sample(sde, score, shape, solver=solver, steps=10, generator=gen(0), dtype=torch.float32)
            assert x.shape == shape and x.dtype == torch.float32 and torch.isfinite(x).all()


def test_time_grids():
    sde = sdediff.VPSDE()
    for grid in ["uniform", "quadratic", "log_snr", "karras"]:
        info = sdediff.sample(sde, MIXTURE.score_fn(sde), (8, 2), solver="heun", steps=10, time_grid=grid,
                              generator=gen(0), return_info=True, dtype=T64)
        ts = info.times
        assert len(ts) == 11 and ts[0] == 1.0 and ts[-1] == pytest.approx(1e-3)
        assert (ts[1:] < ts[:-1]).all(), grid
    lam = sde.log_snr(sdediff.solvers.grids.log_snr(sde, 10, 1e-3))
    torch.testing.assert_close(lam.diff(), torch.full((10,), (lam[-1] - lam[0]).item() / 10, dtype=T64))
    explicit = [1.0, 0.5, 0.1, 1e-3]
    info = sdediff.sample(sde, MIXTURE.score_fn(sde), (8, 2), solver="euler", time_grid=explicit, return_info=True,
                          generator=gen(0))
    assert info.nfe == 3


def test_x_init_replaces_prior_and_is_validated():
    sde = sdediff.VPSDE()
    score = MIXTURE.score_fn(sde)
    x_T = torch.randn(8, 2, generator=gen(0), dtype=T64)
    a = sdediff.sample(sde, score, (8, 2), solver="ode", x_init=x_T)
    b = sdediff.sample(sde, score, (8, 2), solver="ode", x_init=x_T.clone())
    assert torch.equal(a, b) and a.dtype == T64
    with pytest.raises(ValueError, match="x_init"):
        sdediff.sample(sde, score, (8, 3), x_init=x_T)
    with pytest.raises(TypeError, match="x_init"):
        sdediff.sample(sde, score, (8, 2), x_init=x_T.long())


def test_bad_arguments_raise_clear_errors():
    sde = sdediff.VPSDE()
    score = MIXTURE.score_fn(sde)
    with pytest.raises(ValueError, match="unknown solver 'rk45'.*euler_maruyama"):
        sdediff.sample(sde, score, (4, 2), solver="rk45")
    for steps, error in ((0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="steps"):
            sdediff.sample(sde, score, (4, 2), steps=steps)
    for eps in (0.0, -1e-3, 1.0, 2.0, float("nan")):
        with pytest.raises(ValueError, match="eps"):
            sdediff.sample(sde, score, (4, 2), eps=eps)
    with pytest.raises(TypeError, match="snr"):
        sdediff.sample(sde, score, (4, 2), solver="euler", snr=0.1)
    with pytest.raises(ValueError, match="snr"):
        sdediff.sample(sde, score, (4, 2), solver="pc", snr=-1.0)
    with pytest.raises(ValueError, match="rtol"):
        sdediff.sample(sde, score, (4, 2), solver="ode", rtol=0.0)
    with pytest.raises(ValueError, match="method"):
        sdediff.sample(sde, score, (4, 2), solver="ode", method="rk45")
    with pytest.raises(ValueError, match="shape"):
        sdediff.sample(sde, score, (0, 2))
    with pytest.raises(ValueError, match="score_fn must return"):
        sdediff.sample(sde, lambda x, t: x[:, :1], (4, 2), steps=3)
    with pytest.raises(ValueError, match="time_grid"):
        sdediff.sample(sde, score, (4, 2), time_grid="cosine")
    with pytest.raises(TypeError, match="LinearSDE"):
        sdediff.sample(OU(), score, (4, 2), solver="ancestral", steps=3)


def test_non_finite_values_are_reported_with_the_step():
    sde = sdediff.VPSDE()

    def exploding(x, t):
        return torch.where(t[:, None] < 0.5, torch.full_like(x, float("nan")), -x)

    with pytest.raises(FloatingPointError, match=r"step 6 of 10 \(t = 0.46 -> 0.37\)"):
        sdediff.sample(sde, exploding, (4, 2), steps=10, eps=0.1, generator=gen(0))
    with pytest.raises(FloatingPointError, match="non-finite"):
        sdediff.sample(sde, exploding, (4, 2), solver="ode", eps=0.1)


def test_batch_size_chunks_give_the_same_samples_for_deterministic_solvers():
    sde = sdediff.VPSDE()
    score = MIXTURE.score_fn(sde)
    x_T = torch.randn(50, 2, generator=gen(0), dtype=T64)
    whole = sdediff.sample(sde, score, (50, 2), solver="heun", steps=20, x_init=x_T)
    info = sdediff.sample(sde, score, (50, 2), solver="heun", steps=20, x_init=x_T, batch_size=16, return_info=True)
    torch.testing.assert_close(info.samples, whole, rtol=1e-12, atol=1e-12)
    assert info.nfe == 4 * 40  # 4 chunks (16, 16, 16, 2) x 20 Heun steps x 2 evaluations
    chunked = sdediff.sample(sde, score, (50, 2), steps=20, batch_size=7, generator=gen(1))
    assert chunked.shape == (50, 2) and torch.isfinite(chunked).all()
    assert torch.equal(chunked, sdediff.sample(sde, score, (50, 2), steps=20, batch_size=7, generator=gen(1)))
    with pytest.raises(ValueError, match="batch_size"):
        sdediff.sample(sde, score, (50, 2), batch_size=0)
    with pytest.raises(ValueError, match="keep_trajectory"):
        sdediff.sample(sde, score, (50, 2), batch_size=10, keep_trajectory=True)


def test_pc_on_a_numerically_integrated_linear_sde():
    """The corrector's alpha_i uses the step just taken, never the schedule below t = 0 (regression)."""
    vp = sdediff.VPSDE()
    numeric = sdediff.LinearSDE(drift_coef=vp.drift_coef, diffusion=vp.diffusion, prior_std=1.0)
    a = sdediff.sample(numeric, MIXTURE.score_fn(numeric), (64, 2), solver="pc", steps=10, generator=gen(0), dtype=T64)
    b = sdediff.sample(vp, MIXTURE.score_fn(vp), (64, 2), solver="pc", steps=10, generator=gen(0), dtype=T64)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
