"""Exact likelihoods side by side: error against NFE for sdediff's methods and its peers, error bars, cost.

1. **Error against NFE** on Gaussian mixtures with the exact score (``sdediff.data.GaussianMixture.random``, 4
   components, means of scale 3), float64, exact divergence, for the VP, sub-VP and VE SDEs in d = 2, 16, 64, with
   ``--points`` points per problem drawn from :math:`p_\\epsilon` (``eps = 1e-5``), the same number from every component.
   The error of a point is :math:`|\\ell + \\log p_T(x_T) - \\log p_\\epsilon(x)|` with the exact :math:`p_T` and
   :math:`p_\\epsilon` of the mixture (so the prior's mismatch is no error); the curves plot its mean over the points
   against the score evaluations per point (for the batch-coupled methods every point takes part in every
   evaluation; for sdediff's per-point method, the mean over points). Methods: ``sdediff.log_likelihood`` with its
   defaults and ``tol`` varied (Adams in the noise-level time), the same in ``t`` and in the log-SNR time
   (``noise_range = (1e-4, 1e4)``), sdediff's torchdiffeq dopri5 route (its former default, ``rtol = atol``); the
   formulations of score_sde (scipy RK45 in ``t``), of k-diffusion with the exact divergence (dopri5 in sigma) and of a
   plain torchdiffeq user (dopri5 in ``t``) from ``likelihood_peers.py``; and the real
   ``k_diffusion.sampling.log_likelihood`` (one Rademacher probe; its error is measured against the exact integral
   of its own probe, so it is its integration error). The NFE needed for 1e-2 ... 1e-5 nats is read off each curve
   by log-log interpolation; time per evaluation is the thread CPU time of a run over its batched score calls.
2. **Error bars** with Hutchinson's trace on a trained network (``sdediff.MLP`` fitted to the 16-D mixture,
   ``--train-steps`` steps) and on the exact 16-D score: the spread over ``--seeds`` seeds of one-probe estimates with
   sdediff's fresh probe per evaluation, one probe fixed along the path (sdediff's dopri5 route) and k-diffusion; the
   reported standard error with two probes against the observed spread; the integration-error estimate against the
   true error (exact trace).
3. **Cost of one-probe Hutchinson** per score evaluation on the overhead benchmark's network (``benchmarks/overhead.py``:
   MLP on 3x32x32, batch 64), against one forward and one vector-Jacobian product of the network alone: sdediff,
   k-diffusion's ``log_likelihood`` and score_sde's formulation.
4. **A schedule with kinks**: diffusers' DDPM betas as ``DiscreteVPSDE`` against the continuous VP SDE.

Writes ``likelihood.{md,json}`` into ``--out`` and the plot ``docs/img/likelihood.png`` (``--quick``: ``*_quick.*``,
plot beside them).

    python benchmarks/likelihood.py            # the reported run (about an hour on one loaded CPU core)
    python benchmarks/likelihood.py --quick    # smoke run (a minute or two)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common  # a sibling script (benchmarks/README.md)
import likelihood_peers as peers
import overhead
import torch
from torch import Tensor

import sdediff
from sdediff._io import atomic_write, atomic_write_file
from sdediff.data import GaussianMixture
from sdediff.interop.diffusers import DiscreteVPSDE
from sdediff.score import ScoreModel

T64 = torch.float64
EPS = 1e-5
SDES = {"VP": sdediff.VPSDE, "sub-VP": sdediff.SubVPSDE, "VE": sdediff.VESDE}
TARGETS = (1e-2, 1e-3, 1e-4, 1e-5)
SDEDIFF_TOLS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
PEER_TOLS = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
OURS = "sdediff (default: Adams, noise-level time)"


# --------------------------------------------------------------------------------------------------
# 1. error against NFE
# --------------------------------------------------------------------------------------------------
def problem(sde_name: str, d: int, points: int, components: int = 4, seed: int = 0
            ) -> tuple[Any, GaussianMixture, Tensor]:
    """The SDE, a random mixture in ``d`` dimensions and ``points`` points of :math:`p_\\epsilon`, as many from each
    component (every mode represented); ``seed`` picks another mixture and other points (held-out problems)."""
    sde = SDES[sde_name]()
    gm = GaussianMixture.random(components, d, generator=torch.Generator().manual_seed(1000 + d + 7919 * seed))
    x, labels = gm.marginal(sde, EPS).sample(points * components * 4,
                                             generator=torch.Generator().manual_seed(2000 + d + 7919 * seed),
                                             dtype=T64, return_labels=True)
    per = points // components
    rows = torch.cat([torch.nonzero(labels == k).squeeze(1)[:per] for k in range(components)])
    return sde, gm, x[rows]


def sdediff_method(**options: Any) -> Callable[..., tuple[Tensor, Tensor, float, int, int, Tensor]]:
    def run(sde, score, x, tol):
        res = sdediff.log_likelihood(sde, score, x, eps=EPS, **({"tol": tol} if options.get("method", "adams") == "adams"
                                                                 else {"rtol": tol, "atol": tol}), **options)
        return res.delta_log_prob, res.latent, res.nfe_mean, res.nfe_max, res.nfe, res.integration_error
    return run


def peer_method(fn: Callable) -> Callable[..., tuple[Tensor, Tensor, float, int, int, None]]:
    def run(sde, score, x, tol):
        out = fn(sde, score, x, EPS, tol)
        return out.delta, out.latent, float(out.nfe), out.nfe, out.calls, None
    return run


METHODS: dict[str, tuple[Callable, tuple[float, ...], str]] = {
    OURS: (sdediff_method(), SDEDIFF_TOLS, "sdediff"),
    "sdediff Adams in t": (sdediff_method(options={"time": "t"}), SDEDIFF_TOLS, "sdediff"),
    "sdediff Adams in log-SNR time": (sdediff_method(options={"noise_range": (1e-4, 1e4)}), SDEDIFF_TOLS, "sdediff"),
    "sdediff dopri5 in t (former default)": (sdediff_method(method="dopri5"), PEER_TOLS, "sdediff"),
    "score_sde formulation (scipy RK45 in t)": (peer_method(peers.score_sde), PEER_TOLS, "peer"),
    "k-diffusion formulation, exact divergence (dopri5 in sigma)": (peer_method(peers.kdiffusion_exact), PEER_TOLS,
                                                                     "peer"),
    "torchdiffeq dopri5 in t (default options)": (peer_method(peers.torchdiffeq_plain), PEER_TOLS, "peer"),
}
KD_REAL = "k_diffusion.sampling.log_likelihood (its own probe)"


def reach(curve: list[dict[str, float]], target: float) -> float | None:
    """The NFE at which the mean error first reaches ``target``: log-log interpolation along the curve sorted by NFE,
    with the error made non-increasing (each run's error is the best seen at or below its NFE); None if never."""
    pts = sorted((r["nfe"], r["error"]) for r in curve if r["error"] > 0 and math.isfinite(r["error"]))
    best, env = math.inf, []
    for n, e in pts:
        best = min(best, e)
        env.append((n, best))
    if not env or env[-1][1] > target:
        return None
    if env[0][1] <= target:
        return env[0][0]
    for (n0, e0), (n1, e1) in zip(env, env[1:], strict=False):
        if e0 > target >= e1:
            f = (math.log(target) - math.log(e0)) / (math.log(e1) - math.log(e0))
            return math.exp(math.log(n0) + f * (math.log(n1) - math.log(n0)))
    return None


def run_curves(args: argparse.Namespace, kds) -> list[dict[str, Any]]:
    rows = []
    for sde_name in args.sdes:
        for d in args.dims:
            sde, gm, x = problem(sde_name, d, args.points, seed=args.problem_seed)
            score = gm.score_fn(sde)
            truth = gm.log_prob(x, sde, EPS)
            curves: dict[str, list[dict[str, float]]] = {}
            for label, (fn, tols, _) in METHODS.items():
                curves[label] = []
                for tol in tols[:args.tols]:
                    tic = time.thread_time()
                    delta, latent, nfe, nfe_max, calls, est = fn(sde, score, x, tol)
                    cpu = time.thread_time() - tic
                    err = (delta + gm.log_prob(latent, sde, sde.T) - truth).abs()
                    rec = {"tol": tol, "nfe": nfe, "nfe_max": nfe_max, "calls": calls, "error": float(err.mean()),
                           "error_max": float(err.max()), "cpu_s": cpu, "cpu_per_call_ms": 1e3 * cpu / max(calls, 1)}
                    if est is not None:
                        rec["estimate_bounds"] = float((est >= err).double().mean())
                        rec["estimate_mean"] = float(est.mean())
                    curves[label].append(rec)
                    print(f"{sde_name:6s} d={d:2d} {label[:44]:44s} tol={tol:7.0e} NFE {nfe:6.1f} (max {nfe_max:4d}) "
                          f"error {rec['error']:.2e}  {cpu:6.1f} s", flush=True)
            if kds is not None:
                curves[KD_REAL] = []
                for tol in PEER_TOLS[:args.tols]:
                    tic = time.thread_time()
                    ll, fevals, probe = peers.kdiffusion_real(kds, sde, score, x, EPS, tol)
                    cpu = time.thread_time() - tic
                    err = (ll - peers.kdiffusion_reference(sde, score, x, EPS, probe)).abs()
                    curves[KD_REAL].append({"tol": tol, "nfe": float(fevals), "nfe_max": fevals, "calls": fevals,
                                            "error": float(err.mean()), "error_max": float(err.max()), "cpu_s": cpu,
                                            "cpu_per_call_ms": 1e3 * cpu / fevals})
                    print(f"{sde_name:6s} d={d:2d} {KD_REAL[:44]:44s} tol={tol:7.0e} NFE {fevals:6d} error "
                          f"{float(err.mean()):.2e}", flush=True)
            reached = {label: {f"{t:g}": reach(c, t) for t in TARGETS} for label, c in curves.items()}
            rows.append({"sde": sde_name, "d": d, "points": len(x), "curves": curves, "reach": reached})
    return rows


def best_peer(row: dict[str, Any], target: float) -> tuple[str | None, float | None]:
    """The peer (any method not sdediff's) that reaches ``target`` with the fewest NFE."""
    key, best = f"{target:g}", (None, None)
    for label, r in row["reach"].items():
        kind = METHODS[label][2] if label in METHODS else "peer"
        if kind == "peer" and r[key] is not None and (best[1] is None or r[key] < best[1]):
            best = (label, r[key])
    return best


# --------------------------------------------------------------------------------------------------
# 2. error bars
# --------------------------------------------------------------------------------------------------
def trained_score(d: int, steps: int) -> tuple[ScoreModel, sdediff.VPSDE, GaussianMixture, float]:
    """An ``sdediff.MLP`` fitted to the ``d``-dimensional mixture of section 1 (VP, DSM, EMA), in float64."""
    sde = sdediff.VPSDE()
    gm = GaussianMixture.random(4, d, generator=torch.Generator().manual_seed(1000 + d))
    data = gm.sample(20_000, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    cfg = sdediff.TrainConfig(steps=steps, batch_size=256, lr=1e-3, warmup_steps=min(100, steps // 10),
                              lr_schedule="cosine", t_eps=EPS, progress=False)
    trainer = sdediff.Trainer(sdediff.MLP(d), sde, data, config=cfg)
    tic = time.perf_counter()
    trainer.fit()
    score = trainer.score_fn()
    score.net.double()
    return score, sde, gm, time.perf_counter() - tic


def error_bars(args: argparse.Namespace, kds) -> dict[str, Any]:
    d = 16
    score_t, sde, gm, seconds = trained_score(d, args.train_steps)
    x = gm.sample(args.bar_points, generator=torch.Generator().manual_seed(7), dtype=T64)
    out: dict[str, Any] = {"d": d, "points": len(x), "seeds": args.seeds, "train_steps": args.train_steps,
                           "train_seconds": seconds}
    for name, score in (("trained MLP", score_t), ("exact mixture score", gm.score_fn(sde))):
        exact = sdediff.log_likelihood(sde, score, x, eps=EPS, tol=args.bar_tol)
        spreads: dict[str, Any] = {}

        def spread(fn: Callable[[int], Tensor]) -> tuple[float, Tensor]:
            runs = torch.stack([fn(s) for s in range(args.seeds)])
            return float(runs.std(0).pow(2).mean().sqrt()), runs

        fresh, _ = spread(lambda s, score=score: sdediff.log_likelihood(
            sde, score, x, eps=EPS, tol=args.bar_tol, trace="hutchinson", generator=torch.Generator().manual_seed(s)).log_prob)
        fixed, _ = spread(lambda s, score=score: sdediff.log_likelihood(
            sde, score, x, eps=EPS, method="dopri5", rtol=args.bar_tol, atol=args.bar_tol, trace="hutchinson",
            generator=torch.Generator().manual_seed(s)).log_prob)
        spreads.update(fresh_probe_per_evaluation=fresh, one_probe_along_the_path=fixed,
                       variance_ratio=(fixed / fresh) ** 2)
        if kds is not None:
            y_scale = sde.mean_coeff(torch.tensor([EPS], dtype=T64))
            kd, _ = spread(lambda s, score=score, y_scale=y_scale: peers.kdiffusion_real(
                kds, sde, score, x, EPS, args.bar_tol, seed=s)[0] + d * torch.log(y_scale))
            spreads["k_diffusion_log_likelihood"] = kd
        results = [sdediff.log_likelihood(sde, score, x, eps=EPS, tol=args.bar_tol, trace="hutchinson", num_probes=2,
                                          generator=torch.Generator().manual_seed(100 + s)) for s in range(args.seeds)]
        lp = torch.stack([r.log_prob for r in results])
        se = torch.stack([r.std_error for r in results])
        ratio = se.pow(2).mean(0).sqrt() / lp.std(0)
        spreads.update(two_probes_observed=float(lp.std(0).pow(2).mean().sqrt()),
                       two_probes_reported=float(se.pow(2).mean().sqrt()),
                       reported_over_observed_per_point=ratio.tolist(),
                       bias=float((lp.mean(0) - exact.log_prob).abs().mean()),
                       bias_se=float(lp.std(0).mean() / math.sqrt(args.seeds)),
                       nfe_exact=exact.nfe_mean, nfe_hutchinson=results[0].nfe_mean)
        out[name] = spreads
        print(f"{name}: one-probe spread {fresh:.3f} nats (fresh) vs {fixed:.3f} (fixed), "
              f"variance ratio {spreads['variance_ratio']:.1f}; two probes: reported s.e. / spread per point "
              f"{ratio.min():.2f}..{ratio.max():.2f}", flush=True)
    return out


# --------------------------------------------------------------------------------------------------
# 3. cost of one-probe Hutchinson per evaluation
# --------------------------------------------------------------------------------------------------
class TimedNet(torch.nn.Module):
    """The network, with the thread CPU time spent inside its forward passes and inside the backward passes through it
    (from the gradient reaching its output to the gradient of its input, by tensor hooks) added up."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.inside, self.calls = net, 0.0, 0

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        tic = time.thread_time()
        x_in = x.view_as(x)
        out = self.net(x_in, t)
        self.inside += time.thread_time() - tic
        if out.requires_grad and x_in.requires_grad:
            start: list[float] = []
            out.register_hook(lambda g: start.append(time.thread_time()))
            x_in.register_hook(lambda g: setattr(self, "inside", self.inside + time.thread_time() - start[-1]))
        return out


def cost(args: argparse.Namespace, kds) -> dict[str, Any]:
    torch.manual_seed(0)
    net = TimedNet(overhead.MLP((3, 32, 32), 256))
    sde = sdediff.VPSDE()
    x = torch.randn(args.cost_batch, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 0.5
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).sign()
    t = torch.full((len(x),), 0.5)

    def forward_vjp() -> None:
        xr = x.detach().requires_grad_(True)
        torch.autograd.grad(net.net(xr, t), xr, grad_outputs=z)

    def per_call(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
        """Best over repeats of (CPU per network call, CPU inside the network per call)."""
        best = (math.inf, math.inf)
        for _ in range(repeats):
            net.inside, net.calls = 0.0, 0
            tic = time.thread_time()
            fn()
            total = time.thread_time() - tic
            best = min(best, (total / net.calls, net.inside / net.calls))
        return best

    for _ in range(3):
        forward_vjp()
    reps = 20
    base = min(common.timed(lambda: [forward_vjp() for _ in range(reps)], torch.device("cpu"))[1] for _ in range(3)) / reps
    rows: dict[str, dict[str, float]] = {"forward + VJP of the network alone": {"ms": 1e3 * base, "ratio": 1.0}}
    tol = 1e-3
    runs = {"divergence_hutchinson alone (one probe)": lambda: [
                sdediff.likelihood.divergence_hutchinson(lambda q: net(q, t), x, z) for _ in range(reps)],
            "sdediff log_likelihood (one probe, tol 1e-3)": lambda: sdediff.log_likelihood(
                sde, net, x, eps=1e-3, tol=tol, trace="hutchinson", generator=torch.Generator().manual_seed(0)),
            "score_sde formulation (one probe, rtol = atol = 1e-3)": lambda: peers.score_sde(
                sde, net, x, 1e-3, tol, "hutchinson", torch.Generator().manual_seed(0))}
    if kds is not None:
        runs["k_diffusion.sampling.log_likelihood (rtol = atol = 1e-3)"] = lambda: peers.kdiffusion_real(
            kds, sde, net, x, 1e-3, tol)
    for label, fn in runs.items():
        total, inside = per_call(fn, args.cost_repeats)
        rows[label] = {"ms": 1e3 * total, "ratio": total / base, "inside_ms": 1e3 * inside, "in_situ": total / inside}
        print(f"{label}: {1e3 * total:.2f} ms per evaluation = {total / base:.2f} x (forward + VJP); in situ "
              f"{total / inside:.2f}", flush=True)
    return {"network": "overhead.MLP(3x32x32, hidden 256)", "batch": len(x), "tol": tol, "rows": rows}


# --------------------------------------------------------------------------------------------------
# 4. a schedule with kinks
# --------------------------------------------------------------------------------------------------
def kinks(args: argparse.Namespace) -> list[dict[str, Any]]:
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=T64)
    schedules = {"DiscreteVPSDE (DDPM betas, 1000 knots)": DiscreteVPSDE(torch.cumprod(1 - betas, 0)),
                 "VPSDE (continuous)": sdediff.VPSDE()}
    gm = GaussianMixture.random(4, 2, generator=torch.Generator().manual_seed(3))
    eps, rows = 1e-3, []
    for name, sde in schedules.items():
        x = gm.marginal(sde, eps).sample(args.points, generator=torch.Generator().manual_seed(4), dtype=T64)
        for label, kw in (("sdediff default, tol 1e-5", {"tol": 1e-5}),
                          ("sdediff dopri5 in t, rtol = atol = 1e-7", {"method": "dopri5", "rtol": 1e-7, "atol": 1e-7})):
            res = sdediff.log_likelihood(sde, gm.score_fn(sde), x, eps=eps, **kw)
            err = (res.delta_log_prob + gm.log_prob(res.latent, sde, sde.T) - gm.log_prob(x, sde, eps)).abs()
            rows.append({"schedule": name, "method": label, "nfe": res.nfe_mean, "error": float(err.mean())})
            print(f"{name}: {label}: NFE {res.nfe_mean:.1f}, error {float(err.mean()):.2e}", flush=True)
    return rows


# --------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------
def fmt(v: float | None, digits: int = 0) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def markdown(r: dict[str, Any]) -> str:
    seed = r.get("problem_seed", 0)
    title = "Exact likelihood: error against NFE, error bars, cost" + (
        f" — held-out problems (problem seed {seed})" if seed else "")
    lines = ["# " + title + (" — quick run" if r["quick"] else ""), "",
             f"`{r['command']}`  ", r["environment"], "", r["kd_note"], "",
             f"Gaussian mixtures with the exact score (4 components, `GaussianMixture.random`), float64, exact "
             f"divergence, eps = {EPS:g}, {r['points']} points per problem ({r['points'] // 4} from each component). "
             "Error: mean over the points of |ℓ + log p_T(x_T) − log p_eps(x)| with the mixture's exact p_T and p_eps. "
             "NFE: score evaluations per point (mean over points for sdediff's per-point method; the whole batch "
             "takes part in every evaluation of the others), read off each error-vs-NFE curve by log-log "
             "interpolation; — where the curve does not reach the accuracy.", ""]
    for target in (1e-3, 1e-5):
        lines += [f"## NFE per point for a mean error of {target:g} nats", "",
                  "| SDE | d | sdediff (default) | best peer | that peer | peer / sdediff |", "|---|---|---|---|---|---|"]
        for row in r["curves"]:
            ours = row["reach"][OURS][f"{target:g}"]
            label, peer = best_peer(row, target)
            ratio = f"{peer / ours:.2f}" if ours and peer else "—"
            lines.append(f"| {row['sde']} | {row['d']} | {fmt(ours, 1)} | {fmt(peer, 1)} | {label or '—'} | {ratio} |")
        lines.append("")
    lines += ["## NFE per point for each accuracy, every method", "",
              "| SDE | d | method | " + " | ".join(f"{t:g}" for t in TARGETS) + " | CPU ms per evaluation |",
              "|---|---|---|" + "---|" * (len(TARGETS) + 1)]
    for row in r["curves"]:
        for label, reached in row["reach"].items():
            per_call = common.median([c["cpu_per_call_ms"] for c in row["curves"][label]])
            lines.append(f"| {row['sde']} | {row['d']} | {label} | " + " | ".join(fmt(reached[f'{t:g}'], 1) for t in TARGETS)
                         + f" | {per_call:.2f} |")
    lines += ["", "`tol` is an accuracy in nats: sdediff's default method at tol = 1e-3 and 1e-5 (mean error; "
              "fraction of points whose integration-error estimate is at least their error):", "",
              "| SDE | d | tol | NFE mean (max) | mean error | estimate ≥ error |", "|---|---|---|---|---|---|"]
    for row in r["curves"]:
        for c in row["curves"][OURS]:
            if c["tol"] in (1e-3, 1e-5):
                lines.append(f"| {row['sde']} | {row['d']} | {c['tol']:g} | {c['nfe']:.1f} ({c['nfe_max']}) | "
                             f"{c['error']:.2e} | {c.get('estimate_bounds', math.nan):.2f} |")
    if r.get("error_bars"):
        e = r["error_bars"]
        lines += ["", f"## Hutchinson's estimate: spread over {e['seeds']} seeds, d = {e['d']}, {e['points']} points", "",
                  "RMS over points of the standard deviation over seeds of log p (nats); the trained network is an "
                  f"`sdediff.MLP` fitted to the mixture for {e['train_steps']} steps.", "",
                  "| score | one probe, fresh at every evaluation (sdediff) | one probe along the path (dopri5 route) | "
                  "k-diffusion | variance ratio | two probes: spread | reported s.e. | reported / spread per point | "
                  "bias (± s.e.) |", "|---|---|---|---|---|---|---|---|---|"]
        for name in ("trained MLP", "exact mixture score"):
            s = e[name]
            rat = s["reported_over_observed_per_point"]
            lines.append(f"| {name} | {s['fresh_probe_per_evaluation']:.3f} | {s['one_probe_along_the_path']:.3f} | "
                         f"{s.get('k_diffusion_log_likelihood', math.nan):.3f} | {s['variance_ratio']:.1f} | "
                         f"{s['two_probes_observed']:.3f} | {s['two_probes_reported']:.3f} | {min(rat):.2f}–{max(rat):.2f} | "
                         f"{s['bias']:.3f} (± {s['bias_se']:.3f}) |")
    if r.get("cost"):
        c = r["cost"]
        lines += ["", f"## One-probe Hutchinson: CPU time per score evaluation, {c['network']}, batch {c['batch']}", "",
                  "Thread CPU time per network call; 'in the network' is the time inside its forward and backward "
                  "passes during the same run (tensor hooks), so 'in situ' is the share of the run's time spent "
                  "outside the network (1.00: none).", "",
                  "| what | ms per evaluation | / (forward + VJP alone) | ms in the network | in situ |",
                  "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['ms']:.2f} | {v['ratio']:.2f} | {fmt(v.get('inside_ms'), 2)} | {fmt(v.get('in_situ'), 2)} |"
                  for k, v in c["rows"].items()]
    if r.get("kinks"):
        lines += ["", "## A schedule with kinks (piecewise-constant beta between 1000 knots), 2-D mixture, eps = 1e-3", "",
                  "| schedule | method | NFE per point | mean error |", "|---|---|---|---|"]
        lines += [f"| {k['schedule']} | {k['method']} | {k['nfe']:.1f} | {k['error']:.2e} |" for k in r["kinks"]]
    lines += ["", f"Whole script: {r['seconds']:.0f} s wall.", ""]
    return "\n".join(lines)


def plot(r: dict[str, Any], png: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    rows = r["curves"]
    sdes = sorted({row["sde"] for row in rows}, key=list(SDES).index)
    dims = sorted({row["d"] for row in rows})
    fig, axes = plt.subplots(len(sdes), len(dims), figsize=(4.2 * len(dims), 3.4 * len(sdes)), squeeze=False)
    for row in rows:
        ax = axes[sdes.index(row["sde"])][dims.index(row["d"])]
        for label, curve in row["curves"].items():
            pts = sorted((c["nfe"], c["error"]) for c in curve if c["error"] > 0)
            style = "-o" if label == OURS else ("--." if label.startswith("sdediff") else ":s")
            ax.loglog([p[0] for p in pts], [p[1] for p in pts], style, label=label, ms=3,
                      lw=2 if label == OURS else 1)
        ax.set_title(f"{row['sde']}, d = {row['d']}", fontsize=9)
        ax.set_xlabel("score evaluations per point", fontsize=8)
        ax.set_ylabel("mean |error| (nats)", fontsize=8)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 20, 50, 100, ... not 2 x 10^1
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks([t for t in (10, 20, 50, 100, 200, 500, 1000) if t <= ax.get_xlim()[1] * 1.01
                       and t >= ax.get_xlim()[0] * 0.99])
        ax.tick_params(labelsize=7)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    atomic_write_file(png, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: VP in 2-D, few tolerances, small sections 2-4")
    p.add_argument("--out", default=str(common.RESULTS_DIR), help="results folder (default benchmarks/results)")
    p.add_argument("--points", type=int, default=32, help="points per mixture problem (a multiple of 4)")
    p.add_argument("--seeds", type=int, default=20, help="seeds of the error-bar section")
    p.add_argument("--train-steps", type=int, default=3000, help="training steps of the MLP of the error-bar section")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: curves, bars, cost, kinks")
    p.add_argument("--problem-seed", type=int, default=0,
                   help="other mixtures and points for the curves (held-out problems; results likelihood_seed<N>.*)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    wall = time.perf_counter()
    _, env = common.setup_torch("cpu")
    print(env)
    command = common.command_line("likelihood", argv)
    args.sdes, args.dims, args.tols = (("VP",), (2,), 3) if args.quick else (tuple(SDES), (2, 16, 64), len(PEER_TOLS))
    if args.quick:
        args.points, args.seeds, args.train_steps = 8, 4, 100
    args.bar_points, args.bar_tol, args.cost_batch, args.cost_repeats = (8 if args.quick else 16), 1e-3, 64, (
        1 if args.quick else 3)
    skip = set(filter(None, args.skip.split(",")))
    kds, kd_note = common.load_kdiffusion()
    print(kd_note)
    result: dict[str, Any] = {"command": command, "environment": env, "kd_note": kd_note, "quick": args.quick,
                              "points": args.points, "problem_seed": args.problem_seed}
    result["curves"] = run_curves(args, kds) if "curves" not in skip else []
    result["error_bars"] = error_bars(args, kds) if "bars" not in skip else None
    result["cost"] = cost(args, kds) if "cost" not in skip else None
    result["kinks"] = kinks(args) if "kinks" not in skip else None
    result["seconds"] = time.perf_counter() - wall
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "likelihood" + (f"_seed{args.problem_seed}" if args.problem_seed else "") + ("_quick" if args.quick else "")
    md = markdown(result)
    png = common.plot_path(out, stem, "likelihood")
    if result["curves"] and not args.problem_seed and plot(result, png):
        md = common.with_plot(md, out / f"{stem}.md", png)
    atomic_write(out / f"{stem}.json", json.dumps(result, indent=1, default=str))
    atomic_write(out / f"{stem}.md", md)
    print(md)
    print(f"wrote {out / stem}.md, .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
