"""The trainer's hyper-parameters: :class:`TrainConfig`, validated when it is built."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from .._validate import check_bool, check_choice, check_float, check_int
from ..score import PREDICTIONS
from ..solvers import get_solver
from .losses import T_SAMPLINGS, WEIGHTINGS

__all__ = ["LOSSES", "RESUME_FREE_FIELDS", "TrainConfig"]

LOSSES = ("dsm", "ssm", "elbo")

#: Fields that may change between a run and its resumption without breaking the exact continuation.
RESUME_FREE_FIELDS = frozenset({"steps", "log_every", "eval_every", "ckpt_every", "keep_checkpoints", "out_dir",
                                "progress", "device", "eval_samples", "eval_solver", "eval_sample_steps",
                                "eval_nll_points", "max_nonfinite"})


@dataclass
class TrainConfig:
    """Training hyper-parameters; every field is stored in checkpoints and ``metrics.json``.

    Attributes
    ----------
    steps : int
        Total optimisation steps (a resumed run continues up to this number).
    batch_size : int
        Global batch size (split evenly over data-parallel ranks; must be divisible by their number).
    lr, weight_decay, betas : float, float, (float, float)
        AdamW hyper-parameters.
    warmup_steps : int
        Linear learning-rate warm-up: ``lr * min(1, (k + 1) / warmup_steps)`` at step ``k``.
    lr_schedule : {"constant", "cosine"}
        After warm-up: constant, or cosine decay to 0 at ``steps``.
    grad_clip : float or None
        Clip the global gradient norm to this value (``None`` or 0: no clipping).
    ema_decay : float
        EMA decay ``d`` in ``[0, 1)`` (0: the EMA equals the weights).
    ema_warmup : bool
        Use ``min(d, (1 + k) / (10 + k))`` at step ``k``, so early EMA weights are not stuck at the init.
    amp : bool
        Mixed precision (autocast) on CUDA; ignored with a warning on other devices.
    amp_dtype : {"bfloat16", "float16"}
        Autocast dtype; float16 adds a gradient scaler.
    seed : int
        Seeds the trainer's generator (batches, times, noise, label dropout, transforms).
    loss : {"dsm", "ssm", "elbo"}
        ``"dsm"``: denoising score matching (:func:`~sdediff.training.dsm_loss`). ``"ssm"``: sliced score
        matching on the noised batch, which never uses the noise (:func:`~sdediff.training.ssm.ssm_loss`, weighted
        by ``weighting``; no labels). ``"elbo"``: the whole evidence bound per sample (prior + likelihood-weighted
        diffusion term + Gaussian reconstruction, :mod:`sdediff.elbo`), divided by the dimension with
        ``reduce_mean``; the only loss that trains a :class:`~sdediff.LearnedScheduleSDE`: its endpoints on the
        bound, its shape on the variance of the diffusion term's estimate (VDM).
    prediction : {"eps", "score", "x0", "v", "flow"}
        What the network predicts.
    weighting : {"simple", "likelihood"}
        Loss weighting :math:`\\lambda(t)` (see :func:`~sdediff.training.losses.dsm_loss`).
    t_sampling : {"uniform", "importance"}
        How training times are drawn.
    t_eps : float
        Smallest training time.
    reduce_mean : bool
        Mean (else sum) of the squared error over the non-batch dimensions.
    cond_drop_prob : float
        With labels, the probability of replacing a label by the model's null token (classifier-free
        guidance training).
    nonfinite : {"skip", "stop"}
        What a non-finite loss or gradient norm does.
    max_nonfinite : int
        With ``"skip"``, stop after this many skipped steps.
    log_every, eval_every, ckpt_every : int
        Periods in steps (0 disables evaluation / periodic checkpoints; a final checkpoint is written
        whenever ``out_dir`` is set).
    eval_samples, eval_solver, eval_sample_steps : int, str, int
        Samples drawn from the EMA model at each evaluation, and how (``eval_solver``: any name
        :func:`sdediff.solvers.get_solver` builds, e.g. ``"heun"`` or ``"torchsde:srk"``; checked here).
    eval_nll_points : int
        Points whose exact NLL (probability-flow ODE) and NLL bound are computed at each evaluation.
    keep_checkpoints : int
        How many periodic checkpoints to keep (0: all).
    out_dir : str or None
        Where checkpoints, samples and ``metrics.json`` go (``None``: nothing is written).
    progress : bool
        Show a tqdm bar with the running loss (rank 0).
    device : str or None
        Training device; default ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``.
    """

    steps: int = 10_000
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    amp: bool = False
    amp_dtype: str = "bfloat16"
    seed: int = 0
    prediction: str = "eps"
    loss: str = "dsm"
    weighting: str = "simple"
    t_sampling: str = "uniform"
    t_eps: float = 1e-5
    reduce_mean: bool = True
    cond_drop_prob: float = 0.0
    nonfinite: str = "skip"
    max_nonfinite: int = 100
    log_every: int = 100
    eval_every: int = 0
    eval_samples: int = 256
    eval_solver: str = "heun"
    eval_sample_steps: int = 50
    eval_nll_points: int = 64
    ckpt_every: int = 0
    keep_checkpoints: int = 3
    out_dir: str | None = None
    progress: bool = True
    device: str | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "max_nonfinite"):
            check_int(f"TrainConfig.{name}", getattr(self, name), 1)
        for name in ("warmup_steps", "eval_every", "ckpt_every", "eval_samples", "eval_sample_steps",
                     "eval_nll_points", "keep_checkpoints", "seed"):
            check_int(f"TrainConfig.{name}", getattr(self, name), 0)
        for name, options in (("prediction", PREDICTIONS), ("loss", LOSSES), ("weighting", WEIGHTINGS),
                              ("t_sampling", T_SAMPLINGS), ("nonfinite", ("skip", "stop")),
                              ("lr_schedule", ("constant", "cosine")), ("amp_dtype", ("bfloat16", "float16"))):
            check_choice(f"TrainConfig.{name}", getattr(self, name), options)
        for name in ("ema_warmup", "amp", "reduce_mean", "progress"):
            check_bool(f"TrainConfig.{name}", getattr(self, name))
        check_float("TrainConfig.lr", self.lr, 0, low_open=True)
        check_float("TrainConfig.weight_decay", self.weight_decay, 0)
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise ValueError(f"TrainConfig.betas must be two floats in [0, 1), got {self.betas!r}")
        self.betas = tuple(check_float(f"TrainConfig.betas[{i}]", b, 0, 1, high_open=True)  # type: ignore[assignment]
                           for i, b in enumerate(self.betas))
        check_float("TrainConfig.grad_clip", self.grad_clip, 0, finite=False, optional=True)
        check_float("TrainConfig.ema_decay", self.ema_decay, 0, 1, high_open=True)
        check_float("TrainConfig.cond_drop_prob", self.cond_drop_prob, 0, 1, high_open=True)
        check_float("TrainConfig.t_eps", self.t_eps, 0, low_open=True)
        try:
            get_solver(self.eval_solver)
        except (TypeError, ValueError) as err:
            raise ValueError(f"TrainConfig.eval_solver: {err}") from err
        if self.out_dir is not None:
            self.out_dir = str(self.out_dir)

    def lr_at(self, step: int) -> float:
        r"""Learning rate of the update at ``step`` (0-based): ``lr`` times the warm-up factor
        :math:`\min(1, (k + 1)/k_w)` (:math:`k_w` = ``warmup_steps``; 1 without warm-up) and, with the cosine schedule,
        :math:`\tfrac12(1 + \cos \pi p)`, :math:`p = \min(1, \max(0, k - k_w) / \max(1, K - k_w))`, :math:`K` = ``steps``."""
        factor = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.lr_schedule == "cosine":
            progress = min(1.0, max(0, step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
            factor *= 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr * factor

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-serialisable dict."""
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build a config from :meth:`to_dict`'s output (unknown keys are an error)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {', '.join(unknown)}")
        return cls(**d)

    def resume_conflicts(self, saved: TrainConfig) -> list[str]:
        """The fields, sorted, in which this config differs from ``saved`` (a checkpoint's) other than those of
        :data:`RESUME_FREE_FIELDS`: with any of them a resumed run no longer repeats the original one. ``steps`` is
        free only under the constant schedule: the cosine schedule decays to 0 at ``steps``, so another number of
        steps changes the learning rate of every step still to come."""
        old = saved.to_dict()
        changed = {k for k, v in self.to_dict().items() if k not in RESUME_FREE_FIELDS and old[k] != v}
        if "cosine" in (self.lr_schedule, saved.lr_schedule) and self.steps != saved.steps:
            changed.add("steps")
        return sorted(changed)
