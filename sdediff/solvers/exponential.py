r"""Few-step solvers of the probability-flow ODE that exploit the linear SDE's Gaussian kernel.

For a linear SDE with kernel :math:`x_t \mid x_0 \sim N(m_t x_0, s_t^2 I)` the probability flow
:math:`dx/dt = a(t)x - \tfrac12 g(t)^2\nabla\log p_t(x)` is semi-linear. With the half log-SNR
:math:`\lambda = \log(m/s)` as time, and the data and noise predictions given by Tweedie's formula,

.. math::  \hat x_0 = (x + s^2\,\nabla\log p_t(x))/m, \qquad \hat\epsilon = -s\,\nabla\log p_t(x)
           \qquad (x = m\hat x_0 + s\hat\epsilon),

it reads

.. math::  \frac{dx}{d\lambda} = \frac{d\log s}{d\lambda}\,x + m\,\hat x_0
           = \frac{d\log m}{d\lambda}\,x - s\,\hat\epsilon,

whose linear part integrates exactly (variation of constants), from :math:`\lambda_s` to
:math:`\lambda_t = \lambda_s + h`:

.. math::  x_t = \frac{s_t}{s_s}\,x_s + s_t\int_{\lambda_s}^{\lambda_t} e^{\lambda}\,\hat x_0\,d\lambda
                = \frac{m_t}{m_s}\,x_s - m_t\int_{\lambda_s}^{\lambda_t} e^{-\lambda}\,\hat\epsilon\,d\lambda.

Expanding the prediction in a Taylor series in :math:`\lambda` and integrating each term exactly gives

.. math::  x_t = \frac{s_t}{s_s}x_s + m_t\sum_{k\ge0} h^{k+1}\varphi_{k+1}(-h)\,\hat x_0^{(k)}(\lambda_s)
           \quad\text{(data)}, \qquad
           x_t = \frac{m_t}{m_s}x_s - s_t\sum_{k\ge0} h^{k+1}\varphi_{k+1}(h)\,\hat\epsilon^{(k)}(\lambda_s)
           \quad\text{(noise)},

with :math:`\varphi_1(z) = (e^z-1)/z`, :math:`\varphi_{k+1}(z) = (\varphi_k(z) - 1/k!)/z`. The solvers here
differ in how they estimate the derivatives :math:`\hat x_0^{(k)}` (from past steps or extra stages).

The EDM form is the same flow in :math:`(\sigma, y) = (s/m, x/m)`: :math:`dy/d\sigma = (y - \hat x_0)/\sigma
= \hat\epsilon`, used by ``lms`` and ``edm_heun``.

All solvers here need only :math:`m(t)` and :math:`s(t)` (any :class:`~sdediff.LinearSDE`) and work on any time
grid. ``dpm_solver``, ``ddim`` and ``lms`` are coefficient tables (:meth:`coefficients`, computed once per grid in
float64 and run by the shared update of :mod:`sdediff.solvers.tables`); ``edm_heun`` is a step with its
per-step coefficients precomputed in ``start``.

Solvers (NFE = score evaluations, :math:`N` = number of grid steps):

=============== ============================================================ =====================
name            method                                                       NFE
=============== ============================================================ =====================
``dpm_solver``  DPM-Solver / DPM-Solver++ (orders 1-3, multi- or singlestep)  :math:`N` or order·N
``ddim``        DDIM, deterministic (``eta=0``) or stochastic (``eta>0``)     :math:`N`
``lms``         Adams–Bashforth in :math:`\sigma` (orders 1-4)                :math:`N`
``edm_heun``    Heun in :math:`\sigma` (EDM), optional stochastic churn       :math:`2N`
=============== ============================================================ =====================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._validate import check_choice, check_float
from ..processes import ReverseProcess
from ..sdes.base import SDE
from ..sdes.linear import LinearSDE, require_linear
from .base import FixedStepSolver, register_solver
from .tables import (
    LinearScheme,
    exp_coefficients,
    gauss_legendre,
    kernel,
    lagrange_basis,
    phi_terms,
    rows_from_stages,
    sigma_multistep_scheme,
    work_dtype,
)

__all__ = ["DPMSolver", "DDIM", "LMS", "EDMHeun", "phi_terms", "adams_bashforth_weights", "prediction_coefficients"]


def prediction_coefficients(prediction: str, m: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(p, q)`` with :math:`P = p\,x + q\,\nabla\log p_t(x)`: :math:`(1/m, s^2/m)` for :math:`\hat x_0` (``"data"``),
    :math:`(0, -s)` for :math:`\hat\epsilon` (``"noise"``)."""
    return (1 / m, s**2 / m) if prediction == "data" else (torch.zeros_like(s), -s)


# --- DPM-Solver -------------------------------------------------------------------------------------
@register_solver("dpm_solver")
class DPMSolver(FixedStepSolver):
    r"""DPM-Solver (noise prediction) and DPM-Solver++ (data prediction), orders 1 to 3.

    An exponential integrator in :math:`\lambda = \log(m/s)`: the linear part of the probability flow is
    integrated exactly and the prediction :math:`P` (:math:`\hat x_0` or :math:`\hat\epsilon`) by a Taylor
    expansion in :math:`\lambda` (module docstring). With :math:`h = \lambda_t - \lambda_s`,
    :math:`a, c_1, c_2, c_3` from the table below and :math:`P_0 = P(x_s, s)`,

    .. math::  x_t = a\,x_s + c_1 P_0 + c_2 P' + c_3 P'',

    ========== ======================= =========================================================
    prediction :math:`a`               :math:`c_{k}`, :math:`k = 1, 2, 3`
    ========== ======================= =========================================================
    ``data``   :math:`s_t/s_s`         :math:`m_t\,h^k\varphi_k(-h)` (:math:`c_1 = m_t(1 - e^{-h})`)
    ``noise``  :math:`m_t/m_s`         :math:`-s_t\,h^k\varphi_k(h)` (:math:`c_1 = -s_t(e^{h} - 1)`)
    ========== ======================= =========================================================

    Order 1 (either method) is DDIM. The derivatives are estimated as follows.

    **multistep** (1 NFE per step): from the predictions at the previous grid points
    :math:`\lambda_{-1} = \lambda_s - h_1`, :math:`\lambda_{-2} = \lambda_{-1} - h_2` (divided differences of
    the interpolating polynomial):

    .. math::  \text{order 2:}\ P' = \frac{P_0 - P_{-1}}{h_1}; \qquad
               \text{order 3:}\ P' = D_{01} + h_1 D_{012},\ P'' = 2D_{012},

    with :math:`D_{01} = (P_0 - P_{-1})/h_1`, :math:`D_{12} = (P_{-1} - P_{-2})/h_2`,
    :math:`D_{012} = (D_{01} - D_{12})/(h_1 + h_2)`. The first steps use lower orders (order ``min(order,
    i + 1)`` at step ``i``). A second-order step takes one of two forms (named as in diffusers'
    ``DPMSolverMultistepScheduler``): ``"heun"`` integrates the line through :math:`P_{-1}, P_0` exactly,
    :math:`c_2 P'`; ``"midpoint"`` replaces :math:`c_2` by :math:`\tfrac h2 c_1` (:math:`c_2 = \tfrac h2 c_1 + O(h^3)`),

    .. math::  x_t = a\,x_s + c_1\Big(P_0 + \frac{h}{2h_1}(P_0 - P_{-1})\Big),

    which is diffusers' default and k-diffusion's ``sample_dpmpp_2m``. Both are second order. (diffusers'
    third-order multistep step and k-diffusion's ``sample_dpmpp_3m_sde`` weigh the second difference by
    :math:`c_3 D_{012}`, half the :math:`c_3 P''` above, and converge at order 2: ``tests/test_third_order.py``.)

    **singlestep** (``order`` NFE per step): intermediate points at :math:`\lambda_s + r h`, reached by
    lower-order steps from :math:`x_s` (their times found by bisection once, in ``start``):

    - order 2 (:math:`r_1 = 1/2`): :math:`u = \text{order-1 step to } r_1`, :math:`P' = (P(u) - P_0)/(r_1 h)`;
    - order 3 (:math:`r_1 = 1/3, r_2 = 2/3`): :math:`u_1` = order-1 step to :math:`r_1`; :math:`u_2` = the
      step to :math:`r_2` with :math:`P' = (P(u_1) - P_0)/(r_1 h)`; the final step uses
      :math:`P' = (P(u_2) - P_0)/(r_2 h)` and no :math:`c_3` term (third order because
      :math:`r_2\varphi_2/2 = \varphi_3 + O(h)`, as in DPM-Solver-3).

    Parameters
    ----------
    order : {1, 2, 3}
        Order of accuracy (default 2; 3 for unconditional sampling at few steps).
    method : {"multistep", "singlestep"}
        Reuse past predictions (1 NFE per step, default) or take ``order`` stages per step.
    prediction : {"data", "noise"}
        Expand :math:`\hat x_0` (DPM-Solver++, default) or :math:`\hat\epsilon` (DPM-Solver).
    solver_type : {"heun", "midpoint"}
        Multistep only: the form of the second-order steps (default ``"heun"``; those of an order-3 run too,
        as in diffusers).
    lower_order_final : bool or "diffusers"
        Multistep only. ``True`` (default): on grids of fewer than 15 steps, use order ``min(order, N - i)``
        for the last steps (standard practice; it makes few-step sampling more stable); with 15 steps or more
        it has no effect, so the asymptotic order is kept. This is diffusers' rule for a loop that ends at
        its last noise level (``final_sigmas_type="sigma_min"``). ``"diffusers"``: diffusers' rule for its
        default loop, which ends with a first-order step to :math:`\sigma = 0` (sdediff's ``denoise=True``) and
        counts it: the grid's last step has order at most 2 when :math:`N + 1 < 15`, no other step is lowered.
        ``False``: never lower the order (k-diffusion's ``sample_dpmpp_2m``).

    Notes
    -----
    NFE: ``steps`` (multistep) or ``order * steps`` (singlestep). Needs a :class:`~sdediff.LinearSDE`.
    The grid ``time_grid="log_snr"`` (uniform :math:`h`) suits these solvers best.
    """

    ORDERS = (1, 2, 3)
    METHODS = ("multistep", "singlestep")
    PREDICTIONS = ("data", "noise")
    SOLVER_TYPES = ("heun", "midpoint")
    #: grids shorter than this use lower orders on their final steps when ``lower_order_final``
    LOWER_ORDER_FINAL_BELOW = 15

    def __init__(self, order: int = 2, method: str = "multistep", prediction: str = "data", solver_type: str = "heun",
                 lower_order_final: bool | str = True) -> None:
        self.order = check_choice("order", order, self.ORDERS)
        self.method = check_choice("method", method, self.METHODS)
        self.prediction = check_choice("prediction", prediction, self.PREDICTIONS)
        self.solver_type = check_choice("solver_type", solver_type, self.SOLVER_TYPES)
        if self.method == "singlestep" and self.solver_type != "heun":
            raise ValueError(f"solver_type={solver_type!r} is a form of the multistep method; drop it with "
                             "method='singlestep'")
        if not (isinstance(lower_order_final, bool) or lower_order_final == "diffusers"):
            raise ValueError(f"lower_order_final must be True, False or 'diffusers', got {lower_order_final!r}")
        self.lower_order_final = lower_order_final

    def coefficients(self, sde: LinearSDE, ts: Tensor) -> LinearScheme:
        t = ts.to(work_dtype(ts.device))
        m, s, lam = kernel(sde, t)
        if self.method == "singlestep" and self.order > 1:
            return self._singlestep(sde, t, m, s, lam)
        a, w = self._multistep_weights(m, s, lam)
        p, q = prediction_coefficients(self.prediction, m[:-1], s[:-1])
        # x_{i+1} = a x + w_0 P_i + w_1 P_{i-1} + w_2 P_{i-2}, with P_i = p x + q score folded into (a, b)
        return LinearScheme(times=t[:-1], a=a + w[:, 0] * p, b=w[:, 0] * q, w=w[:, 1:self.order], p=p, q=q)

    def _order_at(self, i: int, n: int) -> int:
        """The order of step ``i`` of ``n`` (class docstring: ``lower_order_final``)."""
        order = min(self.order, i + 1)
        if self.lower_order_final == "diffusers":
            return min(order, 2) if i == n - 1 and n + 1 < self.LOWER_ORDER_FINAL_BELOW else order
        if self.lower_order_final and n < self.LOWER_ORDER_FINAL_BELOW:
            order = min(order, n - i)
        return order

    def _multistep_weights(self, m: Tensor, s: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
        r"""Per step, ``a`` and ``(w_0, w_1, w_2)`` with :math:`x_t = a\,x_s + w_0 P_0 + w_1 P_{-1} + w_2 P_{-2}`.

        The divided differences of the class docstring, multiplied out: order 1 has :math:`w_0 = c_1`;
        order 2 :math:`w_0 = c_1 + c_2/h_1`, :math:`w_1 = -c_2/h_1` (:math:`c_2 \to \tfrac h2 c_1` for ``"midpoint"``);
        order 3, with
        :math:`e = (c_2 h_1 + 2c_3)/(h_1 + h_2)`, :math:`w_0 = c_1 + (c_2 + e)/h_1`,
        :math:`w_1 = -(c_2 + e)/h_1 - e/h_2`, :math:`w_2 = e/h_2`.
        """
        a, c = exp_coefficients(self.prediction, (m[:-1], s[:-1], lam[:-1]), (m[1:], s[1:], lam[1:]), self.order)
        h = lam[1:] - lam[:-1]
        n = len(h)
        order = torch.tensor([self._order_at(i, n) for i in range(n)], device=a.device)[:, None]
        one = torch.ones_like(h[:1])
        h1, h2 = torch.cat([one, h[:-1]]), torch.cat([one, one, h[:-2]])[:n]  # h_{i-1}, h_{i-2} (1 where unused)
        c1, c2, c3 = (c[:, j] if j < c.shape[1] else torch.zeros_like(a) for j in range(3))
        e = (c2 * h1 + 2 * c3) / (h1 + h2)
        zero = torch.zeros_like(a)
        c2_second = c2 if self.solver_type == "heun" else 0.5 * h * c1  # the second-order steps' form
        w2 = torch.stack([c1 + c2_second / h1, -c2_second / h1, zero], dim=1)
        w3 = torch.stack([c1 + (c2 + e) / h1, -(c2 + e) / h1 - e / h2, e / h2], dim=1)
        return a, torch.where(order == 1, torch.stack([c1, zero, zero], dim=1), torch.where(order == 2, w2, w3))

    def _singlestep(self, sde: LinearSDE, t: Tensor, m: Tensor, s: Tensor, lam: Tensor) -> LinearScheme:
        r"""The singlestep stages of the class docstring, relative to the step's start :math:`x_i`
        (:func:`~sdediff.solvers.tables.rows_from_stages` turns them into rows): :math:`u_1 = a^{(1)} x + c^{(1)}_1 P_0`;
        for order 3 :math:`u_2 = a^{(2)} x + (c^{(2)}_1 - c^{(2)}_2/(r_1h)) P_0 + c^{(2)}_2/(r_1h)\,P_1`; the step
        :math:`x_{i+1} = a x + (c_1 - c_2/(r_kh)) P_0 + c_2/(r_kh)\,P_k` with :math:`k` the last stage."""
        start = (m[:-1], s[:-1], lam[:-1])
        a, c = exp_coefficients(self.prediction, start, (m[1:], s[1:], lam[1:]), self.order)
        h = lam[1:] - lam[:-1]
        stages, fractions = self.order, (0.5,) if self.order == 2 else (1 / 3, 2 / 3)
        times, p, q = [t[:-1]], [], []
        alpha = [torch.ones_like(a)]
        beta = h.new_zeros((len(h), stages + 1, stages))
        for j, r in enumerate(fractions, start=1):  # the intermediate points lambda_s + r h, found by bisection
            t_r = sde.time_of_log_snr(2 * (lam[:-1] + r * h), t[1:], t[:-1])
            m_r, s_r, lam_r = kernel(sde, t_r)
            a_r, c_r = exp_coefficients(self.prediction, start, (m_r, s_r, lam_r), j)
            times.append(t_r)
            alpha.append(a_r)
            if j == 1:
                beta[:, 1, 0] = c_r[:, 0]
            else:  # P' from the first stage: (P_1 - P_0) / (r_1 h)
                d = c_r[:, 1] / (fractions[0] * h)
                beta[:, 2, 0], beta[:, 2, 1] = c_r[:, 0] - d, d
        for t_k in times:
            p_k, q_k = prediction_coefficients(self.prediction, *kernel(sde, t_k)[:2])
            p.append(p_k)
            q.append(q_k)
        w = c[:, 1] / (fractions[-1] * h)
        alpha.append(a)
        beta[:, stages, 0], beta[:, stages, stages - 1] = c[:, 0] - w, w
        return rows_from_stages(torch.stack(times, 1), torch.stack(alpha, 1), beta, torch.stack(p, 1), torch.stack(q, 1))


# --- DDIM -------------------------------------------------------------------------------------------
@register_solver("ddim")
class DDIM(FixedStepSolver):
    r"""DDIM for any linear SDE: deterministic (``eta = 0``) or stochastic (``eta > 0``).

    With :math:`\hat x_0, \hat\epsilon` from the score at :math:`(x_s, s)` and :math:`h = \lambda_t - \lambda_s`,

    .. math::  x_t = m_t\,\hat x_0 + \sqrt{s_t^2 - \sigma^2}\,\hat\epsilon + \sigma z, \qquad
               \sigma = \min\big(\eta\,s_t\sqrt{1 - e^{-2h}},\ s_t\big), \qquad
               e^{-2h} = \frac{m_s^2 s_t^2}{m_t^2 s_s^2}.

    ``eta = 0`` is the deterministic DDIM step, equal to first-order DPM-Solver:
    :math:`x_t = (s_t/s_s)x_s + m_t(1 - e^{-h})\hat x_0`. ``eta = 1`` makes :math:`\sigma^2` the variance of
    the forward posterior :math:`q(x_t \mid x_s, x_0)`, :math:`s_t^2(1 - e^{-2h})` (for VP this is DDIM's
    :math:`\frac{1-\bar\alpha_t}{1-\bar\alpha_s}(1 - \bar\alpha_s/\bar\alpha_t)`), i.e. ancestral sampling.
    ``eta > 1`` adds more noise, capped at :math:`\sigma = s_t` (every step then re-noises
    :math:`m_t\hat x_0`).

    Parameters
    ----------
    eta : float
        Noise level :math:`\eta \ge 0` (default 0).

    Notes
    -----
    1 NFE per step. With ``eta > 0`` the solver is stochastic and draws from the sampler's generator.
    """

    def __init__(self, eta: float = 0.0) -> None:
        self.eta = check_float("eta", eta, 0.0)

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        """Whether the solver draws noise (``eta > 0``)."""
        return self.eta > 0

    def coefficients(self, sde: LinearSDE, ts: Tensor) -> LinearScheme:
        r""":math:`x_t = \frac{m_t}{m_s}x + \big(\frac{m_t}{m_s}s_s^2 - \sqrt{s_t^2 - \sigma^2}\,s_s\big)\nabla\log p_s(x)
        + \sigma z`, the step above with :math:`\hat x_0, \hat\epsilon` written in the score."""
        t = ts.to(work_dtype(ts.device))
        m, s, lam = kernel(sde, t)
        h = lam[1:] - lam[:-1]
        sigma = torch.minimum(self.eta * s[1:] * (-torch.expm1(-2 * h)).sqrt(), s[1:])
        keep = (s[1:] ** 2 - sigma**2).clamp_min(0).sqrt()  # sqrt(s_t^2 - sigma^2), the share of eps_hat kept
        a = m[1:] / m[:-1]
        return LinearScheme.one_step(t, a, a * s[:-1] ** 2 - keep * s[:-1], sigma if self.eta > 0 else None)


# --- linear multistep in sigma ----------------------------------------------------------------------
def adams_bashforth_weights(sigma: Tensor, order: int) -> Tensor:
    r"""Variable-step Adams–Bashforth weights on the grid ``sigma`` (any device), shape ``(N, order)``.

    Row ``i`` holds :math:`b_{ij} = \int_{\sigma_i}^{\sigma_{i+1}} L_{ij}(\sigma)\,d\sigma`, with :math:`L_{ij}`
    the Lagrange basis polynomials on the nodes :math:`\sigma_i, \sigma_{i-1}, \dots, \sigma_{i-k+1}`,
    :math:`k = \min(\text{order}, i + 1)` (columns ``j >= k`` are zero;
    :func:`~sdediff.solvers.tables.lagrange_basis`). The integrals are exact: Gauss–Legendre quadrature with
    ``order`` points integrates the degree ``k - 1`` polynomials exactly.
    """
    u, w = gauss_legendre(order, sigma)
    half = 0.5 * (sigma[1:] - sigma[:-1])
    q = (0.5 * (sigma[1:] + sigma[:-1]))[:, None] + half[:, None] * u  # (N, order) quadrature nodes per step
    return half[:, None] * (lagrange_basis(sigma, order, q) * w).sum(-1)


@register_solver("lms")
class LMS(FixedStepSolver):
    r"""Linear multistep (Adams–Bashforth) on the probability flow in EDM form.

    In :math:`\sigma = s/m` and :math:`y = x/m` the flow is :math:`dy/d\sigma = d(y, \sigma) = (y - \hat x_0)/\sigma
    = \hat\epsilon`. With the derivatives :math:`d_i` at the last :math:`k` grid points,

    .. math::  y_{i+1} = y_i + \sum_{j<k} b_{ij}\,d_{i-j}, \qquad
               b_{ij} = \int_{\sigma_i}^{\sigma_{i+1}} L_{ij}(\sigma)\,d\sigma,

    :math:`L_{ij}` the Lagrange basis on :math:`\sigma_i, \dots, \sigma_{i-k+1}` and :math:`k = \min(\text{order},
    i+1)` (lower orders while the history fills). The weights are exact for any grid and computed once per run
    (:func:`adams_bashforth_weights`).

    Parameters
    ----------
    order : {1, 2, 3, 4}
        Number of past derivatives used (default 4); order 1 is Euler in :math:`\sigma`.

    Notes
    -----
    1 NFE per step. The first steps, of lower order, limit the asymptotic convergence rate; near
    :math:`\sigma_{max}` the flow is nearly straight, so their error is small in practice.
    Needs a :class:`~sdediff.LinearSDE`; ``time_grid="karras"`` suits it.
    """

    ORDERS = (1, 2, 3, 4)

    def __init__(self, order: int = 4) -> None:
        self.order = check_choice("order", order, self.ORDERS)

    def coefficients(self, sde: LinearSDE, ts: Tensor) -> LinearScheme:
        r""":math:`x_{i+1} = m_{i+1} y_{i+1} = (m_{i+1}/m_i)\,x_i + \sum_j m_{i+1} b_{ij}\,d_{i-j}` with the kept
        prediction :math:`d_i = \hat\epsilon_i = -s_i\,\nabla\log p_{t_i}(x_i)`."""
        t = ts.to(work_dtype(ts.device))
        m, s, _ = kernel(sde, t)
        return sigma_multistep_scheme(t, m, s, adams_bashforth_weights(s / m, self.order))


# --- EDM Heun ---------------------------------------------------------------------------------------
@dataclass
class EDMHeunState:
    r"""Per step :math:`i`: the raised time :math:`\hat t_i` (on the samples' device), the coefficients
    :math:`(\rho_i, \nu_i, A_i, B_i, C_i)` of :math:`\hat x = \rho_i x + \nu_i z`,
    :math:`\tilde x = A_i\hat x + B_i s_\theta(\hat x, \hat t_i)`,
    :math:`x_{i+1} = \tfrac12 A_i\hat x + \tfrac12\tilde x + C_i s_\theta(\tilde x, t_{i+1})` (a float64 host table,
    read a row at a time), and the index of the next step."""

    t_hat: Tensor
    coef: Tensor
    index: int = 0


@register_solver("edm_heun")
class EDMHeun(FixedStepSolver):
    r"""Heun's method in :math:`(\sigma, y) = (s/m, x/m)` with EDM's optional stochastic churn (Karras et al. 2022).

    With :math:`d(y, \sigma) = (y - \hat x_0)/\sigma = \hat\epsilon` (the flow :math:`dy/d\sigma`), one step from
    :math:`\sigma_i` to :math:`\sigma_{i+1}` is

    .. math::  \gamma_i = \begin{cases}\min(S_{churn}/N, \sqrt2 - 1) & S_{tmin} \le \sigma_i \le S_{tmax}\\
                                        0 & \text{otherwise}\end{cases}, \qquad
               \hat\sigma = \min(\sigma_i(1 + \gamma_i),\ \sigma(T)),

    .. math::  \hat y = y_i + \sqrt{\hat\sigma^2 - \sigma_i^2}\,S_{noise}\,z, \qquad
               \tilde y = \hat y + (\sigma_{i+1} - \hat\sigma)\,d(\hat y, \hat\sigma), \qquad
               y_{i+1} = \hat y + \tfrac12(\sigma_{i+1} - \hat\sigma)\,[d(\hat y, \hat\sigma)
               + d(\tilde y, \sigma_{i+1})],

    and :math:`x = m\,y` at the matching times. The raised level :math:`\hat\sigma` is mapped to its time
    :math:`\hat t \in [t_i, T]` by bisection once per run (in ``start``), and capped at the SDE's
    :math:`\sigma(T)`, since the SDE is not defined past ``T``. ``churn = 0`` (default) is the
    deterministic Heun step; pair it with ``time_grid="karras"`` for EDM's discretisation.

    Parameters
    ----------
    churn : float
        :math:`S_{churn} \ge 0`, the total amount of stochasticity (default 0: deterministic).
    s_tmin, s_tmax : float
        Range of :math:`\sigma` in which churn is applied (default ``0`` to ``inf``).
    s_noise : float
        :math:`S_{noise} \ge 0`, scale of the added noise (default 1; EDM used slightly above 1).

    Notes
    -----
    2 NFE per step (the final :math:`\sigma` is never 0 here since ``eps > 0``). Needs a
    :class:`~sdediff.LinearSDE`.
    """

    def __init__(self, churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
                 s_noise: float = 1.0) -> None:
        self.churn = check_float("churn", churn, 0.0)
        self.s_tmin = check_float("s_tmin", s_tmin, 0.0)
        self.s_tmax = check_float("s_tmax", s_tmax, self.s_tmin, finite=False)
        self.s_noise = check_float("s_noise", s_noise, 0.0)

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        """Whether the solver draws noise (``churn > 0``)."""
        return self.churn > 0

    def start(self, sde: SDE, ts: Tensor, x: Tensor) -> EDMHeunState:
        r"""The raised levels :math:`\hat\sigma_i` and their times (by bisection), and the step's coefficients in
        ``x``: with :math:`d\sigma = \sigma_{i+1} - \hat\sigma_i`, :math:`\rho = \hat m/m_i`,
        :math:`\nu = \hat m S_{noise}\sqrt{\hat\sigma^2 - \sigma_i^2}`, :math:`A = m_{i+1}/\hat m`,
        :math:`B = -m_{i+1}\,d\sigma\,\hat s`, :math:`C = -\tfrac12 m_{i+1}\,d\sigma\,s_{i+1}`."""
        sde = require_linear(sde, f"solver {self.name!r}")
        t = ts.to(work_dtype(ts.device))
        m, s, _ = kernel(sde, t)
        sigma = (s / m)[:-1]
        t_hat, m_hat, s_hat, noise = t[:-1], m[:-1], s[:-1], torch.zeros_like(sigma)
        if self.churn > 0:
            t_max = torch.full_like(t[:1], sde.T)
            sigma_max = (sde.marginal_std(t_max) / sde.mean_coeff(t_max))[0]
            inside = (sigma >= self.s_tmin) & (sigma <= self.s_tmax)
            gamma = inside.to(sigma.dtype) * min(self.churn / (len(ts) - 1), math.sqrt(2) - 1)
            raised = torch.minimum(sigma * (1 + gamma), torch.maximum(sigma_max, sigma))
            t_hat = torch.where(raised > sigma, sde.time_of_log_snr(-2 * raised.log(), t[:-1]), t[:-1])
            m_hat, s_hat, _ = kernel(sde, t_hat)
            noise = self.s_noise * ((s_hat / m_hat) ** 2 - sigma**2).clamp_min(0).sqrt()
        dsigma = (s / m)[1:] - s_hat / m_hat
        coef = torch.stack([m_hat / m[:-1], m_hat * noise, m[1:] / m_hat, -m[1:] * dsigma * s_hat,
                            -0.5 * m[1:] * dsigma * s[1:]], dim=1)
        return EDMHeunState(t_hat=t_hat.to(x), coef=coef.to("cpu", torch.float64))

    def step(self, process: ReverseProcess, state: EDMHeunState, x: Tensor, t: Tensor,
             t_next: Tensor) -> tuple[Tensor, EDMHeunState]:
        rho, nu, a, b, c = state.coef[state.index].tolist()
        if self.churn > 0:  # raise the noise level to sigma_hat
            x = rho * x + nu * process.noise(x)
        x_euler = torch.add(a * x, process.score(x, state.t_hat[state.index]), alpha=b)
        x_next = torch.add(torch.add(0.5 * a * x, x_euler, alpha=0.5), process.score(x_euler, t_next), alpha=c)
        state.index += 1
        return x_next, state
