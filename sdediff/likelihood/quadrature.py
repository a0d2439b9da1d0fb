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
def _gauss_legendre(n: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    x, w = np.polynomial.legendre.leggauss(n)
    return torch.tensor(x, dtype=dtype, device=device), torch.tensor(w, dtype=dtype, device=device)


def _points(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Gauss–Legendre points ``(n, Q)`` on each ``[lo_i, hi_i]`` and their weights ``(n, Q)``."""
    x, w = _gauss_legendre(GAUSS_POINTS, lo.dtype, lo.device)
    half = (hi - lo)[:, None] / 2
    return lo[:, None] + half * (x + 1), w * half


def _off_diagonal(valid: Tensor) -> Tensor:
    """``(..., M, M)``: pairs ``(j, m)`` of distinct valid nodes."""
    eye = torch.eye(valid.shape[-1], dtype=torch.bool, device=valid.device)
    return valid[..., :, None] & valid[..., None, :] & ~eye


def _rules(nodes: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, bool]:
    """``valid`` as ``(n, R, M)`` (``R`` rules on the same nodes), ``nodes`` as ``(n, 1, M)``, and whether ``valid``
    had the rule dimension."""
    ruled = valid.dim() == 3
    return nodes[:, None], valid if ruled else valid[:, None], ruled


def lagrange_integrals(nodes: Tensor, valid: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    r"""Weights :math:`w_j = \int_{lo}^{hi} \ell_j(\tau)\,d\tau` of the interpolating polynomial through the valid nodes.

    Parameters
    ----------
    nodes : Tensor
        ``(n, M)`` nodes of each sample (distinct among the valid ones).
    valid : Tensor
        ``(n, M)`` bool: the nodes that take part (at least one per row); or ``(n, R, M)`` for ``R`` rules on the
        same nodes at once.
    lo, hi : Tensor
        ``(n,)`` limits of each sample's integral.

    Returns
    -------
    Tensor
        Weights shaped like ``valid``, zero at the invalid nodes; :math:`\sum_j w_j y_j` integrates the polynomial.
    """
    r, w = _points(lo, hi)
    node, valid, ruled = _rules(nodes, valid)
    pair = _off_diagonal(valid)  # (n, R, M, M)
    one = torch.ones((), dtype=nodes.dtype, device=nodes.device)
    denom = torch.where(pair, node[..., :, None] - node[..., None, :], one)
    factors = (r[:, None, :, None, None] - node[:, :, None, None, :]) / denom[:, :, None]  # (n, R, Q, j, m)
    basis = torch.where(pair[:, :, None], factors, one).prod(-1)
    out = (w[:, None, :, None] * basis).sum(2) * valid
    return out if ruled else out[:, 0]


def divided_difference_weights(nodes: Tensor, valid: Tensor) -> Tensor:
    r"""Weights :math:`c_j = 1/\prod_{m \ne j}(\tau_j - \tau_m)` of the divided difference over the valid nodes.

    :math:`y[\tau_0, \dots, \tau_{M-1}] = \sum_j c_j y_j`, which is :math:`y^{(M-1)}(\xi)/(M-1)!` for some
    :math:`\xi` between the nodes (the leading coefficient of the interpolating polynomial). ``valid`` is ``(n, M)``
    or ``(n, R, M)`` (``R`` sets of nodes).

    Returns
    -------
    Tensor
        Weights shaped like ``valid``, zero at the invalid nodes.
    """
    node, valid, ruled = _rules(nodes, valid)
    one = torch.ones((), dtype=nodes.dtype, device=nodes.device)
    prod = torch.where(_off_diagonal(valid), node[..., :, None] - node[..., None, :], one).prod(-1)
    out = torch.where(valid, 1.0 / prod, torch.zeros_like(prod))
    return out if ruled else out[:, 0]


def node_polynomial_integral(nodes: Tensor, valid: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    r""":math:`\int_{lo}^{hi} \prod_{j\ \mathrm{valid}} (\tau - \tau_j)\,d\tau`, ``(n,)`` (``(n, R)`` for ``valid``
    ``(n, R, M)``).

    With :func:`divided_difference_weights` over the same nodes and one more, the product estimates the error of
    the rule of :func:`lagrange_integrals`: :math:`\int (y - p) \approx y[\tau_0, \dots, \tau_{M-1}, \tau_M]
    \int \omega`.
    """
    r, w = _points(lo, hi)
    node, valid, ruled = _rules(nodes, valid)
    one = torch.ones((), dtype=nodes.dtype, device=nodes.device)
    omega = torch.where(valid[:, :, None, :], r[:, None, :, None] - node[:, :, None, :], one).prod(-1)  # (n, R, Q)
    out = (omega * w[:, None]).sum(2)
    return out if ruled else out[:, 0]
