"""Validation of scalar arguments: one place for the checks every public function makes.

Each check returns the value in its canonical type (``int``, ``float``, ``bool``) or raises an error that
names the argument and says what it must be: :class:`TypeError` for a value of the wrong type (``2.5`` for an
integer, ``"yes"`` for a flag, ``4`` for a shape), :class:`ValueError` for a value of the right type outside
its range (``0`` steps, ``nan``, an unknown name). Booleans are never accepted as numbers (``True`` is an
``int`` to Python, not to a user).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

import torch

C = TypeVar("C")

__all__ = ["check_int", "check_ints", "check_float", "check_choice", "check_bool", "check_dtype", "check_device",
           "is_int", "is_number"]


def is_int(value: Any) -> bool:
    """Whether ``value`` is a Python ``int`` (not ``bool``): for checks whose message must say more than
    :func:`check_int`'s (an argument that may also be a tensor, or one with a hint on where it comes from)."""
    return not isinstance(value, bool) and isinstance(value, int)


def is_number(value: Any) -> bool:
    """Whether ``value`` is a real Python number (``int`` or ``float``, not ``bool``)."""
    return not isinstance(value, bool) and isinstance(value, (int, float))


def check_int(name: str, value: Any, minimum: int | None = 1, maximum: int | None = None,
              *, optional: bool = False) -> int | None:
    """``value`` as an ``int`` in ``[minimum, maximum]`` (either end may be ``None``: unbounded).

    With ``optional=True``, ``None`` is returned as is.
    """
    if value is None and optional:
        return None
    typed = is_int(value)
    if not typed or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if minimum == 1 and maximum is None:
            what = "a positive integer"
        elif minimum == 0 and maximum is None:
            what = "an integer >= 0"
        elif maximum is None:
            what = f"an integer >= {minimum}" if minimum is not None else "an integer"
        elif minimum is None:
            what = f"an integer <= {maximum}"
        else:
            what = f"an integer in [{minimum}, {maximum}]"
        error = ValueError if typed else TypeError
        raise error(f"{name} must be {what}{' or None' if optional else ''}, got {value!r}")
    return int(value)


def check_ints(name: str, values: Any, minimum: int = 1) -> tuple[int, ...]:
    """``values`` (a non-empty sequence of ``int``, each ``>= minimum``; a shape, channel multipliers) as a tuple.

    :class:`TypeError` for a value that is not a sequence of integers (``4``, ``"ab"``, ``(2, 1.0)``),
    :class:`ValueError` for an empty one or one with an integer below ``minimum``."""
    try:
        out = tuple(values) if not isinstance(values, (str, bytes)) else None
    except TypeError:
        out = None
    typed = out is not None and all(is_int(v) for v in out)
    if not typed or not out or not all(v >= minimum for v in out):
        what = "positive integers" if minimum == 1 else f"integers >= {minimum}"
        raise (ValueError if typed else TypeError)(f"{name} must be a non-empty sequence of {what}, got {values!r}")
    return out


def check_float(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False, finite: bool = True,
                optional: bool = False) -> float | None:
    """``value`` as a ``float`` in the interval from ``low`` to ``high`` (``None``: unbounded).

    ``low_open`` / ``high_open`` exclude the ends; ``finite=False`` admits ``inf`` (never NaN). With
    ``optional=True``, ``None`` is returned as is.
    """
    if value is None and optional:
        return None
    typed = is_number(value)
    ok = typed and not math.isnan(value) and (math.isfinite(value) or not finite)
    if ok and low is not None and (value < low or (low_open and value == low)):
        ok = False
    if ok and high is not None and (value > high or (high_open and value == high)):
        ok = False
    if not ok:
        parts = []
        if low is not None:
            parts.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            parts.append(f"{'<' if high_open else '<='} {high:g}")
        if low is not None and high is not None:
            what = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low == 0 and low_open:
            what = "> 0"
        else:
            what = " and ".join(parts)
        kind = "a finite float" if finite else "a float (inf allowed)"
        raise (ValueError if typed else TypeError)(
            f"{name} must be {kind}{' ' + what if what else ''}{' or None' if optional else ''}, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, allowed: Sequence[C]) -> C:
    """``value`` if it is one of ``allowed`` and of the same type as its first entry (no ``True`` for ``1``):
    :class:`TypeError` for another type, :class:`ValueError` for a value of that type that is not allowed."""
    if type(value) is not type(allowed[0]) or value not in allowed:
        error = ValueError if type(value) is type(allowed[0]) else TypeError
        raise error(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False`` (not ``1``, ``"yes"`` or ``None``)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_dtype(name: str, dtype: Any, *, optional: bool = True) -> torch.dtype | None:
    """``dtype`` if it is a real floating-point ``torch.dtype`` (``torch.float32``, ``torch.float64``, ...), else a
    :class:`TypeError` (for anything that is not a ``torch.dtype``, and for an integer, boolean or complex one: the
    wrong kind of number, as for a tensor of that dtype). With ``optional=True``, ``None`` is returned as is."""
    if dtype is None and optional:
        return None
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name} must be a torch floating-point dtype such as torch.float32 or torch.float64"
                        f"{' or None' if optional else ''}, got {dtype!r}")
    if not dtype.is_floating_point:
        raise TypeError(f"{name} must be a real floating-point dtype such as torch.float32 or torch.float64, got {dtype}")
    return dtype


def check_device(name: str, device: Any, *, optional: bool = True) -> torch.device | None:
    """``device`` as a ``torch.device`` that exists on this machine (``"cuda"`` without CUDA is refused with a
    :class:`ValueError` here, not deep inside torch); :class:`TypeError` for a value that is not a device, a string
    or an index. With ``optional=True``, ``None`` is returned as is."""
    if device is None and optional:
        return None
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"{name} must be a torch.device, a device string such as 'cpu' or 'cuda:0', or an index, "
                        f"got {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"{name}={device!r} is not a device name: {err}") from None
    try:
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as err:  # torch raises AssertionError for CUDA in a CPU-only build
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{name}={device!r} is not available on this machine ({reason})") from None
    return dev
