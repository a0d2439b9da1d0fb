r"""Gaussian mixtures with exact noisy marginals, scores and posteriors under linear SDEs.

A linear forward SDE has the Gaussian kernel :math:`x_t \mid x_0 \sim N(m(t)\,x_0,\ s(t)^2 I)`. Pushing a
mixture :math:`p_0 = \sum_k w_k N(\mu_k, \Sigma_k)` through it gives again a mixture,

.. math::  p_t(x) = \sum_k w_k\, N\big(x;\ m(t)\mu_k,\ C_k(t)\big), \qquad C_k(t) = m(t)^2\Sigma_k + s(t)^2 I,

so the density, the score and the component posterior are known in closed form at every ``t``. This makes
:class:`GaussianMixture` the reference target for testing samplers and learned scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from .._utils import check_time, work_dtype
from .._validate import check_float, check_int, is_number

_LOG_2PI = math.log(2.0 * math.pi)
# Relative tolerances used when validating covariances given in float32 or float64.
_SYMMETRY_RTOL = 1e-6
_NEGATIVE_EIG_RTOL = 1e-6


class LinearKernelSDE(Protocol):
    """What :class:`GaussianMixture` needs from an SDE: the coefficients of its Gaussian kernel."""

    def mean_coeff(self, t: Tensor) -> Tensor: ...

    def marginal_std(self, t: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class _Params:
    """Mixture parameters cast to one (dtype, device)."""

    weights: Tensor  # (K,)
    log_weights: Tensor  # (K,)
    means: Tensor  # (K, d)
    evecs: Tensor  # (K, d, d), columns are eigenvectors: Sigma_k = U_k diag(evals_k) U_k^T
    evals: Tensor  # (K, d)
    sqrt_evals: Tensor  # (K, d)
    rotated_means: Tensor  # (K, d), U_k^T mu_k


def _as_float64(value: Any, name: str) -> Tensor:
    """Convert an array-like to a float64 CPU tensor, rejecting non-numeric and complex input."""
    if isinstance(value, Tensor) and (value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{name} must be a real floating tensor, got dtype {value.dtype}")
    try:
        out = torch.as_tensor(value).detach().to(device="cpu", dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be a tensor or array-like of real numbers, "
                        f"got {type(value).__name__}") from err
    if not torch.isfinite(out).all():
        raise ValueError(f"{name} must contain only finite values")
    return out


class GaussianMixture:
    r"""Mixture of full-covariance Gaussians :math:`p_0 = \sum_k w_k N(\mu_k, \Sigma_k)` on :math:`R^d`.

    Under a linear SDE with kernel :math:`N(m(t)x_0, s(t)^2 I)` the marginal is

    .. math::  p_t(x) = \sum_k w_k N\big(x;\ m\mu_k,\ C_k\big), \qquad C_k = m^2\Sigma_k + s^2 I,

    and its score is :math:`\nabla_x \log p_t(x) = -\sum_k r_k(x)\, C_k^{-1}(x - m\mu_k)` with the
    responsibilities

    .. math::  r_k(x) = p_t(k \mid x) = \mathrm{softmax}_k\big(\log w_k + \log N(x; m\mu_k, C_k)\big).

    Each :math:`\Sigma_k = U_k \Lambda_k U_k^\top` is eigendecomposed once, in float64, so that
    :math:`C_k = U_k\,\mathrm{diag}(m^2\lambda_k + s^2)\,U_k^\top` for every ``t``: with
    :math:`y_k = U_k^\top(x - m\mu_k)` and :math:`v_k = m^2\lambda_k + s^2`,

    .. math::  \log N(x; m\mu_k, C_k) = -\tfrac12\Big(\sum_i \frac{y_{k,i}^2}{v_{k,i}} + \sum_i \log v_{k,i}
               + d\log 2\pi\Big), \qquad C_k^{-1}(x - m\mu_k) = U_k\,\frac{y_k}{v_k}.

    Per-sample times cost :math:`O(\text{batch}\cdot K\cdot d^2)` and no ``(batch, K, d, d)`` tensor is
    built. Parameters are stored in float64 on the CPU and cast (and cached) to the dtype and device of
    the input on use.

    Parameters
    ----------
    weights : array-like, shape (K,)
        Positive mixture weights; normalised to sum to one.
    means : array-like, shape (K, d)
        Component means :math:`\mu_k`.
    covs : array-like, shape (K, d, d)
        Symmetric positive semi-definite covariances :math:`\Sigma_k`. Eigenvalues below
        ``d * eps * max|eigenvalue|`` are treated as zero; singular components are allowed whenever
        ``s(t) > 0``, but :math:`p_0` then has no density and :meth:`log_prob` without ``sde`` raises.

    Raises
    ------
    TypeError
        If an argument is not a real numeric array.
    ValueError
        If shapes disagree, a value is not finite, a weight is not positive, or a covariance is not
        symmetric positive semi-definite.
    """

    def __init__(self, weights: Any, means: Any, covs: Any) -> None:
        weights = _as_float64(weights, "weights")
        means = _as_float64(means, "means")
        covs = _as_float64(covs, "covs")
        if weights.dim() != 1 or weights.shape[0] < 1:
            raise ValueError(f"weights must have shape (K,) with K >= 1, got {tuple(weights.shape)}")
        num_components = weights.shape[0]
        if not (weights > 0).all():
            raise ValueError("weights must all be positive")
        if means.dim() != 2 or means.shape[0] != num_components or means.shape[1] < 1:
            raise ValueError(f"means must have shape (K, d) = ({num_components}, d), "
                             f"got {tuple(means.shape)}")
        dim = means.shape[1]
        if covs.shape != (num_components, dim, dim):
            raise ValueError(f"covs must have shape (K, d, d) = ({num_components}, {dim}, {dim}), "
                             f"got {tuple(covs.shape)}")
        scale = covs.abs().amax(dim=(1, 2))  # (K,)
        asymmetry = (covs - covs.mT).abs().amax(dim=(1, 2))
        if (asymmetry > _SYMMETRY_RTOL * scale).any():
            raise ValueError("covs must be symmetric")
        covs = 0.5 * (covs + covs.mT)
        evals, evecs = torch.linalg.eigh(covs)
        largest = evals.abs().amax(dim=1, keepdim=True)
        if (evals < -_NEGATIVE_EIG_RTOL * largest).any():
            raise ValueError("covs must be positive semi-definite")
        evals = torch.where(evals <= dim * torch.finfo(torch.float64).eps * largest, 0.0, evals)

        self._weights = weights / weights.sum()
        self._means = means
        self._covs = evecs @ torch.diag_embed(evals) @ evecs.mT
        self._evals = evals
        self._evecs = evecs
        self._singular = bool((evals == 0).any())
        self._cache: dict[tuple[torch.dtype, torch.device], _Params] = {}

    # --- constructors ---------------------------------------------------------------------------------
    @classmethod
    def ring(cls, num_components: int = 8, radius: float = 4.0, std: float = 0.5,
             dim: int = 2) -> GaussianMixture:
        r"""Equal-weight isotropic components on a circle in the first two coordinates.

        Means are :math:`\mu_k = r(\cos(2\pi k/K), \sin(2\pi k/K), 0, \dots, 0)` and covariances
        :math:`\sigma^2 I_d`.

        Parameters
        ----------
        num_components : int
            Number of components ``K``.
        radius : float
            Radius ``r`` of the circle.
        std : float
            Per-coordinate standard deviation :math:`\sigma > 0` of every component.
        dim : int
            Ambient dimension ``d >= 2``.
        """
        num_components = check_int("num_components", num_components)
        dim = check_int("dim", dim, 2)
        std = check_float("std", std, 0, low_open=True)
        angles = 2.0 * math.pi * torch.arange(num_components, dtype=torch.float64) / num_components
        means = torch.zeros(num_components, dim, dtype=torch.float64)
        means[:, 0] = radius * torch.cos(angles)
        means[:, 1] = radius * torch.sin(angles)
        covs = (std**2) * torch.eye(dim, dtype=torch.float64).expand(num_components, dim, dim)
        return cls(torch.ones(num_components, dtype=torch.float64), means, covs)

    @classmethod
    def random(cls, num_components: int, dim: int, generator: torch.Generator | None = None,
               mean_scale: float = 3.0) -> GaussianMixture:
        r"""Random mixture with anisotropic full covariances, handy for tests.

        Draws :math:`w_k \sim U(0.5, 1.5)` (then normalised), :math:`\mu_k \sim N(0, \text{mean\_scale}^2 I)`
        and :math:`\Sigma_k = A_k A_k^\top / d + 0.05\, I` with :math:`A_k` standard normal ``(d, d)``.

        Parameters
        ----------
        num_components : int
            Number of components ``K``.
        dim : int
            Dimension ``d``.
        generator : torch.Generator, optional
            Source of randomness (drawn on the generator's device, then moved to the CPU).
        mean_scale : float
            Standard deviation of the component means.
        """
        num_components = check_int("num_components", num_components)
        dim = check_int("dim", dim)
        device = generator.device if generator is not None else torch.device("cpu")
        opts: dict[str, Any] = {"generator": generator, "device": device, "dtype": torch.float64}
        weights = 0.5 + torch.rand(num_components, **opts)
        means = mean_scale * torch.randn(num_components, dim, **opts)
        factors = torch.randn(num_components, dim, dim, **opts)
        covs = factors @ factors.mT / dim + 0.05 * torch.eye(dim, dtype=torch.float64, device=device)
        return cls(weights.cpu(), means.cpu(), covs.cpu())

    # --- basic properties -----------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Dimension ``d`` of the data."""
        return self._means.shape[1]

    @property
    def num_components(self) -> int:
        """Number of components ``K``."""
        return self._means.shape[0]

    @property
    def weights(self) -> Tensor:
        """Normalised weights, float64 ``(K,)``."""
        return self._weights.clone()

    @property
    def means(self) -> Tensor:
        """Component means, float64 ``(K, d)``."""
        return self._means.clone()

    @property
    def covs(self) -> Tensor:
        """Component covariances, float64 ``(K, d, d)``."""
        return self._covs.clone()

    def __repr__(self) -> str:
        return f"GaussianMixture(num_components={self.num_components}, dim={self.dim})"

    def mean(self) -> Tensor:
        r"""Mixture mean :math:`\sum_k w_k \mu_k`, float64 ``(d,)``."""
        return self._weights @ self._means

    def covariance(self) -> Tensor:
        r"""Mixture covariance, float64 ``(d, d)``.

        .. math::  \mathrm{Cov} = \sum_k w_k(\Sigma_k + \mu_k\mu_k^\top) - \bar\mu\bar\mu^\top,
                   \qquad \bar\mu = \sum_k w_k\mu_k
        """
        mu = self.mean()
        second_moments = self._covs + self._means[:, :, None] * self._means[:, None]
        second = torch.einsum("k,kij->ij", self._weights, second_moments)
        return second - torch.outer(mu, mu)

    # --- sampling -------------------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None, dtype: torch.dtype | None = None,
               return_labels: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        r"""Exact samples from :math:`p_0`.

        Draws :math:`k \sim \mathrm{Cat}(w)` and :math:`x = \mu_k + U_k \Lambda_k^{1/2} z` with
        :math:`z \sim N(0, I)`.
        The draw happens on the generator's device (the CPU without a generator, unless ``device`` says
        otherwise) in float64, so a seeded CPU generator gives the same samples for any ``device``/``dtype``.

        Parameters
        ----------
        n : int
            Number of samples.
        generator : torch.Generator, optional
            Source of randomness; the global RNG when ``None``.
        device : torch.device or str, optional
            Device of the output; defaults to the generator's device (CPU without a generator).
        dtype : torch.dtype, optional
            Floating dtype of the output; defaults to ``torch.get_default_dtype()``.
        return_labels : bool
            Also return the component index of every sample.

        Returns
        -------
        Tensor or tuple of Tensor
            Samples ``(n, d)``, and with ``return_labels`` the ``int64`` labels ``(n,)``.
        """
        n = check_int("n", n)
        if generator is not None:
            draw_device = generator.device
        else:
            draw_device = torch.device(device) if device is not None else torch.device("cpu")
        out_device = torch.device(device) if device is not None else draw_device
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        params = self._params(work_dtype(draw_device), draw_device)
        labels = torch.multinomial(params.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, device=draw_device, dtype=params.means.dtype)
        x = torch.empty_like(noise)
        for k in range(self.num_components):
            mask = labels == k
            x[mask] = params.means[k] + (noise[mask] * params.sqrt_evals[k]) @ params.evecs[k].mT
        x = x.to(device=out_device, dtype=dtype)
        if return_labels:
            return x, labels.to(out_device)
        return x

    # --- densities, posteriors and scores ----------------------------------------------------------------
    def log_prob(self, x: Tensor, sde: LinearKernelSDE | None = None,
                 t: Tensor | float | None = None) -> Tensor:
        r"""Exact log density of :math:`p_t` (of :math:`p_0` without ``sde`` and ``t``).

        .. math::  \log p_t(x) = \operatorname{logsumexp}_k\big(\log w_k + \log N(x; m\mu_k, C_k)\big)

        Parameters
        ----------
        x : Tensor, shape (batch, d) or (batch, \*event) with ``prod(event) == d``
            Points at which to evaluate the density; differentiable.
        sde : object with ``mean_coeff`` and ``marginal_std``, optional
            Linear SDE; ``None`` (together with ``t=None``) evaluates :math:`p_0`.
        t : Tensor or float, optional
            Time, a scalar or a per-sample ``(batch,)`` tensor.

        Returns
        -------
        Tensor, shape (batch,)
            In ``x``'s dtype and device.

        Raises
        ------
        ValueError
            If :math:`p_0` is requested but a covariance is singular, or on bad shapes.
        """
        log_joint, _ = self._log_joint(x, sde, t)
        return torch.logsumexp(log_joint, dim=1)

    def component_posterior(self, x: Tensor, t: Tensor | float | None = None,
                            sde: LinearKernelSDE | None = None) -> Tensor:
        r"""Responsibilities (noisy-class posterior) of the components.

        .. math::  p_t(k \mid x) = \mathrm{softmax}_k\big(\log w_k + \log N(x; m\mu_k, C_k)\big)

        Parameters
        ----------
        x : Tensor, shape (batch, d) or (batch, \*event)
            Noisy points.
        t : Tensor or float, optional
            Time, a scalar or a per-sample ``(batch,)`` tensor; ``None`` (with ``sde=None``) uses :math:`p_0`.
        sde : object with ``mean_coeff`` and ``marginal_std``, optional
            Linear SDE.

        Returns
        -------
        Tensor, shape (batch, K)
            Rows sum to one.
        """
        log_joint, _ = self._log_joint(x, sde, t)
        return torch.softmax(log_joint, dim=1)

    def score(self, x: Tensor, t: Tensor | float, sde: LinearKernelSDE) -> Tensor:
        r"""Exact score of :math:`p_t`.

        .. math::  \nabla_x \log p_t(x) = -\sum_k r_k(x)\, U_k \frac{U_k^\top(x - m\mu_k)}{m^2\lambda_k + s^2}

        Parameters
        ----------
        x : Tensor, shape (batch, d) or (batch, \*event)
            Noisy points.
        t : Tensor or float
            Time, a scalar or a per-sample ``(batch,)`` tensor.
        sde : object with ``mean_coeff`` and ``marginal_std``
            Linear SDE.

        Returns
        -------
        Tensor
            Same shape, dtype and device as ``x``.
        """
        if sde is None or t is None:
            raise ValueError("score needs both t and sde; the score of p_0 is not provided")
        log_joint, scaled = self._log_joint(x, sde, t)
        resp = torch.softmax(log_joint, dim=1)
        evecs = self._params(x.dtype, x.device).evecs
        score = -torch.einsum("bke,kde->bd", resp[:, :, None] * scaled, evecs)
        return score.reshape(x.shape)

    def score_fn(self, sde: LinearKernelSDE) -> Callable[[Tensor, Tensor | float], Tensor]:
        """Return ``score_fn(x, t) = self.score(x, t, sde)``, the exact score in the form samplers expect."""
        if not (callable(getattr(sde, "mean_coeff", None)) and callable(getattr(sde, "marginal_std", None))):
            raise TypeError("sde must provide mean_coeff(t) and marginal_std(t)")

        def score_fn(x: Tensor, t: Tensor | float) -> Tensor:
            return self.score(x, t, sde)

        return score_fn

    def marginal(self, sde: LinearKernelSDE, t: Tensor | float) -> GaussianMixture:
        r"""The mixture :math:`p_t` at one time: weights :math:`w_k`, means :math:`m\mu_k`, covariances
        :math:`m^2\Sigma_k + s^2 I`.

        Parameters
        ----------
        sde : object with ``mean_coeff`` and ``marginal_std``
            Linear SDE.
        t : Tensor or float
            A single time (float, 0-d or one-element tensor).
        """
        t_tensor = torch.as_tensor(t, dtype=torch.float64).detach().cpu()
        if t_tensor.numel() != 1:
            raise ValueError(f"t must be a scalar for marginal, got shape {tuple(t_tensor.shape)}")
        t_tensor = t_tensor.reshape(1)
        m = float(torch.as_tensor(sde.mean_coeff(t_tensor)).reshape(-1)[0])
        s = float(torch.as_tensor(sde.marginal_std(t_tensor)).reshape(-1)[0])
        covs = m**2 * self._covs + s**2 * torch.eye(self.dim, dtype=torch.float64)
        return GaussianMixture(self._weights, m * self._means, covs)

    # --- internals ------------------------------------------------------------------------------------
    def _params(self, dtype: torch.dtype, device: torch.device) -> _Params:
        key = (dtype, device)
        if key not in self._cache:
            def cast(v: Tensor) -> Tensor:
                return v.to(device=device, dtype=dtype)

            self._cache[key] = _Params(
                weights=cast(self._weights), log_weights=cast(self._weights.log()), means=cast(self._means),
                evecs=cast(self._evecs), evals=cast(self._evals), sqrt_evals=cast(self._evals.sqrt()),
                rotated_means=cast(torch.einsum("kd,kde->ke", self._means, self._evecs)),
            )
        return self._cache[key]

    def _flatten(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}"
                            + (f" of dtype {x.dtype}" if isinstance(x, Tensor) else ""))
        if x.dim() < 2 or math.prod(x.shape[1:]) != self.dim:
            raise ValueError("x must have shape (batch, d) or (batch, *event) with prod(event) = d = "
                             f"{self.dim}, got {tuple(x.shape)}")
        return x.reshape(x.shape[0], self.dim)

    def _kernel(self, sde: LinearKernelSDE, t: Tensor | float, batch: int,
                x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``m`` shaped ``(b, 1, 1)`` and the variances ``v = m^2 lambda + s^2`` shaped ``(b, K, d)``.

        ``b`` is ``batch`` for per-sample times and 1 for a shared time. The schedule is evaluated in the
        most accurate dtype of the device and only then cast to ``x``'s dtype.
        """
        if not (isinstance(t, Tensor) or is_number(t)):
            raise TypeError(f"t must be a float or a tensor, got {type(t).__name__}")
        if getattr(sde, "T", None) is not None:
            check_time(t, sde.T)
        work = work_dtype(x.device)
        t = torch.as_tensor(t, dtype=work, device=x.device)
        if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, batch)):
            raise ValueError(f"t must be a scalar or a (batch,) tensor with batch = {batch}, "
                             f"got shape {tuple(t.shape)}")
        t = t.reshape(-1)

        def coefficient(value: Tensor) -> Tensor:
            return torch.as_tensor(value, dtype=work, device=x.device).broadcast_to(t.shape)[:, None, None]

        m = coefficient(sde.mean_coeff(t))
        s = coefficient(sde.marginal_std(t))
        variances = m**2 * self._params(work, x.device).evals + s**2
        return m.to(x.dtype), variances.to(x.dtype)

    def _log_joint(self, x: Tensor, sde: LinearKernelSDE | None,
                   t: Tensor | float | None) -> tuple[Tensor, Tensor]:
        r"""Return :math:`\log w_k + \log N(x; m\mu_k, C_k)`, ``(batch, K)``, and :math:`y_k / v_k`,
        ``(batch, K, d)``."""
        flat = self._flatten(x)
        params = self._params(x.dtype, x.device)
        rotated = torch.einsum("bd,kde->bke", flat, params.evecs)
        if sde is None and t is None:
            if self._singular:
                raise ValueError("p_0 has a singular component covariance and no density; "
                                 "pass sde and t with s(t) > 0 to evaluate the noisy marginal instead")
            centred = rotated - params.rotated_means
            variances = params.evals[None]
        elif sde is None or t is None:
            raise ValueError("sde and t must be given together (or both omitted for p_0)")
        else:
            m, variances = self._kernel(sde, t, flat.shape[0], x)
            centred = rotated - m * params.rotated_means
        scaled = centred / variances
        log_normal = -0.5 * ((centred * scaled).sum(-1) + variances.log().sum(-1) + self.dim * _LOG_2PI)
        return params.log_weights + log_normal, scaled
