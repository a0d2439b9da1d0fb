"""Shared test setup: one torch thread (small ops are far faster so on 2-core CI machines), fixtures."""

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
