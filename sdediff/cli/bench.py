"""``sdediff bench``: the built-in solver comparison, :func:`sdediff.compare.compare_solvers` on an analytic 2-D
Gaussian mixture with its exact score (so every error is the solver's), and :func:`sdediff.compare.compare_likelihood`
of the exact ODE likelihood; writes metrics.json, table.md and samples.png. It needs only the installed package;
the fuller benchmark scripts against other libraries are ``python benchmarks/NAME.py`` in a source checkout."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from .._io import atomic_write
from ..compare import DEFAULT_SOLVERS, ComparisonRow, compare_likelihood, compare_solvers
from ..data import GaussianMixture
from .common import add_plot, check_output_folder, make_sde, pick_device, print_written, scatter_png, set_threads, write_json

EPS = 1e-3  # final time of the solvers and start of the likelihood ODE
LIKELIHOOD_POINTS = 256  # at most this many reference points go through the exact likelihood


def bench_mixture() -> GaussianMixture:
    """The benchmark's data law: 8 isotropic components (std 0.35) on a circle of radius 4."""
    return GaussianMixture.ring(num_components=8, radius=4.0, std=0.35)


def run(args: argparse.Namespace) -> int:
    """``sdediff bench``: sample the analytic mixture with several solvers and check against exact samples."""
    device = pick_device(args.device)
    check_output_folder(args.out)  # before the comparison, so that a finished result is not lost
    threads = set_threads(args.threads, device, small=True)
    dtype = torch.float64 if args.float64 else torch.float32
    sde = make_sde(args)
    truth = bench_mixture()
    score = truth.score_fn(sde)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    print(f"sdediff {__version__} bench: {args.n} samples of an 8-component 2-D Gaussian mixture under {sde!r}, exact "
          f"score; device={device}, dtype={dtype}, {threads}")
    result = compare_solvers(sde, score, (2,), DEFAULT_SOLVERS, n=args.n, eps=EPS, truth=truth, generator=gen,
                             device=device, dtype=dtype, progress=args.progress)
    points = result.reference[:LIKELIHOOD_POINTS].double()
    lik = compare_likelihood(sde, score, truth, points, eps=EPS)
    likelihood = {"points": lik.points, "nfe": lik.nfe, "seconds": round(lik.seconds, 2),
                  "mean_log_prob": round(lik.mean_log_prob, 4), "mean_exact_log_prob": round(lik.mean_exact_log_prob, 4),
                  "max_abs_error_with_exact_prior": lik.max_abs_error_with_exact_prior}
    table = result.markdown()
    lik_line = (f"exact likelihood via the probability-flow ODE ({lik.points} points, float64, exact trace): "
                f"{lik.nfe} NFE, {likelihood['seconds']} s, mean log p = {likelihood['mean_log_prob']} "
                f"(exact {likelihood['mean_exact_log_prob']}); with the exact p_T at the latent, max error "
                f"{lik.max_abs_error_with_exact_prior:.1e} nats")
    print()
    print(table)
    print()
    print(lik_line)

    out = Path(args.out)
    write_json(out / "metrics.json", {"sde": repr(sde), "n": args.n, "seed": args.seed, "eps": EPS,
                                      "solvers": [_row_record(r) for r in result.rows], "likelihood": likelihood})
    atomic_write(out / "table.md", table + "\n\n" + lik_line + "\n")
    written: list[Path | None] = [out / "metrics.json", out / "table.md"]
    if args.plot:
        add_plot(written, scatter_png(out / "samples.png", {"exact p_eps": result.reference, **result.samples},
                                      reference="exact p_eps"))
    print()
    print_written(written)
    return 0


def _row_record(row: ComparisonRow) -> dict[str, Any]:
    """A row of metrics.json (the keys ``sdediff bench`` has always written, figures to 4 decimals)."""
    return {"solver": row.solver, "steps": "adaptive" if row.steps is None else row.steps, "nfe": row.nfe,
            "seconds": round(row.seconds, 2), "sliced_w2": _round(row.sliced_w2), "floor": _round(row.noise_floor),
            "logp_gap": _round(row.logp_gap), "logp_se": _round(row.logp_gap_se), "mode_err": _round(row.mode_error),
            "finite": row.finite}


def _round(x: float | None) -> float | None:
    return x if x is None or not math.isfinite(x) else round(x, 4)
