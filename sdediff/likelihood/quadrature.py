r"""Interpolatory quadrature on per-sample nodes: the coefficient maths of the likelihood's multistep method.

Every sample :math:`i` has its own nodes :math:`\tau_{i,0}, \dots, \tau_{i,M-1}` (newest first), of which only
those flagged ``valid`` are used. With the Lagrange basis :math:`\ell_j(\tau) = \prod_{m \ne j}(\tau - \tau_m) /
(\tau_j - \tau_m)` over the valid nodes, the polynomial through values :math:`y_j` integrates to

.. math::  \int_{lo}^{hi} \sum_j y_j\,\ell_j(\tau)\,d\tau = \sum_j w_j\,y_j, \qquad w_j = \int_{lo}^{hi} \ell_j,

and its error for a smooth :math:`y` is :math:`y[\tau_0, \dots, \tau_{M-1}, \cdot]` times the integral of the node
polynomial :math:`\omega(\tau) = \prod_j (\tau - \tau_j)`, which :func:`node_polynomial_integral` and
:func:`divided_difference_weights` estimate. Integrals are computed by Gauss–Legendre quadrature with
:data:`GAUSS_POINTS` points, exact for polynomials of degree below ``2 * GAUSS_POINTS`` (so for up to 10 nodes).
Everything is batched over samples (no Python loop over them) and computed in float64 where the device has it.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

__all__ = ["GAUSS_POINTS", "lagrange_integrals", "divided_difference_weights", "node_polynomial_integral"]

#: Gauss–Legendre points of every integral (exact for the degree-19 products a 10-node rule needs)
GAUSS_POINTS = 10


@functools.cache
def _gauss_legendre(n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x, w = np.polynomial.legendre.leggauss(n)
    return tuple(x.tolist()), tuple(w.tolist())


def _points(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Gauss–Legendre points ``(n, Q)`` on each ``[lo_i, hi_i]`` and their weights ``(n, Q)``."""
    x, w = (torch.tensor(v, dtype=lo.dtype, device=lo.device) for v in _gauss_legendre(GAUSS_POINTS))
    half = (hi - lo)[:, None] / 2
    return lo[:, None] + half * (x + 1), w * half


def _off_diagonal(valid: Tensor) -> Tensor:
    """``(n, M, M)``: pairs ``(j, m)`` of distinct valid nodes."""
    eye = torch.eye(valid.shape[1], dtype=torch.bool, device=valid.device)
    return valid[:, :, None] & valid[:, None, :] & ~eye


def lagrange_integrals(nodes: Tensor, valid: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    r"""Weights :math:`w_j = \int_{lo}^{hi} \ell_j(\tau)\,d\tau` of the interpolating polynomial through the valid nodes.

    Parameters
    ----------
    nodes : Tensor
        ``(n, M)`` nodes of each sample (distinct among the valid ones).
    valid : Tensor
        ``(n, M)`` bool: the nodes that take part; each row needs at least one.
    lo, hi : Tensor
        ``(n,)`` limits of each sample's integral.

    Returns
    -------
    Tensor
        ``(n, M)`` weights, zero at the invalid nodes; :math:`\sum_j w_j y_j` integrates the polynomial.
    """
    r, w = _points(lo, hi)
    pair = _off_diagonal(valid)
    denom = torch.where(pair, nodes[:, :, None] - nodes[:, None, :], torch.ones((), dtype=nodes.dtype, device=nodes.device))
    factors = (r[:, :, None, None] - nodes[:, None, None, :]) / denom[:, None]  # (n, Q, j, m)
    basis = torch.where(pair[:, None], factors, torch.ones((), dtype=nodes.dtype, device=nodes.device)).prod(-1)
    return (w[:, :, None] * basis).sum(1) * valid


def divided_difference_weights(nodes: Tensor, valid: Tensor) -> Tensor:
    r"""Weights :math:`c_j = 1/\prod_{m \ne j}(\tau_j - \tau_m)` of the divided difference over the valid nodes.

    :math:`y[\tau_0, \dots, \tau_{M-1}] = \sum_j c_j y_j`, which is :math:`y^{(M-1)}(\xi)/(M-1)!` for some
    :math:`\xi` between the nodes (the leading coefficient of the interpolating polynomial).

    Returns
    -------
    Tensor
        ``(n, M)`` weights, zero at the invalid nodes.
    """
    pair = _off_diagonal(valid)
    one = torch.ones((), dtype=nodes.dtype, device=nodes.device)
    prod = torch.where(pair, nodes[:, :, None] - nodes[:, None, :], one).prod(-1)
    return torch.where(valid, 1.0 / prod, torch.zeros_like(prod))


def node_polynomial_integral(nodes: Tensor, valid: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    r""":math:`\int_{lo}^{hi} \prod_{j\ \mathrm{valid}} (\tau - \tau_j)\,d\tau`, ``(n,)``.

    With :func:`divided_difference_weights` over the same nodes and one more, the product estimates the error of
    the rule of :func:`lagrange_integrals`: :math:`\int (y - p) \approx y[\tau_0, \dots, \tau_{M-1}, \tau_M]
    \int \omega`.
    """
    r, w = _points(lo, hi)
    one = torch.ones((), dtype=nodes.dtype, device=nodes.device)
    omega = torch.where(valid[:, None, :], r[:, :, None] - nodes[:, None, :], one).prod(-1)
    return (omega * w).sum(1)
