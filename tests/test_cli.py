"""The ``sdediff`` command line: help, argument errors, TOML configs, and train -> sample -> likelihood,
demo and bench runs at tiny sizes (the full-size demo, which must meet its sliced-W2 target, is slow)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sdediff
from sdediff import cli
from sdediff.calibrate import save_calibrated_grid
from sdediff.cli import parser as cli_parser
from sdediff.config import ConfigError, config_defaults, dump_toml, load_toml

COMMANDS = ("demo", "train", "sample", "likelihood", "bench")
TINY_TRAIN = ["--steps", "20", "--batch-size", "64", "--n-train", "500", "--eval-samples", "100",
              "--eval-nll-points", "8", "--eval-sample-steps", "10", "--no-progress"]


def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def moons_run(tmp_path_factory):
    """A moons run trained for 20 steps, its options given by a TOML file and overridden by a flag."""
    root = tmp_path_factory.mktemp("cli")
    config = root / "run.toml"
    config.write_text(f'seed = 3\n\n[train]\ndata = "moons"\nlr = 0.003\nsteps = 999\nout = "{(root / "moons").as_posix()}"\n'
                      '[sample]\nsolver = "pc"\n')
    assert run("train", "--config", config, *TINY_TRAIN) == 0
    return root / "moons"


# --- help and argument errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_each_command_shows_defaults(command, capsys):
    assert run(command, "--help") == 0
    out = capsys.readouterr().out
    assert f"usage: sdediff {command}" in out
    assert "(default:" in out and "--config" in out


def test_top_level_help_and_version(capsys):
    assert run("--help") == 0
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS)
    assert run("--version") == 0
    assert "sdediff" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["train", "--steps", "-1"], "--steps: must be a positive integer"),
    (["train", "--data", "no_such_set"], "--data no_such_set: no such file or folder, and not a known name"),
    (["train", "--data", "moons", "--image-size", "8"], "--image-size applies to images"),
    (["train", "--lr", "fast"], "--lr: must be a positive number"),
    (["sample", "--solver", "rk99"], "unknown solver 'rk99'"),
    (["sample", "--out", "x.txt"], "must end in .safetensors, .pt or .npy"),
    (["sample", "--solver-option", "snr"], "expected key=value"),
    (["sample"], "give --run DIR"),
    (["sample", "--run", "/nonexistent/run"], "no such folder"),
    (["likelihood", "--split", "valid"], "invalid choice: 'valid'"),
    (["demo", "--n", "3", "--splits", "4"], "too small for --splits"),
    (["demo", "--config", "/nonexistent/run.toml"], "does not exist"),
    (["nope"], "invalid choice: 'nope'"),
    ([], "the following arguments are required"),
])
def test_bad_arguments_exit_2_with_a_clear_message(argv, message, capsys):
    assert run(*argv) == 2
    err = capsys.readouterr().err
    assert message in err and "usage:" in err


def test_bad_solver_option_exits_2(moons_run, capsys):
    assert run("sample", "--run", moons_run, "--solver", "pc", "--solver-option", "bogus=1") == 2
    assert "--solver pc with options {'bogus': 1}" in capsys.readouterr().err


def test_console_script_exit_codes():
    ok = subprocess.run([sys.executable, "-m", "sdediff", "--version"], capture_output=True, text=True)
    assert ok.returncode == 0 and "sdediff" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "sdediff", "train", "--steps", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--steps" in bad.stderr


# --- TOML configs ----------------------------------------------------------------------------------------
def test_config_keys_map_to_flags_and_flags_win(tmp_path):
    parser, subs = cli_parser.build()
    doc = {"batch-size": 32, "lr": 1, "amp": True, "progress": False, "channel_mults": [1, 2, 2], "seed": 4,
           "train": {"seed": 5, "data": "rings"}, "sample": {"solver": "pc"}}
    values = config_defaults(subs["train"], doc, "train", subs)
    assert values == {"batch_size": 32, "lr": 1.0, "amp": True, "progress": False, "channel_mults": [1, 2, 2],
                      "seed": 5, "data": "rings"}
    sample_values = config_defaults(subs["sample"], {"sample": {"solver-option": {"snr": 0.2, "predictor": "ddpm"}}},
                                    "sample", subs)
    assert sample_values == {"solver_option": [("snr", 0.2), ("predictor", "ddpm")]}
    path = tmp_path / "c.toml"
    path.write_text('[train]\nsteps = 7\nlr = 0.5\n')
    args, _ = cli_parser.parse(["train", "--config", str(path), "--lr", "0.25"])
    assert (args.steps, args.lr) == (7, 0.25)


@pytest.mark.parametrize("doc, message", [
    ({"stepz": 3}, "'stepz' is not an option of 'sdediff train'"),
    ({"steps": "many"}, "must be a positive integer"),
    ({"steps": True}, "must be a number or string"),
    ({"amp": 1}, "is a switch"),
    ({"resize": "stretch"}, "must be one of"),
    ({"config": "other.toml"}, "cannot name another config"),
    ({"train": 3}, "[train] must be a table"),
])
def test_config_errors(doc, message):
    _, subs = cli_parser.build()
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config_defaults(subs["train"], doc, "train", subs, source="run.toml")


def test_bad_config_file_exits_2(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("steps = = 3\n")
    assert run("train", "--config", path) == 2
    assert "not valid TOML" in capsys.readouterr().err
    path.write_text("stepz = 3\n")
    assert run("train", "--config", path) == 2
    assert "'stepz' is not an option" in capsys.readouterr().err


def test_dump_toml_round_trips(tmp_path):
    values = {"data": 'moons "quoted"', "lr": 1e-05, "steps": 3, "amp": False, "mults": [1, 2], "skip": None,
              "inf": float("inf")}
    path = tmp_path / "x.toml"
    path.write_text(dump_toml(values, header="a header\n\nline"))
    assert load_toml(path) == {k: v for k, v in values.items() if v is not None}


# --- train, sample, likelihood ------------------------------------------------------------------------------
def test_train_writes_a_run_folder(moons_run):
    assert (moons_run / "ckpt_00000020.safetensors").is_file()
    metrics = json.loads((moons_run / "metrics.json").read_text())
    assert metrics["step"] == 20 and len(metrics["loss"]) == 20
    assert metrics["config"]["lr"] == 0.003 and metrics["config"]["seed"] == 3  # from the TOML file
    final = metrics["evals"][-1]
    assert final["step"] == 20 and np.isfinite(final["nll"]) and final["sliced_w2"] > 0 and final["noise_floor"] > 0
    record = json.loads((moons_run / "run.json").read_text())
    assert record["data"] == "moons" and record["shape"] == [2] and record["sde"]["class"] == "VPSDE"
    assert load_toml(moons_run / "config.toml")["steps"] == 20
    if has_matplotlib():
        assert (moons_run / "samples.png").is_file()


def test_train_refuses_to_mix_runs_and_resumes(moons_run, capsys):
    assert run("train", "--out", moons_run, *TINY_TRAIN) == 2
    assert "--resume" in capsys.readouterr().err
    assert run("train", "--config", moons_run / "config.toml", "--steps", "25", "--resume", "--eval-samples", "0",
               "--eval-nll-points", "0") == 0
    metrics = json.loads((moons_run / "metrics.json").read_text())
    assert metrics["step"] == 25 and len(metrics["loss"]) == 25
    assert run("train", "--config", moons_run / "config.toml", "--hidden", "64", "--resume") == 2
    assert "other model" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".safetensors"])
def test_sample_formats(moons_run, tmp_path, suffix):
    out = tmp_path / f"s{suffix}"
    assert run("sample", "--run", moons_run, "--solver", "pc", "--steps", "5", "--n", "50", "--solver-option",
               "snr=0.2", "--solver-option", "corrector_steps=1", "--out", out, "--no-progress") == 0
    if suffix == ".npy":
        x = torch.from_numpy(np.load(out))
    elif suffix == ".pt":
        x = torch.load(out, weights_only=True)
    else:
        from safetensors.torch import load_file

        x = load_file(str(out))["samples"]
    assert x.shape == (50, 2) and bool(torch.isfinite(x).all())
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["solver"] == "pc" and info["options"] == {"snr": 0.2, "corrector_steps": 1} and info["sliced_w2"] > 0
    if has_matplotlib():
        assert out.with_suffix(".png").is_file()


def test_sample_default_output_and_checkpoint_flag(moons_run, capsys):
    ckpt = sorted(moons_run.glob("ckpt_*.safetensors"))[0]
    assert run("sample", "--checkpoint", ckpt, "--solver", "adaptive_ode", "--solver-option", "rtol=1e-3",
               "--solver-option", "atol=1e-3", "--n", "20", "--no-plot", "--no-progress") == 0
    assert (moons_run / "samples_adaptive_ode_100.safetensors").is_file()
    assert "NFE" in capsys.readouterr().out


def test_sample_on_a_calibrated_grid(moons_run, tmp_path, capsys):
    out = tmp_path / "cal.pt"
    assert run("sample", "--run", moons_run, "--solver", "unipc", "--steps", "4", "--n", "40", "--time-grid", "calibrated",
               "--calibration-pilot", "32", "--calibration-evals", "20", "--out", out, "--no-plot", "--no-progress") == 0
    info = json.loads(out.with_suffix(".json").read_text())
    cal = info["calibration"]
    assert info["time_grid"] == "calibrated" and len(cal["times"]) == 5 and cal["evals"] <= 20
    assert cal["pilot_rmse"] <= cal["start_rmse"] and "calibrated 4-step grid" in capsys.readouterr().out
    assert run("sample", "--run", moons_run, "--solver", "pc", "--time-grid", "calibrated", "--no-plot") == 2
    assert "deterministic fixed-step solver" in capsys.readouterr().err


def test_likelihood(moons_run, tmp_path, capsys):
    out = tmp_path / "lik.json"
    assert run("likelihood", "--run", moons_run, "--n", "16", "--rtol", "1e-3", "--atol", "1e-3", "--bound-times",
               "4", "--out", out, "--no-progress") == 0
    doc = json.loads(out.read_text())
    assert doc["n"] == 16 and doc["trace"] == "exact" and doc["split"] == "test"
    assert np.isfinite(doc["nll"]) and np.isfinite(doc["nll_bound"])
    assert "NLL" in capsys.readouterr().out
    before = out.read_text()
    assert run("likelihood", "--run", moons_run, "--n", "8", "--split", "train", "--no-bound", "--out", out) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == before  # refused before any work
    assert run("likelihood", "--run", moons_run, "--n", "8", "--split", "train", "--no-bound", "--rtol", "1e-3",
               "--atol", "1e-3", "--out", out, "--overwrite") == 0
    assert json.loads(out.read_text())["split"] == "train"
    assert run("likelihood", "--run", moons_run, "--data", "digits") == 2


def test_missing_checkpoint_in_run_folder(tmp_path, capsys):
    assert run("sample", "--run", tmp_path) == 2
    assert "no valid checkpoint" in capsys.readouterr().err


def test_damaged_checkpoint_exits_1(moons_run, tmp_path, capsys):
    bad = tmp_path / "ckpt_00000001.safetensors"
    bad.write_bytes(b"not a checkpoint")
    assert run("sample", "--checkpoint", bad) == 1
    assert "cannot read checkpoint" in capsys.readouterr().err


def test_digits_train_sample_likelihood(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "digits"
    assert run("train", "--data", "digits", "--steps", "2", "--batch-size", "8", "--base-channels", "8",
               "--eval-samples", "4", "--eval-sample-steps", "2", "--eval-nll-points", "2", "--out", out,
               "--no-progress") == 0
    final = json.loads((out / "metrics.json").read_text())["evals"][-1]
    assert np.isfinite(final["bits_per_dim"])
    assert run("sample", "--run", out, "--steps", "2", "--n", "4", "--out", tmp_path / "d.npy") == 0
    assert np.load(tmp_path / "d.npy").shape == (4, 1, 8, 8)
    assert run("likelihood", "--run", out, "--n", "2", "--rtol", "1e-2", "--atol", "1e-2", "--bound-times", "2",
               "--out", tmp_path / "l.json") == 0
    doc = json.loads((tmp_path / "l.json").read_text())
    assert doc["trace"] == "hutchinson" and np.isfinite(doc["bits_per_dim"]) and np.isfinite(doc["bits_per_dim_bound"])
    if has_matplotlib():
        assert (out / "samples.png").is_file() and (tmp_path / "d.png").is_file()


def test_learned_schedule_run_loads_back_with_its_schedule(tmp_path, capsys):
    """A run trained in Python with loss="elbo" and a LearnedScheduleSDE (network fed sde.noise_level) is rebuilt by
    the CLI with its trained schedule and time input: the same score as the trainer's, and sample/likelihood work."""
    from sdediff import LearnedScheduleSDE
    from sdediff.data import make_toy
    from sdediff.runs import resolve_time_input
    from sdediff.training import MLP, TrainConfig, Trainer

    out = tmp_path / "learned"
    torch.manual_seed(0)
    sde = LearnedScheduleSDE(num_features=4)
    data = make_toy("moons", 256, torch.Generator().manual_seed(0))
    cfg = TrainConfig(loss="elbo", steps=4, batch_size=32, lr=1e-2, out_dir=str(out), progress=False, device="cpu")
    trainer = Trainer(MLP(dim=2, hidden=32, depth=2), sde, data, config=cfg, time_input=sde.noise_level)
    trainer.fit()
    loaded = sdediff.load_run(out)
    t = torch.tensor([0.0, 0.3, 1.0])
    assert isinstance(loaded.sde, LearnedScheduleSDE) and loaded.metadata["time_input"] == "sde.noise_level"
    assert not torch.equal(sde.gamma(t), LearnedScheduleSDE(num_features=4).gamma(t))  # training moved the schedule
    # the EMA weights come with the EMA schedule, the raw weights with the trained schedule itself
    torch.testing.assert_close(loaded.sde.gamma(t), trainer.ema_sde.gamma(t), rtol=0, atol=0)
    assert not torch.equal(trainer.ema_sde.gamma(t), sde.gamma(t))
    raw = sdediff.load_run(out, ema=False)
    torch.testing.assert_close(raw.sde.gamma(t), sde.gamma(t).detach(), rtol=0, atol=0)
    x = data[:8]
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(x, t[1]), trainer.score_fn(ema=True)(x, t[1]))
        torch.testing.assert_close(raw.score(x, t[1]), trainer.score_fn(ema=False)(x, t[1]))
    assert run("sample", "--run", out, "--steps", "3", "--n", "16", "--no-plot", "--out", tmp_path / "s.npy") == 0
    assert bool(np.isfinite(np.load(tmp_path / "s.npy")).all())
    assert run("likelihood", "--run", out, "--data", "moons", "--n", "4", "--rtol", "1e-2", "--atol", "1e-2",
               "--bound-times", "2", "--out", tmp_path / "l.json") == 0
    doc = json.loads((tmp_path / "l.json").read_text())
    assert np.isfinite(doc["nll"]) and np.isfinite(doc["nll_bound"])
    assert "LearnedScheduleSDE" in capsys.readouterr().out
    with pytest.raises(ValueError, match="custom time_input"):  # a callable the checkpoint cannot hold
        resolve_time_input("custom", loaded.sde)


# --- demo and bench ---------------------------------------------------------------------------------------
def test_demo_quick_variant(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run("demo", "--steps", "30", "--n", "200", "--splits", "2", "--nll-points", "20", "--n-train", "1000",
               "--out", out, "--no-progress") == 0
    text = capsys.readouterr().out
    assert "sliced W2" in text and "true NLL" in text and str(out / "metrics.json") in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["solver"] for r in metrics["solvers"]] == ["euler_maruyama", "pc", "adaptive_ode"]
    for row in metrics["solvers"]:
        assert row["finite"] and row["within_bound"] == (row["sliced_w2"] <= 2 * row["noise_floor"])
    assert set(metrics["nll"]) >= {"model NLL, probability-flow ODE (exact trace)"}
    assert (out / "table.md").read_text().count("| yes |") + (out / "table.md").read_text().count("| no |") == 3
    assert sorted(p.name for p in (out / "checkpoints").glob("ckpt_*")) == ["ckpt_00000030.safetensors"]
    if has_matplotlib():
        assert (out / "samples.png").is_file()
    # the demo folder is a run folder for the other commands
    assert run("sample", "--run", out, "--steps", "5", "--n", "10", "--no-plot") == 0


def test_bench_quick(tmp_path, capsys):
    assert run("bench", "--quick", "--n", "100", "--out", tmp_path, "--no-plot") == 0
    assert "| heun |" in capsys.readouterr().out
    assert json.loads((tmp_path / "metrics.json").read_text())["n"] == 100


def test_bench_on_a_trained_run_recommends_and_saves_its_calibrated_grids(moons_run, tmp_path, capsys):
    """bench --run: every solver and grid on the run's model per budget, a recommendation, the tables and JSON, the
    winning calibrated grids saved into the run, where sample --time-grid calibrated uses them without calibrating."""
    folder = tmp_path / "moons"
    shutil.copytree(moons_run, folder)
    out = tmp_path / "bench"
    assert run("bench", "--run", folder, "--budgets", "8", "4", "--n", "64", "--calibration-pilot", "32",
               "--calibration-evals", "20", "--save-grids", "--out", out, "--no-progress", "--no-plot") == 0
    text = capsys.readouterr().out
    assert "| NFE ≤ | recommended, standard grid |" in text and "data floor" in text
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["budgets"] == [4, 8] and set(doc["recommended"]) == {"4", "8"} and doc["reference"]["sw2"] > 0
    assert all(r["nfe"] <= r["budget"] for r in doc["rows"] if r["error"] is None)
    assert {r["kind"] for r in doc["rows"]} == {"ode", "sde"} and (out / "table.md").is_file()
    winners = {b: r for b, r in doc["recommended"].items() if r["grid"] == "calibrated"}
    assert sorted(str(g["budget"]) for g in doc["saved_grids"]) == sorted(winners)
    # a grid in the run's calibrated_grids.json is used as it is
    grid = [1.0, 0.3, 0.05, 1e-3]
    save_calibrated_grid(folder, grid, solver="dpm_solver", options={"order": 2}, steps=3, eps=1e-3,
                         checkpoint=sdediff.load_run(folder).checkpoint.name, info={"pilot_rmse": 0.25})
    assert run("sample", "--run", folder, "--solver", "dpm_solver", "--solver-option", "order=2", "--steps", "3",
               "--time-grid", "calibrated", "--n", "16", "--out", tmp_path / "s.npy", "--no-plot", "--no-progress") == 0
    assert "using the calibrated 3-step grid saved in" in capsys.readouterr().out
    assert json.loads((tmp_path / "s.json").read_text())["calibration"]["times"] == grid
    assert run("bench", "--run", tmp_path / "nope") == 2


def test_bench_runs_without_a_source_checkout(tmp_path):
    """An installed package has no benchmarks/ folder beside it: bench runs from the package alone."""
    site = tmp_path / "site"
    shutil.copytree(Path(sdediff.__file__).parent, site / "sdediff", ignore=shutil.ignore_patterns("__pycache__"))
    assert not (site / "benchmarks").exists()
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = tmp_path / "bench"
    code = "import sys, sdediff.cli; print(sdediff.__file__); sys.exit(sdediff.cli.main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, "bench", "--n", "64", "--out", str(out), "--no-plot",
                           "--no-progress"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(str(site / "sdediff"))  # the copy was imported, not the checkout
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["solver"] for r in metrics["solvers"]] == ["euler_maruyama", "pc", "heun", "ode"]
    assert all(r["finite"] and r["sliced_w2"] > 0 and r["floor"] > 0 for r in metrics["solvers"])
    assert "| heun |" in done.stdout and (out / "table.md").is_file()
    # the benchmark scripts' pass-through is gone: extra arguments are an argument error
    assert run("bench", "--script", "overhead") == 2


def test_load_run_of_a_cli_run(moons_run):
    """sdediff.load_run rebuilds what `sdediff train` wrote: the SDE from its configuration, the EMA network of the
    newest checkpoint, the records of run.json, and a score that is the network's eps prediction over s(t)."""
    loaded = sdediff.load_run(moons_run)
    record = json.loads((moons_run / "run.json").read_text())
    assert isinstance(loaded.sde, sdediff.VPSDE) and loaded.sde.to_config() == record["sde"]
    assert loaded.shape == (2,) and loaded.data == "moons" and loaded.seed == 3 and loaded.record == record
    assert loaded.directory == moons_run and loaded.checkpoint == sorted(moons_run.glob("ckpt_*.safetensors"))[-1]
    assert loaded.step == loaded.metadata["step"] and loaded.t_eps == 1e-5
    assert not loaded.net.training and not any(p.requires_grad for p in loaded.net.parameters())
    from sdediff.training import load_checkpoint

    tensors, _ = load_checkpoint(loaded.checkpoint)
    for name, value in loaded.net.state_dict().items():
        assert torch.equal(value, tensors[f"ema.{name}"])
    x, t = torch.randn(5, 2, generator=torch.Generator().manual_seed(0)), torch.full((5,), 0.4)
    with torch.no_grad():
        expected = -loaded.net(x, t) / loaded.sde.marginal_std(t)[:, None]
        torch.testing.assert_close(loaded.score(x, t), expected)
    by_file = sdediff.load_run(loaded.checkpoint, ema=False)  # a checkpoint file: its folder is the run folder
    assert by_file.directory == moons_run and by_file.record == record
    assert torch.equal(by_file.net.out.weight, tensors["model.out.weight"])


def test_load_run_errors(moons_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        sdediff.load_run(tmp_path / "missing")
    with pytest.raises(ValueError, match="no valid checkpoint"):
        sdediff.load_run(tmp_path)
    from sdediff.training import CheckpointError, load_checkpoint, save_checkpoint

    ckpt = sorted(moons_run.glob("ckpt_*.safetensors"))[-1]
    tensors, meta = load_checkpoint(ckpt)
    broken = tmp_path / "broken"
    meta["sde"] = {"class": "MySDE", "params": {}, "repr": "MySDE()"}
    save_checkpoint(broken / ckpt.name, tensors, meta)
    with pytest.raises(ValueError, match="unknown SDE class 'MySDE'"):
        sdediff.load_run(broken)
    assert run("sample", "--run", broken) == 2  # a run the command line cannot rebuild: an argument error
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(ckpt, bad / ckpt.name)
    (bad / "run.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="run.json"):
        sdediff.load_run(bad)
    assert run("sample", "--run", bad) == 1  # a damaged run: a runtime failure


@pytest.mark.slow
def test_full_demo_meets_the_target(tmp_path):
    """The default demo: every sampler's sliced-W2 to held-out data within 2x the noise floor."""
    out = tmp_path / "demo"
    assert run("demo", "--out", out, "--check", "--no-progress") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["within_bound"]
    for row in metrics["solvers"]:
        assert row["sliced_w2"] <= 2 * row["noise_floor"], row
    nll = metrics["nll"]
    model = nll["model NLL, probability-flow ODE (exact trace)"]["nats"]
    true = nll["true NLL (exact density of the data)"]["nats"]
    assert true - 0.05 < model < true + 0.3
