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

All solvers here need only :math:`m(t)` and :math:`s(t)` (any :class:`~sdediff.LinearSDE`), work on any time
grid, precompute their per-grid coefficients once in ``start`` (in float64 where the device has it), and make
no host synchronisation in ``step``.

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

import functools
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._utils import randn_like
from ..sdes.linear import require_linear
from .base import Context, FixedStepSolver, register_solver

__all__ = ["DPMSolver", "DDIM", "LMS", "EDMHeun", "phi_terms", "adams_bashforth_weights"]


# --- shared helpers ---------------------------------------------------------------------------------
def _work_dtype(device: torch.device) -> torch.dtype:
    """float64 for the per-grid coefficients, except where the device has none (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _kernel(sde: Any, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(m, s, lambda)`` at the times ``t``, with :math:`\lambda = \log m - \log s`."""
    m, s = sde.mean_coeff(t), sde.marginal_std(t)
    return m, s, m.log() - s.log()


def phi_terms(z: Tensor, k: int) -> Tensor:
    r""":math:`\psi_j(z) = z^j\varphi_j(z) = e^z - \sum_{n<j} z^n/n!` for :math:`j = 1..k`, stacked on a new last axis.

    The closed form loses relative accuracy as :math:`z \to 0` (cancellation), so for :math:`|z| < 1/2`
    the series :math:`\sum_{n\ge j} z^n/n!` (20 terms, to float64 precision) is used instead.
    """
    small = z.abs() < 0.5
    zs = torch.where(small, z, torch.zeros_like(z))
    inv_fact = torch.tensor([1.0 / math.factorial(n) for n in range(k + 21)], dtype=z.dtype, device=z.device)
    powers = torch.arange(k + 21, dtype=z.dtype, device=z.device)
    terms = zs[..., None] ** powers * inv_fact  # z^n/n!, n = 0..k+20, for the series (small z only)
    series = torch.stack([terms[..., j:j + 21].flip(-1).sum(-1) for j in range(1, k + 1)], dim=-1)  # n = j..j+20
    head = (z[..., None] ** powers[1:k] * inv_fact[1:k]).cumsum(-1)  # sum_{n=1}^{j-1} z^n/n!, j = 2..k
    closed = torch.expm1(z)[..., None] - torch.cat([torch.zeros_like(z)[..., None], head], dim=-1)
    return torch.where(small[..., None], series, closed)


def _exp_coefficients(prediction: str, start: tuple[Tensor, Tensor, Tensor], end: tuple[Tensor, Tensor, Tensor],
                      k: int) -> tuple[Tensor, Tensor]:
    r"""Coefficients of the exponential-integrator step from ``start = (m_s, s_s, lambda_s)`` to ``end``.

    Returns ``(a, c)`` with :math:`x_t = a\,x_s + \sum_j c_{j}\,P^{(j)}(\lambda_s)` for the prediction
    :math:`P` and its first ``k - 1`` derivatives in :math:`\lambda`:

    - data: :math:`a = s_t/s_s`, :math:`c_j = m_t h^{j+1}\varphi_{j+1}(-h) = -m_t\,\psi_{j+1}(-h)\,(-1)^{j}`,
    - noise: :math:`a = m_t/m_s`, :math:`c_j = -s_t h^{j+1}\varphi_{j+1}(h) = -s_t\,\psi_{j+1}(h)`.

    ``c`` has a last axis of length ``k``.
    """
    (m_s, s_s, lam_s), (m_t, s_t, lam_t) = start, end
    h = lam_t - lam_s
    if prediction == "data":
        signs = torch.tensor([(-1.0) ** (j + 1) for j in range(k)], dtype=h.dtype, device=h.device)
        return s_t / s_s, m_t[..., None] * signs * phi_terms(-h, k)
    return m_t / m_s, -s_t[..., None] * phi_terms(h, k)


def _check_choice(option: str, value: Any, allowed: tuple[Any, ...]) -> Any:
    if type(value) is not type(allowed[0]) or value not in allowed:  # no bools or floats for an int option
        raise ValueError(f"{option} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def _check_nonneg(option: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{option} must be a finite float >= 0, got {value!r}")
    return float(value)


def _tick(ctx: Context) -> int:
    """The index of the grid step being taken (a host-side counter reset in ``start``)."""
    i = ctx.state["i"]
    ctx.state["i"] = i + 1
    return i


def _noise_pred(ctx: Context, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
    r""":math:`\hat\epsilon = -s\,\nabla\log p_t(x)` (one score evaluation)."""
    return -s * ctx.score(x, t)


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
    i + 1)`` at step ``i``).

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
    lower_order_final : bool
        Multistep only: on grids of fewer than 15 steps, use order ``min(order, N - i)`` for the last
        steps (standard practice; it makes few-step sampling more stable). With 15 steps or more it has no
        effect, so the asymptotic order is kept.

    Notes
    -----
    NFE: ``steps`` (multistep) or ``order * steps`` (singlestep). Needs a :class:`~sdediff.LinearSDE`.
    The grid ``time_grid="log_snr"`` (uniform :math:`h`) suits these solvers best.
    """

    ORDERS = (1, 2, 3)
    METHODS = ("multistep", "singlestep")
    PREDICTIONS = ("data", "noise")
    #: grids shorter than this use lower orders on their final steps when ``lower_order_final``
    LOWER_ORDER_FINAL_BELOW = 15

    def __init__(self, order: int = 2, method: str = "multistep", prediction: str = "data",
                 lower_order_final: bool = True) -> None:
        self.order = _check_choice("order", order, self.ORDERS)
        self.method = _check_choice("method", method, self.METHODS)
        self.prediction = _check_choice("prediction", prediction, self.PREDICTIONS)
        if not isinstance(lower_order_final, bool):
            raise ValueError(f"lower_order_final must be True or False, got {lower_order_final!r}")
        self.lower_order_final = lower_order_final

    def start(self, ctx: Context, x: Tensor, ts: Tensor) -> None:
        sde = require_linear(ctx.sde, f"solver {self.name!r}")
        wd = _work_dtype(ts.device)
        t64 = ts.to(wd)
        m, s, lam = _kernel(sde, t64)
        a, c = _exp_coefficients(self.prediction, (m[:-1], s[:-1], lam[:-1]), (m[1:], s[1:], lam[1:]), self.order)
        h = lam[1:] - lam[:-1]
        st: dict[str, Any] = {"i": 0, "n": len(ts) - 1, "history": [], "h": h, "a": a, "c": c}
        if self.method == "singlestep" and self.order > 1:
            fractions = (0.5,) if self.order == 2 else (1 / 3, 2 / 3)
            for j, r in enumerate(fractions, start=1):
                t_r = sde.time_of_log_snr(2 * (lam[:-1] + r * h), t64[1:], t64[:-1])
                m_r, s_r, lam_r = _kernel(sde, t_r)
                st[f"t{j}"], st[f"m{j}"], st[f"s{j}"] = t_r, m_r, s_r
                st[f"a{j}"], st[f"c{j}"] = _exp_coefficients(self.prediction, (m[:-1], s[:-1], lam[:-1]),
                                                             (m_r, s_r, lam_r), j)
                st[f"r{j}h"] = r * h
        st["predict"] = self._predict_coefficients(m, s)
        if self.method == "multistep":
            st["weights"] = self._multistep_weights(st)
        else:
            st.update(self._singlestep_weights(st))
        rows = ("weights", "predict", "predict1", "predict2", "stage1", "stage2")
        ctx.state.update({key: (v.to(x.dtype) if isinstance(v, Tensor) else v) for key, v in st.items()})
        for key in rows:  # rows of 0-d tensors, so that a step only indexes Python lists
            if key in ctx.state:
                ctx.state[key] = [row.unbind() for row in ctx.state[key]]
        if self.method == "singlestep":  # scratch for the stages: P_0, P_1 (then P_2), the stage input u
            ctx.state.update(p0=torch.empty_like(x), p1=torch.empty_like(x), u=torch.empty_like(x))

    def _predict_coefficients(self, m: Tensor, s: Tensor) -> Tensor:
        r"""Per time, ``(c_x, c_s)`` with :math:`P = c_x x + c_s \nabla\log p_t(x)`: :math:`(1/m, s^2/m)` for
        :math:`\hat x_0`, :math:`(0, -s)` for :math:`\hat\epsilon`."""
        return torch.stack([1 / m, s**2 / m] if self.prediction == "data" else [0 * s, -s], dim=1)

    def _singlestep_weights(self, st: dict[str, Any]) -> dict[str, Tensor]:
        r"""The singlestep stages of :meth:`step`'s docstring, multiplied out into weights on :math:`x, P_0, P_j`.

        ``stage1`` is :math:`(a^{(1)}, c^{(1)}_1)` for :math:`u_1`; for order 3, ``stage2`` is
        :math:`(a^{(2)}, c^{(2)}_1 - c^{(2)}_2/(r_1h), c^{(2)}_2/(r_1h))` for :math:`u_2`; ``weights`` is
        :math:`(a, c_1 - c_2/(r_kh), c_2/(r_kh))` on :math:`(x, P_0, P_k)` with :math:`k` the last stage
        (order 1: :math:`(a, c_1, 0)`).
        """
        a, c, out = st["a"], st["c"], {}
        if self.order == 1:
            out["weights"] = torch.stack([a, c[:, 0], 0 * a], dim=1)
            return out
        out["stage1"] = torch.stack([st["a1"], st["c1"][:, 0]], dim=1)
        out["predict1"] = self._predict_coefficients(st["m1"], st["s1"])
        if self.order == 3:
            d = st["c2"][:, 1] / st["r1h"]
            out["stage2"] = torch.stack([st["a2"], st["c2"][:, 0] - d, d], dim=1)
            out["predict2"] = self._predict_coefficients(st["m2"], st["s2"])
        w = c[:, 1] / st[f"r{self.order - 1}h"]
        out["weights"] = torch.stack([a, c[:, 0] - w, w], dim=1)
        return out

    def _multistep_weights(self, st: dict[str, Any]) -> Tensor:
        r"""Per step, ``(a, w_0, w_1, w_2)`` with :math:`x_t = a\,x_s + w_0 P_0 + w_1 P_{-1} + w_2 P_{-2}`.

        The divided differences of :meth:`step`'s docstring, multiplied out: order 1 has :math:`w_0 = c_1`;
        order 2 :math:`w_0 = c_1 + c_2/h_1`, :math:`w_1 = -c_2/h_1`; order 3, with
        :math:`e = (c_2 h_1 + 2c_3)/(h_1 + h_2)`, :math:`w_0 = c_1 + (c_2 + e)/h_1`,
        :math:`w_1 = -(c_2 + e)/h_1 - e/h_2`, :math:`w_2 = e/h_2`.
        """
        a, c, h, n = st["a"], st["c"], st["h"], st["n"]
        order = torch.tensor([self._order_at(i, n) for i in range(n)], device=a.device)[:, None]
        one = torch.ones_like(h[:1])
        h1, h2 = torch.cat([one, h[:-1]]), torch.cat([one, one, h[:-2]])[:n]  # h_{i-1}, h_{i-2} (1 where unused)
        c1, c2, c3 = (c[:, j] if j < c.shape[1] else torch.zeros_like(a) for j in range(3))
        e = (c2 * h1 + 2 * c3) / (h1 + h2)
        zero = torch.zeros_like(a)
        w2 = torch.stack([a, c1 + c2 / h1, -c2 / h1, zero], dim=1)
        w3 = torch.stack([a, c1 + (c2 + e) / h1, -(c2 + e) / h1 - e / h2, e / h2], dim=1)
        return torch.where(order == 1, torch.stack([a, c1, zero, zero], dim=1), torch.where(order == 2, w2, w3))

    def _predict(self, ctx: Context, x: Tensor, t: Tensor, coef: tuple[Tensor, Tensor], out: Tensor) -> Tensor:
        r""":math:`P = \hat x_0 = (x + s^2\nabla\log p_t)/m` or :math:`\hat\epsilon = -s\nabla\log p_t` (one NFE),
        written into ``out`` from the coefficients ``coef = (c_x, c_s)`` of :meth:`_predict_coefficients`."""
        score = ctx.score(x, t)
        if self.prediction == "data":
            return torch.mul(x, coef[0], out=out).addcmul_(coef[1], score)
        return torch.mul(score, coef[1], out=out)

    def _order_at(self, i: int, n: int) -> int:
        order = min(self.order, i + 1)
        if self.lower_order_final and n < self.LOWER_ORDER_FINAL_BELOW:
            order = min(order, n - i)
        return order

    def step(self, ctx: Context, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        st, i = ctx.state, _tick(ctx)
        if self.method == "singlestep":
            return self._singlestep(ctx, x, t, i)
        # multistep: P_0 into the buffer of the oldest prediction, then x_t = a x + sum_j w_j P_{-j} (weights
        # precomputed in start by _multistep_weights)
        hist = st["history"]
        p0 = hist.pop() if len(hist) == self.order else torch.empty_like(x)
        hist.insert(0, self._predict(ctx, x, t, st["predict"][i], p0))
        w, order = st["weights"][i], self._order_at(i, st["n"])
        out = torch.mul(x, w[0], out=ctx.buffer(x, inplace=True))
        for j in range(order):
            out.addcmul_(w[j + 1], hist[j])
        return out

    def _singlestep(self, ctx: Context, x: Tensor, t: Tensor, i: int) -> Tensor:
        st = ctx.state
        p0 = self._predict(ctx, x, t, st["predict"][i], st["p0"])
        w = st["weights"][i]
        if self.order == 1:
            return torch.mul(x, w[0], out=ctx.buffer(x, inplace=True)).addcmul_(w[1], p0)
        a1, c1 = st["stage1"][i]
        u = torch.mul(x, a1, out=st["u"]).addcmul_(c1, p0)
        p = self._predict(ctx, u, st["t1"][i], st["predict1"][i], st["p1"])
        if self.order == 3:  # u_2 from (x, P_0, P_1), then P_2 into P_1's buffer
            a2, v0, v1 = st["stage2"][i]
            u = torch.mul(x, a2, out=st["u"]).addcmul_(v0, p0).addcmul_(v1, p)
            p = self._predict(ctx, u, st["t2"][i], st["predict2"][i], st["p1"])
        return torch.mul(x, w[0], out=ctx.buffer(x, inplace=True)).addcmul_(w[1], p0).addcmul_(w[2], p)


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
        self.eta = _check_nonneg("eta", eta)

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        """Whether the solver draws noise (``eta > 0``)."""
        return self.eta > 0

    def start(self, ctx: Context, x: Tensor, ts: Tensor) -> None:
        sde = require_linear(ctx.sde, f"solver {self.name!r}")
        m, s, lam = _kernel(sde, ts.to(_work_dtype(ts.device)))
        h = lam[1:] - lam[:-1]
        sigma = torch.minimum(self.eta * s[1:] * (-torch.expm1(-2 * h)).sqrt(), s[1:])
        keep = (s[1:] ** 2 - sigma**2).clamp_min(0).sqrt()  # sqrt(s_t^2 - sigma^2), the share of eps_hat kept
        # x_t = m_t x0 + keep eps + sigma z with x0 = (x + s^2 score)/m, eps = -s score, multiplied out
        a, b = m[1:] / m[:-1], m[1:] / m[:-1] * s[:-1] ** 2 - keep * s[:-1]
        # per step as 0-d tensors in Python tuples: a step indexes a tuple, not a tensor
        ctx.state.update({"i": 0, **{k: v.to(x.dtype).unbind() for k, v in dict(a=a, b=b, sigma=sigma).items()}})

    def step(self, ctx: Context, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        r""":math:`x_t = \frac{m_t}{m_s}x + \big(\frac{m_t}{m_s}s_s^2 - \sqrt{s_t^2 - \sigma^2}\,s_s\big)\nabla\log p_s(x)
        + \sigma z`, the step above with :math:`\hat x_0, \hat\epsilon` written in the score."""
        st, i = ctx.state, _tick(ctx)
        score = ctx.score(x, t)
        out = torch.mul(x, st["a"][i], out=ctx.buffer(x, inplace=True)).addcmul_(st["b"][i], score)
        return out if self.eta == 0 else out.addcmul_(st["sigma"][i], ctx.noise(x))


# --- linear multistep in sigma ----------------------------------------------------------------------
@functools.cache
def _gauss_legendre(points: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(points)


def adams_bashforth_weights(sigma: Tensor, order: int) -> Tensor:
    r"""Variable-step Adams–Bashforth weights on the grid ``sigma`` (any device), shape ``(N, order)``.

    Row ``i`` holds :math:`b_{ij} = \int_{\sigma_i}^{\sigma_{i+1}} L_{ij}(\sigma)\,d\sigma`, with :math:`L_{ij}`
    the Lagrange basis polynomials on the nodes :math:`\sigma_i, \sigma_{i-1}, \dots, \sigma_{i-k+1}`,
    :math:`k = \min(\text{order}, i + 1)` (columns ``j >= k`` are zero). The integrals are exact:
    Gauss–Legendre quadrature with ``order`` points integrates the degree ``k - 1`` polynomials exactly.
    All steps at once: :math:`L_{ij}(q) = \prod_{l \ne j,\ l < k} (q - \sigma_{i-l}) / (\sigma_{i-j} - \sigma_{i-l})`.
    """
    n = len(sigma) - 1
    u, w = (torch.from_numpy(v).to(sigma) for v in _gauss_legendre(order))
    half = 0.5 * (sigma[1:] - sigma[:-1])
    q = (0.5 * (sigma[1:] + sigma[:-1]))[:, None] + half[:, None] * u  # (N, order) quadrature nodes per step
    cols = torch.arange(order, device=sigma.device)
    back = torch.arange(n, device=sigma.device)[:, None] - cols  # (N, order): i, i - 1, .., i - order + 1
    used = back >= 0  # step i has nodes j < k = min(order, i + 1)
    nodes = sigma[back.clamp(min=0)]
    factor = used[:, None, :] & (cols[:, None] != cols[None, :])  # (N, j, l): l is a factor of L_ij
    num = torch.where(factor[..., None], q[:, None, None, :] - nodes[:, None, :, None], 1.0)  # (N, j, l, order)
    den = torch.where(factor, nodes[:, :, None] - nodes[:, None, :], 1.0)
    basis = (num / den[..., None]).prod(2)  # (N, j, order): L_ij at the quadrature nodes
    return torch.where(used, half[:, None] * (basis * w).sum(-1), 0.0)


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
        self.order = _check_choice("order", order, self.ORDERS)

    def start(self, ctx: Context, x: Tensor, ts: Tensor) -> None:
        sde = require_linear(ctx.sde, f"solver {self.name!r}")
        m, s, _ = _kernel(sde, ts.to(_work_dtype(ts.device)))
        b = adams_bashforth_weights(s / m, self.order)
        # x_{i+1} = m_{i+1} y_{i+1} = (m_{i+1}/m_i) x_i + sum_j m_{i+1} b_ij d_{i-j}
        ctx.state.update({"i": 0, "history": [], "neg_s": (-s).to(x.dtype).unbind(), "a": (m[1:] / m[:-1]).to(x.dtype).unbind(),
                          "w": [row.unbind() for row in (m[1:, None] * b).to(x.dtype)]})  # 0-d tensors in lists

    def step(self, ctx: Context, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        st, i = ctx.state, _tick(ctx)
        hist = st["history"]  # d_i = dy/dsigma = eps_hat, newest first, in buffers reused as they age out
        d = hist.pop() if len(hist) == self.order else torch.empty_like(x)
        hist.insert(0, torch.mul(ctx.score(x, t), st["neg_s"][i], out=d))
        out = torch.mul(x, st["a"][i], out=ctx.buffer(x, inplace=True))
        for w, d in zip(st["w"][i], hist, strict=False):
            out.addcmul_(w, d)
        return out


# --- EDM Heun ---------------------------------------------------------------------------------------
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
        self.churn = _check_nonneg("churn", churn)
        self.s_tmin = _check_nonneg("s_tmin", s_tmin)
        if isinstance(s_tmax, bool) or not isinstance(s_tmax, (int, float)) or math.isnan(s_tmax) or s_tmax < s_tmin:
            raise ValueError(f"s_tmax must be a float >= s_tmin={s_tmin} (inf allowed), got {s_tmax!r}")
        self.s_tmax = float(s_tmax)
        self.s_noise = _check_nonneg("s_noise", s_noise)

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        """Whether the solver draws noise (``churn > 0``)."""
        return self.churn > 0

    def start(self, ctx: Context, x: Tensor, ts: Tensor) -> None:
        sde = require_linear(ctx.sde, f"solver {self.name!r}")
        t64 = ts.to(_work_dtype(ts.device))
        m, s, _ = _kernel(sde, t64)
        st = {"m": m, "s": s, "sigma": s / m}
        if self.churn > 0:
            sigma = st["sigma"][:-1]
            t_max = torch.full_like(t64[:1], sde.T)
            sigma_max = (sde.marginal_std(t_max) / sde.mean_coeff(t_max))[0]
            inside = (sigma >= self.s_tmin) & (sigma <= self.s_tmax)
            gamma = inside.to(sigma.dtype) * min(self.churn / (len(ts) - 1), math.sqrt(2) - 1)
            sigma_hat = torch.minimum(sigma * (1 + gamma), torch.maximum(sigma_max, sigma))
            t_hat = sde.time_of_log_snr(-2 * sigma_hat.log(), t64[:-1])
            t_hat = torch.where(sigma_hat > sigma, t_hat, t64[:-1])
            m_hat, s_hat, _ = _kernel(sde, t_hat)
            sigma_hat = s_hat / m_hat
            noise = self.s_noise * (sigma_hat**2 - sigma**2).clamp_min(0).sqrt()
            st.update(t_hat=t_hat, m_hat=m_hat, s_hat=s_hat, sigma_hat=sigma_hat, noise=noise)
        else:
            # with d = -s score: x_euler = A x + B score(x, t), x_{i+1} = A/2 x + x_euler/2 + C score(x_euler, t_next)
            m_next, dsigma = m[1:], st["sigma"][1:] - st["sigma"][:-1]
            a = m_next / m[:-1]
            heun = torch.stack([a, -m_next * dsigma * s[:-1], -0.5 * m_next * dsigma * s[1:], 0.5 * a], dim=1)
        ctx.state.update({"i": 0, **{k: v.to(x.dtype) for k, v in st.items()}})
        if self.churn == 0:  # per step (A, B, C, A/2) as 0-d tensors: a step indexes a list, not a tensor
            ctx.state.update(heun=[row.unbind() for row in heun.to(x.dtype)], x_euler=torch.empty_like(x))

    def step(self, ctx: Context, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        st, i = ctx.state, _tick(ctx)
        if self.churn == 0:  # the step below, multiplied out in x (coefficients from start)
            a, b, c, half_a = st["heun"][i]
            x_euler = torch.mul(x, a, out=st["x_euler"]).addcmul_(b, ctx.score(x, t))
            score = ctx.score(x_euler, t_next)
            return torch.mul(x, half_a, out=ctx.buffer(x, inplace=True)).add_(x_euler, alpha=0.5).addcmul_(c, score)
        # churn: raise the noise level to sigma_hat, then the Heun step in (sigma, y) from there
        y = x / st["m"][i] + st["noise"][i] * randn_like(x, ctx.generator)
        t, m, s, sigma = st["t_hat"][i], st["m_hat"][i], st["s_hat"][i], st["sigma_hat"][i]
        dsigma = st["sigma"][i + 1] - sigma
        d = _noise_pred(ctx, m * y, t, s)
        y_euler = y + dsigma * d
        d_next = _noise_pred(ctx, st["m"][i + 1] * y_euler, t_next, st["s"][i + 1])
        return st["m"][i + 1] * (y + 0.5 * dsigma * (d + d_next))
