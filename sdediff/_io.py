"""Atomic file writes (a file is either the old version or the new one, never a torn mix), our own safetensors
writer (streamed, with no temporary file of its own) and strict JSON.

Every temporary file sdediff writes is named ``.{final name}.{pid}.{random}.tmp`` in the final file's folder
(:func:`temporary_name`), so that one left behind by a killed process can be recognised as ours and removed
(:func:`remove_stale_temporaries`) without touching anything else.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp$")


def _make_temporary(path: Path) -> Path:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp_name)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Create ``path`` atomically: the body fills the yielded temporary file (in the same folder, named as
    :func:`remove_stale_temporaries` recognises), which is then fsynced, renamed over ``path`` with
    :func:`os.replace`, and the folder fsynced.

    On any error (including KeyboardInterrupt) the temporary file is removed and ``path`` is untouched; a process
    killed outright leaves the temporary file, which the next :func:`remove_stale_temporaries` of the folder removes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_temporary(path)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Create ``path`` atomically with ``write(tmp)`` filling the temporary file (see :func:`atomic_file`).

    ``write`` must write ``tmp`` itself: a writer that makes its own temporary file next to it (as
    ``safetensors.torch.save_file`` does) would leave that file behind when the process is killed; use
    :func:`save_safetensors` for safetensors files.
    """
    with atomic_file(path) as tmp:
        write(tmp)
    return Path(path)


def temporary_name(path: str | os.PathLike) -> re.Match[str] | None:
    """The match of a file name that :func:`atomic_file` gives its temporary files (groups ``name``, the final
    file's name, and ``pid``, the writing process), or ``None`` for any other name."""
    return _TEMPORARY.match(Path(path).name)


def remove_stale_temporaries(folder: str | os.PathLike, final_name: str | re.Pattern[str] | None = None) -> list[Path]:
    """Remove the temporary files of :func:`atomic_file` in ``folder`` whose writing process is gone (killed in
    the middle of a write); returns the paths removed.

    Only names of the form ``.{final name}.{pid}.{random}.tmp`` are considered, with ``final_name`` (a regular
    expression, or ``None`` for any name) matching the final file's name; a file whose process still runs on this
    machine, or that belongs to this process, is kept. Nothing else in the folder is touched.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = re.compile(final_name) if isinstance(final_name, str) else final_name
    removed = []
    for path in folder.iterdir():
        m = temporary_name(path)
        if m is None or not path.is_file() or (pattern is not None and not pattern.fullmatch(m["name"])):
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _process_exists(pid):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # another user's process, or a platform without signal 0
        return True
    return True


def check_writable(path: str | os.PathLike) -> None:
    """Raise :class:`OSError` (with the reason) unless a file can be created in ``path``'s folder, which is created
    if missing: the probe is a temporary file of :func:`atomic_file`'s kind, removed at once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _make_temporary(path).unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a folder; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically (see :func:`atomic_file`)."""
    payload = data.encode() if isinstance(data, str) else data
    return atomic_write_file(path, lambda tmp: tmp.write_bytes(payload))


# --- safetensors ----------------------------------------------------------------------------------------
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def safetensors_header(specs: Mapping[str, tuple[torch.dtype, Sequence[int]]],
                       metadata: Mapping[str, str] | None = None) -> bytes:
    """The start of a safetensors file holding tensors ``{name: (dtype, shape)}`` stored in that order: the header's
    length as a little-endian 64-bit integer, then the JSON header (each tensor's dtype, shape and byte range,
    ``__metadata__``), padded with spaces to a multiple of 8 bytes. The tensors' bytes follow it."""
    header: dict[str, Any] = {}
    offset = 0
    for name, (dtype, shape) in specs.items():
        if dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"safetensors cannot hold a {dtype} tensor ({name!r})")
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": [int(n) for n in shape],
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_tensor_bytes(f: IO[bytes], x: Tensor) -> int:
    """Write the elements of ``x`` to the binary file ``f`` in C order, little-endian (as safetensors and ``.npy``
    store them), through a view of a CPU copy; returns the number of bytes."""
    if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
        raise OSError("writing tensor files needs a little-endian machine")
    cpu = x.detach().to("cpu").contiguous()
    if cpu.numel():
        f.write(cpu.reshape(-1).view(torch.uint8).numpy().data)
    return cpu.numel() * cpu.element_size()


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, Tensor],
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` (and string ``metadata``) to the safetensors file ``path`` atomically, streaming each
    tensor's bytes into our own temporary file (see :func:`atomic_file`); readable by ``safetensors.safe_open``."""
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(safetensors_header(specs, metadata))
        for v in tensors.values():
            write_tensor_bytes(f, v)
    return Path(path)


def json_safe(obj: Any) -> Any:
    """``obj`` made fit for strict JSON: non-finite floats become ``None`` (JSON has no NaN or infinity), tuples
    become lists, dictionary keys strings and paths strings; nested dictionaries and lists are converted throughout."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
