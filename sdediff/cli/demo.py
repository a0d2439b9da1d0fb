"""``sdediff demo``: train a small MLP on a 2-D toy set (:class:`sdediff.training.Trainer`), sample it with three
solvers from the same prior draws and score them against held-out data (:func:`sdediff.compare.compare_solvers`),
compute the held-out NLL three ways, and write samples.png, table.md, metrics.json and the checkpoints."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from .. import __version__
from .._io import atomic_write
from ..compare import Candidate, compare_solvers, markdown_table
from ..data.toy import make_toy, toy_mixture
from ..likelihood import log_likelihood
from ..metrics import mean_se
from ..runs import run_record
from ..sdes import VPSDE
from .common import (
    CLIError,
    add_plot,
    check_output_folder,
    command_options,
    fmt,
    held_out_generator,
    nll_bound_in_chunks,
    pick_device,
    print_written,
    scatter_png,
    set_threads,
    toy_train,
    write_json,
)

BOUND_RATIO = 2.0  # the bound the demo checks: mean sliced-W2 <= BOUND_RATIO x the noise floor
DEMO_SOLVERS = (
    Candidate("euler_maruyama", 300, label="SDE"),
    Candidate("pc", 150, {"snr": 0.16, "corrector_steps": 1}, label="PC"),
    Candidate("adaptive_ode", None, {"rtol": 1e-4, "atol": 1e-4}, label="ODE"),
)
SAMPLING = 2_000_006  # seed offset of the demo's sampling generator
T_EPS = 1e-5  # smallest training time and start of the likelihood ODE
EPS = 1e-3  # final time of the samplers


def run(args: argparse.Namespace) -> int:
    """``sdediff demo``: train a small model on a 2-D toy set, sample it three ways, check and plot."""
    from ..training import MLP, TrainConfig, Trainer, list_checkpoints, seed_everything

    wall = time.perf_counter()
    device = pick_device(args.device)
    threads = set_threads(args.threads, device, small=True)
    if args.n < 2 * args.splits:
        raise CLIError(f"--n {args.n} is too small for --splits {args.splits}: need at least 2 samples per split")
    out = check_output_folder(args.out)
    ckpt_dir = out / "checkpoints"
    for old in list_checkpoints(ckpt_dir):  # the demo's folder holds one run: a new demo replaces it
        old.unlink()
    sde = VPSDE()
    train = toy_train(args.data, args.n_train, args.seed)
    seed_everything(args.seed)
    net = MLP(2, hidden=args.hidden, depth=args.depth)
    params = sum(p.numel() for p in net.parameters())
    print(f"sdediff {__version__} demo: learn the 2-D '{args.data}' set ({args.n_train} points) with an MLP "
          f"({params:,} parameters) under {sde!r}, then sample it with three solvers.\n"
          f"device={device}, {threads}; {args.steps} training steps of batch {args.batch_size}", flush=True)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=min(100, args.steps // 10),
                      lr_schedule="cosine", ema_decay=args.ema_decay, seed=args.seed, t_eps=T_EPS,
                      log_every=max(1, min(100, args.steps)), out_dir=str(ckpt_dir), progress=args.progress,
                      device=str(device))
    trainer = Trainer(net, sde, train, config=cfg)
    options = command_options(args)
    write_json(ckpt_dir / "run.json", run_record("demo", args.data, (2,), args.seed, args.n_train, sde, net, options))
    start = time.perf_counter()
    trainer.fit()
    train_seconds = time.perf_counter() - start
    recent = [v for v in trainer.history[-100:] if math.isfinite(v)]
    final_loss = sum(recent) / max(len(recent), 1)
    print(f"trained in {train_seconds:.1f} s (final loss {fmt(final_loss)})", flush=True)
    score = trainer.score_fn(ema=True)

    # each sampler's samples in --splits splits, each against its own held-out set; the noise floor is the same
    # distance between two held-out sets of that size
    size = args.n // args.splits
    held_gen = held_out_generator(args.seed)
    gen = torch.Generator(device).manual_seed(args.seed + SAMPLING)

    def report(r) -> None:
        print(f"  {r.label:>3} {r.solver:<15} {r.nfe:7.1f} NFE {r.seconds:6.1f} s   sliced W2 {r.sliced_w2:.4f} = "
              f"{r.ratio:.2f} x floor", flush=True)

    result = compare_solvers(sde, score, (2,), DEMO_SOLVERS, n=size * args.splits, eps=EPS,
                             reference=lambda k, g: make_toy(args.data, k, g), splits=args.splits, floor_repeats=16,
                             generator=gen, reference_generator=held_gen, device=device, progress=args.progress,
                             report=report)
    floor_mean, floor_sd = result.noise_floor, result.noise_floor_sd
    rows = [{"kind": r.label, "solver": r.solver, "steps": "adaptive" if r.steps is None else r.steps,
             "options": r.options, "nfe": round(r.nfe, 1), "seconds": round(r.seconds, 2), "sliced_w2": r.sliced_w2,
             "sliced_w2_sd": r.sliced_w2_sd, "sliced_w2_splits": r.sliced_w2_splits, "noise_floor": floor_mean,
             "noise_floor_sd": floor_sd, "ratio": r.ratio, "within_bound": bool(r.ratio <= BOUND_RATIO), "finite": r.finite}
            for r in result.rows]

    # held-out NLL: exact probability-flow likelihood, the ELBO bound, and the truth where it is known
    start = time.perf_counter()
    x_nll = make_toy(args.data, args.nll_points, held_gen).to(device)
    res = log_likelihood(sde, score, x_nll, eps=T_EPS, trace="exact")
    bound = nll_bound_in_chunks(sde, score, x_nll, T_EPS, 64, gen)
    nll_seconds = time.perf_counter() - start
    nll_rows = [("model NLL, probability-flow ODE (exact trace)", *mean_se(-res.log_prob.detach()), res.nfe),
                ("model NLL upper bound (ELBO, 64 times per point)", *mean_se(bound), None)]
    if args.data == "gaussian_mixture":
        true = -toy_mixture().log_prob(x_nll.double().cpu(), sde, T_EPS)
        nll_rows.append(("true NLL (exact density of the data)", *mean_se(true), None))
    nll = {name: {"nats": m, "se": se, "nfe": nfe} for name, m, se, nfe in nll_rows}

    table = markdown_table([{"kind": r["kind"], "solver": r["solver"], "steps": r["steps"], "nfe": f"{r['nfe']:g}",
                             "seconds": f"{r['seconds']:.1f}", "sw": f"{r['sliced_w2']:.4f} ± {r['sliced_w2_sd']:.4f}",
                             "floor": f"{floor_mean:.4f} ± {floor_sd:.4f}", "ratio": f"{r['ratio']:.2f}",
                             "within": "yes" if r["within_bound"] else "no"} for r in rows], [
        ("kind", "sampler"), ("solver", "solver"), ("steps", "steps"), ("nfe", "NFE"), ("seconds", "time (s)"),
        ("sw", f"sliced W2 to held-out ({args.splits} × {size})"), ("floor", "noise floor"), ("ratio", "ratio"),
        ("within", f"ratio ≤ {BOUND_RATIO:g}")])
    nll_table = markdown_table(
        [{"what": name, "nats": f"{m:.4f} ± {se:.4f}"} for name, m, se, _ in nll_rows],
        [("what", f"held-out NLL ({args.nll_points} points, t_eps={T_EPS:g})"), ("nats", "nats")])
    notes = (f"Sliced W2 (256 random directions) of each sampler's {size * args.splits} samples, in {args.splits} splits "
             f"of {size} against {args.splits} held-out sets of {size}; noise floor: the same distance between two "
             f"held-out sets of {size} (16 pairs); ratio: mean distance / mean floor. All samplers "
             f"start from the same prior draws; NFE of the adaptive ODE is the mean per sample.")
    total = time.perf_counter() - wall
    timing = (f"wall time {total:.1f} s: training {train_seconds:.1f} s, sampling "
              f"{sum(r['seconds'] for r in rows):.1f} s, likelihood {nll_seconds:.1f} s ({threads})")
    print(f"\n{table}\n\n{nll_table}\n\n{notes}\n{timing}")
    if size < 1000:
        print(f"note: with {size} points per split the sliced-W2 check has little power (even a barely trained "
              f"model can pass); the default sizes make it meaningful")

    written: list[Path | None] = []
    if args.plot:
        panels = {f"held-out data ({args.data})": result.reference,
                  **{f"{r.label}: {r.solver}": result.samples[r.label] for r in result.rows}}
        add_plot(written, scatter_png(out / "samples.png", panels, reference=f"held-out data ({args.data})",
                                      title=f"sdediff demo: {args.steps} training steps, VP SDE"))
    written.append(atomic_write(out / "table.md", f"# sdediff demo\n\n{table}\n\n{nll_table}\n\n{notes}\n\n{timing}\n"))
    within = all(r["within_bound"] for r in rows)
    worst = max(rows, key=lambda r: r["ratio"])
    written.append(write_json(out / "metrics.json", {
        "sdediff": __version__, "options": options, "sde": repr(sde), "eps": EPS, "t_eps": T_EPS,
        "bound_ratio": BOUND_RATIO, "within_bound": within, "solvers": rows, "nll": nll,
        "nll_points": args.nll_points, "train": {"steps": trainer.step, "seconds": train_seconds, "final_loss": final_loss},
        "seconds": {"total": total, "train": train_seconds, "likelihood": nll_seconds},
        "threads": torch.get_num_threads(), "device": str(device)}))
    written.append(ckpt_dir)
    print(f"\nlargest ratio to the noise floor: {worst['ratio']:.2f} ({worst['kind']}, {worst['solver']}); "
          + ("every sampler is" if within else "not every sampler is") + f" within {BOUND_RATIO:g}x the floor")
    print_written(written)
    print(f"try: sdediff sample --run {out} --solver heun --steps 50   |   sdediff likelihood --run {out}")
    return 1 if (args.check and not within) else 0
