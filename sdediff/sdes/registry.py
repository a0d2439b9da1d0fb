"""Rebuilding SDEs from their configuration: a registry of SDE classes by name and :func:`sde_from_config`.

An SDE saves itself as ``sde.to_config() = {"class": name, "params": {argument: value}}`` (plain JSON values);
:func:`sde_from_config` looks the name up among the registered classes and calls ``cls(**params)``. Only
registered classes are ever constructed, so a configuration read from a file cannot run arbitrary code. The
built-in :class:`~sdediff.VPSDE`, :class:`~sdediff.SubVPSDE`, :class:`~sdediff.VESDE` and
:class:`~sdediff.LearnedScheduleSDE` are registered here, ``DiscreteVPSDE`` by :mod:`sdediff.interop.diffusers`,
and a custom SDE by :func:`register_sde`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from .base import SDE
from .learned import LearnedScheduleSDE
from .ve import VESDE
from .vp import VPSDE, SubVPSDE

S = TypeVar("S", bound=type[SDE])

_SDE_CLASSES: dict[str, type[SDE]] = {}


def register_sde(cls: S) -> S:
    """Register an :class:`~sdediff.SDE` subclass under its class name for :func:`sde_from_config`.

    Usable as a class decorator; returns ``cls``. The class should implement :meth:`~sdediff.SDE.to_config`
    so that ``cls(**sde.to_config()["params"])`` rebuilds ``sde``. Registering another class under a name
    already taken raises ``ValueError``; registering the same class again, or a new definition of it (same module
    and qualified name, as when a notebook cell runs twice), replaces the entry.
    """
    if not (isinstance(cls, type) and issubclass(cls, SDE)):
        raise TypeError(f"register_sde expects an SDE subclass, got {cls!r}")
    known = _SDE_CLASSES.get(cls.__name__)
    redefined = known is not None and (known.__module__, known.__qualname__) == (cls.__module__, cls.__qualname__)
    if known is not None and known is not cls and not redefined:
        raise ValueError(f"an SDE class named {cls.__name__!r} is already registered ({known.__module__}.{known.__qualname__})")
    _SDE_CLASSES[cls.__name__] = cls
    return cls


def registered_sde_class(name: Any) -> type[SDE] | None:
    """The SDE class registered as ``name``, or ``None`` (also for a name that is not a string)."""
    return _SDE_CLASSES.get(name) if isinstance(name, str) else None


def registered_sdes() -> list[str]:
    """Names of the SDE classes :func:`sde_from_config` can rebuild, sorted."""
    return sorted(_SDE_CLASSES)


def sde_from_config(config: Mapping[str, Any]) -> SDE:
    """The SDE described by ``config = {"class": name, "params": {argument: value}}`` (:meth:`~sdediff.SDE.to_config`).

    Extra keys of ``config`` (a checkpoint stores a ``"repr"`` too) are ignored. Learned parameters are not part
    of the configuration: restore them with ``load_state_dict`` afterwards.

    Raises
    ------
    ValueError
        If ``config`` is not such a mapping, names a class that is not registered (the message lists the known
        ones), or its parameters do not fit the class's constructor or fail its checks.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"an SDE configuration must be a mapping {{'class': ..., 'params': {{...}}}}, got "
                         f"{type(config).__name__}")
    name, params = config.get("class"), config.get("params")
    if not isinstance(name, str):
        raise ValueError(f"an SDE configuration needs a 'class' name, got {name!r}")
    cls = _SDE_CLASSES.get(name)
    if cls is None:
        hint = " (importing sdediff.interop registers DiscreteVPSDE)" if name == "DiscreteVPSDE" else ""
        raise ValueError(f"unknown SDE class {name!r}{hint}; known: {', '.join(registered_sdes())}. Register a custom "
                         "SDE with sdediff.sdes.register_sde")
    if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
        raise ValueError(f"the configuration of {name} has no parameters ('params' must map argument names to values, "
                         f"got {params!r}): it was saved from an SDE that does not define to_config()")
    try:
        return cls(**params)
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot rebuild {name} from params {dict(params)}: {err}") from err


for _cls in (VPSDE, SubVPSDE, VESDE, LearnedScheduleSDE):
    register_sde(_cls)
