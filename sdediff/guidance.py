r"""Controllable generation: guided score functions that every solver uses unchanged (Song et al., 2021, *Score-Based
Generative Modeling through Stochastic Differential Equations*, §5; the docs' Guidance tutorial).

Bayes' rule in score form, :math:`\nabla_x\log p_t(x \mid y) = \nabla_x\log p_t(x) + \nabla_x\log p_t(y \mid x)`,
turns conditioning into a change of the score function. Each function here takes a score function
``score_fn(x, t)`` and returns a new one, to pass to :func:`sdediff.sample` (any solver),
:meth:`sdediff.SDE.reverse` or :func:`sdediff.log_likelihood`:

===========================  ====================================================================================
:func:`classifier_guided`    :math:`s + w\,\nabla_x\log p_\phi(y \mid x, t)` (a noise-aware classifier or any
                             differentiable log-likelihood)
:func:`classifier_free`      :math:`(1+w)\,s(x, t, y) - w\,s(x, t, \varnothing)`; :class:`ClassifierFreeNet`
                             evaluates both branches of one network in a single batched call
:func:`reward_guided`        :math:`s + \lambda\,\nabla_x R(\hat x_0(x, t))` with Tweedie's
                             :math:`\hat x_0 = (x + s(t)^2 s_\theta)/m(t)`; targets :math:`p_0(x)e^{\lambda R(x)}/Z`
:func:`inpainting_score`     imputation of known coordinates (a mask and observed values), by replacement or by
                             reconstruction guidance; :func:`inpaint` samples and imputes in one call
===========================  ====================================================================================

Gradients with respect to ``x`` are taken with :func:`torch.autograd.grad` under
:func:`torch.enable_grad`, so the guided scores work inside ``torch.no_grad()`` sampling loops. When
the caller itself differentiates through the guided score (``x.requires_grad`` with grad mode on, as
:func:`sdediff.log_likelihood` does for the divergence), the graph is kept (``create_graph=True``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._utils import batch_time
from ._validate import check_choice, check_float, is_int
from .processes import ScoreFn
from .sampling import SampleResult, sample
from .score import kernel_coefficients
from .sdes.linear import LinearSDE, require_linear

LogProbFn = Callable[[Tensor, Tensor], Tensor]
RewardFn = Callable[[Tensor], Tensor]

JACOBIANS = ("full", "approx")
INPAINT_METHODS = ("replacement", "guidance")
COVARIANCES = ("isotropic", "tweedie")


def _check_callable(fn: Any, name: str, signature: str) -> None:
    if not callable(fn):
        raise TypeError(f"{name} must be callable as {signature}, got {type(fn).__name__}")


def _keep_graph(x: Tensor) -> bool:
    """Whether the caller differentiates through the guided score at ``x`` (then gradients keep their graph)."""
    return torch.is_grad_enabled() and x.requires_grad


def _tweedie_guided(sde: LinearSDE, score_fn: ScoreFn, x: Tensor, t: Tensor, scale: float,
                    gradient: Callable[[Tensor, Tensor, Tensor, Tensor, bool], Tensor]) -> Tensor:
    r"""``score + scale * gradient(x, x0, m, s, keep)`` at ``x`` with Tweedie's denoiser
    :math:`\hat x_0 = (x + s^2 s_\theta(x, t))/m` computed under grad mode, so that ``gradient`` can differentiate
    through it with respect to ``x``; the graph is kept (``keep``) only when the caller differentiates the result."""
    m, s = kernel_coefficients(sde, x, t)
    keep = _keep_graph(x)
    with torch.enable_grad():
        xg = x if keep else x.detach().requires_grad_(True)
        score = score_fn(xg, t)
        grad = gradient(xg, (xg + s**2 * score) / m, m, s, keep)
    return (score if keep else score.detach()) + scale * grad


def _per_sample(value: Tensor, x: Tensor, name: str) -> Tensor:
    if not isinstance(value, Tensor) or value.shape != (x.shape[0],):
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{name} must return a (batch,) tensor with batch = {x.shape[0]}, got {got}")
    return value


# --- classifier guidance ------------------------------------------------------------------------------------
def classifier_guided(score_fn: ScoreFn, log_prob_fn: LogProbFn, scale: float = 1.0) -> ScoreFn:
    r"""Classifier guidance: :math:`\tilde s(x, t) = s(x, t) + w\,\nabla_x \log p_\phi(y \mid x, t)`.

    With the exact noisy-class posterior :math:`p_t(y \mid x)` and :math:`w = 1` this is Bayes' rule,
    :math:`\nabla_x\log p_t(x \mid y)`: the exact class-conditional score. :math:`w > 1` sharpens the
    conditional towards :math:`p_t(x)\,p_t(y \mid x)^w`.

    Parameters
    ----------
    score_fn : callable
        ``score_fn(x, t) -> tensor like x``, the unconditional score.
    log_prob_fn : callable
        ``log_prob_fn(x, t) -> (batch,)``, differentiable in ``x``: the log-probability of the wanted
        condition (e.g. ``log_softmax(classifier(x, t))[:, y]`` of a noise-aware classifier, or any
        log-likelihood of an observation given ``x_t``).
    scale : float
        The guidance weight :math:`w`.

    Returns
    -------
    callable
        The guided ``score_fn(x, t)``.
    """
    _check_callable(score_fn, "score_fn", "score_fn(x, t)")
    _check_callable(log_prob_fn, "log_prob_fn", "log_prob_fn(x, t) -> (batch,)")
    w = check_float("scale", scale)

    def guided(x: Tensor, t: Tensor) -> Tensor:
        t = batch_time(t, x)
        keep = _keep_graph(x)
        with torch.enable_grad():
            xg = x if keep else x.detach().requires_grad_(True)
            log_p = _per_sample(log_prob_fn(xg, t), x, "log_prob_fn")
            (grad,) = torch.autograd.grad(log_p.sum(), xg, create_graph=keep)
        return score_fn(x, t) + w * grad

    return guided


# --- classifier-free guidance -------------------------------------------------------------------------------
def classifier_free(cond_score_fn: ScoreFn, uncond_score_fn: ScoreFn, scale: float) -> ScoreFn:
    r"""Classifier-free guidance: :math:`\tilde s = (1 + w)\,s(x, t, y) - w\,s(x, t, \varnothing)`.

    :math:`w = 0` is the conditional score, :math:`w = -1` the unconditional one; :math:`w > 0` follows
    :math:`p_t(x)\,p_t(y \mid x)^{1+w}` (the implicit classifier :math:`\nabla\log p_t(y \mid x) =
    s(x, t, y) - s(x, t, \varnothing)` raised to the power :math:`1 + w`). For one network trained with the
    condition dropped at random, :class:`ClassifierFreeNet` computes both branches in one batched call.

    Parameters
    ----------
    cond_score_fn, uncond_score_fn : callable
        ``score_fn(x, t)`` with and without the condition.
    scale : float
        The guidance weight :math:`w`.
    """
    _check_callable(cond_score_fn, "cond_score_fn", "cond_score_fn(x, t)")
    _check_callable(uncond_score_fn, "uncond_score_fn", "uncond_score_fn(x, t)")
    w = check_float("scale", scale)

    def guided(x: Tensor, t: Tensor) -> Tensor:
        cond = cond_score_fn(x, t)
        return cond + w * (cond - uncond_score_fn(x, t))

    return guided


class ClassifierFreeNet(nn.Module):
    r"""A class-conditional network ``net(x, t, y)`` turned into a guided network ``(x, t) -> output``.

    Both branches are evaluated in one call on the doubled batch ``[x, x]`` with labels ``[y, ∅]``:

    .. math::  \tilde o = (1 + w)\,o(x, t, y) - w\,o(x, t, \varnothing).

    The combination has weights summing to one, so it commutes with every affine conversion between
    predictions (:mod:`sdediff.score`): guiding ε-, x₀-, v- or score outputs is the same, and the result
    is wrapped like the network itself, e.g. ``ScoreModel(ClassifierFreeNet(net, y, 3.0), sde, "eps")``.
    With ``scale = 0`` only the conditional branch runs.

    Parameters
    ----------
    net : nn.Module
        ``net(x, t, y)`` with ``y`` a ``(batch,)`` tensor of class indices (e.g. :class:`sdediff.MLP` or
        :class:`sdediff.UNet` built with ``num_classes=``).
    cond : int or Tensor
        The class of every sample, or a ``(batch,)`` tensor of classes (one per sample evaluated).
    scale : float
        The guidance weight :math:`w`.
    null_class : int, optional
        The "no label" index :math:`\varnothing` (default: ``net.null_class``).
    """

    def __init__(self, net: nn.Module, cond: int | Tensor, scale: float, null_class: int | None = None) -> None:
        super().__init__()
        _check_callable(net, "net", "net(x, t, y)")
        if null_class is None:
            null_class = getattr(net, "null_class", None)
        if not is_int(null_class):
            raise ValueError("ClassifierFreeNet needs the null-class index: build the network with num_classes= "
                             f"or pass null_class=, got {null_class!r}")
        if isinstance(cond, Tensor):
            if cond.dim() != 1 or cond.is_floating_point() or cond.is_complex():
                raise ValueError(f"cond must be an int or a (batch,) integer tensor, got {cond.dtype} {tuple(cond.shape)}")
        elif not is_int(cond):
            raise TypeError(f"cond must be an int or a (batch,) integer tensor, got {type(cond).__name__}")
        self.net, self.cond, self.scale, self.null_class = net, cond, check_float("scale", scale), null_class

    def labels(self, x: Tensor) -> Tensor:
        """The ``(batch,)`` class indices for a batch ``x``."""
        if isinstance(self.cond, int):
            return torch.full((x.shape[0],), self.cond, dtype=torch.long, device=x.device)
        if self.cond.shape[0] != x.shape[0]:
            raise ValueError(f"cond holds {self.cond.shape[0]} labels but the batch has {x.shape[0]} samples")
        return self.cond.to(device=x.device, dtype=torch.long)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """The guided output at ``(x, t)``; ``t`` is passed to ``net`` as given (a ``(batch,)`` tensor)."""
        y = self.labels(x)
        if self.scale == 0:
            return self.net(x, t, y)
        t = batch_time(t, x)
        out = self.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, self.null_class)]))
        cond, uncond = out.chunk(2)
        return cond + self.scale * (cond - uncond)


# --- reward guidance ----------------------------------------------------------------------------------------
def reward_guided(sde: LinearSDE, score_fn: ScoreFn, reward_fn: RewardFn, scale: float = 1.0,
                  jacobian: str = "full") -> ScoreFn:
    r"""Reward guidance towards the tilted law :math:`p_0(x)\,e^{\lambda R(x)}/Z`.

    .. math::  \tilde s(x, t) = s(x, t) + \lambda\,\nabla_x R\big(\hat x_0(x, t)\big), \qquad
               \hat x_0(x, t) = \frac{x + s(t)^2\, s(x, t)}{m(t)} \quad\text{(Tweedie)}.

    ``jacobian="full"`` differentiates through :math:`\hat x_0` (and so through ``score_fn``):
    :math:`\lambda\,J^\top \nabla R(\hat x_0)` with :math:`J = \partial\hat x_0/\partial x`. For Gaussian data
    and a linear reward :math:`R(x) = a^\top x` this is exact: the posterior :math:`x_0 \mid x_t` is Gaussian
    with a covariance independent of :math:`x_t`, so :math:`\nabla\log E[e^{\lambda R(x_0)} \mid x_t] =
    \lambda J^\top a`. ``jacobian="approx"`` uses :math:`J \approx I/m(t)`, i.e. :math:`\lambda\,\nabla
    R(\hat x_0)/m(t)`, which needs no backward pass through the score network but overweights the reward
    where :math:`x_t` is mostly noise.

    Parameters
    ----------
    sde : LinearSDE
        The forward SDE (its kernel :math:`m, s` gives Tweedie's estimate).
    score_fn : callable
        ``score_fn(x, t)``; differentiable in ``x`` for ``jacobian="full"``.
    reward_fn : callable
        ``reward_fn(x0) -> (batch,)``, differentiable: the reward of clean data.
    scale : float
        :math:`\lambda`.
    jacobian : {"full", "approx"}
        How :math:`\nabla_x R(\hat x_0)` is computed (see above).
    """
    sde = require_linear(sde, "reward guidance")
    _check_callable(score_fn, "score_fn", "score_fn(x, t)")
    _check_callable(reward_fn, "reward_fn", "reward_fn(x0) -> (batch,)")
    lam = check_float("scale", scale)
    check_choice("jacobian", jacobian, JACOBIANS)

    def guided(x: Tensor, t: Tensor) -> Tensor:
        def gradient(xg: Tensor, x0: Tensor, m: Tensor, s: Tensor, keep: bool) -> Tensor:
            reward = _per_sample(reward_fn(x0), x, "reward_fn").sum()
            if jacobian == "full":
                return torch.autograd.grad(reward, xg, create_graph=keep)[0]
            # the gradient with respect to x0 itself: no backward pass through the score
            return torch.autograd.grad(reward, x0, create_graph=keep)[0] / m

        return _tweedie_guided(sde, score_fn, x, batch_time(t, x), lam, gradient)

    return guided


# --- inpainting / imputation --------------------------------------------------------------------------------
def impute(x: Tensor, mask: Tensor, observed: Tensor) -> Tensor:
    """``x`` with the known coordinates (``mask`` true) set to ``observed``: ``where(mask, observed, x)``."""
    mask, observed = _check_observation(mask, observed, x)
    return torch.where(mask, observed, x)


def _check_observation(mask: Tensor, observed: Tensor, x: Tensor | None = None) -> tuple[Tensor, Tensor]:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = known coordinate), got "
                        f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}")
    if not isinstance(observed, Tensor) or not observed.is_floating_point():
        raise TypeError("observed must be a floating-point tensor, got "
                        f"{observed.dtype if isinstance(observed, Tensor) else type(observed).__name__}")
    if x is None:
        return mask, observed
    for name, value in (("mask", mask), ("observed", observed)):
        try:
            ok = torch.broadcast_shapes(value.shape, x.shape) == x.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"{name} of shape {tuple(value.shape)} does not broadcast to the samples' shape "
                             f"{tuple(x.shape)}")
    return mask.to(x.device), observed.to(device=x.device, dtype=x.dtype)


def inpainting_score(sde: LinearSDE, score_fn: ScoreFn, mask: Tensor, observed: Tensor,
                     method: str = "guidance", *, covariance: str = "isotropic", data_std: float = 1.0,
                     obs_std: float = 0.0, scale: float = 1.0) -> ScoreFn:
    r"""A score function for sampling the unknown coordinates given known ones (inpainting / imputation).

    The observation is :math:`y = A x_0` where :math:`A` keeps the coordinates where ``mask`` is true.
    Sample with the returned score and any solver, then set the known coordinates with :func:`impute`
    (or use :func:`inpaint`, which does both).

    ``method="replacement"`` (Song et al. 2021): the known coordinates are driven by the exact score of the
    forward-noised observation, :math:`-(x - m(t)\,y)/s(t)^2` (the score of :math:`N(m y, s^2)`), so that
    along the solver's path they *are* a forward-perturbed copy of :math:`y` at every time (for the
    reverse SDE, a draw of the forward process started at :math:`y`, run backwards); the unknown
    coordinates use the unconditional score at that state,

    .. math::  \tilde s(x, t) = \mathbb 1_{known}\,\frac{m\,y - x}{s^2} + \mathbb 1_{unknown}\, s(x, t).

    It conditions on the noisy copy of :math:`y` rather than on :math:`y` itself, which biases the
    imputation wherever the noise hides the observation's information.

    ``method="guidance"`` (reconstruction guidance, as in DPS / ΠGDM): Bayes' rule with the Gaussian
    approximation :math:`p_t(y \mid x) \approx N(y;\ A\hat x_0(x, t),\ A C_t A^\top + \sigma_y^2 I)`,

    .. math::  \tilde s(x, t) = s(x, t) + w\,J^\top A^\top (A C_t A^\top + \sigma_y^2 I)^{-1}(y - A\hat x_0),
               \qquad \hat x_0 = \frac{x + s^2 s(x, t)}{m},\ J = \frac{\partial\hat x_0}{\partial x},

    where :math:`C_t` approximates the posterior covariance :math:`\mathrm{Cov}[x_0 \mid x_t]`:

    * ``covariance="isotropic"``: :math:`C_t = r_t^2 I` with :math:`r_t^2 = \sigma_d^2 s^2 / (m^2\sigma_d^2 + s^2)`,
      the posterior variance for data :math:`N(\cdot, \sigma_d^2 I)` (ΠGDM). One backward pass per call; any
      mask, any shape.
    * ``covariance="tweedie"``: :math:`C_t = (s^2/m)\,J` (second-order Tweedie,
      :math:`\mathrm{Cov}[x_0 \mid x_t] = (s^2/m)\,\partial\hat x_0/\partial x_t`) restricted to the known
      coordinates. Exact for Gaussian data, where the guided score is then the exact conditional score.
      Costs one backward pass per known coordinate; the mask must be the same for every sample.

    Parameters
    ----------
    sde : LinearSDE
        The forward SDE.
    score_fn : callable
        ``score_fn(x, t)``, the unconditional score; differentiable in ``x`` for ``"guidance"``.
    mask : Tensor of bool
        True at the known coordinates; broadcastable to the samples, e.g. ``(*event)`` for one mask for all
        samples or ``(batch, *event)`` for one per sample.
    observed : Tensor
        The known values, broadcastable to the samples (entries where ``mask`` is false are ignored).
    method : {"replacement", "guidance"}
        See above.
    covariance : {"isotropic", "tweedie"}
        The posterior covariance of ``"guidance"``.
    data_std : float
        :math:`\sigma_d`, the data scale of ``covariance="isotropic"``.
    obs_std : float
        :math:`\sigma_y \ge 0`, the standard deviation of noise in the observation (``"guidance"``).
    scale : float
        :math:`w`, the guidance weight (``"guidance"``; 1 is Bayes' rule).
    """
    sde = require_linear(sde, "inpainting")
    _check_callable(score_fn, "score_fn", "score_fn(x, t)")
    mask, observed = _check_observation(mask, observed)
    check_choice("method", method, INPAINT_METHODS)
    check_choice("covariance", covariance, COVARIANCES)
    data_std = check_float("data_std", data_std, 0, low_open=True)
    obs_std = check_float("obs_std", obs_std, 0)
    w = check_float("scale", scale)
    known_cpu = mask.detach().cpu()
    indices: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}

    def known_index(x: Tensor) -> Tensor:
        """Flat indices of the known coordinates of one sample, found once per event shape on the CPU (no sync)."""
        key = (tuple(x.shape[1:]), x.device)
        if key not in indices:
            if known_cpu.dim() == x.dim() and known_cpu.shape[0] != 1:
                raise ValueError("covariance='tweedie' needs one mask for all samples (shape (*event) or "
                                 f"(1, *event)); got a mask of shape {tuple(known_cpu.shape)}")
            event = known_cpu.reshape(known_cpu.shape[1:] if known_cpu.dim() == x.dim() else known_cpu.shape)
            indices[key] = event.expand(x.shape[1:]).reshape(-1).nonzero().squeeze(1).to(x.device)
        return indices[key]

    if method == "replacement":
        def replaced(x: Tensor, t: Tensor) -> Tensor:
            t = batch_time(t, x)
            known, y = _check_observation(mask, observed, x)
            m, s = kernel_coefficients(sde, x, t)
            return torch.where(known, (m * y - x) / s**2, score_fn(x, t))

        return replaced

    def guided(x: Tensor, t: Tensor) -> Tensor:
        known, y = _check_observation(mask, observed, x)

        def gradient(xg: Tensor, x0: Tensor, m: Tensor, s: Tensor, keep: bool) -> Tensor:
            if covariance == "isotropic":
                var = data_std**2 * s**2 / (m**2 * data_std**2 + s**2) + obs_std**2
                residual = torch.where(known, y - x0, 0.0)
                return torch.autograd.grad(-0.5 * (residual**2 / var).sum(), xg, create_graph=keep)[0]
            return _tweedie_guidance(known_index(x), y, xg, x0, m, s, obs_std, keep)

        return _tweedie_guided(sde, score_fn, x, batch_time(t, x), w, gradient)

    return guided


def _tweedie_guidance(idx: Tensor, y: Tensor, x: Tensor, x0: Tensor, m: Tensor, s: Tensor, obs_std: float,
                      keep: bool) -> Tensor:
    r""":math:`J^\top A^\top (A C A^\top + \sigma_y^2 I)^{-1}(y - A\hat x_0)` with :math:`C = (s^2/m) J`, the known
    coordinates at the flat indices ``idx``."""
    batch, k = x.shape[0], idx.numel()
    if k == 0:
        return torch.zeros_like(x)
    x0_known = x0.reshape(batch, -1)[:, idx]
    # rows j of J restricted to the known outputs: grad of sum_b x0[b, idx_j] (samples do not interact)
    rows = torch.stack([torch.autograd.grad(x0_known[:, j].sum(), x, retain_graph=True, create_graph=keep)[0]
                        .reshape(batch, -1) for j in range(k)], dim=1)  # (batch, k, D)
    cov = (s**2 / m).reshape(batch, 1, 1) * rows[:, :, idx]
    cov = 0.5 * (cov + cov.mT) + obs_std**2 * torch.eye(k, dtype=x.dtype, device=x.device)
    residual = y.expand_as(x).reshape(batch, -1)[:, idx] - x0_known
    v = torch.linalg.solve(cov, residual.unsqueeze(-1)).squeeze(-1)
    grad = torch.einsum("bk,bkd->bd", v, rows).reshape(x.shape)
    return grad if keep else grad.detach()


def inpaint(sde: LinearSDE, score_fn: ScoreFn, mask: Tensor, observed: Tensor, shape: Sequence[int],
            method: str = "guidance", *, covariance: str = "isotropic", data_std: float = 1.0, obs_std: float = 0.0,
            scale: float = 1.0, **sample_options: Any) -> Tensor | SampleResult:
    """Sample the unknown coordinates given the known ones, with any solver, and return completed samples.

    :func:`sdediff.sample` with :func:`inpainting_score` (``method``, ``covariance``, ``data_std``,
    ``obs_std``, ``scale`` as there), followed by :func:`impute` of the known values.

    Parameters
    ----------
    sde, score_fn, mask, observed, method, covariance, data_std, obs_std, scale
        See :func:`inpainting_score`.
    shape : tuple of int
        ``(batch, ...)`` of the samples.
    **sample_options
        Passed to :func:`sdediff.sample` (``solver=``, ``steps=``, ``eps=``, ``generator=``, ``denoise=``,
        ``return_info=``, ...). A per-sample mask or observation needs the whole batch at once (no
        ``batch_size``).

    Returns
    -------
    Tensor of ``shape`` (or :class:`sdediff.SampleResult` with ``return_info=True``) whose known
    coordinates equal ``observed``.
    """
    guided = inpainting_score(sde, score_fn, mask, observed, method, covariance=covariance, data_std=data_std,
                              obs_std=obs_std, scale=scale)
    out = sample(sde, guided, shape, **sample_options)
    if isinstance(out, SampleResult):
        out.samples = impute(out.samples, mask, observed)
        return out
    return impute(out, mask, observed)


__all__ = ["classifier_guided", "classifier_free", "ClassifierFreeNet", "reward_guided", "inpainting_score",
           "impute", "inpaint", "JACOBIANS", "INPAINT_METHODS", "COVARIANCES"]
