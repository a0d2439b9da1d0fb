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
  bench       Compare solvers on an analytic 2-D Gaussian mixture with its exact score (sliced-W2
              to exact samples next to the noise floor, log-density gap, mode weights, NFE, time)
              and check the exact ODE likelihood; runs from any installation.

Every command reads --config FILE.toml, whose keys are its long flags (see sdediff.config); flags
given on the command line override the file. Bad arguments exit with status 2, runtime failures
(a missing or damaged checkpoint) with status 1.

Each command is a module of this package (sdediff.cli.train, .sample, .likelihood, .bench, .demo)
that reads its arguments, calls the library (sdediff.load_run, sdediff.sample, sdediff.log_likelihood,
sdediff.compare.compare_solvers, sdediff.training.Trainer) and writes the results.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..config import ConfigError
from ..distributed import DistributedError
from ..training import CheckpointError
from .common import CLIError
from .parser import build_parser, parse

__all__ = ["main", "build_parser", "CLIError"]


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
    command = None
    try:
        args, command = parse(argv)
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
