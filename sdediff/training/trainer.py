r"""A compact trainer for score networks: DSM loss, AdamW, EMA, checkpoints, exact resume and DDP.

One optimisation step:

1. draw a *global* batch from one seeded :class:`torch.Generator`: data indices (uniform, with
   replacement), the optional ``transform`` (e.g. dequantisation), label dropout, times ``t`` (and
   importance weights) and noise ``ε``;
2. under ``torchrun`` each of the ``W`` ranks takes its slice ``[r B/W, (r+1) B/W)`` of those draws, so
   the averaged DDP gradient is the single-process gradient of the same global batch;
3. :func:`~sdediff.training.losses.dsm_loss`, backward, global mean loss (all-reduced), gradient-norm
   clipping, a learning rate from the step (linear warmup, then constant or cosine), AdamW, and the EMA
   :math:`\bar\theta \leftarrow d\,\bar\theta + (1-d)\,\theta` with
   :math:`d = \min(d_{max}, (1+k)/(10+k))` during the EMA warm-up.

A non-finite loss or gradient norm either skips the update (counted; ``max_nonfinite`` skips at most)
or stops with :class:`NonFiniteLossError`. Everything that decides the next step — weights, EMA,
AdamW moments, the generator state, the global torch RNG states, the step and the loss history — goes
into the checkpoint (safetensors, written atomically; see :mod:`sdediff.training.checkpoint`), so a
resumed run repeats the uninterrupted run's losses bit for bit on the same hardware.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._io import atomic_write, atomic_write_file, json_safe
from .._utils import flat_dim, randn
from ..elbo import gaussian_reconstruction, nll_bound, prior_kl
from ..guidance import ClassifierFreeNet
from ..likelihood import log_likelihood
from ..sampling import sample
from ..score import PREDICTIONS, ScoreModel
from ..sdes.linear import require_linear
from .checkpoint import (
    CheckpointError,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from .losses import T_SAMPLINGS, WEIGHTINGS, dsm_loss, sample_time
from .ssm import ssm_loss

Transform = Callable[[Tensor, torch.Generator], Tensor]


class NonFiniteLossError(FloatingPointError):
    """Training produced a non-finite loss or gradient (``nonfinite="stop"``, or too many skips)."""


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
        Samples drawn from the EMA model at each evaluation, and how.
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
        def integer(name: str, low: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"TrainConfig.{name} must be an integer >= {low}, got {v!r}")

        def choice(name: str, options: tuple[str, ...]) -> None:
            if getattr(self, name) not in options:
                raise ValueError(f"TrainConfig.{name} must be one of {', '.join(options)}; got {getattr(self, name)!r}")

        for name in ("steps", "batch_size", "log_every", "max_nonfinite"):
            integer(name, 1)
        for name in ("warmup_steps", "eval_every", "ckpt_every", "eval_samples", "eval_sample_steps",
                     "eval_nll_points", "keep_checkpoints", "seed"):
            integer(name, 0)
        choice("prediction", PREDICTIONS)
        choice("loss", ("dsm", "ssm", "elbo"))
        choice("weighting", WEIGHTINGS)
        choice("t_sampling", T_SAMPLINGS)
        choice("nonfinite", ("skip", "stop"))
        choice("lr_schedule", ("constant", "cosine"))
        choice("amp_dtype", ("bfloat16", "float16"))
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig.lr must be a positive float, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"TrainConfig.weight_decay must be a float >= 0, got {self.weight_decay!r}")
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"TrainConfig.betas must be two floats in [0, 1), got {self.betas!r}")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float)) and self.grad_clip >= 0):
            raise ValueError(f"TrainConfig.grad_clip must be None or a float >= 0, got {self.grad_clip!r}")
        if not (isinstance(self.ema_decay, (int, float)) and 0 <= self.ema_decay < 1):
            raise ValueError(f"TrainConfig.ema_decay must be a float in [0, 1), got {self.ema_decay!r}")
        if not (isinstance(self.cond_drop_prob, (int, float)) and 0 <= self.cond_drop_prob < 1):
            raise ValueError(f"TrainConfig.cond_drop_prob must be a float in [0, 1), got {self.cond_drop_prob!r}")
        if not (isinstance(self.t_eps, (int, float)) and self.t_eps > 0):
            raise ValueError(f"TrainConfig.t_eps must be a positive float, got {self.t_eps!r}")
        if self.out_dir is not None:
            self.out_dir = str(self.out_dir)

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


# fields that may change between a run and its resumption without breaking the exact continuation
_RESUME_FREE = {"steps", "log_every", "eval_every", "ckpt_every", "keep_checkpoints", "out_dir", "progress",
                "device", "eval_samples", "eval_solver", "eval_sample_steps", "eval_nll_points", "max_nonfinite"}


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and every CUDA device) — call before building a model."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass
    torch.manual_seed(seed)


@dataclass
class _Dist:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    created: bool = False

    def close(self) -> None:
        """Leave the process group if :func:`_setup_distributed` created it; all ranks meet at a barrier first,
        so no rank tears gloo down while a peer is still working (which can abort at interpreter exit)."""
        if self.created:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()
            self.created = False


def _setup_distributed(device_pref: str | None) -> _Dist:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    if "RANK" not in os.environ:
        raise RuntimeError(f"WORLD_SIZE={world} is set but RANK is not; launch with torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    created = False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and (device_pref is None or device_pref.startswith("cuda"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        created = True
    return _Dist(dist.get_world_size(), dist.get_rank(), local_rank, created)


class _Conditioned(nn.Module):
    """``net(x, t, cond)`` seen as ``net(x, t)``."""

    def __init__(self, net: nn.Module, cond: Tensor) -> None:
        super().__init__()
        self.net, self.cond = net, cond

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(x, t, self.cond)


def _describe_sde(sde) -> dict[str, Any]:
    """``sde.to_config()`` (class name and constructor arguments, rebuilt by :func:`sdediff.sdes.sde_from_config`)
    and its repr; ``params`` is ``None`` for a custom SDE that does not define :meth:`~sdediff.SDE.to_config`."""
    try:
        config = sde.to_config()
    except NotImplementedError:
        config = {"class": type(sde).__name__, "params": None}
    return {**config, "repr": repr(sde)}


def _describe_time_input(time_input: Callable[[Tensor], Tensor] | None, sde) -> str | None:
    """``None`` (the network sees ``t``), ``"sde.NAME"`` (a method of the SDE, e.g. ``sde.noise_level``: rebuilt on
    loading) or ``"custom"`` (any other callable, which a checkpoint cannot hold)."""
    if time_input is None:
        return None
    if getattr(time_input, "__self__", None) is sde and hasattr(time_input, "__name__"):
        return f"sde.{time_input.__name__}"
    return "custom"


class Trainer:
    r"""Train a network by denoising score matching on an in-memory data set.

    Parameters
    ----------
    model : nn.Module or ScoreModel
        The network ``model(x, t)`` (``model(x, t, y)`` with labels) predicting ``config.prediction``.
        A :class:`~sdediff.score.ScoreModel` is unwrapped (its prediction must equal the config's).
    sde : LinearSDE
        The forward SDE. A learned schedule (an ``nn.Module`` SDE such as :class:`~sdediff.LearnedScheduleSDE`)
        trains with the network, and its parameters are averaged with the weights: :attr:`ema_sde` is the
        schedule that goes with the EMA weights (``score_fn().sde``); for a fixed SDE it is ``sde`` itself.
    data : Tensor
        The training set ``(N, ...)``, moved to the training device. Integer data (e.g. quantised
        levels) need a ``transform`` to floating point.
    labels : Tensor, optional
        ``(N,)`` integer class labels, passed to the network as its third argument.
    config : TrainConfig, optional
        Hyper-parameters (defaults otherwise).
    transform : callable, optional
        ``transform(batch, generator) -> floating batch`` applied to every drawn global batch (e.g.
        :func:`sdediff.data.digits.digits_to_model` for fresh dequantisation noise each step).
    eval_data : Tensor, optional
        Held-out points for the NLL evaluation (default: the start of ``data``); ``transform`` applies.
    eval_fn : callable, optional
        ``eval_fn(trainer, samples) -> dict`` of extra metrics at each evaluation.
    time_input : callable, optional
        Maps ``t`` to the network's time input (see :class:`~sdediff.score.ScoreModel`).

    Examples
    --------
    ::

        net = MLP(dim=2)
        trainer = Trainer(net, sdediff.VPSDE(), make_toy("moons", 10_000), config=TrainConfig(steps=2000))
        losses = trainer.fit()
        score = trainer.score_fn()  # the EMA weights, with the SDE they go with (score.sde)
        x = sdediff.sample(score.sde, score, (1000, 2), solver="heun", steps=50)
    """

    def __init__(self, model: nn.Module, sde, data: Tensor, labels: Tensor | None = None,
                 config: TrainConfig | None = None, *, transform: Transform | None = None,
                 eval_data: Tensor | None = None, eval_fn: Callable[[Trainer, Tensor | None], dict] | None = None,
                 time_input: Callable[[Tensor], Tensor] | None = None) -> None:
        cfg = config if config is not None else TrainConfig()
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(cfg).__name__}")
        if isinstance(model, ScoreModel):
            if model.prediction != cfg.prediction:
                raise ValueError(f"the ScoreModel predicts {model.prediction!r} but config.prediction is "
                                 f"{cfg.prediction!r}")
            time_input = time_input or model.time_input
            model = model.net
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("model has no trainable parameters")
        require_linear(sde, "training")
        if not isinstance(data, Tensor) or data.dim() < 1 or data.shape[0] < 1:
            raise TypeError("data must be a tensor of shape (N, ...) with N >= 1")
        if labels is not None:
            if not isinstance(labels, Tensor) or labels.shape != (data.shape[0],) or labels.is_floating_point():
                raise ValueError(f"labels must be an integer tensor of shape ({data.shape[0]},)")
        if transform is not None and not callable(transform):
            raise TypeError("transform must be callable as transform(batch, generator)")
        self.null_class = getattr(model, "null_class", None)
        if labels is not None and cfg.cond_drop_prob > 0 and self.null_class is None:
            raise ValueError("cond_drop_prob > 0 needs a model with a null class token (build it with num_classes=)")
        self.config, self.sde, self.transform, self.eval_fn, self.time_input = cfg, sde, transform, eval_fn, time_input

        self.dist = _setup_distributed(cfg.device)
        if cfg.batch_size % self.dist.world_size:
            raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the world size {self.dist.world_size}")
        if cfg.device is not None:
            device = torch.device(cfg.device)
            if device.type == "cuda" and device.index is None and self.dist.world_size > 1:
                device = torch.device("cuda", self.dist.local_rank)
        elif torch.cuda.is_available():
            device = torch.device("cuda", self.dist.local_rank)
        else:
            device = torch.device("cpu")
        self.device = device
        self.net = model.to(device)
        # a learned schedule (an nn.Module SDE) trains with the network; only the bound can train it
        self.sde_params = [p for p in sde.to(device).parameters() if p.requires_grad] if isinstance(sde, nn.Module) else []
        if self.sde_params and cfg.loss != "elbo":
            raise ValueError(f"a learned schedule ({type(sde).__name__}) trains only with loss='elbo', got {cfg.loss!r}")
        if cfg.loss == "ssm" and labels is not None:
            raise ValueError("loss='ssm' takes no labels")
        self.ema = copy.deepcopy(self.net).requires_grad_(False).eval()
        # a learned schedule is averaged with the network (as in VDM): the EMA network is matched to the EMA schedule
        self.ema_sde = copy.deepcopy(sde).requires_grad_(False) if self.sde_params else sde
        self.param_dtype = next(self.net.parameters()).dtype
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self._train_net: nn.Module = DistributedDataParallel(
                self.net, device_ids=[device.index] if device.type == "cuda" else None)
        else:
            self._train_net = self.net
        self.optimizer = torch.optim.AdamW([*self.net.parameters(), *self.sde_params], lr=cfg.lr, betas=cfg.betas,
                                           weight_decay=cfg.weight_decay)
        self._amp = cfg.amp and device.type == "cuda"
        if cfg.amp and not self._amp:
            warnings.warn(f"amp=True is ignored on {device.type}; training in full precision", RuntimeWarning,
                          stacklevel=2)
        self._amp_dtype = torch.bfloat16 if cfg.amp_dtype == "bfloat16" else torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if self._amp and cfg.amp_dtype == "float16" else None
        self.generator = torch.Generator(device).manual_seed(cfg.seed)
        self.data = data.to(device)
        self.labels = None if labels is None else labels.to(device=device, dtype=torch.long)
        self.eval_data = None if eval_data is None else eval_data.to(device)
        self.out_dir = Path(cfg.out_dir) if cfg.out_dir is not None else None

        self.step = 0
        self.history: list[float] = []
        self.nonfinite_count = 0
        self.log: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.steps_per_second: float | None = None

    # --- properties -------------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        """Whether this process writes files and evaluates (rank 0)."""
        return self.dist.rank == 0

    def lr_at(self, step: int) -> float:
        """Learning rate used by the update at ``step`` (0-based): warm-up, then constant or cosine."""
        cfg = self.config
        factor = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.lr_schedule == "cosine":
            progress = min(1.0, max(0, step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
            factor *= 0.5 * (1 + math.cos(math.pi * progress))
        return cfg.lr * factor

    # --- training ---------------------------------------------------------------------------------------
    def _draw_batch(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """This rank's slice of one globally drawn batch: ``(x0, t, t_weight, noise, cond)``."""
        cfg, g = self.config, self.generator
        batch = cfg.batch_size
        idx = torch.randint(self.data.shape[0], (batch,), generator=g, device=g.device)
        x0 = self.data[idx]
        if self.transform is not None:
            x0 = self.transform(x0, g)
        if not isinstance(x0, Tensor) or not x0.is_floating_point():
            raise TypeError("training data must be floating point after the transform; pass transform= to map "
                            "integer data (e.g. sdediff.data.digits.digits_to_model)")
        x0 = x0.to(self.param_dtype)
        cond = None
        if self.labels is not None:
            cond = self.labels[idx]
            if cfg.cond_drop_prob > 0:
                drop = torch.rand(batch, generator=g, device=g.device) < cfg.cond_drop_prob
                cond = torch.where(drop, torch.full_like(cond, self.null_class), cond)
        t, w = sample_time(self.sde, batch, t_sampling=cfg.t_sampling, t_eps=cfg.t_eps, generator=g,
                           device=x0.device, dtype=x0.dtype)
        noise = randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
        b = batch // self.dist.world_size
        sl = slice(self.dist.rank * b, (self.dist.rank + 1) * b)
        return x0[sl], t[sl], w[sl], noise[sl], None if cond is None else cond[sl]

    def _loss(self, x0: Tensor, t: Tensor, w: Tensor, noise: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The training loss of ``config.loss`` and, for a learned schedule, the mean squared diffusion term
        (whose gradient in the schedule's shape is that of the variance of the bound's estimate)."""
        cfg = self.config
        if cfg.loss == "dsm":
            return dsm_loss(self.sde, self._train_net, x0, prediction=cfg.prediction, weighting=cfg.weighting,
                            reduce_mean=cfg.reduce_mean, cond=cond, time_input=self.time_input, t=t, noise=noise,
                            t_weight=w), None
        scale = flat_dim(x0) if cfg.reduce_mean else 1
        if cfg.loss == "ssm":
            mean, std = self.sde.marginal(x0, t)
            xt = mean + std.reshape(-1, *[1] * (x0.dim() - 1)) * noise
            per = ssm_loss(self._train_net, xt, t, sde=self.sde, prediction=cfg.prediction,
                           weighting=cfg.weighting, generator=self.generator, reduction="none", time_input=self.time_input)
            return (w * per).mean() / scale, None
        diffusion = 0.5 * (self.sde.T - cfg.t_eps) * dsm_loss(
            self.sde, self._train_net, x0, prediction=cfg.prediction, weighting="likelihood", reduce_mean=False,
            reduction="none", cond=cond, time_input=self.time_input, t=t, noise=noise, t_weight=w)
        bound = prior_kl(self.sde, x0) + diffusion + gaussian_reconstruction(self.sde, x0, cfg.t_eps)
        shape = getattr(self.sde, "shape_parameters", None)
        return bound.mean() / scale, (diffusion / scale).pow(2).mean() if shape is not None and self.sde_params else None

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self._amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._amp_dtype)

    def train_step(self) -> float:
        """One optimisation step; returns the global mean loss (non-finite when the step was skipped)."""
        cfg = self.config
        self.net.train()
        x0, t, w, noise, cond = self._draw_batch()
        with self._autocast():
            loss, variance = self._loss(x0, t, w, noise, cond)
        self.optimizer.zero_grad(set_to_none=True)
        scale = self.scaler.scale if self.scaler is not None else (lambda v: v)
        if variance is None:
            scale(loss).backward()
        else:  # VDM: the network and the schedule's endpoints on the bound, the schedule's shape on its variance
            shape = self.sde.shape_parameters()
            rest = [p for p in [*self.net.parameters(), *self.sde_params] if p.requires_grad and all(p is not q for q in shape)]
            torch.autograd.backward(scale(loss), inputs=rest, retain_graph=True)
            torch.autograd.backward(scale(variance), inputs=shape)
            if self.dist.world_size > 1:
                import torch.distributed as dist

                for p in self.sde_params:  # not in DDP: average their gradients by hand
                    dist.all_reduce(p.grad)
                    p.grad /= self.dist.world_size
        global_loss = loss.detach().float()
        if self.dist.world_size > 1:
            import torch.distributed as dist

            global_loss = global_loss.clone()
            dist.all_reduce(global_loss)
            global_loss /= self.dist.world_size
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip or math.inf)
        value, norm_value = torch.stack([global_loss, norm.detach().float().to(global_loss.device)]).tolist()
        self.history.append(value)
        self.step += 1
        if not math.isfinite(value) or (self.scaler is None and not math.isfinite(norm_value)):
            self.nonfinite_count += 1
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()
            what = f"non-finite loss {value}" if not math.isfinite(value) else f"non-finite gradient norm {norm_value}"
            if cfg.nonfinite == "stop":
                raise NonFiniteLossError(f"{what} at step {self.step} (nonfinite='stop')")
            if self.nonfinite_count > cfg.max_nonfinite:
                raise NonFiniteLossError(f"{what} at step {self.step}: {self.nonfinite_count} non-finite steps "
                                         f"skipped, more than max_nonfinite={cfg.max_nonfinite}")
            return value
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step - 1)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self._update_ema()
        return value

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.config.ema_decay
        if self.config.ema_warmup:
            decay = min(decay, self.step / (self.step + 9))  # (1 + k) / (10 + k) for the k-th update (0-based)
        pairs = [(self.ema, self.net)] + ([(self.ema_sde, self.sde)] if self.ema_sde is not self.sde else [])
        for ema, live in pairs:  # the network and, with a learned schedule, the schedule: the same average
            for e, p in zip(ema.parameters(), live.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
            for e, b in zip(ema.buffers(), live.buffers(), strict=True):
                e.copy_(b)

    def fit(self, resume: bool | str | os.PathLike = False, stop_at: int | None = None) -> list[float]:
        """Train up to ``config.steps``; returns the loss history of every step so far (resumed ones included).

        Parameters
        ----------
        resume : bool or path
            ``True``: continue from the newest valid checkpoint in ``out_dir`` (start fresh if there is
            none); a path: continue from that checkpoint.
        stop_at : int, optional
            Stop after this step instead (a run split into sessions; the learning-rate schedule still
            follows ``config.steps``). A checkpoint is written there when ``out_dir`` is set.
        """
        cfg = self.config
        end = cfg.steps if stop_at is None else stop_at
        if isinstance(end, bool) or not isinstance(end, int) or not 0 <= end <= cfg.steps:
            raise ValueError(f"stop_at must be an integer in [0, steps={cfg.steps}], got {stop_at!r}")
        if resume is True:
            if self.out_dir is None:
                raise ValueError("resume=True needs config.out_dir (where the checkpoints are)")
            path = latest_checkpoint(self.out_dir)
            if path is not None:
                self.load_checkpoint(path)
        elif resume:
            self.load_checkpoint(resume)
        if self.is_main and self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.out_dir.glob(".ckpt_*.tmp"):  # left by a process killed mid-write
                stale.unlink(missing_ok=True)
        start_step, train_seconds = self.step, 0.0
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", disable=not (cfg.progress and self.is_main),
                   dynamic_ncols=True)
        try:
            while self.step < end:
                tic = time.perf_counter()
                self.train_step()
                train_seconds += time.perf_counter() - tic
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    recent = [v for v in self.history[-cfg.log_every:] if math.isfinite(v)]
                    mean = sum(recent) / len(recent) if recent else math.nan
                    self.log.append({"step": self.step, "loss": mean if recent else None, "lr": self.lr_at(self.step - 1),
                                     "nonfinite": self.nonfinite_count,
                                     "steps_per_second": (self.step - start_step) / max(train_seconds, 1e-9)})
                    bar.set_postfix(loss=f"{mean:.4g}", refresh=False)
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    self.evaluate()
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.out_dir is not None:
                    self.save_checkpoint()
        finally:
            bar.close()
        if self.step > start_step:
            self.steps_per_second = (self.step - start_step) / max(train_seconds, 1e-9)
        if self.out_dir is not None and self.is_main:
            if not (self.out_dir / checkpoint_name(self.step)).exists():
                self.save_checkpoint()
            self.write_metrics()
        return list(self.history)

    # --- sampling and evaluation ------------------------------------------------------------------------
    def score_fn(self, ema: bool = True, cond: Tensor | None = None, guidance_scale: float = 0.0) -> ScoreModel:
        """A ``score_fn(x, t)`` from the EMA (default) or raw weights, for :func:`sdediff.sample` and
        :func:`sdediff.log_likelihood`; ``cond`` fixes the network's third argument (e.g. class labels,
        one per sample of the batch that will be evaluated). A non-zero ``guidance_scale`` :math:`w` gives
        classifier-free guidance, ``(1 + w) s(x, t, y) - w s(x, t, null)``, both branches in one
        batched call (:class:`sdediff.guidance.ClassifierFreeNet`; needs ``cond`` and a null-class token).
        With a learned schedule the EMA network comes with the EMA schedule (:attr:`ema_sde`), the raw one with
        the raw schedule, and a time input that is a method of the schedule (``sde.noise_level``) follows it."""
        net: nn.Module = self.ema if ema else self.net
        sde, time_input = (self.ema_sde if ema else self.sde), self.time_input
        if sde is not self.sde and getattr(time_input, "__self__", None) is self.sde:
            time_input = getattr(sde, time_input.__name__)
        if guidance_scale != 0:
            if cond is None:
                raise ValueError("guidance_scale needs cond, the class labels to guide towards")
            net = ClassifierFreeNet(net, cond.to(self.device), guidance_scale, self.null_class)
        elif cond is not None:
            net = _Conditioned(net, cond.to(self.device))
        return ScoreModel(net, sde, self.config.prediction, time_input)

    def ema_score_fn(self) -> ScoreModel:
        """Same as ``score_fn(ema=True)``."""
        return self.score_fn(ema=True)

    def evaluate(self) -> dict[str, Any]:
        """Sample from the EMA model and compute the exact NLL (probability-flow ODE) and the NLL bound of
        held-out points; draws from its own generator, so training randomness is unaffected. Rank 0 only
        (other ranks return ``{}``); results are appended to :attr:`evals` and ``metrics.json``."""
        frozen = [p for p in self.sde_params if p.requires_grad]  # no graph to a learned schedule while evaluating
        for p in frozen:
            p.requires_grad_(False)
        try:
            return self._evaluate()
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def _evaluate(self) -> dict[str, Any]:
        if not self.is_main:
            return {}
        cfg = self.config
        g = torch.Generator(self.device).manual_seed(cfg.seed + 1_000_003 + self.step)
        score = self.score_fn(ema=True)
        sde = score.sde  # the EMA schedule of a learned one
        result: dict[str, Any] = {"step": self.step}
        samples = None
        ref = self.eval_data if self.eval_data is not None else self.data
        points = ref[: max(cfg.eval_nll_points, 1)]
        if self.transform is not None:
            points = self.transform(points, g)
        points = points.to(self.param_dtype)
        if cfg.eval_samples:
            with torch.no_grad():
                samples = sample(sde, score, (cfg.eval_samples, *points.shape[1:]), solver=cfg.eval_solver,
                                 steps=cfg.eval_sample_steps, generator=g, device=self.device, dtype=self.param_dtype,
                                 denoise=True)
            result["sample_mean"] = float(samples.mean())
            result["sample_std"] = float(samples.std())
            result["samples_finite"] = bool(torch.isfinite(samples).all())
            if self.out_dir is not None:
                from safetensors.torch import save_file

                cpu = samples.detach().cpu().contiguous()
                atomic_write_file(self.out_dir / f"samples_{self.step:08d}.safetensors",
                                  lambda tmp: save_file({"samples": cpu}, str(tmp)))
        if cfg.eval_nll_points:
            d = flat_dim(points)
            res = log_likelihood(sde, score, points, eps=cfg.t_eps, rtol=1e-4, atol=1e-4,
                                 trace="exact" if d <= 16 else "hutchinson", generator=g)
            nll = float(-res.log_prob.mean())
            with torch.no_grad():
                bound = float(nll_bound(sde, score, points, t_eps=cfg.t_eps, generator=g).mean())
            result.update({"nll": nll, "nll_per_dim": nll / d, "nll_nfe": res.nfe, "nll_bound": bound,
                           "nll_bound_per_dim": bound / d})
        if self.eval_fn is not None:
            result.update(self.eval_fn(self, samples))
        self.evals.append(result)
        if self.out_dir is not None:
            self.write_metrics()
        return result

    def write_metrics(self) -> Path | None:
        """Write ``out_dir/metrics.json`` atomically (rank 0): config, per-step losses, log, evaluations."""
        if self.out_dir is None or not self.is_main:
            return None
        doc = {"config": self.config.to_dict(), "step": self.step, "world_size": self.dist.world_size,
               "nonfinite_count": self.nonfinite_count, "steps_per_second": self.steps_per_second,
               "loss": self.history, "log": self.log, "evals": self.evals}
        text = json.dumps(json_safe(doc), indent=1, allow_nan=False, default=str)
        path = self.out_dir / "metrics.json"
        return atomic_write(path, text)

    # --- checkpoints ------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Everything needed to continue exactly: ``(tensors, metadata)`` as stored in a checkpoint."""
        tensors: dict[str, Tensor] = {}
        for k, v in self.net.state_dict().items():
            tensors[f"model.{k}"] = v
        for k, v in self.ema.state_dict().items():
            tensors[f"ema.{k}"] = v
        if isinstance(self.sde, nn.Module):  # a learned schedule, trained or frozen: a run holds its state
            for k, v in self.sde.state_dict().items():
                tensors[f"sde.{k}"] = v
        if self.ema_sde is not self.sde:
            for k, v in self.ema_sde.state_dict().items():
                tensors[f"ema_sde.{k}"] = v
        opt = self.optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for idx, st in opt["state"].items():
            for key, val in st.items():
                if isinstance(val, Tensor):
                    tensors[f"optim.{idx}.{key}"] = val
                else:
                    scalars.setdefault(str(idx), {})[key] = val
        tensors["rng.generator"] = self.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        tensors["history.loss"] = torch.tensor(self.history, dtype=torch.float64)
        from .. import __version__

        meta = {"step": self.step, "config": self.config.to_dict(), "param_groups": opt["param_groups"],
                "optim_scalars": scalars, "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "nonfinite_count": self.nonfinite_count, "log": self.log, "evals": self.evals,
                "model": {"class": type(self.net).__name__, "config": getattr(self.net, "config", None)},
                "prediction": self.config.prediction, "sde": _describe_sde(self.sde),
                "time_input": _describe_time_input(self.time_input, self.sde), "world_size": self.dist.world_size,
                "device": str(self.device), "torch": torch.__version__, "sdediff": __version__}
        return tensors, meta

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path | None:
        """Write a checkpoint atomically (rank 0; others return ``None``), by default
        ``out_dir/ckpt_{step:08d}.safetensors``, and prune periodic ones beyond ``keep_checkpoints``."""
        if not self.is_main:
            return None
        if path is None:
            if self.out_dir is None:
                raise ValueError("save_checkpoint needs a path or config.out_dir")
            path = self.out_dir / checkpoint_name(self.step)
        tensors, meta = self.state()
        path = save_checkpoint(path, tensors, meta)
        keep = self.config.keep_checkpoints
        if keep and Path(path).parent == self.out_dir:
            for old in list_checkpoints(self.out_dir)[:-keep]:
                old.unlink(missing_ok=True)
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore weights, EMA, optimizer, RNG states, step and history from a checkpoint."""
        tensors, meta = load_checkpoint(path)
        try:
            self.net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
            sde_state = {k[4:]: v for k, v in tensors.items() if k.startswith("sde.")}
            if self.sde_params or sde_state:
                self.sde.load_state_dict(sde_state)
            if self.ema_sde is not self.sde:  # checkpoints from before the schedule had an EMA: start it at the schedule
                ema_sde_state = {k[8:]: v for k, v in tensors.items() if k.startswith("ema_sde.")}
                self.ema_sde.load_state_dict(ema_sde_state or sde_state)
            state: dict[int, dict[str, Any]] = {}
            for key, val in tensors.items():
                if key.startswith("optim."):
                    _, idx, name = key.split(".", 2)
                    state.setdefault(int(idx), {})[name] = val
            for idx, extra in meta["optim_scalars"].items():
                state.setdefault(int(idx), {}).update(extra)
            self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        except (RuntimeError, KeyError, ValueError) as err:
            raise CheckpointError(f"checkpoint {path} does not match this model or optimizer: {err}") from err
        saved = TrainConfig.from_dict(meta["config"]).to_dict()
        changed = sorted(k for k, v in self.config.to_dict().items() if k not in _RESUME_FREE and saved[k] != v)
        if changed:
            warnings.warn(f"resuming {path} with changed config fields {', '.join(changed)}: the continuation will "
                          "not match the original run", RuntimeWarning, stacklevel=2)
        try:
            self.generator.set_state(tensors["rng.generator"])
            torch.set_rng_state(tensors["rng.torch"])
            if self.device.type == "cuda" and "rng.cuda" in tensors:
                torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        except (RuntimeError, KeyError) as err:
            warnings.warn(f"could not restore the RNG state of {path} ({err}); reseeding from seed + step",
                          RuntimeWarning, stacklevel=2)
            self.generator.manual_seed(self.config.seed + meta["step"])
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.step = int(meta["step"])
        self.history = tensors["history.loss"].tolist()
        self.nonfinite_count = int(meta["nonfinite_count"])
        self.log, self.evals = list(meta["log"]), list(meta["evals"])

    def close(self) -> None:
        """Leave the process group if this trainer created it.

        The DDP wrapper (whose reducer holds gloo work objects) is dropped first, then all ranks meet at a
        barrier and the group is destroyed: a rank that tears gloo down while its peer is still writing files,
        or with work objects alive, can abort at interpreter exit.
        """
        if self.dist.created:
            self._train_net = self.net
        self.dist.close()
