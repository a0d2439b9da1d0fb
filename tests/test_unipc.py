"""UniPC (sdediff/solvers/unipc.py) against truth.

- Convergence order on the 2-D Gaussian mixture with its exact score (helpers of problems.py): doubling
  the steps divides the RMS pathwise error by ~2^(order + 1) with the corrector and ~2^order without it.
- Exactness: point-mass data (x̂₀ and ε̂ constant along every path) is solved exactly on any grid and linear SDE;
  the per-step weights integrate a prediction that is a polynomial in λ exactly (the order conditions).
- Interface: N steps cost N NFE, the corrector costs no extra NFE, options are checked. The shared checks of
  test_fast_ode_solvers (any shape, float32, no host sync in step, CUDA) run UniPC through its SOLVERS list.
"""

import math

import pytest
import torch
from problems import MIXTURE, OU, SDES, T64, custom_linear_sde, gen, ode_reference, rms_error

import sdediff
from sdediff.solvers.tables import kernel
from sdediff.solvers.unipc import unipc_coefficients

STEPS = (100, 200, 400)
CONVERGENCE = [
    # options, expected order, grid
    ({"order": 1}, 2, "log_snr"),
    ({"order": 2}, 3, "log_snr"),
    ({"order": 3}, 4, "log_snr"),
    ({"order": 3, "prediction": "noise"}, 4, "log_snr"),
    ({"order": 3, "variant": "bh1"}, 4, "log_snr"),
    ({"order": 2, "corrector": False}, 2, "log_snr"),
    ({"order": 3, "corrector": False}, 3, "log_snr"),
]


@pytest.mark.parametrize("options,order,grid", CONVERGENCE, ids=[f"{c[0]}-{c[2]}" for c in CONVERGENCE])
def test_convergence_order_vp(options, order, grid):
    errs = [rms_error("vp", "unipc", n, grid, **options) for n in STEPS]
    rates = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    print(f"vp unipc {options} [{grid}]: errors {errs}, rates {rates}")
    assert all(abs(r - order) < 0.35 for r in rates), (errs, rates)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ve", "subvp"])
@pytest.mark.parametrize("options,order", [({"order": 2}, 3), ({"order": 3}, 4)])
def test_convergence_order_other_sdes(name, options, order):
    errs = [rms_error(name, "unipc", n, "karras", **options) for n in STEPS]
    rates = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert all(abs(r - order) < 0.4 for r in rates), (errs, rates)


def test_beats_dpm_solver_of_the_same_order_at_equal_nfe():
    """The free corrector: UniPC-k is a full order above DPM-Solver-kM at the same NFE, so its error is several
    times lower once the paths stay in their basins (here ~3x at 100 steps on VP)."""
    uni = rms_error("vp", "unipc", 100, "log_snr", order=3)
    dpm = rms_error("vp", "dpm_solver", 100, "log_snr", order=3)
    assert 2.5 * uni < dpm, (uni, dpm)


@pytest.mark.parametrize("name", ["vp", "ve", "subvp", "custom"])
def test_point_mass_data_is_solved_exactly(name):
    r"""Data δ_μ: x_t = m_t μ + (s_t/s_T)(x_T - m_T μ); x̂₀ ≡ μ and ε̂ are constant along paths, so every
    UniPC variant is exact on a rough grid (the weights of the differences multiply zeros)."""
    sde = custom_linear_sde() if name == "custom" else SDES[name]()
    mu = torch.tensor([1.5, -0.5], dtype=T64)

    def score(x, t):
        return (sde.mean_coeff(t)[:, None] * mu - x) / sde.marginal_std(t)[:, None] ** 2

    grid = [sde.T, 0.7, 0.2, 0.05, 0.01]
    x_T = 3 * torch.randn(32, 2, generator=gen(1), dtype=T64)
    ends = torch.tensor([sde.T, 0.01], dtype=T64)
    (m_T, m_e), (s_T, s_e) = sde.mean_coeff(ends), sde.marginal_std(ends)
    exact = m_e * mu + (s_e / s_T) * (x_T - m_T * mu)
    for options in [{"order": k, "prediction": p, "variant": v} for k in (1, 2, 3, 4) for p in ("data", "noise")
                    for v in ("bh1", "bh2")]:
        x = sdediff.sample(sde, score, x_T.shape, solver="unipc", x_init=x_T, time_grid=grid, **options)
        torch.testing.assert_close(x, exact, rtol=1e-9, atol=1e-9, msg=lambda m, o=options: f"{o}: {m}")


@pytest.mark.parametrize("prediction", ["data", "noise"])
def test_weights_integrate_polynomials_in_lambda_exactly(prediction):
    r"""The order conditions, checked on the weights of every full-order step of a 9-step VE grid: for a
    prediction :math:`P(\lambda) = \lambda^p` that ignores x, the step :math:`x_{i+1} - a_i x_i` must equal
    data: :math:`s_{i+1}\int e^{\lambda}P\,d\lambda`, noise: :math:`-m_{i+1}\int e^{-\lambda}P\,d\lambda` over
    :math:`[\lambda_i, \lambda_{i+1}]`; the order-4 predictor (4 nodes) for p <= 3, its corrector (5 nodes) for p <= 4."""
    sde = sdediff.VESDE()
    ts = sdediff.solvers.grids.make_grid(sde, 9, 1e-3, "log_snr", dtype=T64)
    m, s, lam = kernel(sde, ts)
    order = 4
    _, w, v = unipc_coefficients(lam, m, s, order, prediction, lower_order_final=False)
    for i in range(order - 1, len(ts) - 1):
        seg = torch.linspace(float(lam[i]), float(lam[i + 1]), 20_001, dtype=T64)
        nodes = lam[i - torch.arange(order)]
        for p in range(order + 1):
            integral = torch.trapezoid(seg**p * (seg.exp() if prediction == "data" else (-seg).exp()), seg)
            exact = s[i + 1] * integral if prediction == "data" else -m[i + 1] * integral
            corr = (v[i, :order] * nodes**p).sum() + v[i, order] * lam[i + 1] ** p
            torch.testing.assert_close(corr, exact, rtol=1e-7, atol=1e-9)
            if p < order:
                torch.testing.assert_close((w[i] * nodes**p).sum(), exact, rtol=1e-7, atol=1e-9)
    assert (w[0, 1:] == 0).all() and (v[0, 1:order] == 0).all()  # first step: no history


def test_nfe_is_steps_and_corrector_is_free():
    sde = sdediff.VPSDE()
    score = MIXTURE.score_fn(sde)
    x_T = torch.randn(8, 2, generator=gen(0), dtype=T64)
    for options in [{}, {"order": 1}, {"order": 4}, {"corrector": False}]:
        info = sdediff.sample(sde, score, x_T.shape, solver="unipc", steps=10, x_init=x_T, return_info=True, **options)
        assert info.nfe == 10, options
    assert "unipc" in sdediff.available_solvers()


def test_corrector_and_step_ratio_rule():
    """The corrector changes the result; the order is lowered at an abrupt step-size jump (the last step of a
    time-uniform VP grid with 20 steps), which keeps that step from extrapolating wildly."""
    sde, score, x_T, ref = ode_reference("vp", 256)
    runs = {c: sdediff.sample(sde, score, x_T.shape, solver="unipc", steps=20, x_init=x_T, eps=1e-3, corrector=c)
            for c in (True, False)}
    assert not torch.equal(runs[True], runs[False])
    err = float((runs[True] - ref).pow(2).mean().sqrt())
    assert err < 0.1, err
    ts = sdediff.solvers.grids.make_grid(sde, 20, 1e-3, "uniform", dtype=T64)
    m, s, lam = kernel(sde, ts)
    _, w, _ = unipc_coefficients(lam, m, s, 3, "data")
    assert (w[-1, 1:] == 0).all() and (w[-3, 1:] != 0).all()  # the last step is first order here


def test_bad_options_raise_clear_errors():
    sde = sdediff.VPSDE()
    score = MIXTURE.score_fn(sde)
    bad = [({"order": 5}, "order", ValueError), ({"order": 2.0}, "order", TypeError),
           ({"variant": "bh3"}, "variant.*bh2.*bh1", ValueError), ({"prediction": "v"}, "prediction", ValueError),
           ({"corrector": 1}, "corrector", TypeError), ({"lower_order_final": "no"}, "lower_order_final", TypeError)]
    for options, match, error in bad:
        with pytest.raises(error, match=match):
            sdediff.sample(sde, score, (4, 2), solver="unipc", steps=3, **options)
    with pytest.raises(TypeError, match="LinearSDE"):
        sdediff.sample(OU(), score, (4, 2), solver="unipc", steps=3)
