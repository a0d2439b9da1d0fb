"""The ``sdediff`` argument parser: one sub-command per module of :mod:`sdediff.cli`, argument types that reject
bad values with a clear message, and ``--config`` files applied as defaults (see :mod:`sdediff.config`)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import ConfigError, config_defaults, load_toml
from ..data.images import RESIZE_MODES
from ..data.toy import TOY_DATASETS
from ..likelihood.engine import AUTO_EXACT_MAX_DIM, TRACES
from ..score import PREDICTIONS
from ..solvers import available_solvers, get_solver
from . import bench, demo, likelihood, sample, train
from .common import DATASETS, SDES

CHUNKS = ("each chunk draws its random numbers from a generator seeded by (--seed, chunk index), and under torchrun "
          "the chunks are shared out round-robin among the processes, so results do not depend on their number")


# --- argument types -------------------------------------------------------------------------------------
def checked(cast: Callable[[str], Any], ok: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
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


positive_int = checked(int, lambda v: v >= 1, "a positive integer")
nonneg_int = checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = checked(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
nonneg_float = checked(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")
finite_float = checked(float, math.isfinite, "a finite number")


def unit_float(text: str) -> float:
    """A number in ``[0, 1)`` (decays, probabilities)."""
    value = nonneg_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


def solver_name(text: str) -> str:
    """A registered solver name, or a family's ``FAMILY:VALUE`` (``torchsde:srk``) that builds."""
    try:
        with warnings.catch_warnings():  # a solver that warns when built (torchsde:reversible_heun) warns when used
            warnings.simplefilter("ignore")
            get_solver(text)
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def key_value(text: str) -> tuple[str, Any]:
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


def sample_path(text: str) -> Path:
    """An output file ending in ``.safetensors``, ``.pt`` or ``.npy``."""
    path = Path(text)
    if path.suffix.lower() not in (".safetensors", ".pt", ".npy"):
        raise argparse.ArgumentTypeError(f"the output file must end in .safetensors, .pt or .npy, got {text!r}")
    return path


# --- shared option groups -------------------------------------------------------------------------------
class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps descriptions as written and shows each option's default (except ``None``)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action, argparse._HelpAction):
            return action.help
        return super()._get_help_string(action)


def add_common(p: argparse.ArgumentParser, device: str | None = "auto") -> None:
    p.add_argument("--config", metavar="FILE.toml", help="read options from a TOML file whose keys are this command's "
                   "long flags (flags given here override it)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed")
    p.add_argument("--device", default=device, help="torch device: cpu, cuda, cuda:1 or auto (cuda when available)")
    p.add_argument("--threads", type=nonneg_int, default=0,
                   help="torch CPU threads (0: one thread for 2-D work on the CPU, where it is fastest; torch's "
                        "default otherwise)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress bars")
    p.add_argument("--debug", action="store_true", help="on an error, show the Python traceback too")


def add_sde_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sde", choices=sorted(SDES), default="vp", help="forward SDE")
    p.add_argument("--beta-min", type=positive_float, default=0.1, help="VP / sub-VP beta(0)")
    p.add_argument("--beta-max", type=positive_float, default=20.0, help="VP / sub-VP beta(1)")
    p.add_argument("--sigma-min", type=positive_float, default=0.01, help="VE smallest noise level")
    p.add_argument("--sigma-max", type=positive_float, default=50.0, help="VE largest noise level")


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", metavar="DIR", help="run folder written by 'sdediff train' (or the demo's folder)")
    p.add_argument("--checkpoint", metavar="FILE", help="checkpoint to use (default: the newest valid one in --run)")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights")


EPILOGS = {
    "train": """examples:
  sdediff train --data moons --out runs/moons
  sdediff train --data checkerboard --sde subvp --steps 8000 --out runs/cb
  sdediff train --data digits --out runs/digits --device cuda
  sdediff train --config runs/moons/config.toml --steps 8000 --resume   # continue to 8000 steps
  sdediff train --data photos/ --image-size 32 --hflip --out runs/photos   # a folder of images
  sdediff train --data x.npy --out runs/x                                  # an array (N, ...)
  sdediff train --data torchvision:CIFAR10 --data-root ~/data --class-cond --out runs/cifar

Your own data goes through sdediff.data.load: images are 8-bit (levels 0-255 mapped to [-1, 1] and
dequantised uniformly each batch), float arrays map their training split's [min, max] onto [-1, 1],
integer arrays keep their levels. --split of the data (default 0.1) is held out, drawn with --seed;
run.json records the source, value map and split (split.safetensors holds its indices), so sample and
likelihood --run read the same held-out data again and report in the data's own units. A UNet
(sdediff.training.models.unet_config for the image size) is used for (C, H, W) samples, an MLP for
any other shape. Labelled images also get a small feature classifier (classifier.safetensors) that
sdediff sample uses to score samples; its distances are not FID.

defaults that depend on the data (2-D sets and arrays / images): --steps 4000 / 2500, --batch-size 512 / 128,
--lr 2e-3 / 1e-3, --warmup-steps 100 / 200, --ema-decay 0.995 / 0.999, --weighting simple /
likelihood, --t-sampling uniform / importance, --eval-samples 2000 / 64, --eval-nll-points 256 / 64
(the digits values are those of benchmarks/digits_nll.py; they apply to all (C, H, W) data). The run
folder gets ckpt_*.safetensors,
metrics.json (config, losses, evaluations), run.json, config.toml and samples.png.""",
    "sample": """examples:
  sdediff sample --run runs/moons --solver pc --steps 500 --solver-option snr=0.16 --n 4000
  sdediff sample --run runs/moons --solver adaptive_ode --solver-option rtol=1e-4 --out moons.npy
  sdediff sample --run runs/digits --solver heun --steps 100 --n 64 --denoise
  torchrun --nproc_per_node=4 -m sdediff -- sample --run runs/digits --n 50000 --batch-size 1000 --device cuda
      # shared out among 4 processes: the same samples as one process writes (docs/distributed.md)

Writes the samples (.safetensors with key "samples", .pt or .npy), a PNG (scatter plot next to
held-out data for 2-D sets, an image grid for digits and images) and a JSON sidecar with NFE and timings.
Samples of array data are saved in the data's own units; images (and the digits) on the model's
[-1, 1], with the PNG grid in their own 8-bit levels (one row per class with --classes). A run with a
feature classifier also gets, in its features, the Frechet and kernel distances of the samples to the
held-out images, the classifier score, class balance and confidence, next to the same numbers for
training images against the held-out ones (the floor). These are NOT FID/KID/IS: the classifier is
trained on the run's own data. --fid computes FID with pytorch-fid where it and its Inception weights
are installed (never downloaded).""",
    "likelihood": """examples:
  sdediff likelihood --run runs/moons --n 2000
  sdediff likelihood --run runs/digits --split test        # NLL in nats and bits/dim
  torchrun --nproc_per_node=4 -m sdediff -- likelihood --run runs/digits --batch-size 64   # same result, 4 processes

  sdediff likelihood --run runs/photos --n 200              # bits/dim of held-out images

Digits are dequantised uniformly (17 grey levels mapped to [-1, 1]); bits/dim follow
sdediff.data.digits.digits_bits_per_dim. For the gaussian_mixture set the true NLL is printed too.
Runs on your own data read the recorded held-out split again (--split train: the training split):
quantised data (images, integer arrays) are dequantised uniformly at their own number of levels and
scored in bits/dim; continuous arrays in nats of the data's own units, which adds the value map's
log-Jacobian, -log p_y(y) = -log p_x(x) + D log s (s: data units per model unit).""",
    "bench": """examples:
  sdediff bench                          # 2000 samples per solver: 7.5 s wall on one CPU thread (2-core box)
  sdediff bench --sde ve --float64 --n 8000
  sdediff bench --run runs/moons-vp --save-grids   # your model: which solver and grid per NFE budget

Solvers: euler_maruyama (500 steps), pc (500 steps, snr 0.16), heun (50 steps), ode (adaptive, rtol =
atol = 1e-5), all from the same prior draws; each against exact samples of p_eps (sliced W2 next to
its noise floor), the exact log-density and the mixture weights. Then the exact likelihood of 256
exact points through the probability-flow ODE. The same comparison on your own model or solvers:
sdediff.compare.compare_solvers (docs/compare_solvers.md).

With --run RUN: from the same prior draws, a tight reference solve, then every deterministic solver on
every standard grid and a calibrated grid at each --budgets NFE (pathwise error, wall time, sliced W2
to held-out data for the toy sets) and the stochastic solvers (sliced W2 next to the reference ODE
samples and the data floor); prints the recommended solver and grid per budget and writes table.md,
metrics.json and error_vs_nfe.png into RUN/bench (sdediff.compare_model.compare_on_model). The benchmark scripts against other
libraries are run from a source checkout: python benchmarks/accuracy_per_nfe.py (benchmarks/README.md).""",
    "demo": """The demo trains for about a minute on one CPU thread, then samples, scores and plots;
'sdediff demo --steps 200 --n 1000' is a quick smoke run (which will not meet the target).""",
}


# --- the parser -----------------------------------------------------------------------------------------
def build() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser and its sub-command parsers by name."""
    from . import __doc__ as description

    parser = argparse.ArgumentParser(prog="sdediff", description=description, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"sdediff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    subs: dict[str, argparse.ArgumentParser] = {}

    def add(name: str, help: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=textwrap.fill(help[0].upper() + help[1:] + ".", 100),
                           epilog=EPILOGS.get(name), formatter_class=HelpFormatter)
        p.set_defaults(func=func)
        subs[name] = p
        return p

    # demo
    p = add("demo", "train a small score model on a 2-D toy set, sample it with an SDE, a predictor-corrector and "
                    "an adaptive ODE solver, check sliced-W2 against the noise floor and the NLL, and write the "
                    "results to the --out folder",
            demo.run)
    p.add_argument("--out", default="sdediff-demo", help="output folder")
    p.add_argument("--data", choices=TOY_DATASETS, default="gaussian_mixture",
                   help="2-D toy set (gaussian_mixture has an exact density, so the true NLL is shown)")
    p.add_argument("--steps", type=positive_int, default=4000, help="training steps")
    p.add_argument("--batch-size", type=positive_int, default=512, help="training batch size")
    p.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate (cosine schedule)")
    p.add_argument("--ema-decay", type=unit_float, default=0.995, help="EMA decay of the weights used to sample")
    p.add_argument("--hidden", type=positive_int, default=128, help="MLP width")
    p.add_argument("--depth", type=positive_int, default=3, help="MLP residual blocks")
    p.add_argument("--n-train", type=positive_int, default=20_000, help="training points")
    p.add_argument("--n", type=positive_int, default=8000, help="samples per solver")
    p.add_argument("--splits", type=positive_int, default=4,
                   help="sliced-W2 is averaged over this many splits of the samples, each against its own "
                        "held-out set")
    p.add_argument("--nll-points", type=positive_int, default=1000, help="held-out points whose NLL is computed")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write samples.png")
    p.add_argument("--check", action="store_true", help="exit with status 1 when a sampler misses the target")
    add_common(p, device="cpu")

    # train
    p = add("train", "train a score network on your own data (a folder of images, an .npy/.npz array, a "
                     "torchvision set on disk, mnist) or a built-in set (the 2-D toy sets, the 8x8 digits) into a "
                     "run folder", train.run)
    p.add_argument("--data", default="moons", metavar="PATH|NAME",
                   help=f"training data: a folder of PNG/JPEG images (class subfolders give labels), an .npy/.npz "
                        f"array (N, ...), torchvision:NAME (with --data-root), mnist, or one of {', '.join(DATASETS)}")
    p.add_argument("--out", metavar="DIR", help="run folder (default: runs/DATA-SDE)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    add_sde_options(p)
    p.add_argument("--n-train", type=positive_int, default=20_000, help="training points drawn from a 2-D toy set")
    g = p.add_argument_group("your own data (not the toy sets or digits)")
    g.add_argument("--image-size", type=positive_int, metavar="N", help="make every image N x N (default: keep the "
                   "images' common size; needed when their sizes differ)")
    g.add_argument("--resize", choices=RESIZE_MODES, default="center_crop",
                   help="with --image-size: center_crop cuts the largest centred square and resizes it (keeps the "
                        "aspect ratio); resize stretches the whole image")
    g.add_argument("--data-root", metavar="DIR", help="folder holding the torchvision:NAME set (never downloaded)")
    g.add_argument("--split", type=unit_float, help="held-out fraction, drawn with --seed and saved with the run "
                   "(default 0.1)")
    g.add_argument("--hflip", action="store_true", help="flip training images left-right at random (each batch, "
                   "after dequantisation)")
    g.add_argument("--classifier-steps", type=nonneg_int, default=500, help="labelled images: steps of the small "
                   "feature classifier saved in the run, which sdediff sample scores samples with (not FID; 0: none)")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=("auto", "mlp", "unet"), default="auto", help="network (auto: MLP for 2-D "
                   "data, UNet for images)")
    g.add_argument("--hidden", type=positive_int, default=128, help="MLP width")
    g.add_argument("--depth", type=positive_int, default=3, help="MLP residual blocks")
    g.add_argument("--base-channels", type=positive_int, help="UNet channels at the first level (default: 32 for "
                   "digits; for other images, sdediff.training.models.unet_config's choice for their size)")
    g.add_argument("--channel-mults", type=positive_int, nargs="+", help="UNet channel multipliers (default: 1 2 "
                   "for digits, unet_config's for other images)")
    g.add_argument("--num-res-blocks", type=positive_int, help="UNet residual blocks per level (default 1)")
    g.add_argument("--class-cond", action="store_true", help="class-conditional model on the data's labels (class "
                   "subfolders, an .npz's 'y', torchvision or mnist labels; digits 0-9; moons 0-1, checkerboard 0-7, rings "
                   "0-3, gaussian_mixture 0-7), trained with condition dropout "
                   "for classifier-free guidance (sample with --classes, --guidance-scale)")
    g.add_argument("--cond-drop-prob", type=unit_float, default=0.1,
                   help="with --class-cond: probability of replacing a label by the null token")
    g.add_argument("--time-embed", choices=("fourier", "sinusoidal"), help="time embedding (default: fourier for "
                   "the MLP, sinusoidal for the UNet)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=positive_int, help="training steps (default: 4000 for 2-D sets and arrays, 2500 for images)")
    g.add_argument("--batch-size", type=positive_int, help="batch size (default: 512 for 2-D sets and arrays, 128 for images)")
    g.add_argument("--lr", type=positive_float, help="peak learning rate (default: 2e-3 for 2-D sets and arrays, 1e-3 "
                   "for images)")
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), default="cosine", help="after the warm-up")
    g.add_argument("--warmup-steps", type=nonneg_int, help="linear learning-rate warm-up (default: 100 for 2-D "
                   "sets and arrays, 200 for images)")
    g.add_argument("--weight-decay", type=nonneg_float, default=0.0, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=nonneg_float, default=1.0, help="gradient-norm clipping (0: none)")
    g.add_argument("--ema-decay", type=unit_float, help="EMA decay (default: 0.995 for 2-D sets and arrays, 0.999 for images)")
    g.add_argument("--amp", action="store_true", help="mixed precision on CUDA")
    g = p.add_argument_group("loss")
    g.add_argument("--prediction", choices=PREDICTIONS, default="eps", help="what the network predicts")
    g.add_argument("--weighting", choices=("simple", "likelihood"), help="DSM loss weighting (default: simple for "
                   "2-D sets and arrays, likelihood for images)")
    g.add_argument("--t-sampling", choices=("uniform", "importance"), help="how training times are drawn (default: "
                   "uniform for 2-D sets and arrays, importance for images)")
    g.add_argument("--t-eps", type=positive_float, default=1e-5, help="smallest training time")
    g = p.add_argument_group("logging, evaluation and checkpoints")
    g.add_argument("--log-every", type=positive_int, default=100, help="steps between loss log entries")
    g.add_argument("--eval-every", type=nonneg_int, default=0, help="steps between evaluations (0: only at the end)")
    g.add_argument("--eval-samples", type=nonneg_int, help="samples drawn at each evaluation and plotted "
                   "(default: 2000 for 2-D sets and arrays, 64 for images; 0: none)")
    g.add_argument("--eval-solver", type=solver_name, default="heun", help="solver of the evaluation samples")
    g.add_argument("--eval-sample-steps", type=positive_int, default=50, help="its steps")
    g.add_argument("--eval-nll-points", type=nonneg_int, help="held-out points of the evaluation NLL "
                   "(default: 256 for 2-D sets and arrays, 64 for images; 0: none)")
    g.add_argument("--ckpt-every", type=nonneg_int, default=1000, help="steps between checkpoints (0: only the last)")
    g.add_argument("--keep-checkpoints", type=nonneg_int, default=3, help="periodic checkpoints kept (0: all)")
    g.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write samples.png")
    add_common(p)

    # sample
    p = add("sample", "draw samples from a trained run with any solver", sample.run)
    add_run_options(p)
    p.add_argument("--solver", type=solver_name, default="heun", help=f"solver: {', '.join(available_solvers())}")
    p.add_argument("--steps", type=positive_int, default=100, help="time steps (ignored by adaptive solvers)")
    p.add_argument("--solver-option", type=key_value, action="append", metavar="KEY=VALUE",
                   help="solver option, repeatable (e.g. snr=0.16, rtol=1e-4, order=3)")
    p.add_argument("--n", type=positive_int, help="number of samples (default: 2000 for 2-D runs, 64 for images)")
    p.add_argument("--eps", type=positive_float, default=1e-3, help="final time")
    p.add_argument("--time-grid", choices=("uniform", "quadratic", "log_snr", "karras", "calibrated"), default="uniform",
                   help="time grid of fixed-step solvers (log_snr suits dpm_solver, ddim and lms at few steps; "
                        "calibrated: fitted to this model and solver first, see --calibration-pilot)")
    p.add_argument("--calibration-pilot", type=positive_int, default=256,
                   help="--time-grid calibrated: prior draws the grid is fitted on (3/4) and checked on (1/4)")
    p.add_argument("--calibration-evals", type=positive_int, default=300,
                   help="--time-grid calibrated: solver runs of the search")
    p.add_argument("--denoise", action=argparse.BooleanOptionalAction, default=False,
                   help="finish with a noise-free denoising step to t=0 (one more NFE)")
    p.add_argument("--batch-size", type=positive_int, default=500, help=f"samples per chunk; {CHUNKS}")
    p.add_argument("--classes", type=nonneg_int, nargs="+", metavar="K",
                   help="class-conditional runs: sample these classes, in equal consecutive blocks (default: unconditional)")
    p.add_argument("--guidance-scale", type=finite_float, default=0.0,
                   help="classifier-free guidance weight w with --classes: (1+w) s(x,t,y) - w s(x,t,null); 0: conditional")
    p.add_argument("--out", type=sample_path, metavar="FILE",
                   help="output .safetensors, .pt or .npy (default: RUN/samples_SOLVER_STEPS.safetensors); "
                        ".safetensors and .npy are written chunk by chunk as the samples are drawn")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out and the .json and .png beside it if they exist (else it is an error)")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True,
                   help="write a PNG beside --out (2-D points, or the first 64 images; with --classes, one row per "
                        "class)")
    p.add_argument("--fid", action="store_true", help="runs on 8-bit images: also FID to the held-out images with "
                   "pytorch-fid's Inception network, where pytorch-fid and its weights are installed (nothing is "
                   "downloaded; an error otherwise). The default feature scores of a run with a classifier are not FID")
    add_common(p)

    # likelihood
    p = add("likelihood", "negative log-likelihood of data under a trained run (nats; bits/dim for digits, images and "
                          "other quantised data)", likelihood.run)
    add_run_options(p)
    p.add_argument("--data", choices=DATASETS, help="data set (default: the run's)")
    p.add_argument("--split", choices=("test", "train"), default="test",
                   help="test: held-out points (digits: the fixed test split; your own data: the recorded held-out "
                        "split); train: the training set")
    p.add_argument("--n", type=positive_int, help="number of points (default: 1000 for 2-D sets, the whole split for "
                                                 "digits, up to 1000 of the split for your own data)")
    p.add_argument("--eps", type=positive_float, help="start time of the ODE (default: the run's --t-eps)")
    p.add_argument("--trace", choices=TRACES, default="auto",
                   help=f"divergence estimator (auto: exact up to {AUTO_EXACT_MAX_DIM} dimensions)")
    p.add_argument("--tol", type=positive_float, help="accuracy of each log-density in nats (default 1e-4 with the "
                                                       "exact trace, 3e-4 per dimension with Hutchinson's; only "
                                                       "--rtol/--atol when given)")
    p.add_argument("--rtol", type=positive_float, help="also a relative tolerance on the latent (with --atol)")
    p.add_argument("--atol", type=positive_float, help="also an absolute tolerance on the latent (with --rtol)")
    p.add_argument("--probes", type=positive_int, default=1, help="Hutchinson probes per evaluation (2 or more: "
                                                                 "each point's probe standard error)")
    p.add_argument("--batch-size", type=positive_int, default=500, help=f"points per chunk (one ODE solve); {CHUNKS}")
    p.add_argument("--bound", action=argparse.BooleanOptionalAction, default=True, help="also the ELBO upper bound")
    p.add_argument("--bound-times", type=positive_int, default=64, help="Monte Carlo times per point of the bound")
    p.add_argument("--float64", action="store_true", help="compute in float64")
    p.add_argument("--out", metavar="FILE", help="JSON results (default: RUN/likelihood_DATA_SPLIT.json)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (else it is an error)")
    add_common(p)

    # bench
    p = add("bench", "compare solvers on an analytic 2-D Gaussian mixture with its exact score: sliced W2 to exact "
                     "samples next to the noise floor, log-density gap, mode weights, NFE and time, and the exact "
                     "ODE likelihood; with --run, which solver and time grid suit that trained model per NFE budget",
            bench.run)
    p.add_argument("--quick", action="store_true",
                   help="accepted for compatibility: the built-in comparison is what bench runs")
    p.add_argument("--n", type=positive_int, help="samples per solver (default: 2000; 512 prior draws with --run)")
    p.add_argument("--out", help="output folder (default: sdediff-bench; RUN/bench with --run)")
    p.add_argument("--float64", action="store_true", help="sample in float64 (with --run: the network too)")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True,
                   help="write samples.png (error_vs_nfe.png with --run)")
    add_sde_options(p)
    g = p.add_argument_group("your own model (--run)")
    add_run_options(g)
    g.add_argument("--budgets", type=positive_int, nargs="+", default=[5, 10, 20, 50], metavar="NFE",
                   help="NFE budgets: every deterministic solver on every standard grid and a calibrated grid at each")
    g.add_argument("--eps", type=positive_float, default=1e-3, help="final time")
    g.add_argument("--reference-tol", type=positive_float,
                   help="rtol = atol of the reference solve (default 1e-5 in float32, 1e-8 in float64)")
    g.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                   help="fit a grid to the model for each budget's best solver")
    g.add_argument("--calibration-pilot", type=positive_int, default=256,
                   help="prior draws the grid is fitted on (3/4) and checked on (1/4)")
    g.add_argument("--calibration-evals", type=positive_int, default=200, help="solver runs of each calibration")
    g.add_argument("--save-grids", action="store_true",
                   help="save each budget's winning calibrated grid into the run (used by sample --time-grid calibrated)")
    add_common(p, device="cpu")
    return parser, subs


def build_parser() -> argparse.ArgumentParser:
    """The ``sdediff`` argument parser (``--config`` files are applied by :func:`parse`)."""
    return build()[0]


def parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """Parse ``argv`` (default ``sys.argv[1:]``) with the command's ``--config`` file as defaults; returns the
    arguments and the command's parser (which reports argument errors)."""
    parser, subs = build()
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
