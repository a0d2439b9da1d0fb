r"""Your own data on the command line: ``--data`` sources read by :func:`sdediff.data.load` (image folders, array
files, torchvision sets on disk, MNIST), their record and split in the run folder, the training transform
(dequantisation, optional horizontal flips), and the feature classifier of :mod:`sdediff.features`.

The toy sets and the 8x8 digits keep their own code paths in :mod:`sdediff.cli.train` (so their runs train as
they always did); everything here is for the other sources.

Sample quality in a run's classifier features is **not FID**: the features come from a small classifier trained
on the run's own training split (:mod:`sdediff.features`), so the numbers compare runs on the same data with the
same classifier weights, never published FID/KID/IS figures. ``--fid`` computes the real FID where pytorch-fid
and its Inception weights are already installed (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._io import save_safetensors
from ..data import LoadedData, load
from ..data.images import save_image_grid
from ..data.loader import BUILTIN_SOURCES, DEFAULT_SPLIT
from ..data.record import DatasetRecord, dataset_kind
from ..data.values import ValueTransform
from ..features import (
    FeatureClassifier,
    class_probabilities,
    classifier_score,
    extract_features,
    frechet_distance,
    kernel_distance,
    load_classifier,
    save_classifier,
    train_classifier,
)
from ..runs import Run
from .common import DATASETS, CLIError

__all__ = ["SPLIT_FILE", "CLASSIFIER_FILE", "DATA_OPTIONS", "is_builtin", "check_data_options", "load_training_data",
           "save_split", "reload_data", "picture_kind", "save_grid", "TrainTransform", "fit_classifier",
           "FeatureScores", "inception_features", "to_data_units"]

#: the run folder's copy of the split: ``train_indices`` and ``held_out_indices`` into the source's samples
SPLIT_FILE = "split.safetensors"
#: the feature classifier's weights in a run folder (:func:`sdediff.features.save_classifier`)
CLASSIFIER_FILE = "classifier.safetensors"
#: the train options that apply to the sources read by :func:`sdediff.data.load`, not to the toy sets or digits
DATA_OPTIONS = ("image_size", "data_root", "split", "hflip")
#: the library's argument names as the command line spells them
FLAGS = {"image_size=": "--image-size", "data_root=": "--data-root"}


def is_builtin(source: str) -> bool:
    """Whether ``--data`` names a toy set or the digits (trained on their own code paths)."""
    return source in DATASETS


def check_data_options(args: argparse.Namespace) -> None:
    """Refuse, before any work, a ``--data`` that is neither a known name nor an existing path, and the data
    options that do not apply to a toy set or the digits (argument errors)."""
    if dataset_kind(args.data) in ("folder", "array") and not Path(args.data).exists():
        raise CLIError(f"--data {args.data}: no such file or folder, and not a known name ({', '.join(BUILTIN_SOURCES)}"
                       ", torchvision:NAME)")
    if args.split == 0:
        raise CLIError("--split must be above 0: sample and likelihood --run score the held-out part")
    if is_builtin(args.data):
        given = [f"--{name.replace('_', '-')}" for name in DATA_OPTIONS if getattr(args, name) not in (None, False)]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise CLIError(f"{', '.join(given)} {verb} to images, array files and mnist, not to --data {args.data}")


def cli_message(err: BaseException) -> str:
    """A data error's message with the library's argument names as the command line's flags."""
    text = str(err)
    for name, flag in FLAGS.items():
        text = re.sub(rf"\b{re.escape(name)}", flag, text)
    return text


def record_source(source: str) -> str:
    """What a run records as its source: a built-in name or ``torchvision:NAME`` as given, a path made absolute
    (so ``sample --run`` and ``likelihood --run`` find it from any folder)."""
    kind = dataset_kind(source)
    return source if kind in ("toy", "digits", "mnist", "torchvision") else str(Path(source).resolve())


def load_training_data(args: argparse.Namespace) -> tuple[LoadedData, DatasetRecord]:
    """``--data`` with ``--image-size``, ``--resize``, ``--split`` (seeded by ``--seed``) and ``--data-root``,
    through :func:`sdediff.data.load`, and its record; data that cannot be used are argument errors."""
    source = args.data
    data_root = None if args.data_root is None else str(Path(args.data_root).resolve())
    try:
        data = load(source, image_size=args.image_size, resize=args.resize, split=args.split, seed=args.seed,
                    data_root=data_root)
    except (ValueError, FileNotFoundError) as err:
        raise CLIError(f"--data {source}: {cli_message(err)}") from None
    split = DEFAULT_SPLIT if args.split is None else args.split
    record = DatasetRecord.of(data, record_source(source), dataset_kind(source), split=split,
                              image_size=args.image_size, resize=args.resize, data_root=data_root)
    return data, record


def save_split(folder: Path, data: LoadedData) -> Path:
    """Write the split's indices into the run folder (:data:`SPLIT_FILE`)."""
    return save_safetensors(folder / SPLIT_FILE, {"train_indices": data.train_indices.contiguous(),
                                                  "held_out_indices": data.held_out_indices.contiguous()})


def reload_data(run: Run) -> tuple[LoadedData, DatasetRecord]:
    """The data a run was trained on, read again from its recorded source and split as its :data:`SPLIT_FILE`
    says; a source that changed since (other samples, another value range) is an argument error."""
    record = run.dataset
    if record is None or record.kind in ("toy", "digits"):
        raise CLIError(f"{run.directory} records no data set read by sdediff.data.load")
    try:
        data = load(record.source, image_size=record.image_size, resize=record.resize, split=record.split,
                    seed=record.split_seed or 0, data_root=record.data_root)
    except (ValueError, FileNotFoundError) as err:
        raise CLIError(f"the data of {run.directory} cannot be read again: {cli_message(err)}") from None
    saved = run.directory / SPLIT_FILE
    if saved.is_file():
        from safetensors.torch import load_file

        indices = load_file(str(saved))
        same = all(torch.equal(indices[k], getattr(data, k)) for k in ("train_indices", "held_out_indices"))
    else:
        same = (len(data.train), len(data.held_out)) == (record.n_train, record.n_held_out)
    if not same or data.sample_shape != record.shape or data.transform != record.transform:
        raise CLIError(f"{record.source} has changed since {run.directory} was trained on it (now "
                       f"{len(data.train)} + {len(data.held_out)} samples of shape {data.sample_shape}, values "
                       f"{data.transform.to_config()}; the run recorded {record.n_train} + {record.n_held_out} of "
                       f"{record.shape}, {record.transform.to_config()})")
    return data, record


def to_data_units(x: Tensor, transform: ValueTransform) -> Tensor:
    """Model values to the data's own units: images to ``uint8`` levels, integers to ``int64``, floats affinely."""
    y = transform.to_data(x)
    return y.to(torch.uint8) if transform.quantised and 0 <= transform.low and transform.high <= 255 else y


def picture_kind(shape: tuple[int, ...], transform: ValueTransform) -> str | None:
    """How samples of this data are drawn: ``"grid"`` (8-bit images with 1 or 3 channels, by
    :func:`sdediff.data.images.save_image_grid`), ``"scatter"`` (2-D points), else ``None``."""
    if len(shape) == 3 and shape[0] in (1, 3) and (transform.low, transform.levels) == (0, 256):
        return "grid"
    return "scatter" if tuple(shape) == (2,) else None


def save_grid(path: Path, x: Tensor, transform: ValueTransform, columns: int = 8, rows: int | None = None) -> Path:
    """A PNG grid of model-scale images ``x`` in their own 8-bit levels, small images drawn 2-4 times larger."""
    images = to_data_units(x.detach().cpu(), transform)
    return save_image_grid(path, images, columns=columns, rows=rows, scale=max(1, min(4, 64 // images.shape[-1])))


class TrainTransform:
    r"""The training transform ``(batch, generator) -> batch``: uniform dequantisation of quantised data
    (:meth:`ValueTransform.dequantize`), then, with ``hflip``, each image mirrored left-right with probability
    1/2 (``x[..., ::-1]``), both drawn from the trainer's generator."""

    def __init__(self, values: ValueTransform, hflip: bool) -> None:
        self.values, self.hflip = values, hflip

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        x = self.values.dequantize(x, generator)
        if self.hflip:
            device = generator.device if generator is not None else x.device
            flip = (torch.rand(x.shape[0], generator=generator, device=device) < 0.5).to(x.device)
            x = torch.where(flip.view(-1, *[1] * (x.dim() - 1)), x.flip(-1), x)
        return x


def fit_classifier(folder: Path, data: LoadedData, steps: int, seed: int, device: torch.device) -> dict[str, Any]:
    """Train the feature classifier (:func:`sdediff.features.train_classifier`) on the training split, save it as
    :data:`CLASSIFIER_FILE` and return its held-out accuracy, time and file."""
    start = time.perf_counter()
    classifier = train_classifier(data.train.to(device), data.train_labels, data.num_classes, steps=steps,
                                  generator=torch.Generator(device).manual_seed(seed + 17))
    predicted = class_probabilities(classifier, data.held_out.to(device)).argmax(1).cpu()
    accuracy = float((predicted == data.held_out_labels).double().mean())
    path = save_classifier(classifier, folder / CLASSIFIER_FILE)
    return {"file": path.name, "steps": steps, "held_out_accuracy": accuracy, "seconds": time.perf_counter() - start}


class FeatureScores:
    """Sample quality in a run's classifier features (not FID; module notes), gathered chunk by chunk.

    :meth:`add` takes samples on the model's scale, quantises them to the data's levels (as a saved image holds
    them) and keeps their features and class probabilities; :meth:`summary` compares them with the held-out
    split, next to the floor: as many training samples against the same held-out split.
    """

    def __init__(self, folder: Path, data: LoadedData, device: torch.device, seed: int) -> None:
        self.classifier: FeatureClassifier = load_classifier(folder / CLASSIFIER_FILE, device)
        self.data, self.device, self.seed = data, device, seed
        self.features: list[Tensor] = []
        self.probs: list[Tensor] = []

    def quantised(self, x: Tensor) -> Tensor:
        values = self.data.transform
        return values.to_model(values.to_data(x), torch.float32) if values.quantised else x.float()

    def add(self, x: Tensor) -> None:
        x = self.quantised(x).to(self.device, next(self.classifier.parameters()).dtype)
        self.features.append(extract_features(self.classifier, x).cpu())
        self.probs.append(class_probabilities(self.classifier, x).cpu())

    def compare(self, feats: Tensor, probs: Tensor, reference: Tensor, g: torch.Generator) -> dict[str, Any]:
        score = classifier_score(probs)
        size = min(len(feats), len(reference), 200)
        return {"frechet": float(frechet_distance(reference, feats)),
                "kernel": float(kernel_distance(reference, feats, num_subsets=10, subset_size=size, generator=g)),
                "score": score.score, "balance": score.balance, "confidence": score.confidence,
                "class_fractions": list(score.class_fractions)}

    def summary(self, labels: Tensor | None) -> dict[str, Any]:
        """Distances and scores of the samples and of the floor; with ``labels`` (the classes asked for), the
        fraction of samples the classifier puts in their class."""
        g = torch.Generator().manual_seed(self.seed + 23)
        feats, probs = torch.cat(self.features), torch.cat(self.probs)
        held = extract_features(self.classifier, self.data.held_out.to(self.device)).cpu()
        out: dict[str, Any] = {"note": "distances in the run's classifier features, not FID/KID/IS",
                               "n_samples": len(feats), "n_held_out": len(held), **self.compare(feats, probs, held, g)}
        subset = torch.randperm(len(self.data.train), generator=g)[:len(feats)]
        train = self.data.train[subset].to(self.device)
        out["floor"] = {"n": len(subset), **self.compare(extract_features(self.classifier, train).cpu(),
                                                         class_probabilities(self.classifier, train).cpu(), held, g)}
        if labels is not None:
            out["class_accuracy"] = float((probs.argmax(1) == labels[:len(probs)]).double().mean())
        return out

    @staticmethod
    def describe(doc: dict[str, Any]) -> str:
        floor = doc["floor"]
        line = (f"classifier features (not FID): Fréchet {doc['frechet']:.4g}, kernel {doc['kernel']:.3g}, score "
                f"{doc['score']:.3g}, balance {doc['balance']:.3f}, confidence {doc['confidence']:.3f}; floor "
                f"({floor['n']} training vs {doc['n_held_out']} held-out): Fréchet {floor['frechet']:.4g}, kernel "
                f"{floor['kernel']:.3g}, score {floor['score']:.3g}, balance {floor['balance']:.3f}, confidence "
                f"{floor['confidence']:.3f}")
        if "class_accuracy" in doc:
            line += f"; {100 * doc['class_accuracy']:.1f}% classified as the class asked for"
        return line


def inception_features(device: torch.device):
    """``features(images)``: pytorch-fid's Inception pool features (2048) of ``uint8`` images ``(N, C, H, W)``,
    for ``--fid``; an argument error where pytorch-fid or its weights are not installed (nothing is downloaded)."""
    try:
        from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3
    except ImportError:
        raise CLIError("--fid needs pytorch-fid with its Inception weights installed (pip install pytorch-fid, then "
                       "fetch the weights once); sdediff never downloads them") from None
    weights = Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_URL.rsplit("/", 1)[-1]
    if not weights.is_file():
        raise CLIError(f"--fid: pytorch-fid's Inception weights are not at {weights}; sdediff never downloads them")
    model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()

    @torch.no_grad()
    def features(images: Tensor) -> Tensor:
        out = []
        for chunk in images.split(100):
            x = chunk.to(device, torch.float32) / 255
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            out.append(model(x)[0].flatten(1).cpu())
        return torch.cat(out)

    return features

