"""What a run records about its training data (the ``"dataset"`` field of ``run.json``): enough to read the same
data again with :func:`sdediff.data.load`, split it the same way, and map values back to the data's own units.

A :class:`DatasetRecord` holds the source as given to :func:`~sdediff.data.load` (a folder or array file as an
absolute path, ``"torchvision:NAME"`` with its ``data_root``, or a name), its kind, the sample shape, the
:class:`~sdediff.data.values.ValueTransform`, the split (held-out fraction and seed, ``None`` for the digits'
fixed split and the toy sets' fresh held-out draws), the sizes of both parts and the class names. Run records
written before this field existed describe the toy sets and the digits by name only; :func:`legacy_dataset`
rebuilds their record from the name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._validate import is_int
from .digits import DIGITS_LEVELS
from .images import RESIZE_MODES
from .loader import LoadedData
from .toy import TOY_CLASSES, TOY_DATASETS
from .values import ValueTransform

__all__ = ["DatasetRecord", "DATASET_KINDS", "IMAGE_KINDS", "dataset_kind", "legacy_dataset"]

#: the kinds of source a run can be trained on
DATASET_KINDS = ("folder", "array", "torchvision", "mnist", "digits", "toy")
#: the kinds whose samples are 8-bit-style images (a PNG grid shows them in their own levels)
IMAGE_KINDS = ("folder", "torchvision", "mnist", "digits")


@dataclass(frozen=True)
class DatasetRecord:
    """The training data of a run (module notes).

    Attributes
    ----------
    source : str
        What :func:`sdediff.data.load` reads: an absolute path, ``"torchvision:NAME"`` or a built-in name.
    kind : str
        One of :data:`DATASET_KINDS`.
    shape : tuple of int
        Shape of one sample.
    transform : ValueTransform
        The map between data values and the model's ``[-1, 1]``.
    split : float or None
        Held-out fraction (``None``: the digits' fixed split, or toy sets whose held-out points are fresh draws).
    split_seed : int or None
        Seed of the split.
    n_train, n_held_out : int or None
        Sizes of the two parts (``n_held_out`` is ``None`` for toy sets).
    class_names : tuple of str or None
        Name of each class of labelled data (``"0"``, ``"1"``, ... where the source has no names).
    image_size : int or None
        ``--image-size`` the images were read at (``None``: their own size).
    resize : str
        How images were made square with ``image_size`` (``"center_crop"`` or ``"resize"``).
    data_root : str or None
        Folder of a torchvision set.
    description : str
        What was read, in words.
    """

    source: str
    kind: str
    shape: tuple[int, ...]
    transform: ValueTransform
    split: float | None
    split_seed: int | None
    n_train: int | None
    n_held_out: int | None
    class_names: tuple[str, ...] | None = None
    image_size: int | None = None
    resize: str = "center_crop"
    data_root: str | None = None
    description: str = ""

    @property
    def bit_depth(self) -> int | None:
        """Bits per value of quantised data with ``2**b`` levels (8 for images), else ``None``."""
        return self.transform.bit_depth

    @property
    def num_classes(self) -> int | None:
        """Number of classes of labelled data."""
        return None if self.class_names is None else len(self.class_names)

    @property
    def is_image(self) -> bool:
        """Whether the samples are images of one of :data:`IMAGE_KINDS`."""
        return self.kind in IMAGE_KINDS and len(self.shape) == 3

    @property
    def num_dims(self) -> int:
        """Elements per sample, the ``D`` of bits/dim."""
        return math.prod(self.shape)

    @classmethod
    def of(cls, data: LoadedData, source: str, kind: str, *, split: float | None, image_size: int | None = None,
           resize: str = "center_crop", data_root: str | None = None) -> DatasetRecord:
        """The record of data returned by :func:`sdediff.data.load` (``split`` as passed to it)."""
        names = data.class_names
        if names is None and data.num_classes is not None:
            names = tuple(str(k) for k in range(data.num_classes))
        return cls(source=source, kind=kind, shape=data.sample_shape, transform=data.transform,
                   split=split if data.seed is not None else None, split_seed=data.seed, n_train=len(data.train),
                   n_held_out=len(data.held_out), class_names=names, image_size=image_size, resize=resize,
                   data_root=data_root, description=data.source)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (the transform by :meth:`ValueTransform.to_config`, its bit depth alongside)."""
        return {"source": self.source, "kind": self.kind, "shape": list(self.shape),
                "transform": self.transform.to_config(), "bit_depth": self.bit_depth, "split": self.split,
                "split_seed": self.split_seed, "n_train": self.n_train, "n_held_out": self.n_held_out,
                "class_names": None if self.class_names is None else list(self.class_names),
                "image_size": self.image_size, "resize": self.resize, "data_root": self.data_root,
                "description": self.description}

    @classmethod
    def from_dict(cls, doc: Any) -> DatasetRecord:
        """The record written by :meth:`to_dict`.

        Raises
        ------
        ValueError
            Naming the first field that is missing or of the wrong kind.
        """
        if not isinstance(doc, dict):
            raise ValueError(f"the dataset record must be a mapping, got {type(doc).__name__}")

        def field(name: str, ok, what: str, optional: bool = False) -> Any:
            value = doc.get(name)
            if (value is None and optional) or (value is not None and ok(value)):
                return value
            raise ValueError(f"the dataset record's {name} must be {what}, got {value!r}")

        def count(v: Any) -> bool:
            return is_int(v) and v >= 0

        kind = field("kind", lambda v: v in DATASET_KINDS, f"one of {', '.join(DATASET_KINDS)}")
        shape = field("shape", lambda v: isinstance(v, list) and v and all(is_int(n) and n > 0 for n in v),
                      "a list of positive integers")
        names = field("class_names", lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
                      "a list of names", optional=True)
        split = field("split", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1,
                      "a fraction in [0, 1)", optional=True)
        try:
            transform = ValueTransform.from_config(doc.get("transform"))
        except (TypeError, ValueError) as err:
            raise ValueError(f"the dataset record's transform is not valid: {err}") from None
        return cls(source=field("source", lambda v: isinstance(v, str), "a string"), kind=kind, shape=tuple(shape),
                   transform=transform, split=None if split is None else float(split),
                   split_seed=field("split_seed", count, "an integer >= 0", optional=True),
                   n_train=field("n_train", count, "an integer >= 0", optional=True),
                   n_held_out=field("n_held_out", count, "an integer >= 0", optional=True),
                   class_names=None if names is None else tuple(names),
                   image_size=field("image_size", lambda v: is_int(v) and v > 0, "a positive integer", optional=True),
                   resize=field("resize", lambda v: v in RESIZE_MODES, f"one of {', '.join(RESIZE_MODES)}",
                                optional=True) or "center_crop",
                   data_root=field("data_root", lambda v: isinstance(v, str), "a string", optional=True),
                   description=field("description", lambda v: isinstance(v, str), "a string", optional=True) or "")


def dataset_kind(source: str | Path) -> str:
    """The kind of a source as :func:`sdediff.data.load` reads it: a built-in name, ``torchvision:``, a folder
    or an array file (a path that does not exist counts as an array; :func:`~sdediff.data.load` refuses it)."""
    if isinstance(source, str) and source in TOY_DATASETS:
        return "toy"
    if isinstance(source, str) and source in ("digits", "mnist"):
        return source
    if isinstance(source, str) and source.startswith("torchvision:"):
        return "torchvision"
    return "folder" if Path(source).is_dir() else "array"


def legacy_dataset(name: str | None, shape: tuple[int, ...], seed: int, n_train: int | None) -> DatasetRecord | None:
    """The record of a toy or digits run whose ``run.json`` names its data only; ``None`` for any other name."""
    if name == "digits":
        return DatasetRecord("digits", "digits", shape, ValueTransform(0, DIGITS_LEVELS - 1, DIGITS_LEVELS), None, None,
                             1438, 359, tuple(str(k) for k in range(10)), description="the 8x8 digits (scikit-learn)")
    if name in TOY_DATASETS:
        names = tuple(str(k) for k in range(TOY_CLASSES[name])) if name in TOY_CLASSES else None
        return DatasetRecord(name, "toy", shape, ValueTransform.identity(), None, seed, n_train, None, names,
                             description=f"toy data set {name}")
    return None
