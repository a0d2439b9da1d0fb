"""The trainer: exact resume, crash-safe checkpoints, DDP equivalence, non-finite handling, evaluation.

The tiny problem used throughout exercises every source of randomness and state: class labels with
label dropout, a random transform, importance-sampled times with the likelihood weighting, warm-up plus
a cosine schedule, gradient clipping and an EMA.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from problems import gen

import sdediff
from sdediff.training import (
    MLP,
    CheckpointError,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
    load_state_dict_file,
    load_weights,
    save_checkpoint,
)

SETUP = '''
import torch
import sdediff
from sdediff.training import MLP, TrainConfig, Trainer


def build(out_dir, steps, net_cls=MLP, **overrides):
    torch.manual_seed(0)
    net = net_cls(4, hidden=32, depth=2, num_classes=3)
    g = torch.Generator().manual_seed(123)
    data = torch.randn(256, 4, generator=g)
    labels = torch.randint(3, (256,), generator=g)
    options = dict(steps=steps, batch_size=32, lr=1e-2, warmup_steps=4, lr_schedule="cosine", grad_clip=0.5,
                   ema_decay=0.9, cond_drop_prob=0.25, weighting="likelihood", t_sampling="importance",
                   progress=False, log_every=4, out_dir=None if out_dir is None else str(out_dir))
    options.update(overrides)
    return Trainer(net, sdediff.VPSDE(), data, labels, TrainConfig(**options),
                   transform=lambda x, gen: x + 0.05 * torch.rand(x.shape, generator=gen, device=gen.device))
'''
_ns: dict = {}
exec(SETUP, _ns)
build = _ns["build"]


def clean_env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def script(tmp_path, body):
    path = tmp_path / "script.py"
    path.write_text(SETUP + "\nimport os, sys, time, json\ntorch.set_num_threads(1)\n" + body)
    return path


def same_state(a: Trainer, b: Trainer):
    for x, y in ((a.net, b.net), (a.ema, b.ema)):
        for (k, p), q in zip(x.state_dict().items(), y.state_dict().values(), strict=True):
            assert torch.equal(p, q), k


# --- fitting, metrics and checkpoints ---------------------------------------------------------------------
def test_fit_learns_and_writes_metrics_and_checkpoints(tmp_path):
    tr = build(tmp_path, 40, ckpt_every=10, keep_checkpoints=2, t_sampling="uniform", weighting="simple")
    history = tr.fit()
    assert len(history) == 40 and all(math.isfinite(v) for v in history)
    assert sum(history[-10:]) < sum(history[:10])
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000030.safetensors", "ckpt_00000040.safetensors"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["step"] == 40 and metrics["loss"] == history and metrics["config"]["batch_size"] == 32
    assert [e["step"] for e in metrics["log"]] == list(range(4, 41, 4)) and metrics["steps_per_second"] > 0
    assert latest_checkpoint(tmp_path).name == "ckpt_00000040.safetensors"
    assert tr.lr_at(0) == pytest.approx(1e-2 / 4) and tr.lr_at(3) == pytest.approx(1e-2)
    assert tr.lr_at(39) == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 35 / 36)))


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    full = build(None, 24)
    expected = full.fit()
    first = build(tmp_path, 24)
    first.fit(stop_at=12)
    assert latest_checkpoint(tmp_path).name == "ckpt_00000012.safetensors"
    resumed = build(tmp_path, 24)  # a fresh model, optimizer and generator: everything comes from the file
    history = resumed.fit(resume=True)
    assert history == expected  # bit for bit
    same_state(resumed, full)
    for p, q in zip(resumed.net.parameters(), full.net.parameters(), strict=True):
        a, b = resumed.optimizer.state[p], full.optimizer.state[q]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.generator.get_state().equal(full.generator.get_state())


def test_resume_without_checkpoint_starts_fresh_and_warns_on_changed_config(tmp_path):
    assert build(tmp_path, 3).fit(resume=True) == build(None, 3).fit()
    with pytest.warns(RuntimeWarning, match="lr"):
        build(tmp_path, 5, lr=1e-3).fit(resume=True)
    with pytest.raises(ValueError, match="out_dir"):
        build(None, 3).fit(resume=True)


def test_checkpoint_files_round_trip_and_damage_is_reported(tmp_path):
    tr = build(tmp_path, 6, ckpt_every=3)
    tr.fit()
    good = tmp_path / "ckpt_00000006.safetensors"
    tensors, meta = load_checkpoint(good)
    assert meta["step"] == 6 and meta["model"]["class"] == "MLP" and "rng.generator" in tensors
    assert tensors["rng.generator"].dtype == torch.uint8
    # a truncated newest file: a clear error naming it, and resumption falls back to the previous one
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="ckpt_00000006"):
        load_checkpoint(good)
    with pytest.warns(RuntimeWarning, match="ckpt_00000006"):
        assert latest_checkpoint(tmp_path).name == "ckpt_00000003.safetensors"
    # a flipped byte in the tensor data fails the digest
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    good.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="digest"):
        load_checkpoint(good)
    # garbage and foreign safetensors files
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk"):
        load_checkpoint(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not an sdediff checkpoint"):
        load_checkpoint(tmp_path / "plain.safetensors")
    assert torch.equal(load_state_dict_file(tmp_path / "plain.safetensors")["w"], torch.ones(2))
    with pytest.raises(FileNotFoundError, match="missing"):
        load_checkpoint(tmp_path / "missing.safetensors")
    other = Trainer(MLP(4, hidden=16, depth=2, num_classes=3), tr.sde, tr.data, tr.labels, tr.config)
    with pytest.raises(CheckpointError, match="ckpt_00000003.*does not match"):
        other.load_checkpoint(tmp_path / "ckpt_00000003.safetensors")


def test_loading_refuses_pickled_code_and_rebuilds_models(tmp_path):
    tr = build(tmp_path, 4)
    tr.fit()
    path = latest_checkpoint(tmp_path)
    model = load_model(path)
    assert isinstance(model, MLP) and not model.training
    for p, q in zip(model.state_dict().values(), tr.ema.state_dict().values(), strict=True):
        assert torch.equal(p, q)
    raw = load_weights(MLP(4, hidden=32, depth=2, num_classes=3), path, ema=False)
    assert torch.equal(raw.out.weight, tr.net.out.weight)
    torch.save(tr.net.state_dict(), tmp_path / "weights.pt")
    assert torch.equal(load_state_dict_file(tmp_path / "weights.pt")["out.weight"], tr.net.out.weight)
    torch.save({"w": torch.ones(1), "hook": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_state_dict_file(tmp_path / "evil.pt")
    assert not Evil.ran
    tensors, meta = load_checkpoint(path)
    meta["model"]["class"] = "Custom"
    save_checkpoint(tmp_path / "custom.safetensors", tensors, meta)
    with pytest.raises(CheckpointError, match="load_weights"):
        load_model(tmp_path / "custom.safetensors")


class Evil:
    ran = False

    def __reduce__(self):
        return (_mark_evil, ())


def _mark_evil():
    Evil.ran = True
    return None


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path):
    body = """
out = sys.argv[1]
real_replace = os.replace
def slow_replace(src, dst):
    if str(dst).endswith("ckpt_00000010.safetensors"):
        print("WRITING", flush=True)
        time.sleep(600)
    real_replace(src, dst)
os.replace = slow_replace
build(out, 20, ckpt_every=5).fit()
"""
    proc = subprocess.Popen([sys.executable, str(script(tmp_path, body)), str(tmp_path / "run")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        line = proc.stdout.readline()
        assert line.strip() == "WRITING", proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == ["ckpt_00000005.safetensors"]
    assert list(run.glob(".ckpt_00000010.*.tmp"))  # the complete temp file that never got its name
    assert load_checkpoint(run / "ckpt_00000005.safetensors")[1]["step"] == 5
    resumed = build(run, 20, ckpt_every=5)
    history = resumed.fit(resume=True)
    assert history == build(None, 20).fit()  # continued exactly, across processes
    assert not list(run.glob(".ckpt_*.tmp"))


def test_ddp_with_two_gloo_processes_matches_a_single_process(tmp_path):
    body = """
tr = build(sys.argv[1], 10)
history = tr.fit()
if tr.is_main:
    with open(os.path.join(sys.argv[1], "history.json"), "w") as f:
        json.dump({"history": history, "world": tr.dist.world_size}, f)
tr.close()
"""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script(tmp_path, body)),
           str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "history.json").read_text())
    assert result["world"] == 2
    single = build(None, 10)
    expected = single.fit()
    torch.testing.assert_close(torch.tensor(result["history"]), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    tensors, meta = load_checkpoint(out / "ckpt_00000010.safetensors")
    assert meta["world_size"] == 2
    for name, p in single.net.state_dict().items():
        torch.testing.assert_close(tensors[f"model.{name}"], p, rtol=0, atol=1e-6)


# --- non-finite losses ------------------------------------------------------------------------------------
class Flaky(MLP):
    """An MLP whose output is NaN on chosen calls."""

    bad: set = set()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def forward(self, x, t, y=None):
        self.calls += 1
        out = super().forward(x, t, y)
        return out * math.nan if self.calls in self.bad else out


def test_non_finite_loss_is_skipped_and_counted_or_stops(tmp_path):
    Flaky.bad = {3, 5}
    build(tmp_path, 8, net_cls=Flaky).fit()
    metrics = json.loads((tmp_path / "metrics.json").read_text())  # strict JSON: NaN is written as null
    assert metrics["nonfinite_count"] == 2 and metrics["loss"][2] is None and metrics["loss"][4] is None
    tr = build(None, 8, net_cls=Flaky)
    before = None
    for step in range(1, 9):
        if step == 3:
            before = [p.clone() for p in tr.net.parameters()]
        tr.train_step()
        if step == 3:
            assert all(torch.equal(p, q) for p, q in zip(before, tr.net.parameters(), strict=True))
    assert tr.nonfinite_count == 2 and math.isnan(tr.history[2]) and math.isnan(tr.history[4])
    assert all(math.isfinite(v) for i, v in enumerate(tr.history) if i not in (2, 4))
    assert all(torch.isfinite(p).all() for p in tr.net.parameters())
    with pytest.raises(NonFiniteLossError, match="step 3"):
        build(None, 8, net_cls=Flaky, nonfinite="stop").fit()
    with pytest.raises(NonFiniteLossError, match="max_nonfinite=1"):
        build(None, 8, net_cls=Flaky, max_nonfinite=1).fit()
    Flaky.bad = set()


# --- evaluation, score functions, configuration ---------------------------------------------------------
def test_evaluation_does_not_disturb_training(tmp_path):
    plain = build(None, 8).fit()
    tr = build(tmp_path, 8, eval_every=4, eval_samples=16, eval_sample_steps=4, eval_nll_points=8)
    assert tr.fit() == plain
    assert [e["step"] for e in tr.evals] == [4, 8]
    last = tr.evals[-1]
    assert math.isfinite(last["nll"]) and last["samples_finite"] and last["nll_nfe"] > 0
    assert math.isfinite(last["nll_bound_per_dim"])
    assert (tmp_path / "samples_00000008.safetensors").exists()
    assert json.loads((tmp_path / "metrics.json").read_text())["evals"][-1]["step"] == 8


def test_score_functions_drive_the_samplers():
    tr = build(None, 3, ema_decay=0.0)
    tr.fit()
    for p, q in zip(tr.ema.parameters(), tr.net.parameters(), strict=True):
        assert torch.equal(p, q)  # decay 0: the EMA is the weights
    x = sdediff.sample(tr.sde, tr.ema_score_fn(), (5, 4), solver="heun", steps=3, generator=gen(0))
    y = sdediff.sample(tr.sde, tr.score_fn(ema=False, cond=torch.tensor([0, 1, 2, 0, 1])), (5, 4), solver="heun",
                       steps=3, generator=gen(0))
    assert x.shape == y.shape == (5, 4) and torch.isfinite(x).all() and not torch.equal(x, y)
    res = sdediff.log_likelihood(tr.sde, tr.score_fn(), torch.zeros(2, 4), rtol=1e-3, atol=1e-3)
    assert torch.isfinite(res.log_prob).all()


def test_config_and_argument_errors():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="weighting"):
        TrainConfig(weighting="snr")
    with pytest.raises(ValueError, match="nonfinite"):
        TrainConfig(nonfinite="ignore")
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="unknown TrainConfig"):
        TrainConfig.from_dict({"stepz": 3})
    assert TrainConfig.from_dict(TrainConfig(lr=0.5).to_dict()) == TrainConfig(lr=0.5)
    sde, data = sdediff.VPSDE(), torch.zeros(8, 2)
    with pytest.raises(TypeError, match="model"):
        Trainer(lambda x, t: x, sde, data)
    with pytest.raises(ValueError, match="labels"):
        Trainer(MLP(2), sde, data, labels=torch.zeros(7, dtype=torch.long))
    with pytest.raises(ValueError, match="null class"):
        Trainer(MLP(2), sde, data, labels=torch.zeros(8, dtype=torch.long), config=TrainConfig(cond_drop_prob=0.1))
    with pytest.raises(ValueError, match="predicts"):
        Trainer(sdediff.score.ScoreModel(MLP(2), sde, "x0"), sde, data)
    tr = Trainer(MLP(2), sde, torch.zeros(8, 2, dtype=torch.long), config=TrainConfig(progress=False, steps=1))
    with pytest.raises(TypeError, match="transform"):
        tr.fit()
    with pytest.warns(RuntimeWarning, match="amp"):
        Trainer(MLP(2), sde, data, config=TrainConfig(amp=True, device="cpu"))
    with pytest.raises(ValueError, match="stop_at"):
        Trainer(MLP(2), sde, data, config=TrainConfig(steps=3, progress=False)).fit(stop_at=4)


@pytest.mark.parametrize("name", ["bogus", "torchsde:bogus", "heun:2"])
def test_an_unknown_eval_solver_fails_when_the_config_is_built(name):
    with pytest.raises(ValueError, match=r"^TrainConfig\.eval_solver: unknown (solver|torchsde method) '(heun:2|bogus)'"):
        TrainConfig(eval_solver=name)
    for known in ("heun", "euler_maruyama", "dpm_solver", "torchsde:srk"):
        assert TrainConfig(eval_solver=known).eval_solver == known


def test_config_scalar_checks_name_the_field():
    for field, value in [("lr", 0.0), ("lr", True), ("weight_decay", -1.0), ("betas", (0.9, 1.0)), ("betas", (0.9,)),
                         ("grad_clip", -1.0), ("cond_drop_prob", 1.0), ("t_eps", 0.0), ("batch_size", True),
                         ("seed", -1), ("amp", 1), ("loss", "mse")]:
        error = TypeError if isinstance(value, bool) or (field == "amp") else ValueError
        with pytest.raises(error, match=f"TrainConfig\\.{field}"):
            TrainConfig(**{field: value})
    assert TrainConfig(betas=[0, 0.5]).betas == (0.0, 0.5) and TrainConfig(grad_clip=None).grad_clip is None


@pytest.mark.slow
def test_digits_unet_resume_is_exact(tmp_path):
    from sdediff.data.digits import digits_to_model, load_digits
    from sdediff.training import UNet

    pytest.importorskip("sklearn")
    levels, labels = load_digits("train")

    def make(out, steps):
        torch.manual_seed(0)
        cfg = TrainConfig(steps=steps, batch_size=16, lr=1e-3, progress=False, out_dir=out, cond_drop_prob=0.1)
        return Trainer(UNet(base_channels=8, num_classes=10), sdediff.VPSDE(), levels, labels, cfg,
                       transform=digits_to_model)

    expected = make(None, 10).fit()
    make(str(tmp_path), 5).fit()
    start = time.perf_counter()
    assert make(str(tmp_path), 10).fit(resume=True) == expected
    assert time.perf_counter() - start < 60
