r"""Sample quality without a download: a small classifier trained on the data itself, and distances between the
feature statistics of generated and real samples.

**This is not FID, KID or the Inception score.** Those use an Inception-v3 network trained on ImageNet; here
the feature extractor is a small network (:class:`FeatureClassifier`: a CNN for ``(C, H, W)`` images, an MLP
for any other sample shape) trained by :func:`train_classifier` on the same data set as the diffusion model,
and the features are its penultimate layer. The numbers are comparable only between sample sets scored with
the same classifier weights (save them with :func:`save_classifier`), never with published FID/KID/IS figures.

=========================  ===============================================================================
:func:`frechet_distance`   Fréchet distance between Gaussians fitted to two feature sets (FID's formula)
:func:`kernel_distance`    unbiased MMD² with the cubic polynomial kernel (KID's estimator)
:func:`classifier_score`   :math:`\exp E_x\,\mathrm{KL}(p(y \mid x)\,\|\,p(y))`, class balance and confidence
                           (an Inception-score analogue)
=========================  ===============================================================================
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ._io import save_safetensors
from ._validate import check_float, check_int

__all__ = ["ClassifierConfig", "FeatureClassifier", "train_classifier", "extract_features", "class_probabilities",
           "frechet_distance", "gaussian_frechet_distance", "kernel_distance", "ClassifierScore", "classifier_score",
           "save_classifier", "load_classifier"]


@dataclass(frozen=True)
class ClassifierConfig:
    """The architecture of a :class:`FeatureClassifier`: what :func:`load_classifier` needs to rebuild it.

    ``sample_shape`` of length 3 ``(C, H, W)`` gives a CNN, any other an MLP on the flattened sample.
    """

    sample_shape: tuple[int, ...]
    num_classes: int
    width: int = 32
    feature_dim: int = 64

    @property
    def is_image(self) -> bool:
        return len(self.sample_shape) == 3


class FeatureClassifier(nn.Module):
    r"""A small classifier whose penultimate layer gives the features.

    CNN (``(C, H, W)`` samples): three 3×3 convolutions with ``width``, ``2 width``, ``2 width`` channels (the
    last two with stride 2), SiLU after each, global average pooling, a linear layer to ``feature_dim`` with SiLU
    (the features), and a linear layer to the logits. MLP (any other shape): the flattened sample through two
    SiLU layers of ``width`` and ``feature_dim`` units (the features), then the logits.
    """

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        w, f = config.width, config.feature_dim
        if config.is_image:
            c = config.sample_shape[0]
            self.body = nn.Sequential(
                nn.Conv2d(c, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.SiLU(),
                nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                nn.Linear(2 * w, f), nn.SiLU())
        else:
            d = math.prod(config.sample_shape)
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(d, w), nn.SiLU(), nn.Linear(w, f), nn.SiLU())
        self.head = nn.Linear(f, config.num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer features, ``(batch, feature_dim)``."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits, ``(batch, num_classes)``."""
        return self.head(self.body(x))


def _check_pairs(x: Tensor, y: Tensor) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError("x must be a floating tensor of shape (N, ...) with at least 2 dimensions")
    if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.shape != (x.shape[0],):
        raise ValueError(f"y must be an int64 tensor of shape ({x.shape[0]},), the class of each sample")


def train_classifier(x: Tensor, y: Tensor, num_classes: int | None = None, *, steps: int = 500, batch_size: int = 128,
                     lr: float = 2e-3, width: int = 32, feature_dim: int = 64,
                     generator: torch.Generator | None = None) -> FeatureClassifier:
    r"""Train a :class:`FeatureClassifier` on samples ``x`` with labels ``y`` by cross-entropy.

    ``steps`` AdamW steps (weight decay 0.01) on batches of ``batch_size`` drawn with replacement; the initial
    weights and the batches come from ``generator``, so a seeded generator gives the same network. The network
    is on ``x``'s device and dtype and is returned in eval mode.

    Parameters
    ----------
    x : Tensor, shape (N, ...)
        Training samples on the model's scale (e.g. :attr:`sdediff.data.LoadedData.train`).
    y : Tensor, shape (N,)
        ``int64`` classes in ``[0, num_classes)``.
    num_classes : int, optional
        Number of classes (default ``y.max() + 1``).
    """
    _check_pairs(x, y)
    steps, batch_size = check_int("steps", steps), check_int("batch_size", batch_size)
    lr = check_float("lr", lr, 0.0, low_open=True)
    num_classes = check_int("num_classes", num_classes, 2, optional=True) or int(y.max()) + 1
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"y must lie in [0, {num_classes - 1}]")
    config = ClassifierConfig(tuple(x.shape[1:]), num_classes, check_int("width", width),
                              check_int("feature_dim", feature_dim))
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device if generator is not None else "cpu"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FeatureClassifier(config).to(device=x.device, dtype=x.dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    y = y.to(x.device)
    model.train()
    for _ in range(steps):
        idx = torch.randint(x.shape[0], (batch_size,), generator=generator,
                            device=generator.device if generator is not None else "cpu").to(x.device)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def extract_features(classifier: FeatureClassifier, x: Tensor, batch_size: int = 512) -> Tensor:
    """The classifier's penultimate-layer features of ``x``, ``(N, feature_dim)``, evaluated in batches."""
    batch_size = check_int("batch_size", batch_size)
    return torch.cat([classifier.features(chunk) for chunk in x.split(batch_size)])


@torch.no_grad()
def class_probabilities(classifier: FeatureClassifier, x: Tensor, batch_size: int = 512) -> Tensor:
    """Softmax class probabilities :math:`p(y \\mid x)` of ``x``, ``(N, num_classes)``."""
    batch_size = check_int("batch_size", batch_size)
    return torch.cat([classifier(chunk).softmax(-1) for chunk in x.split(batch_size)])


def _features(z: Tensor, name: str) -> Tensor:
    if not isinstance(z, Tensor) or not z.is_floating_point() or z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"{name} must be a floating tensor of features (n, d) with n >= 2, got "
                         f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
    return z.to(torch.float64)


def _psd_sqrt(m: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix by eigen-decomposition (negative round-off clipped)."""
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def gaussian_frechet_distance(mean_a: Tensor, cov_a: Tensor, mean_b: Tensor, cov_b: Tensor) -> Tensor:
    r"""Squared Fréchet (2-Wasserstein) distance between :math:`N(\mu_a, \Sigma_a)` and :math:`N(\mu_b, \Sigma_b)`:

    .. math::  d^2 = \|\mu_a - \mu_b\|^2 + \operatorname{tr}\Sigma_a + \operatorname{tr}\Sigma_b
               - 2\operatorname{tr}\big(\Sigma_a^{1/2}\,\Sigma_b\,\Sigma_a^{1/2}\big)^{1/2},

    in float64, the matrix square roots by symmetric eigen-decomposition (the product is symmetric PSD, so
    no complex round-off arises as with a general ``sqrtm`` of :math:`\Sigma_a\Sigma_b`).
    """
    mean_a, mean_b, cov_a, cov_b = (t.to(torch.float64) for t in (mean_a, mean_b, cov_a, cov_b))
    root_a = _psd_sqrt(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    d2 = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return d2.clamp_min(0)


def frechet_distance(feat_a: Tensor, feat_b: Tensor) -> Tensor:
    r"""FID's formula on any features: :func:`gaussian_frechet_distance` between Gaussians fitted to the two sets
    (sample means and unbiased covariances, float64). A 0-d tensor; 0 for identical statistics.

    Not FID: the features come from whatever network produced them (see the module notes).
    """
    a, b = _features(feat_a, "feat_a"), _features(feat_b, "feat_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feat_a and feat_b must have the same feature dimension, got {a.shape[1]} and {b.shape[1]}")
    return gaussian_frechet_distance(a.mean(0), torch.cov(a.T).reshape(a.shape[1], a.shape[1]),
                                     b.mean(0), torch.cov(b.T).reshape(b.shape[1], b.shape[1]))


def _mmd2_unbiased(a: Tensor, b: Tensor, degree: int, coef: float) -> Tensor:
    d = a.shape[1]
    k_aa, k_bb, k_ab = ((u @ v.T / d + coef) ** degree for u, v in ((a, a), (b, b), (a, b)))
    m, n = a.shape[0], b.shape[0]
    return ((k_aa.sum() - k_aa.diagonal().sum()) / (m * (m - 1)) + (k_bb.sum() - k_bb.diagonal().sum()) / (n * (n - 1))
            - 2 * k_ab.mean())


def kernel_distance(feat_a: Tensor, feat_b: Tensor, *, degree: int = 3, coef: float = 1.0,
                    num_subsets: int = 1, subset_size: int | None = None,
                    generator: torch.Generator | None = None) -> Tensor:
    r"""KID's estimator on any features: the unbiased MMD² with the polynomial kernel
    :math:`k(u, v) = (u^\top v / d + c)^p` (``degree`` :math:`p = 3`, ``coef`` :math:`c = 1`),

    .. math::  \widehat{\mathrm{MMD}}^2 = \frac{\sum_{i \ne j} k(a_i, a_j)}{m(m-1)}
               + \frac{\sum_{i \ne j} k(b_i, b_j)}{n(n-1)} - \frac{2}{mn}\sum_{i,j} k(a_i, b_j),

    whose expectation is 0 when both sets come from the same distribution (so it can come out slightly
    negative) and positive otherwise. With ``subset_size`` the estimate is averaged over ``num_subsets`` pairs
    of random subsets drawn without replacement from ``generator`` (as KID does); by default it uses all samples
    once. Float64; a 0-d tensor. Not KID: see the module notes.
    """
    a, b = _features(feat_a, "feat_a"), _features(feat_b, "feat_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feat_a and feat_b must have the same feature dimension, got {a.shape[1]} and {b.shape[1]}")
    degree, num_subsets = check_int("degree", degree), check_int("num_subsets", num_subsets)
    coef = check_float("coef", coef, 0.0)
    subset_size = check_int("subset_size", subset_size, 2, min(a.shape[0], b.shape[0]), optional=True)
    if subset_size is None:
        return _mmd2_unbiased(a, b, degree, coef)
    device = generator.device if generator is not None else torch.device("cpu")
    values = []
    for _ in range(num_subsets):
        ia = torch.randperm(a.shape[0], generator=generator, device=device)[:subset_size].to(a.device)
        ib = torch.randperm(b.shape[0], generator=generator, device=device)[:subset_size].to(b.device)
        values.append(_mmd2_unbiased(a[ia], b[ib], degree, coef))
    return torch.stack(values).mean()


@dataclass(frozen=True)
class ClassifierScore:
    """What :func:`classifier_score` measures on a set of class probabilities.

    Attributes
    ----------
    score : float
        :math:`\\exp E_x \\mathrm{KL}(p(y \\mid x) \\| p(y))`, between 1 and ``K``.
    balance : float
        Entropy of the mean prediction over :math:`\\log K`: 1 when every class is predicted equally often.
    confidence : float
        Mean over samples of :math:`\\max_y p(y \\mid x)`.
    class_fractions : tuple of float
        The mean prediction :math:`p(y) = E_x\\,p(y \\mid x)`.
    """

    score: float
    balance: float
    confidence: float
    class_fractions: tuple[float, ...]


def classifier_score(probs: Tensor) -> ClassifierScore:
    r"""An Inception-score analogue from class probabilities :math:`p(y \mid x_i)` (rows of ``probs``, ``(N, K)``):

    .. math::  S = \exp\Big(\frac1N\sum_i \mathrm{KL}\big(p(y \mid x_i)\,\|\,\bar p(y)\big)\Big)
               = \exp\big(H(\bar p) - \tfrac1N\textstyle\sum_i H(p(\cdot \mid x_i))\big),
               \qquad \bar p = \frac1N\sum_i p(y \mid x_i),

    large (up to ``K``) when each sample is confidently one class and the classes are balanced; with the
    balance :math:`H(\bar p)/\log K` and the mean confidence :math:`\frac1N\sum_i\max_y p(y \mid x_i)`.
    Float64. Not the Inception score: see the module notes.
    """
    if not isinstance(probs, Tensor) or probs.dim() != 2 or probs.shape[0] < 1 or probs.shape[1] < 2:
        raise ValueError("probs must be a tensor (N, K) of class probabilities with N >= 1, K >= 2")
    p = probs.to(torch.float64)
    if bool((p < 0).any()) or not torch.allclose(p.sum(1), torch.ones_like(p[:, 0]), atol=1e-4):
        raise ValueError("probs rows must be probability vectors (non-negative, summing to 1)")
    mean = p.mean(0)
    entropy = -torch.special.xlogy(p, p).sum(1)
    h_mean = -torch.special.xlogy(mean, mean).sum()
    return ClassifierScore(score=float(torch.exp(h_mean - entropy.mean())), balance=float(h_mean / math.log(p.shape[1])),
                           confidence=float(p.max(1).values.mean()), class_fractions=tuple(mean.tolist()))


def save_classifier(classifier: FeatureClassifier, path: str | Path) -> Path:
    """Write the weights as ``.safetensors`` (atomically), with the :class:`ClassifierConfig` as JSON metadata."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in classifier.state_dict().items()}
    metadata = {"sdediff_classifier": json.dumps(asdict(classifier.config))}
    return save_safetensors(path, tensors, metadata)


def load_classifier(path: str | Path, device: torch.device | str | None = None) -> FeatureClassifier:
    """The classifier saved by :func:`save_classifier` (weights and architecture), in eval mode on ``device``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = (f.metadata() or {}).get("sdediff_classifier")
    if meta is None:
        raise ValueError(f"{path} is not a classifier saved by sdediff.features.save_classifier (no config metadata)")
    fields = json.loads(meta)
    config = ClassifierConfig(tuple(fields["sample_shape"]), fields["num_classes"], fields["width"], fields["feature_dim"])
    state = load_file(str(path))
    dtype = next(iter(state.values())).dtype
    model = FeatureClassifier(config).to(dtype=dtype)
    model.load_state_dict(state)
    return model.to(device=device).eval() if device is not None else model.eval()
