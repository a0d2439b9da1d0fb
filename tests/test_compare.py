"""sdediff.compare against exact truth: a Gaussian mixture's exact score through several solvers from the same prior
draws, scored against exact samples and the exact density; and the likelihood check against the exact log-density."""

import json
import math

import pytest
import torch

import sdediff
from sdediff.calibrate import GRID_FILE, load_calibrated_grid, save_calibrated_grid
from sdediff.compare import (
    Candidate,
    compare_likelihood,
    compare_solvers,
    distance_to_reference,
    mean_nfe,
    nearest_class_accuracy,
)
from sdediff.compare_model import SolverConfig, compare_on_model, deterministic_solvers
from sdediff.data import GaussianMixture
from sdediff.solvers import get_solver
from sdediff.solvers.base import FixedStepSolver
from sdediff.solvers.grids import GRIDS

GM = GaussianMixture.ring(num_components=4, radius=3.0, std=0.4)
SDE = sdediff.VPSDE()
SCORE = GM.score_fn(SDE)
CANDIDATES = [Candidate("euler_maruyama", 10), Candidate("ddim", 100, label="ddim-100"),
              Candidate("adaptive_ode", None, {"rtol": 1e-4, "atol": 1e-4})]


@pytest.fixture(scope="module")
def result():
    return compare_solvers(SDE, SCORE, (2,), CANDIDATES, n=1000, truth=GM, generator=torch.Generator().manual_seed(0))


def test_rows_share_the_prior_draws_and_count_nfe(result):
    assert [r.label for r in result.rows] == ["euler_maruyama", "ddim-100", "adaptive_ode"]
    assert result.x_init.shape == (1000, 2) and result.reference.shape == (1000, 2)
    assert result.rows[0].nfe == 10 and result.rows[1].nfe == 100 and result.rows[2].steps is None
    # the deterministic ddim row is exactly the solve from the shared x_init
    again = sdediff.sample(SDE, SCORE, (1000, 2), solver="ddim", steps=100, x_init=result.x_init)
    assert torch.equal(again, result.samples["ddim-100"])


def test_accurate_solvers_match_the_truth(result):
    """At 100 DDIM steps and with the adaptive ODE the samples are exact to within sampling noise: the log-density
    gap within 4 standard errors of 0, the distance within 2x the noise floor, the component shares within 0.06."""
    for row in result.rows[1:]:
        assert row.finite and abs(row.logp_gap) < 4 * row.logp_gap_se, row
        assert row.sliced_w2 < 2 * row.noise_floor and row.ratio == row.sliced_w2 / row.noise_floor
        assert row.mode_error < 0.06
    coarse = result.rows[0]  # 10 Euler-Maruyama steps leave the samples too spread out: a clearly negative gap
    assert coarse.logp_gap < -4 * coarse.logp_gap_se
    table = result.markdown()
    assert table.splitlines()[0].startswith("| solver | steps | NFE |") and "| adaptive_ode | adaptive |" in table


def test_reproducible_and_reference_only():
    a = compare_solvers(SDE, SCORE, (2,), CANDIDATES[:1], n=200, truth=GM, generator=torch.Generator().manual_seed(3))
    b = compare_solvers(SDE, SCORE, (2,), CANDIDATES[:1], n=200, truth=GM, generator=torch.Generator().manual_seed(3))
    assert a.rows[0].sliced_w2 == b.rows[0].sliced_w2 and a.rows[0].logp_gap == b.rows[0].logp_gap
    exact = GM.marginal(SDE, 1e-3)
    held = compare_solvers(SDE, SCORE, (2,), CANDIDATES[:1], n=200, splits=2, generator=torch.Generator().manual_seed(3),
                           reference=lambda k, g: exact.sample(k, generator=g))
    row = held.rows[0]
    assert row.logp_gap is None and len(row.sliced_w2_splits) == 2
    assert math.isclose(row.sliced_w2, sum(row.sliced_w2_splits) / 2) and "± s.e." not in held.markdown()
    bare = compare_solvers(SDE, SCORE, (2,), CANDIDATES[:1], n=10)
    assert bare.rows[0].sliced_w2 is None and bare.reference is None and bare.rows[0].nfe == 10
    with pytest.raises(ValueError, match="too small for splits=4"):
        compare_solvers(SDE, SCORE, (2,), CANDIDATES[:1], n=6, splits=4)
    with pytest.raises(TypeError, match="Candidate"):
        compare_solvers(SDE, SCORE, (2,), ["heun"], n=6)


def test_likelihood_against_the_exact_density():
    x = GM.marginal(SDE, 1e-3).sample(32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lik = compare_likelihood(SDE, SCORE, GM, x, eps=1e-3)
    assert lik.points == 32 and lik.nfe > 0
    assert lik.max_abs_error_with_exact_prior < 1e-3
    assert abs(lik.mean_log_prob - lik.mean_exact_log_prob) < 1e-2


def test_sample_scores():
    g = torch.Generator().manual_seed(2)
    exact = GM.marginal(SDE, 1e-3)
    scores = distance_to_reference(exact.sample(500, generator=g), lambda k, gen: exact.sample(k, generator=gen), g)
    assert set(scores) == {"sliced_w2", "noise_floor", "noise_floor_sd"}
    assert scores["sliced_w2"] < scores["noise_floor"] + 4 * scores["noise_floor_sd"]  # exact samples: at the floor
    centres = torch.tensor([[-5.0, 0.0], [5.0, 0.0]])
    reference, reference_labels = centres.repeat(10, 1), torch.tensor([0, 1]).repeat(10)
    right = nearest_class_accuracy(centres, torch.tensor([0, 1]), reference, reference_labels)
    wrong = nearest_class_accuracy(centres, torch.tensor([1, 0]), reference, reference_labels)
    assert right == {"class_accuracy": 1.0, "class_accuracy_per_class": {0: 1.0, 1: 1.0}}
    assert wrong["class_accuracy"] == 0.0
    info = sdediff.sample(SDE, SCORE, (64, 2), solver="adaptive_ode", rtol=1e-3, atol=1e-3, return_info=True)
    per_sample = info.stats.get("nfe_per_sample")
    expected = float(per_sample.double().mean()) if isinstance(per_sample, torch.Tensor) else float(info.nfe)
    assert mean_nfe(info) == expected


# --- compare_on_model: every solver and grid on one model, per NFE budget ------------------------------------------
RING = GaussianMixture.ring(num_components=6, radius=3.0, std=0.4)
FEW = (SolverConfig("euler"), SolverConfig("heun"), SolverConfig("unipc", {"order": 3}, "unipc-3"))


def _ring_data(k, generator):
    return RING.marginal(SDE, 1e-3).sample(k, generator=generator, dtype=torch.float64)


@pytest.fixture(scope="module")
def on_model():
    return compare_on_model(SDE, RING.score_fn(SDE), (2,), budgets=(8, 4), solvers=FEW,
                            stochastic=(SolverConfig("euler_maruyama"),), n=128, data=_ring_data, dtype=torch.float64,
                            calibration_pilot=64, calibration_evals=30, generator=torch.Generator().manual_seed(0))


def test_model_comparison_scores_every_solver_and_grid_against_a_tight_reference(on_model):
    res = on_model
    assert res.budgets == (4, 8) and res.x_init.shape == (128, 2) and res.x_init.dtype == torch.float64
    ref = res.reference
    assert ref["tol"] == 1e-8 and ref["check_rmse"] < 1e-6 * ref["rms"]
    ode = [r for r in res.rows if r.kind == "ode" and r.grid != "calibrated"]
    assert {(r.budget, r.label, r.grid) for r in ode} == {(b, c.name, g) for b in (4, 8) for c in FEW for g in GRIDS}
    assert all(r.error is None and r.nfe <= r.budget for r in res.rows)
    assert {(r.label, r.budget): r.steps for r in ode if r.grid == "uniform"} == {
        ("euler", 4): 4, ("euler", 8): 8, ("heun", 4): 2, ("heun", 8): 4, ("unipc-3", 4): 4, ("unipc-3", 8): 8}
    # a row's figures are the pathwise error of that solve against an independent tight solve of the same paths
    row = next(r for r in ode if r.label == "unipc-3" and r.budget == 8 and r.grid == "quadratic")
    exact = sdediff.sample(SDE, RING.score_fn(SDE), (128, 2), solver="ode", method="dopri8", rtol=1e-11, atol=1e-11,
                           x_init=res.x_init)
    x = sdediff.sample(SDE, RING.score_fn(SDE), (128, 2), solver="unipc", order=3, steps=8, x_init=res.x_init,
                       time_grid="quadratic")
    err = (x - exact).pow(2).sum(1).div(2)
    assert math.isclose(row.rmse, float(err.mean().sqrt()), rel_tol=1e-5)
    assert math.isclose(row.median, float(err.sqrt().median()), rel_tol=1e-5)
    # more NFE, less error; the recommendation is the lowest error per budget
    assert res.recommended[8].rmse < res.recommended[4].rmse
    for b in (4, 8):
        assert res.recommended[b].rmse == min(r.rmse for r in res.rows if r.kind == "ode" and r.budget == b)
        assert res.recommended_standard[b].rmse == min(r.rmse for r in ode if r.budget == b)


def test_model_comparison_calibrates_the_best_solver_and_scores_samples_against_data(on_model):
    res = on_model
    for b in (4, 8):
        best = res.recommended_standard[b]
        cal = res.calibrations[b]
        (row,) = [r for r in res.rows if r.grid == "calibrated" and r.budget == b]
        assert (cal["label"], cal["steps"]) == (best.label, best.steps) == (row.label, row.steps)
        assert len(cal["times"]) == best.steps + 1 and cal["evals"] <= 30
        assert cal["holdout_rmse"] < cal["start_holdout_rmse"] or not cal["accepted"]
    # exact samples of p_eps are what the exact ODE produces: the reference's SW2 to data is at the noise floor
    ref = res.reference
    assert ref["sw2"] < 3 * ref["data_floor"] and ref["data_floor_sd"] > 0
    sde_rows = [r for r in res.rows if r.kind == "sde"]
    assert [(r.budget, r.steps) for r in sde_rows] == [(4, 4), (8, 8)]
    assert all(r.sw2 > 0 and r.sw2_reference > 0 and r.rmse is None for r in sde_rows)
    text = res.markdown()
    assert "recommended, standard grid" in text and "| reference ODE samples |" in text and "data floor" in text
    assert json.loads(json.dumps(res.as_dict()))["recommended"]["8"]["rmse"] == res.recommended[8].rmse


def test_model_comparison_plot(on_model, tmp_path):
    pytest.importorskip("matplotlib")
    assert on_model.plot(tmp_path / "p.png").stat().st_size > 1000


def test_model_comparison_is_reproducible_and_checks_its_arguments():
    kw = dict(budgets=(4,), solvers=FEW[:1], stochastic=(SolverConfig("euler_maruyama"),), n=16, calibrate=False)
    a, b = (compare_on_model(SDE, SCORE, (2,), generator=torch.Generator().manual_seed(5), **kw) for _ in range(2))
    assert [r.rmse for r in a.rows] == [r.rmse for r in b.rows] and torch.equal(a.x_init, b.x_init)
    assert a.reference["sw2"] is None and a.rows[-1].sw2 is None and a.rows[-1].sw2_reference > 0
    with pytest.raises(ValueError, match="grids"):
        compare_on_model(SDE, SCORE, (2,), grids=["nope"], **kw)
    with pytest.raises(ValueError, match="budgets"):
        compare_on_model(SDE, SCORE, (2,), **{**kw, "budgets": ()})
    with pytest.raises(ValueError, match="at least 2 n"):
        compare_on_model(SDE, SCORE, (2,), data=torch.zeros(20, 2), **kw)


def test_deterministic_solvers_cover_every_registered_one():
    names = {c.solver for c in deterministic_solvers()}
    for name in sdediff.available_solvers():
        try:
            solver = get_solver(name)
        except (TypeError, ValueError):
            continue
        assert (name in names) == (isinstance(solver, FixedStepSolver) and not solver.stochastic), name


def test_calibrated_grids_saved_in_a_run_folder(tmp_path):
    times = torch.tensor([1.0, 0.5, 0.1, 1e-3], dtype=torch.float64)
    key = dict(solver="unipc", options={"order": 3}, steps=3, eps=1e-3, checkpoint="ckpt_1.safetensors")
    assert load_calibrated_grid(tmp_path, **key) is None
    path = save_calibrated_grid(tmp_path, times, info={"pilot_rmse": 0.5}, **key)
    save_calibrated_grid(tmp_path, [1.0, 0.7, 0.2, 1e-3], **{**key, "checkpoint": "ckpt_2.safetensors"})
    entry = load_calibrated_grid(tmp_path, **key)
    assert entry["times"] == times.tolist() and entry["pilot_rmse"] == 0.5 and path.name == GRID_FILE
    save_calibrated_grid(tmp_path, [1.0, 0.6, 0.2, 1e-3], **key)  # replaces the entry with the same key
    assert load_calibrated_grid(tmp_path, **key)["times"] == [1.0, 0.6, 0.2, 1e-3]
    assert len(json.loads(path.read_text())["grids"]) == 2
    for other in (dict(steps=4), dict(eps=1e-2), dict(options={"order": 2}), dict(solver="dpm_solver")):
        assert load_calibrated_grid(tmp_path, **{**key, **other}) is None
    with pytest.raises(ValueError, match="decreasing"):
        save_calibrated_grid(tmp_path, [1.0, 0.1, 0.2, 1e-3], **key)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="damaged"):
        load_calibrated_grid(tmp_path, **key)
