"""Weak order of the fixed-step reverse-SDE samplers, from exact moments (no Monte Carlo noise).

For Gaussian data N(μ, c²) the score of every linear SDE is linear in x, so a fixed-step sampler maps its start
x_T and its standard-normal draws z_k affinely: x_N = A x_T + b + Σ_k C_k z_k. Running the sampler once on a
batch whose rows are x_T = 0 (no noise), x_T = 1 (no noise) and x_T = 0 with z = the k-th unit draw (torch.randn
replaced by a stand-in that hands these out) reads off A, b and every C_k; from exact p_T = N(m_T μ, m_T²c² + s_T²)
the output's mean is A m_T μ + b and its variance A²(m_T²c² + s_T²) + Σ_k C_k². These are compared with the exact
p_eps moments: doubling the steps must divide the error by ~2^order (or the error is 0 to rounding, as for the
mean under the exponential integrators, which integrate the mean's linear ODE exactly, and for the mean under VE,
whose score vanishes at the mean).

The ``torchsde:<method>`` backends draw their Brownian increments from torchsde's ``BrownianInterval``; replaced
by a stand-in whose increment over step k is sqrt(h) in one row and 0 elsewhere, the same reading applies to
every method whose step is affine in the increments (torchsde's diagonal-noise SRK is not: it uses I_k^2 and
I_k^3, so it is left to the exact-sample checks).

Not covered here: ``langevin`` (annealed Langevin dynamics at each noise level is not a discretisation of the
reverse SDE: its error does not vanish with the step), the adaptive ``adaptive_sde``, ``torchsde:srk`` and
``torchsde:reversible_heun`` (unstable on the reverse drift, see its warning); test_stochastic_solvers and
test_sampling check them against exact samples.
"""

import math

import pytest
import torch
import torchsde
from problems import EPS, SDES, T64

import sdediff

MU, C2 = 1.0, 0.25


def exact_moments_error(monkeypatch, sde, solver, steps, **options):
    """(mean error, relative variance error, number of draws) of ``solver``'s output at eps (see module docstring)."""

    score = _gaussian_score(sde)
    rows = 4 * steps + 2
    draws = [0]

    def unit_draws(*size, generator=None, out=None, dtype=None, device=None, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else tuple(size)
        z = torch.zeros(shape, dtype=out.dtype if out is not None else (dtype or T64), device=device)
        k = 2 + draws[0]
        draws[0] += 1
        assert k < shape[0], "more draws than rows"
        z[k] = 1.0
        return out.copy_(z) if out is not None else z

    x_T = torch.zeros(rows, 1, dtype=T64)
    x_T[1] = 1.0
    with monkeypatch.context() as mp:
        mp.setattr(torch, "randn", unit_draws)
        x = sdediff.sample(sde, score, x_T.shape, solver=solver, steps=steps, eps=EPS, x_init=x_T,
                           generator=torch.Generator(), **options)[:, 0]
    assert draws[0] >= steps and (x[2 + draws[0]:] == x[0]).all()  # one row per draw, the rest untouched
    return _moment_errors(sde, x[:2 + draws[0]])


def _gaussian_score(sde):
    def score(x, t):
        m, s = sde.mean_coeff(t)[:, None], sde.marginal_std(t)[:, None]
        return -(x - m * MU) / (m**2 * C2 + s**2)

    return score


def _moment_errors(sde, x):
    """(mean error, relative variance error) from a run on the rows x_T = 0, x_T = 1, then one unit draw each."""
    b, a, c = x[0], x[1] - x[0], x[2:] - x[0]
    ends = torch.tensor([sde.T, EPS], dtype=T64)
    (m_T, m_e), (s_T, s_e) = sde.mean_coeff(ends), sde.marginal_std(ends)
    mean = a * m_T * MU + b
    var = a**2 * (m_T**2 * C2 + s_T**2) + (c**2).sum()
    return float(mean - m_e * MU), float(var / (m_e**2 * C2 + s_e**2) - 1)


STEPS = (200, 400, 800)
CASES = [
    # solver, options, weak order of the variance error, mean exact (exponential integrators)
    # under VE (no drift) the O(h) terms of EM's variance recursion cancel for Gaussian data: order 2 there
    ("euler_maruyama", {}, {"vp": 1, "ve": 2, "subvp": 1}, False),
    ("reverse_diffusion", {}, 1, False),
    ("pc", {}, 1, False),
    ("ancestral", {}, 1, True),
    ("ancestral", {"variance": "beta"}, 1, True),
    ("ddpm", {}, 1, True),
    ("ddim", {"eta": 0.5}, 1, True),
    ("sde_dpm_solver", {"order": 1}, 1, True),
    ("sde_dpm_solver", {}, 2, True),
    ("edm_heun", {"churn": 10.0, "time_grid": "karras"}, 2, True),
]


@pytest.mark.parametrize("name", ["vp", "ve", "subvp"])
@pytest.mark.parametrize("solver,options,order,mean_exact", CASES,
                         ids=[f"{c[0]}-{'-'.join(map(str, c[1].values()))}" for c in CASES])
def test_weak_order_on_gaussian_moments(monkeypatch, name, solver, options, order, mean_exact):
    order = order[name] if isinstance(order, dict) else order
    errs = [exact_moments_error(monkeypatch, SDES[name](), solver, n, **options) for n in STEPS]
    var_rates = [math.log2(abs(errs[i][1] / errs[i + 1][1])) for i in range(2)]
    print(f"{name} {solver} {options}: (mean, var) errors {errs}, variance rates {var_rates}")
    assert all(abs(r - order) < 0.25 for r in var_rates), (errs, var_rates)
    if mean_exact or all(abs(e[0]) < 1e-12 for e in errs):  # VE keeps the mean at μ under any of them
        assert all(abs(e[0]) < 1e-12 for e in errs), errs
    else:
        mean_rates = [math.log2(abs(errs[i][0] / errs[i + 1][0])) for i in range(2)]
        assert all(abs(r - order) < 0.25 for r in mean_rates), (errs, mean_rates)


class UnitBrownian:
    """Stands in for ``torchsde.BrownianInterval``: over grid step k (of size h) the increment is sqrt(h) in row
    2 + k, 2 sqrt(h) in the last row for k = 0 (to check that the output is linear in the draws), and 0
    elsewhere. The Levy area A that the log-ODE method asks for multiplies the diffusion's derivative in x, which
    is 0 for every SDE here (g depends on t only): it is returned as 0. Any other query fails."""

    def __init__(self, t0, t1, size, dtype, device, dt, levy_area_approximation, **kwargs):
        self.t0, self.dt, self.shape, self.dtype, self.device = float(t0), float(dt), torch.Size(size), dtype, device
        self.levy_area_approximation = levy_area_approximation

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        assert not return_U, "a method that needs the space-time Levy area"
        ta, tb = float(ta), float(tb)
        k = round((ta - self.t0) / self.dt)
        assert abs(tb - ta - self.dt) < 1e-9 and 2 + k < self.shape[0] - 2, (ta, tb)
        dw = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        dw[2 + k] = math.sqrt(tb - ta)
        if k == 0:
            dw[-1] = 2 * math.sqrt(tb - ta)
        return (dw, dw.new_zeros(*self.shape, self.shape[-1])) if return_A else dw


# torchsde method, weak order of the variance error (per SDE where it differs); the mean (VP, sub-VP) converges
# at the same order, under VE it stays at mu exactly. For additive noise Milstein is Euler-Maruyama and the
# Stratonovich Heun, midpoint and log-ODE (midpoint) schemes are of weak order 2; Euler-Heun stays first order.
TORCHSDE_CASES = [("euler", {"vp": 1, "ve": 2, "subvp": 1}), ("milstein", {"vp": 1, "ve": 2, "subvp": 1}),
                  ("heun", 2), ("midpoint", 2), ("log_ode", 2), ("euler_heun", 1)]


@pytest.mark.parametrize("name", ["vp", "ve", "subvp"])
@pytest.mark.parametrize("method,order", TORCHSDE_CASES, ids=[c[0] for c in TORCHSDE_CASES])
def test_torchsde_weak_order_on_gaussian_moments(monkeypatch, name, method, order):
    order = order[name] if isinstance(order, dict) else order
    sde = SDES[name]()
    errs = []
    for steps in STEPS:
        x_T = torch.zeros(steps + 4, 1, dtype=T64)  # 0, 1, a unit draw per step, 2, a double draw on step 0
        x_T[1], x_T[-2] = 1.0, 2.0
        with monkeypatch.context() as mp:
            mp.setattr(torchsde, "BrownianInterval", UnitBrownian)
            x = sdediff.sample(sde, _gaussian_score(sde), x_T.shape, solver=f"torchsde:{method}", steps=steps, eps=EPS,
                               x_init=x_T, generator=torch.Generator())[:, 0]
        b, a, c0 = x[0], x[1] - x[0], x[2] - x[0]
        torch.testing.assert_close(x[-2:], torch.stack([b + 2 * a, b + 2 * c0]), rtol=1e-10, atol=1e-12)  # affine
        errs.append(_moment_errors(sde, x[:-2]))
    var_rates = [math.log2(abs(errs[i][1] / errs[i + 1][1])) for i in range(2)]
    print(f"{name} torchsde:{method}: (mean, var) errors {errs}, variance rates {var_rates}")
    assert all(abs(r - order) < 0.25 for r in var_rates), (errs, var_rates)
    if name == "ve":
        assert all(abs(e[0]) < 1e-12 for e in errs), errs
    else:
        mean_rates = [math.log2(abs(errs[i][0] / errs[i + 1][0])) for i in range(2)]
        assert all(abs(r - order) < 0.25 for r in mean_rates), (errs, mean_rates)
