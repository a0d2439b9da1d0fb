"""The sdediff command line.

Commands (sdediff COMMAND --help lists every option with its default):

  demo        Train a small MLP score model on a 2-D toy set (by default the 8-mode ring, whose
              density is known exactly), sample it with an SDE solver, a predictor-corrector
              sampler and an adaptive probability-flow ODE, compare each with held-out data in
              sliced-W2 next to the sampling-noise floor (target: at most twice the floor), compute
              the held-out NLL (exact ODE likelihood, ELBO bound, true value), and write
              samples.png, table.md, metrics.json and the checkpoints to ./sdediff-demo/.
  train       Train a score network on your own data (a folder of images, an .npy/.npz array, a
              torchvision set on disk, mnist) or a built-in set (2-D toy sets, 8x8 digits): a UNet for
              images, an MLP otherwise, into a run folder: checkpoints, metrics.json, run.json (with the
              data's record and split), config.toml (the options, reusable with --config) and
              samples.png from a final evaluation.
  sample      Draw samples from a run's checkpoint with any registered solver; write .safetensors,
              .pt or .npy plus a PNG (and, for labelled images, scores in a small classifier's
              features, which are not FID).
  likelihood  Negative log-likelihood of a data split through the probability-flow ODE (nats;
              bits/dim for quantised data such as images), the ELBO bound, and the true value where
              it is known.
  bench       Compare solvers on an analytic 2-D Gaussian mixture with its exact score (sliced-W2
              to exact samples next to the noise floor, log-density gap, mode weights, NFE, time)
              and check the exact ODE likelihood; runs from any installation.

Every command reads --config FILE.toml, whose keys are its long flags (see sdediff.config); flags
given on the command line override the file. Bad arguments exit with status 2, runtime failures
(a missing or damaged checkpoint) with status 1, each with one line that says what is wrong;
--debug adds the Python traceback.

Each command is a module of this package (sdediff.cli.train, .sample, .likelihood, .bench, .demo)
that reads its arguments, calls the library (sdediff.load_run, sdediff.sample, sdediff.log_likelihood,
sdediff.compare.compare_solvers, sdediff.training.Trainer) and writes the results.
"""

from __future__ import annotations

import errno
import sys
import traceback
import warnings
from collections.abc import Sequence

from ..config import ConfigError
from ..distributed import DistributedError
from ..training import CheckpointError
from .common import CLIError
from .parser import build_parser, parse

__all__ = ["main", "build_parser", "CLIError", "describe_error"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sdediff`` console script; returns the exit status.

    No error prints a Python traceback unless ``--debug`` is given: argument errors (argparse's, and arguments
    that parse but do not fit together, :class:`CLIError`) print the command's usage and one line and return 2;
    any other failure (a missing or damaged file, a failed computation) prints one line, ``sdediff: error: ...``,
    and returns 1.

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
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    command = None
    try:
        args, command = parse(argv)
        debug = debug or bool(getattr(args, "debug", False))
        with warnings.catch_warnings():
            if not debug:  # a warning is one line too, not the file and source line warnings.showwarning prints
                warnings.showwarning = _one_line_warning
            return int(args.func(args) or 0)
    except SystemExit as exit_:  # argparse errors (2), --help and --version (0)
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except CLIError as err:
        if debug:
            traceback.print_exc()
        try:
            command.error(str(err))
        except SystemExit as exit_:
            return int(exit_.code)
    except KeyboardInterrupt:
        print("sdediff: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place every failure is reported, as one line
        if debug:
            traceback.print_exc()
        print(f"sdediff: error: {describe_error(err)}" + ("" if debug else " (--debug shows the traceback)"),
              file=sys.stderr)
        return 1
    return 1


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"sdediff: warning: {message}", file=sys.stderr if file is None else file)


#: errors whose message says all there is to say (sdediff's own kinds, a missing file, a missing package)
KNOWN_ERRORS = (CheckpointError, ConfigError, DistributedError, FileNotFoundError, ImportError)


def describe_error(err: BaseException) -> str:
    """One line about ``err``: its message (the first line of it), prefixed by its type unless it is one of
    :data:`KNOWN_ERRORS`, with what to do for a few kinds (a full disk, a missing permission, memory)."""
    lines = str(err).strip().splitlines()
    text = lines[0] + (" ..." if len(lines) > 1 else "") if lines else type(err).__name__
    if not isinstance(err, KNOWN_ERRORS):
        text = f"{type(err).__name__}: {text}"
    if isinstance(err, PermissionError):
        text += "; choose a place you may write to"
    elif isinstance(err, OSError) and err.errno == errno.ENOSPC:
        text += "; free some disk space"
    elif isinstance(err, MemoryError) or "out of memory" in text.lower():
        text += "; use a smaller --batch-size or --n"
    return text
