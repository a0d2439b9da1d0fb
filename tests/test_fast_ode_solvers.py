"""Few-NFE probability-flow solvers (sdediff/solvers/exponential.py) against truth.

- Convergence order: on the 2-D Gaussian mixture of test_sampling with its exact score, from exact p_T samples,
  the RMS pathwise error against a tight adaptive solve (dopri8, rtol = atol = 1e-11) falls by ~2^order when
  the number of steps doubles.
- Exactness: for point-mass data (x̂₀ ≡ μ, and ε̂ constant along every path) every solver here is exact on any
  grid and any linear SDE; for a prediction that is a polynomial in λ (or in σ) the singlestep DPM-Solvers and
  EDM's Heun step reproduce the closed-form solution.
- Few-NFE accuracy against Heun at the same NFE, under VP and VE (the numbers are printed; run with -s).
- Stochastic variants (DDIM with eta = 1, EDM churn) against exact samples of p_eps.

Measured RMS errors at 10 / 20 NFE (1000 samples, eps = 1e-3; grid in brackets):

    VE  heun [uniform] 5.3 / 0.67     heun [karras] 0.94 / 0.25    edm_heun [karras] 0.65 / 0.10
        dpm_solver 2M [log_snr] 0.15 / 0.041   3M [log_snr] 0.085 / 0.023   lms [karras] 0.18 / 0.053
    VP  heun [uniform] 0.14 / 0.042   heun [log_snr] 0.26 / 0.11    heun [quadratic] 0.11 / 0.022
        dpm_solver 2M [log_snr] 0.20 / 0.064   3M [log_snr] 0.10 / 0.049   3M [quadratic] 0.17 / 0.015

So under VE the exponential integrators are 6-35x more accurate than Heun at equal NFE; under VP, where Heun
in t is already well suited, this 2-D mixture gives them only a ~2x edge at 10-20 NFE on the same grid (the
error there comes from the sharp mid-SNR structure of the mixture, not from stiffness); the gain grows with
NFE as the order takes over (7x at 80 NFE, see test_few_nfe_accuracy_against_heun).
"""

import math

import pytest
import torch
from problems import EPS, MIXTURE, OU, SDES, T64, check_against_exact, custom_linear_sde, gen, rms_error, run

import sdediff
import sdediff.solvers.exponential  # noqa: F401  (registers dpm_solver, ddim, lms, edm_heun)
from sdediff.solvers.exponential import adams_bashforth_weights, phi_terms


def bcast(c, x):
    return c.reshape(-1, *[1] * (x.dim() - 1))


# --- convergence order ------------------------------------------------------------------------------
MS, SS = (100, 200, 400), (100, 200, 400)
CONVERGENCE = [
    # solver, options, order, steps, grid, tolerance on the observed rate
    ("ddim", {}, 1, (800, 1600, 3200), "uniform", 0.25),
    ("dpm_solver", {"order": 2}, 2, MS, "log_snr", 0.3),
    ("dpm_solver", {"order": 3}, 3, MS, "log_snr", 0.3),
    ("dpm_solver", {"order": 2, "prediction": "noise"}, 2, MS, "log_snr", 0.3),
    ("dpm_solver", {"order": 2, "solver_type": "midpoint"}, 2, MS, "log_snr", 0.3),
    ("dpm_solver", {"order": 2, "solver_type": "midpoint", "prediction": "noise"}, 2, MS, "log_snr", 0.3),
    ("dpm_solver", {"order": 3, "prediction": "noise"}, 3, MS, "log_snr", 0.3),
    ("dpm_solver", {"order": 2, "method": "singlestep"}, 2, SS, "log_snr", 0.3),
    ("dpm_solver", {"order": 3, "method": "singlestep"}, 3, SS, "log_snr", 0.3),
    ("dpm_solver", {"order": 2, "method": "singlestep", "prediction": "noise"}, 2, SS, "log_snr", 0.3),
    ("dpm_solver", {"order": 3, "method": "singlestep", "prediction": "noise"}, 3, SS, "log_snr", 0.3),
    # Adams–Bashforth: the lower-order start-up steps cap the observed rate slightly below the order
    ("lms", {"order": 2}, 2, MS, "uniform", 0.5),
    ("lms", {"order": 3}, 3, MS, "uniform", 0.5),
    ("lms", {"order": 4}, 4, MS, "uniform", 0.5),
    ("edm_heun", {}, 2, (50, 100, 200), "karras", 0.3),
]


@pytest.mark.parametrize("solver,options,order,steps,grid,tol", CONVERGENCE,
                         ids=[f"{c[0]}-{'-'.join(map(str, c[1].values()))}" for c in CONVERGENCE])
def test_convergence_order_on_mixture(solver, options, order, steps, grid, tol):
    """Doubling the steps divides the RMS pathwise error by ~2^order (VP, eps = 1e-3). The step counts sit past
    the point where every path stays in its mode's basin (a first-order solver needs ~1000 steps for that)."""
    errs = [rms_error("vp", solver, n, grid, **options) for n in steps]
    rates = [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]
    print(f"vp {solver} {options} [{grid}] steps {steps}: errors {errs}, rates {rates}")
    assert all(abs(r - order) < tol for r in rates), (errs, rates)


@pytest.mark.parametrize("name", ["ve", "subvp"])
@pytest.mark.parametrize("solver,options,order,steps", [("dpm_solver", {"order": 3}, 3, (100, 200, 400)),
                                                        ("edm_heun", {}, 2, (50, 100, 200))])
def test_convergence_order_other_sdes(name, solver, options, order, steps):
    errs = [rms_error(name, solver, n, "karras", **options) for n in steps]
    rates = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert all(abs(r - order) < 0.3 for r in rates), (errs, rates)


def test_ddim_is_first_order_dpm_solver_and_ancestral_at_eta_1():
    """Deterministic DDIM = DPM-Solver-1 in either form; DDIM with eta = 1 = ancestral sampling (same noise)."""
    sde = sdediff.VPSDE()
    score = MIXTURE.score_fn(sde)
    x_T = torch.randn(64, 2, generator=gen(0), dtype=T64)
    kw = dict(steps=15, x_init=x_T, time_grid="karras")
    x = sdediff.sample(sde, score, x_T.shape, solver="ddim", **kw)
    for options in [{}, {"prediction": "noise"}, {"method": "singlestep"}]:
        y = sdediff.sample(sde, score, x_T.shape, solver="dpm_solver", order=1, **options, **kw)
        torch.testing.assert_close(y, x, rtol=1e-12, atol=1e-12)
    a = sdediff.sample(sde, score, (64, 2), solver="ddim", eta=1.0, steps=30, generator=gen(3), dtype=T64)
    b = sdediff.sample(sde, score, (64, 2), solver="ancestral", steps=30, generator=gen(3), dtype=T64)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# --- exactness ----------------------------------------------------------------------------------------
DETERMINISTIC = [
    ("ddim", {}), ("edm_heun", {}),
    *[("lms", {"order": k}) for k in (1, 2, 3, 4)],
    *[("dpm_solver", {"order": k, "method": m, "prediction": p})
      for k in (1, 2, 3) for m in ("multistep", "singlestep") for p in ("data", "noise")],
]


@pytest.mark.parametrize("name", ["vp", "ve", "subvp", "custom"])
def test_point_mass_data_is_solved_exactly(name):
    r"""Data δ_μ: score (mμ - x)/s², paths x_t = m_t μ + (s_t/s_T)(x_T - m_T μ). Along them x̂₀ = μ and ε̂ are
    constant, so every exponential integrator (and Heun / AB in σ, where y is linear in σ) is exact on any grid,
    here a rough 4-step one; Heun in t is not."""
    sde = custom_linear_sde() if name == "custom" else SDES[name]()
    mu = torch.tensor([1.5, -0.5], dtype=T64)

    def score(x, t):
        m, s = bcast(sde.mean_coeff(t), x), bcast(sde.marginal_std(t), x)
        return (m * mu - x) / s**2

    grid = [sde.T, 0.7, 0.2, 0.05, 0.01]
    x_T = 3 * torch.randn(32, 2, generator=gen(1), dtype=T64)
    ends = torch.tensor([sde.T, 0.01], dtype=T64)
    (m_T, m_e), (s_T, s_e) = sde.mean_coeff(ends), sde.marginal_std(ends)
    exact = m_e * mu + (s_e / s_T) * (x_T - m_T * mu)
    for solver, options in DETERMINISTIC:
        x = sdediff.sample(sde, score, x_T.shape, solver=solver, x_init=x_T, time_grid=grid, **options)
        torch.testing.assert_close(x, exact, rtol=1e-10, atol=1e-10, msg=lambda m, s=solver, o=options: f"{s} {o}: {m}")
    heun = sdediff.sample(sde, score, x_T.shape, solver="heun", x_init=x_T, time_grid=grid)
    assert (heun - exact).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["vp", "ve"])
@pytest.mark.parametrize("prediction", ["data", "noise"])
@pytest.mark.parametrize("order", [2, 3])
def test_singlestep_exact_for_prediction_linear_in_lambda(name, prediction, order):
    r"""With a prediction P(λ) = α + βλ that ignores x, the flow has the closed form
    data:  x_t = (s_t/s_s) x_s + s_t [e^λ (α + β(λ - 1))]_{λ_s}^{λ_t},
    noise: x_t = (m_t/m_s) x_s + m_t [e^{-λ} (α + β(λ + 1))]_{λ_s}^{λ_t};
    singlestep DPM-Solver-2 and -3 reproduce it on any grid (this checks the φ coefficients and the
    intermediate times found by bisection)."""
    sde = SDES[name]()
    alpha, beta = torch.tensor([0.3, -1.0], dtype=T64), torch.tensor([0.2, 0.5], dtype=T64)

    def prediction_at(t):
        lam = (sde.mean_coeff(t).log() - sde.marginal_std(t).log())[:, None]
        return alpha + beta * lam

    def score(x, t):
        m, s = bcast(sde.mean_coeff(t), x), bcast(sde.marginal_std(t), x)
        return (m * prediction_at(t) - x) / s**2 if prediction == "data" else -prediction_at(t) / s

    grid = [sde.T, 0.6, 0.25, 0.1, 0.02]
    ends = torch.tensor([sde.T, 0.02], dtype=T64)
    (m_s, m_t), (s_s, s_t) = sde.mean_coeff(ends), sde.marginal_std(ends)
    l_s, l_t = (m_s / s_s).log(), (m_t / s_t).log()
    x_T = torch.randn(16, 2, generator=gen(2), dtype=T64)
    if prediction == "data":
        F = lambda lam: lam.exp() * (alpha + beta * (lam - 1))  # noqa: E731
        exact = (s_t / s_s) * x_T + s_t * (F(l_t) - F(l_s))
    else:
        F = lambda lam: (-lam).exp() * (alpha + beta * (lam + 1))  # noqa: E731
        exact = (m_t / m_s) * x_T + m_t * (F(l_t) - F(l_s))
    x = sdediff.sample(sde, score, x_T.shape, solver="dpm_solver", order=order, method="singlestep",
                       prediction=prediction, x_init=x_T, time_grid=grid)
    torch.testing.assert_close(x, exact, rtol=1e-10, atol=1e-10)
    if order == 2:  # multistep starts with a first-order step, which is not exact here
        ms = sdediff.sample(sde, score, x_T.shape, solver="dpm_solver", order=2, prediction=prediction, x_init=x_T,
                            time_grid=grid)
        assert (ms - exact).abs().max() > 1e-6


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_edm_heun_exact_for_noise_linear_in_sigma(name):
    r"""ε̂(σ) = α + βσ: dy/dσ = ε̂ gives y_t = y_s + α(σ_t - σ_s) + β(σ_t² - σ_s²)/2, which the trapezoid rule
    integrates exactly."""
    sde = SDES[name]()
    alpha, beta = torch.tensor([0.3, -1.0], dtype=T64), torch.tensor([0.2, 0.05], dtype=T64)

    def score(x, t):
        m, s = sde.mean_coeff(t)[:, None], sde.marginal_std(t)[:, None]
        return -(alpha + beta * s / m) / s

    ends = torch.tensor([sde.T, EPS], dtype=T64)
    m, s = sde.mean_coeff(ends), sde.marginal_std(ends)
    sig = s / m
    x_T = torch.randn(16, 2, generator=gen(2), dtype=T64)
    exact = m[1] * (x_T / m[0] + alpha * (sig[1] - sig[0]) + beta * (sig[1] ** 2 - sig[0] ** 2) / 2)
    x = sdediff.sample(sde, score, x_T.shape, solver="edm_heun", steps=7, eps=EPS, x_init=x_T, time_grid="karras")
    torch.testing.assert_close(x, exact, rtol=1e-10, atol=1e-10)


def test_coefficient_helpers():
    """phi_terms against the integrals they stand for; the AB weights integrate polynomials exactly."""
    z = torch.tensor([-3.0, -0.7, -0.4, -1e-3, 1e-3, 0.3, 0.6, 2.0], dtype=T64)
    theta = torch.linspace(0, 1, 200_001, dtype=T64)[:, None]
    for j, psi in enumerate(phi_terms(z, 3).unbind(-1), start=1):
        # psi_j(z) = z^j phi_j(z), phi_j(z) = int_0^1 e^{(1-θ)z} θ^{j-1}/(j-1)! dθ (trapezoid, fine grid)
        f = (1 - theta).mul(z).exp() * theta ** (j - 1) / math.factorial(j - 1)
        integral = torch.trapezoid(f, theta, dim=0)
        torch.testing.assert_close(psi, z**j * integral, rtol=1e-9, atol=0)
    sigma = torch.tensor([80.0, 30.0, 9.0, 4.0, 1.2, 0.5, 0.1], dtype=T64)
    b = adams_bashforth_weights(sigma, 4)
    for i in range(len(sigma) - 1):
        k = min(4, i + 1)
        for p in range(k):  # a polynomial of degree < k sampled at the nodes is integrated exactly
            nodes = sigma[i - torch.arange(k)]
            exact = (sigma[i + 1] ** (p + 1) - sigma[i] ** (p + 1)) / (p + 1)
            torch.testing.assert_close((b[i, :k] * nodes**p).sum(), exact, rtol=1e-11, atol=1e-11)
        assert (b[i, k:] == 0).all()


# --- few-NFE accuracy against Heun ----------------------------------------------------------------------
def test_few_nfe_accuracy_against_heun():
    """Equal NFE: Heun takes NFE/2 steps, the multistep solvers NFE steps. Errors over 1000 paths (printed)."""
    table = {}
    for name in ["vp", "ve"]:
        for nfe in (10, 20, 80) if name == "vp" else (10, 20):
            row = table[name, nfe] = {}
            for grid in ["uniform", "log_snr", "karras"]:
                row["heun", grid] = rms_error(name, "heun", nfe // 2, grid, n=1000)
            for order in (2, 3):
                row[f"dpm{order}M", "log_snr"] = rms_error(name, "dpm_solver", nfe, "log_snr", n=1000, order=order)
            row["edm_heun", "karras"] = rms_error(name, "edm_heun", nfe // 2, "karras", n=1000)
            row["lms", "karras"] = rms_error(name, "lms", nfe, "karras", n=1000)
            print(f"{name} {nfe:3d} NFE: " + "  ".join(f"{s}[{g}]={e:.3g}" for (s, g), e in row.items()))
    for nfe in (10, 20):
        row = table["ve", nfe]
        for solver in ("dpm2M", "dpm3M"):
            # VE: >= 5x below Heun on the default grid and on its best grid here (karras)
            assert 5 * row[solver, "log_snr"] < min(row["heun", "uniform"], row["heun", "karras"]), (nfe, row)
        # VP: about 2x below Heun on the same grid at 10-20 NFE
        row = table["vp", nfe]
        assert 2 * row["dpm3M", "log_snr"] < row["heun", "log_snr"], (nfe, row)
    row = table["vp", 80]
    assert 5 * row["dpm3M", "log_snr"] < row["heun", "log_snr"] and 3 * row["dpm3M", "log_snr"] < row["heun", "uniform"]


# --- stochastic variants against exact samples -------------------------------------------------------
@pytest.mark.parametrize("name", ["vp", "ve"])
@pytest.mark.parametrize("solver,steps,options", [
    ("ddim", 400, {"eta": 1.0, "time_grid": "log_snr"}),
    ("ddim", 300, {"eta": 0.5, "time_grid": "log_snr"}),
    ("edm_heun", 100, {"churn": 40.0, "time_grid": "karras"}),
])
def test_stochastic_variants_match_exact_samples(name, solver, steps, options):
    check_against_exact(name, run(name, solver, 4000, steps, **options), f"{name} {solver} {options}")


def test_stochastic_variants_are_reproducible_and_use_the_generator():
    sde = sdediff.VPSDE()
    score = MIXTURE.score_fn(sde)
    for solver, options in [("ddim", {"eta": 0.7}), ("edm_heun", {"churn": 20.0})]:
        a = sdediff.sample(sde, score, (32, 2), solver=solver, steps=10, generator=gen(7), **options)
        torch.manual_seed(123)
        b = sdediff.sample(sde, score, (32, 2), solver=solver, steps=10, generator=gen(7), **options)
        c = sdediff.sample(sde, score, (32, 2), solver=solver, steps=10, generator=gen(8), **options)
        assert torch.equal(a, b) and not torch.allclose(a, c), solver
        assert sdediff.solvers.get_solver(solver, **options).stochastic
    x_T = torch.randn(32, 2, generator=gen(0))
    for solver, options in [("ddim", {}), ("edm_heun", {"churn": 0.0})]:
        assert not sdediff.solvers.get_solver(solver, **options).stochastic
        a = sdediff.sample(sde, score, (32, 2), solver=solver, steps=10, x_init=x_T, generator=gen(7), **options)
        b = sdediff.sample(sde, score, (32, 2), solver=solver, steps=10, x_init=x_T, generator=gen(8), **options)
        assert torch.equal(a, b), solver


def test_churn_outside_its_sigma_range_is_deterministic():
    """s_tmin / s_tmax bound where churn applies: a range no grid level falls in gives plain Heun."""
    sde = sdediff.VESDE()
    score = MIXTURE.score_fn(sde)
    x_T = 50 * torch.randn(32, 2, generator=gen(0), dtype=T64)
    kw = dict(steps=12, x_init=x_T, time_grid="karras")
    plain = sdediff.sample(sde, score, x_T.shape, solver="edm_heun", **kw)
    off = sdediff.sample(sde, score, x_T.shape, solver="edm_heun", churn=30.0, s_tmin=1e3, generator=gen(1), **kw)
    torch.testing.assert_close(off, plain, rtol=1e-12, atol=1e-12)


# --- interface ----------------------------------------------------------------------------------------
def test_registered_and_nfe_counts():
    assert {"dpm_solver", "ddim", "lms", "edm_heun"} <= set(sdediff.available_solvers())
    sde = sdediff.VPSDE()
    score = MIXTURE.score_fn(sde)
    expected = [("ddim", {}, 10), ("ddim", {"eta": 1.0}, 10), ("lms", {}, 10), ("edm_heun", {}, 20),
                ("edm_heun", {"churn": 5.0}, 20),
                *[("dpm_solver", {"order": k}, 10) for k in (1, 2, 3)],
                *[("dpm_solver", {"order": k, "method": "singlestep"}, 10 * k) for k in (1, 2, 3)]]
    for solver, options, nfe in expected:
        info = sdediff.sample(sde, score, (8, 2), solver=solver, steps=10, generator=gen(0), return_info=True,
                              **options)
        assert info.nfe == nfe, (solver, options)
        info = sdediff.sample(sde, score, (8, 2), solver=solver, steps=10, generator=gen(0), return_info=True,
                              denoise=True, **options)
        assert info.nfe == nfe + 1, (solver, options)


def test_lower_order_final_only_on_short_grids():
    """lower_order_final (default) lowers the order of the last steps on grids of fewer than 15 steps only."""
    sde = sdediff.VPSDE()
    score = MIXTURE.score_fn(sde)
    x_T = torch.randn(16, 2, generator=gen(0), dtype=T64)
    for steps, same in [(10, False), (15, True)]:
        a = sdediff.sample(sde, score, x_T.shape, solver="dpm_solver", order=3, steps=steps, x_init=x_T)
        b = sdediff.sample(sde, score, x_T.shape, solver="dpm_solver", order=3, steps=steps, x_init=x_T,
                           lower_order_final=False)
        assert torch.equal(a, b) == same, steps


def test_lower_order_final_rules_per_step():
    """The order of each step, read off the coefficient table (the history columns a row uses): True lowers the
    last steps to N - i below 15 steps, "diffusers" lowers only the last to 2 below 14 (it counts its final step to
    sigma = 0), False never; the warm start is the same for all."""
    sde = sdediff.VPSDE()

    def orders(steps, rule):
        scheme = sdediff.solvers.get_solver("dpm_solver", order=3, lower_order_final=rule).coefficients(
            sde, sdediff.solvers.grids.log_snr(sde, steps, 1e-3).to(T64))
        return [1 + int((row != 0).sum()) for row in scheme.w]

    assert orders(10, True) == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]
    assert orders(10, "diffusers") == [1, 2, 3, 3, 3, 3, 3, 3, 3, 2]
    assert orders(10, False) == [1, 2] + [3] * 8
    assert orders(13, "diffusers")[-1] == 2 and orders(14, "diffusers")[-1] == 3 and orders(14, True)[-1] == 1
    assert orders(15, True) == orders(15, "diffusers") == orders(15, False)


def test_bad_options_raise_clear_errors():
    sde = sdediff.VPSDE()
    score = MIXTURE.score_fn(sde)
    bad = [("dpm_solver", {"order": 4}, "order"), ("dpm_solver", {"order": True}, "order"),
           ("dpm_solver", {"order": 2.0}, "order must be one of 1, 2, 3"),
           ("dpm_solver", {"method": "adaptive"}, "method.*multistep.*singlestep"),
           ("dpm_solver", {"prediction": "v"}, "prediction.*data.*noise"),
           ("dpm_solver", {"lower_order_final": "yes"}, "lower_order_final"),
           ("dpm_solver", {"solver_type": "bh2"}, "solver_type.*heun.*midpoint"),
           ("dpm_solver", {"solver_type": "midpoint", "method": "singlestep"}, "multistep"),
           ("ddim", {"eta": -0.1}, "eta"), ("ddim", {"eta": float("nan")}, "eta"),
           ("lms", {"order": 5}, "order"), ("lms", {"order": 0}, "order"),
           ("edm_heun", {"churn": -1.0}, "churn"), ("edm_heun", {"s_noise": -1.0}, "s_noise"),
           ("edm_heun", {"s_tmin": 2.0, "s_tmax": 1.0}, "s_tmax")]
    for solver, options, match in bad:
        with pytest.raises(ValueError, match=match):
            sdediff.sample(sde, score, (4, 2), solver=solver, steps=3, **options)
    with pytest.raises(TypeError, match="unknown option"):
        sdediff.sample(sde, score, (4, 2), solver="ddim", order=2)
    for solver in ["dpm_solver", "ddim", "lms", "edm_heun"]:
        with pytest.raises(TypeError, match="LinearSDE"):
            sdediff.sample(OU(), score, (4, 2), solver=solver, steps=3)


SOLVERS = [("dpm_solver", {"order": 3}), ("dpm_solver", {"order": 3, "method": "singlestep", "prediction": "noise"}),
           ("ddim", {}), ("ddim", {"eta": 1.0}), ("lms", {}), ("edm_heun", {}), ("edm_heun", {"churn": 10.0}),
           ("unipc", {"order": 3}), ("unipc", {"order": 2, "prediction": "noise", "variant": "bh1"}),
           ("ipndm", {}), ("deis", {}), ("dpm_solver", {"solver_type": "midpoint"})]


def test_any_shape_float32_and_trajectory():
    sde = sdediff.VESDE()
    v = 0.25

    def score(x, t):
        m, s = bcast(sde.mean_coeff(t), x), bcast(sde.marginal_std(t), x)
        return -x / (m**2 * v + s**2)

    for shape in [(6,), (6, 3), (6, 1, 4, 4)]:
        x_T = 50 * torch.randn(shape, generator=gen(0), dtype=T64)
        for solver, options in SOLVERS:
            info = sdediff.sample(sde, score, shape, solver=solver, steps=8, x_init=x_T.float(), generator=gen(1),
                                  keep_trajectory=True, **options)
            x = info.samples
            assert x.shape == shape and x.dtype == torch.float32 and torch.isfinite(x).all(), (solver, shape)
            assert info.trajectory.shape == (9, *shape)
            if not sdediff.solvers.get_solver(solver, **options).stochastic:  # float32 agrees with float64
                x64 = sdediff.sample(sde, score, shape, solver=solver, steps=8, x_init=x_T, **options)
                torch.testing.assert_close(x, x64.float(), rtol=1e-4, atol=1e-4)


def test_usable_as_pc_predictor():
    sde = sdediff.VPSDE()
    info = sdediff.sample(sde, MIXTURE.score_fn(sde), (16, 2), solver="pc", predictor="dpm_solver", steps=10,
                          generator=gen(0), return_info=True)
    assert info.nfe == 20 and torch.isfinite(info.samples).all()


def test_no_host_sync_inside_step(monkeypatch):
    """A step never reads a value of the state, the score or the grid to the host: every such Tensor method raises
    while a step runs (``StepRun.advance`` for step solvers, ``SchemeRun.advance`` for coefficient tables). The one
    exception is by design: the float64 coefficient tables that live on the host, read a row at a time. Sampling runs
    in float32 here, so every other tensor is float32 and guarded."""
    sde = sdediff.VPSDE()

    def score(x, t):
        m, s = bcast(sde.mean_coeff(t), x), bcast(sde.marginal_std(t), x)
        return -x / (m**2 * 0.5 + s**2)

    def guard(name):
        original = getattr(torch.Tensor, name)

        def checked(self, *args, **kwargs):
            if not (self.dtype == torch.float64 and self.device.type == "cpu"):
                raise AssertionError(f"host sync inside step: Tensor.{name} on a {self.dtype} tensor")
            return original(self, *args, **kwargs)

        return checked

    for run_class in (sdediff.solvers.StepRun, sdediff.solvers.SchemeRun):
        advance = run_class.advance

        def guarded(*args, advance=advance):
            with monkeypatch.context() as mp:
                for attr in ("__bool__", "__float__", "__int__", "item", "tolist", "cpu", "numpy"):
                    mp.setattr(torch.Tensor, attr, guard(attr))
                return advance(*args)

        monkeypatch.setattr(run_class, "advance", guarded)
    for solver, options in SOLVERS:
        x = sdediff.sample(sde, score, (8, 3), solver=solver, steps=6, generator=gen(0), **options)
        assert torch.isfinite(x).all() and x.dtype == torch.float32


@pytest.mark.gpu
def test_cuda_no_sync_and_matches_cpu():
    sde = sdediff.VPSDE()

    def score(x, t):
        m, s = bcast(sde.mean_coeff(t), x), bcast(sde.marginal_std(t), x)
        return -x / (m**2 * 0.5 + s**2)

    x_T = torch.randn(256, 2, generator=gen(0), dtype=T64)
    for solver, options in SOLVERS:
        the_solver = sdediff.solvers.get_solver(solver, **options)
        step = the_solver.step

        def synced(*args, step=step):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return step(*args)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        the_solver.step = synced
        cuda_gen = torch.Generator(device="cuda").manual_seed(1)
        x = sdediff.sample(sde, score, x_T.shape, solver=the_solver, steps=10, x_init=x_T.cuda(), generator=cuda_gen)
        assert x.device.type == "cuda" and torch.isfinite(x).all()
        if not the_solver.stochastic:
            cpu = sdediff.sample(sde, score, x_T.shape, solver=solver, steps=10, x_init=x_T, **options)
            torch.testing.assert_close(x.cpu(), cpu, rtol=1e-8, atol=1e-8)
