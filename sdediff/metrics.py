r"""Sample-based distances between distributions: the sliced 2-Wasserstein distance and its noise floor; the mean
of per-sample values with its standard error (:func:`mean_se`).

For two sample sets in :math:`\mathbb{R}^d` the sliced 2-Wasserstein distance averages the squared 1-D
Wasserstein distance of their projections on random unit directions :math:`u_p`,

.. math::  SW_2(\mu, \nu) = \Big(\frac{1}{P}\sum_{p=1}^{P}
           W_2^2\big(u_p^\top\!\#\mu,\ u_p^\top\!\#\nu\big)\Big)^{1/2},

and each 1-D term is exact for empirical measures,
:math:`W_2^2(a, b) = \int_0^1 (F_a^{-1}(q) - F_b^{-1}(q))^2\,dq` with the empirical quantile functions,
which are step functions found by sorting.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._validate import check_int

Sampler = Callable[[int, torch.Generator | None], Tensor]


def _flatten_samples(z: Tensor, name: str) -> Tensor:
    if not isinstance(z, Tensor) or not z.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {type(z).__name__}"
                        + (f" of dtype {z.dtype}" if isinstance(z, Tensor) else ""))
    if z.dim() < 1 or z.shape[0] < 1:
        raise ValueError(f"{name} must have shape (n, ...) with n >= 1, got {tuple(z.shape)}")
    return z.reshape(z.shape[0], -1)


def sliced_wasserstein(x: Tensor, y: Tensor, n_projections: int = 256,
                       generator: torch.Generator | None = None) -> Tensor:
    r"""Sliced 2-Wasserstein distance between the empirical measures of two sample sets.

    .. math::  SW_2 = \Big(\frac{1}{P}\sum_{p=1}^{P} \int_0^1 \big(F_{u_p^\top x}^{-1}(q)
               - F_{u_p^\top y}^{-1}(q)\big)^2\,dq\Big)^{1/2}, \qquad u_p \sim \mathrm{Unif}(S^{d-1}).

    The empirical quantile function of :math:`n` sorted values is constant on each
    :math:`((i-1)/n, i/n]`, so the integral is a finite sum over the merged quantile levels
    :math:`\{i/n\} \cup \{j/m\}`; it reduces to :math:`\frac1n\sum_i (x_{(i)} - y_{(i)})^2` when
    :math:`n = m` and is exact (no interpolation error) when :math:`n \ne m`.

    Parameters
    ----------
    x : Tensor, shape (n, ...)
        First sample set; trailing dimensions are flattened to ``d``.
    y : Tensor, shape (m, ...)
        Second sample set, with the same flattened dimension ``d`` and on the same device as ``x``.
    n_projections : int
        Number ``P`` of random directions.
    generator : torch.Generator, optional
        Source of the directions, drawn in float64 on the generator's device (the CPU without one) and
        then moved to ``x``'s device and the common dtype of ``x`` and ``y``.

    Returns
    -------
    Tensor
        0-d tensor, the sliced distance (same units as the data).

    Notes
    -----
    For a pure shift :math:`y = x + \delta` the squared distance has expectation
    :math:`E_u[(u^\top\delta)^2] = |\delta|^2/d` over the directions.
    """
    x_flat = _flatten_samples(x, "x")
    y_flat = _flatten_samples(y, "y")
    if x_flat.shape[1] != y_flat.shape[1]:
        raise ValueError(f"x and y must have the same number of features per sample, got {x_flat.shape[1]} "
                         f"and {y_flat.shape[1]}")
    if x.device != y.device:
        raise ValueError(f"x and y must be on the same device, got {x.device} and {y.device}")
    n_projections = check_int("n_projections", n_projections)
    dtype = torch.promote_types(x.dtype, y.dtype)
    n, m = x_flat.shape[0], y_flat.shape[0]
    draw_device = generator.device if generator is not None else torch.device("cpu")
    directions = torch.randn(n_projections, x_flat.shape[1], generator=generator, device=draw_device,
                             dtype=torch.float64)
    directions = (directions / directions.norm(dim=1, keepdim=True)).to(device=x.device, dtype=dtype)
    proj_x = torch.sort(directions @ x_flat.to(dtype).T, dim=1).values  # (P, n)
    proj_y = torch.sort(directions @ y_flat.to(dtype).T, dim=1).values  # (P, m)
    # Quantile levels in units of 1 / (n m): right ends of the pieces on which both
    # empirical quantile functions are constant.
    levels = torch.unique(torch.cat([torch.arange(1, n + 1, device=x.device) * m,
                                     torch.arange(1, m + 1, device=x.device) * n]))
    widths = torch.diff(levels, prepend=levels.new_zeros(1)).to(dtype) / (n * m)
    diff = proj_x[:, (levels - 1) // m] - proj_y[:, (levels - 1) // n]
    w2_squared = (diff**2 * widths).sum(dim=1)  # (P,)
    return w2_squared.mean().sqrt()


def noise_floor(sampler: Sampler, n: int, repeats: int = 8, n_projections: int = 256,
                generator: torch.Generator | None = None) -> Tensor:
    r"""Distribution of :math:`SW_2` between two independent exact sample sets of size ``n``.

    Returns :math:`SW_2(X^{(r)}, Y^{(r)})` for :math:`r = 1, \dots, R` with
    :math:`X^{(r)}, Y^{(r)} \sim p^{\otimes n}` independent. A sampler's distance to ``n`` exact samples
    is only meaningful relative to this floor, which shrinks roughly like :math:`1/\sqrt{n}`.

    Parameters
    ----------
    sampler : callable
        ``sampler(n, generator) -> Tensor`` of shape ``(n, ...)`` drawing exact samples, e.g.
        :meth:`sdediff.data.GaussianMixture.sample`.
    n : int
        Size of each sample set.
    repeats : int
        Number ``R`` of independent pairs.
    n_projections : int
        Number of random directions per distance.
    generator : torch.Generator, optional
        Passed to ``sampler`` and :func:`sliced_wasserstein`.

    Returns
    -------
    Tensor, shape (repeats,)
        The ``R`` sampled distances.
    """
    if not callable(sampler):
        raise TypeError(f"sampler must be a callable (n, generator) -> Tensor, got {type(sampler).__name__}")
    n = check_int("n", n)
    repeats = check_int("repeats", repeats)
    values = [sliced_wasserstein(sampler(n, generator), sampler(n, generator), n_projections, generator)
              for _ in range(repeats)]
    return torch.stack(values)


def mean_se(values: Tensor) -> tuple[float, float]:
    r"""Mean of per-sample values (e.g. NLLs or bits/dim) and its standard error, in float64.

    :math:`\bar v = \frac1n\sum_i v_i` and :math:`\mathrm{se} = \mathrm{sd}(v)/\sqrt n` with the unbiased
    (:math:`n - 1`) standard deviation; ``nan`` for a single value.

    Parameters
    ----------
    values : Tensor
        ``(n,)`` values, ``n >= 1``.

    Returns
    -------
    (float, float)
        The mean and its standard error.
    """
    if not isinstance(values, Tensor) or values.dim() != 1 or values.shape[0] < 1:
        raise ValueError(f"values must be a tensor of shape (n,) with n >= 1, got "
                         f"{tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__}")
    v = values.double()
    se = float(v.std() / math.sqrt(len(v))) if len(v) > 1 else math.nan
    return float(v.mean()), se
