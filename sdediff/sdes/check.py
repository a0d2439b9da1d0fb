r"""A numerical check that a forward SDE's drift and diffusion agree with the marginal and prior it declares.

Solvers read different parts of an SDE: ``euler_maruyama``, ``heun``, ``ode`` and the likelihood integrate the
drift :math:`f` and the diffusion :math:`g`; ``ddim``, ``dpm_solver``, the score conversions and the training
losses use the kernel :math:`N(m(t) x_0, s(t)^2 I)` (``mean_coeff``, ``marginal_std``, ``marginal``); every
sampler starts from the prior. Nothing makes a custom SDE keep these consistent, and when they disagree the
solvers sample different distributions without any error. :func:`check_sde` tests the agreement through the
moment equations of the Fokker–Planck equation :math:`\partial_t p = -\nabla\cdot(f p) + \tfrac12 g^2\Delta p`:
for the law of :math:`x_t` started at :math:`x_0`, with mean :math:`\mu(t)` and covariance :math:`\Sigma(t)`,

.. math::  \frac{d\mu}{dt} = E[f(x_t, t)], \qquad
           \frac{d\Sigma}{dt} = E\big[(x_t - \mu) f(x_t, t)^\top + f(x_t, t)(x_t - \mu)^\top\big] + g(t)^2 I.

For a :class:`~sdediff.LinearSDE` (:math:`f = a(t) x`, :math:`\mu = m x_0`, :math:`\Sigma = s^2 I`) they read

.. math::  \frac{d\log m}{dt} = a(t), \qquad \frac{d(s^2)}{dt} = 2a(t)\,s^2 + g(t)^2,

with :math:`m(0) = 1` and :math:`s(0) = s_0` (``initial_std``). The time derivatives of the declared kernel are
taken by autograd on the time argument in float64 or, where the SDE is not differentiable by autograd, by
Richardson-extrapolated finite differences whose own error is estimated (times where that estimate is too large,
such as the knots of a piecewise schedule, are reported as not checked). For an SDE that overrides
``marginal(x0, t)`` the expectations are exact when the drift is linear (a cubature rule on the points
:math:`\mu \pm s\sqrt D e_k`) and Monte Carlo estimates over samples of the declared marginal otherwise, with a
tolerance of ``num_se`` standard errors. The prior is compared with the marginal at :math:`T` (its mean, its
standard deviation and, where that marginal is Gaussian, its log-density); without a Gaussian to compare with,
``prior_sample`` and ``prior_log_prob`` are checked against each other through Stein's identities
:math:`E[\nabla\log p(z)] = 0` and :math:`E[z\cdot\nabla\log p(z)] = -D`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._utils import expand_as, sum_except_batch
from .._validate import check_float, check_int
from .base import SDE, gaussian_log_prob
from .linear import LinearSDE

__all__ = ["check_sde", "SDECheck", "CheckFailure"]

F64 = torch.float64


@dataclass(frozen=True)
class CheckFailure:
    """One quantity on which an SDE disagrees with itself, reported where the disagreement is largest.

    Attributes
    ----------
    quantity : str
        What was compared, e.g. ``"d(s^2)/dt"`` or ``"prior std"``.
    declared, implied : float
        Its value from what the SDE declares (``declared_by``) and from what that should follow
        (``implied_by``: drift and diffusion, the marginal at ``T``, ...).
    rel_error : float
        ``|declared - implied| / scale``, the scale being ``max(|declared|, |implied|)`` unless the quantity has a
        natural one (the per-sample magnitude of the drift, ``s(T)`` for the prior mean).
    declared_by, implied_by : str
        The methods or formulas the two values come from.
    time : float or None
        The time of the worst disagreement (``None`` for a quantity without one).
    index : tuple of int or None
        The coordinate of one sample, for per-coordinate quantities.
    num_bad, num_points : int
        At how many of the points compared the two disagree beyond the tolerance.
    """

    quantity: str
    declared: float
    implied: float
    rel_error: float
    declared_by: str
    implied_by: str
    time: float | None = None
    index: tuple[int, ...] | None = None
    num_bad: int = 1
    num_points: int = 1

    def __str__(self) -> str:
        where = []
        if self.time is not None:
            where.append(f"t={self.time:.4g}")
        if self.index is not None:
            where.append(f"coordinate {self.index}")
        at = f" at {', '.join(where)}" if where else ""
        count = f"; {self.num_bad} of {self.num_points} points disagree" if self.num_points > 1 else ""
        return (f"{self.quantity}{at}: declared {self.declared:.6g} ({self.declared_by}), implied {self.implied:.6g} "
                f"({self.implied_by}); relative error {self.rel_error:.3g}{count}")


@dataclass
class SDECheck:
    """Result of :func:`check_sde`: what disagrees, what was compared and what could not be checked.

    Attributes
    ----------
    sde : str
        The ``repr`` of the SDE checked.
    failures : list of CheckFailure
        One record per quantity that disagrees (empty when the SDE is consistent).
    checked : list of str
        The identities compared, with the number of points.
    unchecked : list of str
        What could not be checked for this SDE, and why.
    ok : bool
        ``True`` when nothing disagrees (``not failures``).
    """

    sde: str
    failures: list[CheckFailure] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    ok: bool = field(init=False)

    def __post_init__(self) -> None:
        self.ok = not self.failures

    def __str__(self) -> str:
        n = len(self.failures)
        head = f"check_sde({self.sde}): " + ("consistent" if self.ok else
                                              f"{n} quantit{'y disagrees' if n == 1 else 'ies disagree'}")
        lines = [head] + [f"  {f}" for f in self.failures]
        lines += [f"checked ({len(self.checked)} comparisons):"] + [f"  {c}" for c in self.checked]
        if self.unchecked:
            lines += ["not checked:"] + [f"  {u}" for u in self.unchecked]
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        """Raise a ``ValueError`` carrying the report if any quantity disagrees."""
        if not self.ok:
            raise ValueError(str(self))


@dataclass(frozen=True)
class _Gaussian:
    """The marginal at ``T`` the prior is compared with: ``N(mean, std^2 I)`` for ``x_0 = 0``, and how much its mean
    moves per unit of ``x_0`` (``m(T)`` for a linear SDE; ``None`` where unknown)."""

    mean: Tensor
    std: float
    signal: float | None
    source: str


class _Checker:
    """The settings of one :func:`check_sde` call and the records it collects."""

    def __init__(self, sde: SDE, event_shape: tuple[int, ...], rtol: float, atol: float, num_se: float,
                 num_samples: int, prior_rtol: float, generator: torch.Generator | None) -> None:
        self.sde, self.event_shape, self.dim = sde, event_shape, math.prod(event_shape)
        self.rtol, self.atol, self.num_se, self.num_samples, self.prior_rtol = rtol, atol, num_se, num_samples, prior_rtol
        self.generator = generator
        self.failures: list[CheckFailure] = []
        self.checked: list[str] = []
        self.unchecked: list[str] = []

    def randn(self, *shape: int) -> Tensor:
        return torch.randn(shape, generator=self.generator, dtype=F64)

    def uniform_times(self, n: int) -> Tensor:
        return self.sde.T * (1 - torch.rand(n, generator=self.generator, dtype=F64))  # in (0, T]

    def compare(self, quantity: str, declared: Tensor, implied: Tensor | float, *, declared_by: str, implied_by: str,
                times: Tensor | None = None, extra_tol: Tensor | float = 0.0, scale: Tensor | None = None,
                rtol: float | None = None, mask: Tensor | None = None) -> None:
        """Compare elementwise: ``|declared - implied| <= atol + rtol * scale + extra_tol``; record the worst miss.

        ``declared`` has shape ``(points, *coords)``; ``times`` (``(points,)``) locates each point, ``mask`` drops
        points that cannot be compared.
        """
        declared = torch.as_tensor(declared, dtype=F64)
        implied = torch.as_tensor(implied, dtype=F64).expand_as(declared)
        if declared.dim() == 0:
            declared, implied = declared[None], implied[None]
        scale = torch.maximum(declared.abs(), implied.abs()) if scale is None else scale.to(F64).expand_as(declared)
        tol = self.atol + (self.rtol if rtol is None else rtol) * scale + torch.as_tensor(extra_tol, dtype=F64)
        err = (declared - implied).abs()
        bad = ~(err <= tol)  # NaN counts as a disagreement
        if mask is not None:
            keep = expand_as(mask, declared).expand_as(declared)
            bad &= keep
            num_points = int(keep.sum())
        else:
            num_points = declared.numel()
        points = f"{num_points} point{'s' if num_points != 1 else ''}"
        self.checked.append(f"{quantity}: {declared_by} against {implied_by} ({points})")
        if not bad.any():
            return
        ratio = torch.where(bad, torch.nan_to_num(err / tol.clamp_min(1e-300), nan=math.inf), -1.0)
        flat = int(ratio.flatten().argmax())
        pos = [int(i) for i in torch.unravel_index(torch.tensor(flat), declared.shape)]
        d, i, sc = float(declared[tuple(pos)]), float(implied[tuple(pos)]), float(scale[tuple(pos)])
        rel = abs(d - i) / sc if sc > 0 else (0.0 if d == i else math.inf)
        self.failures.append(CheckFailure(
            quantity, d, i, rel if math.isfinite(d) and math.isfinite(i) else math.nan, declared_by, implied_by,
            time=None if times is None else float(times[pos[0]]), index=tuple(pos[1:]) or None,
            num_bad=int(bad.sum()), num_points=num_points))

    def derivative(self, fn: Callable[[Tensor], Tensor], t: Tensor, what: str) -> tuple[Tensor, Tensor, Tensor]:
        """``fn(t)``, its derivative in ``t`` (elementwise: row ``b`` depends on ``t[b]`` only) and where it is reliable.

        Autograd first; where ``fn`` is not differentiable by autograd, central (one-sided at ``T``) differences of
        step ``h = 1e-3 T`` (at most ``t/2``) extrapolated over ``h, h/2, h/4``, reliable where two extrapolations
        agree to a tenth of the tolerance.
        """
        tt = t.detach().clone().requires_grad_(True)
        try:
            with torch.enable_grad():
                y = fn(tt).to(F64)
                if y.requires_grad:
                    cols = y.reshape(len(t), -1)
                    grads = [torch.autograd.grad(cols[:, j].sum(), tt, retain_graph=True)[0] for j in range(cols.shape[1])]
                    deriv = torch.stack(grads, 1).reshape(y.shape)
                    return y.detach(), deriv, torch.ones(len(t), dtype=torch.bool)
        except RuntimeError:
            pass
        return self._finite_difference(fn, t, what)

    def _finite_difference(self, fn: Callable[[Tensor], Tensor], t: Tensor, what: str) -> tuple[Tensor, Tensor, Tensor]:
        T = self.sde.T
        near_end = t > T - 2e-3 * T
        h = torch.where(near_end, 1e-3 * T, torch.clamp(t / 2, max=1e-3 * T))
        # three-point stencils t + c_k h with weights w_k / h: central (c = 1, -1) and backward (c = 0, -1, -2)
        c = torch.where(near_end[:, None], torch.tensor([0.0, -1.0, -2.0], dtype=F64), torch.tensor([1.0, -1.0, 0.0], dtype=F64))
        w = torch.where(near_end[:, None], torch.tensor([1.5, -2.0, 0.5], dtype=F64), torch.tensor([0.5, -0.5, 0.0], dtype=F64))
        value = fn(t).to(F64)

        def diff(step: Tensor) -> Tensor:
            out = sum(expand_as(w[:, k] / step, value) * fn(t + c[:, k] * step).to(F64) for k in range(3))
            return torch.as_tensor(out, dtype=F64)

        d1, d2, d4 = diff(h), diff(h / 2), diff(h / 4)
        r1, r2 = (4 * d2 - d1) / 3, (4 * d4 - d2) / 3  # second-order differences: Richardson to fourth order
        err = (r1 - r2).abs().reshape(len(t), -1).amax(1)
        scale = r2.abs().reshape(len(t), -1).amax(1)
        reliable = err <= 0.1 * (self.atol + self.rtol * scale)
        if not reliable.all():
            self.unchecked.append(
                f"{what} at {int((~reliable).sum())} of {len(t)} times: no autograd derivative, and finite differences "
                "disagree with themselves there (the function is not smooth, e.g. at the knots of a piecewise schedule)")
        return value, r2, reliable


def check_times(T: float, num_times: int) -> Tensor:
    """The times the kernel identities are checked at: ``num_times`` midpoints of ``(0, T]``, ``T`` itself and
    ``1e-4 T, 1e-3 T, 1e-2 T`` (the start, where ``s(t)`` is small), as a float64 tensor."""
    u = torch.cat([torch.tensor([1e-4, 1e-3, 1e-2], dtype=F64), (torch.arange(num_times, dtype=F64) + 0.5) / num_times,
                   torch.ones(1, dtype=F64)])
    return T * torch.unique(u)


def _per_time(value: Tensor | float, t: Tensor) -> Tensor:
    """A time coefficient (``(batch,)``, 0-d or a float) as a float64 ``(batch,)`` tensor."""
    return torch.as_tensor(value, dtype=F64).expand_as(t)


def _b_scale(b: Tensor) -> Tensor:
    """The per-sample largest magnitude of ``b`` (the scale of a per-sample comparison), broadcast like ``b``."""
    return expand_as(b.abs().flatten(1).amax(1), b)


# --- the drift: shape, batch independence, linearity -----------------------------------------------------------------
def _check_drift(ck: _Checker, declared_linear: bool) -> bool:
    """Check the drift's and diffusion's shapes and batch independence; return whether the drift is linear in ``x``."""
    sde, n = ck.sde, 16
    x, y, t = ck.randn(n, *ck.event_shape), ck.randn(n, *ck.event_shape), ck.uniform_times(n)
    f = sde.drift(x, t)
    if not isinstance(f, Tensor) or f.shape != x.shape:
        raise ValueError(f"{type(sde).__name__}.drift(x, t) must return a tensor shaped like x {tuple(x.shape)}, got "
                         f"{tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__}")
    g = sde.diffusion(t)
    if not isinstance(g, Tensor) or g.shape != t.shape:
        raise ValueError(f"{type(sde).__name__}.diffusion(t) must return a (batch,) tensor shaped like t {tuple(t.shape)}, "
                         f"got {tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__}")
    f = f.to(F64)
    k, rev = n // 2 - 1, torch.arange(n - 1, -1, -1)
    ck.compare("drift batch independence", f, torch.cat([sde.drift(x[:k], t[:k]), sde.drift(x[k:], t[k:])]).to(F64),
               declared_by="drift on the whole batch", implied_by="drift on two parts of it", scale=_b_scale(f))
    ck.compare("drift batch independence", f, sde.drift(x[rev], t[rev]).to(F64)[rev], declared_by="drift on the batch",
               implied_by="drift on the batch in reverse order", scale=_b_scale(f))
    ck.compare("diffusion batch independence", g.to(F64), torch.cat([sde.diffusion(t[:k]), sde.diffusion(t[k:])]).to(F64),
               declared_by="diffusion on the whole batch", implied_by="diffusion on two parts of it")
    c = expand_as(4 * torch.rand(n, generator=ck.generator, dtype=F64) - 2, x)
    f_y = sde.drift(y, t).to(F64)
    pairs = {"drift homogeneity": (sde.drift(c * x, t).to(F64), c * f, "drift(c x, t)", "c drift(x, t)"),
             "drift additivity": (sde.drift(x + y, t).to(F64), f + f_y, "drift(x + y, t)", "drift(x, t) + drift(y, t)")}
    scale = _b_scale(f) + _b_scale(f_y) + _b_scale(c * f)
    if not declared_linear:  # the drift may be anything: linearity only decides how the moments are taken
        return all(bool(((a - b).abs() <= ck.atol + ck.rtol * scale).all()) for a, b, _, _ in pairs.values())
    for quantity, (declared, implied, declared_by, implied_by) in pairs.items():
        ck.compare(quantity, declared, implied, declared_by=declared_by, implied_by=implied_by, times=t, scale=scale)
    ck.compare("drift = drift_coef(t) x", f, expand_as(_per_time(sde.drift_coef(t), t), x) * x, declared_by="drift(x, t)",
               implied_by="drift_coef(t) x", times=t, scale=_b_scale(f))
    return True


# --- the kernel of a LinearSDE ---------------------------------------------------------------------------------------
def _check_linear_kernel(ck: _Checker, sde: LinearSDE, times: Tensor) -> _Gaussian:
    """``d log m/dt = a``, ``d(s^2)/dt = 2 a s^2 + g^2``, ``m(0) = 1``, ``s(0) = initial_std``; ``marginal`` vs the kernel."""
    m, dm, m_ok = ck.derivative(sde.mean_coeff, times, "d log m/dt")
    s, ds, s_ok = ck.derivative(sde.marginal_std, times, "d(s^2)/dt")
    a, g = _per_time(sde.drift_coef(times), times), _per_time(sde.diffusion(times), times)
    ck.compare("d log m/dt", dm / m, a, times=times, mask=m_ok, declared_by="mean_coeff", implied_by="drift_coef")
    ck.compare("d(s^2)/dt", 2 * s * ds, 2 * a * s**2 + g**2, times=times, mask=s_ok, declared_by="marginal_std",
               implied_by="2 a s^2 + g^2 from drift_coef and diffusion")
    lam = 2 * (m.log() - s.log())
    if type(sde).log_snr is not LinearSDE.log_snr:
        ck.compare("log-SNR", _per_time(sde.log_snr(times), times), lam, times=times, declared_by="log_snr",
                   implied_by="2 log(m/s) from mean_coeff and marginal_std")
    if type(sde).time_of_log_snr is not LinearSDE.time_of_log_snr:
        ck.compare("time_of_log_snr", _per_time(sde.time_of_log_snr(lam), times), times, times=times,
                   declared_by="time_of_log_snr(2 log(m/s))", implied_by="the time itself")
    zero = torch.zeros(1, dtype=F64)
    ck.compare("m(0)", _per_time(sde.mean_coeff(zero), zero), 1.0, declared_by="mean_coeff(0)", implied_by="m(0) = 1")
    ck.compare("s(0)", _per_time(sde.marginal_std(zero), zero), sde.initial_std, declared_by="marginal_std(0)",
               implied_by="initial_std")
    if type(sde).marginal is not LinearSDE.marginal:
        x0 = ck.randn(len(times), *ck.event_shape)
        mean, std = sde.marginal(x0, times)
        ck.compare("marginal mean", mean.to(F64), expand_as(m, x0) * x0, times=times, declared_by="marginal(x0, t)",
                   implied_by="mean_coeff(t) x0", scale=_b_scale(expand_as(m, x0) * x0))
        ck.compare("marginal std", _per_time(std, times), s, times=times, declared_by="marginal(x0, t)",
                   implied_by="marginal_std(t)")
    end = torch.full((1,), sde.T, dtype=F64)
    return _Gaussian(torch.zeros(ck.dim, dtype=F64), float(sde.marginal_std(end)), float(sde.mean_coeff(end)),
                     "marginal_std(T)")


# --- a declared marginal of a general SDE ------------------------------------------------------------------------------
def _drift_moments(ck: _Checker, mu: Tensor, s: Tensor, t: Tensor, z: Tensor,
                  exact: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Estimates of :math:`E[f(x, t)]` (``(rows, D)``) and of :math:`E[(x-\mu)f^\top + f(x-\mu)^\top]` (``(rows, D, D)``)
    for :math:`x = \mu + s z`, averaged over the antithetic pairs :math:`\pm z` of ``z`` (``(pairs, D)``), with their
    standard errors (zero when ``exact``: ``z`` is a cubature rule exact for this drift)."""
    a = s[None, :, None] * z[:, None, :]  # (pairs, rows, D): x - mu at the + point
    x = torch.cat([mu[None] + a, mu[None] - a]).reshape(-1, *ck.event_shape)
    f = ck.sde.drift(x, t.repeat(2 * len(z))).to(F64).reshape(2, len(z), *mu.shape)
    e, c = (f[0] + f[1]) / 2, (f[0] - f[1]) / 2  # per pair: the mean of f, and (x - mu) f^T averages to a c^T
    p = len(z)
    mean = e.mean(0)
    cov = torch.einsum("prd,pre->rde", a, c) / p
    cov = cov + cov.transpose(1, 2)
    if exact:
        return mean, torch.zeros_like(mean), cov, torch.zeros_like(cov)
    m_ac = torch.einsum("prd,pre->rde", a**2, c**2) / p
    m_x = torch.einsum("prd,pre->rde", a * c, a * c) / p
    cov_sq = m_ac + m_ac.transpose(1, 2) + 2 * m_x
    return mean, e.std(0) / math.sqrt(p), cov, ((cov_sq - cov**2).clamp_min(0) / (p - 1)).sqrt()


def _check_declared_marginal(ck: _Checker, times: Tensor, linear: bool) -> _Gaussian:
    """The moment equations for the Gaussian kernel ``marginal(x0, t)`` of a general SDE, at 4 starting points."""
    sde, dim, b0 = ck.sde, ck.dim, 4
    x0 = 2 * ck.randn(b0, *ck.event_shape)
    rows, t = x0.repeat(len(times), *[1] * len(ck.event_shape)), times.repeat_interleave(b0)

    def declared(tt: Tensor) -> Tensor:
        mean, std = sde.marginal(rows, tt)
        if mean.shape != rows.shape or std.shape != tt.shape:
            raise ValueError(f"{type(sde).__name__}.marginal(x0, t) must return (mean like x0 {tuple(rows.shape)}, std "
                             f"(batch,)), got shapes {tuple(mean.shape)} and {tuple(std.shape)}")
        return torch.cat([mean.reshape(len(tt), dim).to(F64), std[:, None].to(F64)], 1)

    value, deriv, ok = ck.derivative(declared, t, "the derivative of marginal(x0, t)")
    mu, s, dmu, ds2 = value[:, :dim], value[:, dim], deriv[:, :dim], 2 * value[:, dim] * deriv[:, dim]
    mean0 = sde.marginal(x0, torch.zeros(b0, dtype=F64))[0].to(F64)
    ck.compare("mean at t=0", mean0, x0, declared_by="marginal(x0, 0)", implied_by="x0", scale=_b_scale(x0))
    if linear:  # the cubature points ±sqrt(D) e_k give the moments of a linear drift exactly
        z, how = math.sqrt(dim) * torch.eye(dim, dtype=F64), "exact for the linear drift"
    else:
        z, how = ck.randn(ck.num_samples // 2, dim), f"Monte Carlo, {ck.num_samples} samples, {ck.num_se:g} standard errors"
        ck.unchecked.append("the Gaussian shape of marginal(x0, t) beyond its mean and variance (the drift is "
                                   "not linear, so only the first two moment equations are compared)")
    per_row = max(1, (2 ** 22) // (len(z) * dim * max(dim, 2)))
    parts = [_drift_moments(ck, mu[i:i + per_row], s[i:i + per_row], t[i:i + per_row], z, linear)
             for i in range(0, len(t), per_row)]
    e_f, e_se, cov, cov_se = (torch.cat(p) for p in zip(*parts, strict=True))
    g2 = _per_time(sde.diffusion(t), t) ** 2
    k = ck.num_se
    ck.compare("d mean/dt", dmu, e_f, times=t, mask=ok, extra_tol=k * e_se, declared_by="marginal(x0, t) mean",
               implied_by=f"E[f(x_t, t)], {how}", scale=_b_scale(dmu) + _b_scale(e_f))
    diag = torch.diagonal(cov, dim1=1, dim2=2)
    ck.compare("d(s^2)/dt", ds2[:, None].expand(-1, dim), diag + g2[:, None], times=t, mask=ok,
               extra_tol=k * torch.diagonal(cov_se, dim1=1, dim2=2), declared_by="marginal(x0, t) std",
               implied_by=f"2 E[(x - mu) f] + g^2, {how}")
    if dim > 1:
        iu = torch.triu_indices(dim, dim, 1)
        off, off_se = cov[:, iu[0], iu[1]], cov_se[:, iu[0], iu[1]]
        ck.compare("d Cov(x_i, x_j)/dt", torch.zeros_like(off), off, times=t, mask=ok, extra_tol=k * off_se,
                   declared_by="the isotropic marginal (zero)", implied_by=f"E[(x_i - mu_i) f_j + (x_j - mu_j) f_i], {how}",
                   scale=(ds2.abs() + g2)[:, None].expand_as(off))
    end = torch.full((1,), sde.T, dtype=F64)
    mean_t, std_t = sde.marginal(torch.zeros(1, *ck.event_shape, dtype=F64), end)
    signal = sde.marginal(torch.ones(1, *ck.event_shape, dtype=F64), end)[0].to(F64) - mean_t.to(F64)
    return _Gaussian(mean_t.reshape(-1).to(F64), float(std_t), float(signal.abs().max()), "marginal(0, T)")


def _implied_linear_kernel(ck: _Checker, times: Tensor) -> _Gaussian | None:
    """For an SDE with a linear drift and no declared marginal: the kernel at ``T`` its drift and diffusion imply
    (integrated by :class:`LinearSDE` from a noise-free start), or ``None`` if the drift is not ``a(t) x``."""
    sde, dim = ck.sde, ck.dim
    basis = torch.eye(dim, dtype=F64).repeat(len(times), 1)
    columns = sde.drift(basis.reshape(-1, *ck.event_shape), times.repeat_interleave(dim)).to(F64)
    A = columns.reshape(len(times), dim, dim).transpose(1, 2)  # A[:, :, j] = f(e_j)
    a = torch.diagonal(A, dim1=1, dim2=2).mean(1)
    scalar = a[:, None, None] * torch.eye(dim, dtype=F64)
    if not torch.allclose(A, scalar, rtol=ck.rtol, atol=ck.atol + ck.rtol * float(a.abs().max())):
        ck.unchecked.append("the prior against p_T: the drift is linear, f = A(t) x, but A(t) is not a multiple of "
                                   "the identity and no marginal is declared, so the kernel is not the isotropic "
                                   "N(m x0, s^2 I) this check integrates")
        return None

    def drift_coef(tt: Tensor) -> Tensor:
        return sde.drift(torch.ones(len(tt), *ck.event_shape, dtype=F64), tt).to(F64).reshape(len(tt), -1)[:, 0]

    kernel = LinearSDE(drift_coef=drift_coef, diffusion=lambda tt: _per_time(sde.diffusion(tt), tt), T=sde.T)
    end = torch.full((1,), sde.T, dtype=F64)
    ck.unchecked.append(f"the drift and diffusion against a marginal: {type(sde).__name__} declares none; the "
                               "prior is compared with the kernel its linear drift and diffusion imply, integrated from "
                               "a noise-free x_0 (s(0) = 0)")
    return _Gaussian(torch.zeros(dim, dtype=F64), float(kernel.marginal_std(end)), float(kernel.mean_coeff(end)),
                     "s(T) integrated from drift and diffusion")


# --- the prior -------------------------------------------------------------------------------------------------------
def _check_prior(ck: _Checker, ref: _Gaussian | None) -> None:
    """``prior_sample`` (reproducible, mean, std) and ``prior_log_prob`` against the marginal at ``T``, or against each
    other through Stein's identities when there is no Gaussian marginal to compare with."""
    sde, n, shape = ck.sde, ck.num_samples, (ck.num_samples, *ck.event_shape)
    z = sde.prior_sample(shape, generator=ck.generator, dtype=F64)
    if not isinstance(z, Tensor) or z.shape != shape or z.dtype != F64:
        raise ValueError(f"{type(sde).__name__}.prior_sample({shape}, dtype=torch.float64) must return a float64 tensor "
                         f"of that shape, got {type(z).__name__} {getattr(z, 'shape', '')} {getattr(z, 'dtype', '')}")
    seed = int(torch.randint(0, 2**62, (1,), generator=ck.generator))
    again = [sde.prior_sample((8, *ck.event_shape), generator=torch.Generator().manual_seed(seed), dtype=F64)
             for _ in range(2)]
    ck.compare("prior_sample reproducibility", (again[0] - again[1]).abs().amax(), 0.0, rtol=0.0,
               declared_by="two draws with equally seeded generators", implied_by="identical draws")
    log_p = sde.prior_log_prob(z)
    if not isinstance(log_p, Tensor) or log_p.shape != (n,):
        raise ValueError(f"{type(sde).__name__}.prior_log_prob(z) must return a (batch,) tensor of shape ({n},), got "
                         f"{getattr(log_p, 'shape', type(log_p).__name__)}")
    flat = z.reshape(n, -1)
    if ref is None:
        _check_prior_stein(ck, z)
        ck.unchecked.append("the prior against p_T: there is no Gaussian marginal at T to compare it with")
        return
    mean, std = flat.mean(0), flat.std(0)
    ck.compare("prior mean", mean[None], ref.mean[None], extra_tol=ck.num_se * std / math.sqrt(n), rtol=ck.prior_rtol,
               scale=torch.full_like(std, ref.std)[None], declared_by="mean of prior_sample draws",
               implied_by=f"the marginal at T for x0 = 0 ({ref.source}); scale s(T)")
    centred = flat - flat.mean(0)
    var_se = ((centred**4).mean(0) - (centred**2).mean(0) ** 2).clamp_min(0).sqrt() / math.sqrt(n)
    ck.compare("prior std", std[None], ref.std, extra_tol=ck.num_se * var_se / (2 * std), rtol=ck.prior_rtol,
               declared_by="std of prior_sample draws", implied_by=ref.source)
    diff = (log_p.to(F64) - gaussian_log_prob(z - ref.mean.reshape(ck.event_shape), ref.std)) / ck.dim
    ref_lp = gaussian_log_prob(z - ref.mean.reshape(ck.event_shape), ref.std) / ck.dim
    ck.compare("prior_log_prob", (log_p.to(F64) / ck.dim).mean(), ref_lp.mean(), rtol=ck.prior_rtol,
               extra_tol=ck.num_se * diff.std() / math.sqrt(n), scale=ref_lp.abs().mean(),
               declared_by="prior_log_prob per dimension, mean over prior draws",
               implied_by=f"log N(mean, s(T)^2 I) per dimension ({ref.source})")
    if ref.signal is not None and abs(ref.signal) > ck.prior_rtol * ref.std:
        ck.unchecked.append(
            f"the data's share of p_T: m(T) = {ref.signal:.3g} against s(T) = {ref.std:.3g}, so x_T keeps m(T) x0 of the "
            "data, which the prior leaves out; the prior was compared with the marginal at T for x0 = 0 only")


def _check_prior_stein(ck: _Checker, z: Tensor) -> None:
    r"""Stein's identities for the prior: :math:`E[\nabla\log p(z)] = 0`, :math:`E[z\cdot\nabla\log p(z)]/D = -1`."""
    zz = z.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            score = torch.autograd.grad(ck.sde.prior_log_prob(zz).sum(), zz)[0].to(F64)
    except RuntimeError:
        ck.unchecked.append("prior_sample against prior_log_prob: prior_log_prob is not differentiable by autograd")
        return
    n = len(z)
    flat_s = score.reshape(n, -1)
    ck.compare("prior score mean (Stein)", flat_s.mean(0)[None], 0.0, rtol=0.0,
               extra_tol=ck.num_se * flat_s.std(0) / math.sqrt(n), scale=flat_s.abs().mean(0)[None],
               declared_by="E[grad log p(z)] over prior_sample draws, grad of prior_log_prob", implied_by="0 for any density")
    stein = sum_except_batch(z * score) / ck.dim
    ck.compare("prior E[z . grad log p(z)]/D (Stein)", stein.mean(), -1.0, rtol=ck.prior_rtol,
               extra_tol=ck.num_se * stein.std() / math.sqrt(n),
               declared_by="over prior_sample draws, grad of prior_log_prob", implied_by="-1 for any density")
    ck.unchecked.append("the normalisation of prior_log_prob (Stein's identities do not see a constant)")


# --- the entry point -------------------------------------------------------------------------------------------------
def check_sde(sde: SDE, *, num_times: int = 64, rtol: float = 1e-4, atol: float = 1e-8, num_samples: int = 4096,
              num_se: float = 5.0, prior_rtol: float = 1e-2, event_shape: tuple[int, ...] = (2,),
              generator: torch.Generator | None = None) -> SDECheck:
    r"""Check numerically that an SDE's drift and diffusion agree with the marginal and the prior it declares.

    Run it on any custom SDE before sampling with it: solvers that integrate the drift and diffusion (``heun``,
    ``euler_maruyama``, ``ode``, likelihoods) and solvers that use the kernel (``ddim``, ``dpm_solver``, score
    conversions, losses) sample different distributions when the two disagree. What is compared (module docstring):

    - every SDE: ``drift`` and ``diffusion`` return the documented shapes and do not depend on the rest of the batch;
    - a :class:`~sdediff.LinearSDE`: the drift is linear, ``drift(x, t) = drift_coef(t) x``,
      :math:`d\log m/dt = a` and :math:`d(s^2)/dt = 2as^2 + g^2` at the times of ``check_times``,
      :math:`m(0) = 1`, :math:`s(0) = ` ``initial_std``, and an overridden ``marginal``, ``log_snr`` or
      ``time_of_log_snr`` against ``mean_coeff`` and ``marginal_std``;
    - an SDE that overrides ``marginal(x0, t)``: its mean at ``t = 0``, and
      :math:`d\mu/dt = E[f]`, :math:`d(s^2)/dt = 2E[(x_i - \mu_i) f_i] + g^2` per coordinate and
      :math:`0 = E[(x_i - \mu_i) f_j + (x_j - \mu_j) f_i]` (exact for a linear drift, Monte Carlo otherwise);
    - an SDE with a drift :math:`a(t) x` and no marginal: the prior against the kernel its drift and diffusion imply;
    - the prior: ``prior_sample`` is reproducible with a seeded generator, its mean and standard deviation match
      the marginal at ``T`` (for :math:`x_0 = 0`) within ``prior_rtol`` of :math:`s(T)` plus ``num_se`` standard
      errors, and ``prior_log_prob`` is that Gaussian's log-density; without a Gaussian marginal, Stein's
      identities tie ``prior_sample`` to ``prior_log_prob``.

    Everything runs in float64 on the CPU on states of shape ``(batch, *event_shape)``.

    Parameters
    ----------
    sde : SDE
        The SDE to check.
    num_times : int
        Number of evenly spread times in :math:`(0, T]` (``1e-4 T``, ``1e-3 T``, ``1e-2 T`` and ``T`` are added).
    rtol, atol : float
        Tolerance of the deterministic identities: :math:`|declared - implied| \le atol + rtol\cdot scale`.
    num_samples : int
        Monte Carlo samples per time and starting point (for a nonlinear drift), and prior draws.
    num_se : float
        Monte Carlo tolerance, in standard errors, added to the deterministic one.
    prior_rtol : float
        How far the prior may differ from the marginal at ``T``, relative to :math:`s(T)` (the prior is only close
        to :math:`p_T`).
    event_shape : tuple of int
        Shape of one sample the SDE's methods are called with.
    generator : torch.Generator, optional
        Generator of every random draw (CPU).

    Returns
    -------
    SDECheck
        ``ok``, the ``failures`` (each naming the quantity, the time, the declared and implied values and the
        relative error), what was ``checked`` and what could not be checked (``unchecked``). ``str()`` is a report;
        :meth:`SDECheck.raise_if_failed` raises it as a ``ValueError``.

    Raises
    ------
    ValueError
        For a bad argument, or when a method of ``sde`` returns the wrong shape (nothing else can be checked then).
    """
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdediff.SDE, got {type(sde).__name__}")
    num_times = check_int("num_times", num_times, minimum=2)
    rtol = check_float("rtol", rtol, low=0.0, low_open=True)
    atol = check_float("atol", atol, low=0.0)
    num_samples = check_int("num_samples", num_samples, minimum=16)
    num_se = check_float("num_se", num_se, low=0.0, low_open=True)
    prior_rtol = check_float("prior_rtol", prior_rtol, low=0.0)
    if not (isinstance(event_shape, tuple) and event_shape and
            all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in event_shape)):
        raise ValueError(f"event_shape must be a non-empty tuple of positive integers, got {event_shape!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    ck = _Checker(sde, event_shape, rtol, atol, num_se, num_samples, prior_rtol, generator)
    times = check_times(sde.T, num_times)
    with torch.no_grad():
        linear = _check_drift(ck, declared_linear=isinstance(sde, LinearSDE))
        if isinstance(sde, LinearSDE):
            ref: _Gaussian | None = _check_linear_kernel(ck, sde, times)
        elif type(sde).marginal is not SDE.marginal:
            ref = _check_declared_marginal(ck, times, linear)
        elif linear:
            ref = _implied_linear_kernel(ck, times)
        else:
            ref = None
            ck.unchecked.append(f"the drift and diffusion against a marginal: {type(sde).__name__} declares no "
                                       "marginal(x0, t) and its drift is not linear, so there is nothing to compare "
                                       "them with")
        _check_prior(ck, ref)
    return SDECheck(repr(sde), ck.failures, ck.checked, ck.unchecked)
