"""Reliability of the library: clear errors for every bad argument, no silent wrong result, bounded memory, and
files that cannot harm (crafted checkpoints refused before any allocation, no stray temporary files).

The command line's share (exit codes, one-line errors, --overwrite, run folders) is in test_cli_reliability.py; the
random searches over the API and the command line are in test_api_properties.py and test_cli_fuzz.py."""

import json
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from problems import MIXTURE, gen

import sdediff
from sdediff._io import (
    atomic_file,
    check_writable,
    remove_stale_temporaries,
    save_safetensors,
    temporary_name,
)
from sdediff._validate import check_bool, check_choice, check_device, check_dtype, check_float, check_int, check_ints
from sdediff.score import ScoreModel
from sdediff.training import MLP, CheckpointError, TrainConfig, load_checkpoint, load_model, save_checkpoint
from sdediff.training.checkpoint import check_module_fits

SDE = sdediff.VPSDE()
SCORE = MIXTURE.score_fn(SDE)


# --- TypeError for a wrong type, ValueError for a wrong value ----------------------------------------------
@pytest.mark.parametrize("check, args, error", [
    (check_int, ("steps", 2.5), TypeError), (check_int, ("steps", True), TypeError), (check_int, ("steps", "3"), TypeError),
    (check_int, ("steps", 0), ValueError), (check_int, ("steps", -1), ValueError),
    (check_float, ("eps", "0.1"), TypeError), (check_float, ("eps", None), TypeError),
    (check_float, ("eps", float("nan")), ValueError), (check_float, ("eps", float("inf")), ValueError),
    (check_float, ("eps", 2.0, 0.0, 1.0), ValueError),
    (check_ints, ("shape", 4), TypeError), (check_ints, ("shape", "ab"), TypeError), (check_ints, ("shape", (2, 1.0)), TypeError),
    (check_ints, ("shape", ()), ValueError), (check_ints, ("shape", (2, 0)), ValueError),
    (check_choice, ("trace", 3, ("exact", "hutchinson")), TypeError),
    (check_choice, ("trace", "bogus", ("exact", "hutchinson")), ValueError),
    (check_bool, ("denoise", "yes"), TypeError), (check_bool, ("denoise", 1), TypeError),
    (check_dtype, ("dtype", "float32"), TypeError), (check_dtype, ("dtype", torch.int64), TypeError),
    (check_dtype, ("dtype", torch.bool), TypeError), (check_dtype, ("dtype", torch.complex64), TypeError),
    (check_device, ("device", 3.5), TypeError), (check_device, ("device", "nowhere"), ValueError),
])
def test_validate_raises_type_error_for_a_wrong_type_and_value_error_for_a_wrong_value(check, args, error):
    with pytest.raises(error, match=args[0]):
        check(*args)


# --- sample: unclear errors made clear ---------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, match", [
    ({"dtype": torch.int64}, TypeError, "dtype"),
    ({"dtype": torch.bool}, TypeError, "dtype"),
    ({"dtype": torch.complex64}, TypeError, "dtype"),
    ({"generator": 7}, TypeError, "generator"),
    ({"denoise": "yes"}, TypeError, "denoise"),
    ({"progress": 1}, TypeError, "progress"),
    ({"shape": 4}, TypeError, "shape"),
    ({"shape": (0, 2)}, ValueError, "shape"),
    ({"x_init": torch.full((4, 2), float("nan"))}, ValueError, "x_init"),
    ({"x_init": torch.tensor([[0.0, float("inf")]] * 4)}, ValueError, "x_init"),
    ({"time_grid": lambda sde, steps, eps: torch.linspace(sde.T, eps, steps)}, ValueError, "steps \\+ 1"),
    ({"time_grid": lambda sde, steps, eps: torch.linspace(sde.T, 0.5, steps + 1)}, ValueError, "from T"),
    ({"time_grid": 5}, TypeError, "time_grid"),
    ({"options": {"max_num_steps": 5}}, RuntimeError, "max_num_steps=5"),
    ({"options": [("max_num_steps", 5)]}, TypeError, "options"),
])
def test_sample_refuses_bad_arguments_clearly(kwargs, error, match):
    kwargs = {"shape": (4, 2), **kwargs}
    with pytest.raises(error, match=match):
        sdediff.sample(SDE, SCORE, solver="ode", steps=10, generator=gen(0), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_sample_on_cuda_without_cuda_is_a_value_error():
    with pytest.raises(ValueError, match="device='cuda' is not available"):
        sdediff.sample(SDE, SCORE, (4, 2), solver="heun", steps=2, device="cuda")


def test_nan_x_init_is_refused_for_every_kind_of_solver():
    x = torch.randn(3, 2)
    x[1, 0] = float("nan")
    for solver in ("euler_maruyama", "heun", "ode", "adaptive_ode", "dpm_solver"):
        with pytest.raises(ValueError, match="x_init"):
            sdediff.sample(SDE, SCORE, (3, 2), solver=solver, steps=4, x_init=x)


def test_a_callable_grid_of_the_right_length_works():
    ts = []
    x = sdediff.sample(SDE, SCORE, (4, 2), solver="heun", steps=6, generator=gen(0),
                       time_grid=lambda sde, steps, eps: ts.append(steps) or torch.linspace(sde.T, eps, steps + 1))
    assert ts == [6] and x.shape == (4, 2)


def test_train_config_refuses_an_unknown_eval_solver_at_construction():
    for bogus in ("bogus", "torchsde:bogus"):
        with pytest.raises(ValueError, match="eval_solver"):
            TrainConfig(eval_solver=bogus)


def test_more_steps_on_resume_conflict_under_the_cosine_schedule_only():
    old = TrainConfig(steps=100, lr_schedule="cosine")
    assert TrainConfig(steps=200, lr_schedule="cosine").resume_conflicts(old) == ["steps"]
    assert TrainConfig(steps=100, lr_schedule="cosine", lr=1e-3).resume_conflicts(old) == ["lr"]
    constant = TrainConfig(steps=100, lr_schedule="constant")
    assert TrainConfig(steps=200, lr_schedule="constant").resume_conflicts(constant) == []


# --- chunked sampling: one output, bounded memory ----------------------------------------------------------
def test_chunks_are_written_into_one_output_with_the_same_samples():
    whole = sdediff.sample(SDE, SCORE, (10, 2), solver="euler_maruyama", steps=5, generator=gen(3), batch_size=4)
    g = gen(3)
    parts = [sdediff.sample(SDE, SCORE, (k, 2), solver="euler_maruyama", steps=5, generator=g) for k in (4, 4, 2)]
    assert torch.equal(whole, torch.cat(parts))


def test_chunked_image_sampling_peaks_near_the_output_size(tmp_path):
    """Peak resident memory of sample(batch_size=...) in a fresh process, over the output's size: the chunks go into
    one preallocated output (concatenating them would need twice the output)."""
    code = textwrap.dedent("""
        import resource, torch, sdediff
        torch.set_num_threads(1)
        sde = sdediff.VPSDE()
        score = lambda x, t: -x
        sdediff.sample(sde, score, (8, 3, 32, 32), solver="euler", steps=2)  # warm up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        x = sdediff.sample(sde, score, (8000, 3, 32, 32), solver="euler", steps=2, batch_size=200)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(grown * 1024 / (x.numel() * x.element_size()))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 0, out.stderr[-2000:]
    ratio = float(out.stdout.strip().splitlines()[-1])
    assert ratio < 1.35, f"peak memory {ratio:.2f}x the output"


# --- adaptive_ode: a sample's result does not depend on the batch ------------------------------------------
def _alone_and_in_batch(score, dtype, n=24, rtol=1e-4):
    x = SDE.prior_sample((n, 2), generator=gen(1), dtype=dtype)
    batch = sdediff.sample(SDE, score, (n, 2), solver="adaptive_ode", x_init=x, rtol=rtol, atol=rtol)
    alone = torch.cat([sdediff.sample(SDE, score, (1, 2), solver="adaptive_ode", x_init=x[i:i + 1], rtol=rtol, atol=rtol)
                       for i in range(n)])
    return alone, batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adaptive_ode_sample_does_not_depend_on_the_batch(dtype):
    """With a score whose row i depends on sample i alone (the exact mixture score), a sample solved alone and inside
    a batch (where the others finish at other times) agree bit for bit in float32, to rounding in float64."""
    alone, batch = _alone_and_in_batch(SCORE, dtype)
    if dtype == torch.float32:
        assert torch.equal(alone, batch)
    else:
        torch.testing.assert_close(alone, batch, rtol=0, atol=1e-13)


def test_adaptive_ode_with_a_float32_network_moves_by_at_most_about_the_tolerance():
    """torch's float32 nn.Linear rounds a row differently at batch 1 and batch 24, so an MLP's score is not
    row-independent; the solver cannot undo that, but the result moves by about the tolerance at most."""
    torch.manual_seed(0)
    net = MLP(2, hidden=32, depth=2)
    for p in net.out.parameters():  # a non-zero output layer (a fresh one predicts 0)
        torch.nn.init.normal_(p, std=0.3)
    alone, batch = _alone_and_in_batch(ScoreModel(net, SDE, "eps"), torch.float32, rtol=1e-4)
    assert float((alone - batch).abs().max()) <= 10 * 1e-4 * float(batch.abs().max())


# --- files: our own safetensors writer and temporary names -------------------------------------------------
def test_our_safetensors_files_read_back_with_safetensors(tmp_path):
    from safetensors import safe_open

    tensors = {"w": torch.randn(3, 5), "h": torch.arange(7), "b": torch.tensor([True, False]), "e": torch.empty(0, 2),
               "half": torch.randn(4).bfloat16(), "view": torch.randn(6, 4)[:, 1]}
    path = save_safetensors(tmp_path / "x.safetensors", tensors, {"note": "ünïcode"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"note": "ünïcode"}
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v)
    assert os.listdir(tmp_path) == ["x.safetensors"]


def test_stale_temporaries_of_dead_processes_are_removed_and_nothing_else(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    ours = tmp_path / f".ckpt_00000010.safetensors.{dead_pid}.abcd_123.tmp"
    alive = tmp_path / f".ckpt_00000020.safetensors.{os.getppid()}.abcd_123.tmp"
    mine = tmp_path / f".metrics.json.{os.getpid()}.abcd_123.tmp"
    others = [tmp_path / ".tmpAbC123", tmp_path / "ckpt_00000010.safetensors.tmp", tmp_path / ".notes.123.tmp",
              tmp_path / f".user.{dead_pid}.tmp"]
    for p in [ours, alive, mine, *others]:
        p.write_bytes(b"x")
    assert temporary_name(ours)["name"] == "ckpt_00000010.safetensors"
    assert remove_stale_temporaries(tmp_path, re.compile(r"metrics\.json")) == []  # another final name
    assert remove_stale_temporaries(tmp_path) == [ours]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in [alive, mine, *others])


def test_atomic_file_leaves_nothing_on_an_error(tmp_path):
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
    check_writable(tmp_path / "sub" / "f.json")  # the probe leaves only the folder it made
    assert [p.name for p in tmp_path.rglob("*")] == ["sub"]


KILL_DURING_WRITE = """
import os, sys, time
import torch
import sdediff
import sdediff._io as io
from sdediff.training import MLP, TrainConfig, Trainer
real, written = io.write_tensor_bytes, []
def slow(f, x):  # with KILL_ME: stop for good after two tensors of the checkpoint of step 10
    if os.environ.get("KILL_ME") and ".ckpt_00000010" in str(f.name):
        written.append(1)
        if len(written) == 3:
            print("WRITING", flush=True)
            time.sleep(600)
    return real(f, x)
io.write_tensor_bytes = slow
torch.manual_seed(0)
data = torch.randn(128, 2, generator=torch.Generator().manual_seed(1))
cfg = TrainConfig(steps=15, batch_size=16, ckpt_every=5, eval_samples=0, eval_nll_points=0, progress=False,
                  out_dir=sys.argv[1])
Trainer(MLP(2, hidden=16, depth=1), sdediff.VPSDE(), data, config=cfg).fit(resume=True)
print("DONE", flush=True)
"""


def test_a_kill_in_the_middle_of_a_checkpoint_write_leaves_no_stray_file(tmp_path):
    import signal

    script = tmp_path / "train.py"
    script.write_text(KILL_DURING_WRITE)
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**env, "KILL_ME": "1"})
    try:
        line = proc.stdout.readline()
        assert line.strip() == "WRITING", proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = sorted(p.name for p in run_dir.iterdir())
    strays = [n for n in left if n.startswith(".")]
    assert len(strays) == 1 and temporary_name(strays[0])["name"] == "ckpt_00000010.safetensors", left  # ours only
    assert "ckpt_00000005.safetensors" in left and not any(n.startswith(".tmp") for n in left)
    done = subprocess.run([sys.executable, str(script), str(run_dir)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0 and "DONE" in done.stdout, done.stderr[-2000:]
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]  # the resumed run cleaned up after it
    assert load_checkpoint(run_dir / "ckpt_00000015.safetensors")[1]["step"] == 15


# --- crafted checkpoints ----------------------------------------------------------------------------------
def _checkpoint(tmp_path, **config_changes):
    """A small trainer-style checkpoint of an MLP(2, hidden=8, depth=1), its model configuration edited."""
    net = MLP(2, hidden=8, depth=1)
    tensors = {f"model.{k}": v for k, v in net.state_dict().items()} | {f"ema.{k}": v for k, v in net.state_dict().items()}
    meta = {"step": 1, "config": TrainConfig().to_dict(), "prediction": "eps", "sde": {**SDE.to_config(), "repr": "VP"},
            "model": {"class": "MLP", "config": {**net.config, **config_changes}}}
    return save_checkpoint(tmp_path / "ckpt_00000001.safetensors", tensors, meta), meta


def test_a_checkpoint_claiming_a_huge_model_is_refused_before_allocation(tmp_path):
    path, _ = _checkpoint(tmp_path, hidden=40_000, depth=4)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="larger than any in the weights"):
        load_model(path)
    assert time.perf_counter() - start < 5


def test_a_checkpoint_whose_configuration_does_not_fit_its_weights_is_refused(tmp_path):
    path, _ = _checkpoint(tmp_path, hidden=6)  # within the file's sizes, but not the weights' shapes
    with pytest.raises(CheckpointError, match="does not fit the weights"):
        load_model(path)
    path, _ = _checkpoint(tmp_path, depth=2)
    with pytest.raises(CheckpointError, match="missing"):
        load_model(path)


def test_check_module_fits_builds_on_the_meta_device(monkeypatch):
    built = []
    state = MLP(2, hidden=8, depth=1).state_dict()

    def build(**config):
        module = MLP(**config)
        built.append(next(module.parameters()).device.type)
        return module

    check_module_fits(build, {"dim": 2, "hidden": 8, "depth": 1}, state, "test")
    assert built == ["meta"]
    with pytest.raises(CheckpointError, match="invalid"):
        check_module_fits(build, {"dim": 2, "hidden": 8, "depth": 1, "bogus": 1}, state, "test")


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["model"]["config"].update(bogus=3), "invalid"),
    (lambda m: m.pop("config"), "no training configuration"),
    (lambda m: m.update(prediction="banana"), "prediction"),
    (lambda m: m["sde"]["params"].update(beta_min=-5.0), "cannot be rebuilt|beta_min"),
    (lambda m: m.update(sde="VP"), "SDE description"),
    (lambda m: m.update(step="ten"), "step"),
    (lambda m: m["config"].update(t_eps=5.0), "damaged|t_eps"),
])
def test_load_run_refuses_damaged_checkpoint_metadata(tmp_path, edit, match):
    path, meta = _checkpoint(tmp_path)
    tensors, meta = load_checkpoint(path)
    edit(meta)
    save_checkpoint(path, tensors, meta)
    with pytest.raises((CheckpointError, ValueError), match=match):
        sdediff.load_run(path)


def _run_folder(tmp_path, **record_changes):
    path, meta = _checkpoint(tmp_path)
    record = {"format": "sdediff-run", "version": 1, "data": "moons", "shape": [2], "seed": 0, "n_train": 10,
              "sde": SDE.to_config(), "model": meta["model"], **record_changes}
    (tmp_path / "run.json").write_text(json.dumps(record))
    return tmp_path


@pytest.mark.parametrize("changes, match", [
    ({"shape": [3]}, "shape"), ({"shape": [-2]}, "shape"), ({"shape": "2"}, "shape"), ({"shape": []}, "shape"),
    ({"model": {"class": "MLP", "config": {"dim": 2, "hidden": 64, "depth": 1}}}, "mixes two runs"),
    ({"sde": {"class": "VPSDE", "params": {"beta_min": 0.1, "beta_max": 5.0, "T": 1.0}}}, "mixes two runs"),
])
def test_load_run_checks_the_checkpoint_against_run_json(tmp_path, changes, match):
    with pytest.raises(CheckpointError, match=match):
        sdediff.load_run(_run_folder(tmp_path, **changes))


def test_a_matching_run_json_loads(tmp_path):
    run = sdediff.load_run(_run_folder(tmp_path))
    assert run.shape == (2,) and run.data == "moons"


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"[1, 2]", b"{\"format\": "])
def test_a_malformed_run_json_is_a_checkpoint_error(tmp_path, content):
    folder = _run_folder(tmp_path)
    (folder / "run.json").write_bytes(content)
    with pytest.raises(CheckpointError, match="run.json"):
        sdediff.load_run(folder)


def test_torch_files_are_refused_with_a_torch_that_weights_only_does_not_protect(tmp_path, monkeypatch):
    from sdediff.training import load_state_dict_file

    path = tmp_path / "w.pt"
    torch.save({"a": torch.ones(2)}, path)
    assert torch.equal(load_state_dict_file(path)["a"], torch.ones(2))
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    with pytest.raises(CheckpointError, match="torch 2.6"):
        load_state_dict_file(path)
