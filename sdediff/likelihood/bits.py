r"""Bits per dimension of quantised data, with error bars, and uniform dequantisation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, overload

import torch
from torch import Tensor

from .._validate import check_float, check_int

if TYPE_CHECKING:
    from .engine import LikelihoodResult

__all__ = ["bits_per_dim", "BitsPerDim", "dequantize"]


@dataclass
class BitsPerDim:
    r"""Bits/dim of a :class:`~sdediff.likelihood.LikelihoodResult`, point by point and on average, with error bars.

    Attributes
    ----------
    per_point : Tensor
        ``(batch,)`` bits/dim of every point.
    per_point_std_error : Tensor
        ``(batch,)`` its standard error due to the Hutchinson probes (zero for the exact trace, NaN with one probe).
    per_point_integration_error : Tensor
        ``(batch,)`` the integrator's error estimate, in bits/dim.
    mean : float
        The mean over the points.
    std_error : float
        The standard error of ``mean`` over the points, :math:`\mathrm{sd}/\sqrt n`: the spread between points
        includes the probes' noise, so this is the error bar of the reported number.
    probe_std_error : float
        The part of the error of ``mean`` due to the probes alone, :math:`\sqrt{\sum_i \mathrm{se}_i^2}/n`.
    integration_error : float
        The mean of the per-point integration-error estimates (a bound on the bias of ``mean`` from integrating).
    """

    per_point: Tensor
    per_point_std_error: Tensor
    per_point_integration_error: Tensor
    mean: float
    std_error: float
    probe_std_error: float
    integration_error: float

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.std_error:.4f} bits/dim"


def _offset(num_dims: int, bits: int, data_width: float, levels: int | None) -> tuple[float, float]:
    """``(1/(D ln 2), log2 K - log2 w)`` with ``K = levels`` or ``2**bits``, after checking the arguments."""
    check_int("num_dims", num_dims)
    check_int("bits", bits)
    check_float("data_width", data_width, 0.0, low_open=True)
    log2_levels = bits if levels is None else math.log2(check_int("levels", levels, 2))
    return 1.0 / (num_dims * math.log(2)), log2_levels - math.log2(data_width)


@overload
def bits_per_dim(log_prob: Tensor, num_dims: int, bits: int = 8, data_width: float = 2.0, *,
                 levels: int | None = None) -> Tensor: ...


@overload
def bits_per_dim(log_prob: LikelihoodResult, num_dims: int, bits: int = 8, data_width: float = 2.0, *,
                 levels: int | None = None) -> BitsPerDim: ...


def bits_per_dim(log_prob, num_dims, bits=8, data_width=2.0, *, levels=None):
    r"""Bits per dimension of ``b``-bit data from a log-density of its dequantised, rescaled version.

    Integer data :math:`k \in \{0, \dots, 2^b-1\}^D` dequantised and mapped to an interval of width
    :math:`w` by :math:`x = x_{lo} + w(k+u)/2^b` (see :func:`dequantize`; :math:`w = 2` for
    :math:`[-1, 1]`) have, by the change of scale, density
    :math:`p(k+u) = p(x)\,(w/2^b)^D`, so

    .. math::  \text{bits/dim} = -\frac{\log p(x)}{D\ln 2} + b - \log_2 w,

    i.e. :math:`-\log p(x)/(D\ln 2) + b - 1` on :math:`[-1,1]`. With uniform dequantisation it upper
    bounds the discrete code length. Averaging bits/dim over several draws of ``u`` only reduces its
    variance; to tighten the bound, average the *densities* over the draws (log-mean-exp of
    ``log_prob``) before converting.

    Parameters
    ----------
    log_prob : Tensor or LikelihoodResult
        Log-density of the model at ``x``, in nats (e.g. ``log_likelihood(...).log_prob``); given the whole
        :class:`~sdediff.likelihood.LikelihoodResult`, the result is a :class:`BitsPerDim` with the mean and its
        standard errors.
    num_dims : int
        ``D``, elements per sample.
    bits : int
        Bit depth ``b`` of the raw data (8 for images).
    data_width : float
        Width ``w`` of the interval the data were mapped to (2 for ``[-1, 1]``, 1 for ``[0, 1]``); finite and > 0.
    levels : int, optional
        Number of quantisation levels :math:`K` when it is not a power of two (the offset is then
        :math:`\log_2 K - \log_2 w`; ``bits`` is not used).

    Returns
    -------
    Tensor or BitsPerDim
        Per-point bits/dim like ``log_prob``; for a result, with the error bars.
    """
    scale, offset = _offset(num_dims, bits, data_width, levels)
    if isinstance(log_prob, Tensor):
        return -log_prob * scale + offset
    from .engine import LikelihoodResult

    if not isinstance(log_prob, LikelihoodResult):
        raise TypeError(f"log_prob must be a tensor or a LikelihoodResult, got {type(log_prob).__name__}")
    res = log_prob
    per_point = -res.log_prob.double() * scale + offset
    n = per_point.numel()
    se = res.std_error.double() * scale
    spread = float(per_point.std() / math.sqrt(n)) if n > 1 else math.nan
    return BitsPerDim(per_point=per_point, per_point_std_error=se,
                      per_point_integration_error=res.integration_error.double() * scale,
                      mean=float(per_point.mean()) if n else math.nan, std_error=spread,
                      probe_std_error=float(se.pow(2).sum().sqrt() / n) if n else math.nan,
                      integration_error=float(res.integration_error.double().mean() * scale) if n else math.nan)


def dequantize(k: Tensor, bits: int = 8, generator: torch.Generator | None = None,
               data_range: tuple[float, float] = (-1.0, 1.0), dtype: torch.dtype | None = None) -> Tensor:
    r"""Uniform dequantisation :math:`x = x_{lo} + (x_{hi} - x_{lo})(k + u)/2^b`, :math:`u \sim U(0,1)^D`.

    ``k`` holds integers in ``[0, 2^b - 1]``; the default range maps to :math:`[-1, 1]`, i.e.
    :math:`x = 2(k+u)/2^b - 1`. Pair with :func:`bits_per_dim` using ``data_width = x_hi - x_lo``.
    ``dtype`` (a floating dtype) is that of the result; default ``k``'s if floating, else torch's default.
    """
    lo, hi = data_range
    check_float("data_range[0]", lo)
    check_float("data_range[1]", hi)
    if not hi > lo:
        raise ValueError(f"data_range must be (lo, hi) with hi > lo, got {data_range!r}")
    check_int("bits", bits)
    if not isinstance(k, Tensor):
        raise TypeError(f"k must be a tensor of integer levels, got {type(k).__name__}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch dtype (the dequantised values are real), got {dtype!r}")
    if k.is_floating_point() and not bool((k == k.round()).all()):
        raise ValueError("k must hold integer values")
    if bool(((k < 0) | (k > 2**bits - 1)).any()):
        raise ValueError(f"k must lie in [0, {2**bits - 1}] for bits={bits}")
    dtype = dtype or (k.dtype if k.is_floating_point() else torch.get_default_dtype())
    u = torch.rand(k.shape, generator=generator, device=generator.device if generator is not None else k.device,
                   dtype=dtype)
    k = k.to(dtype)
    x = lo + (hi - lo) * (k + u.to(k.device)) / 2**bits
    # In floating point, k + u rounds up to k + 1 when u is within half an ulp of 1 (float32: about one
    # draw in 10^5 for k >= 128), which would put x on the left edge of the next bin. Keep every x in its
    # own half-open bin [lo + w k / 2^b, lo + w (k + 1) / 2^b).
    upper = lo + (hi - lo) * (k + 1) / 2**bits
    return torch.minimum(x, torch.nextafter(upper, torch.full_like(upper, -math.inf)))
