"""Fuzzing the command line in-process (``sdediff.cli.main``): random argument lists built from the real options and
hostile values, and run folders corrupted at random. Whatever the input, the exit status is 0, 1 or 2 and no Python
traceback is printed; a failure ends with one line that says what is wrong.

The computations themselves (training, sampling, likelihoods, comparisons) are replaced by a stub that stops the
command where the work would start, so each example costs milliseconds and every argument check before it is
exercised; the corrupted folders are sampled for real (two steps of four samples)."""

import contextlib
import io
import json
import os
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdediff import cli
from sdediff.training import load_checkpoint, save_checkpoint

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
COMMANDS = ("train", "sample", "likelihood", "bench", "demo")


class Reached(Exception):
    """Raised by the stubs where a command's computation would start."""


def stop(*args, **kwargs):
    raise Reached("the computation was reached")


STUBS = ("sdediff.training.Trainer.fit", "sdediff.cli.sample.sample", "sdediff.cli.sample.calibrate_grid",
         "sdediff.cli.likelihood.log_likelihood", "sdediff.cli.bench.compare_solvers", "sdediff.cli.demo.compare_solvers")


def main(argv, stubbed=True):
    """``(status, stderr)`` of ``sdediff argv`` run in this process, torch's thread count restored."""
    threads, err = torch.get_num_threads(), io.StringIO()
    with contextlib.ExitStack() as stack:
        if stubbed:
            for target in STUBS:
                stack.enter_context(mock.patch(target, stop))
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        stack.enter_context(contextlib.redirect_stderr(err))
        try:
            status = cli.main([str(a) for a in argv])
        finally:
            torch.set_num_threads(threads)
    return status, err.getvalue()


def assert_clean(status, err):
    assert status in (0, 1, 2), (status, err)
    assert "Traceback" not in err, err
    if status:
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert lines and "error" in lines[-1], err


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working folder (the current directory during the module) holding a tiny trained run, ``base``."""
    root = tmp_path_factory.mktemp("fuzz")
    previous = os.getcwd()
    os.chdir(root)
    try:
        status, err = main(["train", "--data", "moons", "--out", "base", "--steps", "4", "--batch-size", "16",
                            "--n-train", "64", "--hidden", "16", "--depth", "1", "--eval-samples", "0",
                            "--eval-nll-points", "0", "--ckpt-every", "2", "--no-plot", "--no-progress"], stubbed=False)
        assert status == 0, err
        (root / "a_file.txt").write_text("not a folder")
        (root / "bad.toml").write_bytes(b"seed = \xff\n")
        (root / "ok.toml").write_text('seed = 3\n[sample]\nn = 4\n')
        yield root
    finally:
        os.chdir(previous)


def options_of(command):
    """The long options of a sub-command, from the real parser."""
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]  # argparse keeps no public map of sub-parsers
    return sorted(o for a in sub._actions for o in a.option_strings if o.startswith("--") and o not in ("--help", "--debug"))


VALUES = st.sampled_from(["-1", "0", "1", "2", "3", "0.5", "1.5", "1e-3", "nan", "inf", "-inf", "abc", "", "x=1",
                          "snr=0.1", "heun", "torchsde:bogus", "ode", "vp", "ve", "digits", "moons", "cuda", "cpu",
                          "base", "base/ckpt_00000004.safetensors", "a_file.txt", "a_file.txt/out.json", "bad.toml",
                          "ok.toml", "new_out", "new_out/s.npy", "out.pt", "/proc/nope/x.safetensors", "ünï",
                          "--", "-n"])


@st.composite
def argument_lists(draw):
    command = draw(st.sampled_from(COMMANDS))
    options = options_of(command)
    argv = [command]
    for _ in range(draw(st.integers(0, 6))):
        argv.append(draw(st.sampled_from(options)))
        argv.extend(draw(st.lists(VALUES, min_size=0, max_size=2)))
    if command in ("sample", "likelihood") and draw(st.booleans()):
        argv += ["--run", "base"]
    return argv


@SETTINGS
@given(argv=argument_lists())
def test_random_arguments_exit_cleanly(workdir, argv):
    assert_clean(*main(argv))


# --- corrupted run folders ---------------------------------------------------------------------------------
json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False) |
                           st.text(max_size=8), lambda inner: st.lists(inner, max_size=3) |
                           st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


@st.composite
def corruptions(draw):
    kind = draw(st.sampled_from(["truncate", "flip", "run.json bytes", "run.json value", "run.json shape",
                                 "metadata", "model config", "sde params", "model config alone", "sde params alone",
                                 "delete run.json", "delete checkpoints"]))
    return kind, draw(st.integers(0, 10**9)), draw(json_values), draw(st.binary(max_size=40))


def corrupt(folder: Path, kind, number, value, raw):
    checkpoints = sorted(folder.glob("ckpt_*.safetensors"))
    newest = checkpoints[-1]
    if kind == "truncate":
        data = newest.read_bytes()
        newest.write_bytes(data[: number % len(data)])
    elif kind == "flip":
        data = bytearray(newest.read_bytes())
        data[number % len(data)] ^= 1 + number % 255
        newest.write_bytes(bytes(data))
    elif kind == "run.json bytes":
        (folder / "run.json").write_bytes(raw)
    elif kind in ("run.json value", "run.json shape"):
        record = json.loads((folder / "run.json").read_text())
        record["shape" if kind == "run.json shape" else sorted(record)[number % len(record)]] = value
        (folder / "run.json").write_text(json.dumps(record))
    elif kind.startswith(("metadata", "model config", "sde params")):  # "... alone": without run.json to compare
        tensors, meta = load_checkpoint(newest)
        target = {"metadata": meta, "model": meta["model"]["config"], "sde": meta["sde"]["params"]}[kind.split()[0]]
        keys = sorted(target)
        target[keys[number % len(keys)] if number % 3 else f"extra{number % 7}"] = value
        save_checkpoint(newest, tensors, meta)  # a valid file whose contents lie
        if kind.endswith("alone"):
            (folder / "run.json").unlink()
    elif kind == "delete run.json":
        (folder / "run.json").unlink()
    else:
        for path in checkpoints:
            path.unlink()


@SETTINGS
@given(corruption=corruptions())
def test_corrupted_run_folders_exit_cleanly(workdir, corruption):
    folder = workdir / "corrupted"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(workdir / "base", folder)
    corrupt(folder, *corruption)
    assert_clean(*main(["sample", "--run", folder, "--n", "4", "--steps", "2", "--no-plot", "--no-progress",
                        "--overwrite", "--out", workdir / "fuzz_samples.npy"], stubbed=False))
    assert_clean(*main(["likelihood", "--run", folder, "--n", "4", "--no-progress"]))
