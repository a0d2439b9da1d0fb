"""Shared test setup: one torch thread (small ops are far faster so on 2-core CI machines), the gpu marker, fixtures.

Helpers and problems the test files import live in problems.py (pytest advises against importing conftest).
"""

import pytest
import torch
from problems import SDES

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=sorted(SDES))
def sde(request):
    return SDES[request.param]()
