"""``sdediff sample``: samples of a trained run (:func:`sdediff.load_run`) with any registered solver through
:func:`sdediff.sample`, in chunks shared out among the processes of a torchrun job; writes the samples, a plot and
a JSON sidecar."""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from typing import Any

import torch
from torch import Tensor

from .. import __version__
from .._io import remove_stale_temporaries
from ..calibrate import GRID_FILE, calibrate_grid, load_calibrated_grid
from ..compare import nearest_class_accuracy
from ..data import LoadedData
from ..data.toy import TOY_DATASETS, make_toy
from ..distributed import chunk_generator, chunk_slices, local_device, process_rank, world_size
from ..features import frechet_distance
from ..guidance import ClassifierFreeNet
from ..runs import Run
from ..sampling import sample
from ..score import ScoreModel
from ..solvers import get_solver
from .common import (
    CLIError,
    add_plot,
    check_output,
    check_time_option,
    chunk_results,
    describe_sharding,
    held_out_generator,
    open_run,
    pick_device,
    plot_samples,
    print_written,
    sample_file,
    set_threads,
    toy_metrics,
    write_json,
)
from .data import (
    CLASSIFIER_FILE,
    FeatureScores,
    inception_features,
    picture_kind,
    reload_data,
    save_grid,
    to_data_units,
)


def solver_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--solver-option`` pairs, checked against the solver's options."""
    options = dict(args.solver_option or [])
    try:
        get_solver(args.solver, **options)
    except (TypeError, ValueError) as err:
        raise CLIError(f"--solver {args.solver} with options {options}: {err}") from None
    return options


def sample_labels(run: Run, classes: list[int] | None, scale: float, n: int) -> Tensor | None:
    """The class of each of the ``n`` samples (``classes`` in equal consecutive blocks), or ``None``: unconditional."""
    known = getattr(run.net, "num_classes", None)
    if classes is None:
        if scale != 0:
            raise CLIError("--guidance-scale needs --classes, the classes to guide towards")
        return None
    if known is None:
        raise CLIError(f"--classes: {run.checkpoint} holds an unconditional model; train one with --class-cond")
    if max(classes) >= known:
        raise CLIError(f"--classes: the model knows classes 0..{known - 1}, got {max(classes)}")
    return torch.tensor(classes).repeat_interleave(math.ceil(n / len(classes)))[:n]


def calibrated_grid(run: Run, args: argparse.Namespace, options: dict[str, Any], device: torch.device,
                    labels: Tensor | None, progress: bool) -> tuple[Tensor, dict[str, Any]]:
    """``--time-grid calibrated``: the grid saved in the run for this checkpoint, solver, options, steps and final time
    (``sdediff bench --run RUN --save-grids``), else :func:`sdediff.calibrate_grid` for the run's model and the chosen
    solver on ``--calibration-pilot`` prior draws (seeded apart from the samples; the same grid in every process)."""
    if labels is not None:
        raise CLIError("--time-grid calibrated: not available with --classes (calibrate on unconditional runs)")
    try:
        saved = load_calibrated_grid(run.directory, solver=args.solver, options=options, steps=args.steps, eps=args.eps,
                                     checkpoint=run.checkpoint.name)
    except ValueError as err:  # a damaged file: calibrate afresh
        print(f"warning: {err}; calibrating afresh", file=sys.stderr)
        saved = None
    if saved is not None:
        return torch.tensor(saved["times"], dtype=torch.float64), {**saved, "saved": str(run.directory / GRID_FILE)}
    gen = torch.Generator(device).manual_seed(args.seed + 7919)
    pilot = run.sde.prior_sample((args.calibration_pilot, *run.shape), generator=gen, device=device)
    start = time.perf_counter()
    try:  # calibrate_grid checks the solver (deterministic, fixed-step) and the sizes before any work
        cal = calibrate_grid(run.sde, run.score, pilot, args.steps, args.solver, eps=args.eps,
                             max_evals=args.calibration_evals, progress=progress, **options)
    except ValueError as err:
        raise CLIError(f"--time-grid calibrated: {err} (e.g. unipc, dpm_solver, heun)") from err
    info = {"times": cal.times.tolist(), "pilot": args.calibration_pilot, "pilot_rmse": cal.rmse, "start": cal.start,
            "start_rmse": cal.start_rmse[cal.start], "accepted": cal.accepted, "holdout_rmse": cal.holdout_rmse,
            "start_holdout_rmse": cal.start_holdout_rmse, "evals": cal.evals, "reference_nfe": cal.reference_nfe,
            "search_nfe": cal.search_nfe, "seconds": time.perf_counter() - start}
    return cal.times, info


PLOT_IMAGES = 64  # images shown in the PNG of an image run (the first ones)
GRID_COLUMNS = 8  # samples per class in the PNG of class-conditional samples


def grid_rows(n: int, classes: list[int] | None) -> list[list[int]]:
    """The indices of the samples in each row of a class-conditional grid, one row per class of ``classes`` (whose
    samples come in equal consecutive blocks), all rows as long as the shortest (at most :data:`GRID_COLUMNS`);
    ``[]`` without classes."""
    if not classes:
        return []
    block = math.ceil(n / len(classes))
    starts = [c * block for c in range(len(classes)) if c * block < n]
    columns = min(GRID_COLUMNS, block, n - starts[-1])
    return [list(range(start, start + columns)) for start in starts]


def fid_report(inception, sample_features: Tensor, data: LoadedData, seed: int) -> dict[str, Any]:
    """``--fid``: FID between the held-out images and the samples in pytorch-fid's Inception features, and the floor:
    as many training images (at most all of them) against the same held-out images."""
    values = data.transform
    held = inception(to_data_units(data.held_out, values))
    subset = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed + 29))[:len(sample_features)]
    floor = inception(to_data_units(data.train[subset], values))
    return {"fid": float(frechet_distance(held, sample_features)), "fid_floor": float(frechet_distance(held, floor)),
            "fid_floor_n": len(subset)}


def run(args: argparse.Namespace) -> int:
    """``sdediff sample``: draw samples from a trained run with any solver and save them."""
    device = local_device(pick_device(args.device))
    trained = open_run(args.run, args.checkpoint, device, ema=not args.raw_weights)
    image = len(trained.shape) == 3
    threads = set_threads(args.threads, device, small=not image)
    options = solver_options(args)
    check_time_option("--eps", args.eps, trained.sde)
    n = args.n or (64 if image else 2000)
    slug = args.solver.replace(":", "-")
    out = check_output(args.out or trained.directory / f"samples_{slug}_{args.steps}.safetensors", args.overwrite)
    for beside in [out.with_suffix(".json")] + ([out.with_suffix(".png")] if args.plot else []):
        check_output(beside, args.overwrite, flag="the file beside --out")
    labels = sample_labels(trained, args.classes, args.guidance_scale, n)
    own = trained.dataset is not None and trained.dataset.kind not in ("toy", "digits")
    values = trained.dataset.transform if own else None
    picture = picture_kind(trained.shape, values) if own else None
    if args.fid and picture != "grid":
        raise CLIError("--fid needs a run trained on 8-bit images with 1 or 3 channels")
    inception = inception_features(device) if args.fid else None
    has_classifier = own and (trained.directory / CLASSIFIER_FILE).is_file()
    data = reload_data(trained)[0] if has_classifier or inception is not None or picture == "scatter" else None
    if has_classifier and min(n, len(data.held_out)) < 2:
        print(f"no feature scores: they need at least 2 samples and 2 held-out images ({len(data.held_out)} held out)")
        has_classifier = False
    scores = FeatureScores(trained.directory, data, device, args.seed) if has_classifier else None
    array_units = own and trained.dataset.kind == "array"  # arrays are saved in their own units, images on [-1, 1]
    rows = grid_rows(n, args.classes if picture == "grid" else None)
    show = torch.zeros(n, dtype=torch.bool)  # the samples the PNG shows
    show[torch.tensor([i for row in rows for i in row]) if rows else slice(0, PLOT_IMAGES)] = True
    chunks = chunk_slices(n, args.batch_size)
    main = process_rank() == 0
    if main:
        print(f"sdediff {__version__} sample: {n} samples from {trained.describe()} with {args.solver} "
              f"({args.steps} steps{', ' + str(options) if options else ''}) on {device}, {threads}; "
              f"{describe_sharding(chunks)}")
    time_grid, calibration = args.time_grid, None
    if time_grid == "calibrated":
        time_grid, calibration = calibrated_grid(trained, args, options, device, labels, progress=args.progress and main)
        if main and "saved" in calibration:
            print(f"using the calibrated {args.steps}-step grid saved in {calibration['saved']} (pilot RMSE "
                  f"{calibration.get('pilot_rmse', math.nan):.3g}); no calibration run")
        elif main:
            verdict = "kept" if calibration["accepted"] else f"not better on the held-out quarter: using {calibration['start']}"
            print(f"calibrated {args.steps}-step grid on {args.calibration_pilot} pilot paths: RMSE "
                  f"{calibration['pilot_rmse']:.3g} (best standard grid, {calibration['start']}: "
                  f"{calibration['start_rmse']:.3g}); held-out quarter {calibration['holdout_rmse']:.3g} vs "
                  f"{calibration['start_holdout_rmse']:.3g}, {verdict}; {calibration['seconds']:.1f} s")

    @torch.no_grad()
    def draw(k: int) -> tuple[Tensor, Tensor, int]:
        size = chunks[k].stop - chunks[k].start
        score = trained.score if labels is None else ScoreModel(
            ClassifierFreeNet(trained.net, labels[chunks[k]], args.guidance_scale), trained.sde, trained.score.prediction,
            trained.score.time_input)
        info = sample(trained.sde, score, (size, *trained.shape), solver=args.solver, steps=args.steps, eps=args.eps,
                      generator=chunk_generator(args.seed, k, device), device=device, time_grid=time_grid,
                      denoise=args.denoise, progress=args.progress and main and len(chunks) == 1, return_info=True,
                      **options)
        per_sample = info.stats.get("nfe_per_sample")
        if not isinstance(per_sample, Tensor):
            per_sample = torch.full((size,), info.nfe)
        return info.samples.cpu(), per_sample.double().cpu(), info.nfe

    start = time.perf_counter()
    parts = chunk_results(device, draw, len(chunks), args.progress)
    if parts is None:  # a torchrun rank other than 0: rank 0 writes the results
        return 0
    toy = trained.data in TOY_DATASETS and len(trained.shape) == 1
    kept: list[Tensor] = []  # what the summary needs: every 2-D point (for the metrics), else the images plotted
    fid_features: list[Tensor] = []
    nfe, nfe_sum, nonfinite, done = 0, 0.0, 0, 0
    remove_stale_temporaries(out.parent, re.escape(out.name))  # of an earlier run of this command killed mid-write
    with sample_file(out, n) as put:  # each chunk goes to the file as it comes
        for x_k, per_sample, nfe_k in parts:
            put(to_data_units(x_k, values) if array_units else x_k)
            nfe, nfe_sum = nfe + nfe_k, nfe_sum + float(per_sample.sum())
            nonfinite += int((~torch.isfinite(x_k)).flatten(1).any(dim=1).sum())
            kept.append(x_k if toy or picture == "scatter" else x_k[show[done:done + len(x_k)]])
            done += len(x_k)
            if scores is not None:
                scores.add(x_k)
            if inception is not None:
                fid_features.append(inception(to_data_units(x_k, values)))
    seconds = time.perf_counter() - start
    x = torch.cat(kept)
    nfe_per_sample = nfe_sum / n
    if nonfinite:
        print(f"warning: {nonfinite} samples are not finite", file=sys.stderr)
    written = [out]
    doc: dict[str, Any] = {"checkpoint": str(trained.checkpoint), "step": trained.step, "solver": args.solver,
                           "steps": args.steps, "options": options, "n": n, "eps": args.eps, "seed": args.seed,
                           "denoise": args.denoise, "time_grid": args.time_grid, "nfe": nfe,
                           "nfe_per_sample": nfe_per_sample, "batch_size": args.batch_size,
                           "world_size": world_size(), "seconds": seconds, "samples": str(out),
                           "classes": args.classes, "guidance_scale": args.guidance_scale, "nonfinite": nonfinite}
    if calibration is not None:
        doc["calibration"] = calibration
    line = f"{n} samples in {seconds:.2f} s, {nfe_per_sample:.4g} NFE"
    if toy and labels is not None:  # class-conditional: is each sample in the class asked for?
        ref, ref_labels = make_toy(trained.data, 5000, held_out_generator(trained.seed + 1), dtype=x.dtype,
                                   return_labels=True)
        doc.update(nearest_class_accuracy(x, labels, ref, ref_labels))
        line += f"; {100 * doc['class_accuracy']:.1f}% in the class asked for (nearest held-out point)"
    elif toy:
        doc.update(toy_metrics(x, trained.data, held_out_generator(trained.seed + 1)))
        line += f"; sliced W2 to held-out data {doc['sliced_w2']:.4f} (noise floor {doc['noise_floor']:.4f})"
    if own:
        doc["units"] = "the data's own" if array_units else "the model's [-1, 1]"
    if scores is not None:
        doc["features"] = scores.summary(labels)
        line += "\n" + scores.describe(doc["features"])
    if inception is not None:
        doc.update(fid_report(inception, torch.cat(fid_features), data, args.seed))
        line += (f"\nFID (pytorch-fid Inception features) {doc['fid']:.4g} to {len(data.held_out)} held-out images; "
                 f"floor ({doc['fid_floor_n']} training images) {doc['fid_floor']:.4g}")
    print(line)
    if args.plot and own:
        title = f"{args.solver}, {args.steps} steps, NFE {nfe_per_sample:.4g}"
        if picture == "grid":
            written.append(save_grid(out.with_suffix(".png"), x, values, columns=len(rows[0]) if rows else GRID_COLUMNS,
                                     rows=len(rows) if rows else None))
        elif picture == "scatter":
            add_plot(written, plot_samples(out.with_suffix(".png"), values.to_data(x), None,
                                           values.to_data(data.held_out[:2000]), title))
        else:
            print(f"no picture for samples of shape {list(trained.shape)}")
    elif args.plot:
        ref, classes = None, None
        if toy and labels is not None:
            ref, ref_labels = make_toy(trained.data, 2000, held_out_generator(trained.seed), return_labels=True)
            classes = (labels, ref_labels)
        elif trained.data in TOY_DATASETS:
            ref = make_toy(trained.data, min(n, 2000), held_out_generator(trained.seed))
        add_plot(written, plot_samples(out.with_suffix(".png"), x, trained.data, ref,
                                       f"{args.solver}, {args.steps} steps, NFE {nfe_per_sample:.4g}", classes))
    written.append(write_json(out.with_suffix(".json"), doc))
    print_written(written)
    return 0
