r"""UniPC: a unified predictor-corrector for the probability flow of a linear SDE (Zhao et al. 2023).

In the notation of :mod:`sdediff.solvers.exponential` (half log-SNR :math:`\lambda = \log(m/s)`, prediction
:math:`P = \hat x_0` or :math:`\hat\epsilon`), one step from :math:`\lambda_i` to :math:`\lambda_{i+1} = \lambda_i + h`
of order :math:`k` uses :math:`P_0 = P(\lambda_i)` and the predictions :math:`P_j = P(\lambda_{i-j})` at the
previous grid points through :math:`r_j = (\lambda_{i-j} - \lambda_i)/h` and :math:`D_j = (P_j - P_0)/r_j`,
:math:`j = 1..k-1`. With :math:`z = -h,\ a = s_{i+1}/s_i,\ \kappa = -m_{i+1}` (data) or
:math:`z = h,\ a = m_{i+1}/m_i,\ \kappa = -s_{i+1}` (noise), and :math:`B(z) = z` (``bh1``) or :math:`e^z - 1`
(``bh2``), the predictor UniP-:math:`k` is

.. math::  \tilde x_{i+1} = a\,x_i + \kappa\,\psi_1(z)\,P_0 + \kappa\,B(z)\sum_{j<k}\rho^p_j D_j,
           \qquad \psi_j(z) = e^z - \sum_{n<j} z^n/n!,

(the first two terms are DDIM), whose weights solve the order conditions

.. math::  \sum_{j<k} \rho^p_j\,r_j^{q-1} = b_q = \frac{q!\,\psi_{q+1}(z)}{z^q\,B(z)}, \qquad q = 1..k-1,

so that :math:`\tilde x_{i+1}` has order :math:`k`. The corrector UniC evaluates the model once at the
predicted point, :math:`P_{new} = P(\tilde x_{i+1}, \lambda_{i+1})` (node :math:`r_k = 1`, :math:`D_k = P_{new} - P_0`),
and recomputes the step with one more node, which raises the order to :math:`k + 1`:

.. math::  x_{i+1} = a\,x_i + \kappa\,\psi_1(z)\,P_0 + \kappa\,B(z)\sum_{j\le k}\rho^c_j D_j, \qquad
           \sum_{j\le k} \rho^c_j\,r_j^{q-1} = b_q,\ q = 1..k.

:math:`P_{new}` is the evaluation the next predictor needs anyway, so the corrector costs no extra NFE; the last
step skips it. ``N`` steps cost ``N`` score evaluations.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .._validate import check_bool, check_choice
from ..sdes.linear import LinearSDE
from .base import FixedStepSolver, register_solver
from .exponential import prediction_coefficients
from .tables import LinearScheme, kernel, phi_terms

__all__ = ["UniPC", "unipc_coefficients", "predictor_form"]


def unipc_coefficients(lam: Tensor, m: Tensor, s: Tensor, order: int, prediction: str = "data", variant: str = "bh2",
                       lower_order_final: bool = True, lower_order_final_below: int = 15
                       ) -> tuple[Tensor, Tensor, Tensor]:
    r"""Per-step weights of UniPC's predictor and corrector on the grid ``lam`` (host tensors, float64 recommended).

    ``m``, ``s`` and ``lam`` are the kernel's :math:`m(t_i), s(t_i), \lambda(t_i)` on the ``N + 1`` grid times.
    Returns ``(a, w, v)`` such that the predictor is :math:`\tilde x_{i+1} = a_i x_i + \sum_j w_{ij} P_{i-j}` and
    the corrector :math:`x_{i+1} = a_i x_i + \sum_j v_{ij} P_{i-j} + v_{i,K} P_{new}` (module docstring): ``a`` has
    shape ``(N,)``, ``w`` ``(N, K)`` and ``v`` ``(N, K + 1)`` with ``K = order``; columns past a step's order are 0.

    Step ``i`` has order :math:`k_i = \min(\text{order}, i + 1)`, also :math:`\le N - i` when ``lower_order_final``
    and :math:`N <` ``lower_order_final_below``, and is lowered further while the oldest node is closer than
    :math:`h/2` (:math:`|r_{k-1}| < 1/2`: extrapolating the prediction polynomial over more than twice its
    nodes' span amplifies their errors; on a smooth grid :math:`|r_{k-1}| \approx k - 1`, so this acts only
    at abrupt jumps of the step, such as the last step of a time-uniform VP grid). As in UniPC, the
    one-difference weights are fixed to :math:`\rho^p_1 = 1/2` (:math:`k = 2`) and :math:`\rho^c_1 = 1/2`
    (:math:`k = 1`), which keeps their order; they are where ``bh1`` and ``bh2`` differ, since for solved
    weights :math:`\kappa B(z)\rho` does not depend on :math:`B`.
    """
    n = len(lam) - 1
    h = lam[1:] - lam[:-1]
    z = -h if prediction == "data" else h
    kappa = -(m[1:] if prediction == "data" else s[1:])
    a = s[1:] / s[:-1] if prediction == "data" else m[1:] / m[:-1]
    big_b = z if variant == "bh1" else torch.expm1(z)
    psi = phi_terms(z, order + 1)  # psi[:, j - 1] = psi_j(z)
    q = torch.arange(1, order + 1, dtype=lam.dtype, device=lam.device)
    fact = torch.exp(torch.lgamma(q + 1))
    b = fact * psi[:, 1:] / (z[:, None] ** q * big_b[:, None])  # (N, order): b_q, q = 1..order
    # the per-step solves are tiny (k <= 5): in NumPy on the host, where each costs a few microseconds
    lam_h, h_h, kb_h, b_h, c0 = (val.detach().cpu().numpy() for val in (lam, h, kappa * big_b, b, kappa * psi[:, 0]))
    w = np.zeros((n, order), dtype=lam_h.dtype)
    v = np.zeros((n, order + 1), dtype=lam_h.dtype)
    w[:, 0], v[:, 0] = c0, c0  # the first-order (DDIM) term: x_{i+1} = a x_i + c0 P_0
    powers = np.arange(order)[:, None]  # q - 1 for the rows q = 1..order
    for i in range(n):
        k = min(order, i + 1)
        if lower_order_final and n < lower_order_final_below:
            k = min(k, n - i)
        while k > 1 and abs(lam_h[i] - lam_h[i - k + 1]) < 0.5 * abs(lam_h[i + 1] - lam_h[i]):
            k -= 1  # the oldest node would be closer than h/2: extrapolating that far is unstable
        r = np.append((lam_h[i - k + 1:i][::-1] - lam_h[i]) / h_h[i], 1.0).astype(lam_h.dtype)  # r_1..r_{k-1}, 1
        vander = r[None, :] ** powers[:k]  # rows q = 1..k
        if k > 1:  # predictor with the k - 1 past nodes
            rho_p = 0.5 if k == 2 else np.linalg.solve(vander[:k - 1, :k - 1], b_h[i, :k - 1])
            w[i, 1:k] = kb_h[i] * rho_p / r[:k - 1]
            w[i, 0] -= w[i, 1:k].sum()
        rho_c = np.array([0.5]) if k == 1 else np.linalg.solve(vander, b_h[i, :k])  # past nodes and the new one
        v[i, 1:k] = kb_h[i] * rho_c[:k - 1] / r[:k - 1]
        v[i, order] = kb_h[i] * rho_c[k - 1]
        v[i, 0] -= v[i, 1:k].sum() + v[i, order]
    return a, torch.from_numpy(w).to(lam), torch.from_numpy(v).to(lam)


@register_solver("unipc")
class UniPC(FixedStepSolver):
    r"""UniPC (Zhao et al. 2023): multistep exponential predictor UniP plus the corrector UniC, 1 NFE per step.

    Each step predicts :math:`\tilde x_{i+1}` from the current and past predictions (order :math:`k`),
    evaluates the model at :math:`\tilde x_{i+1}` and corrects the step with that evaluation (order
    :math:`k + 1`); the evaluation is then reused as :math:`P_0` of the next step, so the corrector is free.
    Formulas and coefficients: module docstring and :func:`unipc_coefficients`. With
    :math:`\hat x_0 = (x + s^2\nabla\log p_t)/m` (``data``) or :math:`\hat\epsilon = -s\nabla\log p_t` (``noise``),

    .. math::  \tilde x_{i+1} = a_i x_i + \sum_{j<k} w_{ij} P_{i-j}, \qquad
               x_{i+1} = a_i x_i + \sum_{j<k} v_{ij} P_{i-j} + v_{iK}\,P(\tilde x_{i+1}, t_{i+1}).

    Parameters
    ----------
    order : {1, 2, 3, 4}
        Order :math:`k` of the predictor (default 3); the corrected step has order :math:`k + 1`. The first
        steps use lower orders while the history fills.
    variant : {"bh2", "bh1"}
        :math:`B(h) = e^{h} - 1` (default; better for unconditional sampling) or :math:`B(h) = h` (UniPC's
        choice for guided sampling at very few steps).
    prediction : {"data", "noise"}
        Expand :math:`\hat x_0` (default) or :math:`\hat\epsilon`.
    corrector : bool
        Apply UniC (default). ``False`` gives the predictor UniP alone (order :math:`k`, same NFE).
    lower_order_final : bool
        On grids of fewer than 15 steps, lower the order of the last steps to ``N - i`` (as ``dpm_solver``).

    Notes
    -----
    NFE: ``steps`` (the last step needs no corrector evaluation). Needs a :class:`~sdediff.LinearSDE`; the
    ``time_grid="log_snr"`` grid suits it. The state carried from step to step is the predictor
    :math:`\tilde x_i` (the point the model is evaluated at), with the corrections folded into its weights
    (:func:`predictor_form`): one combination of the history per step. The corrected :math:`x_{i+1}` is formed
    only when a callback or a kept trajectory shows it; the final sample is the same either way.
    """

    ORDERS = (1, 2, 3, 4)
    VARIANTS = ("bh2", "bh1")
    PREDICTIONS = ("data", "noise")

    def __init__(self, order: int = 3, variant: str = "bh2", prediction: str = "data", corrector: bool = True,
                 lower_order_final: bool = True) -> None:
        self.order = check_choice("order", order, self.ORDERS)
        self.variant = check_choice("variant", variant, self.VARIANTS)
        self.prediction = check_choice("prediction", prediction, self.PREDICTIONS)
        self.corrector = check_bool("corrector", corrector)
        self.lower_order_final = check_bool("lower_order_final", lower_order_final)

    def coefficients(self, sde: LinearSDE, ts: Tensor) -> LinearScheme:
        r"""The predictor and corrector weights of :func:`unipc_coefficients`, in the predictor form of
        :func:`predictor_form`: rows :math:`\tilde x_{i+1} = a_i\tilde x_i + \sum_j u_{ij} P_{i-j}`, reporting
        :math:`x_{i+1} = \tilde x_{i+1} + \sum_j d_{ij} P_{i+1-j}`."""
        t = ts.to("cpu", torch.float64)  # a few hundred tiny solves: cheaper on the host, once per grid
        m, s, lam = kernel(sde, t)
        a, w, v = unipc_coefficients(lam, m, s, self.order, self.prediction, self.variant, self.lower_order_final)
        u, d = predictor_form(a, w, v, self.corrector)
        p, q = prediction_coefficients(self.prediction, m[:-1], s[:-1])
        return LinearScheme(times=t[:-1], a=a + u[:, 0] * p, b=u[:, 0] * q, w=u[:, 1:], p=p, q=q,
                            report=d if bool((d != 0).any()) else None)


def predictor_form(a: Tensor, w: Tensor, v: Tensor, corrector: bool = True) -> tuple[Tensor, Tensor]:
    r"""UniPC's weights rewritten for the predictor :math:`\tilde x_i` as the carried state.

    With the corrected state :math:`x_i = \tilde x_i + \delta_i`, where
    :math:`\delta_{i+1} = \sum_{j<K} (v_{ij} - w_{ij}) P_{i-j} + v_{iK} P_{i+1}` (the corrector minus the predictor,
    which share :math:`a_i x_i`) and :math:`\delta_0 = 0`, the predictor of step ``i`` is

    .. math::  \tilde x_{i+1} = a_i\tilde x_i + a_i\delta_i + \sum_{j<K} w_{ij} P_{i-j}
               = a_i\tilde x_i + \sum_{j\le K} u_{ij} P_{i-j},

    a linear multistep formula over ``K + 1`` predictions: the model is evaluated at :math:`\tilde x_i` anyway,
    so a run that shows no intermediate state never forms :math:`x_i`, which saves a combination of the
    history per step (the final step has no corrector, so the result is the same). Returns ``(u, d)``: ``u``
    ``(N, K + 1)`` as above, and ``d`` ``(N, K + 1)`` with :math:`x_{i+1} = \tilde x_{i+1} + d_{i0} P_{i+1} +
    \sum_{j\ge1} d_{ij} P_{i+1-j}` (zero on the last step and without the corrector).
    """
    n, k = w.shape
    if not corrector:
        v = torch.cat([w, torch.zeros_like(w[:, :1])], dim=1)  # the corrected state is the predictor's
    v = v.clone()
    v[-1] = torch.cat([w[-1], torch.zeros_like(w[-1, :1])])  # the last step is not corrected
    d = torch.cat([v[:, k:], v[:, :k] - w], dim=1)  # on P_{i+1}, P_i, ..., P_{i-K+1}
    u = torch.cat([w, torch.zeros_like(w[:, :1])], dim=1)
    u[1:] += a[1:, None] * d[:-1]  # delta_i, made at step i - 1, carried through a_i
    return u, d
