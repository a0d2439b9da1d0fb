"""``sdediff likelihood``: the negative log-likelihood of a data split under a trained run through the
probability-flow ODE (:func:`sdediff.log_likelihood`; nats, bits/dim for digits), its ELBO bound
(:func:`sdediff.elbo.nll_bound`) and, for the exact mixture, the true value; in chunks shared out among the
processes of a torchrun job."""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch
from torch import Tensor

from .. import __version__
from ..data.toy import make_toy, toy_mixture
from ..distributed import chunk_generator, chunk_slices, local_device, process_rank, world_size
from ..likelihood import log_likelihood
from ..metrics import mean_se
from ..runs import Run
from .common import (
    CLIError,
    check_output,
    check_time_option,
    describe_sharding,
    held_out_generator,
    nll_bound_in_chunks,
    open_run,
    pick_device,
    set_threads,
    sharded_map,
    toy_train,
    write_json,
)


def load_points(args: argparse.Namespace, trained: Run, data: str) -> Tensor:
    """The points of ``--data`` / ``--split`` / ``--n``: dequantised digits, or held-out or training toy points."""
    if data == "digits":
        from ..data.digits import digits_to_model, load_digits

        levels, _ = load_digits(args.split)
        levels = levels[: args.n] if args.n else levels
        return digits_to_model(levels, torch.Generator().manual_seed(args.seed))  # uniform dequantisation
    n = args.n or 1000
    if args.split == "train":
        if trained.record is None or not trained.record.get("n_train"):
            raise CLIError(f"{trained.directory} has no run.json recording the training set; use --split test")
        return toy_train(data, int(trained.record["n_train"]), trained.seed)[:n]
    return make_toy(data, n, held_out_generator(trained.seed))


def run(args: argparse.Namespace) -> int:
    """``sdediff likelihood``: NLL of a data split through the probability-flow ODE, plus the ELBO bound."""
    device = local_device(pick_device(args.device))
    trained = open_run(args.run, args.checkpoint, device, ema=not args.raw_weights)
    data = args.data or trained.data
    if data is None:
        raise CLIError(f"{trained.directory} does not say which data it was trained on: pass --data")
    image = data == "digits"
    if (len(trained.shape) == 3) != image:
        raise CLIError(f"--data {data} does not fit the run's sample shape {trained.shape}")
    threads = set_threads(args.threads, device, small=not image)
    out = check_output(args.out or trained.directory / f"likelihood_{data}_{args.split}.json", args.overwrite)
    x = load_points(args, trained, data).to(device=device, dtype=torch.float64 if args.float64 else torch.float32)
    if args.float64:
        trained.net.double()
    eps = args.eps or trained.t_eps
    check_time_option("--eps" if args.eps else "the run's --t-eps", eps, trained.sde)
    d = math.prod(x.shape[1:])
    trace = args.trace if args.trace != "auto" else ("exact" if d <= 16 else "hutchinson")
    chunks = chunk_slices(len(x), args.batch_size)
    main = process_rank() == 0
    if main:
        print(f"sdediff {__version__} likelihood: {len(x)} {data} points ({args.split} split) under "
              f"{trained.describe()}; probability-flow ODE from eps={eps:g}, {trace} trace, rtol={args.rtol:g}, "
              f"atol={args.atol:g}, on {device}, {threads}; {describe_sharding(chunks)}")

    def score_chunk(k: int) -> tuple[Tensor, int, Tensor | None]:
        gen = chunk_generator(args.seed, k, device)  # the Hutchinson probes, then the bound's times and noise
        xk = x[chunks[k]]
        res = log_likelihood(trained.sde, trained.score, xk, eps=eps, rtol=args.rtol, atol=args.atol, trace=trace,
                             generator=gen, progress=args.progress and main and len(chunks) == 1)
        bound = None
        if args.bound:
            bound = nll_bound_in_chunks(trained.sde, trained.score, xk, eps, args.bound_times, gen).cpu()
        return res.log_prob.detach().cpu(), res.nfe, bound

    start = time.perf_counter()
    parts = sharded_map(device, score_chunk, len(chunks), args.progress)
    if parts is None:  # a torchrun rank other than 0: rank 0 writes the results
        return 0
    seconds = time.perf_counter() - start
    log_prob, nfe = torch.cat([part[0] for part in parts]), sum(part[1] for part in parts)
    nll, nll_se = mean_se(-log_prob)
    doc: dict[str, Any] = {"checkpoint": str(trained.checkpoint), "step": trained.step, "data": data,
                           "split": args.split, "n": len(x), "eps": eps, "trace": trace, "rtol": args.rtol,
                           "atol": args.atol, "nfe": nfe, "batch_size": args.batch_size, "world_size": world_size(),
                           "seconds": seconds, "nll": nll, "nll_se": nll_se, "nll_per_dim": nll / d}
    lines = [f"NLL {nll:.4f} ± {nll_se:.4f} nats ({nll / d:.4f} nats/dim), {nfe} NFE, {seconds:.1f} s"]
    if image:
        from ..data.digits import digits_bits_per_dim

        bpd, bpd_se = mean_se(digits_bits_per_dim(log_prob.cpu()))
        doc.update(bits_per_dim=bpd, bits_per_dim_se=bpd_se)
        lines.append(f"bits/dim {bpd:.4f} ± {bpd_se:.4f} (17 grey levels, uniform dequantisation; a uniform model "
                     f"scores {math.log2(17):.3f})")
    if args.bound:
        b, b_se = mean_se(torch.cat([part[2] for part in parts]))
        doc.update(nll_bound=b, nll_bound_se=b_se)
        lines.append(f"NLL upper bound (ELBO, {args.bound_times} times per point) {b:.4f} ± {b_se:.4f} nats")
        if image:
            from ..data.digits import digits_bits_per_dim

            doc["bits_per_dim_bound"] = float(digits_bits_per_dim(torch.tensor(-b)))
            lines[-1] += f" = {doc['bits_per_dim_bound']:.4f} bits/dim"
    if data == "gaussian_mixture":
        true, true_se = mean_se(-toy_mixture().log_prob(x.double().cpu(), trained.sde, eps))
        doc.update(true_nll=true, true_nll_se=true_se)
        lines.append(f"true NLL of the same points (exact mixture density at eps) {true:.4f} ± {true_se:.4f} nats")
    print("\n".join(lines))
    print(f"wrote {write_json(out, doc)}")
    return 0
