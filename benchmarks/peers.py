r"""Drivers of the peers that need more than a function call: diffusers' schedulers and torchode's solvers.

**diffusers.** A scheduler is driven through its own loop, as a pipeline does::

    scheduler.set_timesteps(...)
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(sample, t), t)
        sample = scheduler.step(out, t, sample).prev_sample

on any linear SDE :math:`x_t = m(t)(x_0 + \sigma(t)\varepsilon)`, :math:`\sigma = s/m`. The scheduler's training
schedule is the SDE itself at :data:`N_TRAIN` knots: timestep :math:`k` sits at
:math:`t_k = \epsilon + k(T - \epsilon)/(N - 1)` with :math:`\bar\alpha_k = 1/(1 + \sigma(t_k)^2)` (passed as
``trained_betas``), so timestep 0 is the final time :math:`\epsilon`, timestep :math:`N - 1` is :math:`T`, and the
schedulers' "linspace" spacing is uniform in :math:`t`. Their samples are :math:`x/\sqrt{m^2 + s^2}` (the variance-
preserving form; DPM-Solver, UniPC, DEIS, iPNDM) or :math:`x/m` (the sigma-scaled form of Euler, Heun, LMS); either
way ``scale_model_input`` hands the model :math:`x_{vp} = x/\sqrt{m^2+s^2}`. The model is the exact score at the
noise level :math:`\sigma` the scheduler's update assumes (``scheduler.sigmas[step_index]``; iPNDM:
``betas / alphas``), through :class:`sdediff.interop.kdiffusion.KDiffusionDenoiser`:
:math:`\hat\varepsilon = (y - D(y, \sigma))/\sigma` with :math:`y = x_{vp}\sqrt{1 + \sigma^2}`, or, for iPNDM (a
v-prediction scheduler), :math:`\hat v = (\hat\varepsilon - \beta x_{vp})/\alpha` with
:math:`\alpha = 1/\sqrt{1+\sigma^2}`, :math:`\beta = \sigma\alpha`. The rounding of a discrete model's timestep
therefore does not enter: what is measured is the scheduler's update.

Every loop ends at :math:`\sigma(\epsilon)`: the schedulers are configured with ``final_sigmas_type="sigma_min"``
where they offer it, and the loop stops before a model call that would start a step from the schedule's smallest
positive noise level (a step to :math:`\sigma = 0` or a no-op step from :math:`\sigma_{min}` to itself, which some
schedules append). The NFE is the number of model calls the loop made; :meth:`DiffusersLoop.steps_for_budget` finds
the largest ``num_inference_steps`` whose loop stays within a budget. A loop that ends anywhere but at
:math:`\sigma(\epsilon)` raises. Standard schedules are the schedulers' own options (``timestep_spacing`` linspace
and trailing, ``use_karras_sigmas``, ``use_exponential_sigmas``, ``use_lu_lambdas``; iPNDM's
:math:`\beta = \sin^2(\pi s/2)` rule on :math:`s` uniform, restricted to :math:`[\sigma(\epsilon), \sigma(T)]`);
"custom" schedules pass sdediff's grids through ``timesteps=`` (DPM-Solver: rounded to the knots; Heun:
fractional), ``sigmas=`` (Euler) or ``trained_betas`` (iPNDM), where the scheduler accepts them.

**torchode.** :func:`torchode_solve` integrates the same probability flow with torchode's per-sample adaptive
dopri5 or tsit5 and its PID controller (torchode's defaults: ``pcoeff=0.2, icoeff=0.5, dcoeff=0``). torchode
evaluates the whole batch at every iteration, so its NFE per sample is its number of batch evaluations.

**k-diffusion, torchdiffeq, torchsde.** :func:`kd_sample`, :func:`torchdiffeq_sample` and :func:`torchsde_sample`
run those libraries' samplers on the same problems (benchmarks/README.md describes the conventions).

Nothing here is part of the ``sdediff`` package; the scripts import this file by its plain name (benchmarks/README.md).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import common  # a sibling script (benchmarks/README.md)
import torch
import torchdiffeq
import torchsde
from torch import Tensor

import sdediff
from sdediff.interop.kdiffusion import KDiffusionDenoiser, sigma_of_time
from sdediff.solvers.grids import GRIDS

ScoreFn = Callable[[Tensor, Tensor], Tensor]
#: knots of the scheduler's training schedule (diffusers' usual num_train_timesteps)
N_TRAIN = 1000
#: a model of the loop: (x_vp, sigma, timestep) -> the scheduler's prediction
Model = Callable[[Tensor, float, Tensor], Tensor]


@cache
def load_diffusers() -> tuple[Any, str]:
    """``(diffusers module, note)``, or ``(None, why)`` when it is not installed."""
    try:
        import diffusers
        from diffusers.utils import logging as dlogging
    except ImportError as err:
        return None, f"diffusers not available ({err}); pip install -e '.[bench]'"
    dlogging.set_verbosity_error()
    return diffusers, f"diffusers {diffusers.__version__}"


@dataclass(frozen=True)
class SchedulerSpec:
    """One diffusers scheduler configuration.

    ``schedules`` are its standard schedules (keys of :data:`SCHEDULE_CONFIG`); ``custom`` says how it takes an
    sdediff grid (``"timesteps"``: integer knots, ``"timesteps_float"``: fractional knots, ``"sigmas"``, ``"betas"``:
    iPNDM's ``trained_betas``; ``None``: it takes none). ``sigma_scaled``: its sample is :math:`x/m` (else
    :math:`x/\\sqrt{m^2+s^2}`). ``prediction``: ``"epsilon"`` or ``"v_prediction"``.
    """

    label: str
    cls: str
    config: dict[str, Any] = field(default_factory=dict)
    schedules: tuple[str, ...] = ("linspace", "trailing", "karras", "exponential")
    custom: str | None = None
    prediction: str = "epsilon"
    sigma_scaled: bool = False

    def schedule_names(self, custom: bool = True) -> list[str]:
        """Its standard schedules, then (with ``custom``) ``custom:GRID`` for every sdediff grid it accepts."""
        return [*self.schedules, *([f"custom:{g}" for g in GRIDS] if custom and self.custom else [])]


#: the config options of each standard schedule
SCHEDULE_CONFIG: dict[str, dict[str, Any]] = {
    "linspace": {"timestep_spacing": "linspace"}, "trailing": {"timestep_spacing": "trailing"},
    "karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True},
    "lu": {"use_lu_lambdas": True}, "ipndm": {},
}
_FINAL = {"final_sigmas_type": "sigma_min"}
_DPM_SCHEDULES = ("linspace", "trailing", "karras", "lu", "exponential")
SCHEDULERS: list[SchedulerSpec] = [
    SchedulerSpec("DPMSolverMultistep dpmsolver++ 2M", "DPMSolverMultistepScheduler",
                  {"algorithm_type": "dpmsolver++", "solver_order": 2, **_FINAL}, _DPM_SCHEDULES, "timesteps"),
    SchedulerSpec("DPMSolverMultistep dpmsolver++ 3M", "DPMSolverMultistepScheduler",
                  {"algorithm_type": "dpmsolver++", "solver_order": 3, **_FINAL}, _DPM_SCHEDULES, "timesteps"),
    SchedulerSpec("DPMSolverMultistep dpmsolver 2M", "DPMSolverMultistepScheduler",
                  {"algorithm_type": "dpmsolver", "solver_order": 2, **_FINAL}, _DPM_SCHEDULES, "timesteps"),
    SchedulerSpec("UniPCMultistep bh1 2", "UniPCMultistepScheduler", {"solver_type": "bh1", "solver_order": 2, **_FINAL}),
    SchedulerSpec("UniPCMultistep bh2 2", "UniPCMultistepScheduler", {"solver_type": "bh2", "solver_order": 2, **_FINAL}),
    SchedulerSpec("UniPCMultistep bh2 3", "UniPCMultistepScheduler", {"solver_type": "bh2", "solver_order": 3, **_FINAL}),
    SchedulerSpec("DEISMultistep 2", "DEISMultistepScheduler", {"solver_order": 2}),
    SchedulerSpec("DEISMultistep 3", "DEISMultistepScheduler", {"solver_order": 3}),
    SchedulerSpec("IPNDM", "IPNDMScheduler", {}, ("ipndm",), "betas", prediction="v_prediction"),
    SchedulerSpec("EulerDiscrete", "EulerDiscreteScheduler", dict(_FINAL), custom="sigmas", sigma_scaled=True),
    SchedulerSpec("HeunDiscrete", "HeunDiscreteScheduler", {}, ("linspace", "karras", "exponential"), "timesteps_float",
                  sigma_scaled=True),
    SchedulerSpec("LMSDiscrete", "LMSDiscreteScheduler", {}, ("linspace", "karras", "exponential"), sigma_scaled=True),
]


class DiffusersLoop:
    """diffusers' schedulers on one linear SDE and final time (module docstring): build, budget and run them."""

    def __init__(self, sde: sdediff.LinearSDE, eps: float, n_train: int = N_TRAIN) -> None:
        diffusers, note = load_diffusers()
        if diffusers is None:
            raise ImportError(note)
        self.diffusers, self.sde, self.eps, self.n_train = diffusers, sde, eps, n_train
        self.knots = torch.linspace(eps, sde.T, n_train, dtype=torch.float64)
        alpha_bar = 1 / (1 + sigma_of_time(sde, self.knots) ** 2)
        self.trained_betas = (1 - alpha_bar / torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])).tolist()
        self.sigma_T, self.sigma_eps = (float(v) for v in sigma_of_time(sde, torch.tensor([sde.T, eps])))
        self._cost: dict[tuple[str, str], tuple[float, float]] = {}
        self._nfe: dict[tuple[str, str, int], int] = {}

    # --- building --------------------------------------------------------------------------------------------
    def scheduler(self, spec: SchedulerSpec, schedule: str, steps: int) -> Any:
        """``spec``'s scheduler with ``schedule`` after ``set_timesteps`` for ``steps`` inference steps."""
        cls = getattr(self.diffusers, spec.cls)
        config = {"num_train_timesteps": self.n_train, **spec.config}
        kwargs: dict[str, Any] = {}
        if schedule.startswith("custom:"):
            if spec.custom is None:
                raise ValueError(f"{spec.label} takes no custom timesteps or sigmas")
            sigmas = sigma_of_time(self.sde, GRIDS[schedule[len("custom:"):]](self.sde, steps, self.eps))
            kwargs, betas = self._custom(spec.custom, sigmas)
        else:
            config.update(SCHEDULE_CONFIG[schedule])
            betas = self._ipndm_betas(steps) if spec.custom == "betas" else None
        if spec.custom == "betas":
            sched = cls(**config, trained_betas=betas)
            sched.set_timesteps(steps)
        else:
            sched = cls(**config, trained_betas=self.trained_betas, prediction_type=spec.prediction)
            sched.set_timesteps(**(kwargs or {"num_inference_steps": steps}))
        return sched

    def _custom(self, how: str, sigmas: Tensor) -> tuple[dict[str, Any], list[float] | None]:
        """``set_timesteps`` arguments (or iPNDM's betas) for the noise levels ``sigmas`` (``steps + 1``, ending at
        :math:`\\sigma(\\epsilon)`)."""
        if how == "sigmas":
            return {"sigmas": sigmas.tolist()}, None
        if how == "betas":
            return {}, (sigmas / (1 + sigmas**2).sqrt()).tolist()
        times = self.sde.time_of_log_snr(-2 * sigmas.log(), self.eps)
        knots = (times - self.eps) / (self.sde.T - self.eps) * (self.n_train - 1)
        if how == "timesteps_float":  # Heun: fractional timesteps, the last one (timestep 0) included
            knots[-1] = 0.0
            return {"timesteps": knots.tolist()}, None
        ks = knots[:-1].round().long()  # DPM-Solver: integer timesteps; its final sigma is timestep 0's
        if not (bool((ks[1:] < ks[:-1]).all()) and int(ks[-1]) > 0):
            raise ValueError(f"the grid does not fit {self.n_train} integer timesteps (two steps share a knot)")
        return {"timesteps": ks.tolist()}, None

    def _ipndm_betas(self, steps: int) -> list[float]:
        r"""iPNDM's own rule :math:`\beta = \sin^2(\pi s/2)` on :math:`s` uniform between its values at
        :math:`\sigma(T)` and :math:`\sigma(\epsilon)`."""
        ends = torch.tensor([self.sigma_T, self.sigma_eps], dtype=torch.float64)
        s_T, s_eps = (2 / math.pi * (ends / (1 + ends**2).sqrt()).sqrt().asin()).tolist()
        s = torch.linspace(s_T, s_eps, steps + 1, dtype=torch.float64)
        return (torch.sin(math.pi * s / 2) ** 2).tolist()

    # --- running ---------------------------------------------------------------------------------------------
    @staticmethod
    def current_sigma(sched: Any) -> float:
        """The noise level of the scheduler's current sample (iPNDM: ``betas / alphas``)."""
        i = sched.step_index or 0
        if hasattr(sched, "ets"):  # iPNDM
            return float(sched.betas[i] / sched.alphas[i])
        return float(sched.sigmas[i])

    def loop(self, sched: Any, model: Model, sample: Tensor) -> tuple[Tensor, int]:
        """Run ``sched``'s loop from ``sample`` (module docstring: where it stops); ``(sample, model calls)``."""
        if hasattr(sched, "ets"):
            floor = 0.0  # iPNDM's timesteps end before its final level: no step to skip
        else:
            floor = float(sched.sigmas[sched.sigmas > 0].min()) * (1 + 1e-6)
        calls = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for t in sched.timesteps:
                sigma = self.current_sigma(sched)
                if sigma <= floor and getattr(sched, "state_in_first_order", True):
                    break
                out = model(sched.scale_model_input(sample, t), sigma, t)
                calls += 1
                sample = sched.step(out, t, sample).prev_sample
        end = self.current_sigma(sched)
        if abs(end / self.sigma_eps - 1) > 1e-3:
            raise ValueError(f"the loop ends at sigma = {end:.6g}, not sigma(eps) = {self.sigma_eps:.6g}")
        return sample, calls

    def nfe(self, spec: SchedulerSpec, schedule: str, steps: int) -> int:
        """Model calls of the loop with ``steps`` inference steps (a dry run on one scalar sample, remembered)."""
        key = (spec.label, schedule, steps)
        if key not in self._nfe:
            self._nfe[key] = self.loop(self.scheduler(spec, schedule, steps), lambda x, sigma, t: torch.zeros_like(x),
                                       torch.ones(1, 1, dtype=torch.float64))[1]
        return self._nfe[key]

    def steps_for_budget(self, spec: SchedulerSpec, schedule: str, budget: int) -> tuple[int, int] | None:
        """``(num_inference_steps, NFE)``: the most steps whose loop makes at most ``budget`` model calls (``None``
        if even one step does not fit or the schedule cannot be built)."""
        key = (spec.label, schedule)
        try:
            if key not in self._cost:  # NFE ~ a steps + b, from dry runs of 4 and 8 steps
                n4, n8 = self.nfe(spec, schedule, 4), self.nfe(spec, schedule, 8)
                self._cost[key] = ((n8 - n4) / 4, n4 - (n8 - n4))
            a, b = self._cost[key]
            steps = max(1, int((budget - b) // a)) if a > 0 else 1
            while steps > 1 and self.nfe(spec, schedule, steps) > budget:
                steps -= 1
            while self.nfe(spec, schedule, steps + 1) <= budget:
                steps += 1
            nfe = self.nfe(spec, schedule, steps)
        except (ValueError, RuntimeError, IndexError):
            return None
        return (steps, nfe) if nfe <= budget else None

    def exact_model(self, spec: SchedulerSpec, score_fn: Callable[[Tensor, Tensor], Tensor]) -> Model:
        """The model of ``score_fn`` in ``spec``'s prediction (module docstring), in float64."""
        denoiser = KDiffusionDenoiser(self.sde, score_fn)

        def model(x_vp: Tensor, sigma: float, t: Tensor) -> Tensor:
            y = x_vp * math.sqrt(1 + sigma**2)
            eps_hat = (y - denoiser(y, torch.full((len(y),), sigma, dtype=y.dtype, device=y.device))) / sigma
            if spec.prediction == "epsilon":
                return eps_hat
            alpha = 1 / math.sqrt(1 + sigma**2)
            return (eps_hat - sigma * alpha * x_vp) / alpha

        return model

    def scale(self, spec: SchedulerSpec, t: float) -> float:
        """``x = scale * sample`` at time ``t``: :math:`m(t)` for a sigma-scaled scheduler, else
        :math:`\\sqrt{m^2 + s^2}`."""
        tt = torch.tensor([t], dtype=torch.float64)
        m, s = float(self.sde.mean_coeff(tt)), float(self.sde.marginal_std(tt))
        return m if spec.sigma_scaled else math.hypot(m, s)

    def sample(self, spec: SchedulerSpec, schedule: str, steps: int, score_fn: Callable[[Tensor, Tensor], Tensor],
               x_T: Tensor, model: Model | None = None) -> tuple[Tensor, int]:
        """``x_eps`` from ``x_T`` through ``spec``'s loop on ``schedule`` with ``steps`` inference steps, and its
        NFE; the model is the exact one of ``score_fn`` unless ``model`` is given."""
        sched = self.scheduler(spec, schedule, steps)
        model = self.exact_model(spec, score_fn) if model is None else model
        out, calls = self.loop(sched, model, x_T / self.scale(spec, self.sde.T))
        return out * self.scale(spec, self.eps), calls


def diffusers_runs(loop: DiffusersLoop, specs: Sequence[SchedulerSpec], budgets: Sequence[int],
                   custom: bool = True) -> list[tuple[SchedulerSpec, str, int, int, int]]:
    """Every ``(spec, schedule, budget, steps, nfe)`` that fits its budget (schedules that cannot be built at a
    budget are left out)."""
    out = []
    for spec in specs:
        for schedule in spec.schedule_names(custom):
            for budget in budgets:
                fit = loop.steps_for_budget(spec, schedule, budget)
                if fit is not None:
                    out.append((spec, schedule, budget, *fit))
    return out


# --------------------------------------------------------------------------------------------------
# torchode
# --------------------------------------------------------------------------------------------------
TORCHODE_METHODS = ("dopri5", "tsit5")


@dataclass
class TorchodeResult:
    """A torchode solve: the end states, batch evaluations (= NFE per sample: the whole batch is evaluated at every
    iteration), steps per sample, status codes and wall seconds."""

    x: Tensor
    calls: int
    steps: Tensor
    accepted: Tensor
    status: Tensor
    seconds: float


def load_torchode() -> tuple[Any, str]:
    """``(torchode module, note)``, or ``(None, why)``."""
    try:
        import torchode
    except ImportError as err:
        return None, f"torchode not available ({err}); pip install -e '.[bench]'"
    return torchode, f"torchode {torchode.__version__}"


def torchode_solve(sde: sdediff.LinearSDE, score_fn: Callable[[Tensor, Tensor], Tensor], x_T: Tensor, eps: float,
                   method: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5, max_steps: int = 10_000) -> TorchodeResult:
    """The probability flow from ``x_T`` at ``T`` to ``eps`` with torchode's per-sample adaptive ``method`` and its PID
    controller (``pcoeff=0.2, icoeff=0.5, dcoeff=0``) at ``rtol``, ``atol``."""
    to, note = load_torchode()
    if to is None:
        raise ImportError(note)
    flow = sde.probability_flow(score_fn)
    shape, calls = x_T.shape, [0]

    def f(t: Tensor, y: Tensor) -> Tensor:
        calls[0] += 1
        return flow.drift(y.view(shape), t).reshape(len(y), -1)

    term = to.ODETerm(f)
    stepper = {"dopri5": to.Dopri5, "tsit5": to.Tsit5}[method](term=term)
    controller = to.PIDController(atol=atol, rtol=rtol, pcoeff=0.2, icoeff=0.5, dcoeff=0.0, term=term)
    solver = to.AutoDiffAdjoint(stepper, controller, max_steps=max_steps)
    t_eval = torch.tensor([sde.T, eps], dtype=x_T.dtype, device=x_T.device).repeat(len(x_T), 1)
    start = time.perf_counter()
    sol = solver.solve(to.InitialValueProblem(y0=x_T.reshape(len(x_T), -1), t_eval=t_eval))
    seconds = time.perf_counter() - start
    return TorchodeResult(x=sol.ys[:, -1].reshape(shape), calls=calls[0], steps=sol.stats["n_steps"],
                          accepted=sol.stats["n_accepted"], status=sol.status, seconds=seconds)


# --------------------------------------------------------------------------------------------------
# k-diffusion, torchdiffeq, torchsde: (problem, steps or tol) -> (x_eps, NFE)
# --------------------------------------------------------------------------------------------------
#: torchsde methods on the reverse SDE (u = T - t): name -> (sde_type, Levy-area approximation)
TORCHSDE_METHODS = {"euler": ("ito", "none"), "srk": ("ito", "space-time"), "reversible_heun": ("stratonovich", "none")}


def kd_sample(sde: sdediff.LinearSDE, score_fn: ScoreFn, x_T: Tensor, eps: float, kd_name: str, sigmas: Tensor,
              generator: torch.Generator) -> tuple[Tensor, int]:
    r"""k-diffusion's sampler ``kd_name`` (a key of ``common.KD_SAMPLERS``) from ``x_T`` over the noise levels ``sigmas``
    (ending at :math:`\sigma(\epsilon)`): runs on :math:`y = x/m` with the denoiser of ``score_fn``; ``(x_eps, NFE)``."""
    kds, note = common.load_kdiffusion()
    if kds is None:
        raise ImportError(note)
    denoiser = common.Counted(common.KDenoiser(sde, score_fn, eps))
    T = torch.tensor([sde.T], dtype=x_T.dtype, device=x_T.device)
    y = x_T / sde.mean_coeff(T)
    kwargs: dict[str, Any] = {"disable": True}
    noise = common.kd_noise_sampler(kds, kd_name, y, sigmas, generator)
    if noise is not None:
        kwargs["noise_sampler"] = noise
    with warnings.catch_warnings():  # torchsde rounds the Brownian tree's end times: queries at them warn
        warnings.filterwarnings("ignore", message="Should have t[ab]")
        y = getattr(kds, common.KD_SAMPLERS[kd_name][0])(denoiser, y, sigmas.to(x_T.device), **kwargs)
    return sde.mean_coeff(torch.tensor([eps], dtype=y.dtype, device=y.device)) * y, denoiser.calls


def torchdiffeq_sample(sde: sdediff.LinearSDE, score_fn: ScoreFn, x_T: Tensor, eps: float, method: str, steps: int,
                       tol: float | None) -> tuple[Tensor, int]:
    """torchdiffeq's ``odeint`` of the probability flow: ``steps`` uniform steps, or adaptive at ``rtol = atol = tol``."""
    counted = common.Counted(score_fn)
    flow = sde.probability_flow(counted)
    if tol is None:
        ts = torch.linspace(sde.T, eps, steps + 1, dtype=x_T.dtype, device=x_T.device)
        out = torchdiffeq.odeint(flow, x_T, ts, method=method)
    else:
        ts = torch.tensor([sde.T, eps], dtype=x_T.dtype, device=x_T.device)
        out = torchdiffeq.odeint(flow, x_T, ts, method=method, rtol=tol, atol=tol)
    return out[-1], counted.calls


def torchsde_sample(sde: sdediff.LinearSDE, score_fn: ScoreFn, x_T: Tensor, eps: float, method: str, steps: int,
                    generator: torch.Generator) -> tuple[Tensor, int]:
    """torchsde's ``sdeint`` of the reverse SDE in reversed time with a seeded ``BrownianInterval``."""
    counted = common.Counted(score_fn)
    sde_type, levy = TORCHSDE_METHODS[method]
    adapter = sde.reverse(counted).as_torchsde(x_T.shape, sde_type=sde_type)
    span = sde.T - eps
    y0 = x_T.reshape(x_T.shape[0], -1)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    bm = torchsde.BrownianInterval(t0=0.0, t1=span, size=y0.shape, dtype=y0.dtype, device=y0.device, entropy=seed,
                                   levy_area_approximation=levy)
    ts = torch.tensor([0.0, span], dtype=y0.dtype, device=y0.device)
    # a hair over span / steps, so that rounding does not add a sliver of a step at the end
    out = torchsde.sdeint(adapter, y0, ts, bm=bm, method=method, dt=span / steps * (1 + 1e-9))
    return adapter.unflatten(out[-1]), counted.calls
