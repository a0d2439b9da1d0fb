"""Digits test bits/dim of a fixed VP schedule and a learned (VDM) schedule: ODE likelihood and evidence bound.

Two UNets of the same size are trained by :class:`sdediff.Trainer` on the 8×8 digits with fresh uniform
dequantisation every step (``sdediff.data.digits_to_model``), for the same number of steps and batch size:

(a) **fixed VP** (βmin = 0.1, βmax = 20) with the likelihood weighting :math:`\\lambda = g^2` and importance-sampled
    times (``loss="dsm"``, as in ``digits_nll.py``), the network fed ``t``;
(b) **learned schedule**: :class:`sdediff.LearnedScheduleSDE` trained jointly with the network on the whole bound
    (``loss="elbo"``: endpoints on the bound, shape on the variance of its estimate, uniform ``t``), the network
    fed the noise level ``sde.noise_level(t)``.

Each EMA model is scored on the test split (all 359 images unless ``--n-test``) with one shared dequantisation
draw: :func:`sdediff.log_likelihood` (probability-flow ODE, its defaults, Hutchinson trace) and :func:`sdediff.elbo`
(``--bound-t`` importance-sampled times per image, Gaussian decoder), both in bits/dim of the 17-level data
(``-log p / (64 ln 2) + log2 17 - 1``); and the discrete-decoder bound of :func:`sdediff.elbo` on the integer
levels themselves (VDM's reconstruction; no dequantisation). The models were trained on dequantised data, which
has a density inside each bin, so the discrete decoder takes over where the noise is a fraction of a bin width
(:math:`s/m = w/4`, ``w = 2/17``; also reported for ``w/2`` and ``w/8`` in the JSON): below that, the reverse SDE
of a dequantised model would pay to place the point inside its bin, which a code for the levels does not need.

Writes ``digits_elbo.{md,json}`` (``--quick``: ``*_quick.*``) into ``--out``.

    python benchmarks/digits_elbo.py            # the reported run (about 10 min of CPU time on one thread)
    python benchmarks/digits_elbo.py --quick    # smoke run (well under a minute)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

import common  # a sibling script (benchmarks/README.md)
import torch
from torch import Tensor

import sdediff
from sdediff.data import DIGITS_LEVELS, digits_bits_per_dim, digits_to_model, load_digits
from sdediff.metrics import mean_se
from sdediff.training import TrainConfig, Trainer, UNet

D = 64
DISCRETE_FRACTIONS = (0.5, 0.25, 0.125)  # discrete decoder hand-over: s/m as a fraction of the bin width


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_run_args(p, steps=2000, quick_steps=30, batch_size=128, lr=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--base-channels", type=int, default=16)
    common.add_likelihood_args(p, bound_t=256)
    return p


def train(args: argparse.Namespace, kind: str, train_k: Tensor, steps: int, device: torch.device) -> tuple[Trainer, float]:
    """Train model (a) ``"vp"`` or (b) ``"learned"``; returns the trainer and the training seconds."""
    torch.manual_seed(args.seed)
    net = UNet(base_channels=args.base_channels, channel_mults=(1, 2), num_res_blocks=1)
    options = dict(steps=steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=min(args.warmup, steps // 4),
                  lr_schedule="cosine", ema_decay=args.ema_decay, weighting="likelihood", t_eps=args.t_eps,
                  seed=args.seed, log_every=max(1, min(200, steps // 5)), progress=False, device=str(device))
    if kind == "vp":
        sde, time_input = sdediff.VPSDE(), None
        cfg = TrainConfig(loss="dsm", t_sampling="importance", **options)
    else:
        sde = sdediff.LearnedScheduleSDE()
        time_input = sde.noise_level
        cfg = TrainConfig(loss="elbo", t_sampling="uniform", **options)
    trainer = Trainer(net, sde, train_k, config=cfg, transform=digits_to_model, time_input=time_input)
    return trainer, common.fit_logged(trainer, f"[{kind}] ")


def evaluate(args: argparse.Namespace, trainer: Trainer, x_test: Tensor, test_k: Tensor,
             device: torch.device) -> dict[str, Any]:
    """ODE likelihood, Gaussian-decoder bound and discrete-decoder bound of the EMA model, in bits/dim."""
    score = trainer.score_fn(ema=True)
    sde = score.sde  # for the learned schedule, its EMA: the schedule the EMA weights go with (no gradients)
    ge = torch.Generator(device).manual_seed(args.seed + 2)
    ode_run = common.ode_log_probs(sde, score, x_test, args, ge)
    ode = mean_se(digits_bits_per_dim(ode_run.log_prob))
    tic = time.perf_counter()
    parts: dict[str, list[Tensor]] = {"bpd": [], "se": [], "prior": [], "diffusion": [], "reconstruction": []}
    width = 2 / DIGITS_LEVELS
    handover = {}  # discrete decoder: the time where s/m = fraction * bin width, i.e. log SNR = -2 log(fraction * w)
    for fraction in DISCRETE_FRACTIONS:
        log_snr = torch.tensor([-2 * math.log(fraction * width)], dtype=torch.float64, device=device)
        with torch.no_grad():
            handover[fraction] = float(sde.time_of_log_snr(log_snr))
        parts[f"discrete_{fraction}"] = []
    chunk_size = max(1, 4096 // args.bound_t)
    with torch.no_grad():
        for xc, kc in zip(x_test.split(chunk_size), test_k.split(chunk_size), strict=True):
            b = sdediff.elbo(sde, score, xc, t_eps=args.t_eps, num_t=args.bound_t, levels=DIGITS_LEVELS, generator=ge)
            parts["bpd"].append(b.bits_per_dim)
            parts["se"].append(b.std_error / (D * math.log(2)))
            for key in ("prior", "diffusion", "reconstruction"):
                parts[key].append(getattr(b, key) / (D * math.log(2)))
            for fraction, t_disc in handover.items():
                disc = sdediff.elbo(sde, score, kc, t_eps=t_disc, num_t=args.bound_t, decoder="discrete",
                                    levels=DIGITS_LEVELS, generator=ge)
                parts[f"discrete_{fraction}"].append(disc.bits_per_dim)
    cat = {k: torch.cat(v).double().cpu() for k, v in parts.items()}
    out = {"ode_bpd": ode[0], "ode_se": ode[1], **{f"ode_{k}": v for k, v in ode_run.summary().items()},
           "bound_bpd": mean_se(cat["bpd"])[0], "bound_se": mean_se(cat["bpd"])[1],
           "bound_mc_se_per_image": float(cat["se"].pow(2).mean().sqrt()),
           "bound_terms_bpd": {k: float(cat[k].mean()) for k in ("prior", "diffusion", "reconstruction")},
           "discrete_bound_bpd": mean_se(cat["discrete_0.25"])[0], "discrete_bound_se": mean_se(cat["discrete_0.25"])[1],
           "discrete_bounds": {str(f): {"t_eps": handover[f], "bpd": mean_se(cat[f"discrete_{f}"])[0],
                                        "se": mean_se(cat[f"discrete_{f}"])[1]} for f in DISCRETE_FRACTIONS},
           "bound_seconds": time.perf_counter() - tic}
    with torch.no_grad():
        ends = torch.tensor([args.t_eps, sde.T], dtype=torch.float64)
        out["gamma_ends"] = (-sde.log_snr(ends)).tolist()  # -log SNR at t_eps and T
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = common.start_run("digits_elbo", args, argv)
    steps, device = args.steps, run.device
    n_test = args.n_test if args.n_test is not None else (16 if args.quick else 359)
    if args.quick:
        args.bound_t = min(args.bound_t, 8)
    train_k, _ = load_digits("train")
    test_k, _ = load_digits("test")
    test_k = test_k[:n_test]
    x_test = digits_to_model(test_k.to(device), torch.Generator(device).manual_seed(args.seed + 1))
    rows = {}
    for kind in ("vp", "learned"):
        trainer, seconds = train(args, kind, train_k, steps, device)
        cpu = time.thread_time()
        rows[kind] = evaluate(args, trainer, x_test, test_k.to(device), device)
        rows[kind].update(train_seconds=seconds, steps=trainer.step, eval_cpu_seconds=time.thread_time() - cpu,
                          params=sum(p.numel() for p in trainer.net.parameters()), sde=repr(trainer.sde))
        print(f"{kind}: ODE {rows[kind]['ode_bpd']:.4f} ± {rows[kind]['ode_se']:.4f}, bound {rows[kind]['bound_bpd']:.4f} "
              f"± {rows[kind]['bound_se']:.4f} bits/dim")
    diff = rows["learned"]["bound_bpd"] - rows["vp"]["bound_bpd"]
    tolerance = 2 * math.hypot(rows["vp"]["bound_se"], rows["learned"]["bound_se"])
    result = {"command": run.command, "environment": run.env, "quick": args.quick,
              "args": vars(args) | {"steps": steps, "n_test": n_test}, "test_scored": n_test, "models": rows,
              "learned_minus_vp_bound_bpd": diff, "learned_not_worse_on_bound": bool(diff <= tolerance),
              "total_seconds": run.seconds(), "total_cpu_seconds": time.process_time()}
    run.write(result, markdown(result))
    return 0


def markdown(r: dict[str, Any]) -> str:
    vp, le = r["models"]["vp"], r["models"]["learned"]
    a = r["args"]
    lines = [
        "# Digits bits/dim: fixed VP vs learned schedule" + (" — quick run" if r["quick"] else ""),
        "",
        f"`{r['command']}`  ",
        r["environment"],
        "",
        f"8×8 digits (17 levels), {r['test_scored']} test images, one uniform dequantisation draw shared by every "
        "row; bits/dim = −log p / (64 ln 2) + log2 17 − 1 for the ODE and the Gaussian-decoder bound, nats / (64 ln 2) "
        "for the discrete-decoder bound (a bound on the code length of the integer levels themselves, with the decoder "
        "taking over where s/m is a quarter of a bin width). ± are standard "
        "errors over test images (the bound's include its Monte Carlo noise).",
        "",
        "| model | ODE likelihood | ELBO bound (Gaussian decoder) | ELBO bound (discrete decoder) | −log SNR at t_eps, T |",
        "|---|---|---|---|---|",
    ]
    for name, row in (("(a) fixed VP, likelihood weighting", vp), ("(b) learned schedule (VDM)", le)):
        g0, g1 = row["gamma_ends"]
        lines.append(f"| {name} | {row['ode_bpd']:.4f} ± {row['ode_se']:.4f} | {row['bound_bpd']:.4f} ± "
                     f"{row['bound_se']:.4f} | {row['discrete_bound_bpd']:.4f} ± {row['discrete_bound_se']:.4f} | "
                     f"{g0:.2f}, {g1:.2f} |")
    verdict = "not worse than" if r["learned_not_worse_on_bound"] else "**worse** than"
    lines += [
        "",
        f"Learned − fixed on the bound: {r['learned_minus_vp_bound_bpd']:+.4f} bits/dim: the learned schedule is "
        f"{verdict} the fixed one (within two combined standard errors).",
        "",
        "Bound terms (bits/dim; prior + diffusion + reconstruction, the offset log2 17 − 1 aside) and the Monte Carlo "
        f"standard error of one image's bound ({a['bound_t']} times):",
        "",
        "| model | prior | diffusion | reconstruction | MC s.e. per image |",
        "|---|---|---|---|---|",
    ]
    for name, row in (("(a) fixed VP", vp), ("(b) learned", le)):
        t = row["bound_terms_bpd"]
        lines.append(f"| {name} | {t['prior']:.4f} | {t['diffusion']:.4f} | {t['reconstruction']:.4f} | "
                     f"{row['bound_mc_se_per_image']:.4f} |")
    lines += [
        "",
        f"Both: UNet (base {a['base_channels']}, mults (1, 2), 1 res block; {vp['params']:,} parameters), {vp['steps']} "
        f"steps, batch {a['batch_size']}, AdamW lr {a['lr']:g} (warm-up, cosine), EMA {a['ema_decay']}, t_eps "
        f"{a['t_eps']:g}, fresh dequantisation every step. (a) `loss=\"dsm\"`, importance-sampled t, network input t; "
        "(b) `loss=\"elbo\"` with `LearnedScheduleSDE()` (VDM's initial endpoints −13.3, 5), uniform t, network input "
        f"`sde.noise_level(t)`. ODE: `log_likelihood` defaults, tol = {vp['ode_tol']:g} nats, Hutchinson trace, "
        f"{vp['ode_nfe_per_point_mean']:.0f} (a) and {le['ode_nfe_per_point_mean']:.0f} (b) NFE per image. "
        f"Training {vp['train_seconds']:.0f} s (a) and {le['train_seconds']:.0f} s (b) wall; whole "
        f"script {r['total_seconds']:.0f} s wall, {r['total_cpu_seconds']:.0f} s CPU.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
