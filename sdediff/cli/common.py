"""What the commands share: argument errors, devices and threads, data sets by name, opening runs, writing results
and plots. No sampling, likelihood or training logic lives here: that is the library's."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._io import (
    atomic_file,
    atomic_write,
    atomic_write_file,
    check_writable,
    json_safe,
    safetensors_header,
    write_tensor_bytes,
)
from ..compare import distance_to_reference
from ..data.toy import TOY_CLASSES, TOY_DATASETS, make_toy
from ..distributed import DistributedEval, world_size
from ..elbo import nll_bound
from ..runs import Run, load_run
from ..sdes import VESDE, VPSDE, SubVPSDE

#: the ``--sde`` names
SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}
#: the built-in ``--data`` names with their own code paths: the 2-D toy sets and the 8x8 digits
DATASETS = (*TOY_DATASETS, "digits")
DIGITS_CLASSES = 10  # labels 0-9 of the digits; a class-conditional model adds a null token (classifier-free guidance)
HELD_OUT = 1_000_003  # seed offset of held-out toy data (the training set uses the seed itself)
NO_MPL = "matplotlib is not installed (pip install 'sdediff[plot]'): no plot written"


class CLIError(Exception):
    """Arguments that parse but do not fit together (reported like argparse errors, exit status 2)."""


# --- devices, threads, generators -----------------------------------------------------------------------
def pick_device(name: str | None) -> torch.device:
    """``--device``: ``auto`` (or none) is CUDA when available, else the CPU; a CUDA device must exist."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CLIError(f"--device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine")
    return device


def set_threads(threads: int | None, device: torch.device, small: bool) -> str:
    """Set torch's CPU threads: ``threads`` if given (> 0), else 1 for small 2-D work on the CPU; describe them."""
    if threads is None or threads == 0:
        threads = 1 if (small and device.type == "cpu") else None
    if threads:
        torch.set_num_threads(threads)
    return f"torch threads={torch.get_num_threads()}" + (" (fastest for small ops)" if threads == 1 else "")


def held_out_generator(seed: int) -> torch.Generator:
    """The generator of a run's held-out toy data (apart from its training set, which uses ``seed`` itself)."""
    return torch.Generator().manual_seed(seed + HELD_OUT)


# --- data sets by name ----------------------------------------------------------------------------------
def num_classes(data: str) -> int | None:
    """Number of classes of a data set name (digits and the labelled toy sets), else ``None``."""
    return DIGITS_CLASSES if data == "digits" else TOY_CLASSES.get(data)


def toy_train(name: str, n: int, seed: int, labels: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """The training set of a toy run: ``n`` points drawn with ``seed`` (and their classes: the same points)."""
    return make_toy(name, n, torch.Generator().manual_seed(seed), return_labels=labels)


def toy_metrics(samples: Tensor, data: str, generator: torch.Generator) -> dict[str, float]:
    """Sliced-W2 of 2-D samples to as many held-out points of the toy set ``data``, and the noise floor at that size."""
    return distance_to_reference(samples, lambda k, g: make_toy(data, k, g), generator)


def command_options(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed options of a command, as recorded in run.json, config.toml and metrics.json."""
    return {k: v for k, v in vars(args).items() if k not in ("func", "config", "command", "debug")}


def make_sde(args: argparse.Namespace):
    """The SDE of ``--sde`` with its ``--beta-*`` or ``--sigma-*`` options (values that do not fit together, such
    as ``--beta-min`` above ``--beta-max``, are argument errors)."""
    try:
        if args.sde == "ve":
            return VESDE(sigma_min=args.sigma_min, sigma_max=args.sigma_max)
        return SDES[args.sde](beta_min=args.beta_min, beta_max=args.beta_max)
    except ValueError as err:
        names = "--sigma-min/--sigma-max" if args.sde == "ve" else "--beta-min/--beta-max"
        raise CLIError(f"{names} of --sde {args.sde}: {err}") from None


def check_time_option(flag: str, value: float, sde) -> float:
    """A time option (``--eps``, ``--t-eps``) must lie strictly between 0 and the SDE's end time ``T``."""
    if not 0 < value < sde.T:
        raise CLIError(f"{flag} {value:g} must lie in (0, T={sde.T:g}) for {sde!r}")
    return value


# --- output files ---------------------------------------------------------------------------------------
def check_output(path: str | Path, overwrite: bool, flag: str = "--out") -> Path:
    """Check an output file before any computation: refuse one that exists (unless ``overwrite``), a folder, or a
    place where no file can be created (a read-only file system, a missing permission), as argument errors."""
    path = Path(path)
    if path.is_dir():
        raise CLIError(f"{flag} {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise CLIError(f"{flag} {path} exists already: pass --overwrite to replace it, or choose another {flag}")
    try:
        check_writable(path)
    except OSError as err:
        raise CLIError(f"{flag} {path}: cannot write there ({err.strerror or err}); choose another {flag}") from None
    return path


def check_output_folder(folder: str | Path, flag: str = "--out") -> Path:
    """Check, before any computation, that files can be created in the output folder ``folder`` (made if missing)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CLIError(f"{flag} {folder} is a file, not a folder")
    try:
        check_writable(folder / "probe")
    except OSError as err:
        raise CLIError(f"{flag} {folder}: cannot write there ({err.strerror or err}); choose another {flag}") from None
    return folder


# --- runs -----------------------------------------------------------------------------------------------
def open_run(run: str | None, checkpoint: str | None, device: torch.device, ema: bool = True) -> Run:
    """:func:`sdediff.load_run` of ``--run`` / ``--checkpoint``, with argument errors as :class:`CLIError`."""
    if run is None and checkpoint is None:
        raise CLIError("give --run DIR (a folder written by 'sdediff train') or --checkpoint FILE")
    if run is not None and not Path(run).is_dir():
        raise CLIError(f"--run {run}: no such folder")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise CLIError(f"--checkpoint {checkpoint}: no such file")
    try:
        return load_run(run if run is not None else checkpoint, device, ema=ema, checkpoint=checkpoint)
    except ValueError as err:  # a run the command line cannot use as it is (damaged files raise CheckpointError)
        raise CLIError(str(err)) from None


@torch.no_grad()
def nll_bound_in_chunks(sde, score, x: Tensor, t_eps: float, num_t: int, generator: torch.Generator,
                        max_evals: int = 8192) -> Tensor:
    """:func:`sdediff.elbo.nll_bound` per point, in chunks of at most ``max_evals`` network inputs (bounded memory)."""
    chunk = max(1, max_evals // num_t)
    return torch.cat([nll_bound(sde, score, x[i:i + chunk], t_eps=t_eps, num_t=num_t, generator=generator)
                      for i in range(0, len(x), chunk)])


def sharded_map(device: torch.device, fn: Callable[[int], Any], num_chunks: int, progress: bool) -> list[Any] | None:
    """``[fn(0), ..., fn(num_chunks - 1)]`` computed by the ranks of a torchrun job (or this process alone), on
    rank 0; ``None`` on the other ranks. The process group exists only during the call."""
    with DistributedEval(device) as group:
        return group.map(fn, num_chunks, progress=progress)


def chunk_results(device: torch.device, fn: Callable[[int], Any], num_chunks: int, progress: bool) -> Iterable[Any] | None:
    """``fn(0), ..., fn(num_chunks - 1)`` in order: computed one at a time as they are consumed in a single process
    (so each result can be written and dropped before the next, with a progress bar over the chunks), or by the
    ranks of a torchrun job through :func:`sharded_map` (``None`` on the ranks other than 0)."""
    if world_size() > 1:
        return sharded_map(device, fn, num_chunks, progress)
    ks = tqdm(range(num_chunks), desc="chunks", leave=False, disable=not (progress and num_chunks > 1))
    return (fn(k) for k in ks)


def describe_sharding(chunks: list[slice]) -> str:
    return f"{len(chunks)} chunk(s) of at most {chunks[0].stop - chunks[0].start} over {world_size()} process(es)"


# --- output ---------------------------------------------------------------------------------------------
def fmt(x: float | None, digits: int = 4) -> str:
    """A number to ``digits`` significant digits, ``n/a`` when missing or not finite."""
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def write_json(path: Path, doc: dict[str, Any]) -> Path:
    """Write ``doc`` as strict JSON (non-finite numbers as ``null``), atomically."""
    return atomic_write(path, json.dumps(json_safe(doc), indent=2, allow_nan=False, default=str) + "\n")


@contextmanager
def sample_file(path: Path, n: int) -> Iterator[Callable[[Tensor], None]]:
    """Write ``n`` samples to ``path`` chunk by chunk: the context yields ``put(chunk)``, called with consecutive
    chunks of rows. ``.safetensors`` (key ``"samples"``) and ``.npy`` are streamed into a temporary file as the
    chunks come (the header, which needs the dtype and shape, with the first one), so the samples never have to be
    in memory at once; ``.pt`` (a pickle) collects them in one tensor and writes it at the end. The file appears
    under its name, atomically, only once all ``n`` rows are written."""
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".pt", ".npy"):
        raise CLIError(f"unknown sample file type {path.suffix!r}; use .safetensors, .pt or .npy")
    count = 0

    def shape_of(chunk: Tensor) -> tuple[int, ...]:
        return (n, *chunk.shape[1:])

    if suffix == ".pt":
        whole: list[Tensor] = []

        def keep(chunk: Tensor) -> None:
            nonlocal count
            if not whole:
                whole.append(torch.empty(shape_of(chunk), dtype=chunk.dtype))
            whole[0][count:count + len(chunk)].copy_(chunk)
            count += len(chunk)

        yield keep
        if count != n:
            raise RuntimeError(f"{path}: {count} of {n} samples were written")
        atomic_write_file(path, lambda tmp: torch.save(whole[0], tmp))
        return
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        def put(chunk: Tensor) -> None:
            nonlocal count
            chunk = chunk.detach().cpu()
            if count == 0:
                if suffix == ".safetensors":
                    f.write(safetensors_header({"samples": (chunk.dtype, shape_of(chunk))}))
                else:
                    import numpy as np

                    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(
                        chunk[:0].numpy().dtype), "fortran_order": False, "shape": shape_of(chunk)})
            write_tensor_bytes(f, chunk)
            count += len(chunk)

        yield put
        if count != n:
            raise RuntimeError(f"{path}: {count} of {n} samples were written")


def print_written(paths: Sequence[Path | None]) -> None:
    print("wrote " + ", ".join(str(p) for p in paths if p is not None))


# --- plots ----------------------------------------------------------------------------------------------
def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save_figure(plt, fig, path: Path) -> Path:
    try:
        return atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def scatter_png(path: Path, panels: dict[str, Tensor], reference: str | None = None, limit: int = 2000,
                title: str | None = None, classes: dict[str, Tensor] | None = None) -> Path | None:
    """Side-by-side scatter plots of 2-D point sets (the ``reference`` panel in black, or every panel coloured by
    class where ``classes`` gives its points' labels); ``None`` without matplotlib. Axis limits follow the
    reference, so a few stray samples do not squash the picture."""
    plt = _pyplot()
    if plt is None:
        return None
    ref = panels[reference] if reference is not None else next(iter(panels.values()))
    ref = ref.detach().double().cpu()
    lo, hi = torch.quantile(ref, 0.002, dim=0), torch.quantile(ref, 0.998, dim=0)
    centre, half = (lo + hi) / 2, float((hi - lo).max()) / 2 * 1.25
    fig, axes = plt.subplots(1, len(panels), figsize=(3.1 * len(panels), 3.4), squeeze=False)
    for ax, (name, pts) in zip(axes[0], panels.items(), strict=True):
        pts = pts[:limit].detach().cpu()
        if classes is not None and name in classes:
            ax.scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.5, c=classes[name][:limit].cpu().numpy() % 10,
                       cmap="tab10", vmin=0, vmax=9, rasterized=True)
        else:
            ax.scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.5, color="black" if name == reference else "C0",
                       rasterized=True)
        ax.set_title(name, fontsize=9)
        ax.set_xlim(float(centre[0]) - half, float(centre[0]) + half)
        ax.set_ylim(float(centre[1]) - half, float(centre[1]) + half)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save_figure(plt, fig, path)


def digits_png(path: Path, x: Tensor, columns: int = 8, title: str | None = None) -> Path | None:
    """A grid of 8x8 digit images (model space ``[-1, 1]``, shown as their 17 grey levels); ``None`` without
    matplotlib."""
    from ..data.digits import model_to_digits

    plt = _pyplot()
    if plt is None:
        return None
    levels = model_to_digits(x.detach().cpu().reshape(-1, 1, 8, 8)).float() / 16
    n = levels.shape[0]
    rows = max(1, math.ceil(n / columns))
    canvas = torch.ones(rows * 9 + 1, columns * 9 + 1)  # 1-pixel white gaps
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[1 + 9 * r:9 + 9 * r, 1 + 9 * c:9 + 9 * c] = 1 - levels[i, 0]
    fig, ax = plt.subplots(figsize=(columns * 0.6, rows * 0.6 + (0.3 if title else 0)))
    ax.imshow(canvas.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save_figure(plt, fig, path)


def plot_samples(path: Path, samples: Tensor, data: str | None, reference: Tensor | None, title: str,
                 classes: tuple[Tensor, Tensor] | None = None) -> Path | None:
    """Digits as a grid, 2-D points next to held-out data; ``classes`` = (labels of ``samples``, of ``reference``)
    colours both by class. ``None`` for other shapes or without matplotlib."""
    if samples.dim() == 4 or data == "digits":
        return digits_png(path, samples[:64], title=title)
    if samples.dim() == 2 and samples.shape[1] == 2:
        panels = {"held-out data": reference, "samples": samples} if reference is not None else {"samples": samples}
        colours = None if classes is None else {"samples": classes[0], "held-out data": classes[1]}
        return scatter_png(path, panels, reference="held-out data" if reference is not None else None, title=title,
                           classes=colours)
    return None


def add_plot(written: list[Path | None], png: Path | None) -> None:
    """Append a written plot to ``written``, or say that none could be drawn."""
    if png is None:
        print(NO_MPL)
    else:
        written.append(png)
