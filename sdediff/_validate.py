"""Validation of scalar arguments: one place for the checks every public function makes.

Each check returns the value in its canonical type (``int``, ``float``, ``bool``) or raises a
:class:`ValueError` (:class:`TypeError` for a value of the wrong kind where the message says so) that names
the argument. Booleans are never accepted as numbers (``True`` is an ``int`` to Python, not to a user).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

C = TypeVar("C")

__all__ = ["check_int", "check_ints", "check_float", "check_choice", "check_bool", "is_int", "is_number"]


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
    ok = is_int(value)
    if ok and minimum is not None and value < minimum:
        ok = False
    if ok and maximum is not None and value > maximum:
        ok = False
    if not ok:
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
        raise ValueError(f"{name} must be {what}{' or None' if optional else ''}, got {value!r}")
    return int(value)


def check_ints(name: str, values: Any, minimum: int = 1) -> tuple[int, ...]:
    """``values`` (a non-empty sequence of ``int``, each ``>= minimum``; a shape, channel multipliers) as a tuple."""
    try:
        out = tuple(values)
    except TypeError:
        out = ()
    if not out or not all(is_int(v) and v >= minimum for v in out):
        what = "positive integers" if minimum == 1 else f"integers >= {minimum}"
        raise ValueError(f"{name} must be a non-empty sequence of {what}, got {values!r}")
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
    ok = is_number(value) and not math.isnan(value) and (math.isfinite(value) or not finite)
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
        raise ValueError(f"{name} must be {kind}{' ' + what if what else ''}{' or None' if optional else ''}, "
                         f"got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, allowed: Sequence[C]) -> C:
    """``value`` if it is one of ``allowed`` and of the same type as its first entry (no ``True`` for ``1``)."""
    if type(value) is not type(allowed[0]) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False`` (not ``1``, ``"yes"`` or ``None``)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value
