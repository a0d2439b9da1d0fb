"""Guidance against analytic truth on Gaussian data: how far each method lands from the exact target.

Every problem has an exact answer, and all scores are exact (:class:`sdediff.data.GaussianMixture`), so
the figures measure the guidance method and the solver, not a network.

1. **Classifier guidance** on a 4-component 2-D mixture with the exact noisy-class posterior
   :math:`p_t(k \\mid x)`: the fraction of samples assigned to the wanted component and the sliced-W2
   distance to exact samples of that component (next to the noise floor of exact samples) at scales 1 and 3.
2. **Reward guidance** on :math:`N(\\mu, \\Sigma)` with :math:`R(x) = a^\\top x`: the target is the tilted
   law :math:`N(\\mu + \\lambda\\Sigma a, \\Sigma)`; error of the sample mean and covariance with the full
   Jacobian and with the approximation :math:`\\nabla R(\\hat x_0)/m(t)`.
3. **Inpainting** of a correlated 4-D Gaussian (coordinates 0 and 2 observed): error of the imputed mean and
   covariance against the analytic conditional Gaussian, for replacement and reconstruction guidance
   (isotropic ΠGDM covariance, and the second-order Tweedie covariance).

Mean and covariance errors are Euclidean / Frobenius norms; "exact-sample error" is the same figure for
``n`` exact draws of the target (the sampling-noise floor, averaged over 8 repetitions).

Writes ``guidance_gaussian.{md,json}`` into ``--out`` (``--quick``: ``*_quick.*``).

    python benchmarks/guidance_gaussian.py           # about 1-2 min on one CPU thread
    python benchmarks/guidance_gaussian.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import sdediff
from sdediff._io import atomic_write
from sdediff.data import GaussianMixture, skewed_mixture
from sdediff.guidance import classifier_guided, inpaint, reward_guided
from sdediff.metrics import noise_floor, sliced_wasserstein

RESULTS_DIR = Path(__file__).resolve().parent / "results"
T64 = torch.float64
EPS = 1e-3
MIXTURE = skewed_mixture()
REWARD_MU = torch.tensor([1.0, -0.5], dtype=T64)
REWARD_COV = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=T64)
REWARD_A = torch.tensor([1.0, -1.0], dtype=T64)
_L = torch.tensor([[1.0, 0.9, 0.7, 0.3], [0, 0.5, 0.4, 0.2], [0, 0, 0.4, 0.3], [0, 0, 0, 0.3]], dtype=T64)
INPAINT_MU = torch.tensor([1.0, -0.5, 0.5, 0.0], dtype=T64)
INPAINT_COV = _L.T @ _L
MASK = torch.tensor([True, False, True, False])
OBSERVED = torch.tensor([2.0, 0.0, -0.5, 0.0], dtype=T64)
SOLVERS = [("euler_maruyama", 500), ("heun", 100)]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def moment_errors(x: Tensor, mean: Tensor, cov: Tensor) -> tuple[float, float]:
    return float((x.mean(0) - mean).norm()), float((torch.cov(x.T) - cov).norm())


def exact_errors(mean: Tensor, cov: Tensor, n: int, repeats: int = 8) -> tuple[float, float]:
    """Mean / covariance errors of ``n`` exact draws of N(mean, cov), averaged over ``repeats``."""
    target = torch.distributions.MultivariateNormal(mean, cov)
    errs = [moment_errors(target.sample((n,)), mean, cov) for _ in range(repeats)]
    return sum(e[0] for e in errs) / repeats, sum(e[1] for e in errs) / repeats


def component(k: int) -> GaussianMixture:
    return GaussianMixture([1.0], MIXTURE.means[k:k + 1], MIXTURE.covs[k:k + 1])


def classifier_rows(n: int, log) -> list[dict[str, Any]]:
    sde, k = sdediff.VPSDE(), 2
    comp, log_w = component(k), math.log(float(MIXTURE.weights[k]))

    def log_prob_fn(x, t):  # exact log p_t(k | x)
        return log_w + comp.log_prob(x, sde, t) - MIXTURE.log_prob(x, sde, t)

    exact = comp.marginal(sde, EPS)
    ref = exact.sample(n, generator=gen(1), dtype=T64)
    floor = float(noise_floor(lambda m, generator: exact.sample(m, generator=generator, dtype=T64), n, repeats=8,
                              generator=gen(2)).mean())
    rows = []
    for scale in (1.0, 3.0):
        for solver, steps in SOLVERS:
            guided = classifier_guided(MIXTURE.score_fn(sde), log_prob_fn, scale)
            x = sdediff.sample(sde, guided, (n, 2), solver=solver, steps=steps, eps=EPS, generator=gen(3), dtype=T64)
            assigned = float((MIXTURE.component_posterior(x, EPS, sde).argmax(1) == k).double().mean())
            sw = float(sliced_wasserstein(x, ref, generator=gen(4)))
            rows.append({"scale": scale, "solver": solver, "steps": steps, "assigned": assigned, "sliced_w2": sw,
                         "noise_floor": floor})
            log(f"  classifier w={scale:g} {solver}: assigned {100 * assigned:.2f}%, SW2 {sw:.4f} (floor {floor:.4f})")
    return rows


def reward_rows(n: int, log) -> list[dict[str, Any]]:
    gauss = GaussianMixture([1.0], REWARD_MU[None], REWARD_COV[None])
    rows = []
    for name, sde in (("vp", sdediff.VPSDE()), ("ve", sdediff.VESDE())):
        for lam in (0.5, 1.5):
            mean = REWARD_MU + lam * REWARD_COV @ REWARD_A
            floor = exact_errors(mean, REWARD_COV, n)
            for jacobian in ("full", "approx"):
                for solver, steps in SOLVERS:
                    guided = reward_guided(sde, gauss.score_fn(sde), lambda x: x @ REWARD_A, lam, jacobian)
                    x = sdediff.sample(sde, guided, (n, 2), solver=solver, steps=steps, eps=EPS, generator=gen(5),
                                       dtype=T64)
                    err = moment_errors(x, mean, REWARD_COV)
                    rows.append({"sde": name, "lambda": lam, "jacobian": jacobian, "solver": solver, "steps": steps,
                                 "mean_error": err[0], "cov_error": err[1], "exact_mean_error": floor[0],
                                 "exact_cov_error": floor[1], "sample_mean": x.mean(0).tolist(),
                                 "target_mean": mean.tolist()})
                    log(f"  reward {name} λ={lam:g} {jacobian:6s} {solver}: mean error {err[0]:.4f}, "
                        f"cov error {err[1]:.4f} (exact samples {floor[0]:.4f}, {floor[1]:.4f})")
    return rows


def inpaint_rows(n: int, log) -> list[dict[str, Any]]:
    sde = sdediff.VPSDE()
    gauss = GaussianMixture([1.0], INPAINT_MU[None], INPAINT_COV[None])
    k, u = MASK, ~MASK
    skk, suk = INPAINT_COV[k][:, k], INPAINT_COV[u][:, k]
    mean = INPAINT_MU[u] + suk @ torch.linalg.solve(skk, OBSERVED[k] - INPAINT_MU[k])
    cov = INPAINT_COV[u][:, u] - suk @ torch.linalg.solve(skk, suk.T)
    floor = exact_errors(mean, cov, n)
    rows = []
    for label, method, covariance in (("replacement", "replacement", "isotropic"),
                                      ("guidance (isotropic)", "guidance", "isotropic"),
                                      ("guidance (tweedie)", "guidance", "tweedie")):
        for solver, steps in SOLVERS:
            tic = time.perf_counter()
            x = inpaint(sde, gauss.score_fn(sde), MASK, OBSERVED, (n, 4), method, covariance=covariance,
                        solver=solver, steps=steps, eps=EPS, generator=gen(6), dtype=T64)
            err = moment_errors(x[:, u], mean, cov)
            rows.append({"method": label, "solver": solver, "steps": steps, "mean_error": err[0], "cov_error": err[1],
                         "exact_mean_error": floor[0], "exact_cov_error": floor[1],
                         "sample_mean": x[:, u].mean(0).tolist(), "target_mean": mean.tolist(),
                         "seconds": time.perf_counter() - tic})
            log(f"  inpaint {label:22s} {solver}: mean error {err[0]:.4f}, cov error {err[1]:.4f} "
                f"(exact samples {floor[0]:.4f}, {floor[1]:.4f})")
    return rows


def markdown(r: dict[str, Any]) -> str:
    n = r["n"]
    lines = ["# Guidance on Gaussian data, against the exact target", "", f"`{r['command']}` — {r['environment']}.", "",
             f"n = {n} samples per row, exact scores, float64, eps = {EPS:g}. \"exact\" columns: the same error for n "
             "exact draws of the target (sampling noise).", "",
             "## Classifier guidance (exact noisy-class posterior, component 2 of 4, VP)", "",
             "| scale | solver | assigned to the component | sliced W2 to exact samples | noise floor |",
             "|---:|---|---:|---:|---:|"]
    for row in r["classifier"]:
        lines.append(f"| {row['scale']:g} | {row['solver']} ({row['steps']} steps) | {100 * row['assigned']:.2f}% | "
                     f"{row['sliced_w2']:.4f} | {row['noise_floor']:.4f} |")
    lines += ["", "Scale 1 is Bayes' rule (the target); scale 3 sharpens it, so its SW2 is not expected to match.", "",
              "## Reward guidance, R(x) = aᵀx: target N(μ + λΣa, Σ)", "",
              "| SDE | λ | Jacobian | solver | mean error | cov error | exact: mean | exact: cov |",
              "|---|---:|---|---|---:|---:|---:|---:|"]
    for row in r["reward"]:
        lines.append(f"| {row['sde']} | {row['lambda']:g} | {row['jacobian']} | {row['solver']} ({row['steps']}) | "
                     f"{row['mean_error']:.4f} | {row['cov_error']:.4f} | {row['exact_mean_error']:.4f} | "
                     f"{row['exact_cov_error']:.4f} |")
    lines += ["", "## Inpainting a correlated 4-D Gaussian (coordinates 0, 2 known): imputed coordinates vs the "
              "analytic conditional", "",
              "| method | solver | mean error | cov error | exact: mean | exact: cov | seconds |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for row in r["inpainting"]:
        lines.append(f"| {row['method']} | {row['solver']} ({row['steps']}) | {row['mean_error']:.4f} | "
                     f"{row['cov_error']:.4f} | {row['exact_mean_error']:.4f} | {row['exact_cov_error']:.4f} | "
                     f"{row['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="n = 500")
    p.add_argument("--n", type=int, default=None, help="samples per row (default 4000, quick 500)")
    p.add_argument("--out", default=str(RESULTS_DIR))
    args = p.parse_args(argv)
    n = args.n or (500 if args.quick else 4000)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the exact-sample floors use the global RNG
    env = f"sdediff {sdediff.__version__}, torch {torch.__version__}, CPU, one thread, python {platform.python_version()}"
    command = "python benchmarks/guidance_gaussian.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(env)
    print(command)
    tic = time.perf_counter()
    result = {"command": command, "environment": env, "n": n, "eps": EPS,
              "classifier": classifier_rows(n, print), "reward": reward_rows(n, print),
              "inpainting": inpaint_rows(n, print)}
    result["total_seconds"] = time.perf_counter() - tic
    md = markdown(result)
    print()
    print(md)
    suffix = "_quick" if args.quick else ""
    out = Path(args.out)
    atomic_write(out / f"guidance_gaussian{suffix}.json", json.dumps(result, indent=1))
    atomic_write(out / f"guidance_gaussian{suffix}.md", md)
    print(f"wrote {out / f'guidance_gaussian{suffix}.md'}, .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
