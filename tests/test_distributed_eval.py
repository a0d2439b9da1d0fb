"""Sharded evaluation: chunks and their seeds do not depend on the number of processes, so `sdediff sample` and
`sdediff likelihood` under torchrun with 2 gloo processes write exactly (bit for bit) what one process writes, and
`sharded_log_likelihood` finishes, without waiting on the other rank, when the ranks' work is very unequal."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from sdediff import cli
from sdediff.distributed import DistributedEval, chunk_generator, chunk_seed, chunk_slices, local_device

TRAIN = ["--data", "gaussian_mixture", "--steps", "5", "--batch-size", "32", "--n-train", "200", "--eval-samples", "0",
         "--eval-nll-points", "0", "--no-progress", "--no-plot", "--seed", "1"]
# 70 samples / 24 points in chunks of 16: 5 and 2 chunks, the last ones short, so rank 0 gets one chunk more
SAMPLE = ["--solver", "euler_maruyama", "--steps", "8", "--n", "70", "--batch-size", "16", "--seed", "5", "--no-plot",
          "--no-progress"]
LIKELIHOOD = ["--n", "24", "--batch-size", "16", "--trace", "hutchinson", "--rtol", "1e-3", "--atol", "1e-3",
              "--bound-times", "4", "--seed", "5", "--no-progress"]
PER_RUN = {"seconds", "world_size", "samples"}  # wall time, process count, output path


def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def test_chunks_cover_the_items_in_order():
    assert chunk_slices(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert chunk_slices(4, 4) == [slice(0, 4)] and chunk_slices(0, 3) == []
    for bad, error in ((0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match="chunk_size"):
            chunk_slices(10, bad)
    with pytest.raises(ValueError, match="n must be"):
        chunk_slices(-1, 2)


def test_chunk_seeds_are_distinct_fixed_and_checked():
    seeds = {chunk_seed(s, k) for s in range(20) for k in range(50)}
    assert len(seeds) == 1000 and all(0 <= v < 2**63 for v in seeds)
    assert chunk_seed(0, 1) != chunk_seed(1, 0)  # not a function of seed + index
    assert chunk_seed(3, 7) == chunk_seed(3, 7)
    a = torch.randn(5, generator=chunk_generator(3, 7))
    assert torch.equal(a, torch.randn(5, generator=torch.Generator().manual_seed(chunk_seed(3, 7))))
    with pytest.raises(ValueError, match="index"):
        chunk_seed(0, -1)


def test_single_process_map_and_device(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with DistributedEval("cpu") as group:
        assert (group.rank, group.world_size, group.is_main) == (0, 1, True)
        assert group.map(lambda k: k * k, 4) == [0, 1, 4, 9]
        with pytest.raises(ValueError, match="num_chunks"):
            group.map(lambda k: k, -1)
    assert local_device("cuda") == torch.device("cuda")  # no torchrun: the current CUDA device
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert local_device("cuda") == torch.device("cuda", 1) and local_device("cuda:0") == torch.device("cuda", 0)
    assert local_device("cpu") == torch.device("cpu")


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                                 "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_two_gloo_processes_match_one_process_bit_for_bit(tmp_path):
    run_dir = tmp_path / "run"
    assert run("train", "--out", run_dir, *TRAIN) == 0
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert run("sample", "--run", run_dir, *SAMPLE, "--out", single / "x.safetensors") == 0
    assert run("likelihood", "--run", run_dir, *LIKELIHOOD, "--out", single / "lik.json") == 0

    # the real command under torchrun; "--" keeps torchrun's parser away from sdediff's options
    for command, args, out in (("sample", SAMPLE, "x.safetensors"), ("likelihood", LIKELIHOOD, "lik.json")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sdediff", "--",
               command, "--run", str(run_dir), *args, "--out", str(multi / out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "over 2 process(es)" in proc.stdout

    x1, x2 = load_file(str(single / "x.safetensors"))["samples"], load_file(str(multi / "x.safetensors"))["samples"]
    assert x1.shape == (70, 2) and torch.equal(x1, x2)
    for name in ("x.json", "lik.json"):
        one, two = (json.loads((folder / name).read_text()) for folder in (single, multi))
        assert (one["world_size"], two["world_size"]) == (1, 2)
        assert {k: v for k, v in one.items() if k not in PER_RUN} == {k: v for k, v in two.items() if k not in PER_RUN}
    lik = json.loads((multi / "lik.json").read_text())
    assert lik["n"] == 24 and lik["trace"] == "hutchinson" and lik["true_nll"] is not None
    # the chunking defines the result: another chunk size gives other samples (other random streams)
    assert run("sample", "--run", run_dir, *SAMPLE, "--batch-size", "35", "--out", tmp_path / "other.safetensors") == 0
    assert not torch.equal(load_file(str(tmp_path / "other.safetensors"))["samples"], x1)


@pytest.mark.slow
def test_a_failing_chunk_raises_on_every_rank_instead_of_hanging(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(
        "import sys\n"
        "from sdediff.distributed import DistributedError, DistributedEval\n"
        "def work(k):\n"
        "    if k == 3:\n"
        "        raise ValueError('chunk 3 is bad')\n"
        "    return k\n"
        "with DistributedEval('cpu') as group:\n"
        "    try:\n"
        "        group.map(work, 4)\n"
        "    except DistributedError as err:\n"
        "        print(f'rank {group.rank} caught: {err}', flush=True)\n"
        "    assert group.map(lambda k: 10 * k, 3) == ([0, 10, 20] if group.is_main else None)  # still usable\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):  # chunk 3 ran on rank 1; both ranks learn of it
        assert f"rank {rank} caught: evaluation failed on rank 1: ValueError: chunk 3 is bad" in proc.stdout


# Two ranks of very unequal work: 10 points in chunks of 4 give rank 0 chunks 0 and 2 (6 points), rank 1 chunk 1,
# whose points lie far out in the tails (several times the steps of the others). The score is a
# DistributedDataParallel module with a buffer: its own forward would broadcast the buffer (a collective) at every
# call, which ranks with different numbers of calls would wait on forever; log_likelihood evaluates its .module.
UNEQUAL = textwrap.dedent("""
    import sys
    import torch
    from torch import nn
    import sdediff
    from sdediff.data import GaussianMixture
    from sdediff.distributed import DistributedEval
    from sdediff.likelihood import sharded_log_likelihood

    class Score(nn.Module):
        def __init__(self, score):
            super().__init__()
            self.score = score
            self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))
            self.register_buffer("shift", torch.zeros((), dtype=torch.float64))

        def forward(self, x, t):
            return self.scale * self.score(x, t) + self.shift

    torch.set_num_threads(1)
    sde = sdediff.VPSDE()
    gm = GaussianMixture.random(3, 2, generator=torch.Generator().manual_seed(1))
    x = gm.marginal(sde, 1e-5).sample(10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x[4:8] = torch.tensor([[6.0, -6.0], [7.0, -5.0], [8.0, -4.0], [4.0, -8.0]], dtype=torch.float64)
    with DistributedEval("cpu") as group:
        model = Score(gm.score_fn(sde))
        if group.world_size > 1:
            model = nn.parallel.DistributedDataParallel(model)
        results = {trace: sharded_log_likelihood(sde, model, x, batch_size=4, seed=3, trace=trace, num_probes=2)
                   for trace in ("exact", "hutchinson")}
        if group.is_main:
            plain = sdediff.log_likelihood(sde, gm.score_fn(sde), x, batch_size=4)
            torch.save({"world_size": group.world_size, "plain": vars(plain),
                        **{k: vars(v) for k, v in results.items()}}, sys.argv[1])
""")


def run_to_completion(cmd, timeout):
    """Run ``cmd``; past ``timeout`` seconds stop it (SIGTERM, which torchrun passes on to its workers, which run in
    sessions of their own; then SIGKILL) and fail."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        pytest.fail(f"{cmd[-2:]} did not finish within {timeout} s (a rank waiting on the other?)")
    assert proc.returncode == 0, err[-3000:]
    return out


def test_sharded_log_likelihood_with_unequal_ranks_finishes_and_matches_one_process(tmp_path):
    script = tmp_path / "unequal.py"
    script.write_text(UNEQUAL)
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    run_to_completion([sys.executable, str(script), str(one)], timeout=120)
    run_to_completion([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                       str(two)], timeout=180)
    single, multi = torch.load(one), torch.load(two)
    assert (single["world_size"], multi["world_size"]) == (1, 2)
    steps = multi["exact"]["nfe_per_point"]
    rank1 = steps[4:8].double().mean()
    assert rank1 > 3 * torch.cat([steps[:4], steps[8:]]).double().mean(), steps  # rank 1's points are much harder
    for trace in ("exact", "hutchinson"):
        for field, value in single[trace].items():
            if field != "nfe":  # the calls add up over the chunks of each process
                assert torch.equal(multi[trace][field], value) if torch.is_tensor(value) else multi[trace][field] == value
        assert multi[trace]["log_prob"].shape == (10,)
    # the exact trace does not depend on the chunks' generators: what log_likelihood gives in chunks of 4
    for field in ("log_prob", "latent", "nfe_per_point", "integration_error"):
        torch.testing.assert_close(multi["exact"][field], single["plain"][field], rtol=1e-12, atol=1e-12)
    assert multi["hutchinson"]["std_error"].isfinite().all() and (multi["hutchinson"]["std_error"] > 0).all()
