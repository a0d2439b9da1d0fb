"""sdediff.compare against exact truth: a Gaussian mixture's exact score through several solvers from the same prior
draws, scored against exact samples and the exact density; and the likelihood check against the exact log-density."""

import math

import pytest
import torch

import sdediff
from sdediff.compare import (
    Candidate,
    compare_likelihood,
    compare_solvers,
    distance_to_reference,
    mean_nfe,
    nearest_class_accuracy,
)
from sdediff.data import GaussianMixture

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
