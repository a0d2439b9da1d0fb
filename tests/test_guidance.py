"""Guidance (docs/guidance.md) against analytic truth.

* Classifier guidance with the exact noisy-class posterior of a Gaussian mixture is Bayes' rule: at scale 1
  it equals the exact score of the chosen component, and sampling with it reproduces that component.
* Reward guidance on Gaussian data with a linear reward R(x) = aᵀx: the tilted law is N(μ + λΣa, Σ), which
  the full-Jacobian guidance reaches exactly (the approximate Jacobian does not, see docs/guidance.md).
* Inpainting of Gaussian data: the imputed coordinates against the analytic conditional Gaussian.
"""

import json
import math

import numpy as np
import pytest
import torch
from problems import EPS, MIXTURE, T64, gen, load_benchmark

import sdediff
from sdediff import cli
from sdediff.data import GaussianMixture
from sdediff.guidance import (
    ClassifierFreeNet,
    classifier_free,
    classifier_guided,
    impute,
    inpaint,
    inpainting_score,
    reward_guided,
)
from sdediff.metrics import noise_floor, sliced_wasserstein


def component(k):
    """Component ``k`` of MIXTURE as a mixture of its own: p_0(x | k)."""
    return GaussianMixture([1.0], MIXTURE.means[k:k + 1], MIXTURE.covs[k:k + 1])


def class_log_prob(sde, k):
    """The exact noisy-class posterior log p_t(k | x) = log w_k + log N_k,t(x) - log p_t(x) (stable in the tails)."""
    comp, log_w = component(k), math.log(float(MIXTURE.weights[k]))

    def log_prob_fn(x, t):
        return log_w + comp.log_prob(x, sde, t) - MIXTURE.log_prob(x, sde, t)

    return log_prob_fn


def noisy_points(sde, n=64, seed=0):
    x0 = MIXTURE.sample(n, generator=gen(seed), dtype=T64)
    t = torch.rand(n, generator=gen(seed + 1), dtype=T64) * (1 - EPS) + EPS
    mean, std = sde.marginal(x0, t)
    return mean + std[:, None] * torch.randn(x0.shape, generator=gen(seed + 2), dtype=T64), t


# --- classifier guidance ----------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 3])
def test_classifier_guidance_at_scale_one_is_the_exact_conditional_score(sde, k):
    x, t = noisy_points(sde)
    guided = classifier_guided(MIXTURE.score_fn(sde), class_log_prob(sde, k), 1.0)
    exact = component(k).score(x, t, sde)
    assert (guided(x, t) - exact).abs().max() < 1e-6 * exact.abs().max()
    # scale w: the score of p_t(x) p_t(k | x)^w
    w = 2.5
    mixed = classifier_guided(MIXTURE.score_fn(sde), class_log_prob(sde, k), w)(x, t)
    assert torch.allclose(mixed, (1 - w) * MIXTURE.score(x, t, sde) + w * exact, rtol=1e-9, atol=1e-9)


def test_classifier_free_equals_classifier_guidance_with_scale_one_plus_w():
    sde = sdediff.VPSDE()
    x, t = noisy_points(sde)
    cond, uncond = component(1).score_fn(sde), MIXTURE.score_fn(sde)
    w = 3.0
    cfg = classifier_free(cond, uncond, w)(x, t)
    cg = classifier_guided(uncond, class_log_prob(sde, 1), 1 + w)(x, t)
    assert torch.allclose(cfg, cg, rtol=1e-9, atol=1e-9)
    assert torch.equal(classifier_free(cond, uncond, 0.0)(x, t), cond(x, t))


def test_classifier_guided_sampling_reproduces_the_component():
    sde, k, n = sdediff.VPSDE(), 2, 2000
    guided = classifier_guided(MIXTURE.score_fn(sde), class_log_prob(sde, k), 1.0)
    x = sdediff.sample(sde, guided, (n, 2), solver="euler_maruyama", steps=500, eps=EPS, generator=gen(3), dtype=T64)
    exact = component(k).marginal(sde, EPS)
    ref = exact.sample(n, generator=gen(4), dtype=T64)
    floor = noise_floor(lambda m, generator: exact.sample(m, generator=generator, dtype=T64), n, repeats=8,
                        generator=gen(5))
    sw = sliced_wasserstein(x, ref, generator=gen(6))
    assigned = (MIXTURE.component_posterior(x, EPS, sde).argmax(1) == k).double().mean()
    assert sw <= 2 * floor.mean(), (sw, floor.mean())
    assert assigned >= 0.98, assigned


def test_guided_score_keeps_the_graph_for_exact_likelihoods():
    """log_likelihood differentiates through the guided score: the class-conditional density comes out."""
    sde = sdediff.VPSDE()
    x = component(0).sample(6, generator=gen(7), dtype=T64)
    guided = classifier_guided(MIXTURE.score_fn(sde), class_log_prob(sde, 0), 1.0)
    res = sdediff.log_likelihood(sde, guided, x, eps=EPS, rtol=1e-6, atol=1e-6, trace="exact")
    # the prior N(0, I) is not exactly p_T(x | k): swap its term for the exact one at the latent
    log_prob = res.log_prob - sde.prior_log_prob(res.latent) + component(0).log_prob(res.latent, sde, sde.T)
    assert torch.allclose(log_prob, component(0).log_prob(x, sde, EPS), atol=1e-4)


# --- classifier-free network wrapper ----------------------------------------------------------------------
def test_classifier_free_net_evaluates_both_branches_in_one_call():
    torch.manual_seed(0)
    net = sdediff.MLP(dim=3, hidden=16, depth=1, num_classes=4)
    torch.nn.init.normal_(net.out.weight)  # the zero-initialised output layer would hide the branches
    calls = []
    net.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    x, t, y = torch.randn(5, 3), torch.rand(5), torch.tensor([0, 1, 2, 3, 0])
    guided = ClassifierFreeNet(net, y, 2.0)(x, t)
    assert calls == [10]
    cond, uncond = net(x, t, y), net(x, t, torch.full_like(y, net.null_class))
    assert torch.allclose(guided, 3 * cond - 2 * uncond, atol=1e-6)
    assert torch.allclose(ClassifierFreeNet(net, 1, 0.0)(x, t), net(x, t, torch.ones(5, dtype=torch.long)))
    score = sdediff.score.ScoreModel(ClassifierFreeNet(net, y, 2.0), sdediff.VPSDE(), "eps")
    with torch.no_grad():
        assert sdediff.sample(sdediff.VPSDE(), score, (5, 3), solver="heun", steps=3, generator=gen(0)).shape == (5, 3)
    with pytest.raises(ValueError, match="null"):
        ClassifierFreeNet(sdediff.MLP(dim=3, hidden=8, depth=1), 0, 1.0)
    with pytest.raises(ValueError, match="labels"):
        ClassifierFreeNet(net, y, 1.0)(torch.randn(2, 3), torch.rand(2))


def test_trainer_score_fn_with_guidance_scale():
    torch.manual_seed(0)
    data = torch.randn(64, 2)
    labels = torch.arange(64) % 2
    net = sdediff.MLP(dim=2, hidden=16, depth=1, num_classes=2)
    cfg = sdediff.TrainConfig(steps=3, batch_size=16, cond_drop_prob=0.2, progress=False, device="cpu")
    trainer = sdediff.Trainer(net, sdediff.VPSDE(), data, labels, cfg)
    trainer.fit()
    torch.nn.init.normal_(trainer.ema.out.weight)
    x, t, y = torch.randn(4, 2), torch.rand(4) * 0.9 + 0.1, torch.tensor([0, 1, 1, 0])
    guided = trainer.score_fn(cond=y, guidance_scale=1.5)(x, t)
    expected = classifier_free(trainer.score_fn(cond=y), trainer.score_fn(cond=torch.full_like(y, 2)), 1.5)(x, t)
    assert torch.allclose(guided, expected, atol=1e-5)


# --- reward guidance --------------------------------------------------------------------------------------
MU = torch.tensor([1.0, -0.5], dtype=T64)
SIGMA = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=T64)
A = torch.tensor([1.0, -1.0], dtype=T64)


def reward_samples(sde, jacobian, lam, n=4000, steps=400):
    gauss = GaussianMixture([1.0], MU[None], SIGMA[None])
    guided = reward_guided(sde, gauss.score_fn(sde), lambda x: x @ A, lam, jacobian)
    return sdediff.sample(sde, guided, (n, 2), solver="euler_maruyama", steps=steps, eps=EPS, generator=gen(8),
                          dtype=T64)


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_reward_guidance_with_full_jacobian_samples_the_tilted_gaussian(name):
    sde = sdediff.VPSDE() if name == "vp" else sdediff.VESDE()
    lam, n = 1.5, 4000
    x = reward_samples(sde, "full", lam, n)
    mean, cov = MU + lam * SIGMA @ A, SIGMA
    z = (x.mean(0) - mean) / (cov.diagonal() / n).sqrt()
    # sampling s.d. of a covariance entry: sqrt((S_ii S_jj + S_ij^2) / n)
    cov_se = ((cov.diagonal()[:, None] * cov.diagonal()[None] + cov**2) / n).sqrt()
    assert z.abs().max() < 4, z
    assert ((torch.cov(x.T) - cov).abs() / cov_se).max() < 4, torch.cov(x.T)


def test_reward_guidance_with_approximate_jacobian_lands_off_target():
    lam = 1.5
    x = reward_samples(sdediff.VPSDE(), "approx", lam, n=1000, steps=200)
    assert torch.isfinite(x).all()
    assert (x.mean(0) - (MU + lam * SIGMA @ A)).norm() > 1.0  # over-guided while x_t is mostly noise


def test_reward_guidance_arguments():
    sde = sdediff.VPSDE()
    with pytest.raises(ValueError, match="jacobian"):
        reward_guided(sde, MIXTURE.score_fn(sde), lambda x: x.sum(1), 1.0, jacobian="exact")
    with pytest.raises(TypeError, match="linear SDE"):
        reward_guided(object(), MIXTURE.score_fn(sde), lambda x: x.sum(1))
    with pytest.raises(TypeError, match="scale"):
        reward_guided(sde, MIXTURE.score_fn(sde), lambda x: x.sum(1), scale="big")
    bad = reward_guided(sde, MIXTURE.score_fn(sde), lambda x: x)
    with pytest.raises(ValueError, match="reward_fn must return a \\(batch,\\) tensor"):
        bad(torch.zeros(3, 2), torch.full((3,), 0.5))


# --- inpainting -------------------------------------------------------------------------------------------
GAUSS_MU = torch.tensor([1.0, -0.5, 0.5, 0.0], dtype=T64)
_L = torch.tensor([[1.0, 0.9, 0.7, 0.3], [0, 0.5, 0.4, 0.2], [0, 0, 0.4, 0.3], [0, 0, 0, 0.3]], dtype=T64)
GAUSS_COV = _L.T @ _L  # strongly correlated, eigenvalues 0.04 .. 2.7
MASK = torch.tensor([True, False, True, False])
OBSERVED = torch.tensor([2.0, 0.0, -0.5, 0.0], dtype=T64)


def gaussian_conditional():
    """Mean and covariance of the unknown coordinates given the known ones."""
    k, u = MASK, ~MASK
    skk, suk = GAUSS_COV[k][:, k], GAUSS_COV[u][:, k]
    mean = GAUSS_MU[u] + suk @ torch.linalg.solve(skk, OBSERVED[k] - GAUSS_MU[k])
    return mean, GAUSS_COV[u][:, u] - suk @ torch.linalg.solve(skk, suk.T)


_INPAINTED = {}


def inpainted(method, covariance="isotropic", n=3000, shape=(4,)):
    key = (method, covariance, n, shape)
    if key not in _INPAINTED:
        sde = sdediff.VPSDE()
        gauss = GaussianMixture([1.0], GAUSS_MU[None], GAUSS_COV[None])
        _INPAINTED[key] = inpaint(sde, gauss.score_fn(sde), MASK.reshape(shape), OBSERVED.reshape(shape),
                                  (n, *shape), method, covariance=covariance, solver="euler_maruyama", steps=300,
                                  eps=EPS, generator=gen(9), dtype=T64)
    return _INPAINTED[key]


def imputation_errors(x):
    mean, cov = gaussian_conditional()
    xu = x.reshape(x.shape[0], -1)[:, ~MASK]
    return float((xu.mean(0) - mean).norm()), float((torch.cov(xu.T) - cov).norm())


def test_inpainting_known_coordinates_are_imputed_exactly():
    for method in ("replacement", "guidance"):
        x = inpainted(method)
        assert torch.equal(x[:, MASK], OBSERVED[MASK].expand(x.shape[0], -1))
        assert torch.isfinite(x).all()


def test_tweedie_guidance_inpaints_gaussian_data_exactly_and_beats_replacement():
    n = 3000
    mean, cov = gaussian_conditional()
    x = inpainted("guidance", "tweedie", n)
    xu = x[:, ~MASK]
    z = (xu.mean(0) - mean) / (cov.diagonal() / n).sqrt()
    cov_se = ((cov.diagonal()[:, None] * cov.diagonal()[None] + cov**2) / n).sqrt()
    assert z.abs().max() < 4, z
    assert ((torch.cov(xu.T) - cov).abs() / cov_se).max() < 4, torch.cov(xu.T)
    tweedie = imputation_errors(x)
    isotropic = imputation_errors(inpainted("guidance", "isotropic"))
    replacement = imputation_errors(inpainted("replacement"))
    # the conditioning methods are closer to the truth than replacement, in mean and covariance
    assert tweedie[0] < isotropic[0] < replacement[0], (tweedie, isotropic, replacement)
    assert tweedie[1] < isotropic[1] < replacement[1], (tweedie, isotropic, replacement)


@pytest.mark.parametrize("solver,options", [("ode", {"rtol": 1e-4, "atol": 1e-4}), ("pc", {"snr": 0.16}),
                                            ("ancestral", {})])
def test_tweedie_inpainting_with_other_solvers(solver, options):
    n, sde = 500, sdediff.VPSDE()
    gauss = GaussianMixture([1.0], GAUSS_MU[None], GAUSS_COV[None])
    x = inpaint(sde, gauss.score_fn(sde), MASK, OBSERVED, (n, 4), "guidance", covariance="tweedie", solver=solver,
                steps=100, eps=EPS, generator=gen(13), dtype=T64, **options)
    mean, cov = gaussian_conditional()
    assert ((x[:, ~MASK].mean(0) - mean) / (cov.diagonal() / n).sqrt()).abs().max() < 4


def test_inpainting_images_matches_vectors():
    """The same Gaussian as 1x2x2 images with a 1x2x2 mask: same draws, same imputation."""
    vec = inpainted("guidance", "tweedie", n=200)
    img = inpainted("guidance", "tweedie", n=200, shape=(1, 2, 2))
    assert img.shape == (200, 1, 2, 2)
    assert torch.allclose(img.reshape(200, 4), vec, atol=1e-8)
    vec = inpainted("replacement", n=200)
    img = inpainted("replacement", n=200, shape=(1, 2, 2))
    assert torch.allclose(img.reshape(200, 4), vec, atol=1e-8)


def test_per_sample_masks_and_float32():
    sde = sdediff.VPSDE()
    gauss = GaussianMixture([1.0], GAUSS_MU[None], GAUSS_COV[None])
    masks = torch.rand(8, 4, generator=gen(10)) < 0.5
    observed = torch.randn(8, 4, generator=gen(11))
    for method in ("replacement", "guidance"):
        x = inpaint(sde, gauss.score_fn(sde), masks, observed, (8, 4), method, solver="heun", steps=20,
                    generator=gen(12), return_info=True)
        assert x.samples.dtype == torch.float32 and torch.isfinite(x.samples).all()
        assert torch.equal(x.samples[masks], observed[masks])
    guided = inpainting_score(sde, gauss.score_fn(sde), masks, observed, covariance="tweedie")
    with pytest.raises(ValueError, match="one mask for all samples"):
        guided(torch.zeros(8, 4), torch.full((8,), 0.5))


def test_inpainting_arguments():
    sde = sdediff.VPSDE()
    score = MIXTURE.score_fn(sde)
    y = torch.zeros(2)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        inpainting_score(sde, score, torch.ones(2), y)
    with pytest.raises(ValueError, match="method must be one of"):
        inpainting_score(sde, score, torch.ones(2, dtype=torch.bool), y, "projection")
    with pytest.raises(ValueError, match="covariance must be one of"):
        inpainting_score(sde, score, torch.ones(2, dtype=torch.bool), y, covariance="full")
    with pytest.raises(ValueError, match="data_std"):
        inpainting_score(sde, score, torch.ones(2, dtype=torch.bool), y, data_std=0.0)
    with pytest.raises(ValueError, match="does not broadcast"):
        impute(torch.zeros(4, 2), torch.ones(3, dtype=torch.bool), y)


# --- command line -----------------------------------------------------------------------------------------
def test_cli_class_conditional_digits_with_guidance_scale(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "digits"
    assert cli.main(["train", "--data", "digits", "--class-cond", "--cond-drop-prob", "0.2", "--steps", "2",
                     "--batch-size", "8", "--base-channels", "8", "--eval-samples", "0", "--eval-nll-points", "0",
                     "--out", str(out), "--no-progress", "--no-plot"]) == 0
    assert '"num_classes": 10' in (out / "run.json").read_text()
    samples = tmp_path / "guided.npy"
    assert cli.main(["sample", "--run", str(out), "--steps", "2", "--n", "6", "--classes", "3", "7",
                     "--guidance-scale", "2", "--out", str(samples), "--no-plot", "--no-progress"]) == 0
    assert np.load(samples).shape == (6, 1, 8, 8) and np.isfinite(np.load(samples)).all()
    doc = json.loads(samples.with_suffix(".json").read_text())
    assert doc["classes"] == [3, 7] and doc["guidance_scale"] == 2.0
    capsys.readouterr()
    assert cli.main(["sample", "--run", str(out), "--steps", "2", "--n", "2", "--classes", "10"]) == 2
    assert "classes 0..9" in capsys.readouterr().err
    assert cli.main(["sample", "--run", str(out), "--steps", "2", "--n", "2", "--guidance-scale", "1"]) == 2
    assert "needs --classes" in capsys.readouterr().err
    assert cli.main(["train", "--data", "swiss_roll", "--class-cond", "--steps", "1", "--out", str(tmp_path / "m")]) == 2
    assert "no labels" in capsys.readouterr().err


def test_cli_class_conditional_toy_set_samples_the_classes_asked_for(tmp_path, capsys):
    """--class-cond on a labelled toy set (the 8-Gaussian ring): after a short run, guided samples land in the
    components asked for (nearest held-out point), and the model knows exactly the set's 8 classes."""
    out = tmp_path / "ring"
    assert cli.main(["train", "--data", "gaussian_mixture", "--class-cond", "--steps", "600", "--eval-samples", "0",
                     "--eval-nll-points", "0", "--out", str(out), "--no-progress", "--no-plot"]) == 0
    assert '"num_classes": 8' in (out / "run.json").read_text()
    samples = tmp_path / "guided.npy"
    assert cli.main(["sample", "--run", str(out), "--solver", "heun", "--steps", "20", "--n", "400", "--classes", "0",
                     "3", "--guidance-scale", "1", "--out", str(samples), "--no-plot", "--no-progress"]) == 0
    doc = json.loads(samples.with_suffix(".json").read_text())
    assert doc["class_accuracy"] >= 0.95 and set(doc["class_accuracy_per_class"]) == {"0", "3"}, doc
    assert "sliced_w2" not in doc  # not comparable to the whole data set
    x = torch.from_numpy(np.load(samples))
    angles = torch.atan2(x[:, 1], x[:, 0])  # component k sits at angle 2 pi k / 8
    assert (angles[:200].abs() < 0.4).float().mean() > 0.9 and ((angles[200:] - 3 * math.pi / 4).abs() < 0.4).float().mean() > 0.9
    assert cli.main(["sample", "--run", str(out), "--steps", "2", "--n", "2", "--classes", "8"]) == 2
    assert "classes 0..7" in capsys.readouterr().err


# --- benchmark scripts (smoke runs with truth checks) ------------------------------------------------------
@pytest.mark.slow
def test_guidance_benchmarks_quick(tmp_path):
    pytest.importorskip("sklearn")
    assert load_benchmark("guidance_gaussian").main(["--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "guidance_gaussian_quick.json").read_text())
    tweedie = [r for r in doc["inpainting"] if r["method"] == "guidance (tweedie)"]
    replacement = [r for r in doc["inpainting"] if r["method"] == "replacement"]
    assert all(t["mean_error"] < r["mean_error"] for t, r in zip(tweedie, replacement, strict=True))
    assert all(r["assigned"] > 0.98 for r in doc["classifier"])
    assert load_benchmark("digits_guidance").main(["--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "digits_guidance_quick.json").read_text())
    assert doc["classifier_test_accuracy"] > 0.9
    assert [r["scale"] for r in doc["scales"]] == [0.0, 1.0, 3.0]
    assert all(0 <= r["accuracy"] <= 1 for r in doc["scales"])
