"""Reference data distributions with closed-form noisy marginals and scores."""

from .mixture import GaussianMixture

__all__ = ["GaussianMixture"]
