"""Smoke-with-truth tests of the benchmark scripts (benchmarks/*.py) at tiny sizes.

The scripts are imported by their plain names (``problems.load_benchmark``). The k-diffusion parts are skipped when
k-diffusion is not installed (it is an optional peer: ``pip install --no-deps k-diffusion``, see benchmarks/README.md).
"""

import json
import math

import pytest
import torch
from problems import load_benchmark

import sdediff

acc = load_benchmark("accuracy_per_nfe")
ovh = load_benchmark("overhead")
cal = load_benchmark("calibrated_grids")
peers = load_benchmark("peers")
common = acc.common
SPEC = {s.label: s for s in common.SPECS}


def _kdiffusion():
    kds, note = common.load_kdiffusion()
    if kds is None:
        pytest.skip(note)
    return kds


@pytest.fixture(scope="module")
def setup():
    return acc.prepare(acc.Problem("vp", 2, n=64), torch.device("cpu"), ref_tol=1e-9, floor_repeats=2,
                       log=lambda m: None)


def _by_label(records, label):
    return sorted((r for r in records if r["label"] == label), key=lambda r: r.get("budget") or 0)


def test_reference_is_tight_and_fixed_step_errors_converge(setup):
    info = setup.info
    assert info["ref_check_rmse"] < 1e-7 * info["x_ref_rms"]  # dopri8 at 1e-9 vs 1e-8 agree
    records = acc.run_problem(setup, [SPEC["euler"], SPEC["heun"]], (4, 16), kdiffusion=False,
                              torchdiffeq_methods=(), torchsde_methods=(), diffusers=False,
                              torchode_methods=(), log=lambda m: None)
    assert all("error" not in r for r in records)
    heun = _by_label(records, "heun")
    assert [r["nfe"] for r in heun] == [4, 16] and [r["steps"] for r in heun] == [2, 8]
    assert all(math.isfinite(r["rmse"]) for r in heun)
    assert heun[1]["rmse"] < heun[0]["rmse"] / 4  # second order: 4x the steps, far less error
    euler = _by_label(records, "euler")
    assert euler[1]["rmse"] < euler[0]["rmse"]
    # an independent adaptive solve at a tight tolerance lands on the reference
    ladder = acc.run_problem(setup, [SPEC["ode (dopri5, adaptive)"]], (10_000,), kdiffusion=False,
                             torchdiffeq_methods=(), torchsde_methods=(), tols=(1e-3, 1e-7), diffusers=False,
                             torchode_methods=(), log=lambda m: None)
    assert [r["tol"] for r in ladder] == [1e-3, 1e-7] and ladder[1]["nfe"] > ladder[0]["nfe"]
    assert ladder[1]["rmse"] < 1e-5 < ladder[0]["rmse"]


def test_sde_metrics_against_truth(setup):
    gen = torch.Generator().manual_seed(123)
    p_eps = setup.mixture.marginal(setup.sde, setup.problem.eps)
    exact = evaluate_exact = acc.evaluate(setup, p_eps.sample(64, generator=gen, dtype=torch.float64), "sde")
    assert abs(exact["logp_gap"]) < 4 * exact["logp_gap_se"]  # fresh exact samples: no gap
    assert exact["sw2"] < 4 * setup.info["sw2_floor_mean"]
    spread = acc.evaluate(setup, 1.5 * p_eps.sample(64, generator=gen, dtype=torch.float64), "sde")
    assert spread["logp_gap"] < -4 * spread["logp_gap_se"] and spread["sw2"] > evaluate_exact["sw2"]
    records = acc.run_problem(setup, [SPEC["euler_maruyama"]], (10,), kdiffusion=False, torchdiffeq_methods=(),
                              torchsde_methods=(), diffusers=False, torchode_methods=(), log=lambda m: None)
    (em,) = records
    assert em["nfe"] == 10 and math.isfinite(em["sw2"]) and math.isfinite(em["logp_gap"]) and "rmse" not in em


@pytest.mark.parametrize("make_sde", [sdediff.VPSDE, sdediff.VESDE])
def test_sigma_to_time_and_denoiser(make_sde):
    sde = make_sde()
    t = torch.cat([torch.tensor([1e-3, 1.0], dtype=torch.float64), torch.rand(200, dtype=torch.float64) * 0.999 + 1e-3])
    sigma = common.sigma_of_time(sde, t)
    assert torch.allclose(common.KDenoiser(sde, None, 1e-3).time_of(sigma), t, rtol=0, atol=1e-12)
    # k-diffusion's denoiser on y = x/m at sigma(t) is Tweedie's x0 estimate at (x, t)
    mixture = sdediff.data.GaussianMixture.random(3, 2, generator=torch.Generator().manual_seed(0))
    score = mixture.score_fn(sde)
    tt = torch.full((5,), 0.3, dtype=torch.float64)
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    m = sde.mean_coeff(tt)[:, None]
    d = common.KDenoiser(sde, score, 1e-3)(x / m, common.sigma_of_time(sde, tt))
    assert torch.allclose(d, sde.denoise(x, tt, score(x, tt)), rtol=1e-10, atol=1e-12)


def test_kdiffusion_through_the_adapter_converges(setup):
    _kdiffusion()
    records = acc.run_problem(setup, [], (4, 40), kd_samplers=("heun", "dpmpp_2m", "dpmpp_2m_sde"),
                              torchdiffeq_methods=(), torchsde_methods=(), diffusers=False,
                              torchode_methods=(), log=lambda m: None)
    assert all("error" not in r for r in records)
    for schedule in ("time", "karras"):
        heun = _by_label(records, f"heun [{schedule}]")
        assert [r["nfe"] for r in heun] == [4, 40]  # counted denoiser calls: 2 per step, none at sigma = 0
        assert heun[1]["rmse"] < heun[0]["rmse"] / 4 and heun[1]["rmse"] < 0.2
        dpm = _by_label(records, f"dpmpp_2m [{schedule}]")
        assert dpm[1]["rmse"] < dpm[0]["rmse"] / 4 and dpm[1]["rmse"] < 0.2
        sde_run = _by_label(records, f"dpmpp_2m_sde [{schedule}]")
        assert all(math.isfinite(r["sw2"]) for r in sde_run)


def _diffusers():
    if peers.load_diffusers()[0] is None:
        pytest.skip(peers.load_diffusers()[1])


@pytest.mark.parametrize("make_sde", [sdediff.VPSDE, sdediff.VESDE, sdediff.SubVPSDE])
def test_diffusers_first_order_loop_is_ddim_on_its_own_noise_levels(make_sde):
    """DPMSolverMultistep at order 1 (dpmsolver++, i.e. DDIM) through the driver's loop, on sdediff's uniform grid
    passed as timesteps=, equals sdediff's ddim on the times of the scheduler's (float32) noise levels."""
    _diffusers()
    sde = make_sde()
    eps = acc.EPS[{sdediff.VPSDE: "vp", sdediff.VESDE: "ve", sdediff.SubVPSDE: "subvp"}[make_sde]]
    mixture = sdediff.data.GaussianMixture.random(3, 2, generator=torch.Generator().manual_seed(0))
    score = mixture.score_fn(sde)
    x_T = mixture.marginal(sde, sde.T).sample(16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loop = peers.DiffusersLoop(sde, eps)
    spec = peers.SchedulerSpec("DDIM", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 1,
                                                                      "final_sigmas_type": "sigma_min"}, custom="timesteps")
    x, nfe = loop.sample(spec, "custom:uniform", 8, score, x_T)
    sigmas = loop.scheduler(spec, "custom:uniform", 8).sigmas.double()
    times = sde.time_of_log_snr(-2 * sigmas.log(), 0.0)
    times[-1] = eps  # the loop ends where sdediff's does; its final level is sigma(eps) to float32 precision
    ddim = sdediff.sample(sde, score, x_T.shape, solver="ddim", steps=8, time_grid=times, eps=eps, x_init=x_T)
    assert nfe == 8 and float((x - ddim).abs().max()) < 1e-4 * float(ddim.abs().max())


def test_diffusers_schedulers_count_their_calls_end_at_eps_and_converge(setup):
    _diffusers()
    loop = peers.DiffusersLoop(setup.sde, setup.problem.eps)
    for spec in peers.SCHEDULERS:
        schedule = spec.schedule_names()[-1]  # a custom grid where it takes one, else its last own schedule
        errors = []
        for budget in (10, 40):
            steps, nfe = loop.steps_for_budget(spec, schedule, budget)
            counted = common.Counted(loop.exact_model(spec, setup.score))
            x, calls = loop.sample(spec, schedule, steps, setup.score, setup.x_T, model=counted)
            assert calls == counted.calls == nfe <= budget < loop.nfe(spec, schedule, steps + 1), spec.label
            errors.append(float((x - setup.x_ref).pow(2).mean().sqrt()))
        assert errors[1] < min(errors[0] / 2, 0.2), (spec.label, schedule, errors)
    heun = next(s for s in peers.SCHEDULERS if s.cls == "HeunDiscreteScheduler")
    assert loop.nfe(heun, "linspace", 6) == 10  # 5 Heun steps to sigma(eps); the Euler step to sigma = 0 is not taken


def test_torchode_next_to_adaptive_ode(setup):
    if peers.load_torchode()[0] is None:
        pytest.skip(peers.load_torchode()[1])
    for method in peers.TORCHODE_METHODS:
        res = peers.torchode_solve(setup.sde, setup.score, setup.x_T, setup.problem.eps, method, 1e-8, 1e-8)
        assert bool((res.status == 0).all()) and res.calls >= int(res.steps.max())
        assert float((res.x - setup.x_ref).pow(2).mean().sqrt()) < 1e-5
    records = acc.run_problem(setup, [SPEC["adaptive_ode"]], (20,), kdiffusion=False, torchdiffeq_methods=(),
                              torchsde_methods=(), diffusers=False, torchode_methods=("dopri5",), log=lambda m: None)
    text = "\n".join(acc.adaptive_table(records))
    assert "| 1e-05 |" in text and "torchode dopri5: NFE, RMSE" in text


def test_overhead_smoke():
    bench = ovh.Bench(torch.device("cpu"), batch=4, shape=(3, 4, 4), hidden=8, repeats=1, call_repeats=2)
    rows = ovh.run_overhead(bench, [SPEC["euler"], SPEC["heun"], SPEC["euler_maruyama"]], nfe=4, kdiffusion=False,
                            torchdiffeq_methods={"euler": 1}, schedulers=[], torchode_methods=(), log=lambda m: None)
    assert [r["label"] for r in rows] == ["euler", "heun", "euler_maruyama", "odeint euler"]
    for r in rows:
        assert "error" not in r and r["nfe"] == 4
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0 and r["samples_per_s"] > 0
    for r in rows[:3]:  # every one of these has a hand-written loop of the same update
        assert math.isfinite(r["loop_ratio"]) and math.isfinite(r["vs_loop"])
    # passes over the state per NFE, at 4 NFE: Euler's mul and add_; Heun's 6 per step of 2 NFE (two rows of the
    # shared update, the first keeping its score for the second); Euler-Maruyama's mul, 2 add_ and the noise draw;
    # each plus the finiteness checks of x_init and of the final state (2 per run)
    assert [r["state_ops_per_nfe"] for r in rows[:3]] == [2.5, 3.5, 4.5]
    text = ovh.markdown({"command": "x", "environment": "y", "device": "cpu", "network": "z", "t_call_ms": 1.0,
                         "t_call_cpu_ms": 1.0, "batch": 4, "nfe": 4, "tol": 1e-3, "repeats": 1, "call_repeats": 2,
                         "kdiffusion": "n/a", "skipped": [], "rows": rows})
    assert "| euler_maruyama | sdediff | 4 |" in text


def test_overhead_of_diffusers_loops_and_torchode():
    _diffusers()
    if peers.load_torchode()[0] is None:
        pytest.skip(peers.load_torchode()[1])
    bench = ovh.Bench(torch.device("cpu"), batch=4, shape=(3, 4, 4), hidden=8, repeats=1, call_repeats=2)
    rows = ovh.run_overhead(bench, [], nfe=6, kdiffusion=False, torchdiffeq_methods={}, schedulers=peers.SCHEDULERS[:1],
                            torchode_methods=("tsit5",), log=lambda m: None)
    assert [(r["impl"], r["label"]) for r in rows] == [("torchode", "torchode tsit5"),
                                                       ("diffusers", "DPMSolverMultistep dpmsolver++ 2M [linspace]")]
    assert all("error" not in r and math.isfinite(r["ratio"]) and r["free_us_per_nfe"] > 0 for r in rows)
    assert rows[1]["nfe"] == 6 and rows[1]["steps"] == 6


def test_pass_cost_fit_recovers_a_line():
    rows = [{"impl": "sdediff", "kind": "ode", "adaptive": False, "state_ops_per_nfe": k, "outside_us_per_nfe_situ": 20 + 30 * k}
            for k in (3.0, 6.0, 8.0)]
    rows.append({"impl": "k-diffusion", "kind": "ode", "adaptive": False, "state_ops_per_nfe": 3.0,
                 "outside_us_per_nfe_situ": 1e4})  # peers are not part of the fit
    fit = ovh.pass_cost_fit({"rows": rows, "t_call_cpu_ms": 2.0})
    assert fit["rows"] == 3 and fit["per_op_us"] == pytest.approx(30) and fit["intercept_us"] == pytest.approx(20)
    assert fit["r2"] == pytest.approx(1) and fit["budget_us"] == pytest.approx(100)
    assert fit["ops_in_budget"] == pytest.approx(8 / 3)
    assert ovh.pass_cost_fit({"rows": rows[:2], "t_call_cpu_ms": 2.0}) is None


def test_overhead_kdiffusion_runs():
    _kdiffusion()
    bench = ovh.Bench(torch.device("cpu"), batch=4, shape=(3, 4, 4), hidden=8, repeats=1, call_repeats=2)
    with torch.inference_mode():
        assert bench.kd_run("dpmpp_2m", 4) == 4
        assert bench.kd_run("heun", 2) == 4
        assert bench.kd_run("dpmpp_sde", 2, randn_noise=True) == 4


def test_unregistered_specs_are_skipped_with_a_note():
    notes = []
    specs = [SPEC["heun"], common.SolverSpec("nope", "no_such_solver", "ode", 1),
             common.SolverSpec("bad options", "heun", "ode", 2, {"no_such_option": 1})]
    assert common.runnable_specs(specs, log=notes.append) == [SPEC["heun"]]
    assert "not registered" in notes[0] and "rejects" in notes[1]
    assert common.steps_for_budget(5, 2) == 2 and common.steps_for_budget(5, 10, 1) == 0


def test_accuracy_script_end_to_end(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert acc.main(["--quick", "--problems", "vp2", "--n", "32", "--nfe", "5", "10", "--no-peers", "--only", "^heun",
                     "--out", str(tmp_path)]) == 0
    assert (tmp_path / "accuracy_per_nfe_quick.png").stat().st_size > 1000
    results = json.loads((tmp_path / "accuracy_per_nfe_quick.json").read_text())
    assert {r["label"] for r in results["records"]} == {"heun", "heun (karras grid)", "heun (log-SNR grid)"}
    md = (tmp_path / "accuracy_per_nfe_quick.md").read_text()
    assert "| heun | sdediff | " in md and "Plot: ![accuracy_per_nfe_quick](accuracy_per_nfe_quick.png)" in md
    assert "set_num_threads(1)" in capsys.readouterr().out


def test_calibrated_grids_script_end_to_end_and_merge(tmp_path):
    _kdiffusion()
    assert cal.main(["--quick", "--nfe", "5", "--tag", "part", "--out", str(tmp_path)]) == 0
    part = json.loads((tmp_path / "calibrated_grids_quick_part.json").read_text())
    (row,) = part["rows"]
    assert row["problem"] == "VP d=2" and row["n_eval"] == 256 and set(row["calibrated"]) == set(cal.CANDIDATES)
    for c in [*row["calibrated"].values(), row["kd_calibrated"][cal.KD_CALIBRATED]]:
        assert c["evals"] <= 60 and len(c["times"]) == 6 and math.isfinite(c["rmse"])
        # the returned grid is never worse than its start grid on the held-out quarter of the pilot
        assert c["holdout_rmse"] < c["start_holdout_rmse"] or not c["accepted"]
    assert cal.main(["--merge", str(tmp_path / "calibrated_grids_quick_part.json"), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "calibrated_grids.md").read_text()
    assert "| VP d=2 | 5 | `" in text and "then --merge" in text
    assert (tmp_path / "calibrated_grids.png").is_file()  # --out elsewhere: the plot stays with the tables


def test_plots_of_full_runs_are_stored_once_in_the_docs(tmp_path):
    """A full run into benchmarks/results/ writes the plot the docs show into docs/img/ (its only copy) and links it
    from the results page; any other run keeps its plot next to its tables."""
    docs_png = common.DOCS_IMG / "accuracy_per_nfe.png"
    assert common.plot_path(common.RESULTS_DIR, "accuracy_per_nfe", "accuracy_per_nfe") == docs_png
    assert common.plot_path(common.RESULTS_DIR, "accuracy_per_nfe_quick", "accuracy_per_nfe").parent == common.RESULTS_DIR
    assert common.plot_path(tmp_path, "accuracy_per_nfe", "accuracy_per_nfe") == tmp_path / "accuracy_per_nfe.png"
    text = common.with_plot("# t\n\n| a |\n", common.RESULTS_DIR / "accuracy_per_nfe.md", docs_png)
    assert text == "# t\n\n| a |\n\nPlot: ![accuracy_per_nfe](../../docs/img/accuracy_per_nfe.png)\n"
    for name in ("accuracy_per_nfe", "calibrated_grids"):
        assert (common.DOCS_IMG / f"{name}.png").is_file() and not (common.RESULTS_DIR / f"{name}.png").exists()
        assert f"](../../docs/img/{name}.png)" in (common.RESULTS_DIR / f"{name}.md").read_text()


@pytest.mark.parametrize("script", [acc, ovh])
def test_help(script, capsys):
    with pytest.raises(SystemExit) as exc:
        script.main(["--help"])
    assert exc.value.code == 0 and "--quick" in capsys.readouterr().out and "--device" in script.build_parser().format_help()


def test_image_tricks_quick_run_pairs_every_model_with_the_baseline(tmp_path):
    bench = load_benchmark("image_tricks")
    assert bench.main(["--quick", "--steps", "2", "--n-test", "4", "--samples", "12", "--sample-sets", "2",
                       "--classifier-steps", "10", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "image_tricks_quick.json").read_text())
    md = (tmp_path / "image_tricks_quick.md").read_text()
    assert "PASS" not in md and "mirrored left-right" in md
    rows, training = doc["models"], doc["training"]
    assert list(rows) == ["baseline", "baseline_raw", "simple", "hflip"]
    assert {k: (v["config"]["weighting"], v["config"]["t_sampling"], v["steps"]) for k, v in training.items()} == {
        "baseline": ("likelihood", "importance", 2), "simple": ("simple", "uniform", 2),
        "hflip": ("likelihood", "importance", 2)}
    base = rows["baseline"]
    for key in ("baseline_raw", "simple", "hflip"):
        row = rows[key]
        # paired over the same test points / sample seeds: the mean difference is the difference of the means
        assert abs(row["ode_diff"] - (row["ode_bpd"] - base["ode_bpd"])) < 1e-9, key
        assert abs(row["elbo_diff"] - (row["elbo_bpd"] - base["elbo_bpd"])) < 1e-9, key
        assert abs(row["features"]["frechet_diff"] - (row["features"]["frechet"] - base["features"]["frechet"])) < 1e-6
        assert all(math.isfinite(row[k]) for k in ("ode_bpd", "ode_se", "elbo_bpd", "elbo_se")), key
    assert doc["floor"]["frechet"] >= 0 and len(doc["floor"]["per_set"]) == 2


def test_image_tricks_judge_scores_the_test_images_at_zero_distance():
    bench = load_benchmark("image_tricks")
    data = sdediff.data.load("digits")
    classifier = sdediff.features.train_classifier(data.train, data.train_labels, steps=100,
                                                   generator=torch.Generator().manual_seed(0))
    judge = bench.FeatureJudge(classifier, data, data.held_out, seed=0)
    # the test images quantise to themselves, so their Fréchet distance to the test features is zero
    assert judge.score(data.held_out)["frechet"] < 1e-6
    assert judge.score(data.held_out.flip(-1))["frechet"] > 1.0
