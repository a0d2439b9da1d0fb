r"""k-diffusion interop: sdediff models as k-diffusion denoisers, and k-diffusion denoisers as sdediff models.

k-diffusion writes every diffusion model in the variance-exploding form :math:`y = x_0 + \sigma\varepsilon` and
talks to it through a denoiser :math:`D(y, \sigma) \approx E[x_0 \mid y]`; its samplers integrate
:math:`dy/d\sigma = (y - D(y, \sigma))/\sigma` over a decreasing sequence of noise levels. A linear SDE with kernel
:math:`x_t = m(t)\,x_0 + s(t)\,\varepsilon` is the same model in other coordinates:

.. math::  y = x/m(t), \qquad \sigma(t) = s(t)/m(t) = e^{-\lambda(t)/2}, \qquad
           D(y, \sigma) = \hat x_0 = \frac{x + s^2\,\nabla\log p_t(x)}{m} \quad (x = m\,y,\ t = t(\sigma)),

with :math:`\lambda = \log(m^2/s^2)` the log-SNR and :math:`\hat x_0` Tweedie's formula.

- :class:`KDiffusionDenoiser` wraps an sdediff ``(sde, score_fn)`` as :math:`D(y, \sigma)`, so k-diffusion's
  samplers run on sdediff models (start from :math:`y_T = x_T/m(T)`; the result is in :math:`y`, which at a final
  :math:`\sigma = 0` is :math:`x_0`).
- :func:`from_kdiffusion` wraps a k-diffusion denoiser as an sdediff ``(sde, score_fn)``: by default on the
  :class:`~sdediff.VESDE` with the denoiser's :math:`\sigma` range (where :math:`y = x`), or on any
  :class:`~sdediff.LinearSDE`, with the score :math:`(m\,D(x/m, s/m) - x)/s^2`
  (:func:`sdediff.score.to_score` of an ``"x0"`` prediction).

Neither imports k-diffusion: a denoiser is any callable ``D(y, sigma)`` with ``sigma`` a ``(batch,)`` tensor.
:func:`load_sampling` loads k-diffusion's ``sampling.py`` for tests and benchmarks.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import sys
import types
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch
from torch import Tensor, nn

from .._utils import expand_as
from .._validate import check_float
from ..score import ScoreModel
from ..sdes.linear import LinearSDE, require_linear
from ..sdes.ve import VESDE

__all__ = ["KDiffusionDenoiser", "from_kdiffusion", "sigma_of_time", "load_sampling"]

Denoiser = Callable[[Tensor, Tensor], Tensor]


def sigma_of_time(sde: LinearSDE, t: Tensor) -> Tensor:
    r"""k-diffusion's noise level :math:`\sigma(t) = s(t)/m(t) = e^{-\lambda(t)/2}` at the times ``t``, in float64.

    Turns an sdediff time grid into the ``sigmas`` of a k-diffusion sampler (append a ``0`` to end at
    :math:`x_0`).
    """
    sde = require_linear(sde, "sigma_of_time")
    return (-0.5 * sde.log_snr(torch.as_tensor(t).to(torch.float64))).exp()


class KDiffusionDenoiser:
    r"""An sdediff ``(sde, score_fn)`` as a k-diffusion denoiser :math:`D(y, \sigma)`.

    .. math::  D(y, \sigma) = \frac{x + s(t)^2\,\mathrm{score\_fn}(x, t)}{m(t)}, \qquad x = m(t)\,y, \qquad
               \lambda(t) = -2\log\sigma,

    the time found by vectorised bisection on :math:`[t_{min}, T]` (:meth:`LinearSDE.time_of_log_snr`, float64;
    levels beyond the ends clamp to them) and the estimate by :meth:`LinearSDE.denoise`.

    Parameters
    ----------
    sde : LinearSDE
        The forward SDE of the score function.
    score_fn : callable
        ``score_fn(x, t)``, the model's score.
    t_min : float
        Lower end of the time search (default 0); noise levels below :math:`\sigma(t_{min})` are evaluated at
        :math:`t_{min}`.
    """

    def __init__(self, sde: LinearSDE, score_fn: Callable[[Tensor, Tensor], Tensor], t_min: float = 0.0) -> None:
        self.sde = require_linear(sde, "KDiffusionDenoiser")
        self.score_fn, self.t_min = score_fn, check_float("t_min", t_min, 0, sde.T, high_open=True)

    @property
    def sigma_min(self) -> float:
        r""":math:`\sigma(t_{min})` (k-diffusion models expose their range as ``sigma_min``/``sigma_max``)."""
        return float(sigma_of_time(self.sde, torch.tensor([self.t_min], dtype=torch.float64)))

    @property
    def sigma_max(self) -> float:
        r""":math:`\sigma(T)`."""
        return float(sigma_of_time(self.sde, torch.tensor([self.sde.T], dtype=torch.float64)))

    def time_of(self, sigma: Tensor) -> Tensor:
        r"""The times :math:`t(\sigma)` where :math:`\lambda(t) = -2\log\sigma`, in float64."""
        return self.sde.time_of_log_snr(-2 * sigma.to(torch.float64).log(), self.t_min)

    def __call__(self, y: Tensor, sigma: Tensor) -> Tensor:
        """:math:`D(y, \\sigma)` for a state ``y`` of any shape (batch, ...) and ``sigma`` of shape ``(batch,)``."""
        sigma = torch.as_tensor(sigma, device=y.device)
        t = self.time_of(sigma.expand(y.shape[0]) if sigma.dim() == 0 else sigma).to(y.dtype)
        x = expand_as(self.sde.mean_coeff(t), y) * y
        return self.sde.denoise(x, t, self.score_fn(x, t))


class _DenoiserNet(nn.Module):
    r"""``net(x, t) = D(x/m(t), s(t)/m(t))``: a denoiser seen as an :math:`\hat x_0`-predicting network."""

    def __init__(self, denoiser: Denoiser, sde: LinearSDE) -> None:
        super().__init__()
        self.denoiser, self.sde = denoiser, sde

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        m, s = self.sde.mean_coeff(t), self.sde.marginal_std(t)
        return self.denoiser(x / expand_as(m, x), s / m)


def from_kdiffusion(denoiser: Denoiser, sigma_min: float | None = None, sigma_max: float | None = None, *,
                    sde: LinearSDE | None = None) -> tuple[LinearSDE, ScoreModel]:
    r"""A k-diffusion denoiser :math:`D(y, \sigma)` as an sdediff ``(sde, score_fn)``.

    .. math::  \nabla\log p_t(x) = \frac{m\,D(x/m,\ s/m) - x}{s^2}

    (Tweedie's formula; :class:`sdediff.score.ScoreModel` with ``prediction="x0"``). With no ``sde`` this is the
    :class:`~sdediff.VESDE` :math:`\sigma(t) = \sigma_{min}(\sigma_{max}/\sigma_{min})^t` (:math:`m = 1`,
    :math:`s = \sigma`), where the score is :math:`(D(x, \sigma(t)) - x)/\sigma(t)^2`; finish sampling with
    ``denoise=True`` to end, like k-diffusion's samplers, at :math:`D` itself.

    Parameters
    ----------
    denoiser : callable
        ``D(y, sigma)`` with ``sigma`` a ``(batch,)`` tensor, returning a tensor like ``y`` (a k-diffusion
        ``Denoiser`` or any callable).
    sigma_min, sigma_max : float, optional
        The VE SDE's noise range; default the denoiser's ``sigma_min``/``sigma_max`` attributes. Ignored with ``sde``.
    sde : LinearSDE, optional
        Use this SDE instead (e.g. ``sdediff.VPSDE()`` for a denoiser of a VP-trained model); the denoiser is then
        called at :math:`y = x/m(t)`, :math:`\sigma = s(t)/m(t)`.

    Returns
    -------
    (sde, score_fn)
    """
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable as D(y, sigma), got {type(denoiser).__name__}")
    if sde is None:
        sigma_min = getattr(denoiser, "sigma_min", None) if sigma_min is None else sigma_min
        sigma_max = getattr(denoiser, "sigma_max", None) if sigma_max is None else sigma_max
        if sigma_min is None or sigma_max is None:
            raise ValueError("give sigma_min and sigma_max (the denoiser has no sigma_min/sigma_max attributes), "
                             "or an sde")
        sde = VESDE(float(sigma_min), float(sigma_max))
    sde = require_linear(sde, "from_kdiffusion")
    return sde, ScoreModel(_DenoiserNet(denoiser, sde), sde, prediction="x0")


_PACKAGE = "_sdediff_kdiffusion"


@cache
def load_sampling() -> tuple[types.ModuleType | None, str]:
    """``k_diffusion.sampling`` and a note on how it was loaded (``None`` and why, when it cannot be).

    k-diffusion's package ``__init__`` imports its whole training stack (torchvision, clean-fid, kornia,
    scikit-image, wandb, ...), which a light install (``pip install --no-deps k-diffusion``) lacks. Its
    ``sampling.py`` needs only torch, scipy, torchdiffeq, torchsde, tqdm and a few helpers of ``k_diffusion.utils``.
    When the full import fails, the installed ``sampling.py`` file itself is loaded under a private package
    name, beside a stand-in ``utils`` module holding only the helpers ``sampling.py`` uses, compiled from the
    installed ``utils.py`` source. ``sys.modules['k_diffusion']`` is left untouched.
    """
    try:
        from importlib.metadata import PackageNotFoundError, version
        try:
            ver = version("k-diffusion")
        except PackageNotFoundError:
            return None, "k-diffusion is not installed (pip install --no-deps k-diffusion==0.1.1.post1)"
        try:
            import k_diffusion.sampling as kds  # a full install with all its dependencies
            return kds, f"k-diffusion {ver} (full import)"
        except ImportError as err:
            first_error = f"{type(err).__name__}: {err}"
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None or not spec.submodule_search_locations:
            return None, f"k-diffusion {ver} installed but not importable ({first_error})"
        root = Path(next(iter(spec.submodule_search_locations)))
        sampling_src = (root / "sampling.py").read_text()
        utils_src = (root / "utils.py").read_text()
        wanted = {node.attr for node in ast.walk(ast.parse(sampling_src))
                  if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "utils"}
        defs = [node for node in ast.parse(utils_src).body
                if isinstance(node, ast.FunctionDef) and node.name in wanted]
        if {d.name for d in defs} != wanted:
            return None, f"k-diffusion {ver}: sampling.py needs utils.{sorted(wanted)}, not all found"
        package = types.ModuleType(_PACKAGE)
        package.__path__ = []  # a package with no files of its own
        utils = types.ModuleType(f"{_PACKAGE}.utils")
        utils.__dict__.update({"torch": torch, "math": math})
        exec(compile(ast.Module(body=defs, type_ignores=[]), str(root / "utils.py"), "exec"), utils.__dict__)
        package.utils = utils
        sys.modules[_PACKAGE] = package
        sys.modules[utils.__name__] = utils
        mod_spec = importlib.util.spec_from_file_location(f"{_PACKAGE}.sampling", root / "sampling.py")
        kds = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_spec.name] = kds
        mod_spec.loader.exec_module(kds)
        package.sampling = kds
        return kds, (f"k-diffusion {ver}: k_diffusion/sampling.py loaded alone (utils.{', '.join(sorted(wanted))} "
                     f"from its utils.py); the full package import fails here ({first_error})")
    except Exception as err:  # a broken peer install must not break the caller
        return None, f"k-diffusion could not be loaded: {type(err).__name__}: {err}"
