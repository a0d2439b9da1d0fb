"""Classifier-free guidance on the 8×8 digits: accuracy of a simple classifier on guided samples.

1. **Model.** A class-conditional :class:`sdediff.MLP` (``num_classes=10``, a learned null token) trained by
   :class:`sdediff.Trainer` on the VP SDE with ε-prediction and condition dropout: each label is replaced by
   the null token with probability ``--cond-drop-prob``, so one network learns both :math:`s(x, t, y)` and
   :math:`s(x, t, \\varnothing)`. Fresh uniform dequantisation noise every step.
2. **Classifier.** scikit-learn's multinomial logistic regression on the grey levels of the training split;
   its accuracy on the held-out test split is reported as the reference.
3. **Guided sampling.** For each scale :math:`w` in ``--scales``, ``--per-class`` samples of every class
   with :math:`\\tilde s = (1+w)\\,s(x,t,y) - w\\,s(x,t,\\varnothing)` (:meth:`Trainer.score_fn` with
   ``guidance_scale``, both branches in one batched call), Heun on the probability flow, a final Tweedie
   denoising step, quantised back to the 17 levels. The same prior draws for every scale. Reported per
   scale: the classifier's accuracy against the requested class (overall and per class), its mean
   confidence, and the within-class pixel standard deviation (diversity).

Writes ``digits_guidance.{md,json}`` into ``--out`` and the per-class grid ``--grid`` (rows: classes,
one panel per scale); ``--quick`` writes ``*_quick.*`` files and no grid unless ``--grid`` is given.

    python benchmarks/digits_guidance.py             # the reported run (a few minutes on one CPU thread)
    python benchmarks/digits_guidance.py --quick     # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import common  # a sibling script (benchmarks/README.md)
import torch
from torch import Tensor

import sdediff
from sdediff._io import atomic_write_file
from sdediff.data import DIGITS_LEVELS, digits_to_model, load_digits, model_to_digits
from sdediff.training import MLP, TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "docs" / "img" / "guidance_grid.png"
CLASSES = 10


def fit_classifier(seed: int) -> tuple[Any, float]:
    """Logistic regression on the training split's levels / 16; its accuracy on the test split."""
    from sklearn.linear_model import LogisticRegression

    train_k, train_y = load_digits("train", flatten=True)
    test_k, test_y = load_digits("test", flatten=True)
    clf = LogisticRegression(max_iter=5000, random_state=seed)
    clf.fit(train_k.double().numpy() / (DIGITS_LEVELS - 1), train_y.numpy())
    return clf, float(clf.score(test_k.double().numpy() / (DIGITS_LEVELS - 1), test_y.numpy()))


def judge(clf: Any, levels: Tensor, labels: Tensor) -> dict[str, Any]:
    """Classifier accuracy against the requested labels, per class, mean confidence, and diversity."""
    feats = levels.reshape(len(levels), -1).double().numpy() / (DIGITS_LEVELS - 1)
    proba = torch.as_tensor(clf.predict_proba(feats))
    pred = proba.argmax(1)
    hit = (pred == labels).double()
    per_class = [float(hit[labels == k].mean()) for k in range(CLASSES)]
    pixels = levels.reshape(len(levels), -1).double()
    diversity = float(torch.stack([pixels[labels == k].std(0).mean() for k in range(CLASSES)]).mean())
    return {"accuracy": float(hit.mean()), "accuracy_se": float(hit.std() / math.sqrt(len(hit))),
            "per_class": per_class, "confidence": float(proba.max(1).values.mean()), "pixel_std": diversity}


def save_grid(path: Path, panels: dict[float, Tensor], per_row: int) -> bool:
    """One panel per scale: 10 rows (classes) of ``per_row`` digits; ``False`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cols = len(panels)
    fig, axes = plt.subplots(CLASSES, cols * (per_row + 1) - 1, figsize=(cols * (per_row + 1) * 0.42, CLASSES * 0.45),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for p, (scale, levels) in enumerate(panels.items()):
        for k in range(CLASSES):
            for j in range(per_row):
                ax = axes[k, p * (per_row + 1) + j]
                ax.imshow(levels[k, j].reshape(8, 8).numpy(), cmap="gray_r", vmin=0, vmax=DIGITS_LEVELS - 1,
                          interpolation="nearest")
        axes[0, p * (per_row + 1) + per_row // 2].set_title(f"w = {scale:g}", fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.93, bottom=0.01, wspace=0.08, hspace=0.08)
    atomic_write_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return True


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Classifier-free guidance on the 8×8 digits",
        "",
        f"`{r['command']}` — {r['environment']}.",
        "",
        f"Class-conditional MLP ({r['model']['params']:,} parameters, VP SDE, ε-prediction), {r['training']['steps']} "
        f"steps with condition dropout p = {r['args']['cond_drop_prob']} ({r['training']['seconds']:.0f} s). Samples: "
        f"{r['args']['per_class']} per class and scale, {r['args']['solver']} with {r['args']['sample_steps']} steps "
        "+ Tweedie denoising, the same prior draws for every scale. Classifier: logistic regression on the training "
        f"split, **{100 * r['classifier_test_accuracy']:.1f}%** on the test split.",
        "",
        "| guidance scale w | accuracy | ± s.e. | worst class | mean confidence | within-class pixel s.d. |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["scales"]:
        worst = min(range(CLASSES), key=lambda k: row["per_class"][k])
        lines.append(f"| {row['scale']:g} | {100 * row['accuracy']:.1f}% | {100 * row['accuracy_se']:.1f} | "
                     f"{worst} ({100 * row['per_class'][worst]:.0f}%) | {row['confidence']:.3f} | "
                     f"{row['pixel_std']:.2f} |")
    lines += ["", "Per-class accuracy (%):", "", "| w | " + " | ".join(str(k) for k in range(CLASSES)) + " |",
              "|---:|" + "---:|" * CLASSES]
    for row in r["scales"]:
        lines.append(f"| {row['scale']:g} | " + " | ".join(f"{100 * a:.0f}" for a in row["per_class"]) + " |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_run_args(p, steps=6000, quick_steps=30, batch_size=256, lr=2e-3)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--cond-drop-prob", type=float, default=0.1)
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 3.0])
    p.add_argument("--per-class", type=int, default=None, help="samples per class and scale (default 100, quick 4)")
    p.add_argument("--solver", default="heun")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--grid", default=None, help=f"per-class sample grid PNG (default {GRID.relative_to(ROOT)}; "
                                                "quick: none)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = common.start_run("digits_guidance", args, argv)
    steps, device = args.steps, run.device
    args.per_class = args.per_class if args.per_class is not None else (4 if args.quick else 100)
    grid = Path(args.grid) if args.grid else (None if args.quick else GRID)

    clf, test_accuracy = fit_classifier(args.seed)
    print(f"classifier: logistic regression, test accuracy {100 * test_accuracy:.1f}%")

    sde = sdediff.VPSDE()
    train_k, train_y = load_digits("train", flatten=True)
    torch.manual_seed(args.seed)
    net = MLP(dim=64, hidden=args.hidden, depth=args.depth, num_classes=CLASSES)
    cfg = TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=min(200, steps // 4),
                      lr_schedule="cosine", ema_decay=args.ema_decay, cond_drop_prob=args.cond_drop_prob,
                      seed=args.seed, log_every=max(1, steps // 5), progress=False, device=str(device))
    trainer = Trainer(net, sde, train_k, train_y, cfg, transform=digits_to_model)
    train_seconds = common.fit_logged(trainer)
    print(f"trained {trainer.step} steps in {train_seconds:.0f} s")

    labels = torch.arange(CLASSES).repeat_interleave(args.per_class)
    rows, panels = [], {}
    for scale in args.scales:
        score = trainer.score_fn(cond=labels, guidance_scale=scale)
        tic = time.perf_counter()
        with torch.no_grad():
            x = sdediff.sample(sde, score, (len(labels), 64), solver=args.solver, steps=args.sample_steps,
                               generator=torch.Generator(device).manual_seed(args.seed + 7), device=device,
                               denoise=True)
        levels = model_to_digits(x.cpu())
        row = {"scale": scale, **judge(clf, levels, labels), "sample_seconds": time.perf_counter() - tic}
        rows.append(row)
        panels[scale] = levels.reshape(CLASSES, args.per_class, 64)[:, :8]
        print(f"  w = {scale:g}: accuracy {100 * row['accuracy']:.1f}% ± {100 * row['accuracy_se']:.1f}, "
              f"confidence {row['confidence']:.3f}, within-class pixel s.d. {row['pixel_std']:.2f}")

    wrote_grid = save_grid(grid, panels, min(8, args.per_class)) if grid is not None else False
    result = {
        "command": run.command, "environment": run.env, "quick": args.quick, "args": vars(args) | {"steps": steps},
        "classifier": "sklearn LogisticRegression(max_iter=5000) on levels / 16 of the training split",
        "classifier_test_accuracy": test_accuracy,
        "model": {"params": sum(p.numel() for p in net.parameters()), "config": net.config},
        "training": {"steps": trainer.step, "seconds": train_seconds, "config": cfg.to_dict(), "log": trainer.log},
        "scales": rows, "grid": str(grid.relative_to(ROOT)) if wrote_grid and grid.is_relative_to(ROOT) else
        (str(grid) if wrote_grid else None), "total_seconds": run.seconds(),
    }
    run.write(result, markdown(result), f", {grid}" if wrote_grid else "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
