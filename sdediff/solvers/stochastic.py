r"""Fast stochastic samplers: DDPM ancestral sampling, SDE-DPM-Solver++ and torchsde's SDE solvers.

Notation as on the docs' Concepts page: the kernel of a linear SDE is :math:`N(m(t)x_0, s(t)^2 I)`, the half log-SNR is
:math:`\lambda(t) = \log(m(t)/s(t))` (half of :meth:`LinearSDE.log_snr`), and
:math:`\hat x_0 = (x + s^2 s_\theta(x,t))/m` is Tweedie's data prediction. Times run backwards, from
``t`` to ``t_next < t``; :math:`\lambda` increases along the way.
"""

from __future__ import annotations

import itertools
import math
import warnings

import torch
import torchsde
from torch import Tensor
from tqdm.auto import tqdm

from .._utils import all_finite
from .._validate import check_bool, check_choice, check_float
from ..processes import ReverseProcess
from ..sdes.linear import LinearSDE
from .base import Callback, FixedStepSolver, Solution, Solver, register_solver
from .sde import Ancestral
from .tables import LinearScheme, kernel, work_dtype


@register_solver("ddpm")
class DDPM(Ancestral):
    r"""DDPM's ancestral sampler (Ho et al. 2020) for any linear SDE: :class:`~sdediff.solvers.Ancestral`
    under DDPM's name, with DDPM's noise :math:`\sigma_t^2 = \beta_t` by default.

    .. math::  x \leftarrow \frac{x + \sigma^2 s_\theta(x, t)}{r} + \tilde\sigma\,z, \qquad
               \tilde\sigma^2 = \sigma^2 \ (\text{"beta"}) \ \text{ or } \
               \sigma^2 s(t_{next})^2/s(t)^2 \ (\text{"posterior"}),

    with :math:`x_t = r\,x_{t_{next}} + \sigma z` the exact forward transition; for VP,
    :math:`r = \sqrt{\alpha_t}` and :math:`\sigma^2 = \beta_t = 1 - \alpha_t`, which is DDPM's
    :math:`x_{t-1} = (x_t - \beta_t\hat\epsilon/\sqrt{1-\bar\alpha_t})/\sqrt{\alpha_t} + \sigma_t z`.

    Parameters
    ----------
    variance : {"beta", "posterior"}
        ``"beta"`` (default) is DDPM's :math:`\sigma_t^2 = \beta_t` ("fixedlarge", the choice of DDPM's
        CIFAR-10 runs and of score_sde's VP ancestral predictor); ``"posterior"`` is
        :math:`\tilde\beta_t = \beta_t(1-\bar\alpha_{t-1})/(1-\bar\alpha_t)` ("fixedsmall"), which is what
        ``"ancestral"`` uses by default.
    """

    def __init__(self, variance: str = "beta") -> None:
        super().__init__(variance=variance)


@register_solver("sde_dpm_solver")
class SDEDPMSolver(FixedStepSolver):
    r"""SDE-DPM-Solver++ (Lu et al. 2022): an exponential integrator of the reverse SDE in data prediction.

    Written in :math:`\lambda = \log(m/s)` with :math:`h = \lambda(t_{next}) - \lambda(t) > 0`, the reverse
    SDE's linear part and noise are integrated exactly and only :math:`\hat x_0` is approximated. With
    :math:`\hat x_0` held constant over the step (order 1):

    .. math::  x \leftarrow \frac{s_{next}}{s}\,e^{-h}\,x + m_{next}\,(1 - e^{-2h})\,\hat x_0
               + s_{next}\sqrt{1 - e^{-2h}}\,z,

    which is exactly the ancestral step with the posterior variance (``"ancestral"``). The multistep
    method (2M) extrapolates :math:`\hat x_0` linearly in :math:`\lambda` through the previous step's
    :math:`\hat x_0^{prev}` at :math:`\lambda_{prev}`, slope :math:`D = (\hat x_0 - \hat x_0^{prev})/h_{prev}`
    with :math:`h_{prev} = \lambda(t) - \lambda_{prev}`, and adds

    .. math::  m_{next}\,c(h)\,D, \qquad c(h) = 2\int_0^h e^{-2(h-u)}\,u\,du = h - \tfrac12(1 - e^{-2h})
               \quad \text{(the line integrated exactly, } \texttt{"heun"}\text{)},

    or Lu et al.'s cheaper :math:`c(h) = \tfrac h2(1 - e^{-2h})` (``"midpoint"``); both are
    :math:`h^2 + O(h^3)`, so both are second order. One score evaluation per step. Needs a
    :class:`~sdediff.LinearSDE`.

    Parameters
    ----------
    order : {1, 2}
        ``2`` (default) for SDE-DPM-Solver++(2M), ``1`` for the first-order step alone (a stochastic
        DDIM with :math:`\eta = 1`). The first step has no history and is always first order.
    solver_type : {"midpoint", "heun"}
        The coefficient :math:`c(h)` above. ``"midpoint"`` (default) extrapolates less and was the more
        accurate of the two at 10-50 steps on our Gaussian-mixture tests.
    lower_order_final : bool
        Take the last step with order 1 (default ``True``). On grids uniform in ``t``, VP's last step spans
        a far larger :math:`h` than the one before, and extrapolating over it overshoots (at 100 steps the
        mean log-density error drops from 0.12 to 0.016 nats); on log-SNR-uniform grids it changes little.

    Notes
    -----
    Best used on a grid uniform in log-SNR (``time_grid="log_snr"``, which is the uniform grid for VE).
    """

    stochastic = True
    ORDERS = (1, 2)
    SOLVER_TYPES = ("midpoint", "heun")

    def __init__(self, order: int = 2, solver_type: str = "midpoint", lower_order_final: bool = True) -> None:
        self.order = check_choice("order", order, self.ORDERS)
        self.solver_type = check_choice("solver_type", solver_type, self.SOLVER_TYPES)
        self.lower_order_final = check_bool("lower_order_final", lower_order_final)

    def coefficients(self, sde: LinearSDE, ts: Tensor) -> LinearScheme:
        r"""The step above as :math:`x \leftarrow A\,x + B\,\hat x_0 - D\,\hat x_0^{prev} + C z` (:math:`D = 0` on
        first-order steps), with :math:`\hat x_0 = x/m + (s^2/m)\,s_\theta` the kept prediction."""
        m, s, lam = kernel(sde, ts.to(work_dtype(ts.device)))
        h = lam[1:] - lam[:-1]
        one_minus = -torch.expm1(-2 * h)  # 1 - e^{-2h}
        n = len(h)
        c = 0.5 * h * one_minus if self.solver_type == "midpoint" else h - 0.5 * one_minus
        second = torch.tensor([self.order == 2 and i > 0 and not (self.lower_order_final and i == n - 1)
                               for i in range(n)], device=h.device)
        d = torch.where(second, m[1:] * c / torch.cat([h[:1], h[:-1]]), torch.zeros_like(h))
        p, q = 1 / m[:-1], s[:-1] ** 2 / m[:-1]
        a_x, b_x0 = s[1:] / s[:-1] * torch.exp(-h), m[1:] * one_minus + d
        return LinearScheme(times=ts[:-1], a=a_x + b_x0 * p, b=b_x0 * q, w=-d[:, None], p=p, q=q,
                            noise=s[1:] * one_minus.sqrt())


#: torchsde's methods for diagonal noise: method -> (the SDE form it is written for, its Levy-area approximation).
#: The reverse SDE's noise is additive (it does not depend on ``x``), so its Ito and Stratonovich forms coincide
#: and each method runs in the form it is written for; ``srk`` needs space-time Levy areas and ``log_ode``
#: Foster's, which the Brownian interval provides.
TORCHSDE_METHODS: dict[str, tuple[str, str]] = {
    "euler": ("ito", "none"), "milstein": ("ito", "none"), "srk": ("ito", "space-time"),
    "euler_heun": ("stratonovich", "none"), "heun": ("stratonovich", "none"), "midpoint": ("stratonovich", "none"),
    "reversible_heun": ("stratonovich", "none"), "log_ode": ("stratonovich", "foster"),
}


@register_solver("torchsde")
class TorchSDE(Solver):
    r"""The reverse-time process integrated by torchsde's fixed-step SDE solvers (``"torchsde:<method>"``).

    Solves, in forward time :math:`u = T - t` (:class:`~sdediff.processes.TorchSDEAdapter`),

    .. math::  dy = -\big[f(y, t) - \tfrac12(1+\lambda^2) g(t)^2 s_\theta(y, t)\big]\,du + \lambda g(t)\,dW_u,

    with ``torchsde.sdeint`` on the sampler's time grid: one step of size :math:`\Delta u` per grid
    interval. Works for any :class:`~sdediff.SDE` (no kernel needed) and states of any shape (flattened to
    ``(batch, d)`` for torchsde).

    Parameters
    ----------
    method : str
        A torchsde method for diagonal noise: ``"euler"`` (Euler–Maruyama), ``"milstein"``, ``"srk"``
        (stochastic Runge–Kutta, strong order 1.5), ``"heun"``, ``"euler_heun"``, ``"midpoint"``,
        ``"reversible_heun"`` or ``"log_ode"``. The noise is additive, so Itô and Stratonovich agree and
        each runs in its own form (``euler`` and ``milstein`` coincide: Milstein's correction vanishes). Default
        ``"heun"`` (strong order 1 for additive noise, 2 score evaluations per step; in our Gaussian-mixture
        runs at 50-400 evaluations it was at least as accurate per evaluation as ``euler``, ``midpoint`` and
        ``srk``).
    noise_scale : float
        :math:`\lambda \ge 0` (``1``: the reverse SDE; ``0``: the probability flow).

    Notes
    -----
    - The grid must be uniform (torchsde steps with one fixed ``dt``); other grids raise ``ValueError``.
    - Randomness: one integer seed is drawn from ``generator`` before solving and seeds a
      ``torchsde.BrownianInterval``. The same generator state gives the same samples, but the noise is
      not draw-for-draw that of sdediff's own loop (``"euler_maruyama"`` with the same seed gives other
      samples), and torchsde draws it on the samples' device, so CPU and GPU runs differ.
    - Score evaluations per step: 1 for ``euler``, ``milstein``, ``euler_heun``, ``reversible_heun``; 2 for
      ``heun``, ``midpoint``, ``log_ode``; 10 for ``srk`` (torchsde's diagonal-noise SRK re-evaluates the
      drift of earlier stages). ``sdeint`` adds one evaluation to check shapes, ``reversible_heun`` one
      more to start.
    - ``reversible_heun`` is unstable on the reverse SDE: on :math:`y' = ay` its parasitic root is
      :math:`ah - \sqrt{1 + a^2h^2} \approx -(1 + |a|h)` for :math:`a < 0`, so errors grow like
      :math:`e^{\int |a|\,du}` whatever the step. The reverse drift is dissipative (:math:`a \approx -17`
      throughout for VE), so it needs thousands of steps on VP and diverges on VE. A warning says so.
    - torchsde's loop runs in Python per step (time comparisons on the host, the Brownian interval's tree
      bookkeeping), unlike sdediff's own fixed-step loop; the times are kept on the CPU so that the
      comparisons do not synchronise a GPU.
    """

    stochastic = True
    name_option = "method"

    def __init__(self, method: str = "heun", noise_scale: float = 1.0) -> None:
        if not isinstance(method, str) or method not in TORCHSDE_METHODS:
            raise ValueError(f"unknown torchsde method {method!r}; for the reverse SDE (diagonal noise) torchsde "
                             f"offers: {', '.join(sorted(TORCHSDE_METHODS))}")
        if method == "reversible_heun":
            warnings.warn("torchsde's reversible_heun is unstable on the dissipative reverse-time drift (errors grow "
                          "like exp(integral of |drift Jacobian|) whatever the step): it needs thousands of steps on "
                          "VP and diverges on VE; prefer 'torchsde:heun' or 'torchsde:midpoint'", RuntimeWarning,
                          stacklevel=2)
        self.method = method
        self.noise_scale = check_float("noise_scale", noise_scale, 0.0)

    def solve(self, process: ReverseProcess, x: Tensor, ts: Tensor, *, callback: Callback | None = None,
              progress: bool = False, keep_trajectory: bool = False) -> Solution:
        sde_type, levy_area = TORCHSDE_METHODS[self.method]
        times = ts.detach().to("cpu", torch.float64)
        n = len(times) - 1
        dt = float(times[0] - times[-1]) / n
        tol = 1e-3 * dt + 8 * torch.finfo(ts.dtype).eps * float(times.abs().max())  # rounding of a float32 grid
        if float((times.diff() + dt).abs().max()) > tol:
            raise ValueError(f"solver 'torchsde:{self.method}' steps with one fixed dt and needs a uniform time "
                             "grid; use time_grid='uniform'")
        # grid in u = T - t, accumulated exactly as torchsde advances (u + dt), so each step lands on a grid
        # point and no step is split or interpolated
        u = torch.tensor(list(itertools.accumulate([dt] * n, initial=process.sde.T - float(times[0]))),
                         dtype=torch.float64)
        u_out = u if (keep_trajectory or callback is not None) else u[[0, -1]]

        bar = tqdm(total=n, desc=f"torchsde:{self.method}", disable=not progress, leave=False)

        def score(y: Tensor, t: Tensor) -> Tensor:
            if progress:  # a host sync per evaluation, only with a progress bar
                bar.n = min(n, math.floor((float(times[0]) - float(t[0])) / dt + 1e-6))
                bar.refresh()
            return process.score(y, t)

        tracked = process.sde.reverse(score, self.noise_scale)
        adapter = tracked.as_torchsde(x.shape, sde_type=sde_type)
        generator = process.generator
        seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device if generator else "cpu"))
        bm = torchsde.BrownianInterval(t0=float(u[0]), t1=float(u[-1]), size=(x.shape[0], math.prod(x.shape[1:])),
                                       dtype=x.dtype, device=x.device, entropy=seed, dt=dt,
                                       levy_area_approximation=levy_area)
        try:
            ys = torchsde.sdeint(adapter, x.reshape(x.shape[0], -1), u_out, bm=bm, method=self.method, dt=dt)
        finally:
            bar.close()
        out = ys.reshape(len(u_out), *x.shape)
        if not all_finite(out[-1]):
            raise FloatingPointError(f"solver 'torchsde:{self.method}' produced non-finite values; check the score "
                                     "function and the time grid (eps)")
        if callback is not None:
            for i in range(1, n + 1):
                callback(i - 1, ts[i], out[i])
        return Solution(out[-1], out if keep_trajectory else None)
