r"""Reading images with Pillow into one ``uint8`` array ``(N, C, H, W)``: folders of files and torchvision sets.

One mode for the whole set
    Every image is converted to greyscale (``"L"``, ``C = 1``) if all of them are greyscale (Pillow modes
    ``"1"``, ``"L"``, ``"LA"``), else to RGB (``C = 3``); palette images count as colour. An alpha channel is
    dropped (not composited). Images are read at 8 bits per channel; 16-bit and floating-point images
    (modes ``"I"``, ``"I;16"``, ``"F"``) are refused rather than clipped.

One size for the whole set
    Without ``image_size`` every image must have the same width and height. With ``image_size = n`` each image
    becomes ``n × n``: ``resize="center_crop"`` cuts the largest centred square
    (:math:`s = \min(w, h)`, offset :math:`(\lfloor (w-s)/2 \rfloor, \lfloor (h-s)/2 \rfloor)`) and resizes it
    with bicubic filtering; ``resize="resize"`` resizes the whole image (the aspect ratio is not kept).

Folders
    A flat folder of image files has no labels. A folder of class subfolders (each holding images, at any
    depth) is labelled by subfolder: names sorted, mapped to ``0 .. K-1`` (as torchvision's ``ImageFolder``).
    Names starting with ``"."`` are skipped, and so are subfolders without images. Image files are those
    ending in one of :data:`IMAGE_SUFFIXES` (any case).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_write_file
from .._validate import check_choice, check_int

__all__ = ["IMAGE_SUFFIXES", "RESIZE_MODES", "ImageFiles", "find_images", "stack_images", "read_torchvision", "image_grid",
           "save_image_grid"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
RESIZE_MODES = ("center_crop", "resize")
GREY_MODES = ("1", "L", "LA")
WIDE_MODES = ("I", "F")  # 32-bit integer / float modes, and "I;16*" by prefix
INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


@dataclass(frozen=True)
class ImageFiles:
    """The image files of a folder, in reading order, and their classes when they sit in class subfolders."""

    files: tuple[Path, ...]
    labels: tuple[int, ...] | None
    class_names: tuple[str, ...] | None


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` at any depth, sorted by relative path, hidden names skipped."""
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and all(not p.startswith(".") for p in rel.parts):
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def find_images(folder: str | Path) -> ImageFiles:
    """List the images of a flat folder (no labels) or of a folder of class subfolders (see the module notes).

    Raises
    ------
    ValueError
        If the folder is empty, holds no image files, or mixes images at its top level with class subfolders.
    """
    folder = Path(folder)
    entries = sorted((p for p in folder.iterdir() if _visible(p)), key=lambda p: p.name)
    if not entries:
        raise ValueError(f"image folder {folder} is empty")
    flat = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    classes = [(p.name, files) for p in entries if p.is_dir() and (files := _image_files(p))]
    if flat and classes:
        raise ValueError(f"image folder {folder} mixes image files ({flat[0].name}, ...) with class subfolders "
                         f"({classes[0][0]}, ...); put every image in a class subfolder, or none")
    if flat:
        return ImageFiles(tuple(flat), None, None)
    if not classes:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {folder} or its subfolders")
    files = tuple(f for _, fs in classes for f in fs)
    labels = tuple(k for k, (_, fs) in enumerate(classes) for _ in fs)
    return ImageFiles(files, labels, tuple(name for name, _ in classes))


def _open(source, name: str):
    """A context manager giving the Pillow image of a path (opened lazily) or of an image already in memory."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return contextlib.nullcontext(source)
    try:
        return Image.open(source)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {name}: {err}") from err


def _check_mode(mode: str, name: str) -> bool:
    """Whether the mode is greyscale; refuse the modes that do not fit 8 bits per channel."""
    if mode in WIDE_MODES or mode.startswith("I;16"):
        raise ValueError(f"image {name} has Pillow mode {mode!r} (16-bit or floating point); only 8-bit images "
                         "(greyscale, RGB, palette, with or without alpha) are read")
    return mode in GREY_MODES


def stack_images(sources: Sequence, names: Sequence[str], image_size: int | None = None,
                 resize: str = "center_crop") -> np.ndarray:
    """Read images (paths or Pillow images) into one ``uint8`` array ``(N, C, H, W)`` (see the module notes).

    Parameters
    ----------
    sources : sequence of path or PIL.Image.Image
        The images, in order.
    names : sequence of str
        What an error calls each image (its path, or its index in a data set).
    image_size : int, optional
        Side of the square output; ``None`` keeps the images' common size.
    resize : {"center_crop", "resize"}
        How an image becomes square when ``image_size`` is given.

    Raises
    ------
    ValueError
        For an unreadable or corrupt image (naming it), a 16-bit or float image, or, without ``image_size``,
        two images of different sizes (naming both).
    """
    from PIL import Image

    image_size = check_int("image_size", image_size, optional=True)
    resize = check_choice("resize", resize, RESIZE_MODES)
    if len(sources) != len(names) or not sources:
        raise ValueError(f"need one name per image and at least one image, got {len(sources)} and {len(names)}")
    grey, sizes = True, []
    for source, name in zip(sources, names, strict=True):  # headers only: mode and size
        with _open(source, name) as img:
            grey &= _check_mode(img.mode, name)
            sizes.append(img.size)
    if image_size is None:
        for i, size in enumerate(sizes):
            if size != sizes[0]:
                raise ValueError(f"images differ in size: {names[0]} is {sizes[0][0]}x{sizes[0][1]} but {names[i]} is "
                                 f"{size[0]}x{size[1]} (width x height); pass image_size= to crop and resize every image "
                                 "to one square size")
    width, height = (image_size, image_size) if image_size is not None else sizes[0]
    mode = "L" if grey else "RGB"
    out = np.empty((len(sources), 1 if grey else 3, height, width), dtype=np.uint8)
    for i, (source, name) in enumerate(zip(sources, names, strict=True)):
        with _open(source, name) as img:
            try:
                img = img.convert(mode)
            except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt pixel data
                raise ValueError(f"cannot read image {name}: {err}") from err
            if image_size is not None and img.size != (width, height):
                if resize == "center_crop":
                    w, h = img.size
                    s = min(w, h)
                    left, top = (w - s) // 2, (h - s) // 2
                    img = img.crop((left, top, left + s, top + s))
                img = img.resize((width, height), Image.Resampling.BICUBIC)
            pixels = np.asarray(img, dtype=np.uint8)
        out[i] = pixels[None] if grey else pixels.transpose(2, 0, 1)
    return out


def _integer(target) -> int | None:
    """A class index from a Python, numpy or 0-d torch integer; ``None`` for any other target."""
    if isinstance(target, bool):
        return None
    if isinstance(target, (int, np.integer)):
        return int(target)
    if isinstance(target, torch.Tensor) and target.ndim == 0 and target.dtype in INTEGER_DTYPES:
        return int(target)
    return None


def read_torchvision(name: str, data_root: str | Path, image_size: int | None = None, resize: str = "center_crop"
                     ) -> tuple[np.ndarray, list[int] | None, tuple[str, ...] | None]:
    """The training part of the torchvision data set ``torchvision.datasets.<name>`` already under ``data_root``.

    The set is built with ``download=False`` (and ``train=True`` or ``split="train"`` where its constructor takes
    them) and no transform; its items ``(PIL image, target)`` go through :func:`stack_images`. Integer targets
    become labels; the class names are the set's ``classes`` when it has them.

    Returns
    -------
    (images, labels, class_names)
        ``uint8`` ``(N, C, H, W)``; ``int`` labels or ``None`` (non-integer targets); class names or ``None``.

    Raises
    ------
    ImportError
        Without torchvision.
    FileNotFoundError
        If the set's files are not under ``data_root`` (nothing is ever downloaded).
    ValueError
        For a name that is not a torchvision data set, or items that are not Pillow images.
    """
    try:
        import torchvision.datasets as tv_datasets
    except ImportError as err:
        raise ImportError(f"source 'torchvision:{name}' needs torchvision, which is not installed; install the build "
                          "that matches your torch (pip install torchvision)") from err
    from PIL import Image

    cls = getattr(tv_datasets, name, None)
    if not inspect.isclass(cls):
        known = sorted(n for n in dir(tv_datasets) if inspect.isclass(getattr(tv_datasets, n)) and n[0].isupper())
        raise ValueError(f"torchvision has no data set {name!r}; known: {', '.join(known)}")
    params = inspect.signature(cls).parameters
    kwargs = {"root": str(data_root)}
    if "download" in params:
        kwargs["download"] = False
    if "train" in params:
        kwargs["train"] = True
    elif "split" in params:
        kwargs["split"] = "train"
    try:
        dataset = cls(**kwargs)
    except (RuntimeError, OSError) as err:
        raise FileNotFoundError(f"torchvision data set {name} not found under {data_root} ({err}); sdediff never "
                                f"downloads: fetch it once with torchvision.datasets.{name}(root, download=True)") from err
    images, targets = [], []
    for i in range(len(dataset)):
        image, target = dataset[i]
        if not isinstance(image, Image.Image):
            raise ValueError(f"torchvision data set {name} gives {type(image).__name__} items, not Pillow images")
        images.append(image)
        targets.append(target)
    array = stack_images(images, [f"{name}[{i}]" for i in range(len(images))], image_size, resize)
    labels = [_integer(t) for t in targets]
    labels = None if any(t is None for t in labels) else labels
    classes = getattr(dataset, "classes", None)
    class_names = tuple(str(c) for c in classes) if isinstance(classes, (list, tuple)) and labels is not None else None
    return array, labels, class_names


def image_grid(images: np.ndarray | torch.Tensor, columns: int = 8, rows: int | None = None,
               padding: int = 1) -> np.ndarray:
    """Tile ``uint8`` images ``(N, C, H, W)`` (``C`` 1 or 3) into one picture, row by row.

    The grid has ``columns`` columns and ``rows`` rows (default: as many as ``N`` needs; with ``rows`` given, the
    images beyond ``rows * columns`` are left out and missing ones stay blank), ``padding`` white pixels between
    and around the tiles. Returns ``(H', W')`` for greyscale, ``(H', W', 3)`` for colour (what Pillow's
    ``Image.fromarray`` takes).
    """
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1] not in (1, 3) or array.shape[0] < 1:
        raise ValueError(f"images must be uint8 of shape (N, C, H, W) with C 1 or 3 and N >= 1, got {array.dtype} "
                         f"{array.shape}")
    columns = check_int("columns", columns)
    rows = check_int("rows", rows, optional=True) or -(-array.shape[0] // columns)
    padding = check_int("padding", padding, 0)
    n, c, h, w = array.shape
    canvas = np.full((c, padding + rows * (h + padding), padding + columns * (w + padding)), 255, dtype=np.uint8)
    for i in range(min(n, rows * columns)):
        r, col = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        canvas[:, top:top + h, left:left + w] = array[i]
    return canvas[0] if c == 1 else canvas.transpose(1, 2, 0)


def save_image_grid(path: str | Path, images: np.ndarray | torch.Tensor, columns: int = 8, rows: int | None = None,
                    padding: int = 1, scale: int = 1) -> Path:
    """Write :func:`image_grid` of ``uint8`` images ``(N, C, H, W)`` as a PNG (atomically), each pixel drawn as a
    ``scale`` × ``scale`` block (nearest neighbour, so levels are not blurred); returns the path."""
    from PIL import Image

    scale = check_int("scale", scale)
    grid = image_grid(images, columns, rows, padding)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    picture = Image.fromarray(grid)
    return atomic_write_file(path, lambda tmp: picture.save(tmp, format="PNG"))
