r"""diffusers' discrete-time noise-prediction models as continuous-time sdediff models.

A diffusers scheduler knows its noise levels only at the integer timesteps :math:`k = 0, \dots, N-1`:

.. math::  x_k = \sqrt{\bar\alpha_k}\,x_0 + \sqrt{1 - \bar\alpha_k}\,\varepsilon, \qquad
           \bar\alpha_k = \prod_{j \le k}(1 - \beta_j).

:class:`DiscreteVPSDE` puts timestep :math:`k` at the time :math:`t_k = (k+1)/N` (so :math:`T = t_{N-1} = 1`,
with :math:`\bar\alpha = 1` at :math:`t = 0`) and interpolates :math:`\log\bar\alpha` between these knots
:math:`(j/N, \log\bar\alpha_{j-1})`, :math:`j = 0..N` (:math:`\bar\alpha_{-1} = 1`), by a monotone cubic Hermite
interpolant: it passes through every knot, decreases strictly, and has a continuous slope. This is the VP
SDE :math:`dx = -\tfrac12\beta(t)x\,dt + \sqrt{\beta(t)}\,dw` with the continuous
:math:`\beta(t) = -d\log\bar\alpha/dt` (near :math:`-N\log(1 - \beta_k)` around :math:`t_k`); its kernel is
:math:`m(t) = \sqrt{\bar\alpha(t)}`, :math:`s(t) = \sqrt{1 - \bar\alpha(t)}`. At the knots the kernel is exactly
diffusers' (:math:`m(t_k)^2 = \bar\alpha_k`), and the exact transition between neighbouring knots is DDPM's step
(:math:`r^2 = \alpha_k`, :math:`\sigma^2 = \beta_k`). Hence, on the scheduler's timesteps mapped to times
(:func:`scheduler_time_grid`):

- ``sdediff.sample(..., solver="ddim")`` is ``DDIMScheduler`` with ``eta = 0`` (and ``"ddim"`` with ``eta``
  is DDIM with the same ``eta``);
- ``solver="ancestral"`` is ``DDPMScheduler`` with ``variance_type="fixed_small"`` and ``solver="ddpm"`` is
  ``"fixed_large"``, both draw for draw with the same ``torch.Generator``;
- ``solver="dpm_solver"`` (orders 1 and 2, ``solver_type`` and ``prediction`` as the scheduler's, and
  ``lower_order_final="diffusers"`` for its default ``final_sigmas_type="zero"``) is
  ``DPMSolverMultistepScheduler``, and ``solver="edm_heun"`` is ``HeunDiscreteScheduler``;
- diffusers' final step to :math:`\bar\alpha = 1` (``set_alpha_to_one``, DDPM's last step, the step to
  :math:`\sigma = 0`) is sdediff's ``denoise=True``, Tweedie's :math:`\hat x_0`;

and every other sdediff solver, time grid and the exact likelihood run on the same model in continuous time.

The score (:func:`from_diffusers`) calls the network at the fractional timestep :math:`k(t) = Nt - 1` (clamped
to :math:`[0, N-1]`; ``timesteps="nearest"`` rounds it) and converts its output with
:func:`sdediff.score.to_score`: :math:`\nabla\log p_t = -\hat\varepsilon/s` for ``"epsilon"``,
:math:`(m\hat x_0 - x)/s^2` for ``"sample"`` and, for ``"v_prediction"``
(:math:`\hat v = m\hat\varepsilon - s\hat x_0`), :math:`\hat\varepsilon = s x + m\hat v`.

Nothing here imports diffusers: a scheduler is anything with ``alphas_cumprod`` (and, for
:func:`scheduler_time_grid`, ``timesteps``), a model anything called as ``model(x, timestep, **kwargs)`` that
returns a tensor, a tuple whose first item is one, or an object with a ``.sample`` tensor (diffusers'
``UNet2DOutput``). Install diffusers itself with ``pip install "sdediff[diffusers]"``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._validate import check_choice
from ..score import ScoreModel
from ..sdes.linear import LinearSDE
from ..sdes.registry import register_sde

__all__ = ["DiscreteVPSDE", "DiffusersModel", "from_diffusers", "scheduler_time_grid", "monotone_slopes", "PREDICTION_TYPES"]

#: diffusers' ``prediction_type`` -> sdediff's prediction name (see :mod:`sdediff.score`)
PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
TIMESTEP_MODES = ("continuous", "nearest")


def _alphas_cumprod(value: Any) -> Tensor:
    """``alphas_cumprod`` as a validated float64 CPU tensor: 1-d, at least 2 values, strictly decreasing in (0, 1)."""
    if isinstance(value, Tensor):
        out = value.detach().to("cpu", torch.float64)
    else:
        try:
            out = torch.as_tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"alphas_cumprod must be a tensor or array-like of floats, got {type(value).__name__}") from err
    if out.dim() != 1 or len(out) < 2:
        raise ValueError(f"alphas_cumprod must be 1-d with at least 2 values, got shape {tuple(out.shape)}")
    if not (torch.isfinite(out).all() and (out > 0).all() and (out < 1).all()):
        raise ValueError("alphas_cumprod must lie in the open interval (0, 1); a zero-terminal-SNR schedule "
                         "(rescale_betas_zero_snr) has alphas_cumprod[-1] = 0: clamp it to a small positive value")
    if not (out[1:] < out[:-1]).all():
        raise ValueError("alphas_cumprod must be strictly decreasing")
    return out


def monotone_slopes(y: Tensor) -> Tensor:
    r"""Slopes for a monotone cubic Hermite interpolant of equally spaced knots ``y`` (unit spacing, at least 3 values).

    With the secants :math:`\delta_j = y_{j+1} - y_j`: the second-order estimates :math:`(\delta_{j-1} + \delta_j)/2`
    inside and :math:`(3\delta_0 - \delta_1)/2`, :math:`(3\delta_{N-1} - \delta_{N-2})/2` at the ends, passed through
    Hyman's filter: 0 where the neighbouring secants (or the slope and its secant) differ in sign, and at most 3 times
    the smaller neighbouring secant in size. The interpolant is then monotone wherever the data are (Fritsch &
    Carlson's condition), and where no limit acts its error is :math:`O(h^3)`, its slope's :math:`O(h^2)`.
    """
    delta = y[1:] - y[:-1]
    estimate = torch.cat([(3 * delta[:1] - delta[1:2]) / 2, (delta[:-1] + delta[1:]) / 2,
                          (3 * delta[-1:] - delta[-2:-1]) / 2])
    left, right = torch.cat([delta[:1], delta]), torch.cat([delta, delta[-1:]])  # the secants beside each knot
    bound = 3 * torch.minimum(left.abs(), right.abs())
    keep = (left * right > 0) & (estimate * right > 0)
    return torch.where(keep, estimate.sign() * torch.minimum(estimate.abs(), bound), 0.0)


@register_sde
class DiscreteVPSDE(LinearSDE):
    r"""The VP SDE whose kernel passes through a discrete schedule :math:`\bar\alpha_0 > \dots > \bar\alpha_{N-1}`.

    Timestep :math:`k` sits at :math:`t_k = (k+1)/N`. With :math:`y_j = \log\bar\alpha_{j-1}` at the knots
    :math:`u = Nt/T = j`, :math:`j = 0..N` (:math:`y_0 = 0`), secants :math:`\delta_j = y_{j+1} - y_j < 0` and, on
    :math:`u = j + \theta`, :math:`\theta \in [0, 1]`,

    .. math::  \log\bar\alpha = y_j + \theta^2(3 - 2\theta)\,\delta_j + \theta(1-\theta)^2 D_j - \theta^2(1-\theta)\,D_{j+1},

    the cubic Hermite interpolant with the slopes :math:`D_j` of :func:`monotone_slopes` (the centred
    :math:`(\delta_{j-1} + \delta_j)/2`, one-sided at the ends, within Hyman's monotonicity limits). It passes through
    every knot, decreases strictly, and :math:`\beta(t) = -d\log\bar\alpha/dt` is continuous and second-order
    accurate at the knots, so an integrator in :math:`t` sees a smooth SDE (``interpolation="linear"``:
    :math:`\log\bar\alpha` linear between the knots, :math:`\beta` piecewise constant, :math:`-N\log(1 - \beta_k)` on
    :math:`[t_{k-1}, t_k)`, right-continuous at the knots). Then

    .. math::  m(t) = e^{\frac12\log\bar\alpha(t)}, \qquad s(t) = \sqrt{-\mathrm{expm1}(\log\bar\alpha(t))},
               \qquad a(t) = \tfrac12\,\frac{d\log\bar\alpha}{dt}, \qquad g(t) = \sqrt{-\frac{d\log\bar\alpha}{dt}},

    :math:`T = 1` and the prior is :math:`N(0, I)` (diffusers' ``init_noise_sigma = 1``). Solvers that use only the
    kernel at the grid times (``ddim``, ``dpm_solver``, ``unipc``, ``ddpm``, ...) give the same numbers under either
    interpolation on the knots; integrators in :math:`t` (``heun``, ``euler_maruyama``, the likelihood's ODE) see
    the drift between them, and keep their order only with the continuous :math:`\beta`: on Gaussian data with
    diffusers' linear schedule, Heun's observed order is 2.0 with ``"cubic"`` and at most 0.9 with ``"linear"``,
    whose error on the 999 steps between the 1,000 timesteps is 1,500 times larger (``tests/test_interop.py``).

    Parameters
    ----------
    alphas_cumprod : Tensor or array-like
        :math:`\bar\alpha_k` for :math:`k = 0, \dots, N-1` (a scheduler's ``alphas_cumprod``), strictly decreasing
        in :math:`(0, 1)`.
    interpolation : {"cubic", "linear"}
        How :math:`\log\bar\alpha` runs between the knots (default ``"cubic"``).
    """

    INTERPOLATIONS = ("cubic", "linear")

    def __init__(self, alphas_cumprod: Any, interpolation: str = "cubic") -> None:
        alphas = _alphas_cumprod(alphas_cumprod)
        self.interpolation = check_choice("interpolation", interpolation, self.INTERPOLATIONS)
        super().__init__(T=1.0, prior_std=1.0)
        self.num_train_timesteps = len(alphas)
        self.alphas_cumprod = alphas
        y = torch.cat([alphas.new_zeros(1), alphas.log()])  # log(alpha_bar) at the knots u = 0..N
        # per knot: (y_j, D_j), the value and the slope in u = N t / T, on the host in float64 (other devices and
        # dtypes are cached on first use)
        self._knots = {(torch.device("cpu"), torch.float64): torch.stack([y, monotone_slopes(y)], dim=1)}

    def _log_alpha_bar(self, t: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`\log\bar\alpha(t)` and its slope in ``t`` (class docstring), shaped like ``t``."""
        t = torch.as_tensor(t)
        if not t.is_floating_point():
            t = t.to(torch.get_default_dtype())
        key = (t.device, t.dtype)
        if key not in self._knots:
            self._knots[key] = self._knots[(torch.device("cpu"), torch.float64)].to(t.device, t.dtype)
        knots, n = self._knots[key], self.num_train_timesteps
        u = t.clamp(0.0, self.T) * (n / self.T)
        j = u.floor().clamp(max=n - 1)
        theta = u - j
        (y0, d0), (y1, d1) = knots[j.long()].unbind(-1), knots[j.long() + 1].unbind(-1)
        delta = y1 - y0
        if self.interpolation == "linear":
            return y0 + theta * delta, delta * (n / self.T)
        one = 1 - theta
        value = y0 + theta**2 * (3 - 2 * theta) * delta + theta * one**2 * d0 - theta**2 * one * d1
        slope = 6 * theta * one * delta + one * (1 - 3 * theta) * d0 + theta * (3 * theta - 2) * d1
        return value, slope * (n / self.T)

    def drift_coef(self, t: Tensor) -> Tensor:
        r""":math:`a(t) = \tfrac12\,d\log\bar\alpha/dt`."""
        return 0.5 * self._log_alpha_bar(t)[1]

    def diffusion(self, t: Tensor) -> Tensor:
        r""":math:`g(t) = \sqrt{\beta(t)} = \sqrt{-d\log\bar\alpha/dt}`."""
        return (-self._log_alpha_bar(t)[1]).clamp_min(0).sqrt()

    def mean_coeff(self, t: Tensor) -> Tensor:
        r""":math:`m(t) = \sqrt{\bar\alpha(t)}`."""
        return (0.5 * self._log_alpha_bar(t)[0]).exp()

    def marginal_std(self, t: Tensor) -> Tensor:
        r""":math:`s(t) = \sqrt{1 - \bar\alpha(t)}`, computed as :math:`\sqrt{-\mathrm{expm1}(\log\bar\alpha)}`."""
        return (-torch.expm1(self._log_alpha_bar(t)[0])).clamp_min(0).sqrt()

    def timestep(self, t: Tensor, nearest: bool = False) -> Tensor:
        r"""The (fractional) diffusers timestep :math:`k(t) = Nt/T - 1`, clamped to :math:`[0, N-1]` (rounded with
        ``nearest``), like ``t``."""
        k = (t * (self.num_train_timesteps / self.T) - 1).clamp(0, self.num_train_timesteps - 1)
        return k.round() if nearest else k

    def time_of_timestep(self, timesteps: Any) -> Tensor:
        r"""The times :math:`t_k = (k+1)T/N` of integer diffusers timesteps, as a float64 tensor."""
        k = torch.as_tensor(timesteps).detach().to("cpu", torch.float64)
        if ((k < 0) | (k > self.num_train_timesteps - 1)).any():
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}], got values in "
                             f"[{float(k.min()):g}, {float(k.max()):g}]")
        return (k + 1) / self.num_train_timesteps * self.T

    def to_config(self) -> dict[str, Any]:
        r"""``{"class": "DiscreteVPSDE", "params": {"alphas_cumprod": [...], "interpolation": ...}}``: :math:`\bar\alpha_k`
        as a list of floats (float64 values, which JSON keeps exactly; see :meth:`sdediff.SDE.to_config`)."""
        return {"class": type(self).__name__,
                "params": {"alphas_cumprod": self.alphas_cumprod.tolist(), "interpolation": self.interpolation}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_train_timesteps={self.num_train_timesteps}, interpolation={self.interpolation!r})"


class DiffusersModel(nn.Module):
    """Call a diffusers-style network as ``net(x, timestep) -> tensor``.

    Parameters
    ----------
    model : callable
        ``model(x, timestep, **model_kwargs)`` returning a tensor like ``x``, a tuple whose first item is one
        (``return_dict=False``), or an object with a ``.sample`` tensor (diffusers' ``UNet2DOutput``).
    model_kwargs : mapping, optional
        Extra keyword arguments for every call (e.g. ``class_labels``); tensors in it are not split when
        ``sdediff.sample`` runs in chunks (``batch_size``).
    """

    def __init__(self, model: Callable[..., Any], model_kwargs: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, timestep), got {type(model).__name__}")
        self.model, self.model_kwargs = model, dict(model_kwargs or {})

    def forward(self, x: Tensor, timestep: Tensor) -> Tensor:
        """The network's output at ``(x, timestep)`` as a tensor like ``x``."""
        out = self.model(x, timestep, **self.model_kwargs)
        if not isinstance(out, Tensor):
            out = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            what = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"the model must return a tensor shaped like x {tuple(x.shape)}, got {what} (a model "
                             "with a learned variance returns twice the channels: split them off in a wrapper)")
        return out


def from_diffusers(model: Callable[..., Any], scheduler: Any = None, *, alphas_cumprod: Any = None,
                   prediction_type: str | None = None, timesteps: str = "continuous",
                   model_kwargs: Mapping[str, Any] | None = None) -> tuple[DiscreteVPSDE, ScoreModel]:
    r"""Turn a diffusers model and its schedule into an sdediff ``(sde, score_fn)``.

    The SDE is :class:`DiscreteVPSDE` on the scheduler's ``alphas_cumprod``; the score is
    :class:`sdediff.score.ScoreModel` around the network called at the timestep :math:`k(t) = Nt - 1`, with the
    network's prediction converted to the score (module docstring).

    Parameters
    ----------
    model : callable
        A diffusers network (``UNet2DModel``, ...) or anything with its call convention (:class:`DiffusersModel`).
    scheduler : optional
        A diffusers scheduler: its ``alphas_cumprod`` and ``config.prediction_type`` are used unless given.
    alphas_cumprod : Tensor or array-like, optional
        :math:`\bar\alpha_k`, instead of the scheduler's.
    prediction_type : {"epsilon", "sample", "v_prediction"}, optional
        What the network predicts (default: the scheduler's, else ``"epsilon"``).
    timesteps : {"continuous", "nearest"}
        Call the network at the fractional timestep :math:`Nt - 1` (default; any time grid works) or at the
        nearest integer one (what the network saw in training; times between the knots then see a
        piecewise-constant network).
    model_kwargs : mapping, optional
        Extra keyword arguments for the network (e.g. ``class_labels``).

    Returns
    -------
    (sde, score_fn) : :class:`DiscreteVPSDE` and a :class:`~sdediff.score.ScoreModel` for any sdediff solver.
    """
    if alphas_cumprod is None:
        if scheduler is None or not hasattr(scheduler, "alphas_cumprod"):
            raise ValueError("give a scheduler with alphas_cumprod (a diffusers scheduler) or alphas_cumprod=")
        alphas_cumprod = scheduler.alphas_cumprod
    if prediction_type is None:
        prediction_type = getattr(getattr(scheduler, "config", None), "prediction_type", None) or "epsilon"
    check_choice("prediction_type", prediction_type, tuple(PREDICTION_TYPES))
    check_choice("timesteps", timesteps, TIMESTEP_MODES)
    sde = DiscreteVPSDE(alphas_cumprod)
    time_input = functools.partial(sde.timestep, nearest=timesteps == "nearest")
    return sde, ScoreModel(DiffusersModel(model, model_kwargs), sde, PREDICTION_TYPES[prediction_type], time_input)


def scheduler_time_grid(scheduler: Any, sde: DiscreteVPSDE | None = None) -> tuple[Tensor, bool]:
    r"""The time grid and final denoising step that reproduce a scheduler's sampling loop in ``sdediff.sample``.

    After ``scheduler.set_timesteps(n)``, the loop evaluates the model at ``scheduler.timesteps``
    :math:`k_0 > \dots > k_{n-1}` and ends at a last noise level: :math:`\bar\alpha = 1` (:math:`\sigma = 0`) for
    DDPM, for DDIM with ``set_alpha_to_one=True`` and for ``final_sigmas_type="zero"`` (the last step returns
    :math:`\hat x_0`: ``denoise=True``), or :math:`\bar\alpha_0` for DDIM with ``set_alpha_to_one=False`` and for
    ``final_sigmas_type="sigma_min"`` (one more step, to timestep 0, unless the loop is already there; a step from
    timestep 0 to :math:`\bar\alpha_0` changes nothing). The last level is read from ``final_alpha_cumprod`` (DDIM)
    or from the last of the scheduler's ``sigmas`` (:math:`\sigma = \sqrt{(1-\bar\alpha)/\bar\alpha}`). A scheduler
    that evaluates every timestep twice (``HeunDiscreteScheduler``: the second stage of one Heun step and the
    first of the next) takes two-stage steps between its distinct timesteps, which make the grid. Use as

    .. code-block:: python

        times, denoise = scheduler_time_grid(scheduler)
        x = sdediff.sample(sde, score_fn, shape, solver="ddim", steps=len(times) - 1, time_grid=times,
                           denoise=denoise)

    One difference remains by design: ``DDPMScheduler`` with ``variance_type="fixed_large"`` whose last timestep
    is above 0 (``timestep_spacing="trailing"``) adds :math:`\sqrt{1 - \bar\alpha_{k_{n-1}}}\,z` to its final
    :math:`\hat x_0` (its variance :math:`\beta` for the step to :math:`\bar\alpha = 1`); ``denoise=True`` returns
    :math:`\hat x_0` alone.

    Parameters
    ----------
    scheduler
        A diffusers scheduler after ``set_timesteps``: ``timesteps``, ``alphas_cumprod`` and, where it has them,
        ``sigmas`` or (DDIM) ``final_alpha_cumprod`` and ``num_inference_steps`` are read.
    sde : DiscreteVPSDE, optional
        The SDE of :func:`from_diffusers` (default: built from the scheduler's ``alphas_cumprod``).

    Returns
    -------
    (times, denoise) : the decreasing float64 times :math:`t_k = (k+1)/N` and whether to finish with ``denoise``.

    Raises
    ------
    ValueError
        If the loop's steps do not chain through its own timesteps (DDIM steps from :math:`k` to
        :math:`k - \lfloor N/n\rfloor`, which with ``timestep_spacing="linspace"`` is not the next timestep), if its
        ``sigmas`` are not the schedule's noise levels at its timesteps (Karras, exponential, beta or Lu sigmas,
        whose timesteps are rounded, or fractional timesteps, at which diffusers interpolates :math:`\sigma`
        linearly), or if its last level is neither :math:`\bar\alpha = 1` nor :math:`\bar\alpha_0`.
    """
    sde = DiscreteVPSDE(scheduler.alphas_cumprod) if sde is None else sde
    k = torch.as_tensor(scheduler.timesteps).detach().to("cpu", torch.float64)
    if k.dim() != 1 or len(k) < 1:
        raise ValueError("scheduler.timesteps is empty: call scheduler.set_timesteps(num_inference_steps) first")
    two_stage = bool((k[1:] == k[:-1]).any())
    if two_stage:
        k = k.unique_consecutive()
    if not (k[1:] < k[:-1]).all():
        raise ValueError(f"scheduler.timesteps {k.tolist()} do not decrease: sdediff's grids run from T down, one "
                         "time per step")
    times = sde.time_of_timestep(k)
    final = getattr(scheduler, "final_alpha_cumprod", None)
    if final is not None and getattr(scheduler, "num_inference_steps", None):  # DDIM: prev = k - N // n
        prev = k - sde.num_train_timesteps // scheduler.num_inference_steps
        if not torch.equal(prev[:-1], k[1:]):
            raise ValueError(f"the scheduler steps from timesteps {k.long().tolist()} to {prev.long().tolist()}, not "
                             "through its own timesteps; use timestep_spacing='leading' or 'trailing' with N divisible by "
                             "the steps")
    elif getattr(scheduler, "sigmas", None) is not None:
        final = _final_alpha_bar_of_sigmas(scheduler.sigmas, k, times, sde, two_stage)
    final = 1.0 if final is None else float(final)
    if final == 1.0:
        if len(times) < 2:
            raise ValueError("a one-step loop is a single denoising step, not a time grid: use "
                             "sde.denoise(x, t, score_fn(x, t)) at t = sde.time_of_timestep(scheduler.timesteps)")
        return times, True
    if not math.isclose(final, float(sde.alphas_cumprod[0]), rel_tol=1e-5):
        raise ValueError(f"the scheduler ends at alpha_bar = {final:.8g}, neither 1 nor alphas_cumprod[0] = "
                         f"{float(sde.alphas_cumprod[0]):.8g}")
    if float(k[-1]) == 0:  # the step from timestep 0 to alphas_cumprod[0] changes nothing
        return times, False
    return torch.cat([times, sde.time_of_timestep([0])]), False


def _final_alpha_bar_of_sigmas(sigmas: Any, k: Tensor, times: Tensor, sde: DiscreteVPSDE, two_stage: bool) -> float:
    r"""The last level :math:`1/(1 + \sigma_{last}^2)` of a scheduler whose ``sigmas`` hold :math:`\sigma` at each
    timestep and one more at the end, after checking that they are the schedule's :math:`\sigma(t_k)` (to 32 ulps of
    their dtype)."""
    raw = torch.as_tensor(sigmas).detach()
    levels = raw.to("cpu", torch.float64)
    if two_stage:
        levels = levels.unique_consecutive()
    if levels.dim() != 1 or len(levels) != len(k) + 1:
        raise ValueError(f"the scheduler has {len(k)} distinct timesteps but {levels.numel()} distinct sigmas, not one "
                         "more: sdediff cannot read this loop's noise levels")
    ours = sde.marginal_std(times) / sde.mean_coeff(times)
    off = ((levels[:-1] - ours).abs() > 32 * torch.finfo(raw.dtype).eps * ours).nonzero()
    if len(off):
        i = int(off[0, 0])
        raise ValueError(f"the scheduler's noise level at timestep {float(k[i]):g} is sigma = {float(levels[i]):.8g}, but "
                         f"the schedule's is {float(ours[i]):.8g}: its sigmas are not those of its timesteps (Karras, "
                         "exponential, beta or Lu sigmas, whose timesteps are rounded, or fractional timesteps, where "
                         "diffusers interpolates sigma linearly). sdediff evaluates the model at the time of each noise "
                         "level, so it cannot follow this loop: use integer timesteps and the scheduler's own sigmas, or "
                         "one of sdediff's grids (time_grid='karras', 'log_snr', ...)")
    return 1 / (1 + float(levels[-1]) ** 2)
