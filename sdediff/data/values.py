r"""The map between a data set's own values and the model's interval :math:`[-1, 1]`.

A :class:`ValueTransform` is what a run saves (``to_config()``) so that samples and bits/dim come back in
the data's units. Two kinds:

Continuous (``levels=None``)
    Values :math:`y \in [\mathrm{low}, \mathrm{high}]` map affinely, with centre
    :math:`c = (\mathrm{low} + \mathrm{high})/2` and scale :math:`s = (\mathrm{high} - \mathrm{low})/2`,

    .. math::  x = (y - c)/s, \qquad y = c + s\,x

    (exactly the identity for ``low=-1, high=1``).

Quantised (``levels=K``)
    Integers :math:`k \in \{\mathrm{low}, \dots, \mathrm{high}\}` with :math:`K = \mathrm{high} - \mathrm{low} + 1`
    cut :math:`[-1, 1]` into ``K`` bins of width :math:`2/K`, as :func:`sdediff.dequantize` and
    :func:`sdediff.data.dequantize_levels` do. A level maps to its bin centre and back to the bin it falls in,

    .. math::  x = -1 + \frac{2\,(k - \mathrm{low} + \tfrac12)}{K}, \qquad
               k = \mathrm{low} + \operatorname{clip}\big(\lfloor K (x + 1)/2 \rfloor, 0, K - 1\big),

    and :meth:`ValueTransform.dequantize` spreads a bin centre uniformly over its bin (the Trainer's
    ``transform=`` for training and likelihoods on quantised data).

For 8-bit images (``low=0, high=255, levels=256``) :meth:`ValueTransform.bits_per_dim` is exactly
:func:`sdediff.bits_per_dim` with ``bits=8``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._validate import check_float, check_int
from .digits import bits_per_dim_levels, dequantize_levels

__all__ = ["ValueTransform"]


@dataclass(frozen=True)
class ValueTransform:
    """Affine map of data values in ``[low, high]`` onto the model's ``[-1, 1]`` (see the module notes).

    Parameters
    ----------
    low, high : float
        The data's value range, ``high > low``. For quantised data both are integers.
    levels : int, optional
        Number of integer levels ``K = high - low + 1`` of quantised data; ``None`` for continuous values.
    """

    low: float
    high: float
    levels: int | None = None

    def __post_init__(self) -> None:
        check_float("low", self.low)
        check_float("high", self.high)
        if not self.high > self.low:
            raise ValueError(f"ValueTransform needs high > low, got low={self.low!r}, high={self.high!r}")
        if self.levels is not None:
            check_int("levels", self.levels, 2, optional=True)
            if self.low != int(self.low) or self.high - self.low + 1 != self.levels:
                raise ValueError(f"quantised ValueTransform needs integer low, high with levels = high - low + 1, "
                                 f"got low={self.low!r}, high={self.high!r}, levels={self.levels!r}")

    @classmethod
    def identity(cls) -> ValueTransform:
        """The continuous map with ``low=-1, high=1``: data already on the model's scale."""
        return cls(-1.0, 1.0)

    @classmethod
    def bits(cls, bits: int) -> ValueTransform:
        """Quantised ``bits``-bit data, integers ``0 .. 2**bits - 1`` (``bits(8)`` for 8-bit images)."""
        bits = check_int("bits", bits)
        return cls(0, 2**bits - 1, 2**bits)

    @property
    def quantised(self) -> bool:
        """Whether the data are integer levels."""
        return self.levels is not None

    @property
    def bit_depth(self) -> int | None:
        """:math:`\\log_2 K` when the number of levels ``K`` is a power of two (8 for 8-bit images), else ``None``."""
        if self.levels is None or self.levels & (self.levels - 1):
            return None
        return self.levels.bit_length() - 1

    @property
    def centre(self) -> float:
        """Middle of the data range, :math:`(\\mathrm{low} + \\mathrm{high})/2` (continuous data)."""
        return (self.low + self.high) / 2

    @property
    def scale(self) -> float:
        """Data units per model unit, :math:`(\\mathrm{high} - \\mathrm{low})/2` (continuous) or :math:`K/2` (quantised)."""
        return (self.high - self.low) / 2 if self.levels is None else self.levels / 2

    def to_model(self, y: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Data values ``y`` (any shape) to model values: the affine map, or bin centres for quantised data.

        The result has ``dtype`` (default: ``y``'s floating dtype, else the default dtype).
        """
        dtype = dtype or (y.dtype if y.is_floating_point() else torch.get_default_dtype())
        if self.levels is None:
            return ((y.to(torch.float64) - self.centre) / self.scale).to(dtype)
        return (-1 + 2 * (y.to(torch.float64) - self.low + 0.5) / self.levels).to(dtype)

    def to_data(self, x: Tensor) -> Tensor:
        """Model values ``x`` back to data values: the inverse affine map (``x``'s dtype), or for quantised data
        the level of the bin each value falls in, clipped to ``[low, high]``, as ``int64``."""
        if self.levels is None:
            return (self.centre + self.scale * x.to(torch.float64)).to(x.dtype)
        k = torch.floor((x.to(torch.float64) + 1) * self.levels / 2).clamp(0, self.levels - 1)
        return k.to(torch.int64) + int(self.low)

    def dequantize(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        r"""Spread quantised model values uniformly over their bins; continuous data pass through unchanged.

        With ``k`` the level of ``x``'s bin, returns :math:`-1 + 2(k - \mathrm{low} + u)/K`,
        :math:`u \sim U(0, 1)` drawn from ``generator`` (:func:`sdediff.data.dequantize_levels`), in ``x``'s
        dtype. Its signature fits :class:`~sdediff.training.Trainer`'s ``transform=``.
        """
        if self.levels is None:
            return x
        k = self.to_data(x) - int(self.low)
        return dequantize_levels(k, self.levels, generator=generator, dtype=x.dtype)

    def bits_per_dim(self, log_prob: Tensor, num_dims: int) -> Tensor:
        r"""Bits/dim in the data's own units from a model log-density ``log_prob`` (nats) on ``[-1, 1]``.

        Quantised: the dequantised bound :math:`-\log p(x)/(D\ln 2) + \log_2 K - 1`
        (:func:`sdediff.data.bits_per_dim_levels` with width 2; :func:`sdediff.bits_per_dim` for
        :math:`K = 2^b`). Continuous: the density in data units is :math:`p(x)/\mathrm{scale}^D`, so
        :math:`-\log p(x)/(D\ln 2) + \log_2 \mathrm{scale}` (a differential entropy estimate; it can be negative).
        """
        if self.levels is not None:
            return bits_per_dim_levels(log_prob, num_dims, self.levels, 2.0)
        num_dims = check_int("num_dims", num_dims)
        return -log_prob / (num_dims * math.log(2)) + math.log2(self.scale)

    def to_config(self) -> dict[str, Any]:
        """Plain values (``low``, ``high``, ``levels``) to save with a run; :meth:`from_config` reads them back."""
        return {"low": self.low, "high": self.high, "levels": self.levels}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ValueTransform:
        """The transform saved by :meth:`to_config`."""
        if not isinstance(config, dict) or set(config) != {"low", "high", "levels"}:
            raise ValueError(f"a ValueTransform config is a dict with keys 'low', 'high', 'levels', got {config!r}")
        return cls(config["low"], config["high"], config["levels"])
