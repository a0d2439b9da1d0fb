"""``sdediff likelihood``: the negative log-likelihood of a data split under a trained run through the
probability-flow ODE (:func:`sdediff.log_likelihood`; nats, bits/dim for quantised data such as the digits and
images, nats in the data's own units for continuous arrays), its ELBO bound
(:func:`sdediff.elbo.nll_bound`) and, for the exact mixture, the true value; in chunks shared out among the
processes of a torchrun job."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import __version__
from ..data.digits import DIGITS_LEVELS
from ..data.toy import make_toy, toy_mixture
from ..distributed import chunk_generator, chunk_slices, local_device, process_rank, world_size
from ..likelihood import LikelihoodResult, auto_trace, bits_per_dim, log_likelihood
from ..likelihood.engine import cat_results
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
from .data import reload_data


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


def own_points(args: argparse.Namespace, trained: Run) -> Tensor:
    """The first ``--n`` points (default: up to 1000) of the run's recorded held-out split (``--split test``) or
    training split, read again from its source; quantised data dequantised uniformly at their own levels."""
    loaded, _ = reload_data(trained)
    points = loaded.held_out if args.split == "test" else loaded.train
    points = points[: args.n or 1000]
    return loaded.transform.dequantize(points, torch.Generator().manual_seed(args.seed))


def run(args: argparse.Namespace) -> int:
    """``sdediff likelihood``: NLL of a data split through the probability-flow ODE, plus the ELBO bound."""
    device = local_device(pick_device(args.device))
    trained = open_run(args.run, args.checkpoint, device, ema=not args.raw_weights)
    own = trained.dataset is not None and trained.dataset.kind not in ("toy", "digits")
    if own and args.data is not None and args.data != trained.data:
        raise CLIError(f"--data {args.data}: {trained.directory} was trained on {trained.data}; --data chooses among "
                       "the toy sets and digits for runs trained on them")
    data = args.data or trained.data
    if data is None:
        raise CLIError(f"{trained.directory} does not say which data it was trained on: pass --data")
    image = data == "digits" or (own and len(trained.shape) == 3)
    if not own and (len(trained.shape) == 3) != image:
        raise CLIError(f"--data {data} does not fit the run's sample shape {trained.shape}")
    threads = set_threads(args.threads, device, small=not image)
    name = (Path(data).stem or "data").replace(":", "-") if own else data
    out = check_output(args.out or trained.directory / f"likelihood_{name}_{args.split}.json", args.overwrite)
    values = trained.dataset.transform if own else None
    points = own_points(args, trained) if own else load_points(args, trained, data)
    x = points.to(device=device, dtype=torch.float64 if args.float64 else torch.float32)
    if args.float64:
        trained.net.double()
    eps = args.eps or trained.t_eps
    check_time_option("--eps" if args.eps else "the run's --t-eps", eps, trained.sde)
    d = math.prod(x.shape[1:])
    trace = args.trace if args.trace != "auto" else auto_trace(d)
    chunks = chunk_slices(len(x), args.batch_size)
    main = process_rank() == 0
    if main:
        accuracy = ", ".join(f"{k}={v:g}" for k, v in (("tol", args.tol), ("rtol", args.rtol), ("atol", args.atol))
                             if v is not None) or "default tol"
        print(f"sdediff {__version__} likelihood: {len(x)} {data} points ({args.split} split) under "
              f"{trained.describe()}; probability-flow ODE from eps={eps:g}, {trace} trace"
              f"{f' ({args.probes} probe(s))' if trace == 'hutchinson' else ''}, {accuracy}, on {device}, {threads}; "
              f"{describe_sharding(chunks)}")

    def score_chunk(k: int) -> tuple[LikelihoodResult, Tensor | None]:
        gen = chunk_generator(args.seed, k, device)  # the Hutchinson probes, then the bound's times and noise
        xk = x[chunks[k]]
        res = log_likelihood(trained.sde, trained.score, xk, eps=eps, tol=args.tol, rtol=args.rtol, atol=args.atol,
                             trace=trace, num_probes=args.probes, generator=gen,
                             progress=args.progress and main and len(chunks) == 1)
        bound = None
        if args.bound:
            bound = nll_bound_in_chunks(trained.sde, trained.score, xk, eps, args.bound_times, gen).cpu()
        return res.to("cpu"), bound

    start = time.perf_counter()
    parts = sharded_map(device, score_chunk, len(chunks), args.progress)
    if parts is None:  # a torchrun rank other than 0: rank 0 writes the results
        return 0
    seconds = time.perf_counter() - start
    res = cat_results([part[0] for part in parts])
    log_prob = res.log_prob.detach()
    nll, nll_se = mean_se(-log_prob)
    doc: dict[str, Any] = {"checkpoint": str(trained.checkpoint), "step": trained.step, "data": data,
                           "split": args.split, "n": len(x), "eps": eps, "trace": trace, "probes": res.num_probes,
                           "tol": res.tol, "rtol": args.rtol, "atol": args.atol, "nfe": res.nfe,
                           "nfe_per_point_mean": res.nfe_mean, "nfe_per_point_max": res.nfe_max,
                           "batch_size": args.batch_size, "world_size": world_size(), "seconds": seconds, "nll": nll,
                           "nll_se": nll_se, "nll_per_dim": nll / d,
                           "integration_error_mean": float(res.integration_error.mean())}
    lines = [f"NLL {nll:.4f} ± {nll_se:.4f} nats ({nll / d:.4f} nats/dim), {res.nfe_mean:.1f} NFE per point (max "
             f"{res.nfe_max}), {seconds:.1f} s; integration error estimate {doc['integration_error_mean']:.2g} nats"
             + (f" (tol {res.tol:g} nats per step)" if res.tol is not None else "")]
    levels = DIGITS_LEVELS if data == "digits" else (values.levels if own else None)
    if levels is not None:
        bpd = bits_per_dim(res, d, levels=levels)
        doc.update(bits_per_dim=bpd.mean, bits_per_dim_se=bpd.std_error, bits_per_dim_probe_se=bpd.probe_std_error)
        probe = (f"{bpd.probe_std_error:.4f} of it from the probes" if math.isfinite(bpd.probe_std_error) else
                 "probe part not estimated with one probe (--probes 2)")
        lines.append(f"bits/dim {bpd.mean:.4f} ± {bpd.std_error:.4f} (standard error over points, {probe}; {levels} "
                     f"levels, uniform dequantisation; a uniform model scores {math.log2(levels):.3f})")
    elif own:  # continuous: nats in the data's units, log p_y(y) = log p_x(x) + D log(dx/dy), dx/dy = 1/scale
        jacobian = d * math.log(values.scale)
        doc.update(nll_data_units=nll + jacobian, nll_data_units_se=nll_se, log_jacobian=-jacobian)
        lines.append(f"in the data's own units: NLL {nll + jacobian:.4f} ± {nll_se:.4f} nats "
                     f"({(nll + jacobian) / d:.4f} nats/dim; the value map adds D log s = {jacobian:.4f})")
    if args.bound:
        bound = torch.cat([part[1] for part in parts])
        b, b_se = mean_se(bound)
        doc.update(nll_bound=b, nll_bound_se=b_se)
        lines.append(f"NLL upper bound (ELBO, {args.bound_times} times per point) {b:.4f} ± {b_se:.4f} nats")
        if levels is not None:
            doc["bits_per_dim_bound"], doc["bits_per_dim_bound_se"] = mean_se(bits_per_dim(-bound, d, levels=levels))
            lines[-1] += f" = {doc['bits_per_dim_bound']:.4f} ± {doc['bits_per_dim_bound_se']:.4f} bits/dim"
        elif own:
            doc["nll_bound_data_units"] = b + d * math.log(values.scale)
            lines[-1] += f" = {doc['nll_bound_data_units']:.4f} nats in the data's units"
    if data == "gaussian_mixture":
        true, true_se = mean_se(-toy_mixture().log_prob(x.double().cpu(), trained.sde, eps))
        doc.update(true_nll=true, true_nll_se=true_se)
        lines.append(f"true NLL of the same points (exact mixture density at eps) {true:.4f} ± {true_se:.4f} nats")
    print("\n".join(lines))
    print(f"wrote {write_json(out, doc)}")
    return 0
