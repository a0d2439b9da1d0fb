"""The ``sdediff`` command line.

``sdediff demo`` samples an analytic 2-D Gaussian mixture (whose score and density are exact at every
time) with several solvers, checks them against exact samples and the exact likelihood, prints a
table and writes it, the metrics and a scatter plot to an output folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import __version__
from ._io import atomic_write
from .data import GaussianMixture
from .likelihood import log_likelihood
from .metrics import noise_floor, sliced_wasserstein
from .sampling import sample
from .sdes import VESDE, VPSDE, SubVPSDE

SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}
DEMO_SOLVERS: list[tuple[str, int, dict[str, Any]]] = [
    ("euler_maruyama", 500, {}),
    ("pc", 500, {"snr": 0.16}),
    ("heun", 50, {}),
    ("ode", 1, {"rtol": 1e-5, "atol": 1e-5}),
]


def _markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(str(row[key]) for key, _ in columns) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def _scatter(path: Path, exact: torch.Tensor, samples: dict[str, torch.Tensor]) -> bool:
    """Side-by-side scatter plots of exact and sampled points; ``False`` when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = {"exact p_eps": exact, **samples}
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), sharex=True, sharey=True)
    for ax, (title, pts) in zip(axes, panels.items(), strict=True):
        pts = pts[:2000].cpu()
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5, color="black" if title.startswith("exact") else "C0")
        ax.set_title(title, fontsize=10)
        ax.set_aspect("equal")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def demo(args: argparse.Namespace) -> int:
    """Run the demo; returns the process exit code."""
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = torch.float64 if args.float64 else torch.float32
    sde = SDES[args.sde]()
    gm = GaussianMixture.ring(num_components=8, radius=4.0, std=0.35)
    eps = 1e-3
    exact = gm.marginal(sde, eps)
    score = gm.score_fn(sde)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    print(f"sdediff {__version__} demo: {args.n} samples of an 8-component 2-D Gaussian mixture under {sde!r}, "
          f"exact score; device={device}, dtype={dtype}" + (f", torch threads={args.threads}" if device.type == "cpu"
                                                            else ""))

    ref = exact.sample(args.n, generator=gen, device=device, dtype=dtype)
    floor = noise_floor(lambda k, generator: exact.sample(k, generator=generator, device=device, dtype=dtype),
                        args.n, repeats=8, generator=gen)
    expected_lp = exact.log_prob(exact.sample(100_000, generator=gen, device=device, dtype=torch.float64)).mean()
    x_T = sde.prior_sample((args.n, 2), generator=gen, device=device, dtype=dtype)  # shared by all solvers

    rows, samples = [], {}
    for solver, steps, options in DEMO_SOLVERS:
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
    atomic_write(out / "metrics.json", json.dumps({"sde": repr(sde), "n": args.n, "seed": args.seed, "eps": eps,
                                                   "solvers": rows, "likelihood": likelihood}, indent=2))
    atomic_write(out / "table.md", table + "\n\n" + lik_line + "\n")
    written = [out / "metrics.json", out / "table.md"]
    if not args.no_plot and _scatter(out / "samples.png", ref, samples):
        written.append(out / "samples.png")
    print()
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdediff", description="Continuous-time diffusion models in PyTorch.")
    parser.add_argument("--version", action="version", version=f"sdediff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="sample an analytic 2-D mixture with several solvers and check them",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="sdediff-demo", help="output folder (default: ./sdediff-demo)")
    p.add_argument("--n", type=int, default=4000, help="number of samples per solver (default: 4000)")
    p.add_argument("--sde", choices=sorted(SDES), default="vp", help="forward SDE (default: vp)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default: 1, fastest for small ops)")
    p.add_argument("--float64", action="store_true", help="sample in float64 (default: float32)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.add_argument("--no-plot", action="store_true", help="do not write samples.png")
    p.set_defaults(func=demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sdediff`` console script."""
    args = build_parser().parse_args(argv)
    if getattr(args, "n", 1) < 16:
        print("sdediff: error: --n must be at least 16", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
