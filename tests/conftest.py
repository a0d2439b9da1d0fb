"""Shared test setup: one torch thread (small ops are far faster so on 2-core CI machines), fixtures."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import sdediff

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


SDE_FACTORIES = {
    "vp": lambda: sdediff.VPSDE(),
    "subvp": lambda: sdediff.SubVPSDE(),
    "ve": lambda: sdediff.VESDE(),
}


@pytest.fixture(params=sorted(SDE_FACTORIES))
def sde(request):
    return SDE_FACTORIES[request.param]()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def load_benchmark(name: str):
    """The script ``benchmarks/{name}.py`` loaded by path as module ``sdediff_bench_{name}`` (once per session)."""
    module_name = f"sdediff_bench_{name}"
    if module_name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


class Counted:
    """A score function that counts its calls (``.calls``): one per evaluation on a whole batch."""

    def __init__(self, score):
        self.score, self.calls = score, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.score(x, t)


def assert_nfe_counts(sde, score, expected: dict, steps: int = 10) -> dict:
    """For each ``solver: nfe`` of ``expected``, ``steps`` steps on a (8, 2) batch report ``nfe`` evaluations, make
    exactly that many calls and return ``steps + 1`` times; returns each solver's SampleResult."""
    infos = {}
    for solver, nfe in expected.items():
        counted = Counted(score)
        info = sdediff.sample(sde, counted, (8, 2), solver=solver, steps=steps, generator=gen(0), return_info=True)
        assert info.nfe == nfe == counted.calls, solver
        assert info.samples.shape == (8, 2) and info.times.shape == (steps + 1,)
        infos[solver] = info
    return infos


def assert_seeded(sde, score, solvers) -> None:
    """Each solver draws the same samples from the same generator seed whatever the global RNG, others from another."""
    for solver in solvers:
        a = sdediff.sample(sde, score, (64, 2), solver=solver, steps=20, generator=gen(7))
        torch.manual_seed(123)
        b = sdediff.sample(sde, score, (64, 2), solver=solver, steps=20, generator=gen(7))
        c = sdediff.sample(sde, score, (64, 2), solver=solver, steps=20, generator=gen(8))
        assert torch.equal(a, b), solver
        assert not torch.allclose(a, c), solver
