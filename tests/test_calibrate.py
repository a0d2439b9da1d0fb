"""Calibrated time grids (sdediff.calibrate) against truth.

The "network" is the exact score of a 2-D Gaussian mixture; errors are pathwise RMSE against a tight
reference solve. The calibrated grid is fitted on one batch of prior draws and judged on another.
"""

import itertools
import math

import pytest
import torch
from problems import EPS, MIXTURE, T64, gen

import sdediff
from sdediff import calibrate
from sdediff.calibrate import calibrate_grid
from sdediff.data import GaussianMixture
from sdediff.solvers import grids

STEPS = 6


def starts(n, seed, sde):
    return MIXTURE.marginal(sde, sde.T).sample(n, generator=gen(seed), dtype=T64)


def end_points(sde, x_T, solver="ode", steps=1, grid="uniform", **options):
    if solver == "ode":
        options = {"rtol": 1e-9, "atol": 1e-9, "method": "dopri8"}
    return sdediff.sample(sde, MIXTURE.score_fn(sde), x_T.shape, solver=solver, steps=steps, eps=EPS, x_init=x_T,
                          time_grid=grid, **options)


def rmse(x, ref):
    return float((x - ref).pow(2).mean().sqrt())


@pytest.fixture(scope="module")
def vp_calibration():
    sde = sdediff.VPSDE()
    pilot = starts(256, 1, sde)
    cal = calibrate_grid(sde, MIXTURE.score_fn(sde), pilot, STEPS, "unipc", eps=EPS, max_evals=300, order=2)
    return sde, pilot, cal


def test_calibrated_grid_beats_every_standard_grid_on_held_out_paths(vp_calibration):
    sde, _, cal = vp_calibration
    held_out = starts(512, 2, sde)
    ref = end_points(sde, held_out)
    standard = {name: rmse(end_points(sde, held_out, "unipc", STEPS, name, order=2), ref) for name in grids.GRIDS}
    calibrated = rmse(end_points(sde, held_out, "unipc", STEPS, cal.times, order=2), ref)
    print(f"held-out RMSE, {STEPS} steps: standard {standard}, calibrated {calibrated:.3g}")
    assert calibrated < 0.8 * min(standard.values()), (calibrated, standard)


def test_result_is_a_valid_grid_with_its_pilot_error_and_cost(vp_calibration):
    sde, pilot, cal = vp_calibration
    ts = cal.times
    assert ts.dtype == T64 and ts.shape == (STEPS + 1,)
    assert bool((ts[1:] < ts[:-1]).all()) and float(ts[0]) == sde.T and float(ts[-1]) == EPS
    # the reported error is the error of the returned grid on the pilot starts it was fitted on (the first 3/4),
    # never worse than the grid it started from; the last 1/4 decided that it is returned
    fit, hold = pilot[:192], pilot[192:]
    assert rmse(end_points(sde, fit, "unipc", STEPS, ts, order=2), end_points(sde, fit)) == pytest.approx(cal.rmse, rel=1e-4)
    assert rmse(end_points(sde, hold, "unipc", STEPS, ts, order=2), end_points(sde, hold)) == pytest.approx(
        cal.holdout_rmse, rel=1e-4)
    assert set(cal.start_rmse) == set(grids.GRIDS) and cal.start_rmse[cal.start] == min(cal.start_rmse.values())
    assert cal.rmse < cal.start_rmse[cal.start]
    assert cal.accepted and cal.holdout_rmse < cal.start_holdout_rmse
    assert 4 < cal.evals <= 300 and cal.search_nfe == STEPS * (cal.evals + 2) and cal.reference_nfe > 50


def test_a_sampler_given_as_a_function_is_calibrated_the_same_way():
    sde = sdediff.VESDE()
    pilot = starts(64, 3, sde)
    ref = end_points(sde, pilot)

    def euler(times, x):  # any external sampler: here sdediff's own euler, so both runs must agree
        return end_points(sde, x, "euler", len(times) - 1, times)

    kwargs = dict(eps=EPS, reference=ref, starts=("uniform", "karras"), max_evals=40, holdout=0)
    by_function = calibrate_grid(sde, MIXTURE.score_fn(sde), pilot, 4, euler, **kwargs)
    by_name = calibrate_grid(sde, MIXTURE.score_fn(sde), pilot, 4, "euler", **kwargs)
    assert torch.equal(by_function.times, by_name.times) and by_function.rmse == by_name.rmse
    assert by_function.search_nfe is None and by_name.search_nfe == 4 * by_name.evals
    assert by_function.reference_nfe is None and by_function.holdout_rmse is None


def test_a_grid_that_does_worse_on_the_holdout_is_not_returned():
    """Fitted to 4 paths and checked on 60 others, the searched grid loses to its start grid there: the start
    grid comes back, marked as not accepted."""
    sde = sdediff.VPSDE()
    pilot = starts(64, 6, sde)
    for seed_rows in range(8):  # pilots whose first 4 paths mislead the search (found quickly; usually the first)
        x = torch.cat([pilot[4 * seed_rows:4 * seed_rows + 4], pilot[32:]])
        cal = calibrate_grid(sde, MIXTURE.score_fn(sde), x, 5, "unipc", eps=EPS, max_evals=150, holdout=60 / 64)
        if not cal.accepted:
            break
    assert not cal.accepted and cal.holdout_rmse >= cal.start_holdout_rmse
    assert torch.equal(cal.times, grids.GRIDS[cal.start](sde, 5, EPS)) and cal.rmse == cal.start_rmse[cal.start]


@pytest.mark.parametrize("kwargs,match", [
    ({"steps": 1}, "steps"),
    ({"solver": "euler_maruyama"}, "stochastic"),
    ({"solver": "ddim", "eta": 1.0}, "stochastic"),
    ({"solver": "adaptive_ode"}, "own steps"),
    ({"solver": "nope"}, "unknown solver"),
    ({"starts": ("uniform", "cosine")}, "starts"),
    ({"max_evals": 0}, "max_evals"),
    ({"holdout": 1.0}, "holdout"),
    ({"x_T": torch.zeros(1, 2, dtype=T64)}, "too few"),
    ({"eps": 1.5}, "eps"),
    ({"reference": torch.zeros(3, 2, dtype=T64)}, "reference"),
    ({"x_T": torch.zeros(())}, "x_T"),
    ({"objective": "fid"}, "objective"),
    ({"loss": "huber"}, "loss"),
    ({"trim": 1.0}, "trim"),
    ({"objective": "gits", "lattice": 4}, "lattice"),
])
def test_bad_arguments_are_named(kwargs, match):
    sde = sdediff.VPSDE()
    args = {"x_T": starts(8, 4, sde), "steps": 4, "solver": "unipc", **kwargs}
    with pytest.raises(ValueError, match=match):
        calibrate_grid(sde, MIXTURE.score_fn(sde), args.pop("x_T"), args.pop("steps"), args.pop("solver"), **args)


def test_options_with_a_function_and_non_linear_sdes_are_refused():
    sde = sdediff.VPSDE()
    with pytest.raises(ValueError, match="options"):
        calibrate_grid(sde, MIXTURE.score_fn(sde), starts(8, 5, sde), 4, lambda ts, x: x, order=2)
    with pytest.raises(TypeError, match="solver"):
        calibrate_grid(sde, MIXTURE.score_fn(sde), starts(8, 5, sde), 4, 3)


# --- the dynamic-programming objectives (GITS, Align Your Steps) and the trimmed loss ------------------------------
def test_cheapest_path_is_the_brute_force_minimum():
    cost = torch.rand(8, 8, generator=gen(0), dtype=T64)
    for steps in (1, 3, 7):
        path = calibrate._cheapest_path(cost, steps)
        brute = min(((0, *mid, 7) for mid in itertools.combinations(range(1, 7), steps - 1)),
                    key=lambda p: sum(float(cost[a, b]) for a, b in itertools.pairwise(p)))
        assert path.tolist() == list(brute)


def test_gits_cost_is_the_error_of_one_ddim_step_from_the_reference_trajectory():
    sde = sdediff.VPSDE()
    score = MIXTURE.score_fn(sde)
    x_T = starts(64, 6, sde)
    lat = sde.time_of_log_snr(torch.linspace(*sde.log_snr(torch.tensor([1.0, EPS], dtype=T64)).tolist(), 9,
                                             dtype=T64), EPS)
    lat[0], lat[-1] = 1.0, EPS
    cost = calibrate._gits_cost(sde, score, x_T, None, lat, 1e-9, None)
    traj = sdediff.sample(sde, score, x_T.shape, solver="ode", steps=8, eps=EPS, x_init=x_T, time_grid=lat,
                          keep_trajectory=True, rtol=1e-9, atol=1e-9).trajectory
    for a, b in ((0, 1), (2, 7), (5, 8)):
        one = sdediff.sample(sde, score, x_T.shape, solver="ddim", steps=1, eps=float(lat[b]), x_init=traj[a],
                             time_grid=lat[[a, b]])
        assert math.isclose(float(cost[a, b]), float((one - traj[b]).pow(2).mean()), rel_tol=1e-8)


def test_ays_cost_matches_its_closed_form_on_gaussian_data():
    """Data N(mu, c^2 I): D(x0 + sigma e, sigma) = mu + r (x0 + sigma e - mu), r = c^2 / (c^2 + sigma^2), so
    E||D_k - D_a||^2 = d ((r_k - r_a)^2 c^2 + (r_k sigma_k - r_a sigma_a)^2) for x0 ~ N(mu, c^2 I)."""
    c, d, n = 0.5, 3, 20_000
    gauss = GaussianMixture(torch.ones(1, dtype=T64), torch.ones(1, d, dtype=T64), torch.eye(d, dtype=T64)[None] * c**2)
    sde = sdediff.VESDE()
    x0 = gauss.sample(n, generator=gen(7), dtype=T64)
    lat = torch.tensor([1.0, 0.7, 0.5, 0.3, 0.1], dtype=T64)
    cost = calibrate._ays_cost(sde, gauss.score_fn(sde), None, x0, lat, 1e-9, gen(8))
    sigma = sde.marginal_std(lat) / sde.mean_coeff(lat)
    r = c**2 / (c**2 + sigma**2)
    gap = d * ((r - r[0]) ** 2 * c**2 + (r * sigma - r[0] * sigma[0]) ** 2)
    weight = (sigma[:-1] - sigma[1:]) / sigma[1:] ** 3
    assert torch.allclose(cost[0, 1:], torch.cumsum(weight * gap[1:], 0), rtol=0.03)


@pytest.mark.parametrize("objective", ["gits", "ays"])
def test_dynamic_programming_objectives_give_a_valid_grid_at_little_cost(objective):
    sde = sdediff.VPSDE()
    pilot = starts(128, 9, sde)
    cal = calibrate_grid(sde, MIXTURE.score_fn(sde), pilot, STEPS, "unipc", eps=EPS, objective=objective, lattice=40,
                         generator=gen(10), order=2)
    assert len(cal.times) == STEPS + 1 and cal.times[0] == sde.T and cal.times[-1] == EPS
    assert bool((cal.times[1:] < cal.times[:-1]).all())
    assert cal.evals == len(cal.start_rmse) + 1  # the standard grids and the lattice path, nothing searched
    assert cal.rmse <= min(cal.start_rmse.values())


def test_the_trimmed_loss_leaves_out_the_worst_paths():
    sde = sdediff.VPSDE()
    pilot = starts(64, 11, sde)
    full, trimmed = (calibrate_grid(sde, MIXTURE.score_fn(sde), pilot, 4, "unipc", eps=EPS, max_evals=len(grids.GRIDS),
                                    holdout=0, loss=loss, trim=0.25, order=2) for loss in ("mse", "trimmed"))
    ref = end_points(sde, pilot)
    x = end_points(sde, pilot, "unipc", 4, full.start, order=2)
    err = (x - ref).pow(2).mean(1).sort().values
    assert math.isclose(full.start_rmse[full.start], float(err.mean().sqrt()), rel_tol=1e-6)
    assert math.isclose(trimmed.start_rmse[full.start], float(err[:48].mean().sqrt()), rel_tol=1e-6)
