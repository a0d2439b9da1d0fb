"""Checkpoints as safetensors files, written atomically and verified on load.

A checkpoint is one safetensors file: the tensors (model and EMA weights, optimizer moments, RNG
states as ``uint8`` tensors, the loss history) plus string metadata holding a JSON document (step,
config, optimizer hyper-parameters, model and SDE description) and a SHA-256 digest of every tensor.
Nothing is unpickled on load, so a checkpoint cannot run code.

Writes stream the file (sdediff's own safetensors writer, :func:`sdediff._io.save_safetensors`) into a
temporary file of ours in the target folder, which is flushed and fsynced, renamed over the final name
with :func:`os.replace` (atomic on POSIX and Windows), and the folder is fsynced so the rename itself
survives a crash. A process killed at any point leaves either the old state or the new one, never a torn
file under the final name; the temporary file it leaves (``.ckpt_*.safetensors.PID.*.tmp``) is removed
when training starts again in that folder (:func:`sdediff._io.remove_stale_temporaries`, which touches no
file of any other name).

Loading never executes file content and never allocates more than the file holds: a model is rebuilt only
after its configuration has been checked against the shapes of the weights in the file, on the meta device
(:func:`check_module_fits`), so metadata that claims a huge network is refused before any memory is taken.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._io import save_safetensors

FORMAT = "sdediff-checkpoint"
VERSION = 1
_NAME = re.compile(r"^ckpt_(\d{8,})\.safetensors$")


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, truncated, corrupt, or not an sdediff checkpoint."""


def checkpoint_name(step: int) -> str:
    """File name of the checkpoint at ``step``: ``ckpt_{step:08d}.safetensors``."""
    return f"ckpt_{step:08d}.safetensors"


def with_prefix(prefix: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` (e.g. a module's state dict) with every key written ``"{prefix}.{key}"``, as a checkpoint stores it."""
    return {f"{prefix}.{k}": v for k, v in state.items()}


def without_prefix(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The entries ``"{prefix}.{key}"`` of ``tensors`` as ``{key: tensor}`` (the inverse of :func:`with_prefix`)."""
    start = len(prefix) + 1
    return {k[start:]: v for k, v in tensors.items() if k.startswith(f"{prefix}.")}


def split_optimizer_state(state: dict[Any, dict[str, Any]]) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]]]:
    """An optimizer's per-parameter ``state_dict()["state"]`` as checkpoint tensors ``"optim.{index}.{key}"`` and
    the JSON-serialisable rest ``{"index": {key: value}}`` (e.g. a step count kept as a number)."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in state.items():
        for key, val in st.items():
            if isinstance(val, Tensor):
                tensors[f"optim.{idx}.{key}"] = val
            else:
                scalars.setdefault(str(idx), {})[key] = val
    return tensors, scalars


def join_optimizer_state(tensors: dict[str, Tensor], scalars: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The per-parameter optimizer state that :func:`split_optimizer_state` split (``tensors`` may hold other keys)."""
    state: dict[int, dict[str, Any]] = {}
    for key, val in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = val
    for idx, extra in scalars.items():
        state.setdefault(int(idx), {}).update(extra)
    return state


def _digest(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> Path:
    """Write ``tensors`` and the JSON-serialisable ``metadata`` to the safetensors file ``path`` atomically.

    Returns the path. Tensors are copied to the CPU (and de-aliased: safetensors refuses shared storage).
    """
    cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    header = {"format": FORMAT, "version": str(VERSION), "sha256": _digest(cpu), "sdediff": json.dumps(metadata)}
    return save_safetensors(path, cpu, header)



def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu",
                    verify: bool = True) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(tensors, metadata)``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CheckpointError
        If the file is not a readable safetensors file (truncated, corrupt), not an sdediff checkpoint,
        or (with ``verify``) its tensors do not match the stored SHA-256 digest. The message names the file.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for every kind of damage
        raise CheckpointError(f"cannot read checkpoint {path}: not a valid safetensors file (truncated or "
                              f"corrupt?): {err}") from err
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not an sdediff checkpoint (no '{FORMAT}' header)")
    if int(header.get("version", "0")) > VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {header['version']}; this sdediff reads up "
                              f"to {VERSION}: upgrade sdediff")
    if verify and _digest(tensors) != header.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is corrupt: its tensors do not match the stored SHA-256 digest")
    try:
        metadata = json.loads(header["sdediff"])
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} has unreadable metadata: {err}") from err
    if not isinstance(metadata, dict):
        raise CheckpointError(f"checkpoint {path} has damaged metadata: a JSON {type(metadata).__name__}, not an object")
    return {k: v.to(device) for k, v in tensors.items()}, metadata


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoints ``ckpt_*.safetensors`` in ``directory``, oldest step first (no validity check)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest checkpoint in ``directory`` that loads and verifies, or ``None``.

    Damaged newer files are skipped with a warning naming them (e.g. a file truncated by a full disk).
    """
    for path in reversed(list_checkpoints(directory)):
        try:
            load_checkpoint(path)
        except CheckpointError as err:
            warnings.warn(f"skipping damaged checkpoint: {err}", RuntimeWarning, stacklevel=2)
            continue
        return path
    return None


def load_state_dict_file(path: str | os.PathLike, device: torch.device | str = "cpu", ema: bool = True) -> dict[str, Tensor]:
    """Load plain weights from a ``.safetensors`` file, or a PyTorch file with ``torch.load(weights_only=True)``.

    From an sdediff trainer checkpoint it returns the EMA weights (``ema=True``, the default) or the raw
    model weights. Pickled code is never executed: a PyTorch file holding anything but tensors and plain
    containers is refused with :class:`CheckpointError`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(2)
    # a zip (torch.save) or a raw pickle; a .safetensors file can also start with 0x80 (its header length)
    if path.suffix != ".safetensors" and (head[:2] == b"PK" or head[:1] == b"\x80"):
        if _torch_version() < (2, 6):  # weights_only=True can be bypassed before torch 2.6 (CVE-2025-32434)
            raise CheckpointError(f"refusing to load the PyTorch file {path} with torch {torch.__version__}: "
                                  "torch.load(weights_only=True) is safe from torch 2.6 on; upgrade torch or convert the "
                                  "weights to .safetensors")
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except Exception as err:
            raise CheckpointError(f"refusing to load {path}: torch.load(weights_only=True) failed (the file holds "
                                  f"pickled objects other than tensors, or is damaged): {err}") from err
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise CheckpointError(f"{path} does not hold a flat state dict of tensors")
        return state
    try:
        tensors, _ = load_checkpoint(path, device)
    except CheckpointError as err:
        if "not an sdediff checkpoint" not in str(err):
            raise
        from safetensors.torch import load_file

        return load_file(str(path), device=str(device))
    return network_weights(tensors, ema, path)


def _torch_version() -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", torch.__version__).groups()
    return int(major), int(minor)


def network_weights(tensors: dict[str, Tensor], ema: bool, path: str | os.PathLike) -> dict[str, Tensor]:
    """The EMA (``ema.*``) or raw (``model.*``) network weights among a trainer checkpoint's tensors."""
    state = without_prefix("ema" if ema else "model", tensors)
    if not state:
        raise CheckpointError(f"checkpoint {path} has no {'EMA' if ema else 'model'} weights")
    return state


def load_weights(model: nn.Module, path: str | os.PathLike, ema: bool = True) -> nn.Module:
    """Load weights into ``model`` (strictly) from a trainer checkpoint (EMA by default), a plain
    safetensors file or a ``torch.save``-d state dict (see :func:`load_state_dict_file`)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.load_state_dict(load_state_dict_file(path, device, ema=ema))
    return model


def _integers(value: Any) -> list[int]:
    """The integers (not booleans) in a configuration value, nested lists and dictionaries included."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [i for v in value for i in _integers(v)] if isinstance(value, (list, tuple)) else []


def check_module_fits(build: Callable[..., nn.Module], config: dict[str, Any], state: dict[str, Tensor],
                      what: str) -> None:
    """Check, before anything is allocated, that the module ``build(**config)`` has exactly the entries and shapes of
    ``state`` (the weights a file holds), else raise :class:`CheckpointError` whose message starts with ``what``.

    Two steps, both bounded by the file itself. Every integer of ``config`` (a width, a depth, a channel count)
    must be at most the largest dimension of a tensor in ``state`` or the number of its tensors, whichever is
    larger: a network's sizes show in its weights. Then the module is built on the meta device, where its
    parameters take no memory, and its state-dict shapes are compared with those of ``state``. A configuration
    that claims a larger network than the weights it comes with (a damaged or crafted file) is refused before
    any memory is taken; ``build`` rejecting the configuration (``TypeError``, ``ValueError``) is reported too.
    """
    limit = max([len(state), *(n for v in state.values() for n in v.shape)])
    too_big = sorted({i for i in _integers(config) if i > limit})
    if too_big:
        raise CheckpointError(f"{what} configuration {config} holds sizes ({', '.join(map(str, too_big[:3]))}) larger "
                              f"than any in the weights the file holds (at most {limit}); the file is damaged or was "
                              "edited, so nothing was built")
    try:
        with torch.device("meta"):
            module = build(**config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{what} configuration {config} is invalid: {err}") from err
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected == found:
        return
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    parts = [f"{k} is {found[k]} in the file, {expected[k]} in the configuration" for k in wrong[:3]]
    parts += [f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
              for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    size = sum(math.prod(shape) for shape in expected.values())
    raise CheckpointError(f"{what} configuration ({size:,} numbers) does not fit the weights the file holds "
                          f"({sum(v.numel() for v in state.values()):,} numbers): {'; '.join(parts)}; the file is "
                          "damaged or was edited, so nothing was built")


def load_model(path: str | os.PathLike, ema: bool = True, device: torch.device | str = "cpu", *,
               contents: tuple[dict[str, Tensor], dict[str, Any]] | None = None) -> nn.Module:
    """Rebuild the :class:`~sdediff.training.MLP` or :class:`~sdediff.training.UNet` saved in a trainer
    checkpoint and load its EMA (default) or raw weights; returned in eval mode on ``device``.

    Parameters
    ----------
    path : path-like
        The checkpoint file.
    ema : bool
        Load the EMA weights (default) or the raw ones.
    device : torch.device or str
        Where the network goes.
    contents : (tensors, metadata), optional
        What :func:`load_checkpoint` returned for ``path``, when the caller has read it already (the file is
        then not read again).

    Raises
    ------
    CheckpointError
        If the file is damaged, holds a model class sdediff cannot rebuild (construct it yourself and call
        :func:`load_weights`), or its weights do not fit the stored model configuration.
    """
    from .models import MODELS

    tensors, meta = load_checkpoint(path) if contents is None else contents
    info = meta.get("model") or {}
    if not isinstance(info, dict):
        raise CheckpointError(f"checkpoint {path} is damaged: its model description is {info!r}, not a mapping")
    if info.get("class") not in MODELS or not isinstance(info.get("config"), dict):
        raise CheckpointError(f"checkpoint {path} holds a {info.get('class', 'custom')!r} model that sdediff cannot "
                              f"rebuild; construct it yourself and call load_weights(model, path)")
    state = network_weights(tensors, ema, path)
    cls = MODELS[info["class"]]
    check_module_fits(cls, info["config"], state, f"checkpoint {path}: its {info['class']}")
    try:
        model = cls(**info["config"]).to(device)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: its {info['class']} configuration {info['config']} is invalid: "
                              f"{err}") from err
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path}: the {'EMA' if ema else 'raw'} weights do not fit its "
                              f"{info['class']}: {err}") from err
    return model.eval()
