"""``sdediff train``: fit a score network into a run folder (checkpoints, metrics.json, run.json, config.toml and a
sample plot), through :class:`sdediff.training.Trainer`."""

from __future__ import annotations

import argparse
import math
import re
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import __version__
from .._io import atomic_write
from ..config import dump_toml
from ..data.record import DatasetRecord, legacy_dataset
from ..data.toy import TOY_CLASSES, make_toy
from ..runs import read_run_record, resume_conflicts, resumed_record, run_record
from .common import (
    CLIError,
    add_plot,
    check_output_folder,
    check_time_option,
    command_options,
    fmt,
    held_out_generator,
    make_sde,
    num_classes,
    pick_device,
    plot_samples,
    print_written,
    set_threads,
    toy_metrics,
    toy_train,
    write_json,
)
from .data import (
    CLASSIFIER_FILE,
    SPLIT_FILE,
    TrainTransform,
    check_data_options,
    fit_classifier,
    is_builtin,
    load_training_data,
    picture_kind,
    save_grid,
    save_split,
)

# Defaults that depend on the data: 2-D toy sets and arrays (MLP) or images such as the 8x8 digits (UNet).
TRAIN_PRESETS: dict[str, dict[str, Any]] = {  # the digits values are those of benchmarks/digits_nll.py
    "2d": {"steps": 4000, "batch_size": 512, "lr": 2e-3, "warmup_steps": 100, "ema_decay": 0.995,
           "weighting": "simple", "t_sampling": "uniform", "eval_samples": 2000, "eval_nll_points": 256},
    "image": {"steps": 2500, "batch_size": 128, "lr": 1e-3, "warmup_steps": 200, "ema_decay": 0.999,
              "weighting": "likelihood", "t_sampling": "importance", "eval_samples": 64, "eval_nll_points": 64},
}


def data_units(result: dict[str, Any], dataset: DatasetRecord) -> dict[str, float]:
    """The evaluation's NLL and bound (nats on the model's ``[-1, 1]``) in the data's units: bits/dim of quantised
    data (:meth:`ValueTransform.bits_per_dim`), nats of continuous data with the log-Jacobian of the value map,
    :math:`-\\log p_y(y) = -\\log p_x(x) + D \\log s` (``s`` data units per model unit; nothing for the toy sets,
    whose map is the identity)."""
    values, d = dataset.transform, dataset.num_dims
    if values.quantised:
        return {"bits_per_dim": float(values.bits_per_dim(torch.tensor(-result["nll"]), d)),
                "bits_per_dim_bound": float(values.bits_per_dim(torch.tensor(-result["nll_bound"]), d))}
    if values.scale == 1 and values.centre == 0:
        return {}
    return {"nll_data_units": result["nll"] + d * math.log(values.scale),
            "nll_bound_data_units": result["nll_bound"] + d * math.log(values.scale)}


def train_data(data: str, n_train: int, seed: int) -> tuple[Tensor, Any, Tensor, tuple[int, ...]]:
    """``(train, transform, held_out, shape)`` of a data set name."""
    if data == "digits":
        from ..data.digits import digits_to_model, load_digits

        train, _ = load_digits("train")
        test, _ = load_digits("test")
        return train, digits_to_model, test, tuple(train.shape[1:])
    held = make_toy(data, 20_000, held_out_generator(seed))
    return toy_train(data, n_train, seed), None, held, (2,)


def build_model(args: argparse.Namespace, shape: tuple[int, ...], classes: int | None) -> tuple[torch.nn.Module, str]:
    """The network of ``--model`` (auto: a UNet for images ``(C, H, W)``, an MLP otherwise) with its options, and
    how it was picked. The digits keep their UNet of two levels; other images get :func:`unet_config`'s choice
    for their shape, with the UNet flags given overriding it."""
    from ..training import MLP, UNet
    from ..training.models import unet_config

    kind = args.model if args.model != "auto" else ("unet" if len(shape) == 3 else "mlp")
    how = f"{'auto' if args.model == 'auto' else '--model'}: {kind} for samples of shape {list(shape)}"
    embed: dict[str, Any] = {} if args.time_embed is None else {"time_embed": args.time_embed}
    if classes is not None:
        embed["num_classes"] = classes
    if kind == "unet":
        if len(shape) != 3:
            raise CLIError(f"--model unet needs image data (C, H, W); {args.data} has shape {shape}")
        if args.data == "digits":
            return UNet(in_channels=shape[0], base_channels=args.base_channels or 32,
                        channel_mults=tuple(args.channel_mults or (1, 2)), num_res_blocks=args.num_res_blocks or 1,
                        **embed), how
        given = {"base_channels": args.base_channels, "num_res_blocks": args.num_res_blocks,
                 "channel_mults": None if args.channel_mults is None else tuple(args.channel_mults)}
        overrides = {k: v for k, v in given.items() if v is not None}
        return UNet(**unet_config(shape, **overrides, **embed)), how + ", unet_config" + (
            f" with {', '.join('--' + k.replace('_', '-') for k in overrides)}" if overrides else "")
    return MLP(math.prod(shape), hidden=args.hidden, depth=args.depth, **embed), how


def run(args: argparse.Namespace) -> int:
    """``sdediff train``: fit a score network, write checkpoints, metrics and a sample plot to ``--out``."""
    from ..training import TrainConfig, Trainer, latest_checkpoint, list_checkpoints, seed_everything

    check_data_options(args)
    builtin = is_builtin(args.data)
    device = pick_device(args.device)
    slug = args.data if builtin else (Path(args.data).stem or "data").replace(":", "-")
    out = check_output_folder(Path(args.out) if args.out else Path("runs") / f"{slug}-{args.sde}")
    sde = make_sde(args)
    check_time_option("--t-eps", args.t_eps, sde)
    loaded = None
    if builtin:
        train, transform, held, shape = train_data(args.data, args.n_train, args.seed)
        dataset = legacy_dataset(args.data, shape, args.seed, None if args.data == "digits" else args.n_train)
    else:
        loaded, dataset = load_training_data(args)
        train, held, shape = loaded.train, loaded.held_out, loaded.sample_shape
        if args.hflip and len(shape) != 3:
            raise CLIError(f"--hflip flips images (C, H, W); {args.data} has samples of shape {list(shape)}")
        transform = TrainTransform(loaded.transform, args.hflip) if loaded.transform.quantised or args.hflip else None
    image = len(shape) == 3
    for key, value in TRAIN_PRESETS["image" if image else "2d"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    threads = set_threads(args.threads, device, small=not image)
    labels, classes = None, None
    if args.class_cond:
        classes = num_classes(args.data) if builtin else loaded.num_classes
        if classes is None:
            raise CLIError(f"--class-cond needs labelled data (digits, mnist, {', '.join(TOY_CLASSES)}, a folder of "
                           f"class subfolders, an .npz with labels 'y'); {args.data} has no labels")
        if loaded is not None:
            labels = loaded.train_labels
        elif args.data == "digits":
            from ..data.digits import load_digits

            labels = load_digits("train")[1]
        else:
            labels = toy_train(args.data, args.n_train, args.seed, labels=True)[1]
    seed_everything(args.seed)
    net, model_choice = build_model(args, shape, classes)
    options = command_options(args)
    options["out"] = str(out)
    record = run_record("train", args.data, shape, args.seed, args.n_train if builtin and not image else None, sde,
                        net, options, dataset=dataset, model_choice=model_choice)

    if list_checkpoints(out) and not args.resume:
        raise CLIError(f"{out} already holds checkpoints: pass --resume to continue that run, or choose another --out")
    old = read_run_record(out) if args.resume else None
    changed = resume_conflicts(old, record) if old is not None else []
    if changed:
        raise CLIError(f"--resume: {out} was trained with other {', '.join(changed)} "
                       f"({', '.join(f'{k}={old.get(k)!r}' for k in changed)}); use the same options "
                       f"(e.g. --config {out / 'config.toml'}) or another --out")

    try:
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                          warmup_steps=args.warmup_steps, lr_schedule=args.lr_schedule,
                          grad_clip=args.grad_clip or None, ema_decay=args.ema_decay, amp=args.amp, seed=args.seed,
                          prediction=args.prediction, weighting=args.weighting, t_sampling=args.t_sampling,
                          t_eps=args.t_eps, log_every=args.log_every, eval_every=args.eval_every,
                          eval_samples=args.eval_samples, eval_solver=args.eval_solver,
                          eval_sample_steps=args.eval_sample_steps, eval_nll_points=args.eval_nll_points,
                          ckpt_every=args.ckpt_every, keep_checkpoints=args.keep_checkpoints, out_dir=str(out),
                          progress=args.progress, device=str(device),
                          cond_drop_prob=args.cond_drop_prob if args.class_cond else 0.0)
    except (TypeError, ValueError) as err:  # options that parse but that the trainer refuses
        raise CLIError(re.sub(r"TrainConfig\.(\w+)", lambda m: "--" + m[1].replace("_", "-"), str(err))) from None
    captured: dict[str, Tensor | None] = {"samples": None}

    def eval_fn(trainer: Trainer, samples: Tensor | None) -> dict[str, Any]:
        captured["samples"] = samples
        if samples is None or image or not builtin:
            return {}
        return toy_metrics(samples, args.data, held_out_generator(args.seed + 1 + trainer.step))

    try:
        trainer = Trainer(net, sde, train, labels, config=cfg, transform=transform, eval_data=held, eval_fn=eval_fn)
    except ValueError as err:
        raise CLIError(str(err)) from None
    if old is not None:  # a resume keeps the run's own run.json and config.toml, and adds itself to the history
        found = list_checkpoints(out)
        write_json(out / "run.json", resumed_record(old, record, found[-1].name if found else None))
    else:
        write_json(out / "run.json", record)
    if loaded is not None:
        save_split(out, loaded)
    if old is None or not (out / "config.toml").is_file():
        atomic_write(out / "config.toml", dump_toml(
            {k: v for k, v in options.items() if k not in ("resume",)},
            header=f"sdediff train options of this run (sdediff {__version__}); rerun or continue with\n"
                   f"  sdediff train --config {out / 'config.toml'} --resume"))
    print(f"sdediff {__version__} train: {args.data} {tuple(train.shape)}, {sde!r}, {type(net).__name__} "
          f"({sum(p.numel() for p in net.parameters()):,} parameters), {args.steps} steps of batch {args.batch_size} "
          f"on {device}, {threads}; run folder {out}")
    start = time.perf_counter()
    try:
        trainer.fit(resume=args.resume)
    finally:
        trainer.close()
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {}
    if args.eval_samples or args.eval_nll_points:
        if trainer.evals and trainer.evals[-1]["step"] == trainer.step and captured["samples"] is not None:
            result = trainer.evals[-1]
        else:
            print("final evaluation: sampling and held-out NLL ...", flush=True)
            result = trainer.evaluate()
        if "nll" in result:
            result.update(data_units(result, dataset))
        trainer.write_metrics()
    written = [latest_checkpoint(out), out / "metrics.json", out / "run.json", out / "config.toml"]
    if loaded is not None:
        written.append(out / SPLIT_FILE)
    if captured["samples"] is not None and args.plot:
        title = f"{slug}, step {trainer.step}, {args.eval_solver} {args.eval_sample_steps} steps"
        if loaded is None:
            ref = held[: captured["samples"].shape[0]] if not image else None
            add_plot(written, plot_samples(out / "samples.png", captured["samples"], args.data, ref, title))
        elif picture_kind(shape, dataset.transform) == "grid":
            written.append(save_grid(out / "samples.png", captured["samples"][:64], dataset.transform))
        elif picture_kind(shape, dataset.transform) == "scatter":
            to_data = dataset.transform.to_data
            add_plot(written, plot_samples(out / "samples.png", to_data(captured["samples"]), None,
                                           to_data(held[: captured["samples"].shape[0]]), title))
    classifier = None
    if loaded is not None and image and loaded.train_labels is not None and args.classifier_steps:
        if not (args.resume and (out / CLASSIFIER_FILE).is_file()):
            print(f"training the feature classifier ({args.classifier_steps} steps) ...", flush=True)
            classifier = fit_classifier(out, loaded, args.classifier_steps, args.seed, device)
            write_json(out / "run.json", {**read_run_record(out), "classifier": classifier})
        written.append(out / CLASSIFIER_FILE)
    recent = [v for v in trainer.history[-100:] if math.isfinite(v)]
    summary = [f"trained to step {trainer.step} in {seconds:.1f} s (loss {fmt(sum(recent) / max(len(recent), 1))})"]
    if "nll" in result:
        line = f"held-out NLL {result['nll']:.4f} nats (bound {result['nll_bound']:.4f})"
        if "bits_per_dim" in result:
            line += f" = {result['bits_per_dim']:.3f} bits/dim (bound {result['bits_per_dim_bound']:.3f})"
        elif "nll_data_units" in result:
            line += (f" on [-1, 1]; {result['nll_data_units']:.4f} nats in the data's units (bound "
                     f"{result['nll_bound_data_units']:.4f})")
        summary.append(line + f" on {args.eval_nll_points} points")
    if classifier is not None:
        summary.append(f"feature classifier: {100 * classifier['held_out_accuracy']:.1f}% held-out accuracy after "
                       f"{classifier['steps']} steps ({classifier['seconds']:.1f} s); sdediff sample scores samples "
                       "in its features (not FID)")
    if "sliced_w2" in result:
        summary.append(f"sliced W2 of {args.eval_samples} samples to held-out data {result['sliced_w2']:.4f} "
                       f"(noise floor {result['noise_floor']:.4f})")
    print("\n".join(summary))
    print_written(written)
    return 0
