"""Data: reference distributions with closed-form noisy marginals and scores, 2-D toy sets, 8×8 digits, MNIST, and
:func:`load` for a folder of images, an array file or a torchvision set on disk."""

from .digits import (
    DIGITS_LEVELS,
    bits_per_dim_levels,
    dequantize_levels,
    digits_bits_per_dim,
    digits_to_model,
    load_digits,
    model_to_digits,
)
from .loader import LoadedData, load
from .mixture import GaussianMixture
from .mnist import load_mnist
from .toy import TOY_CLASSES, TOY_DATASETS, make_toy, sample_toy, skewed_mixture, toy_mixture
from .values import ValueTransform

__all__ = [
    "GaussianMixture", "TOY_CLASSES", "TOY_DATASETS", "make_toy", "sample_toy", "toy_mixture", "DIGITS_LEVELS", "load_digits",
    "digits_to_model", "model_to_digits", "dequantize_levels", "bits_per_dim_levels", "digits_bits_per_dim",
    "skewed_mixture", "load", "LoadedData", "ValueTransform", "load_mnist",
]
