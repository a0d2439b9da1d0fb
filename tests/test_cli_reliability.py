"""The command line never prints a traceback for a user mistake or a damaged file: exit 2 for bad arguments, 1 for
runtime failures, one line that says what is wrong (``--debug`` adds the traceback); outputs are checked before any
computation and never overwritten without ``--overwrite``; a run folder's files are checked against each other."""

import json
import shutil

import numpy as np
import pytest
import torch

from sdediff import cli
from sdediff.cli import likelihood as cli_likelihood
from sdediff.cli import sample as cli_sample
from sdediff.training import load_checkpoint, save_checkpoint

TINY = ["--steps", "6", "--batch-size", "32", "--n-train", "200", "--eval-samples", "0", "--eval-nll-points", "0",
        "--ckpt-every", "3", "--no-plot", "--no-progress"]


def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def one_line_error(err: str) -> str:
    """The error output of a failed command: no traceback, and its last line says what is wrong."""
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and "error" in lines[-1], err
    return lines[-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("clirel")
    assert run("train", "--data", "moons", "--out", root / "moons", *TINY) == 0
    return root / "moons"


@pytest.fixture
def copy_of(trained, tmp_path):
    def make() -> object:
        target = tmp_path / "run"
        shutil.copytree(trained, target)
        return target

    return make


# --- bad arguments: exit 2 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, words", [
    (["likelihood", "--n", "0"], "--n"),
    (["likelihood", "--n", "-3"], "--n"),
    (["train", "--t-eps", "1.5"], "--t-eps"),
    (["train", "--beta-min", "30", "--beta-max", "20"], "beta"),
    (["train", "--sde", "ve", "--sigma-min", "100", "--sigma-max", "50"], "sigma"),
    (["train", "--eval-solver", "torchsde:bogus"], "torchsde"),
    (["sample", "--solver", "torchsde:bogus"], "torchsde"),
    (["bench", "--beta-min", "30", "--beta-max", "20"], "beta"),
])
def test_values_that_parse_but_are_out_of_range_exit_2(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(*argv) == 2
    line = one_line_error(capsys.readouterr().err)
    assert words in line


def test_eps_at_or_past_T_exits_2(trained, capsys):
    assert run("sample", "--run", trained, "--eps", "1.0", "--no-plot") == 2
    assert "--eps" in one_line_error(capsys.readouterr().err)
    assert run("likelihood", "--run", trained, "--eps", "2") == 2
    assert "--eps" in one_line_error(capsys.readouterr().err)


def test_a_config_file_that_is_not_utf8_exits_2(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_bytes(b"seed = 3\n\xff\xfe = 1\n")
    assert run("sample", "--config", config) == 2
    assert "UTF-8" in one_line_error(capsys.readouterr().err)


# --- outputs: refused before any computation ---------------------------------------------------------------
def test_sample_refuses_to_overwrite_unless_asked(trained, tmp_path, capsys, monkeypatch):
    out = tmp_path / "s.npy"
    out.write_bytes(b"precious")
    computed = []
    monkeypatch.setattr(cli_sample, "sample", lambda *a, **k: computed.append(1))
    assert run("sample", "--run", trained, "--n", "8", "--steps", "2", "--out", out, "--no-plot") == 2
    assert "--overwrite" in one_line_error(capsys.readouterr().err)
    assert out.read_bytes() == b"precious" and not computed
    monkeypatch.undo()
    assert run("sample", "--run", trained, "--n", "8", "--steps", "2", "--out", out, "--no-plot", "--overwrite",
               "--no-progress") == 0
    assert np.load(out).shape == (8, 2)
    # the .json beside it exists now: a new --out of the same stem is refused too
    assert run("sample", "--run", trained, "--n", "8", "--steps", "2", "--out", out.with_suffix(".pt"), "--no-plot") == 2
    assert "beside --out" in one_line_error(capsys.readouterr().err)


def test_likelihood_checks_its_output_before_computing(trained, tmp_path, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("computed although the output cannot be written")

    monkeypatch.setattr(cli_likelihood, "log_likelihood", fail)
    existing = tmp_path / "lik.json"
    existing.write_text("{}")
    assert run("likelihood", "--run", trained, "--n", "4", "--out", existing) == 2
    assert "exists already" in one_line_error(capsys.readouterr().err)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert run("likelihood", "--run", trained, "--n", "4", "--out", blocker / "lik.json") == 2
    assert "cannot write there" in one_line_error(capsys.readouterr().err)
    assert run("bench", "--out", blocker / "bench") == 2
    assert "cannot write there" in one_line_error(capsys.readouterr().err)


def test_the_cli_likelihood_runs_only_the_adaptive_ode(trained, tmp_path, monkeypatch):
    """log_likelihood with a fixed-step method= is not exact; no command passes one (the default is dopri5)."""
    seen = []
    real = cli_likelihood.log_likelihood

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(cli_likelihood, "log_likelihood", spy)
    options = {a.dest for a in cli.build_parser()._subparsers._group_actions[0].choices["likelihood"]._actions}
    assert not options & {"method", "options", "solver"}
    assert run("likelihood", "--run", trained, "--n", "4", "--no-bound", "--rtol", "1e-3", "--atol", "1e-3",
               "--out", tmp_path / "l.json", "--no-progress") == 0
    assert seen and all("method" not in kw and "options" not in kw for kw in seen)


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_sample_streams_chunks_to_the_file(trained, tmp_path, suffix):
    ref, out = tmp_path / "ref.pt", tmp_path / f"streamed{suffix}"
    common = ["--run", trained, "--n", "20", "--batch-size", "7", "--steps", "3", "--no-plot", "--no-progress"]
    assert run("sample", *common, "--out", ref) == 0
    assert run("sample", *common, "--out", out) == 0
    if suffix == ".npy":
        got = torch.from_numpy(np.load(out))
    else:
        from safetensors.torch import load_file

        got = load_file(str(out))["samples"]
    assert torch.equal(got, torch.load(ref, weights_only=True))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --- damaged run folders: exit 1, one line -----------------------------------------------------------------
@pytest.mark.parametrize("content", [b"\x80\x81 not json", b"[]", b'{"format": "sdediff-run", "shape": [3]}',
                                     b'{"format": "sdediff-run", "shape": [-2]}', b'{"format": "sdediff-run"}'])
def test_a_malformed_run_json_exits_1(copy_of, content, capsys):
    folder = copy_of()
    (folder / "run.json").write_bytes(content)
    assert run("sample", "--run", folder, "--n", "4", "--steps", "2", "--no-plot") == 1
    assert "run.json" in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("edit, words", [
    (lambda m: m["model"]["config"].update(widthh=3), "invalid"),
    (lambda m: m["sde"]["params"].update(beta_min=-5.0), "beta_min"),
    (lambda m: m.pop("config"), "training configuration"),
    (lambda m: m.update(prediction="banana"), "prediction"),
    (lambda m: m["model"]["config"].update(hidden=40_000, depth=4), "larger than any in the weights"),
])
def test_damaged_checkpoint_metadata_exits_1(copy_of, edit, words, capsys):
    folder = copy_of()
    (folder / "run.json").unlink()  # the checkpoint alone describes the run
    for path in folder.glob("ckpt_*.safetensors"):
        tensors, meta = load_checkpoint(path)
        edit(meta)
        save_checkpoint(path, tensors, meta)
    assert run("sample", "--run", folder, "--n", "4", "--steps", "2", "--no-plot") == 1
    assert words in one_line_error(capsys.readouterr().err)


def test_a_newer_checkpoint_of_another_model_is_refused(copy_of, tmp_path, capsys):
    folder = copy_of()
    other = tmp_path / "other"
    assert run("train", "--data", "moons", "--out", other, "--hidden", "16", *TINY) == 0
    shutil.copy(sorted(other.glob("ckpt_*.safetensors"))[-1], folder / "ckpt_00009999.safetensors")
    assert run("sample", "--run", folder, "--n", "4", "--steps", "2", "--no-plot") == 1
    assert "mixes two runs" in one_line_error(capsys.readouterr().err)


def test_debug_shows_the_traceback(copy_of, capsys):
    folder = copy_of()
    (folder / "run.json").write_text("[]")
    assert run("sample", "--run", folder, "--debug") == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "run.json" in err.strip().splitlines()[-1]


def test_an_unexpected_failure_is_one_line_with_its_type(trained, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("the accelerator fell over\nwith a second line of detail")

    monkeypatch.setattr(cli_sample, "sample", boom)
    assert run("sample", "--run", trained, "--n", "4", "--no-plot") == 1
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith("sdediff: error: RuntimeError: the accelerator fell over ...") and "--debug" in line


# --- resume keeps the history ------------------------------------------------------------------------------
def test_a_resume_with_more_cosine_steps_warns_and_keeps_the_history(copy_of, capsys):
    folder = copy_of()
    record, config = json.loads((folder / "run.json").read_text()), (folder / "config.toml").read_text()
    assert run("train", "--data", "moons", "--out", folder, *TINY[2:], "--steps", "9", "--resume") == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sdediff: warning:")]
    assert len(warned) == 1 and "changed config fields steps" in warned[0]  # one line, as changing --lr warns
    after = json.loads((folder / "run.json").read_text())
    assert after["args"] == record["args"] and (folder / "config.toml").read_text() == config
    assert after["resumes"][-1]["changed_args"]["steps"] == [6, 9]  # (and "out": the folder was copied)
    assert after["resumes"][-1]["checkpoint"] == "ckpt_00000006.safetensors"
