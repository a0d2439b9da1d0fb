r"""Linear multistep solvers of the probability flow in EDM form: iPNDM and DEIS (tAB).

In :math:`\sigma = s/m` and :math:`y = x/m` the probability flow of a linear SDE is
:math:`dy/d\sigma = \hat\epsilon(y, \sigma)`, with the noise prediction :math:`\hat\epsilon = -s\,\nabla\log p_t(x)`
(module docstring of :mod:`sdediff.solvers.exponential`). Integrating from :math:`\sigma_i` to :math:`\sigma_{i+1}`,

.. math::  y_{i+1} = y_i + \int_{\sigma_i}^{\sigma_{i+1}} \hat\epsilon\,d\sigma
           \qquad\Longleftrightarrow\qquad
           x_{i+1} = \frac{m_{i+1}}{m_i}\,x_i - m_{i+1}\int_{\lambda_i}^{\lambda_{i+1}} e^{-\lambda}\,\hat\epsilon\,d\lambda

(:math:`\lambda = \log(m/s) = -\log\sigma`: the second form is the exponential integrator, its linear part exact).
A :math:`k`-step method replaces :math:`\hat\epsilon` by a combination of the last :math:`k` predictions
:math:`\hat\epsilon_{i-j} = \hat\epsilon(x_{i-j}, t_{i-j})`:

.. math::  y_{i+1} = y_i + \sum_{j<k} b_{ij}\,\hat\epsilon_{i-j}

(:func:`~sdediff.solvers.tables.sigma_multistep_scheme`), with :math:`k = \min(\text{order}, i + 1)` while the
history fills (the lower-order warm start). The solvers differ in the weights :math:`b_{ij}`:

=========== ============================================================================== ==================
name        weights :math:`b_{ij}`                                                          extrapolates in
=========== ============================================================================== ==================
``lms``     :math:`\int_{\sigma_i}^{\sigma_{i+1}} L_{ij}(\sigma)\,d\sigma`                   :math:`\sigma`
``ipndm``   :math:`(\sigma_{i+1} - \sigma_i)\,c^{(k)}_j`, fixed Adams–Bashforth coefficients  :math:`\sigma`
``deis``    :math:`\int_{\sigma_i}^{\sigma_{i+1}} L_{ij}(t(\sigma))\,d\sigma`                :math:`t`
=========== ============================================================================== ==================

where :math:`L_{ij}` is the Lagrange basis on step ``i``'s nodes (:math:`\sigma_{i-l}` or :math:`t_{i-l}`, :math:`l < k`;
:func:`~sdediff.solvers.tables.lagrange_basis`). ``lms`` (:mod:`sdediff.solvers.exponential`) is DEIS's
:math:`\rho`\ AB and the variable-step form of iPNDM. Every one costs 1 NFE per step and needs a
:class:`~sdediff.LinearSDE`; each is a coefficient table (computed once per grid in float64).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._validate import check_bool, check_choice
from ..sdes.linear import LinearSDE
from .base import FixedStepSolver, register_solver
from .exponential import adams_bashforth_weights
from .tables import LinearScheme, gauss_legendre, kernel, lagrange_basis, sigma_multistep_scheme, work_dtype

__all__ = ["IPNDM", "DEIS", "IPNDM_COEFFICIENTS", "ipndm_weights", "deis_weights"]

#: Adams–Bashforth coefficients for equal steps, :math:`c^{(k)}_j` for orders :math:`k = 1..4`
IPNDM_COEFFICIENTS = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))
#: Gauss–Legendre points per step for DEIS's integrals
DEIS_POINTS = 32


def ipndm_weights(sigma: Tensor, order: int) -> Tensor:
    r"""iPNDM's weights on the grid ``sigma``, shape ``(N, order)``: :math:`b_{ij} = (\sigma_{i+1} - \sigma_i)\,c^{(k)}_j`
    with :math:`k = \min(\text{order}, i + 1)` and the coefficients :data:`IPNDM_COEFFICIENTS` (zero for :math:`j \ge k`).

    The coefficients are those of Adams–Bashforth for equal steps, so the method has order ``order`` on grids
    uniform in :math:`\sigma`; on other grids their mismatch with the actual steps leaves a local error of order
    :math:`\Delta^3` (global order 2; :func:`~sdediff.solvers.exponential.adams_bashforth_weights` is the exact
    variable-step form).
    """
    table = sigma.new_zeros((order, order))
    for k in range(1, order + 1):
        table[k - 1, :k] = torch.tensor(IPNDM_COEFFICIENTS[k - 1], dtype=sigma.dtype)
    k = torch.arange(len(sigma) - 1, device=sigma.device).clamp(max=order - 1)
    return (sigma[1:] - sigma[:-1])[:, None] * table[k]


def deis_weights(sde: LinearSDE, t: Tensor, order: int, points: int = DEIS_POINTS) -> Tensor:
    r"""DEIS tAB's weights on the time grid ``t`` (float64 recommended), shape ``(N, order)``.

    .. math::  b_{ij} = \int_{\sigma_i}^{\sigma_{i+1}} L_{ij}(t(\sigma))\,d\sigma
               = -\int_{\lambda_i}^{\lambda_{i+1}} e^{-\lambda}\,L_{ij}(t(\lambda))\,d\lambda,

    :math:`L_{ij}` the Lagrange basis in :math:`t` on :math:`t_i, \dots, t_{i-k+1}`, :math:`k = \min(\text{order}, i + 1)`
    (zero columns past :math:`k`). The integral is taken in :math:`\lambda`, where the exponential factor
    :math:`e^{-\lambda}` is entire and :math:`t(\lambda)` (:meth:`LinearSDE.time_of_log_snr`) is smooth even where
    :math:`\sigma(t)` is not (VP's :math:`\sigma \approx \sqrt{\beta_{min} t}` near 0), by ``points``-point
    Gauss–Legendre quadrature per step. Order 1 gives :math:`b_{i0} = \sigma_{i+1} - \sigma_i` (DDIM).
    """
    _, _, lam = kernel(sde, t)
    u, w = gauss_legendre(points, lam)
    half = 0.5 * (lam[1:] - lam[:-1])
    q = (0.5 * (lam[1:] + lam[:-1]))[:, None] + half[:, None] * u  # (N, points) quadrature nodes in lambda
    t_q = sde.time_of_log_snr(2 * q, t[1:, None], t[:-1, None])
    basis = lagrange_basis(t, order, t_q)  # (N, order, points)
    return -half[:, None] * (basis * (w * torch.exp(-q))[:, None, :]).sum(-1)


@register_solver("ipndm")
class IPNDM(FixedStepSolver):
    r"""iPNDM (Zhang & Chen 2023): Adams–Bashforth in :math:`\sigma` with fixed coefficients and a lower-order warm start.

    With :math:`d_i = \hat\epsilon_i = (y_i - \hat x_0)/\sigma_i` (the flow :math:`dy/d\sigma` at the grid point) and
    :math:`\Delta_i = \sigma_{i+1} - \sigma_i`,

    .. math::  y_{i+1} = y_i + \Delta_i \begin{cases}
               d_i & k = 1\\
               \tfrac12(3d_i - d_{i-1}) & k = 2\\
               \tfrac1{12}(23d_i - 16d_{i-1} + 5d_{i-2}) & k = 3\\
               \tfrac1{24}(55d_i - 59d_{i-1} + 37d_{i-2} - 9d_{i-3}) & k = 4
               \end{cases}, \qquad k = \min(\text{order}, i + 1),

    and :math:`x = m\,y` (weights :func:`ipndm_weights`). PNDM started with Runge–Kutta steps (3 extra NFE each);
    iPNDM starts with these lower orders instead, so every step costs 1 NFE.

    Parameters
    ----------
    order : {1, 2, 3, 4}
        The highest order (default 4); order 1 is Euler in :math:`\sigma`, i.e. DDIM.
    variable_step : bool
        Use the Adams–Bashforth weights of the actual steps (:func:`~sdediff.solvers.exponential.adams_bashforth_weights`,
        iPNDM's variable-step form, the same numbers as ``lms``) instead of the fixed ones (default ``False``).

    Notes
    -----
    1 NFE per step. The fixed coefficients assume equal steps in :math:`\sigma`: on a grid uniform in :math:`\sigma`
    the method has order ``order``; on other grids (Karras, log-SNR) its observed order is 2 (measured 2.0 on
    Gaussian data under VP and VE at 50-200 steps), while at 25 steps on the same problem its error was 0.57
    (VP) and 0.69 (VE) times that of the variable-step form (``tests/test_multistep.py``). Needs a
    :class:`~sdediff.LinearSDE`; ``time_grid="karras"`` suits it.
    """

    ORDERS = (1, 2, 3, 4)

    def __init__(self, order: int = 4, variable_step: bool = False) -> None:
        self.order = check_choice("order", order, self.ORDERS)
        self.variable_step = check_bool("variable_step", variable_step)

    def coefficients(self, sde: LinearSDE, ts: Tensor) -> LinearScheme:
        r"""The weights :math:`b_{ij}` in :func:`~sdediff.solvers.tables.sigma_multistep_scheme`:
        :math:`x_{i+1} = (m_{i+1}/m_i)\,x_i + m_{i+1}\sum_j b_{ij}\hat\epsilon_{i-j}`."""
        t = ts.to(work_dtype(ts.device))
        m, s, _ = kernel(sde, t)
        weights = adams_bashforth_weights if self.variable_step else ipndm_weights
        return sigma_multistep_scheme(t, m, s, weights(s / m, self.order))


@register_solver("deis")
class DEIS(FixedStepSolver):
    r"""DEIS tAB (Zhang & Chen 2023): the exponential integrator with :math:`\hat\epsilon` extrapolated as a polynomial in ``t``.

    .. math::  x_{i+1} = \frac{m_{i+1}}{m_i}\,x_i + m_{i+1}\sum_{j<k} b_{ij}\,\hat\epsilon_{i-j}, \qquad
               b_{ij} = -\int_{\lambda_i}^{\lambda_{i+1}} e^{-\lambda}\,L_{ij}(t(\lambda))\,d\lambda,

    :math:`k = \min(\text{order}, i + 1)`: the prediction is the polynomial in :math:`t` through the last
    :math:`k` predictions (Lagrange basis :math:`L_{ij}` on :math:`t_i, \dots, t_{i-k+1}`), integrated exactly
    against the exponential factor (weights :func:`deis_weights`). DEIS's paper offers the polynomial in
    :math:`t` (tAB, its default, here) or in :math:`\rho = \sigma` (:math:`\rho`\ AB: that is ``lms``).

    Parameters
    ----------
    order : {1, 2, 3}
        The polynomial's number of nodes (default 3); order 1 is DDIM.

    Notes
    -----
    1 NFE per step. Needs a :class:`~sdediff.LinearSDE`; the weights need :math:`t(\lambda)`, in closed form for
    VP, sub-VP and VE and by bisection for other SDEs (once per grid).
    """

    ORDERS = (1, 2, 3)

    def __init__(self, order: int = 3) -> None:
        self.order = check_choice("order", order, self.ORDERS)

    def coefficients(self, sde: LinearSDE, ts: Tensor) -> LinearScheme:
        r"""The weights of :func:`deis_weights` in :func:`~sdediff.solvers.tables.sigma_multistep_scheme`."""
        t = ts.to(work_dtype(ts.device))
        m, s, _ = kernel(sde, t)
        return sigma_multistep_scheme(t, m, s, deis_weights(sde, t, self.order))
