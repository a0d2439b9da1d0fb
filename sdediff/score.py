r"""Exact conversions between score, noise, data, velocity and flow predictions for linear SDEs.

With the Gaussian kernel :math:`x = m\,x_0 + s\,\varepsilon`, Tweedie's formula
:math:`\nabla\log p_t(x) = (m\,E[x_0|x] - x)/s^2` ties every common network output to the score:

=============  =====================================================  ==========================================
prediction     what the network outputs                               relation to the score :math:`s_\theta`
=============  =====================================================  ==========================================
``"score"``    :math:`\nabla\log p_t(x)`                              :math:`s_\theta`
``"eps"``      noise :math:`\hat\varepsilon`                          :math:`s_\theta = -\hat\varepsilon/s`
``"x0"``       data :math:`\hat x_0` (a denoiser)                     :math:`s_\theta = (m\hat x_0 - x)/s^2`
``"v"``        :math:`\hat v = \alpha\hat\varepsilon - \sigma\hat x_0`  via :math:`\hat x_0 = (\alpha x - s\hat v)/c`,
               with :math:`c = \sqrt{m^2+s^2}`, :math:`\alpha = m/c`,     :math:`\hat\varepsilon = (\sigma x + m\hat v)/c`
               :math:`\sigma = s/c` (Salimans & Ho for VP, where c = 1)
``"flow"``     velocity :math:`\hat u = m'\hat x_0 + s'\hat\varepsilon`  via :math:`\hat x_0 = (s'x - s\hat u)/\Delta`,
               of the interpolation :math:`x_t` (flow matching)         :math:`\hat\varepsilon = (m\hat u - m'x)/\Delta`,
                                                                      :math:`\Delta = ms' - sm'`
=============  =====================================================  ==========================================

Derivatives: :math:`m' = a\,m` and :math:`s' = a\,s + g^2/(2s)` from :math:`d(s^2)/dt = 2as^2 + g^2`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from ._utils import batch_time, expand_as
from .sdes.linear import require_linear

PREDICTIONS = ("score", "eps", "x0", "v", "flow")


def _check(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; known: {', '.join(PREDICTIONS)}")


def kernel_coefficients(sde, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(m(t), s(t))`` of the kernel :math:`x_t = m(t)\,x_0 + s(t)\,\varepsilon`, shaped to broadcast against ``x``."""
    require_linear(sde, "converting predictions")
    t = batch_time(t, x)
    return expand_as(sde.mean_coeff(t), x), expand_as(sde.marginal_std(t), x)


def _derivatives(sde, x: Tensor, t: Tensor, m: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """:math:`(m', s')` from :math:`m' = am`, :math:`s' = as + g^2/(2s)`."""
    t = batch_time(t, x)
    a, g = expand_as(sde.drift_coef(t), x), expand_as(sde.diffusion(t), x)
    return a * m, a * s + g**2 / (2 * s)


def to_data_and_noise(pred: Tensor, x: Tensor, t: Tensor, sde, prediction: str) -> tuple[Tensor, Tensor]:
    r"""``(x̂₀, ε̂)`` implied by a prediction of the given kind at ``(x, t)``, with :math:`x = m\hat x_0 + s\hat\varepsilon`."""
    _check(prediction)
    m, s = kernel_coefficients(sde, x, t)
    if prediction == "score":
        eps = -s * pred
        return (x - s * eps) / m, eps
    if prediction == "eps":
        return (x - s * pred) / m, pred
    if prediction == "x0":
        return pred, (x - m * pred) / s
    if prediction == "v":
        c = (m**2 + s**2).sqrt()
        return (m / c * x - s * pred) / c, (s / c * x + m * pred) / c
    dm, ds = _derivatives(sde, x, t, m, s)
    det = m * ds - s * dm
    return (ds * x - s * pred) / det, (m * pred - dm * x) / det


def from_data_and_noise(x0: Tensor, eps: Tensor, x: Tensor, t: Tensor, sde, prediction: str) -> Tensor:
    """The prediction of the given kind that corresponds to ``(x̂₀, ε̂)`` at ``(x, t)``."""
    _check(prediction)
    m, s = kernel_coefficients(sde, x, t)
    if prediction == "score":
        return -eps / s
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        c = (m**2 + s**2).sqrt()
        return (m * eps - s * x0) / c
    dm, ds = _derivatives(sde, x, t, m, s)
    return dm * x0 + ds * eps


def to_score(pred: Tensor, x: Tensor, t: Tensor, sde, prediction: str) -> Tensor:
    r"""The score :math:`\nabla_x\log p_t(x)` implied by a prediction (see the module table)."""
    if prediction == "score":
        return pred
    _, eps = to_data_and_noise(pred, x, t, sde, prediction)
    return -eps / kernel_coefficients(sde, x, t)[1]


def convert(pred: Tensor, x: Tensor, t: Tensor, sde, source: str, target: str) -> Tensor:
    """Convert a prediction of kind ``source`` into kind ``target`` (both in :data:`PREDICTIONS`)."""
    x0, eps = to_data_and_noise(pred, x, t, sde, source)
    return from_data_and_noise(x0, eps, x, t, sde, target)


class ScoreModel(nn.Module):
    """Turn a network predicting ε, x₀, v, flow or the score into a ``score_fn(x, t)`` for any solver.

    Parameters
    ----------
    net : nn.Module or callable
        ``net(x, time_input(t))`` returning a tensor like ``x``.
    sde : LinearSDE
        The SDE whose kernel ``(m, s)`` defines the conversion.
    prediction : str
        One of :data:`PREDICTIONS`.
    time_input : callable, optional
        Maps the continuous time ``t`` to what the network expects (e.g. ``lambda t: 999 * t`` for a
        DDPM-indexed model, or the noise level); identity by default.
    """

    def __init__(self, net: Callable[[Tensor, Tensor], Tensor], sde, prediction: str = "eps",
                 time_input: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        _check(prediction)
        self.net, self.sde, self.prediction, self.time_input = net, sde, prediction, time_input

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """The score at ``(x, t)``."""
        t = batch_time(t, x)
        out = self.net(x, t if self.time_input is None else self.time_input(t))
        return to_score(out, x, t, self.sde, self.prediction)

    def predict(self, x: Tensor, t: Tensor, prediction: str = "x0") -> Tensor:
        """The network's output converted to another kind (e.g. the denoised ``x0``)."""
        t = batch_time(t, x)
        out = self.net(x, t if self.time_input is None else self.time_input(t))
        return convert(out, x, t, self.sde, self.prediction, prediction)
