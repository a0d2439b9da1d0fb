"""The sdediff command line.

Commands (sdediff COMMAND --help lists every option with its default):

  demo        Train a small MLP score model on a 2-D toy set (by default the 8-mode ring, whose
              density is known exactly), sample it with an SDE solver, a predictor-corrector
              sampler and an adaptive probability-flow ODE, compare each with held-out data in
              sliced-W2 next to the sampling-noise floor (target: at most twice the floor), compute
              the held-out NLL (exact ODE likelihood, ELBO bound, true value), and write
              samples.png, table.md, metrics.json and the checkpoints to ./sdediff-demo/.
  train       Train a score network (an MLP for the 2-D sets, a UNet for the 8x8 digits) into a run
              folder: checkpoints, metrics.json, run.json, config.toml (the options, reusable with
              --config) and samples.png from a final evaluation.
  sample      Draw samples from a run's checkpoint with any registered solver; write .safetensors,
              .pt or .npy plus a PNG.
  likelihood  Negative log-likelihood of a data split through the probability-flow ODE (nats;
              bits/dim for digits), the ELBO bound, and the true value where it is known.
  bench       Run the benchmark scripts of a source checkout (benchmarks/), or with --quick (or
              without a checkout) a built-in solver comparison on an analytic Gaussian mixture.

Every command reads --config FILE.toml, whose keys are its long flags (see sdediff.config); flags
given on the command line override the file. Bad arguments exit with status 2, runtime failures
(a missing or damaged checkpoint) with status 1.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import __version__
from ._io import atomic_write, atomic_write_file
from .config import ConfigError, config_defaults, dump_toml, load_toml
from .data import GaussianMixture
from .data.toy import TOY_CLASSES, TOY_DATASETS, make_toy, toy_mixture
from .distributed import DistributedError, DistributedEval, chunk_generator, chunk_slices, local_device, process_rank
from .distributed import world_size as _world_size
from .elbo import nll_bound
from .guidance import ClassifierFreeNet
from .likelihood import log_likelihood
from .metrics import mean_se, noise_floor, sliced_wasserstein
from .sampling import SampleResult, sample
from .score import PREDICTIONS, ScoreModel
from .sdes import VESDE, VPSDE, LearnedScheduleSDE, SubVPSDE
from .solvers import available_solvers, calibrate_grid, get_solver

__all__ = ["main", "build_parser", "atomic_write"]  # atomic_write: kept importable here for the benchmark scripts

SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}
_SDE_CLASSES = {"VPSDE": VPSDE, "SubVPSDE": SubVPSDE, "VESDE": VESDE, "LearnedScheduleSDE": LearnedScheduleSDE}
DATASETS = (*TOY_DATASETS, "digits")
DIGITS_CLASSES = 10  # labels 0-9 of the digits; a class-conditional model adds a null token (classifier-free guidance)


def _num_classes(data: str) -> int | None:
    """Number of classes of a data set name (digits and the labelled toy sets), else ``None``."""
    return DIGITS_CLASSES if data == "digits" else TOY_CLASSES.get(data)
TARGET_RATIO = 2.0  # the demo's criterion: mean sliced-W2 <= TARGET_RATIO x the noise floor
DEMO_SOLVERS: list[tuple[str, str, int, dict[str, Any]]] = [  # (label, solver, steps, options)
    ("SDE", "euler_maruyama", 300, {}),
    ("PC", "pc", 150, {"snr": 0.16, "corrector_steps": 1}),
    ("ODE", "adaptive_ode", 1, {"rtol": 1e-4, "atol": 1e-4}),
]
BENCH_SOLVERS: list[tuple[str, int, dict[str, Any]]] = [
    ("euler_maruyama", 500, {}),
    ("pc", 500, {"snr": 0.16}),
    ("heun", 50, {}),
    ("ode", 1, {"rtol": 1e-5, "atol": 1e-5}),
]
# Defaults of `sdediff train` that depend on the data: 2-D toy sets (MLP) or 8x8 digits (UNet).
TRAIN_PRESETS: dict[str, dict[str, Any]] = {  # the digits values are those of benchmarks/digits_nll.py
    "2d": {"steps": 4000, "batch_size": 512, "lr": 2e-3, "warmup_steps": 100, "ema_decay": 0.995,
           "weighting": "simple", "t_sampling": "uniform", "eval_samples": 2000, "eval_nll_points": 256},
    "image": {"steps": 2500, "batch_size": 128, "lr": 1e-3, "warmup_steps": 200, "ema_decay": 0.999,
              "weighting": "likelihood", "t_sampling": "importance", "eval_samples": 64, "eval_nll_points": 64},
}
_HELD_OUT = 1_000_003  # seed offset of held-out toy data (the training set uses the seed itself)
_SAMPLING = 2_000_006  # seed offset of the demo's sampling generator
_RUN_FORMAT = "sdediff-run"
_CHUNKS = ("each chunk draws its random numbers from a generator seeded by (--seed, chunk index), and under torchrun "
           "the chunks are shared out round-robin among the processes, so results do not depend on their number")


class CLIError(Exception):
    """Arguments that parse but do not fit together (reported like argparse errors, exit status 2)."""


# --- argument types -------------------------------------------------------------------------------------
def _checked(cast: Callable[[str], Any], ok: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    """An argparse type: ``cast(text)``, rejected with "must be {what}" unless ``ok(value)``."""

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_nonneg_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _checked(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
_nonneg_float = _checked(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")
_finite_float = _checked(float, math.isfinite, "a finite number")


def _unit_float(text: str) -> float:
    value = _nonneg_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


def _solver_name(text: str) -> str:
    known = available_solvers()
    if text in known or (text.startswith("torchsde:") and len(text) > len("torchsde:")):
        return text
    raise argparse.ArgumentTypeError(f"unknown solver {text!r}; known: {', '.join(known)}")


def _key_value(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as a bool, int, float or JSON string, else kept as text."""
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected key=value (e.g. snr=0.16), got {text!r}")
    raw = raw.strip()
    value: Any = raw
    if raw.lower() in ("true", "false"):
        value = raw.lower() == "true"
    elif raw.lower() in ("none", "null"):
        value = None
    else:
        for convert in (int, float, json.loads):
            try:
                value = convert(raw)
                break
            except ValueError:
                continue
    return key, value


def _sample_path(text: str) -> Path:
    path = Path(text)
    if path.suffix.lower() not in (".safetensors", ".pt", ".npy"):
        raise argparse.ArgumentTypeError(f"the output file must end in .safetensors, .pt or .npy, got {text!r}")
    return path


# --- small helpers --------------------------------------------------------------------------------------
def _device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CLIError(f"--device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine")
    return device


def _set_threads(threads: int | None, device: torch.device, small: bool) -> str:
    """Set torch's CPU threads: ``threads`` if given (> 0), else 1 for small 2-D work on the CPU."""
    if threads is None or threads == 0:
        threads = 1 if (small and device.type == "cpu") else None
    if threads:
        torch.set_num_threads(threads)
    return f"torch threads={torch.get_num_threads()}" + (" (fastest for small ops)" if threads == 1 else "")


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device).manual_seed(seed)


def _toy_train(name: str, n: int, seed: int, labels: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """The training set of a toy run: ``n`` points drawn with ``seed`` (and their classes: the same points)."""
    return make_toy(name, n, torch.Generator().manual_seed(seed), return_labels=labels)


def _held_out_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed + _HELD_OUT)


def _make_sde(name: str, args: argparse.Namespace):
    if name == "ve":
        return VESDE(sigma_min=args.sigma_min, sigma_max=args.sigma_max)
    return SDES[name](beta_min=args.beta_min, beta_max=args.beta_max)


def _sde_from_meta(path: Path, desc: dict[str, Any], tensors: dict[str, Tensor], device: torch.device,
                   ema: bool = False):
    """The checkpoint's SDE; a learned schedule (an ``nn.Module``) gets its trained state (``sde.*`` tensors),
    or with ``ema`` its EMA state (``ema_sde.*``, the schedule the EMA weights go with) where the checkpoint has one."""
    from .training import CheckpointError

    cls = _SDE_CLASSES.get(desc.get("class", ""))
    if cls is None:
        raise CLIError(f"the checkpoint's SDE {desc.get('repr', desc.get('class'))!r} is not one the CLI can rebuild "
                       f"({', '.join(_SDE_CLASSES)}); use the Python API")
    sde = cls(**desc.get("params", {}))
    if isinstance(sde, torch.nn.Module):
        prefix = "ema_sde." if ema and any(k.startswith("ema_sde.") for k in tensors) else "sde."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            sde.load_state_dict(state)
        except RuntimeError as err:
            raise CheckpointError(f"checkpoint {path}: its {desc.get('class')} schedule cannot be restored "
                                  f"({'no sde.* tensors' if not state else err})") from err
        sde = sde.to(device).eval().requires_grad_(False)
    return sde


def _time_input_from_meta(path: Path, meta: dict[str, Any], sde) -> Callable[[Tensor], Tensor] | None:
    """The network's time input recorded by the trainer: ``t`` itself, or a method of the SDE (``sde.noise_level``)."""
    desc = meta.get("time_input")
    if desc is None:
        return None
    name = desc[len("sde."):] if desc.startswith("sde.") else None
    if name is None or not callable(getattr(sde, name, None)):
        raise CLIError(f"checkpoint {path} was trained with a custom time_input ({desc!r}) that the CLI cannot rebuild; "
                       "use the Python API")
    return getattr(sde, name)


def _sde_params(sde) -> dict[str, float]:
    return {k: float(getattr(sde, k)) for k in ("beta_min", "beta_max", "sigma_min", "sigma_max", "T")
            if isinstance(getattr(sde, k, None), (int, float))}


def _fmt(x: float, digits: int = 4) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def _markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(str(row[key]) for key, _ in columns) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def _write_json(path: Path, doc: dict[str, Any]) -> Path:
    return atomic_write(path, json.dumps(_json_safe(doc), indent=2, allow_nan=False, default=str) + "\n")


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _save_samples(path: Path, x: Tensor) -> Path:
    """Write samples atomically as ``.safetensors`` (key ``"samples"``), ``.pt`` or ``.npy``."""
    cpu = x.detach().cpu().contiguous()
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        return atomic_write_file(path, lambda tmp: save_file({"samples": cpu}, str(tmp)))
    if suffix == ".pt":
        return atomic_write_file(path, lambda tmp: torch.save(cpu, tmp))
    if suffix == ".npy":
        import numpy as np

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a path
                np.save(f, cpu.numpy())

        return atomic_write_file(path, write)
    raise CLIError(f"unknown sample file type {path.suffix!r}; use .safetensors, .pt or .npy")


# --- plots ----------------------------------------------------------------------------------------------
_NO_MPL = "matplotlib is not installed (pip install 'sdediff[plot]'): no plot written"


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


def _scatter_png(path: Path, panels: dict[str, Tensor], reference: str | None = None, limit: int = 2000,
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


def _digits_png(path: Path, x: Tensor, columns: int = 8, title: str | None = None) -> Path | None:
    """A grid of 8x8 digit images (model space ``[-1, 1]``, shown as their 17 grey levels)."""
    from .data.digits import model_to_digits

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


def _plot_samples(path: Path, samples: Tensor, data: str | None, reference: Tensor | None, title: str,
                  classes: tuple[Tensor, Tensor] | None = None) -> Path | None:
    """Digits as a grid, 2-D points next to held-out data; ``classes`` = (labels of ``samples``, of ``reference``)
    colours both by class."""
    if samples.dim() == 4 or data == "digits":
        return _digits_png(path, samples[:64], title=title)
    if samples.dim() == 2 and samples.shape[1] == 2:
        panels = {"held-out data": reference, "samples": samples} if reference is not None else {"samples": samples}
        colours = None if classes is None else {"samples": classes[0], "held-out data": classes[1]}
        return _scatter_png(path, panels, reference="held-out data" if reference is not None else None, title=title,
                            classes=colours)
    return None


# --- runs: what `train` writes and `sample` / `likelihood` read -------------------------------------------
@dataclass
class _Run:
    dir: Path
    checkpoint: Path
    record: dict[str, Any] | None
    meta: dict[str, Any]
    sde: Any
    net: torch.nn.Module
    score: ScoreModel
    shape: tuple[int, ...]
    data: str | None

    @property
    def seed(self) -> int:
        return int((self.record or {}).get("seed", self.meta["config"]["seed"]))

    @property
    def t_eps(self) -> float:
        return float(self.meta["config"].get("t_eps", 1e-5))


def _run_record(command: str, data: str, shape: Sequence[int], seed: int, n_train: int | None, sde, net,
                args: dict[str, Any]) -> dict[str, Any]:
    return {"format": _RUN_FORMAT, "version": 1, "command": command, "data": data, "shape": list(shape),
            "seed": seed, "n_train": n_train, "sde": {"class": type(sde).__name__, "params": _sde_params(sde)},
            "model": {"class": type(net).__name__, "config": getattr(net, "config", None)}, "sdediff": __version__,
            "args": _json_safe(args)}


def _find_run_dir(path: Path) -> Path:
    """``path`` itself, or its ``checkpoints/`` subfolder when that holds the run (as the demo writes it)."""
    if not (path / "run.json").is_file() and (path / "checkpoints" / "run.json").is_file():
        return path / "checkpoints"
    return path


def _load_net(path: Path, tensors: dict[str, Tensor], meta: dict[str, Any], ema: bool,
              device: torch.device) -> torch.nn.Module:
    """Rebuild the MLP or UNet of a trainer checkpoint from its (already verified) tensors, in eval mode."""
    from .training import CheckpointError
    from .training.models import MODELS

    info = meta.get("model") or {}
    if info.get("class") not in MODELS or not isinstance(info.get("config"), dict):
        raise CheckpointError(f"checkpoint {path} holds a {info.get('class', 'custom')!r} model that the CLI cannot "
                              "rebuild; load it in Python with sdediff.training.load_weights")
    prefix = "ema." if ema else "model."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    net = MODELS[info["class"]](**info["config"]).to(device)
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path}: the {'EMA' if ema else 'raw'} weights do not fit its model: "
                              f"{err}") from err
    return net.eval().requires_grad_(False)


def _open_run(run: str | None, checkpoint: str | None, device: torch.device, ema: bool = True) -> _Run:
    from .training import latest_checkpoint, load_checkpoint

    if run is None and checkpoint is None:
        raise CLIError("give --run DIR (a folder written by 'sdediff train') or --checkpoint FILE")
    if run is not None:
        run_dir = Path(run)
        if not run_dir.is_dir():
            raise CLIError(f"--run {run}: no such folder")
        run_dir = _find_run_dir(run_dir)
    else:
        run_dir = Path(checkpoint).parent
    if checkpoint is not None:
        ckpt = Path(checkpoint)
        if not ckpt.is_file():
            raise CLIError(f"--checkpoint {checkpoint}: no such file")
    else:
        found = latest_checkpoint(run_dir)
        if found is None:
            raise CLIError(f"no valid checkpoint (ckpt_*.safetensors) in {run_dir}; train one with "
                           f"'sdediff train --out {run_dir}' or pass --checkpoint")
        ckpt = found
    tensors, meta = load_checkpoint(ckpt, device=device)
    record = None
    if (run_dir / "run.json").is_file():
        record = json.loads((run_dir / "run.json").read_text())
        if record.get("format") != _RUN_FORMAT:
            record = None
    sde = _sde_from_meta(ckpt, meta.get("sde", {}), tensors, device, ema)
    net = _load_net(ckpt, tensors, meta, ema, device)
    if record is not None:
        shape = tuple(record["shape"])
    elif type(net).__name__ == "MLP":
        shape = (int(net.config["dim"]),)
    else:
        raise CLIError(f"{run_dir} has no run.json, so the sample shape of this {type(net).__name__} is unknown; "
                       "use a folder written by 'sdediff train'")
    score = ScoreModel(net, sde, meta.get("prediction", meta["config"]["prediction"]), _time_input_from_meta(ckpt, meta, sde))
    return _Run(run_dir, ckpt, record, meta, sde, net, score, shape, (record or {}).get("data"))


def _run_description(run: _Run) -> str:
    return f"{run.checkpoint} (step {run.meta.get('step')}, {type(run.net).__name__}, {run.sde!r}, data {run.data})"


# --- train ----------------------------------------------------------------------------------------------
def _train_data(data: str, n_train: int, seed: int):
    """``(train, transform, held_out, shape)`` for a data set name."""
    if data == "digits":
        from .data.digits import digits_to_model, load_digits

        train, _ = load_digits("train")
        test, _ = load_digits("test")
        return train, digits_to_model, test, tuple(train.shape[1:])
    held = make_toy(data, 20_000, _held_out_generator(seed))
    return _toy_train(data, n_train, seed), None, held, (2,)


def _build_model(args: argparse.Namespace, shape: tuple[int, ...]):
    from .training import MLP, UNet

    kind = args.model if args.model != "auto" else ("unet" if len(shape) == 3 else "mlp")
    embed = {} if args.time_embed is None else {"time_embed": args.time_embed}
    if args.class_cond:
        embed["num_classes"] = _num_classes(args.data)
    if kind == "unet":
        if len(shape) != 3:
            raise CLIError(f"--model unet needs image data (C, H, W); {args.data} has shape {shape}")
        return UNet(in_channels=shape[0], base_channels=args.base_channels, channel_mults=tuple(args.channel_mults),
                    num_res_blocks=args.num_res_blocks, **embed)
    dim = math.prod(shape)
    return MLP(dim, hidden=args.hidden, depth=args.depth, **embed)


def _toy_class_metrics(samples: Tensor, labels: Tensor, data: str, generator: torch.Generator) -> dict[str, Any]:
    """Class-conditional samples of a labelled toy set: the share whose nearest held-out point (5000, labelled)
    has the class asked for, overall and per class."""
    ref, ref_labels = make_toy(data, 5000, generator, dtype=samples.dtype, return_labels=True)
    ref, ref_labels, labels = ref.to(samples.device), ref_labels.to(samples.device), labels.to(samples.device)
    nearest = torch.cat([torch.cdist(chunk, ref).argmin(1) for chunk in samples.split(512)])
    hit = (ref_labels[nearest] == labels).double()
    per_class = {int(k): float(hit[labels == k].mean()) for k in labels.unique()}
    return {"class_accuracy": float(hit.mean()), "class_accuracy_per_class": per_class}


def _toy_metrics(samples: Tensor, data: str, generator: torch.Generator) -> dict[str, float]:
    """Sliced-W2 of ``samples`` to as many held-out points, and the noise floor at that size."""
    n = samples.shape[0]
    held = make_toy(data, n, generator, dtype=samples.dtype).to(samples.device)
    floor = noise_floor(lambda k, g: make_toy(data, k, g), n, repeats=8, generator=generator)
    return {"sliced_w2": float(sliced_wasserstein(samples, held, generator=generator)),
            "noise_floor": float(floor.mean()), "noise_floor_sd": float(floor.std())}


def cmd_train(args: argparse.Namespace) -> int:
    """``sdediff train``: fit a score network, write checkpoints, metrics and a sample plot to ``--out``."""
    from .training import TrainConfig, Trainer, latest_checkpoint, list_checkpoints, seed_everything

    image = args.data == "digits"
    preset = TRAIN_PRESETS["image" if image else "2d"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    device = _device(args.device)
    threads = _set_threads(args.threads, device, small=not image)
    out = Path(args.out) if args.out else Path("runs") / f"{args.data}-{args.sde}"
    sde = _make_sde(args.sde, args)
    train, transform, held, shape = _train_data(args.data, args.n_train, args.seed)
    labels = None
    if args.class_cond:
        if _num_classes(args.data) is None:
            raise CLIError(f"--class-cond needs labelled data (digits, {', '.join(TOY_CLASSES)}); {args.data} has "
                           "no labels")
        if image:
            from .data.digits import load_digits

            labels = load_digits("train")[1]
        else:
            labels = _toy_train(args.data, args.n_train, args.seed, labels=True)[1]
    seed_everything(args.seed)
    net = _build_model(args, shape)
    options = {k: v for k, v in vars(args).items() if k not in ("func", "config", "command")}
    options["out"] = str(out)
    record = _run_record("train", args.data, shape, args.seed, None if image else args.n_train, sde, net, options)

    if list_checkpoints(out) and not args.resume:
        raise CLIError(f"{out} already holds checkpoints: pass --resume to continue that run, or choose another --out")
    if args.resume and (out / "run.json").is_file():
        old = json.loads((out / "run.json").read_text())
        fixed = ("data", "shape", "seed", "n_train", "sde", "model")
        changed = [k for k in fixed if _json_safe(old.get(k)) != _json_safe(record[k])]
        if changed:
            raise CLIError(f"--resume: {out} was trained with other {', '.join(changed)} "
                           f"({', '.join(f'{k}={old.get(k)!r}' for k in changed)}); use the same options "
                           f"(e.g. --config {out / 'config.toml'}) or another --out")

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      warmup_steps=args.warmup_steps, lr_schedule=args.lr_schedule,
                      grad_clip=args.grad_clip or None, ema_decay=args.ema_decay, amp=args.amp, seed=args.seed,
                      prediction=args.prediction, weighting=args.weighting, t_sampling=args.t_sampling,
                      t_eps=args.t_eps, log_every=args.log_every, eval_every=args.eval_every,
                      eval_samples=args.eval_samples, eval_solver=args.eval_solver,
                      eval_sample_steps=args.eval_sample_steps, eval_nll_points=args.eval_nll_points,
                      ckpt_every=args.ckpt_every, keep_checkpoints=args.keep_checkpoints, out_dir=str(out),
                      progress=args.progress, device=str(device),
                      cond_drop_prob=args.cond_drop_prob if args.class_cond else 0.0)
    captured: dict[str, Tensor | None] = {"samples": None}

    def eval_fn(trainer: Trainer, samples: Tensor | None) -> dict[str, Any]:
        captured["samples"] = samples
        if samples is None or image:
            return {}
        return _toy_metrics(samples, args.data, _held_out_generator(args.seed + 1 + trainer.step))

    trainer = Trainer(net, sde, train, labels, config=cfg, transform=transform, eval_data=held, eval_fn=eval_fn)
    atomic_write(out / "run.json", json.dumps(record, indent=2) + "\n")
    atomic_write(out / "config.toml", dump_toml(
        {k: v for k, v in options.items() if k not in ("resume",)},
        header=f"sdediff train options of this run (sdediff {__version__}); rerun or continue with\n"
               f"  sdediff train --config {out / 'config.toml'} --resume"))
    print(f"sdediff {__version__} train: {args.data} {tuple(train.shape)}, {sde!r}, {type(net).__name__} "
          f"({sum(p.numel() for p in net.parameters()):,} parameters), {args.steps} steps of batch {args.batch_size} "
          f"on {device}, {threads}; run folder {out}")
    start = time.perf_counter()
    try:
        trainer.fit(resume=args.resume)
    finally:
        trainer.close()
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {}
    if args.eval_samples or args.eval_nll_points:
        if trainer.evals and trainer.evals[-1]["step"] == trainer.step and captured["samples"] is not None:
            result = trainer.evals[-1]
        else:
            print("final evaluation: sampling and held-out NLL ...", flush=True)
            result = trainer.evaluate()
        if image and "nll" in result:
            from .data.digits import digits_bits_per_dim

            result["bits_per_dim"] = float(digits_bits_per_dim(torch.tensor(-result["nll"])))
            result["bits_per_dim_bound"] = float(digits_bits_per_dim(torch.tensor(-result["nll_bound"])))
        trainer.write_metrics()
    written = [latest_checkpoint(out), out / "metrics.json", out / "run.json", out / "config.toml"]
    if captured["samples"] is not None and args.plot:
        ref = held[: captured["samples"].shape[0]] if not image else None
        png = _plot_samples(out / "samples.png", captured["samples"], args.data, ref,
                            f"{args.data}, step {trainer.step}, {args.eval_solver} {args.eval_sample_steps} steps")
        written.append(png) if png is not None else print(_NO_MPL)
    recent = [v for v in trainer.history[-100:] if math.isfinite(v)]
    summary = [f"trained to step {trainer.step} in {seconds:.1f} s (loss {_fmt(sum(recent) / max(len(recent), 1))})"]
    if "nll" in result:
        line = f"held-out NLL {result['nll']:.4f} nats (bound {result['nll_bound']:.4f})"
        if image:
            line += f" = {result['bits_per_dim']:.3f} bits/dim (bound {result['bits_per_dim_bound']:.3f})"
        summary.append(line + f" on {args.eval_nll_points} points")
    if "sliced_w2" in result:
        summary.append(f"sliced W2 of {args.eval_samples} samples to held-out data {result['sliced_w2']:.4f} "
                       f"(noise floor {result['noise_floor']:.4f})")
    print("\n".join(summary))
    print("wrote " + ", ".join(str(p) for p in written if p is not None))
    return 0


# --- sample ---------------------------------------------------------------------------------------------
def _solver_options(args: argparse.Namespace) -> dict[str, Any]:
    options = dict(args.solver_option or [])
    try:
        get_solver(args.solver, **options)
    except (TypeError, ValueError) as err:
        raise CLIError(f"--solver {args.solver} with options {options}: {err}") from None
    return options


def _nfe(info: SampleResult) -> float:
    per_sample = info.stats.get("nfe_per_sample") if isinstance(info.stats, dict) else None
    if isinstance(per_sample, Tensor) and per_sample.numel():
        return float(per_sample.double().mean())
    return float(info.nfe)


def _sharding(chunks: list[slice]) -> str:
    return f"{len(chunks)} chunk(s) of at most {chunks[0].stop - chunks[0].start} over {_world_size()} process(es)"


def _sharded_map(device: torch.device, fn: Callable[[int], Any], num_chunks: int, progress: bool) -> list[Any] | None:
    """``[fn(0), ..., fn(num_chunks - 1)]`` computed by the ranks of a torchrun job (or this process alone), on
    rank 0; ``None`` on the other ranks. The process group exists only during the call."""
    with DistributedEval(device) as group:
        return group.map(fn, num_chunks, progress=progress)


def _sample_labels(run: _Run, classes: list[int] | None, scale: float, n: int) -> Tensor | None:
    """The class of each of the ``n`` samples (``classes`` in equal consecutive blocks), or ``None``: unconditional."""
    num_classes = getattr(run.net, "num_classes", None)
    if classes is None:
        if scale != 0:
            raise CLIError("--guidance-scale needs --classes, the classes to guide towards")
        return None
    if num_classes is None:
        raise CLIError(f"--classes: {run.checkpoint} holds an unconditional model; train one with --class-cond")
    if max(classes) >= num_classes:
        raise CLIError(f"--classes: the model knows classes 0..{num_classes - 1}, got {max(classes)}")
    return torch.tensor(classes).repeat_interleave(math.ceil(n / len(classes)))[:n]


def _calibrated_grid(run: _Run, args: argparse.Namespace, options: dict[str, Any], device: torch.device,
                     labels: Tensor | None, progress: bool) -> tuple[Tensor, dict[str, Any]]:
    """``--time-grid calibrated``: :func:`calibrate_grid` for the run's model and the chosen solver on
    ``--calibration-pilot`` prior draws (seeded apart from the samples; the same grid in every process)."""
    if labels is not None:
        raise CLIError("--time-grid calibrated: not available with --classes (calibrate on unconditional runs)")
    gen = torch.Generator(device).manual_seed(args.seed + 7919)
    pilot = run.sde.prior_sample((args.calibration_pilot, *run.shape), generator=gen, device=device)
    start = time.perf_counter()
    try:  # calibrate_grid checks the solver (deterministic, fixed-step) and the sizes before any work
        cal = calibrate_grid(run.sde, run.score, pilot, args.steps, args.solver, eps=args.eps,
                             max_evals=args.calibration_evals, progress=progress, **options)
    except ValueError as err:
        raise CLIError(f"--time-grid calibrated: {err} (e.g. unipc, dpm_solver, heun)") from err
    info = {"times": cal.times.tolist(), "pilot": args.calibration_pilot, "pilot_rmse": cal.rmse, "start": cal.start,
            "start_rmse": cal.start_rmse[cal.start], "accepted": cal.accepted, "holdout_rmse": cal.holdout_rmse,
            "start_holdout_rmse": cal.start_holdout_rmse, "evals": cal.evals, "reference_nfe": cal.reference_nfe,
            "search_nfe": cal.search_nfe, "seconds": time.perf_counter() - start}
    return cal.times, info


def cmd_sample(args: argparse.Namespace) -> int:
    """``sdediff sample``: draw samples from a trained run with any solver and save them."""
    device = local_device(_device(args.device))
    run = _open_run(args.run, args.checkpoint, device, ema=not args.raw_weights)
    image = len(run.shape) == 3
    threads = _set_threads(args.threads, device, small=not image)
    options = _solver_options(args)
    n = args.n or (64 if image else 2000)
    slug = args.solver.replace(":", "-")
    out = args.out or run.dir / f"samples_{slug}_{args.steps}.safetensors"
    labels = _sample_labels(run, args.classes, args.guidance_scale, n)
    chunks = chunk_slices(n, args.batch_size)
    main = process_rank() == 0
    if main:
        print(f"sdediff {__version__} sample: {n} samples from {_run_description(run)} with {args.solver} "
              f"({args.steps} steps{', ' + str(options) if options else ''}) on {device}, {threads}; "
              f"{_sharding(chunks)}")
    time_grid, calibration = args.time_grid, None
    if time_grid == "calibrated":
        time_grid, calibration = _calibrated_grid(run, args, options, device, labels, progress=args.progress and main)
        if main:
            verdict = ("kept" if calibration["accepted"] else f"not better on the held-out quarter: using {calibration['start']}")
            print(f"calibrated {args.steps}-step grid on {args.calibration_pilot} pilot paths: RMSE "
                  f"{calibration['pilot_rmse']:.3g} (best standard grid, {calibration['start']}: "
                  f"{calibration['start_rmse']:.3g}); held-out quarter {calibration['holdout_rmse']:.3g} vs "
                  f"{calibration['start_holdout_rmse']:.3g}, {verdict}; {calibration['seconds']:.1f} s")

    @torch.no_grad()
    def draw(k: int) -> tuple[Tensor, Tensor, int]:
        size = chunks[k].stop - chunks[k].start
        score = run.score if labels is None else ScoreModel(ClassifierFreeNet(run.net, labels[chunks[k]], args.guidance_scale),
                                                           run.sde, run.score.prediction, run.score.time_input)
        info = sample(run.sde, score, (size, *run.shape), solver=args.solver, steps=args.steps, eps=args.eps,
                      generator=chunk_generator(args.seed, k, device), device=device, time_grid=time_grid,
                      denoise=args.denoise, progress=args.progress and main and len(chunks) == 1, return_info=True,
                      **options)
        per_sample = info.stats.get("nfe_per_sample")
        if not isinstance(per_sample, Tensor):
            per_sample = torch.full((size,), info.nfe)
        return info.samples.cpu(), per_sample.double().cpu(), info.nfe

    start = time.perf_counter()
    parts = _sharded_map(device, draw, len(chunks), args.progress)
    if parts is None:  # a torchrun rank other than 0: rank 0 writes the results
        return 0
    seconds = time.perf_counter() - start
    x = torch.cat([part[0] for part in parts])
    nfe, nfe_per_sample = sum(part[2] for part in parts), float(torch.cat([part[1] for part in parts]).mean())
    if not bool(torch.isfinite(x).all()):
        print(f"warning: {int((~torch.isfinite(x)).any(dim=tuple(range(1, x.dim()))).sum())} samples are not finite",
              file=sys.stderr)
    _save_samples(out, x)
    written = [out]
    doc: dict[str, Any] = {"checkpoint": str(run.checkpoint), "step": run.meta.get("step"), "solver": args.solver,
                           "steps": args.steps, "options": options, "n": n, "eps": args.eps, "seed": args.seed,
                           "denoise": args.denoise, "time_grid": args.time_grid, "nfe": nfe,
                           "nfe_per_sample": nfe_per_sample, "batch_size": args.batch_size,
                           "world_size": _world_size(), "seconds": seconds, "samples": str(out),
                           "classes": args.classes, "guidance_scale": args.guidance_scale}
    if calibration is not None:
        doc["calibration"] = calibration
    line = f"{n} samples in {seconds:.2f} s, {nfe_per_sample:.4g} NFE"
    toy = run.data in TOY_DATASETS and x.dim() == 2
    if toy and labels is not None:  # class-conditional: is each sample in the class asked for?
        doc.update(_toy_class_metrics(x, labels, run.data, _held_out_generator(run.seed + 1)))
        line += f"; {100 * doc['class_accuracy']:.1f}% in the class asked for (nearest held-out point)"
    elif toy:
        doc.update(_toy_metrics(x, run.data, _held_out_generator(run.seed + 1)))
        line += f"; sliced W2 to held-out data {doc['sliced_w2']:.4f} (noise floor {doc['noise_floor']:.4f})"
    print(line)
    if args.plot:
        ref, classes = None, None
        if toy and labels is not None:
            ref, ref_labels = make_toy(run.data, 2000, _held_out_generator(run.seed), return_labels=True)
            classes = (labels, ref_labels)
        elif run.data in TOY_DATASETS:
            ref = make_toy(run.data, min(n, 2000), _held_out_generator(run.seed))
        png = _plot_samples(out.with_suffix(".png"), x, run.data, ref, f"{args.solver}, {args.steps} steps, "
                                                                           f"NFE {nfe_per_sample:.4g}", classes)
        written.append(png) if png is not None else print(_NO_MPL)
    written.append(_write_json(out.with_suffix(".json"), doc))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


# --- likelihood -----------------------------------------------------------------------------------------
@torch.no_grad()
def _nll_bound(sde, score, x: Tensor, t_eps: float, num_t: int, generator: torch.Generator,
               max_evals: int = 8192) -> Tensor:
    """:func:`sdediff.training.nll_bound` per point, in chunks of at most ``max_evals`` network inputs."""
    chunk = max(1, max_evals // num_t)
    return torch.cat([nll_bound(sde, score, x[i:i + chunk], t_eps=t_eps, num_t=num_t, generator=generator)
                      for i in range(0, len(x), chunk)])


def cmd_likelihood(args: argparse.Namespace) -> int:
    """``sdediff likelihood``: NLL of a data split through the probability-flow ODE, plus the ELBO bound."""
    device = local_device(_device(args.device))
    run = _open_run(args.run, args.checkpoint, device, ema=not args.raw_weights)
    data = args.data or run.data
    if data is None:
        raise CLIError(f"{run.dir} does not say which data it was trained on: pass --data")
    image = data == "digits"
    if (len(run.shape) == 3) != image:
        raise CLIError(f"--data {data} does not fit the run's sample shape {run.shape}")
    threads = _set_threads(args.threads, device, small=not image)
    if image:
        from .data.digits import digits_to_model, load_digits

        levels, _ = load_digits(args.split)
        levels = levels[: args.n] if args.n else levels
        x = digits_to_model(levels, torch.Generator().manual_seed(args.seed))  # uniform dequantisation
    else:
        n = args.n or 1000
        if args.split == "train":
            if run.record is None or not run.record.get("n_train"):
                raise CLIError(f"{run.dir} has no run.json recording the training set; use --split test")
            x = _toy_train(data, int(run.record["n_train"]), run.seed)[:n]
        else:
            x = make_toy(data, n, _held_out_generator(run.seed))
    x = x.to(device=device, dtype=torch.float64 if args.float64 else torch.float32)
    if args.float64:
        run.net.double()
    eps = args.eps or run.t_eps
    d = math.prod(x.shape[1:])
    trace = args.trace if args.trace != "auto" else ("exact" if d <= 16 else "hutchinson")
    chunks = chunk_slices(len(x), args.batch_size)
    main = process_rank() == 0
    if main:
        print(f"sdediff {__version__} likelihood: {len(x)} {data} points ({args.split} split) under "
              f"{_run_description(run)}; probability-flow ODE from eps={eps:g}, {trace} trace, rtol={args.rtol:g}, "
              f"atol={args.atol:g}, on {device}, {threads}; {_sharding(chunks)}")

    def score_chunk(k: int) -> tuple[Tensor, int, Tensor | None]:
        gen = chunk_generator(args.seed, k, device)  # the Hutchinson probes, then the bound's times and noise
        xk = x[chunks[k]]
        res = log_likelihood(run.sde, run.score, xk, eps=eps, rtol=args.rtol, atol=args.atol, trace=trace,
                             generator=gen, progress=args.progress and main and len(chunks) == 1)
        bound = _nll_bound(run.sde, run.score, xk, eps, args.bound_times, gen).cpu() if args.bound else None
        return res.log_prob.detach().cpu(), res.nfe, bound

    start = time.perf_counter()
    parts = _sharded_map(device, score_chunk, len(chunks), args.progress)
    if parts is None:  # a torchrun rank other than 0: rank 0 writes the results
        return 0
    seconds = time.perf_counter() - start
    log_prob, nfe = torch.cat([part[0] for part in parts]), sum(part[1] for part in parts)
    nll, nll_se = mean_se(-log_prob)
    doc: dict[str, Any] = {"checkpoint": str(run.checkpoint), "step": run.meta.get("step"), "data": data,
                           "split": args.split, "n": len(x), "eps": eps, "trace": trace, "rtol": args.rtol,
                           "atol": args.atol, "nfe": nfe, "batch_size": args.batch_size, "world_size": _world_size(),
                           "seconds": seconds, "nll": nll, "nll_se": nll_se,
                           "nll_per_dim": nll / d}
    lines = [f"NLL {nll:.4f} ± {nll_se:.4f} nats ({nll / d:.4f} nats/dim), {nfe} NFE, {seconds:.1f} s"]
    if image:
        from .data.digits import digits_bits_per_dim

        bpd, bpd_se = mean_se(digits_bits_per_dim(log_prob.cpu()))
        doc.update(bits_per_dim=bpd, bits_per_dim_se=bpd_se)
        lines.append(f"bits/dim {bpd:.4f} ± {bpd_se:.4f} (17 grey levels, uniform dequantisation; a uniform model "
                     f"scores {math.log2(17):.3f})")
    if args.bound:
        b, b_se = mean_se(torch.cat([part[2] for part in parts]))
        doc.update(nll_bound=b, nll_bound_se=b_se)
        lines.append(f"NLL upper bound (ELBO, {args.bound_times} times per point) {b:.4f} ± {b_se:.4f} nats")
        if image:
            from .data.digits import digits_bits_per_dim

            doc["bits_per_dim_bound"] = float(digits_bits_per_dim(torch.tensor(-b)))
            lines[-1] += f" = {doc['bits_per_dim_bound']:.4f} bits/dim"
    if data == "gaussian_mixture":
        true, true_se = mean_se(-toy_mixture().log_prob(x.double().cpu(), run.sde, eps))
        doc.update(true_nll=true, true_nll_se=true_se)
        lines.append(f"true NLL of the same points (exact mixture density at eps) {true:.4f} ± {true_se:.4f} nats")
    print("\n".join(lines))
    out = args.out or run.dir / f"likelihood_{data}_{args.split}.json"
    print(f"wrote {_write_json(Path(out), doc)}")
    return 0


# --- bench ----------------------------------------------------------------------------------------------
def _benchmark_scripts() -> dict[str, Path]:
    """The benchmark scripts of a source checkout (``benchmarks/`` beside the package), if any."""
    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    names = ("accuracy_per_nfe", "overhead")
    return {name: folder / f"{name}.py" for name in names if (folder / f"{name}.py").is_file()}


def cmd_bench(args: argparse.Namespace) -> int:
    """``sdediff bench``: the benchmark scripts of a source checkout, or the built-in mixture comparison."""
    scripts = _benchmark_scripts()
    if args.quick or not scripts:
        if not args.quick:
            print("no benchmarks/ folder beside the sdediff package (not a source checkout): running the built-in "
                  "solver comparison instead\n")
        if args.script_args:
            raise CLIError(f"extra arguments {args.script_args} go to the benchmark scripts, which "
                           + ("--quick does not run" if scripts else "this installation does not have"))
        return _bench_mixture(args)
    names = [args.script] if args.script else list(scripts)
    if args.script and args.script not in scripts:
        raise CLIError(f"--script {args.script}: no benchmarks/{args.script}.py in this checkout")
    for name in names:
        cmd = [sys.executable, str(scripts[name]), *args.script_args]
        print(f"$ {shlex.join(cmd)}", flush=True)
        code = subprocess.call(cmd, cwd=scripts[name].parent.parent)
        if code:
            print(f"sdediff bench: {name} exited with status {code}", file=sys.stderr)
            return code
    return 0


def _bench_mixture(args: argparse.Namespace) -> int:
    """Sample an analytic 2-D mixture (exact score) with several solvers; check against exact samples."""
    device = _device(args.device)
    threads = _set_threads(args.threads, device, small=True)
    dtype = torch.float64 if args.float64 else torch.float32
    sde = _make_sde(args.sde, args)
    gm = GaussianMixture.ring(num_components=8, radius=4.0, std=0.35)
    eps = 1e-3
    exact = gm.marginal(sde, eps)
    score = gm.score_fn(sde)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    print(f"sdediff {__version__} bench --quick: {args.n} samples of an 8-component 2-D Gaussian mixture under "
          f"{sde!r}, exact score; device={device}, dtype={dtype}, {threads}")

    ref = exact.sample(args.n, generator=gen, device=device, dtype=dtype)
    floor = noise_floor(lambda k, generator: exact.sample(k, generator=generator, device=device, dtype=dtype),
                        args.n, repeats=8, generator=gen)
    expected_lp = exact.log_prob(exact.sample(100_000, generator=gen, device=device, dtype=torch.float64)).mean()
    x_T = sde.prior_sample((args.n, 2), generator=gen, device=device, dtype=dtype)  # shared by all solvers

    rows, samples = [], {}
    for solver, steps, options in BENCH_SOLVERS:
        start = time.perf_counter()
        info = sample(sde, score, (args.n, 2), solver=solver, steps=steps, eps=eps, x_init=x_T, generator=gen,
                      return_info=True, progress=args.progress, **options)
        seconds = time.perf_counter() - start
        x = info.samples
        samples[solver] = x
        lp = exact.log_prob(x.double())
        props = torch.bincount(exact.component_posterior(x).argmax(1), minlength=8).double() / args.n
        rows.append({
            "solver": solver, "steps": steps if solver != "ode" else "adaptive", "nfe": info.nfe,
            "seconds": round(seconds, 2),
            "sliced_w2": round(float(sliced_wasserstein(x, ref, generator=gen)), 4),
            "floor": round(float(floor.mean()), 4),
            "logp_gap": round(float(lp.mean() - expected_lp), 4),
            "logp_se": round(float(lp.std() / math.sqrt(args.n)), 4),
            "mode_err": round(float((props - gm.weights).abs().max()), 4),
        })

    n_lik = min(args.n, 256)
    start = time.perf_counter()
    res = log_likelihood(sde, score, ref[:n_lik].double(), eps=eps, rtol=1e-6, atol=1e-6)
    lik_seconds = time.perf_counter() - start
    exact_lp = exact.log_prob(ref[:n_lik].double())
    corrected = res.log_prob - res.prior_log_prob + gm.marginal(sde, sde.T).log_prob(res.latent)
    likelihood = {
        "points": n_lik, "nfe": res.nfe, "seconds": round(lik_seconds, 2),
        "mean_log_prob": round(float(res.log_prob.mean()), 4),
        "mean_exact_log_prob": round(float(exact_lp.mean()), 4),
        "max_abs_error_with_exact_prior": float((corrected - exact_lp).abs().max()),
    }

    columns = [("solver", "solver"), ("steps", "steps"), ("nfe", "NFE"), ("seconds", "time (s)"),
               ("sliced_w2", "sliced W2"), ("floor", "noise floor"), ("logp_gap", "mean log p gap"),
               ("logp_se", "± s.e."), ("mode_err", "max mode error")]
    table = _markdown_table(rows, columns)
    lik_line = (f"exact likelihood via the probability-flow ODE ({n_lik} points, float64, exact trace): "
                f"{likelihood['nfe']} NFE, {likelihood['seconds']} s, mean log p = {likelihood['mean_log_prob']} "
                f"(exact {likelihood['mean_exact_log_prob']}); with the exact p_T at the latent, max error "
                f"{likelihood['max_abs_error_with_exact_prior']:.1e} nats")
    print()
    print(table)
    print()
    print(lik_line)

    out = Path(args.out)
    _write_json(out / "metrics.json", {"sde": repr(sde), "n": args.n, "seed": args.seed, "eps": eps, "solvers": rows,
                                       "likelihood": likelihood})
    atomic_write(out / "table.md", table + "\n\n" + lik_line + "\n")
    written = [out / "metrics.json", out / "table.md"]
    if args.plot:
        png = _scatter_png(out / "samples.png", {"exact p_eps": ref, **samples}, reference="exact p_eps")
        written.append(png) if png is not None else print(_NO_MPL)
    print()
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


# --- demo -----------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    """``sdediff demo``: train a small model on a 2-D toy set, sample it three ways, check and plot."""
    from .training import MLP, TrainConfig, Trainer, list_checkpoints, seed_everything

    wall = time.perf_counter()
    device = _device(args.device)
    threads = _set_threads(args.threads, device, small=True)
    if args.n < 2 * args.splits:
        raise CLIError(f"--n {args.n} is too small for --splits {args.splits}: need at least 2 samples per split")
    out = Path(args.out)
    ckpt_dir = out / "checkpoints"
    for old in list_checkpoints(ckpt_dir):  # the demo's folder holds one run: a new demo replaces it
        old.unlink()
    sde = VPSDE()
    t_eps = 1e-5
    eps = 1e-3
    train = _toy_train(args.data, args.n_train, args.seed)
    seed_everything(args.seed)
    net = MLP(2, hidden=args.hidden, depth=args.depth)
    params = sum(p.numel() for p in net.parameters())
    print(f"sdediff {__version__} demo: learn the 2-D '{args.data}' set ({args.n_train} points) with an MLP "
          f"({params:,} parameters) under {sde!r}, then sample it with three solvers.\n"
          f"device={device}, {threads}; {args.steps} training steps of batch {args.batch_size}", flush=True)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=min(100, args.steps // 10),
                      lr_schedule="cosine", ema_decay=args.ema_decay, seed=args.seed, t_eps=t_eps,
                      log_every=max(1, min(100, args.steps)), out_dir=str(ckpt_dir), progress=args.progress,
                      device=str(device))
    trainer = Trainer(net, sde, train, config=cfg)
    options = {k: v for k, v in vars(args).items() if k not in ("func", "config", "command")}
    record = _run_record("demo", args.data, (2,), args.seed, args.n_train, sde, net, options)
    atomic_write(ckpt_dir / "run.json", json.dumps(record, indent=2) + "\n")
    start = time.perf_counter()
    trainer.fit()
    train_seconds = time.perf_counter() - start
    recent = [v for v in trainer.history[-100:] if math.isfinite(v)]
    print(f"trained in {train_seconds:.1f} s (final loss {_fmt(sum(recent) / max(len(recent), 1))})", flush=True)
    score = trainer.score_fn(ema=True)

    # held-out data and the noise floor: SW2 between two held-out sets of the size each sample split has
    size = args.n // args.splits
    held_gen = _held_out_generator(args.seed)
    held = [make_toy(args.data, size, held_gen) for _ in range(args.splits)]
    floor = noise_floor(lambda k, g: make_toy(args.data, k, g), size, repeats=16, generator=held_gen)
    floor_mean, floor_sd = float(floor.mean()), float(floor.std())
    gen = _generator(args.seed + _SAMPLING, device)
    x_T = sde.prior_sample((size * args.splits, 2), generator=gen, device=device)  # shared by all solvers
    rows, samples = [], {}
    for label, solver, steps, opts in DEMO_SOLVERS:
        start = time.perf_counter()
        with torch.no_grad():
            info = sample(sde, score, x_T.shape, solver=solver, steps=steps, eps=eps, x_init=x_T, generator=gen,
                          return_info=True, progress=args.progress, **opts)
        seconds = time.perf_counter() - start
        x = info.samples
        samples[f"{label}: {solver}"] = x
        sw = torch.stack([sliced_wasserstein(x[i * size:(i + 1) * size], held[i].to(x), generator=held_gen)
                          for i in range(args.splits)])
        sw_mean, sw_sd = float(sw.mean()), float(sw.std()) if args.splits > 1 else float("nan")
        ratio = sw_mean / floor_mean
        rows.append({"kind": label, "solver": solver, "steps": "adaptive" if solver == "adaptive_ode" else steps,
                     "options": opts, "nfe": round(_nfe(info), 1), "seconds": round(seconds, 2),
                     "sliced_w2": sw_mean, "sliced_w2_sd": sw_sd, "sliced_w2_splits": sw.tolist(),
                     "noise_floor": floor_mean, "noise_floor_sd": floor_sd, "ratio": ratio,
                     "pass": bool(ratio <= TARGET_RATIO), "finite": bool(torch.isfinite(x).all())})
        print(f"  {label:>3} {solver:<15} {_nfe(info):7.1f} NFE {seconds:6.1f} s   sliced W2 {sw_mean:.4f} = "
              f"{ratio:.2f} x floor", flush=True)

    # held-out NLL: exact probability-flow likelihood, the ELBO bound, and the truth where it is known
    start = time.perf_counter()
    x_nll = make_toy(args.data, args.nll_points, held_gen).to(device)
    res = log_likelihood(sde, score, x_nll, eps=t_eps, rtol=1e-5, atol=1e-5, trace="exact")
    bound = _nll_bound(sde, score, x_nll, t_eps, 64, gen)
    nll_seconds = time.perf_counter() - start
    nll_rows = [("model NLL, probability-flow ODE (exact trace)", *mean_se(-res.log_prob.detach()), res.nfe),
                ("model NLL upper bound (ELBO, 64 times per point)", *mean_se(bound), None)]
    if args.data == "gaussian_mixture":
        true = -toy_mixture().log_prob(x_nll.double().cpu(), sde, t_eps)
        nll_rows.append(("true NLL (exact density of the data)", *mean_se(true), None))
    nll = {name: {"nats": m, "se": se, "nfe": nfe} for name, m, se, nfe in nll_rows}

    table_rows = [{"kind": r["kind"], "solver": r["solver"], "steps": r["steps"], "nfe": f"{r['nfe']:g}",
                   "seconds": f"{r['seconds']:.1f}", "sw": f"{r['sliced_w2']:.4f} ± {r['sliced_w2_sd']:.4f}",
                   "floor": f"{floor_mean:.4f} ± {floor_sd:.4f}", "ratio": f"{r['ratio']:.2f}",
                   "verdict": "PASS" if r["pass"] else "FAIL"} for r in rows]
    table = _markdown_table(table_rows, [
        ("kind", "sampler"), ("solver", "solver"), ("steps", "steps"), ("nfe", "NFE"), ("seconds", "time (s)"),
        ("sw", f"sliced W2 to held-out ({args.splits} × {size})"), ("floor", "noise floor"), ("ratio", "ratio"),
        ("verdict", f"≤ {TARGET_RATIO:g}× floor")])
    nll_table = _markdown_table(
        [{"what": name, "nats": f"{m:.4f} ± {se:.4f}"} for name, m, se, _ in nll_rows],
        [("what", f"held-out NLL ({args.nll_points} points, t_eps={t_eps:g})"), ("nats", "nats")])
    notes = (f"Sliced W2 (256 random directions) of each sampler's {size * args.splits} samples, in {args.splits} splits "
             f"of {size} against {args.splits} held-out sets of {size}; noise floor: the same distance between two "
             f"held-out sets of {size} (16 pairs). Target: mean ≤ {TARGET_RATIO:g}× the mean floor. All samplers "
             f"start from the same prior draws; NFE of the adaptive ODE is the mean per sample.")
    total = time.perf_counter() - wall
    timing = (f"wall time {total:.1f} s: training {train_seconds:.1f} s, sampling "
              f"{sum(r['seconds'] for r in rows):.1f} s, likelihood {nll_seconds:.1f} s ({threads})")
    print()
    print(table)
    print()
    print(nll_table)
    print()
    print(notes)
    print(timing)
    if size < 1000:
        print(f"note: with {size} points per split the sliced-W2 check has little power (even a barely trained "
              f"model can pass); the default sizes make it meaningful")

    written = []
    if args.plot:
        panels = {f"held-out data ({args.data})": torch.cat(held), **samples}
        png = _scatter_png(out / "samples.png", panels, reference=f"held-out data ({args.data})",
                           title=f"sdediff demo: {args.steps} training steps, VP SDE")
        written.append(png) if png is not None else print(_NO_MPL)
    written.append(atomic_write(out / "table.md", f"# sdediff demo\n\n{table}\n\n{nll_table}\n\n{notes}\n\n{timing}\n"))
    passed = all(r["pass"] for r in rows)
    written.append(_write_json(out / "metrics.json", {
        "sdediff": __version__, "options": options, "sde": repr(sde), "eps": eps, "t_eps": t_eps,
        "target_ratio": TARGET_RATIO, "passed": passed, "solvers": rows, "nll": nll,
        "nll_points": args.nll_points, "train": {"steps": trainer.step, "seconds": train_seconds,
                                                 "final_loss": sum(recent) / max(len(recent), 1)},
        "seconds": {"total": total, "train": train_seconds, "likelihood": nll_seconds},
        "threads": torch.get_num_threads(), "device": str(device)}))
    written.append(ckpt_dir)
    print("\n" + ("PASS: every sampler is within " if passed else "FAIL: not every sampler is within ")
          + f"{TARGET_RATIO:g}x the noise floor")
    print("wrote " + ", ".join(str(p) for p in written))
    print(f"try: sdediff sample --run {out} --solver heun --steps 50   |   sdediff likelihood --run {out}")
    return 1 if (args.check and not passed) else 0


# --- parser ---------------------------------------------------------------------------------------------
class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps descriptions as written and shows each option's default (except ``None``)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action, argparse._HelpAction):
            return action.help
        return super()._get_help_string(action)


def _common(p: argparse.ArgumentParser, device: str | None = "auto") -> None:
    p.add_argument("--config", metavar="FILE.toml", help="read options from a TOML file whose keys are this command's "
                   "long flags (flags given here override it)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="random seed")
    p.add_argument("--device", default=device, help="torch device: cpu, cuda, cuda:1 or auto (cuda when available)")
    p.add_argument("--threads", type=_nonneg_int, default=0,
                   help="torch CPU threads (0: one thread for 2-D work on the CPU, where it is fastest; torch's "
                        "default otherwise)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress bars")


def _sde_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sde", choices=sorted(SDES), default="vp", help="forward SDE")
    p.add_argument("--beta-min", type=_positive_float, default=0.1, help="VP / sub-VP beta(0)")
    p.add_argument("--beta-max", type=_positive_float, default=20.0, help="VP / sub-VP beta(1)")
    p.add_argument("--sigma-min", type=_positive_float, default=0.01, help="VE smallest noise level")
    p.add_argument("--sigma-max", type=_positive_float, default=50.0, help="VE largest noise level")


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", metavar="DIR", help="run folder written by 'sdediff train' (or the demo's folder)")
    p.add_argument("--checkpoint", metavar="FILE", help="checkpoint to use (default: the newest valid one in --run)")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights")


_EPILOGS = {
    "train": """examples:
  sdediff train --data moons --out runs/moons
  sdediff train --data checkerboard --sde subvp --steps 8000 --out runs/cb
  sdediff train --data digits --out runs/digits --device cuda
  sdediff train --config runs/moons/config.toml --steps 8000 --resume   # continue to 8000 steps

defaults that depend on the data (2-D sets / digits): --steps 4000 / 2500, --batch-size 512 / 128,
--lr 2e-3 / 1e-3, --warmup-steps 100 / 200, --ema-decay 0.995 / 0.999, --weighting simple /
likelihood, --t-sampling uniform / importance, --eval-samples 2000 / 64, --eval-nll-points 256 / 64
(the digits values are those of benchmarks/digits_nll.py). The run folder gets ckpt_*.safetensors,
metrics.json (config, losses, evaluations), run.json, config.toml and samples.png.""",
    "sample": """examples:
  sdediff sample --run runs/moons --solver pc --steps 500 --solver-option snr=0.16 --n 4000
  sdediff sample --run runs/moons --solver adaptive_ode --solver-option rtol=1e-4 --out moons.npy
  sdediff sample --run runs/digits --solver heun --steps 100 --n 64 --denoise
  torchrun --nproc_per_node=4 -m sdediff -- sample --run runs/digits --n 50000 --batch-size 1000 --device cuda
      # shared out among 4 processes: the same samples as one process writes (docs/distributed.md)

Writes the samples (.safetensors with key "samples", .pt or .npy), a PNG (scatter plot next to
held-out data for 2-D sets, an image grid for digits) and a JSON sidecar with NFE and timings.""",
    "likelihood": """examples:
  sdediff likelihood --run runs/moons --n 2000
  sdediff likelihood --run runs/digits --split test        # NLL in nats and bits/dim
  torchrun --nproc_per_node=4 -m sdediff -- likelihood --run runs/digits --batch-size 64   # same result, 4 processes

Digits are dequantised uniformly (17 grey levels mapped to [-1, 1]); bits/dim follow
sdediff.data.digits.digits_bits_per_dim. For the gaussian_mixture set the true NLL is printed too.""",
    "bench": """examples:
  sdediff bench                                  # benchmarks/accuracy_per_nfe.py, then overhead.py
  sdediff bench --script overhead -- --quick     # arguments after -- go to the script
  sdediff bench --quick                          # built-in comparison on an analytic mixture (~20 s)""",
    "demo": """The demo trains for about a minute on one CPU thread, then samples, scores and plots;
'sdediff demo --steps 200 --n 1000' is a quick smoke run (which will not meet the target).""",
}


def _build() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="sdediff", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"sdediff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    subs: dict[str, argparse.ArgumentParser] = {}

    def add(name: str, help: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=textwrap.fill(help[0].upper() + help[1:] + ".", 100),
                           epilog=_EPILOGS.get(name), formatter_class=_HelpFormatter)
        p.set_defaults(func=func)
        subs[name] = p
        return p

    # demo
    p = add("demo", "train a small score model on a 2-D toy set, sample it with an SDE, a predictor-corrector and "
                    "an adaptive ODE solver, check sliced-W2 against the noise floor and the NLL, and write the "
                    "results to the --out folder",
            cmd_demo)
    p.add_argument("--out", default="sdediff-demo", help="output folder")
    p.add_argument("--data", choices=TOY_DATASETS, default="gaussian_mixture",
                   help="2-D toy set (gaussian_mixture has an exact density, so the true NLL is shown)")
    p.add_argument("--steps", type=_positive_int, default=4000, help="training steps")
    p.add_argument("--batch-size", type=_positive_int, default=512, help="training batch size")
    p.add_argument("--lr", type=_positive_float, default=2e-3, help="peak learning rate (cosine schedule)")
    p.add_argument("--ema-decay", type=_unit_float, default=0.995, help="EMA decay of the weights used to sample")
    p.add_argument("--hidden", type=_positive_int, default=128, help="MLP width")
    p.add_argument("--depth", type=_positive_int, default=3, help="MLP residual blocks")
    p.add_argument("--n-train", type=_positive_int, default=20_000, help="training points")
    p.add_argument("--n", type=_positive_int, default=8000, help="samples per solver")
    p.add_argument("--splits", type=_positive_int, default=4,
                   help="sliced-W2 is averaged over this many splits of the samples, each against its own "
                        "held-out set")
    p.add_argument("--nll-points", type=_positive_int, default=1000, help="held-out points whose NLL is computed")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write samples.png")
    p.add_argument("--check", action="store_true", help="exit with status 1 when a sampler misses the target")
    _common(p, device="cpu")

    # train
    p = add("train", "train a score network on a toy 2-D set or the 8x8 digits into a run folder", cmd_train)
    p.add_argument("--data", choices=DATASETS, default="moons", help="training data")
    p.add_argument("--out", metavar="DIR", help="run folder (default: runs/DATA-SDE)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    _sde_options(p)
    p.add_argument("--n-train", type=_positive_int, default=20_000, help="training points drawn from a 2-D toy set")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=("auto", "mlp", "unet"), default="auto", help="network (auto: MLP for 2-D "
                   "data, UNet for images)")
    g.add_argument("--hidden", type=_positive_int, default=128, help="MLP width")
    g.add_argument("--depth", type=_positive_int, default=3, help="MLP residual blocks")
    g.add_argument("--base-channels", type=_positive_int, default=32, help="UNet channels at the first level")
    g.add_argument("--channel-mults", type=_positive_int, nargs="+", default=[1, 2], help="UNet channel multipliers")
    g.add_argument("--num-res-blocks", type=_positive_int, default=1, help="UNet residual blocks per level")
    g.add_argument("--class-cond", action="store_true", help="class-conditional model on the data's labels (digits "
                   "0-9; moons 0-1, checkerboard 0-7, rings 0-3, gaussian_mixture 0-7), trained with condition dropout "
                   "for classifier-free guidance (sample with --classes, --guidance-scale)")
    g.add_argument("--cond-drop-prob", type=_unit_float, default=0.1,
                   help="with --class-cond: probability of replacing a label by the null token")
    g.add_argument("--time-embed", choices=("fourier", "sinusoidal"), help="time embedding (default: fourier for "
                   "the MLP, sinusoidal for the UNet)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=_positive_int, help="training steps (default: 4000 for 2-D sets, 2500 for digits)")
    g.add_argument("--batch-size", type=_positive_int, help="batch size (default: 512 for 2-D sets, 128 for digits)")
    g.add_argument("--lr", type=_positive_float, help="peak learning rate (default: 2e-3 for 2-D sets, 1e-3 for digits)")
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), default="cosine", help="after the warm-up")
    g.add_argument("--warmup-steps", type=_nonneg_int, help="linear learning-rate warm-up (default: 100 for 2-D "
                   "sets, 200 for digits)")
    g.add_argument("--weight-decay", type=_nonneg_float, default=0.0, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=_nonneg_float, default=1.0, help="gradient-norm clipping (0: none)")
    g.add_argument("--ema-decay", type=_unit_float, help="EMA decay (default: 0.995 for 2-D sets, 0.999 for digits)")
    g.add_argument("--amp", action="store_true", help="mixed precision on CUDA")
    g = p.add_argument_group("loss")
    g.add_argument("--prediction", choices=PREDICTIONS, default="eps", help="what the network predicts")
    g.add_argument("--weighting", choices=("simple", "likelihood"), help="DSM loss weighting (default: simple for "
                   "2-D sets, likelihood for digits)")
    g.add_argument("--t-sampling", choices=("uniform", "importance"), help="how training times are drawn (default: "
                   "uniform for 2-D sets, importance for digits)")
    g.add_argument("--t-eps", type=_positive_float, default=1e-5, help="smallest training time")
    g = p.add_argument_group("logging, evaluation and checkpoints")
    g.add_argument("--log-every", type=_positive_int, default=100, help="steps between loss log entries")
    g.add_argument("--eval-every", type=_nonneg_int, default=0, help="steps between evaluations (0: only at the end)")
    g.add_argument("--eval-samples", type=_nonneg_int, help="samples drawn at each evaluation and plotted "
                   "(default: 2000 for 2-D sets, 64 for digits; 0: none)")
    g.add_argument("--eval-solver", type=_solver_name, default="heun", help="solver of the evaluation samples")
    g.add_argument("--eval-sample-steps", type=_positive_int, default=50, help="its steps")
    g.add_argument("--eval-nll-points", type=_nonneg_int, help="held-out points of the evaluation NLL "
                   "(default: 256 for 2-D sets, 64 for digits; 0: none)")
    g.add_argument("--ckpt-every", type=_nonneg_int, default=1000, help="steps between checkpoints (0: only the last)")
    g.add_argument("--keep-checkpoints", type=_nonneg_int, default=3, help="periodic checkpoints kept (0: all)")
    g.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write samples.png")
    _common(p)

    # sample
    p = add("sample", "draw samples from a trained run with any solver", cmd_sample)
    _run_options(p)
    p.add_argument("--solver", type=_solver_name, default="heun",
                   help=f"solver: {', '.join(available_solvers())}")
    p.add_argument("--steps", type=_positive_int, default=100, help="time steps (ignored by adaptive solvers)")
    p.add_argument("--solver-option", type=_key_value, action="append", metavar="KEY=VALUE",
                   help="solver option, repeatable (e.g. snr=0.16, rtol=1e-4, order=3)")
    p.add_argument("--n", type=_positive_int, help="number of samples (default: 2000 for 2-D runs, 64 for images)")
    p.add_argument("--eps", type=_positive_float, default=1e-3, help="final time")
    p.add_argument("--time-grid", choices=("uniform", "quadratic", "log_snr", "karras", "calibrated"), default="uniform",
                   help="time grid of fixed-step solvers (log_snr suits dpm_solver, ddim and lms at few steps; "
                        "calibrated: fitted to this model and solver first, see --calibration-pilot)")
    p.add_argument("--calibration-pilot", type=_positive_int, default=256,
                   help="--time-grid calibrated: prior draws the grid is fitted on (3/4) and checked on (1/4)")
    p.add_argument("--calibration-evals", type=_positive_int, default=300,
                   help="--time-grid calibrated: solver runs of the search")
    p.add_argument("--denoise", action=argparse.BooleanOptionalAction, default=False,
                   help="finish with a noise-free denoising step to t=0 (one more NFE)")
    p.add_argument("--batch-size", type=_positive_int, default=500,
                   help=f"samples per chunk; {_CHUNKS}")
    p.add_argument("--classes", type=_nonneg_int, nargs="+", metavar="K",
                   help="class-conditional runs: sample these classes, in equal consecutive blocks (default: unconditional)")
    p.add_argument("--guidance-scale", type=_finite_float, default=0.0,
                   help="classifier-free guidance weight w with --classes: (1+w) s(x,t,y) - w s(x,t,null); 0: conditional")
    p.add_argument("--out", type=_sample_path, metavar="FILE",
                   help="output .safetensors, .pt or .npy (default: RUN/samples_SOLVER_STEPS.safetensors)")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write a PNG beside --out")
    _common(p)

    # likelihood
    p = add("likelihood", "negative log-likelihood of data under a trained run (nats; bits/dim for digits)",
            cmd_likelihood)
    _run_options(p)
    p.add_argument("--data", choices=DATASETS, help="data set (default: the run's)")
    p.add_argument("--split", choices=("test", "train"), default="test",
                   help="test: held-out points (digits: the fixed test split); train: the training set")
    p.add_argument("--n", type=_nonneg_int, help="number of points (default: 1000 for 2-D sets, the whole split for "
                                                 "digits)")
    p.add_argument("--eps", type=_positive_float, help="start time of the ODE (default: the run's --t-eps)")
    p.add_argument("--trace", choices=("auto", "exact", "hutchinson"), default="auto",
                   help="divergence estimator (auto: exact up to 16 dimensions)")
    p.add_argument("--rtol", type=_positive_float, default=1e-5, help="ODE relative tolerance")
    p.add_argument("--atol", type=_positive_float, default=1e-5, help="ODE absolute tolerance")
    p.add_argument("--batch-size", type=_positive_int, default=500,
                   help=f"points per chunk (one ODE solve); {_CHUNKS}")
    p.add_argument("--bound", action=argparse.BooleanOptionalAction, default=True, help="also the ELBO upper bound")
    p.add_argument("--bound-times", type=_positive_int, default=64, help="Monte Carlo times per point of the bound")
    p.add_argument("--float64", action="store_true", help="compute in float64")
    p.add_argument("--out", metavar="FILE", help="JSON results (default: RUN/likelihood_DATA_SPLIT.json)")
    _common(p)

    # bench
    p = add("bench", "compare solvers: the benchmark scripts of a source checkout, or a quick built-in comparison",
            cmd_bench)
    p.add_argument("--quick", action="store_true",
                   help="run the built-in comparison on an analytic 2-D mixture with the exact score instead")
    p.add_argument("--script", choices=("accuracy_per_nfe", "overhead"), help="run only this benchmark script")
    p.add_argument("script_args", nargs="*", metavar="-- ARGS", help="arguments passed to the benchmark scripts")
    g = p.add_argument_group("built-in comparison (--quick)")
    g.add_argument("--n", type=_positive_int, default=2000, help="samples per solver")
    g.add_argument("--out", default="sdediff-bench", help="output folder")
    g.add_argument("--float64", action="store_true", help="sample in float64")
    g.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write samples.png")
    _sde_options(g)
    _common(p, device="cpu")
    return parser, subs


def build_parser() -> argparse.ArgumentParser:
    """The ``sdediff`` argument parser (``--config`` files are applied by :func:`main`)."""
    return _build()[0]


def _parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser, subs = _build()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `torchrun -m sdediff -- sample ...`: the "--" keeps torchrun from parsing our options
        argv = argv[1:]
    args = parser.parse_args(argv)
    command = subs[args.command]
    if getattr(args, "config", None):
        try:
            values = config_defaults(command, load_toml(args.config), args.command, subs, source=args.config)
        except ConfigError as err:
            command.error(str(err))
        command.set_defaults(**values)
        args = parser.parse_args(argv)  # flags given on the command line override the file
    return args, command


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sdediff`` console script; returns the exit status.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success, 2 for bad arguments (with a message on stderr), 1 for runtime failures such as a
        missing or damaged checkpoint, 130 when interrupted.
    """
    from .training import CheckpointError

    command = None
    try:
        args, command = _parse(argv)
        return int(args.func(args) or 0)
    except SystemExit as exit_:  # argparse errors (2), --help and --version (0)
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except CLIError as err:
        try:
            command.error(str(err))
        except SystemExit as exit_:
            return int(exit_.code)
    except (CheckpointError, FileNotFoundError, ImportError, ConfigError, DistributedError) as err:
        print(f"sdediff: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sdediff: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
