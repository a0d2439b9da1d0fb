"""The peers of ``benchmarks/likelihood.py``: the likelihood formulations of score_sde, k-diffusion and a plain
torchdiffeq user, written against sdediff's SDEs and score functions so that every one integrates the same flow with
the same divergence (our own code; the formulations are described in each docstring), and the real
``k_diffusion.sampling.log_likelihood`` with the reference integral of its own probe.

Every function takes ``(sde, score_fn, x, eps, tol, trace)`` and returns ``Outcome``: ``delta`` (the integral of the
divergence from ``eps`` to ``T``, per point), ``latent`` (``x_T``), ``nfe`` (score evaluations per point: the whole
batch takes part in each) and ``calls``. Nothing here is part of the ``sdediff`` package.
"""

from __future__ import annotations

import types
from typing import NamedTuple

import numpy as np
import torch
import torchdiffeq
from scipy import integrate
from torch import Tensor

import sdediff
from sdediff.interop.kdiffusion import KDiffusionDenoiser, sigma_of_time
from sdediff.likelihood import divergence_exact, divergence_hutchinson
from sdediff.likelihood.flows import TimeFlow
from sdediff.solvers.ode import odeint


class Outcome(NamedTuple):
    delta: Tensor
    latent: Tensor
    nfe: int
    calls: int


def _divergence(fn, x: Tensor, trace: str, probe: Tensor | None) -> tuple[Tensor, Tensor]:
    return divergence_exact(fn, x) if trace == "exact" else divergence_hutchinson(fn, x, probe)


def _velocity(sde: sdediff.SDE, score_fn, t: Tensor):
    weight = -0.5 * sde.diffusion(t) ** 2
    return lambda z: sde.drift(z, t) + weight.reshape(-1, *[1] * (z.dim() - 1)) * score_fn(z, t)


def score_sde(sde: sdediff.SDE, score_fn, x: Tensor, eps: float, tol: float, trace: str = "exact",
              generator: torch.Generator | None = None) -> Outcome:
    """score_sde's ``likelihood.py`` formulation: the augmented state of the whole batch flattened into one numpy
    vector, integrated in ``t`` from ``eps`` to ``T`` by ``scipy.integrate.solve_ivp(method="RK45", rtol=atol=tol)``
    (Dormand–Prince 5(4), error norm the RMS over the whole vector); Hutchinson with one probe fixed per solve."""
    shape, n = x.shape, x.shape[0]
    probe = None if trace == "exact" else torch.randn(x.shape, generator=generator, dtype=x.dtype).sign()
    calls = [0]

    def field(t: float, y: np.ndarray) -> np.ndarray:
        calls[0] += 1
        xs = torch.as_tensor(y[:-n], dtype=x.dtype).reshape(shape)
        tt = torch.full((n,), t, dtype=x.dtype)
        v, div = _divergence(_velocity(sde, score_fn, tt), xs, trace, probe)
        return np.concatenate([v.reshape(-1).numpy(), div.numpy()])

    y0 = np.concatenate([x.reshape(-1).numpy(), np.zeros(n)])
    sol = integrate.solve_ivp(field, (eps, sde.T), y0, rtol=tol, atol=tol, method="RK45")
    y = sol.y[:, -1]
    return Outcome(torch.as_tensor(y[-n:]), torch.as_tensor(y[:-n]).reshape(shape), int(sol.nfev), calls[0])


def kdiffusion_exact(sde: sdediff.LinearSDE, score_fn, x: Tensor, eps: float, tol: float, trace: str = "exact",
                     generator: torch.Generator | None = None) -> Outcome:
    """k-diffusion's ``log_likelihood`` formulation with the exact divergence: the denoiser's ODE
    :math:`dy/d\\sigma = (y - D(y, \\sigma))/\\sigma` on :math:`y = x/m` from :math:`\\sigma(\\epsilon)` to
    :math:`\\sigma(T)` by ``torchdiffeq.odeint(method="dopri5", rtol=atol=tol)`` with torchdiffeq's default norm (the
    RMS over the whole batch)."""
    den = KDiffusionDenoiser(sde, score_fn)
    te = torch.tensor([eps, sde.T], dtype=x.dtype)
    sigmas = sigma_of_time(sde, te).to(x.dtype)
    m = sde.mean_coeff(te)
    probe = None if trace == "exact" else torch.randn(x.shape, generator=generator, dtype=x.dtype).sign()
    calls = [0]

    def field(sigma: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        calls[0] += 1
        s = sigma.expand(state[0].shape[0])
        return _divergence(lambda y: (y - den(y, s)) / sigma, state[0], trace, probe)

    ys, ls = torchdiffeq.odeint(field, (x / m[0], x.new_zeros(x.shape[0])), sigmas, rtol=tol, atol=tol, method="dopri5")
    delta = ls[-1] + x[0].numel() * torch.log(m[1] / m[0])
    return Outcome(delta, ys[-1] * m[1], calls[0], calls[0])


def torchdiffeq_plain(sde: sdediff.SDE, score_fn, x: Tensor, eps: float, tol: float, trace: str = "exact",
                      generator: torch.Generator | None = None) -> Outcome:
    """torchdiffeq used directly, as a continuous-normalising-flow user would: the augmented ``(x, log-det)`` in ``t``
    by ``torchdiffeq.odeint(method="dopri5", rtol=atol=tol)`` with its default options (its norm, its first-step
    guess; the field clamps ``t`` to ``[0, T]`` where torchdiffeq steps past the end and interpolates back)."""
    probe = None if trace == "exact" else torch.randn(x.shape, generator=generator, dtype=x.dtype).sign()
    calls = [0]

    def field(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        calls[0] += 1
        tt = t.clamp(0.0, sde.T).expand(state[0].shape[0])
        return _divergence(_velocity(sde, score_fn, tt), state[0], trace, probe)

    xs, ls = torchdiffeq.odeint(field, (x, x.new_zeros(x.shape[0])), torch.tensor([eps, sde.T], dtype=x.dtype),
                                rtol=tol, atol=tol, method="dopri5")
    return Outcome(ls[-1], xs[-1], calls[0], calls[0])


def kdiffusion_real(kds: types.ModuleType, sde: sdediff.LinearSDE, score_fn, x: Tensor, eps: float, tol: float,
                    seed: int = 0) -> tuple[Tensor, int, Tensor]:
    r"""The real ``k_diffusion.sampling.log_likelihood(model, x/m, sigma_min, sigma_max, atol=tol, rtol=tol)`` on the
    denoiser of ``(sde, score_fn)``: ``(ll, fevals, probe)``. It returns :math:`\log N(y_T; 0, \sigma_{max}^2 I)` plus
    its integral, in the coordinates :math:`y = x/m`, with one Rademacher probe drawn from the global generator
    (``torch.randint_like``), which is reproduced here by seeding it."""
    den = KDiffusionDenoiser(sde, score_fn)
    te = torch.tensor([eps, sde.T], dtype=x.dtype)
    smin, smax = sigma_of_time(sde, te).tolist()
    y0 = x / sde.mean_coeff(te)[0]
    torch.manual_seed(seed)
    probe = torch.randint_like(y0, 2) * 2 - 1
    torch.manual_seed(seed)
    ll, info = kds.log_likelihood(den, y0, smin, smax, atol=tol, rtol=tol)
    return ll.detach(), int(info["fevals"]), probe


def kdiffusion_reference(sde: sdediff.LinearSDE, score_fn, x: Tensor, eps: float, probe: Tensor) -> Tensor:
    r"""The value :func:`kdiffusion_real` approximates, for its probe: :math:`\log N(y_T; 0, \sigma_{max}^2 I)` at the
    exact latent plus the exact same-probe integral in :math:`y` (ours in :math:`x` less :math:`D\log(m(T)/m(\epsilon))`;
    a Rademacher probe has :math:`z^\top z = D`, so the two coordinates differ by exactly that), solved tightly
    (torchdiffeq dopri8 in ``t``, ``rtol = atol = 1e-10``, per-point error norm)."""
    flow = TimeFlow(sde, score_fn, eps, tuple(x.shape[1:]))

    def field(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        tau = t.clamp(0.0, sde.T).expand(state[0].shape[0])
        ev = flow.evaluate(state[0], tau, probe[:, None])
        return ev.f, ev.h[:, 0]

    xs, ls = odeint(field, (flow.initial_state(x), x.new_zeros(x.shape[0])), flow.span(x), rtol=1e-10, atol=1e-10,
                    method="dopri8")
    latent, delta = flow.finish(xs[-1], ls[-1])
    te = torch.tensor([eps, sde.T], dtype=x.dtype)
    m, smax = sde.mean_coeff(te), float(sigma_of_time(sde, te)[1])
    prior = torch.distributions.Normal(0.0, smax).log_prob(latent / m[1]).flatten(1).sum(1)
    return prior + delta - x[0].numel() * torch.log(m[1] / m[0])


__all__ = ["Outcome", "score_sde", "kdiffusion_exact", "torchdiffeq_plain", "kdiffusion_real", "kdiffusion_reference"]
