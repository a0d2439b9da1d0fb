"""Which standard image-training tricks change test bits/dim or sample quality on the 8×8 digits.

The same small UNet (:class:`sdediff.UNet`, base ``--base-channels``, mults (1, 2), one res block) is trained by
:class:`sdediff.Trainer` on the digits' fixed training split (``sdediff.data.load("digits")``, 1438 images) from the
same seed (same initial weights, same batches and noise) with the same budget (``--steps`` at ``--batch-size``,
AdamW, warm-up then cosine), fresh uniform dequantisation every step, under three configurations:

* **baseline**: likelihood weighting :math:`\\lambda = g^2` with importance-sampled times, EMA ``--ema-decay``;
* **simple**: the ε-MSE of DDPM (``weighting="simple"``, :math:`\\lambda = s^2`) with uniform times, same EMA;
* **hflip**: the baseline with random horizontal flips (the transform of ``sdediff train --hflip``,
  :class:`sdediff.cli.data.TrainTransform`).

Four models are scored, the three EMA models and the baseline's raw weights (``trainer.score_fn(ema=False)``, same
run), all on the same points: the test split (359 images unless ``--n-test``) with one shared dequantisation draw.

* **ODE bits/dim**: :func:`sdediff.log_likelihood` with its defaults (per-image Adams steps, ``--tol`` nats,
  Hutchinson trace with one Rademacher probe per image, the same probe seed for every model);
* **ELBO bits/dim**: :func:`sdediff.elbo` (Gaussian decoder, ``--bound-t`` importance-sampled times per image, the
  same generator seed for every model); both via ``-log p / (64 ln 2) + log2 17 - 1``;
* **sample quality** in the features of a small classifier (:func:`sdediff.features.train_classifier` on the training
  split, once; not FID): ``--sample-sets`` sets of ``--samples`` images from :func:`sdediff.sample` (``dpm_solver``,
  20 steps, eps 1e-3; the same seeds for every model), quantised to the 17 levels, against the test images:
  Fréchet distance, kernel distance (KID's estimator, 10 subset pairs) and the classifier score. The floor is as many
  disjoint training images per set against the same test images; the training images mirrored left-right, scored the
  same way, show how far the flipped data are from the digits.

Differences to the baseline are paired: per test image for the likelihoods, per sample set for the distances, with
the standard error of the paired differences.

Writes ``image_tricks.{md,json}`` (``--quick``: ``*_quick.*``) into ``--out``.

    python benchmarks/image_tricks.py            # the reported run (about 12 min of CPU time on one thread)
    python benchmarks/image_tricks.py --quick    # smoke run (about 20 s)
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any

import common  # a sibling script (benchmarks/README.md)
import torch
from torch import Tensor

import sdediff
from sdediff.cli.data import TrainTransform
from sdediff.data import LoadedData, digits_bits_per_dim, load
from sdediff.features import (
    FeatureClassifier,
    class_probabilities,
    classifier_score,
    extract_features,
    frechet_distance,
    kernel_distance,
    train_classifier,
)
from sdediff.metrics import mean_se
from sdediff.training import TrainConfig, Trainer, UNet

LEVELS = 17


@dataclass(frozen=True)
class Recipe:
    """One training configuration: its key, label, loss weighting, time sampling and flips."""

    key: str
    label: str
    weighting: str
    t_sampling: str
    hflip: bool


RECIPES = (
    Recipe("baseline", "likelihood weighting + importance t", "likelihood", "importance", False),
    Recipe("simple", "simple weighting (ε-MSE) + uniform t", "simple", "uniform", False),
    Recipe("hflip", "baseline + horizontal flips", "likelihood", "importance", True),
)


@dataclass(frozen=True)
class Scored:
    """One evaluated model: its key, label, recipe key and whether it uses the EMA weights."""

    key: str
    label: str
    recipe: str
    ema: bool


MODELS = (
    Scored("baseline", "baseline (EMA)", "baseline", True),
    Scored("baseline_raw", "baseline, raw weights", "baseline", False),
    Scored("simple", "simple + uniform t (EMA)", "simple", True),
    Scored("hflip", "baseline + hflip (EMA)", "hflip", True),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_run_args(p, steps=1500, quick_steps=20, batch_size=128, lr=1e-3)
    p.add_argument("--warmup", type=int, default=200, help="learning-rate warm-up steps")
    p.add_argument("--base-channels", type=int, default=16)
    common.add_likelihood_args(p, bound_t=128)
    p.set_defaults(tol=1e-3)
    p.add_argument("--samples", type=int, default=None, help="samples per set (default 359, the test size; 32 with --quick)")
    p.add_argument("--sample-sets", type=int, default=None, help="sample sets per model (default 4; 2 with --quick)")
    p.add_argument("--sample-steps", type=int, default=20, help="dpm_solver steps per sample")
    p.add_argument("--classifier-steps", type=int, default=None, help="classifier training steps (default 1000; 50 quick)")
    return p


def train(args: argparse.Namespace, recipe: Recipe, data: LoadedData, device: torch.device) -> tuple[Trainer, dict]:
    """Train one recipe from ``args.seed``; the trainer and its timing."""
    torch.manual_seed(args.seed)
    net = UNet(base_channels=args.base_channels, channel_mults=(1, 2), num_res_blocks=1)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      warmup_steps=min(args.warmup, args.steps // 4), lr_schedule="cosine", ema_decay=args.ema_decay,
                      weighting=recipe.weighting, t_sampling=recipe.t_sampling, t_eps=args.t_eps, seed=args.seed,
                      log_every=max(1, min(300, args.steps // 5)), progress=False, device=str(device))
    trainer = Trainer(net, sdediff.VPSDE(), data.train, config=cfg, transform=TrainTransform(data.transform, recipe.hflip))
    cpu = time.thread_time()
    wall = common.fit_logged(trainer, f"[{recipe.key}] ")
    tail = trainer.history[-200:]
    return trainer, {"steps": trainer.step, "wall_seconds": wall, "cpu_seconds": time.thread_time() - cpu,
                     "final_loss_mean_200": sum(tail) / max(1, len(tail)), "config": cfg.to_dict(),
                     "params": sum(p.numel() for p in net.parameters())}


class FeatureJudge:
    """Sample quality in the classifier's features against the test images (quantised to the 17 levels first)."""

    def __init__(self, classifier: FeatureClassifier, data: LoadedData, test: Tensor, seed: int) -> None:
        self.classifier, self.values, self.seed = classifier, data.transform, seed
        self.test_features = extract_features(classifier, test)

    def score(self, x: Tensor) -> dict[str, float]:
        """Fréchet and kernel distance to the test features and the classifier score of the samples ``x``."""
        x = self.values.to_model(self.values.to_data(x.cpu()), torch.float32)
        feats = extract_features(self.classifier, x)
        size = min(len(feats), len(self.test_features), 200)
        g = torch.Generator().manual_seed(self.seed + 23)
        cs = classifier_score(class_probabilities(self.classifier, x))
        return {"frechet": float(frechet_distance(self.test_features, feats)),
                "kernel": float(kernel_distance(self.test_features, feats, num_subsets=10, subset_size=size,
                                                generator=g)),
                "score": cs.score, "balance": cs.balance, "confidence": cs.confidence}


def summarise(sets: list[dict[str, float]], base: list[dict[str, float]] | None = None) -> dict[str, Any]:
    """Mean ± s.e. over sample sets of each figure, and with ``base`` the paired differences to it."""
    out: dict[str, Any] = {"per_set": sets}
    for name in sets[0]:
        v = torch.tensor([s[name] for s in sets], dtype=torch.float64)
        out[name], out[f"{name}_se"] = mean_se(v)
        if base is not None:
            d = v - torch.tensor([s[name] for s in base], dtype=torch.float64)
            out[f"{name}_diff"], out[f"{name}_diff_se"] = mean_se(d)
    return out


def evaluate(args: argparse.Namespace, score: Any, x_test: Tensor, judge: FeatureJudge,
             device: torch.device) -> tuple[dict[str, Any], Tensor, Tensor, list[dict[str, float]]]:
    """ODE and ELBO bits/dim per test image and the sample sets' feature scores of one model."""
    sde = score.sde
    cpu = time.thread_time()
    ode = common.ode_log_probs(sde, score, x_test, args, torch.Generator(device).manual_seed(args.seed + 4))
    ode_bpd = digits_bits_per_dim(ode.log_prob)
    ode_cpu = time.thread_time() - cpu
    cpu = time.thread_time()
    ge = torch.Generator(device).manual_seed(args.seed + 5)
    with torch.no_grad():
        bound = torch.cat([sdediff.elbo(sde, score, chunk, t_eps=args.t_eps, num_t=args.bound_t, levels=LEVELS,
                                        generator=ge).bits_per_dim.double().cpu()
                           for chunk in x_test.split(max(1, 4096 // args.bound_t))])
    elbo_cpu = time.thread_time() - cpu
    cpu = time.thread_time()
    sets = []
    for k in range(args.sample_sets):
        gs = torch.Generator(device).manual_seed(args.seed + 100 + k)
        x = sdediff.sample(sde, score, (args.samples, 1, 8, 8), solver="dpm_solver", steps=args.sample_steps,
                           eps=1e-3, generator=gs, device=device)
        sets.append(judge.score(x))
    sample_cpu = time.thread_time() - cpu
    info = {**ode.summary(), "ode_cpu_seconds": ode_cpu, "elbo_cpu_seconds": elbo_cpu,
            "sample_cpu_seconds": sample_cpu}
    return info, ode_bpd, bound, sets


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = common.start_run("image_tricks", args, argv)
    device = run.device
    q = args.quick
    args.n_test = args.n_test if args.n_test is not None else (16 if q else 359)
    args.samples = args.samples if args.samples is not None else (32 if q else 359)
    args.sample_sets = args.sample_sets if args.sample_sets is not None else (2 if q else 4)
    args.classifier_steps = args.classifier_steps if args.classifier_steps is not None else (50 if q else 1000)
    if q:
        args.bound_t = min(args.bound_t, 4)

    data = load("digits")
    test = data.held_out[: args.n_test]
    x_test = data.transform.dequantize(test, torch.Generator().manual_seed(args.seed + 1)).to(device)

    # the feature classifier, once, and the floors -----------------------------------------------------
    cpu = time.thread_time()
    classifier = train_classifier(data.train, data.train_labels, data.num_classes, steps=args.classifier_steps,
                                  generator=torch.Generator().manual_seed(args.seed + 17))
    accuracy = float((class_probabilities(classifier, data.held_out).argmax(1) == data.held_out_labels).double().mean())
    judge = FeatureJudge(classifier, data, data.held_out, args.seed)
    n_floor = min(args.samples, len(data.train) // args.sample_sets)
    perm = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(args.seed + 29))
    floor_sets = [data.train[perm[k * n_floor:(k + 1) * n_floor]] for k in range(args.sample_sets)]
    floor = summarise([judge.score(x) for x in floor_sets])
    flipped = summarise([judge.score(x.flip(-1)) for x in floor_sets])
    classifier_info = {"steps": args.classifier_steps, "test_accuracy": accuracy,
                       "cpu_seconds": time.thread_time() - cpu, "floor_n": n_floor}
    print(f"classifier: test accuracy {accuracy:.3f}; floor Fréchet {floor['frechet']:.3f} ± {floor['frechet_se']:.3f}, "
          f"flipped training images {flipped['frechet']:.3f} ± {flipped['frechet_se']:.3f}")

    # train and score ---------------------------------------------------------------------------------
    trainers: dict[str, Trainer] = {}
    training: dict[str, dict] = {}
    for recipe in RECIPES:
        trainers[recipe.key], training[recipe.key] = train(args, recipe, data, device)
    rows: dict[str, dict[str, Any]] = {}
    per_image: dict[str, tuple[Tensor, Tensor]] = {}
    base_sets: list[dict[str, float]] = []
    for m in MODELS:
        info, ode_bpd, bound, sets = evaluate(args, trainers[m.recipe].score_fn(ema=m.ema), x_test, judge, device)
        per_image[m.key] = (ode_bpd, bound)
        if m.key == "baseline":
            base_sets = sets
        row = {"label": m.label, "recipe": m.recipe, "ema": m.ema, **info,
               "ode_bpd": mean_se(ode_bpd)[0], "ode_se": mean_se(ode_bpd)[1],
               "elbo_bpd": mean_se(bound)[0], "elbo_se": mean_se(bound)[1],
               "features": summarise(sets, None if m.key == "baseline" else base_sets)}
        if m.key != "baseline":
            b_ode, b_bound = per_image["baseline"]
            row["ode_diff"], row["ode_diff_se"] = mean_se(ode_bpd - b_ode)
            row["elbo_diff"], row["elbo_diff_se"] = mean_se(bound - b_bound)
        rows[m.key] = row
        f = row["features"]
        print(f"{m.label}: ODE {row['ode_bpd']:.4f} ± {row['ode_se']:.4f}, ELBO {row['elbo_bpd']:.4f} ± "
              f"{row['elbo_se']:.4f} bits/dim; Fréchet {f['frechet']:.3f} ± {f['frechet_se']:.3f}")

    result = {"command": run.command, "environment": run.env, "quick": q, "args": vars(args),
              "data": {"train": len(data.train), "test_scored": len(test), "levels": LEVELS, "dims": 64},
              "classifier": classifier_info, "floor": floor, "flipped_training": flipped,
              "training": training, "models": rows, "total_seconds": run.seconds(),
              "total_cpu_seconds": time.process_time()}
    run.write(result, markdown(result))
    return 0


def _diff(row: dict[str, Any], key: str, digits: int = 4) -> str:
    if f"{key}_diff" not in row:
        return "—"
    return f"{row[f'{key}_diff']:+.{digits}f} ± {row[f'{key}_diff_se']:.{digits}f}"


def markdown(r: dict[str, Any]) -> str:
    a, fl, ff, c = r["args"], r["floor"], r["flipped_training"], r["classifier"]
    tr = r["training"]["baseline"]
    lines = [
        "# Image-training tricks on the 8×8 digits" + (" — quick run" if r["quick"] else ""),
        "",
        f"`{r['command']}`  ",
        r["environment"],
        "",
        f"Same UNet (base {a['base_channels']}, mults (1, 2), 1 res block; {tr['params']:,} parameters), same seed, "
        f"{tr['steps']} steps at batch {a['batch_size']} (AdamW lr {a['lr']:g}, warm-up then cosine, EMA "
        f"{a['ema_decay']}), VP SDE, fresh uniform dequantisation every step. {r['data']['test_scored']} test images "
        "with one dequantisation draw shared by every row. ± are standard errors: over test images for the bits/dim, "
        f"over {a['sample_sets']} sample sets of {a['samples']} for the feature figures; Δ is the paired difference "
        "to the baseline (EMA) with its standard error (per image, or per sample set drawn from the same seed).",
        "",
        "## Likelihood (bits/dim, lower is better)",
        "",
        "| model | ODE bits/dim | Δ ODE | ELBO bits/dim | Δ ELBO | final training loss |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["models"].values():
        loss = r["training"][row["recipe"]]["final_loss_mean_200"]
        lines.append(f"| {row['label']} | {row['ode_bpd']:.4f} ± {row['ode_se']:.4f} | {_diff(row, 'ode')} | "
                     f"{row['elbo_bpd']:.4f} ± {row['elbo_se']:.4f} | {_diff(row, 'elbo')} | {loss:.4g} |")
    lines += [
        "",
        "The final training loss (mean of the last 200 steps) is in each recipe's own weighting, so it compares runs "
        "of one recipe only. The ODE gives the exact density of the probability-flow model and the ELBO bounds the "
        "code length of the reverse-SDE model: two models built from the same score, so either can be the lower. "
        f"EMA {a['ema_decay']} averages over about the last {1 / (1 - a['ema_decay']):.0f} steps "
        f"(1 / (1 − decay)) of a {tr['steps']}-step run whose learning rate decays to 0 (cosine).",
        "",
        "## Sample quality in classifier features (not FID; lower distances are closer to the test images)",
        "",
        "| samples | Fréchet | Δ Fréchet | kernel | Δ kernel | classifier score | balance | confidence |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def feature_row(name: str, f: dict[str, Any]) -> str:
        dk = f"{f['kernel_diff']:+.3g} ± {f['kernel_diff_se']:.2g}" if "kernel_diff" in f else "—"
        return (f"| {name} | {f['frechet']:.3f} ± {f['frechet_se']:.3f} | {_diff(f, 'frechet', 3)} | "
                f"{f['kernel']:.3g} ± {f['kernel_se']:.2g} | {dk} | {f['score']:.3f} ± {f['score_se']:.3f} "
                f"| {f['balance']:.3f} | {f['confidence']:.3f} |")

    for row in r["models"].values():
        lines.append(feature_row(row["label"], row["features"]))
    lines += [
        feature_row(f"floor: {c['floor_n']} training images per set", fl),
        feature_row("training images mirrored left-right", ff),
        "",
        f"Samples: `sdediff.sample(solver=\"dpm_solver\", steps={a['sample_steps']}, eps=1e-3)`, quantised to the 17 "
        "levels, against all test images. Classifier: `sdediff.features.train_classifier` on the training split "
        f"({c['steps']} steps; test accuracy {100 * c['test_accuracy']:.1f} %). Kernel distance: unbiased MMD² with "
        "the cubic polynomial kernel, 10 random subset pairs of up to 200. Classifier score: exp E KL(p(y|x) ‖ p(y)), "
        "at most 10.",
        "",
        "Digits are not mirror-symmetric (a mirrored 2, 3, 4, 5, 7 or 9 is not a digit of the data), so flipping "
        "trains the model on a different distribution, half of it mirrored: the last row shows how far the mirrored "
        "training images themselves are from the test images in these features.",
        "",
        "## How the likelihoods were measured, and cost",
        "",
        f"ODE: `sdediff.log_likelihood` defaults, tol = {a['tol']:g} nats, Hutchinson trace (one Rademacher probe per "
        f"image, same seed for every model), from t_eps = {a['t_eps']:g}. ELBO: `sdediff.elbo`, Gaussian decoder, "
        f"{a['bound_t']} importance-sampled times per image (same seed for every model). Both in bits/dim of the "
        "17-level data: −log p / (64 ln 2) + log2 17 − 1 (`sdediff.data.digits_bits_per_dim`).",
        "",
        "| model | NFE per image (ODE, mean) | ODE CPU s | ELBO CPU s | sampling CPU s |",
        "|---|---|---|---|---|",
    ]
    for row in r["models"].values():
        lines.append(f"| {row['label']} | {row['nfe_per_point_mean']:.1f} | {row['ode_cpu_seconds']:.0f} | "
                     f"{row['elbo_cpu_seconds']:.0f} | {row['sample_cpu_seconds']:.0f} |")
    train_cpu = ", ".join(f"{k} {v['cpu_seconds']:.0f} s" for k, v in r["training"].items())
    lines += [
        "",
        f"Training thread CPU time: {train_cpu}; classifier and floors {c['cpu_seconds']:.0f} s. Whole script "
        f"{r['total_seconds']:.0f} s wall, {r['total_cpu_seconds']:.0f} s CPU.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
