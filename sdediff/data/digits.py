r"""scikit-learn's 8×8 handwritten digits: a small real image set that needs no download.

1797 grey images of 8×8 pixels with **17 grey levels** :math:`k \in \{0, \dots, 16\}` and labels 0–9,
shipped inside scikit-learn (install with ``pip install 'sdediff[data]'``).

Fixed train/test split
    Stratified 80/20, independent of any RNG or library version: within each class the image indices
    ``i`` are ordered by the multiplicative hash :math:`h(i) = (2654435761\,i) \bmod 2^{32}` and the
    first :math:`\operatorname{round}(0.2\,n_c)` go to the test set. That gives 1438 training and 359
    test images (each class 34–37 test images); both sets keep the original order.

17 levels and bits/dim
    17 is not a power of two, so :func:`sdediff.dequantize` / :func:`sdediff.bits_per_dim` (written for
    ``b``-bit data, :math:`2^b` levels) do not apply directly. The same construction with ``K`` levels:
    uniform dequantisation onto :math:`[x_{lo}, x_{hi}]` of width :math:`w`,

    .. math::  x = x_{lo} + w\,(k + u)/K, \qquad u \sim U(0, 1)^D,

    cuts the interval into ``K`` bins of width :math:`w/K`; the probability of the discrete image is
    :math:`P(k) = \int_{\text{bin}} p(x)\,dx`, and by Jensen
    :math:`-\log_2 P(k) \le E_u[-\log_2 p(x)] - D\log_2(w/K)`, so

    .. math::  \text{bits/dim} = -\frac{\log p(x)}{D\ln 2} + \log_2 K - \log_2 w,

    which is exactly :func:`sdediff.bits_per_dim` with :math:`b = \log_2 K` (for digits
    :math:`\log_2 17 - 1 \approx 3.087` on :math:`[-1, 1]`). For :math:`K = 2^b` both functions here
    reproduce the library's bit-depth versions exactly. A uniform model over the 17 levels scores
    :math:`\log_2 17 \approx 4.09` bits/dim.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .._validate import check_choice, check_dtype, check_float, check_int

DIGITS_LEVELS = 17
DIGITS_SHAPE = (1, 8, 8)
SPLITS = ("train", "test", "all")
_TEST_FRACTION = 0.2
_HASH = 2654435761


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits as _sklearn_load_digits
    except ImportError as err:
        raise ImportError("the digits data set ships with scikit-learn, which is not installed; install it with "
                          "pip install 'sdediff[data]'") from err
    bunch = _sklearn_load_digits()
    images = torch.as_tensor(bunch.images).round().to(torch.uint8).reshape(-1, *DIGITS_SHAPE)
    labels = torch.as_tensor(bunch.target).to(torch.long)
    return images, labels


def split_indices(labels: Tensor) -> tuple[Tensor, Tensor]:
    """The fixed stratified split (see the module notes): ``(train_idx, test_idx)``, each ascending."""
    test = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten().tolist()
        idx.sort(key=lambda i: (_HASH * i) % 2**32)
        test += idx[: round(_TEST_FRACTION * len(idx))]
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    is_test[test] = True
    return (~is_test).nonzero().flatten(), is_test.nonzero().flatten()


def load_digits(split: str = "train", *, flatten: bool = False) -> tuple[Tensor, Tensor]:
    """The digits as integer grey levels and labels.

    Parameters
    ----------
    split : {"train", "test", "all"}
        The fixed split (1438 / 359 / 1797 images).
    flatten : bool
        Return ``(N, 64)`` instead of ``(N, 1, 8, 8)``.

    Returns
    -------
    (levels, labels) : ``uint8`` levels in ``[0, 16]`` and ``int64`` labels in ``[0, 9]``.

    Raises
    ------
    ImportError
        Without scikit-learn (``pip install 'sdediff[data]'``).
    """
    check_choice("split", split, SPLITS)
    images, labels = _raw()
    if split != "all":
        train, test = split_indices(labels)
        keep = train if split == "train" else test
        images, labels = images[keep], labels[keep]
    images = images.clone()
    return (images.reshape(len(images), -1) if flatten else images), labels.clone()


def dequantize_levels(k: Tensor, levels: int, generator: torch.Generator | None = None,
                      data_range: tuple[float, float] = (-1.0, 1.0), dtype: torch.dtype | None = None) -> Tensor:
    r"""Uniform dequantisation of ``K``-level data: :math:`x = x_{lo} + (x_{hi} - x_{lo})(k + u)/K`.

    The generalisation of :func:`sdediff.dequantize` from :math:`2^b` to any number of levels ``K``
    (for :math:`K = 2^b` it draws the same ``u`` and returns the same values). Every ``x`` stays in its
    own half-open bin :math:`[x_{lo} + wk/K,\ x_{lo} + w(k+1)/K)`.
    """
    levels = check_int("levels", levels, 2)
    dtype = check_dtype("dtype", dtype)
    lo, hi = data_range
    if not hi > lo:
        raise ValueError(f"data_range must be (lo, hi) with hi > lo, got {data_range!r}")
    if not isinstance(k, Tensor):
        raise TypeError(f"k must be a tensor of integer levels, got {type(k).__name__}")
    if k.is_floating_point() and not bool((k == k.round()).all()):
        raise ValueError("k must hold integer values")
    if bool(((k < 0) | (k > levels - 1)).any()):
        raise ValueError(f"k must lie in [0, {levels - 1}] for levels={levels}")
    dtype = dtype or (k.dtype if k.is_floating_point() else torch.get_default_dtype())
    u = torch.rand(k.shape, generator=generator, device=generator.device if generator is not None else k.device,
                   dtype=dtype)
    k = k.to(dtype)
    x = lo + (hi - lo) * (k + u.to(k.device)) / levels
    upper = lo + (hi - lo) * (k + 1) / levels
    return torch.minimum(x, torch.nextafter(upper, torch.full_like(upper, -math.inf)))


def digits_to_model(k: Tensor, generator: torch.Generator | None = None, *, dequantize: bool = True,
                    dtype: torch.dtype | None = None) -> Tensor:
    r"""Map digit levels ``k`` in ``[0, 16]`` to :math:`[-1, 1]`: :math:`x = -1 + 2(k + u)/17`.

    With ``dequantize`` (the default; use it for training and likelihoods) :math:`u \sim U(0,1)` is drawn
    from ``generator``; otherwise :math:`u = 1/2`, the bin centres. Its signature fits
    :class:`~sdediff.training.Trainer`'s ``transform=``.
    """
    if not dequantize:
        dtype = dtype or torch.get_default_dtype()
        return -1 + 2 * (k.to(dtype) + 0.5) / DIGITS_LEVELS
    return dequantize_levels(k, DIGITS_LEVELS, generator=generator, dtype=dtype)


def model_to_digits(x: Tensor) -> Tensor:
    r"""Inverse map: :math:`k = \lfloor 17 (x + 1)/2 \rfloor` clipped to ``[0, 16]``, as ``uint8``."""
    return torch.floor((x + 1) * DIGITS_LEVELS / 2).clamp(0, DIGITS_LEVELS - 1).to(torch.uint8)


def bits_per_dim_levels(log_prob: Tensor, num_dims: int, levels: int = DIGITS_LEVELS,
                        data_width: float = 2.0) -> Tensor:
    r"""Bits/dim of ``K``-level data from the log-density of its dequantised version (module notes):

    :math:`-\log p(x)/(D\ln 2) + \log_2 K - \log_2 w`; equals :func:`sdediff.bits_per_dim` when :math:`K = 2^b`.
    """
    levels = check_int("levels", levels, 2)
    check_int("num_dims", num_dims)
    data_width = check_float("data_width", data_width, 0, low_open=True)
    return -log_prob / (num_dims * math.log(2)) + math.log2(levels) - math.log2(data_width)


def digits_bits_per_dim(log_prob: Tensor) -> Tensor:
    """Bits/dim of digits (64 dimensions, 17 levels, mapped to ``[-1, 1]``) from ``log p(x)`` in nats."""
    return bits_per_dim_levels(log_prob, 64, DIGITS_LEVELS, 2.0)
