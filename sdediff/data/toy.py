r"""Two-dimensional toy data sets, roughly centred with unit scale, drawn from a :class:`torch.Generator`.

=====================  ==================================================================================
name                   construction (before the fixed affine map to roughly zero mean, unit std)
=====================  ==================================================================================
``"moons"``            two interleaved half circles: :math:`(\cos\theta, \sin\theta)` and
                       :math:`(1 - \cos\theta, \tfrac12 - \sin\theta)`, :math:`\theta \sim U(0, \pi)`, plus
                       :math:`N(0, 0.05^2)` noise
``"checkerboard"``     uniform on the 8 dark squares of a 4×4 board on :math:`[-2, 2]^2`
``"swiss_roll"``       :math:`\theta(\cos\theta, \sin\theta)`, :math:`\theta \sim U(1.5\pi, 4.5\pi)`, plus
                       :math:`N(0, 0.25^2)` noise
``"rings"``            four concentric circles of radii 1, 2, 3, 4 (equally likely), plus
                       :math:`N(0, 0.08^2)` noise
``"gaussian_mixture"`` eight equal Gaussians on a circle of radius 1.4, std 0.15 — :func:`toy_mixture`
                       returns it as a :class:`~sdediff.data.GaussianMixture`, with exact scores
=====================  ==================================================================================

Draws are made in float64 on the generator's device (the CPU without one) and then cast, so a seeded
generator gives the same points whatever ``dtype`` and ``device`` are asked for.

Four sets come with class labels (``make_toy(..., return_labels=True)``; :data:`TOY_CLASSES` gives their
number): the half circle of ``"moons"`` (0 upper, 1 lower), the dark square of ``"checkerboard"`` (0-7, row by
row from the bottom), the ring of ``"rings"`` (0-3, inner to outer) and the component of
``"gaussian_mixture"`` (0-7, counter-clockwise from angle 0). They are what class-conditional training and
guidance on toy data use. The labels come from the same draws, so the points are the same with or without them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .._validate import check_dtype, check_int
from .mixture import GaussianMixture

TOY_DATASETS = ("moons", "checkerboard", "swiss_roll", "rings", "gaussian_mixture")
#: number of classes of the labelled toy sets (``"swiss_roll"`` has none)
TOY_CLASSES = {"moons": 2, "checkerboard": 8, "rings": 4, "gaussian_mixture": 8}
_F64 = torch.float64


def toy_mixture() -> GaussianMixture:
    """The ``"gaussian_mixture"`` toy set as a :class:`GaussianMixture` (exact density and score at every t)."""
    return GaussianMixture.ring(num_components=8, radius=1.4, std=0.15)


def skewed_mixture() -> GaussianMixture:
    r"""Four anisotropic Gaussians at :math:`(\pm2, \pm2)` with weights 0.1, 0.2, 0.3, 0.4 and distinct, partly
    correlated covariances: a 2-D law with exact scores, densities and noisy marginals whose asymmetry (unequal
    modes, tilted components) exposes sampler and guidance errors that a symmetric ring hides."""
    return GaussianMixture(
        weights=[0.1, 0.2, 0.3, 0.4],
        means=[[-2.0, -2.0], [-2.0, 2.0], [2.0, -2.0], [2.0, 2.0]],
        covs=[[[0.3, 0.1], [0.1, 0.2]], [[0.2, -0.1], [-0.1, 0.3]], [[0.25, 0.0], [0.0, 0.1]],
              [[0.15, 0.05], [0.05, 0.25]]],
    )


def _uniform(n: int, g: torch.Generator | None, dev: torch.device) -> Tensor:
    return torch.rand(n, generator=g, device=dev, dtype=_F64)


def _normal(shape: tuple[int, ...], g: torch.Generator | None, dev: torch.device) -> Tensor:
    return torch.randn(shape, generator=g, device=dev, dtype=_F64)


def _moons(n: int, g: torch.Generator | None, dev: torch.device) -> tuple[Tensor, Tensor]:
    theta = math.pi * _uniform(n, g, dev)
    lower = torch.rand(n, generator=g, device=dev) < 0.5
    x = torch.where(lower, 1 - theta.cos(), theta.cos())
    y = torch.where(lower, 0.5 - theta.sin(), theta.sin())
    pts = torch.stack([x, y], 1) + 0.05 * _normal((n, 2), g, dev)
    pts = (pts - torch.tensor([0.5, 0.25], dtype=_F64, device=dev)) / torch.tensor([0.87, 0.5], dtype=_F64, device=dev)
    return pts, lower.long()


def _checkerboard(n: int, g: torch.Generator | None, dev: torch.device) -> tuple[Tensor, Tensor]:
    cell = torch.randint(8, (n,), generator=g, device=dev)  # dark squares: (i + j) even, 2 per row
    row = cell // 2
    col = 2 * (cell % 2) + row % 2
    u = torch.rand(n, 2, generator=g, device=dev, dtype=_F64)
    pts = torch.stack([col, row], 1).to(_F64) + u - 2.0
    return pts / 1.15, cell


def _swiss_roll(n: int, g: torch.Generator | None, dev: torch.device) -> tuple[Tensor, None]:
    theta = 1.5 * math.pi * (1 + 2 * _uniform(n, g, dev))
    pts = torch.stack([theta * theta.cos(), theta * theta.sin()], 1) + 0.25 * _normal((n, 2), g, dev)
    return (pts - torch.tensor([2.0, 0.2], dtype=_F64, device=dev)) / 6.8, None


def _rings(n: int, g: torch.Generator | None, dev: torch.device) -> tuple[Tensor, Tensor]:
    ring = torch.randint(4, (n,), generator=g, device=dev)
    radius = 1.0 + ring.to(_F64)
    theta = 2 * math.pi * _uniform(n, g, dev)
    pts = radius[:, None] * torch.stack([theta.cos(), theta.sin()], 1) + 0.08 * _normal((n, 2), g, dev)
    return pts / 1.95, ring


def _gaussian_mixture(n: int, g: torch.Generator | None, dev: torch.device) -> tuple[Tensor, Tensor]:
    return toy_mixture().sample(n, generator=g, device=dev, dtype=_F64, return_labels=True)


_MAKERS: dict[str, Callable[[int, torch.Generator | None, torch.device], tuple[Tensor, Tensor | None]]] = {
    "moons": _moons, "checkerboard": _checkerboard, "swiss_roll": _swiss_roll, "rings": _rings,
    "gaussian_mixture": _gaussian_mixture,
}


def make_toy(name: str, n: int, generator: torch.Generator | None = None, *, dtype: torch.dtype | None = None,
             device: torch.device | str | None = None, return_labels: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """``n`` points ``(n, 2)`` of the toy set ``name`` (see the module table).

    Parameters
    ----------
    name : str
        One of :data:`TOY_DATASETS`.
    n : int
        Number of points.
    generator : torch.Generator, optional
        Source of randomness (the global RNG when ``None``).
    dtype : torch.dtype, optional
        Floating dtype of the result (default: the default dtype).
    device : optional
        Device of the result (default: the generator's).
    return_labels : bool
        Also return the ``int64`` class of every point (sets in :data:`TOY_CLASSES`; the points are the same as
        without labels).

    Returns
    -------
    Tensor, or (Tensor, Tensor) with ``return_labels``
    """
    if name not in _MAKERS:
        raise ValueError(f"unknown toy data set {name!r}; known: {', '.join(TOY_DATASETS)}")
    check_int("n", n)
    if return_labels and name not in TOY_CLASSES:
        raise ValueError(f"toy data set {name!r} has no class labels; labelled sets: {', '.join(TOY_CLASSES)}")
    dtype = check_dtype("dtype", dtype) or torch.get_default_dtype()
    draw = generator.device if generator is not None else torch.device("cpu")
    pts, labels = _MAKERS[name](n, generator, draw)
    out = device if device is not None else draw
    pts = pts.to(device=out, dtype=dtype)
    return (pts, labels.to(out)) if return_labels else pts


sample_toy = make_toy
