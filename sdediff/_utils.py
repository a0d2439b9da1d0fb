"""Small tensor helpers shared across sdediff (broadcasting of per-sample times and coefficients)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def batch_time(t: Tensor | float, x: Tensor) -> Tensor:
    """Return ``t`` as a ``(batch,)`` tensor on ``x``'s device and dtype.

    A Python float or a 0-d tensor is broadcast to every sample; a 1-d tensor must have
    ``x.shape[0]`` entries.
    """
    if isinstance(t, Tensor) and t.dim() == 1 and t.shape[0] == x.shape[0] and t.dtype == x.dtype \
            and t.device == x.device:
        return t  # already a (batch,) time of x's dtype and device: the solvers' common case, kept cheap
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or a (batch,) tensor with batch={x.shape[0]}, got shape "
                         f"{tuple(t.shape)}")
    return t


def work_dtype(device: torch.device) -> torch.dtype:
    """The most accurate floating dtype on ``device``, for coefficient tables and exact computations: float64,
    except where the device has none (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def all_finite(x: Tensor) -> bool:
    """Whether every element of the floating-point tensor ``x`` is finite, in one reduction pass (a host sync).

    NaN propagates to both the minimum and the maximum and ±Inf becomes one of them, so checking the two
    extremes is exact, and much cheaper than ``torch.isfinite(x).all()``, which makes several passes and a
    boolean tensor the size of ``x``.
    """
    return x.numel() == 0 or bool(torch.isfinite(torch.stack(torch.aminmax(x))).all())


def check_time(t: Tensor | float, T: float, name: str = "t") -> None:
    """Raise a ``ValueError`` naming ``name`` if a time lies outside ``[0, T]`` (up to a relative 1e-6).

    Python numbers and CPU tensors are checked; tensors on an accelerator are not, because reading their
    values would force a host synchronisation (the entry points that build times, such as grids and
    ``eps``, validate those on the host).
    """
    if isinstance(t, Tensor):
        if t.device.type != "cpu" or t.numel() == 0:
            return
        lo, hi = float(t.min()), float(t.max())
    else:
        lo = hi = float(t)
    if not (lo >= 0 and hi <= T * (1 + 1e-6)):
        raise ValueError(f"{name} must lie in [0, T={T:g}], got values in [{lo:g}, {hi:g}]")


def expand_as(c: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample coefficient ``c`` of shape ``(batch,)`` (or 0-d) to broadcast against ``x``."""
    if c.dim() == 0:
        return c
    return c.reshape(c.shape[0], *([1] * (x.dim() - 1)))


def flat_dim(x: Tensor) -> int:
    """Number of elements of one sample of ``x`` (everything but the batch dimension)."""
    return math.prod(x.shape[1:])


def sum_except_batch(x: Tensor) -> Tensor:
    """Sum over every dimension but the first: ``(batch, ...) -> (batch,)``."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def randn_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise like ``x``, drawn with ``generator``.

    The draw happens on the generator's device (so a CPU generator gives the same numbers whatever
    device ``x`` lives on) and is then moved to ``x``'s device.
    """
    return randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def randn(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None,
          device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """``torch.randn`` that draws on ``generator``'s device and moves the result to ``device``."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    gen_device = generator.device if generator is not None else None
    if gen_device is None or (gen_device.type == device.type and device.index in (None, gen_device.index)):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
