"""Test-set NLL (bits/dim) of a VP diffusion model on the 8×8 digits, against a full-covariance Gaussian.

1. **Baseline.** A full-covariance Gaussian fitted by maximum likelihood (mean and covariance) to the
   uniformly dequantised training set in the model's ``[-1, 1]`` space (``--fit-draws`` dequantisation
   draws of the 1438 training images stacked), scored by its exact log-density on dequantised test
   images, averaged over ``--draws`` dequantisation draws, and also on the very points the model is
   scored on (a paired comparison).
2. **Model.** An unconditional :class:`sdediff.UNet` trained by :class:`sdediff.Trainer` on the VP SDE
   with the likelihood weighting (:math:`\\lambda = g^2`) and importance-sampled times, fresh
   dequantisation noise every step, AdamW, EMA.
3. **Evaluation** of the EMA weights on the test split (all 359 images unless ``--n-test``):
   :func:`sdediff.log_likelihood` through the probability-flow ODE with its defaults (per-image Adams steps,
   ``tol`` in nats; Hutchinson trace with a Rademacher probe, or ``--trace exact``), next to its former default
   (``method="dopri5"``, ``rtol = atol = 1e-5``) on the same points, and the evidence bound
   :func:`sdediff.training.nll_bound` of the reverse SDE, both turned into bits/dim by
   :func:`sdediff.data.digits_bits_per_dim` (17 levels: ``-log p / (64 ln 2) + log2 17 - 1``).
4. **Training speed**: timed loops of ``Trainer.train_step`` for the digits UNet and a 2-D MLP.

Writes ``digits_nll.{md,json}`` and ``digits_samples.png`` (``--quick``: ``*_quick.*``) into ``--out``.

    python benchmarks/digits_nll.py                  # the reported run (about 13 min on one CPU thread)
    python benchmarks/digits_nll.py --quick          # smoke run (well under a minute)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import common  # a sibling script (benchmarks/README.md)
import torch
from torch import Tensor

import sdediff
from sdediff._io import atomic_write_file
from sdediff.data import (
    DIGITS_LEVELS,
    digits_bits_per_dim,
    digits_to_model,
    load_digits,
    make_toy,
    model_to_digits,
)
from sdediff.metrics import mean_se
from sdediff.training import MLP, TrainConfig, Trainer, UNet, nll_bound

D = 64
#: rtol = atol of the former default, dopri5 in t (the row the defaults are compared with)
FORMER_TOL = 1e-5


# --------------------------------------------------------------------------------------------------
# Gaussian baseline
# --------------------------------------------------------------------------------------------------
def fit_gaussian(train_levels: Tensor, fit_draws: int, generator: torch.Generator) -> torch.distributions.MultivariateNormal:
    """ML full-covariance Gaussian of the dequantised training set (``fit_draws`` draws stacked), float64."""
    flat = train_levels.reshape(len(train_levels), -1)
    x = torch.cat([digits_to_model(flat, generator, dtype=torch.float64) for _ in range(fit_draws)])
    mean = x.mean(0)
    cov = torch.cov(x.T, correction=0)
    return torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)


def gaussian_bpd(gauss: torch.distributions.MultivariateNormal, x: Tensor) -> Tensor:
    """Per-image bits/dim of the Gaussian at dequantised points ``x`` (any shape ``(N, ...)``)."""
    return digits_bits_per_dim(gauss.log_prob(x.reshape(len(x), -1).to(torch.float64)))


# --------------------------------------------------------------------------------------------------
# Speed
# --------------------------------------------------------------------------------------------------
def time_steps(trainer: Trainer, steps: int, warmup: int = 3) -> dict[str, float]:
    """Steps/s of ``trainer.train_step`` over ``steps`` steps after ``warmup``: wall and thread CPU time."""
    for _ in range(warmup):
        trainer.train_step()
    w0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        trainer.train_step()
    wall, cpu = time.perf_counter() - w0, time.thread_time() - c0
    return {"steps": steps, "steps_per_s": steps / wall, "steps_per_s_cpu": steps / max(cpu, 1e-9)}


def speed_table(args: argparse.Namespace, device: torch.device, train_levels: Tensor) -> list[dict[str, Any]]:
    """Short timed ``train_step`` loops: the digits UNet (as trained here) and a 2-D MLP on two moons."""
    rows = []
    sde = sdediff.VPSDE()
    options = {"weighting": "likelihood", "t_sampling": "importance", "progress": False, "device": str(device)}
    torch.manual_seed(args.seed)
    unet = UNet(base_channels=args.base_channels, channel_mults=(1, 2), num_res_blocks=args.res_blocks)
    trainer = Trainer(unet, sde, train_levels, config=TrainConfig(steps=10**9, batch_size=args.batch_size,
                                                                   lr=args.lr, **options), transform=digits_to_model)
    rows.append({"model": f"digits UNet (base {args.base_channels}, mults (1, 2), {args.res_blocks} res block"
                          f"{'s' if args.res_blocks > 1 else ''}), 1×8×8",
                 "params": sum(p.numel() for p in unet.parameters()), "batch": args.batch_size,
                 **time_steps(trainer, args.speed_steps)})
    torch.manual_seed(args.seed)
    mlp = MLP(dim=2)
    moons = make_toy("moons", 10_000, torch.Generator().manual_seed(args.seed))
    trainer = Trainer(mlp, sde, moons, config=TrainConfig(steps=10**9, batch_size=args.batch_size, **options))
    rows.append({"model": "2-D MLP (hidden 256, depth 4), two moons", "params": sum(p.numel() for p in mlp.parameters()),
                 "batch": args.batch_size, **time_steps(trainer, 5 * args.speed_steps)})
    return rows


# --------------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------------
def save_grid(path: Path, levels: Tensor, title: str) -> bool:
    """A grid of digit images (levels 0..16, shown dark on light like sklearn's); ``False`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    n = len(levels)
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(max(cols * 0.8, 4.0), rows * 0.8 + 0.5), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(levels[i].reshape(8, 8).cpu().numpy(), cmap="gray_r", vmin=0, vmax=DIGITS_LEVELS - 1,
                      interpolation="nearest")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    atomic_write_file(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_run_args(p, steps=2500, quick_steps=40, batch_size=128, lr=1e-3)
    p.add_argument("--warmup", type=int, default=200, help="learning-rate warm-up steps")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="cosine")
    p.add_argument("--base-channels", type=int, default=32)
    p.add_argument("--res-blocks", type=int, default=1)
    p.add_argument("--trace", choices=("hutchinson", "exact"), default="hutchinson")
    common.add_likelihood_args(p, bound_t=32)
    p.add_argument("--fit-draws", type=int, default=16, help="dequantisation draws of the training set for the fit")
    p.add_argument("--draws", type=int, default=8, help="dequantisation draws of the test set for the baseline")
    p.add_argument("--samples", type=int, default=64, help="samples in the image grid")
    p.add_argument("--speed-steps", type=int, default=None, help="timed UNet steps (MLP: 5x; default 30, 5 quick)")
    p.add_argument("--run-dir", default=None, help="Trainer out_dir (checkpoints, metrics.json); none by default")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --run-dir")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = common.start_run("digits_nll", args, argv)
    steps, device, suffix, out = args.steps, run.device, run.suffix, run.out
    n_test = args.n_test if args.n_test is not None else (16 if args.quick else 359)
    args.speed_steps = args.speed_steps if args.speed_steps is not None else (5 if args.quick else 30)
    if args.quick:
        args.draws, args.fit_draws, args.samples, args.bound_t = min(args.draws, 2), min(args.fit_draws, 2), 16, 4
    if args.resume and args.run_dir is None:
        raise SystemExit("--resume needs --run-dir")

    train_k, _ = load_digits("train")
    test_k, _ = load_digits("test")
    test_k = test_k[:n_test]
    g = torch.Generator().manual_seed(args.seed + 1)

    # 1. Gaussian baseline ---------------------------------------------------------------------------
    gauss = fit_gaussian(train_k, args.fit_draws, g)
    g_draws = torch.stack([gaussian_bpd(gauss, digits_to_model(test_k, g, dtype=torch.float64))
                           for _ in range(args.draws)])  # (draws, n)
    g_mean, g_se = mean_se(g_draws.mean(0))
    print(f"Gaussian baseline: {g_mean:.4f} ± {g_se:.4f} bits/dim ({args.draws} dequantisation draws, "
          f"{len(test_k)} test images)")

    # 2. Training ------------------------------------------------------------------------------------
    sde = sdediff.VPSDE()
    torch.manual_seed(args.seed)
    net = UNet(base_channels=args.base_channels, channel_mults=(1, 2), num_res_blocks=args.res_blocks)
    cfg = TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=min(args.warmup, steps // 4),
                      lr_schedule=args.lr_schedule, ema_decay=args.ema_decay, weighting="likelihood",
                      t_sampling="importance", t_eps=args.t_eps, seed=args.seed, log_every=max(1, min(200, steps // 5)),
                      out_dir=args.run_dir, progress=False, device=str(device))
    trainer = Trainer(net, sde, train_k, config=cfg, transform=digits_to_model)
    train_seconds = common.fit_logged(trainer, resume=args.resume)
    fit_sps = trainer.steps_per_second or (trainer.log[-1]["steps_per_second"] if trainer.log else math.nan)
    print(f"trained {trainer.step} steps in {train_seconds:.0f} s ({fit_sps:.2f} steps/s)")

    # 3. Evaluation (EMA weights) ---------------------------------------------------------------------
    score = trainer.score_fn(ema=True)
    ge = torch.Generator(device).manual_seed(args.seed + 2)
    x_test = digits_to_model(test_k.to(device), ge)  # one dequantisation draw, shared by model and baseline
    ode = common.ode_log_probs(sde, score, x_test, args, torch.Generator(device).manual_seed(args.seed + 4),
                               trace=args.trace)
    model_bpd = digits_bits_per_dim(ode.log_prob)
    m_mean, m_se = mean_se(model_bpd)
    # the former default on the same points and probes' seed: dopri5 in t, one step size for the batch
    former = common.ode_log_probs(sde, score, x_test, args, torch.Generator(device).manual_seed(args.seed + 4),
                                  trace=args.trace, method="dopri5", tol=None, rtol=FORMER_TOL, atol=FORMER_TOL)
    former_bpd = digits_bits_per_dim(former.log_prob)
    f_mean, f_se = mean_se(former_bpd)
    fd_mean, fd_se = mean_se(model_bpd - former_bpd)
    paired_g = gaussian_bpd(gauss, x_test.cpu())
    diff = paired_g - model_bpd
    d_mean, d_se = mean_se(diff)
    tic = time.perf_counter()
    with torch.no_grad():
        bound = torch.cat([nll_bound(sde, score, chunk, t_eps=args.t_eps, num_t=args.bound_t, generator=ge).double().cpu()
                           for chunk in x_test.split(max(1, 4096 // args.bound_t))])
    bound_seconds = time.perf_counter() - tic
    b_mean, b_se = mean_se(digits_bits_per_dim(-bound))

    # samples
    gs = torch.Generator(device).manual_seed(args.seed + 3)
    with torch.no_grad():
        x_gen = sdediff.sample(sde, score, (args.samples, 1, 8, 8), solver="heun", steps=100, eps=1e-3,
                               generator=gs, device=device, denoise=True)
    sample_levels = model_to_digits(x_gen.cpu())
    png = out / f"digits_samples{suffix}.png"
    wrote_png = save_grid(png, sample_levels, f"VP UNet, {trainer.step} steps, likelihood weighting "
                                              f"(heun, 100 steps, denoised)")

    # 4. Speed ----------------------------------------------------------------------------------------
    speed = speed_table(args, device, train_k)

    total = run.seconds()
    margin_abs = g_mean - m_mean
    result = {
        "command": run.command, "environment": run.env, "quick": args.quick, "args": vars(args) | {"steps": steps,
                                                                                        "n_test": n_test},
        "data": {"train": len(train_k), "test_scored": len(test_k), "levels": DIGITS_LEVELS, "dims": D,
                 "bits_per_dim": "-log p(x)/(64 ln 2) + log2(17) - log2(2)",
                 "offset_bits": math.log2(DIGITS_LEVELS) - 1.0},
        "gaussian": {"bpd": g_mean, "se": g_se, "draws": args.draws, "fit_draws": args.fit_draws,
                     "per_draw_bpd": g_draws.mean(1).tolist(), "paired_bpd": mean_se(paired_g)[0]},
        "model": {"bpd": m_mean, "se": m_se, "trace": args.trace, "eps": args.t_eps,
                  **ode.summary(), "dequantisation_draws": 1,
                  "params": sum(p.numel() for p in net.parameters()), "unet": net.config},
        "former": {"bpd": f_mean, "se": f_se, "rtol": FORMER_TOL, "atol": FORMER_TOL, **former.summary(),
                   "paired_difference_bpd": fd_mean, "paired_difference_se": fd_se},
        "margin": {"bpd": margin_abs, "relative": margin_abs / g_mean, "paired_bpd": d_mean, "paired_se": d_se},
        "bound": {"bpd": b_mean, "se": b_se, "num_t": args.bound_t, "seconds": bound_seconds},
        "training": {"steps": trainer.step, "seconds": train_seconds, "steps_per_s": fit_sps,
                     "config": cfg.to_dict(), "log": trainer.log,
                     "final_loss_mean_200": sum(trainer.history[-200:]) / max(1, len(trainer.history[-200:]))},
        "speed": speed, "samples_png": png.name if wrote_png else None, "total_seconds": total,
        "beats_gaussian": bool(d_mean > 2 * d_se) if math.isfinite(d_se) else bool(d_mean > 0),
    }
    run.write(result, markdown(result), f", {png}" if wrote_png else "")
    return 0


def markdown(r: dict[str, Any]) -> str:
    g, m, f, b, mg, tr = r["gaussian"], r["model"], r["former"], r["bound"], r["margin"], r["training"]
    n = r["data"]["test_scored"]
    trace = ("Hutchinson trace (one Rademacher probe per image)" if m["trace"] == "hutchinson" else "exact trace")
    lines = [
        "# Digits test NLL (bits/dim)" + (" — quick run" if r["quick"] else ""),
        "",
        f"`{r['command']}`  ",
        f"{r['environment']}",
        "",
        f"8×8 digits, 17 grey levels, fixed split: {r['data']['train']} training images, {n} test images scored. "
        "Uniform dequantisation to [-1, 1]; bits/dim = −log p(x) / (64 ln 2) + log2 17 − 1 "
        "(`sdediff.data.digits_bits_per_dim`). ± are standard errors over test images.",
        "",
        "| model | test bits/dim | ± s.e. | how |",
        "|---|---|---|---|",
        f"| full-covariance Gaussian (train fit) | {g['bpd']:.4f} | {g['se']:.4f} | exact log-density, mean over "
        f"{g['draws']} dequantisation draws |",
        f"| VP UNet, likelihood weighting (EMA) | **{m['bpd']:.4f}** | {m['se']:.4f} | probability-flow ODE, "
        f"`log_likelihood` defaults (per-image Adams steps in the noise level, tol = {m['tol']:g} nats), {trace}, "
        f"eps = {m['eps']:g}, 1 dequantisation draw |",
        f"| same model, former default | {f['bpd']:.4f} | {f['se']:.4f} | `method=\"dopri5\"` (one step size for the "
        f"batch, in t), rtol = atol = {f['rtol']:g}, the same points and probe seed |",
        f"| same model, ELBO bound (`nll_bound`) | {b['bpd']:.4f} | {b['se']:.4f} | reverse-SDE evidence bound, "
        f"{b['num_t']} importance-sampled times per image |",
        "",
        f"**Margin**: the model beats the Gaussian by {mg['bpd']:.4f} bits/dim ({100 * mg['relative']:.1f} %). "
        f"Paired on the same dequantised test points: Gaussian − model = {mg['paired_bpd']:.4f} ± "
        f"{mg['paired_se']:.4f} bits/dim (Gaussian there: {g['paired_bpd']:.4f})."
        if mg["bpd"] > 0 else
        f"**The model does not beat the Gaussian**: model − Gaussian = {-mg['bpd']:.4f} bits/dim "
        f"(paired {-mg['paired_bpd']:.4f} ± {mg['paired_se']:.4f}).",
        "",
        f"Training: {tr['steps']} steps, batch {tr['config']['batch_size']}, AdamW lr {tr['config']['lr']:g} "
        f"({tr['config']['warmup_steps']} warm-up steps, {tr['config']['lr_schedule']}), EMA {tr['config']['ema_decay']}, "
        f"grad clip {tr['config']['grad_clip']}, t_eps {tr['config']['t_eps']:g}, fresh dequantisation every step; "
        f"{m['params']:,} parameters; {tr['seconds']:.0f} s ({tr['steps_per_s']:.2f} steps/s wall). "
        f"Bound {b['seconds']:.0f} s. Whole script: {r['total_seconds']:.0f} s.",
        "",
        "## Cost of the likelihood, same run",
        "",
        "| method | NFE per image (mean) | max | score calls per batch | seconds | bits/dim |",
        "|---|---|---|---|---|---|",
        f"| defaults (Adams, tol = {m['tol']:g}) | {m['nfe_per_point_mean']:.1f} | {m['nfe_per_point_max']} | "
        f"{m['nfe']} | {m['seconds']:.0f} | {m['bpd']:.4f} |",
        f"| dopri5, rtol = atol = {f['rtol']:g} | {f['nfe_per_point_mean']:.1f} | {f['nfe_per_point_max']} | "
        f"{f['nfe']} | {f['seconds']:.0f} | {f['bpd']:.4f} |",
        "",
        f"Defaults / dopri5: {m['nfe_per_point_mean'] / f['nfe_per_point_mean']:.2f}x the NFE per image, "
        f"{m['seconds'] / f['seconds']:.2f}x the time. Paired difference (defaults − dopri5) on the same dequantised "
        f"points: {f['paired_difference_bpd']:+.4f} ± {f['paired_difference_se']:.4f} bits/dim (one probe each, drawn "
        "fresh at every evaluation by the defaults and fixed along the path by dopri5, so the difference includes "
        "both estimates' probe noise). With the defaults a batch calls the network on the images still being "
        "integrated, so a call's cost falls as images finish.",
        "",
        "## Training speed (`Trainer.train_step`, timed loop)",
        "",
        "| model | parameters | batch | steps/s (wall) | steps/s (thread CPU time) |",
        "|---|---|---|---|---|",
    ]
    for row in r["speed"]:
        lines.append(f"| {row['model']} | {row['params']:,} | {row['batch']} | {row['steps_per_s']:.2f} | "
                     f"{row['steps_per_s_cpu']:.2f} |")
    lines += ["", "Thread CPU time is unaffected by other processes on a shared machine; wall time is what a user waits.",
              ""]
    if r["samples_png"]:
        lines += [f"Samples: `{r['samples_png']}`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
