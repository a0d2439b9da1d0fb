"""Stochastic samplers (ddpm, sde_dpm_solver, torchsde:<method>) against Gaussian-mixture truth.

Same statistical checks as test_sampling.py (check_against_exact: mean exact log-density within 4 s.e.,
mode proportions within 2%, sliced W2 within twice the noise floor), plus step-efficiency, determinism,
NFE, shapes and error tests. Measured mean log-density gaps (nats, 10k samples, s.e. 0.011) for
test_sde_dpm_solver_beats_euler_maruyama:

    VP, log-SNR grid   steps 20: EM -0.380, SDE-DPM-Solver++ order 1 +0.150, 2M -0.071
                       steps 50: EM -0.132, order 1 +0.118, 2M -0.013
    VE, uniform grid   steps 20: EM -0.193, order 1 +0.170, 2M -0.051
                       steps 50: EM -0.053, order 1 +0.104, 2M -0.016
"""

import math
import warnings

import pytest
import torch
from problems import MIXTURE, OU, T64, assert_nfe_counts, assert_seeded, check_against_exact, exact_reference, gen, run

import sdediff
import sdediff.solvers.stochastic  # noqa: F401  (registers the solvers)


def gap(name, x):
    """Mean exact log-density of x minus its expectation under p_eps, and the standard error."""
    exact, _, mean_lp, _ = exact_reference(name, x.shape[0])
    lp = exact.log_prob(x)
    return float(lp.mean() - mean_lp), float(lp.std() / math.sqrt(x.shape[0]))


@pytest.mark.parametrize("variance", ["beta", "posterior"])
@pytest.mark.parametrize("name", ["vp", "ve"])
def test_ddpm_matches_exact_samples(name, variance):
    """The posterior variance's O(h) bias (too little spread) needs 1000 steps on VP (z = +2.4); at 500
    steps z = +4.0. DDPM's beta variance adds a little noise per step and passes at 500 (z = +1.6)."""
    steps = 500 if variance == "beta" else 1000
    check_against_exact(name, run(name, "ddpm", 4000, steps, variance=variance), f"{name} ddpm {variance}")


def test_ddpm_is_ancestral_with_a_variance():
    sde = sdediff.VPSDE()
    score = MIXTURE.score_fn(sde)

    def draw(solver, **options):
        return sdediff.sample(sde, score, (64, 2), solver=solver, steps=20, generator=gen(3), dtype=T64, **options)

    assert torch.equal(draw("ddpm", variance="posterior"), draw("ancestral"))
    assert torch.equal(draw("ddpm"), draw("ancestral", variance="beta"))
    assert not torch.allclose(draw("ddpm"), draw("ancestral"))


def test_sde_dpm_solver_order1_is_the_ancestral_posterior_step():
    """The first-order exponential integrator step is exactly the Gaussian posterior draw."""
    for sde in (sdediff.VPSDE(), sdediff.VESDE(), sdediff.SubVPSDE()):
        score = MIXTURE.score_fn(sde)
        a = sdediff.sample(sde, score, (256, 2), solver="sde_dpm_solver", order=1, steps=30, generator=gen(4), dtype=T64)
        b = sdediff.sample(sde, score, (256, 2), solver="ancestral", steps=30, generator=gen(4), dtype=T64)
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name,grid", [("vp", "log_snr"), ("vp", "uniform"), ("ve", "uniform")])
def test_sde_dpm_solver_matches_exact_samples(name, grid):
    steps = 100 if grid == "log_snr" or name == "ve" else 200
    x = run(name, "sde_dpm_solver", 4000, steps, time_grid=grid)
    check_against_exact(name, x, f"{name} sde_dpm_solver {steps} steps {grid}")


@pytest.mark.parametrize("name,grid", [("vp", "log_snr"), ("ve", "uniform")])
def test_sde_dpm_solver_beats_euler_maruyama(name, grid):
    """At 20 and 50 steps the 2M solver's log-density error is under half of Euler-Maruyama's (and of its own
    first-order version's), and at 50 steps it is within sampling noise while Euler-Maruyama's is not."""
    gaps = {(solver, order, steps): gap(name, run(name, solver, 10_000, steps, time_grid=grid, **opts))
            for steps in (20, 50)
            for solver, order, opts in [("euler_maruyama", 0, {}), ("sde_dpm_solver", 1, {"order": 1}),
                                        ("sde_dpm_solver", 2, {})]}
    msg = {k: f"{g:+.4f}±{se:.4f}" for k, (g, se) in gaps.items()}
    for steps in (20, 50):
        em, dpm1, dpm2 = (abs(gaps[(s, o, steps)][0]) for s, o in [("euler_maruyama", 0), ("sde_dpm_solver", 1),
                                                                      ("sde_dpm_solver", 2)])
        assert dpm2 < 0.5 * em and dpm2 < 0.5 * dpm1, msg
    (em50, se_em), (dpm50, se_dpm) = gaps[("euler_maruyama", 0, 50)], gaps[("sde_dpm_solver", 2, 50)]
    assert abs(dpm50) < 2.5 * se_dpm and abs(em50) > 4 * se_em, msg


@pytest.mark.parametrize("method,steps", [("euler", 500), ("heun", 100), ("srk", 50), ("midpoint", 100)])
@pytest.mark.parametrize("name", ["vp", "ve"])
def test_torchsde_methods_match_exact_samples(name, method, steps):
    check_against_exact(name, run(name, f"torchsde:{method}", 4000, steps), f"{name} torchsde:{method}")


def test_torchsde_on_a_custom_sde():
    """torchsde needs only drift and diffusion: the OU process of test_sampling, no kernel known to sdediff."""
    check_against_exact("ou", run("ou", "torchsde:heun", 4000, 300), "ou torchsde:heun")


def test_torchsde_reversible_heun_warns_and_is_unstable():
    """Its parasitic root -(1 + |a|h) makes errors grow like exp(int |a| du): far off where heun is fine."""
    with pytest.warns(RuntimeWarning, match="unstable"):
        sdediff.solvers.get_solver("torchsde:reversible_heun")
    with pytest.warns(RuntimeWarning):
        x = run("vp", "torchsde:reversible_heun", 4000, 100)
    assert gap("vp", x)[0] < -1.0 < gap("vp", run("vp", "torchsde:heun", 4000, 50))[0]


@pytest.mark.slow
def test_torchsde_reversible_heun_converges_on_vp_with_many_steps():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        x = run("vp", "torchsde:reversible_heun", 4000, 5000)
    check_against_exact("vp", x, "vp torchsde:reversible_heun")


@pytest.mark.slow
@pytest.mark.parametrize("solver,steps,options", [
    ("torchsde:euler", 1000, {}), ("torchsde:srk", 200, {}), ("torchsde:log_ode", 300, {}),
    ("ddpm", 2000, {"variance": "posterior"}),
    ("sde_dpm_solver", 200, {"time_grid": "log_snr"}), ("sde_dpm_solver", 200, {"solver_type": "heun"}),
])
@pytest.mark.parametrize("name", ["vp", "ve", "subvp"])
def test_stochastic_solvers_match_exact_samples_10k(name, solver, steps, options):
    check_against_exact(name, run(name, solver, 10_000, steps, **options), f"{name} {solver} {options}")


def test_torchsde_without_noise_is_heun_on_the_probability_flow():
    sde = sdediff.VESDE()
    score = MIXTURE.score_fn(sde)
    x_T = MIXTURE.marginal(sde, sde.T).sample(128, generator=gen(5), dtype=T64)
    a = sdediff.sample(sde, score, x_T.shape, solver="torchsde:heun", noise_scale=0.0, steps=40, x_init=x_T)
    b = sdediff.sample(sde, score, x_T.shape, solver="heun", steps=40, x_init=x_T)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_torchsde_euler_and_milstein_coincide_for_additive_noise():
    """The diffusion does not depend on x, so Milstein's correction g g' vanishes: the same samples as Euler."""
    assert torch.equal(run("vp", "torchsde:euler", 64, 30), run("vp", "torchsde:milstein", 64, 30))


SOLVERS = ["ddpm", "sde_dpm_solver", "torchsde:euler", "torchsde:srk", "torchsde:heun", "torchsde:reversible_heun"]


@pytest.mark.filterwarnings("ignore:torchsde's reversible_heun")
def test_same_seed_same_samples_and_independent_of_global_rng():
    sde = sdediff.VPSDE()
    assert_seeded(sde, MIXTURE.score_fn(sde), SOLVERS)


@pytest.mark.filterwarnings("ignore:torchsde's reversible_heun")
def test_nfe_counts():
    sde = sdediff.VPSDE()
    # torchsde: +1 for sdeint's shape check, +1 more for reversible_heun's initial state; srk re-evaluates
    # the drift of earlier stages (1 + 2 + 3 + 4 per step)
    expected = {"ddpm": 10, "sde_dpm_solver": 10, "torchsde:euler": 11, "torchsde:milstein": 11,
                "torchsde:euler_heun": 11, "torchsde:heun": 21, "torchsde:midpoint": 21, "torchsde:log_ode": 21,
                "torchsde:srk": 101, "torchsde:reversible_heun": 12}
    assert_nfe_counts(sde, MIXTURE.score_fn(sde), expected)


@pytest.mark.filterwarnings("ignore:torchsde's reversible_heun")
def test_any_shape_and_dtype():
    sde = sdediff.VPSDE()
    v = 0.25

    def score(x, t):
        m, s = sde.mean_coeff(t), sde.marginal_std(t)
        return -x / (m**2 * v + s**2).reshape(-1, *[1] * (x.dim() - 1))

    for dtype in (torch.float32, T64):
        for shape in [(6,), (6, 3), (6, 2, 4), (6, 1, 4, 4)]:
            for solver in SOLVERS:
                x = sdediff.sample(sde, score, shape, solver=solver, steps=10, generator=gen(0), dtype=dtype)
                assert x.shape == shape and x.dtype == dtype and torch.isfinite(x).all(), (solver, shape)
    # a float32 grid of small steps is uniform only up to rounding (here 0.6% of a step)
    x = sdediff.sample(sde, score, (4, 2), solver="torchsde:euler", steps=1000, eps=0.99, dtype=torch.float32)
    assert torch.isfinite(x).all()


def test_torchsde_trajectory_callback_and_progress():
    sde = sdediff.VESDE()
    x_T = sde.prior_sample((16, 2), generator=gen(0), dtype=T64)
    seen = []
    info = sdediff.sample(sde, MIXTURE.score_fn(sde), (16, 2), solver="torchsde:srk", steps=12, generator=gen(0),
                          x_init=x_T, keep_trajectory=True, callback=lambda i, t, x: seen.append((i, float(t), x)))
    assert info.trajectory.shape == (13, 16, 2)
    assert torch.equal(info.trajectory[0], x_T) and torch.equal(info.trajectory[-1], info.samples)
    assert [i for i, _, _ in seen] == list(range(12))
    assert seen[-1][1] == pytest.approx(1e-3) and torch.equal(seen[-1][2], info.samples)
    assert info.nfe == 12 * 10 + 1
    plain = sdediff.sample(sde, MIXTURE.score_fn(sde), (16, 2), solver="torchsde:srk", steps=12, generator=gen(0),
                           x_init=x_T, progress=True)
    torch.testing.assert_close(plain, info.samples)


def test_bad_options_raise_clear_errors():
    sde = sdediff.VPSDE()
    score = MIXTURE.score_fn(sde)
    with pytest.raises(ValueError, match="variance must be one of 'posterior', 'beta'; got 'fixedlarge'"):
        sdediff.sample(sde, score, (4, 2), solver="ddpm", variance="fixedlarge")
    with pytest.raises(TypeError, match="variance"):
        sdediff.sample(sde, score, (4, 2), solver="ancestral", variance=None)
    for order, error in ((0, ValueError), (3, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="order must be one of 1, 2"):
            sdediff.sample(sde, score, (4, 2), solver="sde_dpm_solver", order=order)
    with pytest.raises(ValueError, match="solver_type must be one of 'midpoint', 'heun'"):
        sdediff.sample(sde, score, (4, 2), solver="sde_dpm_solver", solver_type="logrho")
    with pytest.raises(TypeError, match="lower_order_final"):
        sdediff.sample(sde, score, (4, 2), solver="sde_dpm_solver", lower_order_final="yes")
    with pytest.raises(ValueError, match="unknown torchsde method 'rk4'.*euler.*srk"):
        sdediff.sample(sde, score, (4, 2), solver="torchsde:rk4")
    with pytest.raises(ValueError, match="unknown torchsde method 'adjoint_reversible_heun'"):
        sdediff.sample(sde, score, (4, 2), solver="torchsde:adjoint_reversible_heun")
    with pytest.raises(TypeError, match="names its method already"):
        sdediff.sample(sde, score, (4, 2), solver="torchsde:srk", method="euler")
    with pytest.raises(ValueError, match="noise_scale"):
        sdediff.sample(sde, score, (4, 2), solver="torchsde:euler", noise_scale=-1.0)
    with pytest.raises(TypeError, match="unknown option"):
        sdediff.sample(sde, score, (4, 2), solver="ddpm", order=2)
    with pytest.raises(ValueError, match="uniform time grid"):
        sdediff.sample(sde, score, (4, 2), solver="torchsde:euler", steps=10, time_grid="log_snr")
    for solver in ("ddpm", "sde_dpm_solver"):
        with pytest.raises(TypeError, match="LinearSDE"):
            sdediff.sample(OU(), score, (4, 2), solver=solver, steps=3)
    assert "torchsde:<method>" in sdediff.available_solvers()


def test_non_finite_values_are_reported():
    sde = sdediff.VPSDE()

    def exploding(x, t):
        return torch.where(t[:, None] < 0.5, torch.full_like(x, float("nan")), -x)

    with pytest.raises(FloatingPointError, match=r"'sde_dpm_solver' produced non-finite values at step 6 of 10"):
        sdediff.sample(sde, exploding, (4, 2), solver="sde_dpm_solver", steps=10, eps=0.1, generator=gen(0))
    with pytest.raises(FloatingPointError, match="'torchsde:heun' produced non-finite values"):
        sdediff.sample(sde, exploding, (4, 2), solver="torchsde:heun", steps=10, eps=0.1, generator=gen(0))
