r"""diffusers' discrete-time noise-prediction models as continuous-time sdediff models.

A diffusers scheduler knows its noise levels only at the integer timesteps :math:`k = 0, \dots, N-1`:

.. math::  x_k = \sqrt{\bar\alpha_k}\,x_0 + \sqrt{1 - \bar\alpha_k}\,\varepsilon, \qquad
           \bar\alpha_k = \prod_{j \le k}(1 - \beta_j).

:class:`DiscreteVPSDE` puts timestep :math:`k` at the time :math:`t_k = (k+1)/N` (so :math:`T = t_{N-1} = 1`,
with :math:`\bar\alpha = 1` at :math:`t = 0`) and interpolates :math:`\log\bar\alpha` linearly between these
knots:

.. math::  \log\bar\alpha(t) = (1-u)\log\bar\alpha_{j-1} + u\log\bar\alpha_j, \qquad t = (j + u)/N,\
           u \in [0, 1],\ \bar\alpha_{-1} = 1.

This is the VP SDE :math:`dx = -\tfrac12\beta(t)x\,dt + \sqrt{\beta(t)}\,dw` with the piecewise-constant
:math:`\beta(t) = -d\log\bar\alpha/dt = -N\log(1 - \beta_j)` on :math:`(t_{j-1}, t_j]`; its kernel is
:math:`m(t) = \sqrt{\bar\alpha(t)}`, :math:`s(t) = \sqrt{1 - \bar\alpha(t)}`. At the knots the kernel is exactly
diffusers' (:math:`m(t_k)^2 = \bar\alpha_k`), and the exact transition between neighbouring knots is DDPM's step
(:math:`r^2 = \alpha_k`, :math:`\sigma^2 = \beta_k`). Hence, on the scheduler's timesteps mapped to times
(:func:`scheduler_time_grid`):

- ``sdediff.sample(..., solver="ddim")`` is ``DDIMScheduler`` with ``eta = 0`` (and ``"ddim"`` with ``eta``
  is DDIM with the same ``eta``);
- ``solver="ancestral"`` is ``DDPMScheduler`` with ``variance_type="fixed_small"`` and ``solver="ddpm"`` is
  ``"fixed_large"``, both draw for draw with the same ``torch.Generator``;
- diffusers' final step to :math:`\bar\alpha = 1` (``set_alpha_to_one``, DDPM's last step) is sdediff's
  ``denoise=True``, Tweedie's :math:`\hat x_0`;

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
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._validate import check_choice
from ..score import ScoreModel
from ..sdes.linear import LinearSDE
from ..sdes.registry import register_sde

__all__ = ["DiscreteVPSDE", "DiffusersModel", "from_diffusers", "scheduler_time_grid", "PREDICTION_TYPES"]

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


@register_sde
class DiscreteVPSDE(LinearSDE):
    r"""The VP SDE whose kernel passes through a discrete schedule :math:`\bar\alpha_0 > \dots > \bar\alpha_{N-1}`.

    Timestep :math:`k` sits at :math:`t_k = (k+1)/N` and :math:`\log\bar\alpha(t)` is linear between the knots
    :math:`(0, 0), (t_0, \log\bar\alpha_0), \dots, (1, \log\bar\alpha_{N-1})` (module docstring). Then

    .. math::  m(t) = e^{\frac12\log\bar\alpha(t)}, \qquad s(t) = \sqrt{-\mathrm{expm1}(\log\bar\alpha(t))},
               \qquad a(t) = \tfrac12\,\frac{d\log\bar\alpha}{dt}, \qquad g(t) = \sqrt{-\frac{d\log\bar\alpha}{dt}},

    :math:`T = 1` and the prior is :math:`N(0, I)` (diffusers' ``init_noise_sigma = 1``).

    Parameters
    ----------
    alphas_cumprod : Tensor or array-like
        :math:`\bar\alpha_k` for :math:`k = 0, \dots, N-1` (a scheduler's ``alphas_cumprod``), strictly decreasing
        in :math:`(0, 1)`.
    """

    def __init__(self, alphas_cumprod: Any) -> None:
        alphas = _alphas_cumprod(alphas_cumprod)
        super().__init__(T=1.0, prior_std=1.0)
        self.num_train_timesteps = len(alphas)
        self.alphas_cumprod = alphas
        # log(alpha_bar) at the knots j/N, j = 0..N (the first knot, t = 0, is noise-free)
        self._knots = {(torch.device("cpu"), torch.float64): torch.cat([alphas.new_zeros(1), alphas.log()])}

    def _log_alpha_bar(self, t: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`\log\bar\alpha(t)` and its slope in ``t`` (left-continuous at the knots), shaped like ``t``."""
        t = torch.as_tensor(t)
        if not t.is_floating_point():
            t = t.to(torch.get_default_dtype())
        key = (t.device, t.dtype)
        if key not in self._knots:
            self._knots[key] = self._knots[(torch.device("cpu"), torch.float64)].to(t.device, t.dtype)
        knots, n = self._knots[key], self.num_train_timesteps
        u = t.clamp(0.0, self.T) * (n / self.T)
        j = u.floor().clamp(max=n - 1)
        lo, hi = knots[j.long()], knots[j.long() + 1]
        return lo + (u - j) * (hi - lo), (hi - lo) * (n / self.T)

    def drift_coef(self, t: Tensor) -> Tensor:
        r""":math:`a(t) = \tfrac12\,d\log\bar\alpha/dt = \tfrac N2\log(1 - \beta_j)` on :math:`(t_{j-1}, t_j]`."""
        return 0.5 * self._log_alpha_bar(t)[1]

    def diffusion(self, t: Tensor) -> Tensor:
        r""":math:`g(t) = \sqrt{\beta(t)} = \sqrt{-N\log(1 - \beta_j)}` on :math:`(t_{j-1}, t_j]`."""
        return (-self._log_alpha_bar(t)[1]).sqrt()

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
        r"""``{"class": "DiscreteVPSDE", "params": {"alphas_cumprod": [...]}}``: :math:`\bar\alpha_k` as a list of
        floats (float64 values, which JSON keeps exactly; see :meth:`sdediff.SDE.to_config`)."""
        return {"class": type(self).__name__, "params": {"alphas_cumprod": self.alphas_cumprod.tolist()}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_train_timesteps={self.num_train_timesteps})"


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
    :math:`k_0 > \dots > k_{n-1}` and ends at :math:`\bar\alpha_{final}`: ``1`` for DDPM and for DDIM with
    ``set_alpha_to_one=True`` (the last step returns :math:`\hat x_0`: ``denoise=True``), :math:`\bar\alpha_0`
    for DDIM with ``set_alpha_to_one=False`` (one more step, to timestep 0, unless the loop is already there).
    Use as

    .. code-block:: python

        times, denoise = scheduler_time_grid(scheduler)
        x = sdediff.sample(sde, score_fn, shape, solver="ddim", steps=len(times) - 1, time_grid=times,
                           denoise=denoise)

    Parameters
    ----------
    scheduler
        A diffusers scheduler after ``set_timesteps``: ``timesteps``, ``alphas_cumprod`` and, for DDIM,
        ``final_alpha_cumprod`` and ``num_inference_steps`` are read.
    sde : DiscreteVPSDE, optional
        The SDE of :func:`from_diffusers` (default: built from the scheduler's ``alphas_cumprod``).

    Returns
    -------
    (times, denoise) : the decreasing float64 times :math:`t_k = (k+1)/N` and whether to finish with ``denoise``.

    Raises
    ------
    ValueError
        If the loop's steps do not chain through its own timesteps (DDIM steps from :math:`k` to
        :math:`k - \lfloor N/n\rfloor`, which with ``timestep_spacing="linspace"`` is not the next timestep) or its
        final :math:`\bar\alpha` is neither ``1`` nor :math:`\bar\alpha_0`.
    """
    sde = DiscreteVPSDE(scheduler.alphas_cumprod) if sde is None else sde
    k = torch.as_tensor(scheduler.timesteps).detach().to("cpu", torch.float64)
    if k.dim() != 1 or len(k) < 1:
        raise ValueError("scheduler.timesteps is empty: call scheduler.set_timesteps(num_inference_steps) first")
    final = getattr(scheduler, "final_alpha_cumprod", None)
    if final is not None and getattr(scheduler, "num_inference_steps", None):  # DDIM: prev = k - N // n
        prev = k - sde.num_train_timesteps // scheduler.num_inference_steps
        if not torch.equal(prev[:-1], k[1:]):
            raise ValueError(f"the scheduler steps from timesteps {k.long().tolist()} to {prev.long().tolist()}, not "
                             "through its own timesteps; use timestep_spacing='leading' or 'trailing' with N divisible by "
                             "the steps")
    times = sde.time_of_timestep(k)
    final = 1.0 if final is None else float(final)
    if final == 1.0:
        if len(times) < 2:
            raise ValueError("a one-step loop is a single denoising step, not a time grid: use "
                             "sde.denoise(x, t, score_fn(x, t)) at t = sde.time_of_timestep(scheduler.timesteps)")
        return times, True
    if final != float(sde.alphas_cumprod[0]):
        raise ValueError(f"the scheduler ends at alpha_bar = {final}, neither 1 nor alphas_cumprod[0]")
    if float(k[-1]) == 0:  # the step from timestep 0 to alphas_cumprod[0] changes nothing
        return times, False
    return torch.cat([times, sde.time_of_timestep([0])]), False
