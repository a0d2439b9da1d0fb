r"""Linear solvers as coefficient tables, and the one shared update that runs them.

For a linear SDE (kernel :math:`N(m(t)x_0, s(t)^2 I)`) every solver of the DDIM / DPM-Solver / UniPC /
Adams / ancestral families, and Euler, Heun and Euler–Maruyama, is a sequence of *rows*, one score
evaluation each. Row :math:`r` evaluates the score at the current state and time :math:`\tau_r`, keeps a
prediction (e.g. :math:`\hat x_0` or :math:`\hat\epsilon`) and combines:

.. math::  s_r = s_\theta(x_r, \tau_r), \qquad P_r = p_r\,x_r + q_r\,s_r, \qquad
           x_{r+1} = a_r\,x_r + b_r\,s_r + \sum_{j=1}^{K} w_{rj}\,P_{r-j} + c_r\,z_r .

A solver's :meth:`~sdediff.solvers.FixedStepSolver.coefficients` returns these numbers as a
:class:`LinearScheme`, computed once per grid in float64 by a pure function (unit-tested on its own);
:class:`SchemeRun` is the only code that applies them, and the only place in the solvers where buffers
are reused. Solvers with several evaluations per grid step (Heun, singlestep DPM-Solver) write their
stages relative to the step's start and :func:`rows_from_stages` turns them into rows.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .._utils import work_dtype
from ..processes import ReverseProcess

__all__ = ["LinearScheme", "SchemeRun", "rows_from_stages", "kernel", "work_dtype", "phi_terms", "exp_coefficients",
           "gauss_legendre", "lagrange_basis", "sigma_multistep_scheme"]


def kernel(sde, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(m, s, lambda)`` of a linear SDE at the times ``t``, with :math:`\lambda = \log m - \log s` (half the log-SNR)."""
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


def exp_coefficients(prediction: str, start: tuple[Tensor, Tensor, Tensor], end: tuple[Tensor, Tensor, Tensor],
                     k: int) -> tuple[Tensor, Tensor]:
    r"""The exponential-integrator step from ``start = (m_s, s_s, lambda_s)`` to ``end``, :math:`h = \lambda_t - \lambda_s`.

    Returns ``(a, c)`` with :math:`x_t = a\,x_s + \sum_j c_{j}\,P^{(j)}(\lambda_s)` for the prediction
    :math:`P` and its first ``k - 1`` derivatives in :math:`\lambda` (``c`` has a last axis of length ``k``):

    - data (:math:`P = \hat x_0`): :math:`a = s_t/s_s`, :math:`c_j = m_t h^{j+1}\varphi_{j+1}(-h)`,
    - noise (:math:`P = \hat\epsilon`): :math:`a = m_t/m_s`, :math:`c_j = -s_t h^{j+1}\varphi_{j+1}(h)`.
    """
    (m_s, s_s, lam_s), (m_t, s_t, lam_t) = start, end
    h = lam_t - lam_s
    if prediction == "data":
        signs = torch.tensor([(-1.0) ** (j + 1) for j in range(k)], dtype=h.dtype, device=h.device)
        return s_t / s_s, m_t[..., None] * signs * phi_terms(-h, k)
    return m_t / m_s, -s_t[..., None] * phi_terms(h, k)


@functools.cache
def _gauss_legendre_host(points: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(points)


def gauss_legendre(points: int, like: Tensor) -> tuple[Tensor, Tensor]:
    r"""Gauss–Legendre nodes :math:`u_p \in (-1, 1)` and weights :math:`w_p` (``points`` each, dtype and device of
    ``like``): :math:`\int_a^b f \approx \tfrac{b-a}2\sum_p w_p f(\tfrac{a+b}2 + \tfrac{b-a}2 u_p)`, exact for
    polynomials of degree below ``2 * points``."""
    u, w = _gauss_legendre_host(points)
    return torch.from_numpy(u).to(like), torch.from_numpy(w).to(like)


def lagrange_basis(nodes: Tensor, order: int, q: Tensor) -> Tensor:
    r"""The Lagrange basis of each step's interpolation nodes, evaluated at the points ``q``.

    Step ``i`` interpolates through ``nodes[i], nodes[i-1], ..., nodes[i-k+1]`` with :math:`k = \min(\text{order},
    i + 1)` (a multistep method's history while it fills), and

    .. math::  L_{ij}(q) = \prod_{l \ne j,\ l < k} \frac{q - \text{nodes}_{i-l}}{\text{nodes}_{i-j} - \text{nodes}_{i-l}},
               \qquad j < k.

    ``q`` has shape ``(N, P)`` (``N`` steps, ``P`` points each); returns ``(N, order, P)``, zero for :math:`j \ge k`.
    """
    n = q.shape[0]
    cols = torch.arange(order, device=q.device)
    back = torch.arange(n, device=q.device)[:, None] - cols  # (N, order): i, i - 1, .., i - order + 1
    used = back >= 0  # step i has nodes j < k = min(order, i + 1)
    at = nodes[back.clamp(min=0)]
    factor = used[:, None, :] & (cols[:, None] != cols[None, :])  # (N, j, l): l is a factor of L_ij
    num = torch.where(factor[..., None], q[:, None, None, :] - at[:, None, :, None], 1.0)  # (N, j, l, P)
    den = torch.where(factor, at[:, :, None] - at[:, None, :], 1.0)
    return torch.where(used[..., None], (num / den[..., None]).prod(2), 0.0)


@dataclass(frozen=True)
class LinearScheme:
    r"""A linear solver's coefficients on one grid: ``R`` rows, one score evaluation each (module docstring).

    Attributes
    ----------
    times : Tensor
        ``(R,)`` evaluation times :math:`\tau_r`.
    a, b : Tensor
        ``(R,)`` weights of the state and of its score.
    w : Tensor
        ``(R, K)`` weights of the earlier predictions :math:`P_{r-1}, \dots, P_{r-K}` (``K`` may be 0).
    p, q : Tensor
        ``(R,)`` the prediction kept for later rows, :math:`P_r = p_r x_r + q_r s_r` (unused when ``K = 0``).
    noise : Tensor or None
        ``(R,)`` weight :math:`c_r` of a standard normal draw (``None``: deterministic).
    rows_per_step : int
        Rows per grid step (2 for Heun; a step's inner rows are never reported).
    report : Tensor or None
        ``(R, K + 1)``: where the state a grid step reports differs from the one carried (UniPC carries its
        predictor), :math:`y_{r+1} = x_{r+1} + d_{r0} P_{r+1} + \sum_{j\ge1} d_{rj} P_{r+1-j}`; it is formed only
        when someone sees it (a callback, a trajectory). Zero on the last row.
    """

    times: Tensor
    a: Tensor
    b: Tensor
    w: Tensor
    p: Tensor
    q: Tensor
    noise: Tensor | None = None
    rows_per_step: int = 1
    report: Tensor | None = None

    @classmethod
    def one_step(cls, times: Tensor, a: Tensor, b: Tensor, noise: Tensor | None = None) -> LinearScheme:
        r"""The scheme :math:`x_{i+1} = a_i x_i + b_i s_\theta(x_i, t_i) + c_i z` (no history), on grid times ``times[:-1]``."""
        zero = torch.zeros_like(a)
        return cls(times=times[:-1], a=a, b=b, w=a.new_zeros((len(a), 0)), p=zero, q=zero, noise=noise)


def rows_from_stages(times: Tensor, alpha: Tensor, beta: Tensor, p: Tensor, q: Tensor) -> LinearScheme:
    r"""Rows of a scheme with ``S`` evaluations per grid step, given relative to the step's start :math:`x_i`.

    Stage :math:`k` evaluates at :math:`u_k = \alpha_k x_i + \sum_{j<k}\beta_{kj} P^{(j)}` (with
    :math:`\alpha_0 = 1`), time ``times[:, k]``, and keeps :math:`P^{(k)} = p_k u_k + q_k s_\theta(u_k)`; the step ends at
    :math:`x_{i+1} = \alpha_S x_i + \sum_{j<S}\beta_{Sj} P^{(j)}`. Shapes: ``times``, ``p``, ``q`` ``(N, S)``,
    ``alpha`` ``(N, S + 1)``, ``beta`` ``(N, S + 1, S)``. Writing :math:`x_i = (u_k - \sum_{j<k}\beta_{kj}P^{(j)})/\alpha_k`,

    .. math::  u_{k+1} = \frac{\alpha_{k+1}}{\alpha_k}u_k
               + \sum_{j<k}\Big(\beta_{k+1,j} - \frac{\alpha_{k+1}}{\alpha_k}\beta_{kj}\Big)P^{(j)} + \beta_{k+1,k}P^{(k)},

    one row per stage with the current prediction folded into :math:`a, b`. Needs :math:`\alpha_k \neq 0`
    (the caller checks it is far from 0).
    """
    n, stages = times.shape
    ratio = alpha[:, 1:] / alpha[:, :-1]  # (N, S)
    a, b = torch.empty_like(p), torch.empty_like(p)
    w = p.new_zeros((n, stages, max(stages - 1, 0)))
    for k in range(stages):
        new = beta[:, k + 1, k]  # weight of P^(k), the current row's prediction
        a[:, k], b[:, k] = ratio[:, k] + new * p[:, k], new * q[:, k]
        for j in range(k):  # P^(j) is P_{r - (k - j)}: column k - j - 1
            w[:, k, k - j - 1] = beta[:, k + 1, j] - ratio[:, k] * beta[:, k, j]
    return LinearScheme(times=times.reshape(-1), a=a.reshape(-1), b=b.reshape(-1), w=w.reshape(n * stages, -1),
                        p=p.reshape(-1), q=q.reshape(-1), rows_per_step=stages)


def sigma_multistep_scheme(times: Tensor, m: Tensor, s: Tensor, weights: Tensor) -> LinearScheme:
    r"""A linear multistep method on the probability flow in EDM form, as a scheme.

    In :math:`\sigma = s/m`, :math:`y = x/m` the flow is :math:`dy/d\sigma = \hat\epsilon` (:math:`\hat\epsilon = -s\,\nabla\log
    p_t`); the method :math:`y_{i+1} = y_i + \sum_j b_{ij}\,\hat\epsilon_{i-j}` is, in ``x``,

    .. math::  x_{i+1} = \frac{m_{i+1}}{m_i}\,x_i + m_{i+1}\sum_{j} b_{ij}\,\hat\epsilon_{i-j},

    with the kept prediction :math:`P_i = \hat\epsilon_i`. ``times``, ``m``, ``s``: the grid and its kernel (``N + 1``
    values); ``weights``: :math:`b_{ij}`, shape ``(N, K)``.
    """
    w = m[1:, None] * weights
    zero = torch.zeros_like(s[:-1])
    return LinearScheme(times=times[:-1], a=m[1:] / m[:-1], b=-w[:, 0] * s[:-1], w=w[:, 1:], p=zero, q=-s[:-1])


class SchemeRun:
    r"""Runs a :class:`LinearScheme`: the one shared update of the linear solvers.

    Each row makes one score evaluation and at most ``2 + K`` passes over the state (the prediction, when
    a later row needs it, and the combination). Without observers the update writes into the state
    itself when the state is one of this run's own buffers (and the score does not share its memory),
    else into a second buffer; the predictions go into a ring of ``K + 1`` buffers, so a run allocates
    nothing per step, and the caller's start state is never written. With ``observed`` (a callback or a
    trajectory sees the states) every reported state is a new tensor, which the observer may keep. The
    coefficients stay in one float64 table on the host, read a row at a time as Python numbers (the
    first factor of each product also as a 0-d tensor on the state's device, which PyTorch multiplies
    faster than a Python number): a row makes no host synchronisation, and memory grows with the number
    of steps only by the table's few numbers per row (plus three small integers per row, in numpy arrays:
    no Python object per step).
    """

    def __init__(self, scheme: LinearScheme, x: Tensor, observed: bool = True) -> None:
        self.observed, self.row = observed, 0
        self.rows_per_step = scheme.rows_per_step
        n, k = scheme.w.shape
        self.history_len = k
        zero = torch.zeros_like(scheme.a)
        report = scheme.report if scheme.report is not None else scheme.w.new_zeros((n, 0))
        columns = [scheme.a, scheme.b, zero if scheme.noise is None else scheme.noise, scheme.p, scheme.q]
        self.table = torch.cat([torch.stack(columns, 1), scheme.w, report], 1).detach().to("cpu", torch.float64).numpy()
        self.a, self.p, self.q = (v.to(device=x.device, dtype=x.dtype) for v in (scheme.a, scheme.p, scheme.q))
        self.times = scheme.times.to(device=x.device, dtype=x.dtype)[:, None].expand(n, x.shape[0])
        host_w, d = scheme.w.detach().cpu().numpy(), report.detach().cpu().numpy()
        self.width = ((host_w != 0) * np.arange(1, k + 1)).max(1, initial=0).astype(np.int16)  # history columns a row uses
        self.report_width = ((d != 0) * np.arange(1, d.shape[1] + 1)).max(1, initial=0).astype(np.int16)
        if scheme.report is None:
            self.keep = np.zeros(n, dtype=bool)  # P_r is needed when a later row weighs it
            for j in range(1, k + 1):
                self.keep[:n - j] |= host_w[j:, j - 1] != 0
        else:  # a reporting scheme keeps every prediction
            self.keep = np.ones(n, dtype=bool)
        self.stochastic = scheme.noise is not None
        self.score_only = bool((scheme.p == 0).all())  # P_r = q_r s_r: one pass instead of two
        self.history: list[Tensor | None] = []  # P_{r-1}, P_{r-2}, ... newest first (None: not kept)
        self.spare: list[Tensor] = []  # prediction buffers no longer needed
        self.buffers: list[Tensor] = []  # the run's own state buffers (at most two)
        self.pending: Tensor | None = None  # a score evaluated early, at the state of the next row
        self.carried: Tensor | None = None  # the carried state, where the reported one differs
        self.reported: Tensor | None = None

    def advance(self, process: ReverseProcess, x: Tensor, ts: Tensor, i: int) -> Tensor:
        """Take grid step ``i`` (``rows_per_step`` rows) from ``x``; the scheme holds its own times."""
        if self.carried is not None and x is self.reported:
            x = self.carried  # continue from the carried state, not from the reported one
        self.carried = self.reported = None
        for _ in range(self.rows_per_step):
            x = self._row(process, x)
        r = self.row - 1
        if not (self.observed and self.report_width[r]):
            return x
        self.pending = process.score(x, self.times[r + 1])  # P_{r+1}, which the report needs, is evaluated now
        self._keep_prediction(x, self.pending, r + 1, self.table[r + 1].tolist())
        d = self.table[r].tolist()[5 + self.history_len:]
        y = torch.mul(self.history[0], d[0])
        for j in range(1, self.report_width[r]):
            y.add_(self.history[j], alpha=d[j])
        self.carried, self.reported = x, y.add_(x)
        return self.reported

    def _keep_prediction(self, x: Tensor, score: Tensor, r: int, coef: list[float]) -> None:
        """Form :math:`P_r = p_r x + q_r s_r` into a free buffer (where a later row needs it) and put it first
        in the history (``coef``: row ``r`` of the table)."""
        out = None
        if self.keep[r]:
            out = self.spare.pop() if self.spare else torch.empty_like(x)
            if self.score_only:
                torch.mul(score, self.q[r], out=out)
            else:
                torch.mul(x, self.p[r], out=out).add_(score, alpha=coef[4])
        self.history.insert(0, out)
        if len(self.history) > self.history_len + 1:
            oldest = self.history.pop()
            if oldest is not None:
                self.spare.append(oldest)

    def _row(self, process: ReverseProcess, x: Tensor) -> Tensor:
        r = self.row
        coef = self.table[r].tolist()  # a, b, c, p, q, w_1..w_K, d_0..d_K
        if self.pending is not None:
            score, self.pending = self.pending, None
        else:
            score = process.score(x, self.times[r])
            self._keep_prediction(x, score, r, coef)
        self.row = r + 1
        last = r % self.rows_per_step == self.rows_per_step - 1
        out = None if (self.observed and last) else self._target(x, score)
        out = torch.mul(x, self.a[r], out=out).add_(score, alpha=coef[1])
        for j in range(self.width[r]):
            out.add_(self.history[j + 1], alpha=coef[5 + j])
        if self.stochastic:
            out.add_(process.noise(x), alpha=coef[2])
        return out

    def _target(self, x: Tensor, score: Tensor) -> Tensor:
        """Where row's new state goes: ``x`` itself when it is one of this run's buffers (nobody else holds it,
        and the update reads each element once) unless the score shares its memory, else the other buffer."""
        own = any(x is b for b in self.buffers)
        if own and score.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
            return x
        free = [b for b in self.buffers if b is not x]
        if not free:
            self.buffers.append(torch.empty_like(x))
            free = self.buffers[-1:]
        return free[0]
