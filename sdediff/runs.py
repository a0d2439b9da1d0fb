"""Trained runs: a folder of trainer checkpoints (and the ``run.json`` that ``sdediff train`` writes), loaded back as
an SDE, a network and its score function by :func:`load_run`.

A run folder holds ``ckpt_*.safetensors`` files written by :class:`~sdediff.training.Trainer` (see
:mod:`sdediff.training.checkpoint`) and, when the command line trained it, ``run.json``: the data set, the sample
shape, the seed, the size of the training set, the SDE and model configurations, the command's options and the
training data's :class:`~sdediff.data.record.DatasetRecord` (:func:`run_record`). A checkpoint alone is enough
for a run trained in Python on vectors with an :class:`~sdediff.training.MLP` (the shape is the MLP's dimension).
Nothing in these files is executed: the SDE is rebuilt by :func:`sdediff.sdes.sde_from_config` from its registered
class and the network by :func:`sdediff.training.load_model`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._io import json_safe
from ._validate import check_choice, check_float, check_int, is_int
from .data.record import DatasetRecord, legacy_dataset
from .score import PREDICTIONS, ScoreModel
from .sdes import SDE, sde_from_config
from .sdes.registry import registered_sde_class
from .training.checkpoint import CheckpointError, check_module_fits, latest_checkpoint, load_checkpoint, load_model

__all__ = ["Run", "load_run", "run_record", "read_run_record", "resume_conflicts", "resumed_record", "resolve_time_input",
           "RUN_FORMAT", "RUN_IDENTITY"]

#: the ``format`` field of a ``run.json``
RUN_FORMAT = "sdediff-run"
RUN_VERSION = 1
#: the ``run.json`` fields that fix what a run is: resuming it with other values would mix two runs
RUN_IDENTITY = ("data", "shape", "seed", "n_train", "sde", "model", "dataset")


@dataclass
class Run:
    """A trained run as :func:`load_run` returns it.

    Attributes
    ----------
    sde : SDE
        The forward SDE (a learned schedule with its trained, or EMA, state).
    score : ScoreModel
        The score function: the network with its prediction and time input (``score(x, t)``).
    net : nn.Module
        The network, in eval mode with gradients off.
    shape : tuple of int
        The shape of one sample, e.g. ``(2,)`` or ``(1, 8, 8)``.
    data : str or None
        The name of the data set it was trained on (from ``run.json``; ``None`` without one).
    step : int or None
        The training step of the checkpoint.
    seed : int
        The run's seed (``run.json``, else the training configuration's).
    t_eps : float
        The smallest training time (the natural start of its likelihood ODE).
    directory : Path
        The run folder.
    checkpoint : Path
        The checkpoint file loaded.
    record : dict or None
        The contents of ``run.json`` (``None`` without one).
    metadata : dict
        The checkpoint's metadata (training configuration, model and SDE description, loss log, ...).
    dataset : DatasetRecord or None
        The training data: source, kind, sample shape, value transform, split and class names (``run.json``'s
        ``"dataset"``; for older toy and digits records, rebuilt from the data set's name; ``None`` otherwise).
    """

    sde: SDE
    score: ScoreModel
    net: nn.Module
    shape: tuple[int, ...]
    data: str | None
    step: int | None
    seed: int
    t_eps: float
    directory: Path
    checkpoint: Path
    record: dict[str, Any] | None
    metadata: dict[str, Any]
    dataset: DatasetRecord | None = None

    def describe(self) -> str:
        """One line: checkpoint, step, network class, SDE and data set."""
        return f"{self.checkpoint} (step {self.step}, {type(self.net).__name__}, {self.sde!r}, data {self.data})"


def load_run(path: str | os.PathLike, device: torch.device | str | None = None, ema: bool = True, *,
             checkpoint: str | os.PathLike | None = None) -> Run:
    """Load a trained run: its SDE, network and score function, and what the run folder records about it.

    Parameters
    ----------
    path : path-like
        A run folder (its newest valid checkpoint is used; a folder whose ``checkpoints/`` subfolder holds the
        run, as ``sdediff demo`` writes it, works too) or a checkpoint file (its folder is the run folder).
    device : torch.device or str, optional
        Where the network and a learned schedule go (default: the CPU).
    ema : bool
        Use the EMA weights (default), with the EMA state of a learned schedule where the checkpoint has one, or
        the raw weights with the trained schedule.
    checkpoint : path-like, optional
        A checkpoint file to use instead of the folder's newest.

    Returns
    -------
    Run

    Raises
    ------
    FileNotFoundError
        If ``path`` (or ``checkpoint``) does not exist.
    ValueError
        If the folder has no valid checkpoint, the checkpoint's SDE cannot be rebuilt (a class that is not
        registered, see :func:`sdediff.sdes.register_sde`), its network was fed a custom time input, or the sample
        shape is unknown (no ``run.json`` and not an MLP).
    CheckpointError
        If the checkpoint or ``run.json`` is damaged: unreadable, a network sdediff cannot rebuild, a model or SDE
        configuration its class rejects or that claims more than the weights in the file (checked before anything
        is allocated), metadata of the wrong kind (a prediction, step, seed or ``t_eps`` that is not valid), weights
        or a schedule state that do not fit, or a checkpoint whose model or SDE is not the one ``run.json``
        describes (a folder that mixes two runs), or a ``run.json`` shape that is not a list of positive integers
        or does not fit the network.
    """
    import sdediff.interop.diffusers  # noqa: F401  (registers DiscreteVPSDE, so a run trained on one loads back)

    device = torch.device("cpu" if device is None else device)
    path = Path(path)
    if path.is_dir():
        directory = _find_run_dir(path)
    elif path.is_file():
        directory = path.parent
        checkpoint = path if checkpoint is None else checkpoint
    else:
        raise FileNotFoundError(f"{path}: no such run folder or checkpoint file")
    if checkpoint is None:
        found = latest_checkpoint(directory)
        if found is None:
            raise ValueError(f"no valid checkpoint (ckpt_*.safetensors) in {directory}; train one there (sdediff train --out "
                             f"{directory}) or give a checkpoint file")
        ckpt = found
    else:
        ckpt = Path(checkpoint)
    tensors, meta = load_checkpoint(ckpt)
    config = meta.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {ckpt} has no training configuration (not written by sdediff's Trainer)")
    record = read_run_record(directory)
    shape = None if record is None else _record_shape(record, directory)
    if record is not None and not isinstance(record.get("data"), (str, type(None))):
        raise CheckpointError(f"{directory / 'run.json'} is damaged: its data set is {record.get('data')!r}, not a name")
    if shape is not None:
        _check_record_matches(record, shape, meta, ckpt, directory)
    try:
        t_eps = check_float("t_eps", config.get("t_eps", 1e-5), 0, low_open=True)
        seed = check_int("seed", (record or {}).get("seed", config.get("seed", 0)), None)
        prediction = check_choice("prediction", meta.get("prediction", config.get("prediction", "eps")), PREDICTIONS)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {ckpt} is damaged: its metadata's {err}") from None
    step, time_input = meta.get("step"), meta.get("time_input")
    if step is not None and not is_int(step):
        raise CheckpointError(f"checkpoint {ckpt} is damaged: its metadata's step is {step!r}, not an integer")
    if time_input is not None and not isinstance(time_input, str):
        raise CheckpointError(f"checkpoint {ckpt} is damaged: its metadata's time_input is {time_input!r}, not a name")
    sde = _restore_sde(ckpt, meta.get("sde") or {}, tensors, device, ema)
    if not t_eps < sde.T:
        raise CheckpointError(f"checkpoint {ckpt} is damaged: its smallest training time t_eps={t_eps:g} is not below "
                              f"the SDE's end time T={sde.T:g}")
    net = load_model(ckpt, ema=ema, device=device, contents=(tensors, meta)).requires_grad_(False)
    if shape is None and type(net).__name__ == "MLP":
        shape = (int(net.config["dim"]),)
    elif shape is None:
        raise ValueError(f"{directory} has no run.json, so the sample shape of this {type(net).__name__} is unknown; "
                         "use a folder written by 'sdediff train'")
    score = ScoreModel(net, sde, prediction, resolve_time_input(time_input, sde, ckpt))
    data = (record or {}).get("data")
    return Run(sde=sde, score=score, net=net, shape=shape, data=data, step=step, seed=seed, t_eps=t_eps,
               directory=directory, checkpoint=ckpt, record=record, metadata=meta,
               dataset=_record_dataset(record, shape, seed, directory))


def _record_dataset(record: dict[str, Any] | None, shape: tuple[int, ...], seed: int,
                    directory: Path) -> DatasetRecord | None:
    """The ``"dataset"`` of a ``run.json`` (which must describe samples of the run's ``shape``), or the record of
    an older toy or digits run rebuilt from its name."""
    if record is None:
        return None
    if record.get("dataset") is None:
        n_train = record.get("n_train")
        return legacy_dataset(record.get("data"), shape, seed, n_train if is_int(n_train) else None)
    try:
        dataset = DatasetRecord.from_dict(record["dataset"])
    except ValueError as err:
        raise CheckpointError(f"{directory / 'run.json'} is damaged: {err}") from None
    if dataset.shape != shape:
        raise CheckpointError(f"{directory / 'run.json'} is damaged: its dataset has samples of shape "
                              f"{list(dataset.shape)}, but the run's shape is {list(shape)}")
    return dataset


def _record_shape(record: dict[str, Any], directory: Path) -> tuple[int, ...]:
    """The sample shape of a ``run.json``: a non-empty list of positive integers, one sample (a 2-D point ``[2]``,
    an image ``[C, H, W]``)."""
    shape = record.get("shape")
    if not isinstance(shape, list) or not shape or not all(is_int(n) and n > 0 for n in shape):
        raise CheckpointError(f"{directory / 'run.json'} is damaged: its shape must be a list of positive integers "
                              f"(the shape of one sample, e.g. [2] or [1, 8, 8]), got {shape!r}")
    return tuple(shape)


def _check_record_matches(record: dict[str, Any], shape: tuple[int, ...], meta: dict[str, Any], ckpt: Path,
                          directory: Path) -> None:
    """Refuse a checkpoint whose model or SDE is not the one ``run.json`` describes (a folder that mixes runs), or
    whose network does not take samples of the recorded ``shape``."""
    for key, label, fields in (("model", "the model", ("class", "config")), ("sde", "the SDE", ("class", "params"))):
        described, held = record.get(key), meta.get(key)
        if not isinstance(described, dict) or not isinstance(held, dict):
            continue  # a run.json or checkpoint without that description: nothing to compare
        if any(json_safe(described.get(f)) != json_safe(held.get(f)) for f in fields):
            shown = [f"{d.get('class')}({d.get(fields[1])})" for d in (held, described)]
            raise CheckpointError(f"{ckpt} holds {label} {shown[0]}, but {directory / 'run.json'} describes "
                                  f"{shown[1]}: the folder mixes two runs; pass --checkpoint with one of the "
                                  "run's own checkpoints, or move the other one out")
    model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    config = model.get("config") if isinstance(model.get("config"), dict) else {}
    if model.get("class") == "MLP" and is_int(config.get("dim")) and math.prod(shape) != config["dim"]:
        raise CheckpointError(f"{directory / 'run.json'} is damaged: its sample shape {list(shape)} has "
                              f"{math.prod(shape)} elements, but the checkpoint's MLP takes {config['dim']}")
    if model.get("class") == "UNet" and (len(shape) != 3 or shape[0] != config.get("in_channels")):
        raise CheckpointError(f"{directory / 'run.json'} is damaged: its sample shape {list(shape)} is not an image "
                              f"with the {config.get('in_channels')} channel(s) of the checkpoint's UNet")


def _find_run_dir(path: Path) -> Path:
    """``path`` itself, or its ``checkpoints/`` subfolder when that holds the run (as ``sdediff demo`` writes it)."""
    if not (path / "run.json").is_file() and (path / "checkpoints" / "run.json").is_file():
        return path / "checkpoints"
    return path


def _restore_sde(path: Path, desc: dict[str, Any], tensors: dict[str, Tensor], device: torch.device, ema: bool) -> SDE:
    """The checkpoint's SDE from its configuration; a learned schedule (an ``nn.Module``) gets its trained state
    (``sde.*`` tensors) or, with ``ema``, its EMA state (``ema_sde.*``, which the EMA weights go with) where present."""
    if not isinstance(desc, dict):
        raise CheckpointError(f"checkpoint {path} is damaged: its SDE description is {desc!r}, not a mapping")
    prefix = "ema_sde." if ema and any(k.startswith("ema_sde.") for k in tensors) else "sde."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    cls = registered_sde_class(desc.get("class"))
    if state and isinstance(cls, type) and issubclass(cls, nn.Module) and isinstance(desc.get("params"), dict):
        check_module_fits(lambda **params: sde_from_config({"class": desc["class"], "params": params}), desc["params"],
                          state, f"checkpoint {path}: its {desc['class']} schedule")
    try:
        sde = sde_from_config(desc)
    except ValueError as err:  # a class that is not registered is the user's to register; bad parameters are damage
        kind = ValueError if cls is None and isinstance(desc.get("class"), str) else CheckpointError
        raise kind(f"checkpoint {path}: its SDE {desc.get('repr', desc.get('class'))!r} cannot be rebuilt: "
                   f"{err}") from err
    if isinstance(sde, nn.Module):
        try:
            sde.load_state_dict(state)
        except RuntimeError as err:
            raise CheckpointError(f"checkpoint {path}: its {type(sde).__name__} schedule cannot be restored "
                                  f"({'no sde.* tensors' if not state else err})") from err
        sde = sde.to(device).eval().requires_grad_(False)
    return sde


def resolve_time_input(description: str | None, sde: SDE,
                       source: str | os.PathLike = "the checkpoint") -> Callable[[Tensor], Tensor] | None:
    """The network's time input recorded by the trainer: ``None`` (the network sees ``t``) or ``"sde.NAME"``, a
    method of the SDE (e.g. a learned schedule's ``noise_level``).

    Raises
    ------
    ValueError
        For ``"custom"`` (any other callable, which a checkpoint cannot hold) or a method the SDE does not have.
    """
    if description is None:
        return None
    name = description[len("sde."):] if description.startswith("sde.") else None
    if name is None or not callable(getattr(sde, name, None)):
        raise ValueError(f"{source} was trained with a custom time_input ({description!r}) that cannot be rebuilt "
                         "from the file; wrap the network yourself: ScoreModel(net, sde, prediction, time_input)")
    return getattr(sde, name)


# --- run.json --------------------------------------------------------------------------------------------
def run_record(command: str, data: str, shape: Sequence[int], seed: int, n_train: int | None, sde: SDE,
               net: nn.Module, options: dict[str, Any], dataset: DatasetRecord | None = None,
               model_choice: str | None = None) -> dict[str, Any]:
    """The ``run.json`` document of a run trained by ``command``: format, data set, sample shape, seed, training set
    size (``None`` for a fixed data set), the SDE's :meth:`~sdediff.SDE.to_config`, the model's class and
    configuration (with ``model_choice``, how it was picked), the sdediff version, the command's ``options`` and
    the ``dataset`` record (:meth:`DatasetRecord.to_dict`)."""
    from . import __version__

    model = {"class": type(net).__name__, "config": getattr(net, "config", None)}
    if model_choice is not None:
        model["choice"] = model_choice
    return {"format": RUN_FORMAT, "version": RUN_VERSION, "command": command, "data": data, "shape": list(shape),
            "seed": seed, "n_train": n_train, "sde": sde.to_config(), "model": model, "sdediff": __version__,
            "args": json_safe(options), "dataset": None if dataset is None else dataset.to_dict()}


def read_run_record(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The ``run.json`` of a run folder, or ``None`` where there is none (or it is not an sdediff run record).

    Raises
    ------
    CheckpointError
        If ``run.json`` exists but is not valid UTF-8 JSON, or not a JSON object.
    """
    path = Path(directory) / "run.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is damaged (not valid JSON): {err}") from err
    if not isinstance(record, dict):
        raise CheckpointError(f"{path} is damaged: it holds a JSON {type(record).__name__}, not a run record")
    return record if record.get("format") == RUN_FORMAT else None


def resumed_record(old: dict[str, Any], new: dict[str, Any], checkpoint: str | None) -> dict[str, Any]:
    """The ``run.json`` of a run resumed from ``checkpoint`` with the options of ``new``: ``old`` unchanged (what the
    run was started with), plus an entry in its ``"resumes"`` list with the checkpoint's name, the sdediff version and
    the options that differ from the original ones (``{option: [original, new]}``), so the history is kept."""
    before = old.get("args") if isinstance(old.get("args"), dict) else {}
    after, history = new.get("args") or {}, old.get("resumes") if isinstance(old.get("resumes"), list) else []
    changed = {k: [before.get(k), v] for k, v in after.items() if k != "resume" and json_safe(before.get(k)) != json_safe(v)}
    entry = {"checkpoint": checkpoint, "sdediff": new.get("sdediff"), "changed_args": changed}
    return {**old, "resumes": [*history, entry]}


def resume_conflicts(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The :data:`RUN_IDENTITY` fields in which two run records differ (resuming across them would mix two runs);
    a field that the older record does not have (a ``"dataset"`` written by a later sdediff) is not compared."""
    return [k for k in RUN_IDENTITY if k in old and json_safe(old.get(k)) != json_safe(new.get(k))]
