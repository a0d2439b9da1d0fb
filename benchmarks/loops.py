"""Minimal hand-written loops of the fixed-step updates with a short closed form (Euler, Heun, Euler-Maruyama, reverse
diffusion, ancestral, PC, Langevin): coefficients precomputed as Python floats, no checks, out-of-place tensor ops.
``overhead.py`` times them as the floor of each update (for the SDE solvers drawing the noise is part of it).

Nothing here is part of the ``sdediff`` package; the scripts import this file by its plain name (benchmarks/README.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

import sdediff


def _coeffs(sde: sdediff.LinearSDE, ts: Tensor) -> dict[str, list[float]]:
    t = ts.to(torch.float64).cpu()
    t_next, t_now = t[1:], t[:-1]
    r, sigma = sde.transition(t_now, t_now - t_next)
    return {"t": t_now.tolist(), "t_next": t_next.tolist(), "h": (t_next - t_now).tolist(),
            "a": sde.drift_coef(t_now).tolist(), "a_next": sde.drift_coef(t_next).tolist(),
            "g2": (sde.diffusion(t_now) ** 2).tolist(), "g2_next": (sde.diffusion(t_next) ** 2).tolist(),
            "r": r.tolist(), "sigma": sigma.tolist(),
            "std_ratio": (sde.marginal_std(t_next) / sde.marginal_std(t_now)).tolist(),
            "alpha_next": sde.discrete_alpha(t_next, t_now - t_next).tolist()}


def _tb(ts: Tensor, n: int) -> list[Tensor]:
    return [ts[i].expand(n) for i in range(len(ts))]


def loop_euler(net, sde, x, ts, gen):
    c, tb = _coeffs(sde, ts), _tb(ts, x.shape[0])
    for i, h in enumerate(c["h"]):
        x = x + h * (c["a"][i] * x - 0.5 * c["g2"][i] * net(x, tb[i]))
    return x


def loop_heun(net, sde, x, ts, gen):
    c, tb = _coeffs(sde, ts), _tb(ts, x.shape[0])
    for i, h in enumerate(c["h"]):
        d = c["a"][i] * x - 0.5 * c["g2"][i] * net(x, tb[i])
        x2 = x + h * d
        d2 = c["a_next"][i] * x2 - 0.5 * c["g2_next"][i] * net(x2, tb[i + 1])
        x = x + (0.5 * h) * (d + d2)
    return x


def loop_euler_maruyama(net, sde, x, ts, gen):
    c, tb = _coeffs(sde, ts), _tb(ts, x.shape[0])
    for i, h in enumerate(c["h"]):
        z = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        x = x + h * (c["a"][i] * x - c["g2"][i] * net(x, tb[i])) + math.sqrt(-h * c["g2"][i]) * z
    return x


def loop_reverse_diffusion(net, sde, x, ts, gen):
    c, tb = _coeffs(sde, ts), _tb(ts, x.shape[0])
    for i in range(len(c["h"])):
        z = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        r, G = c["r"][i], c["sigma"][i]
        x = x - (r - 1) * x + G**2 * net(x, tb[i]) + G * z
    return x


def loop_ancestral(net, sde, x, ts, gen):
    c, tb = _coeffs(sde, ts), _tb(ts, x.shape[0])
    for i in range(len(c["h"])):
        z = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        r, s = c["r"][i], c["sigma"][i]
        x = (x + s**2 * net(x, tb[i])) / r + (s * c["std_ratio"][i]) * z
    return x


def _langevin(net, x, t, alpha, snr, gen):
    score = net(x, t)
    z = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    ratio = z.flatten(1).norm(dim=1).mean() / score.flatten(1).norm(dim=1).mean()
    step = 2 * alpha * (snr * ratio) ** 2
    return x + step * score + (2 * step).sqrt() * z


def loop_pc(net, sde, x, ts, gen, snr=0.16):
    c, tb = _coeffs(sde, ts), _tb(ts, x.shape[0])
    for i in range(len(c["h"])):
        z = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        r, G = c["r"][i], c["sigma"][i]
        x = x - (r - 1) * x + G**2 * net(x, tb[i]) + G * z
        x = _langevin(net, x, tb[i + 1], c["alpha_next"][i], snr, gen)
    return x


def loop_langevin(net, sde, x, ts, gen, snr=0.16):
    c, tb = _coeffs(sde, ts), _tb(ts, x.shape[0])
    for i in range(len(c["h"])):
        x = _langevin(net, x, tb[i + 1], c["alpha_next"][i], snr, gen)
    return x


#: sdediff solver name -> its hand-written loop (options of the spec must be the defaults the loop assumes)
LOOPS: dict[str, Callable[..., Tensor]] = {
    "euler": loop_euler, "heun": loop_heun, "euler_maruyama": loop_euler_maruyama,
    "reverse_diffusion": loop_reverse_diffusion, "ancestral": loop_ancestral, "pc": loop_pc, "langevin": loop_langevin,
}
