"""TOML configuration files for the ``sdediff`` command.

A file given with ``--config FILE`` sets the same options as the command's long flags: a key is the
flag's name without the leading dashes, with ``-`` or ``_`` (``batch-size = 512`` and
``batch_size = 512`` both set ``--batch-size``). Flags given on the command line override the file.

A file can hold the keys of one command at its top level, or one table per command::

    seed = 1                 # top-level keys apply to every command that reads this file

    [train]
    data = "moons"
    steps = 4000
    lr = 2e-3
    out = "runs/moons"

    [sample]
    run = "runs/moons"
    solver = "pc"
    solver-option = { snr = 0.16 }

For ``sdediff train --config run.toml`` the keys are the top-level ones plus those of ``[train]``
(which win); tables named after other commands are ignored. Unknown keys, wrong types and values
outside a flag's choices are errors that name the file and the key. Switches (``--amp``,
``--plot/--no-plot``) take ``true``/``false``; options taking several values take arrays; paths are
relative to the working directory, as on the command line.

TOML is read with :mod:`tomllib` (Python 3.11+) or, on Python 3.10, the ``tomli`` package when it is
installed. :func:`dump_toml` writes the flat files that ``sdediff train`` leaves in a run folder
(``config.toml``), which ``--config`` reads back.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "load_toml", "config_defaults", "dump_toml"]

_SKIP_DESTS = {"help", "version", "config", "func", "command"}


class ConfigError(ValueError):
    """A configuration file that cannot be read, or a key or value that does not fit the command."""


def _toml_module():
    try:
        import tomllib  # Python 3.11+

        return tomllib
    except ModuleNotFoundError:
        try:
            import tomli  # the same parser, packaged for Python 3.10

            return tomli
        except ModuleNotFoundError:
            return None


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML file into a dict.

    Parameters
    ----------
    path : str or PathLike
        The file.

    Returns
    -------
    dict
        The parsed document.

    Raises
    ------
    ConfigError
        If the file is missing or not valid TOML, or if no TOML parser is available (Python 3.10
        without ``tomli``).
    """
    toml = _toml_module()
    if toml is None:
        raise ConfigError(f"cannot read {path}: TOML config files need Python 3.11+ (tomllib) or the tomli package "
                          "on Python 3.10 (pip install tomli); or pass the options as flags")
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return toml.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from err
    except toml.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from err
    except UnicodeDecodeError as err:  # TOML is UTF-8 text
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8 "
                          "TOML") from None


def _option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's options by every accepted key spelling (``batch-size``, ``batch_size``)."""
    keys: dict[str, argparse.Action] = {}
    for action in parser._actions:  # argparse keeps no public list of a parser's actions
        if action.dest in _SKIP_DESTS or not action.option_strings:
            continue
        for opt in action.option_strings:
            if opt.startswith("--") and not opt.startswith("--no-"):
                name = opt[2:]
                keys[name] = action
                keys[name.replace("-", "_")] = action
    return keys


def _long_name(action: argparse.Action) -> str:
    return next(o[2:] for o in action.option_strings if o.startswith("--") and not o.startswith("--no-"))


def _is_switch(action: argparse.Action) -> bool:
    return isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction, argparse._StoreFalseAction))


def _is_multi(action: argparse.Action) -> bool:
    return isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+") or isinstance(action.nargs, int)


def _convert_scalar(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(value, bool) or isinstance(value, (dict, list)) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"{where} must be a {'string' if action.type is None else 'number or string'}, got "
                          f"{json.dumps(value, default=str)}")
    if action.type is None:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        converted: Any = value
    else:
        text = value if isinstance(value, str) else repr(value)
        try:
            converted = action.type(text)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
            raise ConfigError(f"{where}: {err}") from None
    if action.choices is not None and converted not in action.choices:
        raise ConfigError(f"{where} must be one of {', '.join(map(str, action.choices))}; got {converted!r}")
    return converted


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    if _is_switch(action):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} is a switch: use true or false, got {value!r}")
        if isinstance(action, argparse._StoreFalseAction):
            return not value
        return value
    if _is_multi(action):
        if isinstance(value, Mapping) and isinstance(action, argparse._AppendAction):
            # a table {key = value} for repeatable key=value options such as --solver-option
            value = [f"{k}={json.dumps(v) if isinstance(v, str) else _toml_scalar(v)}" for k, v in value.items()]
        if not isinstance(value, list):
            value = [value]
        items = [_convert_scalar(action, v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(action.nargs, int) and len(items) != action.nargs:
            raise ConfigError(f"{where} needs {action.nargs} values, got {len(items)}")
        if action.nargs == "+" and not items:
            raise ConfigError(f"{where} needs at least one value")
        return items
    return _convert_scalar(action, value, where)


def config_defaults(parser: argparse.ArgumentParser, document: Mapping[str, Any], command: str,
                    commands: Iterable[str] = (), source: str = "config") -> dict[str, Any]:
    """Turn a parsed TOML document into ``dest -> value`` defaults for one command's parser.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The command's parser; its long options define the accepted keys and their types.
    document : mapping
        The parsed file.
    command : str
        The command being run; a table of that name supplies (overriding) keys.
    commands : iterable of str
        Every command name: top-level tables with these names are per-command sections.
    source : str
        Name of the file, for error messages.

    Returns
    -------
    dict
        Values converted like the flags would be, ready for ``parser.set_defaults(**values)``.

    Raises
    ------
    ConfigError
        On an unknown key, a value of the wrong type, or one outside the flag's choices.
    """
    commands = set(commands) | {command}
    merged = {k: v for k, v in document.items() if k not in commands}
    section = document.get(command, {})
    if not isinstance(section, Mapping):
        raise ConfigError(f"{source}: [{command}] must be a table, got {section!r}")
    merged.update(section)
    actions = _option_actions(parser)
    values: dict[str, Any] = {}
    for key, value in merged.items():
        where = f"{source}: key {key!r}"
        if key == "config":
            raise ConfigError(f"{where}: a config file cannot name another config file")
        if key not in actions:
            known = sorted({_long_name(a) for a in actions.values()})
            raise ConfigError(f"{where} is not an option of 'sdediff {command}'; known keys: {', '.join(known)}")
        action = actions[key]
        if action.dest in values:
            raise ConfigError(f"{where} sets {action.option_strings[0]} a second time")
        values[action.dest] = _convert(action, value, where)
    return values


def _toml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    raise TypeError(f"cannot write {type(value).__name__} values to TOML")


def dump_toml(values: Mapping[str, Any], header: str = "") -> str:
    """Write a flat mapping of scalars and lists (``None`` values are left out) as TOML text.

    Parameters
    ----------
    values : mapping
        Keys and values (bool, int, float, str, or lists of those; dicts become inline tables).
    header : str
        Comment lines put first (each prefixed with ``#``).

    Returns
    -------
    str
        The TOML document.
    """
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            text = "{ " + ", ".join(f"{k} = {_toml_scalar(v)}" for k, v in value.items()) + " }"
        elif isinstance(value, (list, tuple)):
            text = "[" + ", ".join(_toml_scalar(v) for v in value) + "]"
        else:
            text = _toml_scalar(value)
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"
