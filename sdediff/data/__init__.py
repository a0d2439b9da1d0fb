"""Data: reference distributions with closed-form noisy marginals and scores, 2-D toy sets, 8×8 digits."""

from .digits import (
    DIGITS_LEVELS,
    bits_per_dim_levels,
    dequantize_levels,
    digits_bits_per_dim,
    digits_to_model,
    load_digits,
    model_to_digits,
)
from .mixture import GaussianMixture
from .toy import TOY_CLASSES, TOY_DATASETS, make_toy, sample_toy, skewed_mixture, toy_mixture

__all__ = [
    "GaussianMixture", "TOY_CLASSES", "TOY_DATASETS", "make_toy", "sample_toy", "toy_mixture", "DIGITS_LEVELS", "load_digits",
    "digits_to_model", "model_to_digits", "dequantize_levels", "bits_per_dim_levels", "digits_bits_per_dim",
    "skewed_mixture",
]
