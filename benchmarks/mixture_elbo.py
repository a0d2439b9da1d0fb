"""The evidence bound next to the exact density and the ODE likelihood, with the exact score of a Gaussian mixture.

Data: the 8-Gaussian ring (``GaussianMixture.ring(8, radius=4, std=0.35)``), ``--n`` exact samples. For VP, sub-VP
and VE with the mixture's exact score, per sample: the exact :math:`-\\log p_0(x)`, the probability-flow ODE's
:math:`-\\log p_\\epsilon(x)` (:func:`sdediff.log_likelihood`, exact trace, dopri5 at 1e-5) and the bound
:func:`sdediff.elbo` (``--num-t`` importance-sampled times per sample), in nats. The bound must lie above the exact
value on average (cross-entropy >= entropy): the table reports the gap with its standard error. Writes
``mixture_elbo.{md,json}`` into ``--out``.

    python benchmarks/mixture_elbo.py        # about a minute on one CPU thread
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

import sdediff
from sdediff._io import atomic_write
from sdediff.data import GaussianMixture

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="exact samples scored")
    p.add_argument("--num-t", type=int, default=256, help="Monte Carlo times per sample for the bound")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS_DIR))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    command = "python benchmarks/mixture_elbo.py " + " ".join(sys.argv[1:] if argv is None else argv)
    env = f"sdediff {sdediff.__version__}, torch {torch.__version__}, cpu, python {platform.python_version()}"
    gm = GaussianMixture.ring(num_components=8, radius=4.0, std=0.35)
    x = gm.sample(args.n, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    exact = -gm.log_prob(x)
    rows = []
    for sde, eps in ((sdediff.VPSDE(), 1e-5), (sdediff.SubVPSDE(), 1e-5), (sdediff.VESDE(), 1e-3)):
        score = gm.score_fn(sde)
        tic = time.perf_counter()
        ode = -sdediff.log_likelihood(sde, score, x, eps=eps, trace="exact").log_prob
        ode_s = time.perf_counter() - tic
        tic = time.perf_counter()
        res = sdediff.elbo(sde, score, x, t_eps=eps, num_t=args.num_t,
                           generator=torch.Generator().manual_seed(args.seed + 1))
        bound_s = time.perf_counter() - tic
        gap = res.nats - exact
        rows.append({"sde": type(sde).__name__, "eps": eps, "exact": float(exact.mean()), "ode": float(ode.mean()),
                     "ode_minus_exact_max_abs": float((ode - exact).abs().max()), "bound": res.mean()[0],
                     "bound_se": res.mean()[1], "gap": float(gap.mean()), "gap_se": float(gap.std() / math.sqrt(args.n)),
                     "mc_se_per_sample": float(res.std_error.pow(2).mean().sqrt()),
                     "prior": float(res.prior.mean()), "diffusion": float(res.diffusion.mean()),
                     "reconstruction": float(res.reconstruction.mean()), "ode_seconds": ode_s, "bound_seconds": bound_s})
    lines = ["# ELBO vs exact density and ODE likelihood (Gaussian-mixture ring, exact score)", "", f"`{command}`  ", env,
             "", f"{args.n} exact samples; nats per sample; bound with {args.num_t} importance-sampled times per sample; "
             "± standard errors over samples (the bound's include its Monte Carlo noise).", "",
             "| SDE | t_eps | exact −log p₀ | ODE −log p_eps | ELBO bound | bound − exact | bound terms: prior, diffusion, "
             "reconstruction |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sde']} | {r['eps']:g} | {r['exact']:.4f} | {r['ode']:.4f} | {r['bound']:.4f} ± "
                     f"{r['bound_se']:.4f} | {r['gap']:+.4f} ± {r['gap_se']:.4f} | {r['prior']:.4f}, {r['diffusion']:.3f}, "
                     f"{r['reconstruction']:.3f} |")
    md = "\n".join(lines + [""])
    print(md)
    out = Path(args.out)
    atomic_write(out / "mixture_elbo.json", json.dumps({"command": command, "environment": env, "args": vars(args),
                                                        "rows": rows}, indent=1))
    atomic_write(out / "mixture_elbo.md", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
