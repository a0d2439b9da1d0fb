r"""A compact trainer for score networks: DSM loss, AdamW, EMA, checkpoints, exact resume and DDP.

One optimisation step:

1. draw a *global* batch from one seeded :class:`torch.Generator`: data indices (uniform, with
   replacement), the optional ``transform`` (e.g. dequantisation), label dropout, times ``t`` (and
   importance weights) and noise ``ε``;
2. under ``torchrun`` each of the ``W`` ranks takes its slice ``[r B/W, (r+1) B/W)`` of those draws, so
   the averaged DDP gradient is the single-process gradient of the same global batch;
3. the loss of ``config.loss`` (:func:`~sdediff.training.objective.training_loss`), backward, global mean
   loss (all-reduced), gradient-norm clipping, a learning rate from the step (linear warmup, then constant or
   cosine, :meth:`TrainConfig.lr_at <sdediff.training.config.TrainConfig.lr_at>`), AdamW, and the EMA
   :math:`\bar\theta \leftarrow d\,\bar\theta + (1-d)\,\theta` with
   :math:`d = \min(d_{max}, (1+k)/(10+k))` during the EMA warm-up.

A non-finite loss or gradient norm either skips the update (counted; ``max_nonfinite`` skips at most)
or stops with :class:`NonFiniteLossError`. Everything that decides the next step — weights, EMA,
AdamW moments, the generator state, the global torch RNG states, the step and the loss history — goes
into the checkpoint (safetensors, written atomically; see :mod:`sdediff.training.checkpoint`), so a
resumed run repeats the uninterrupted run's losses bit for bit on the same hardware.

The pieces live apart: the hyper-parameters in :mod:`sdediff.training.config`, the loss of each step in
:mod:`sdediff.training.objective`, the periodic evaluation in :mod:`sdediff.training.evaluation` and the process
group in :mod:`sdediff.distributed`.
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
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._io import atomic_write, json_safe, remove_stale_temporaries
from .._utils import randn
from .._validate import check_int
from ..distributed import setup_distributed
from ..guidance import ClassifierFreeNet
from ..score import ScoreModel
from ..sdes.linear import require_linear
from .checkpoint import (
    CheckpointError,
    checkpoint_name,
    join_optimizer_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    split_optimizer_state,
    with_prefix,
    without_prefix,
)
from .config import TrainConfig
from .evaluation import evaluate_model, requires_grad_off
from .losses import sample_time
from .objective import TrainingBatch, training_loss

Transform = Callable[[Tensor, torch.Generator], Tensor]


class NonFiniteLossError(FloatingPointError):
    """Training produced a non-finite loss or gradient (``nonfinite="stop"``, or too many skips)."""


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and every CUDA device) — call before building a model."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass
    torch.manual_seed(seed)


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

        self.dist = setup_distributed(cfg.device)
        if cfg.batch_size % self.dist.world_size:
            raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the world size {self.dist.world_size}")
        self.device = device = self.dist.device(cfg.device)
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
        self._train_net = self.dist.wrap(self.net, device)  # DDP under torchrun
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
        return self.dist.is_main

    def lr_at(self, step: int) -> float:
        """Learning rate used by the update at ``step`` (0-based): :meth:`TrainConfig.lr_at`."""
        return self.config.lr_at(step)

    # --- training ---------------------------------------------------------------------------------------
    def _draw_batch(self) -> TrainingBatch:
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
        return TrainingBatch(x0[sl], t[sl], w[sl], noise[sl], None if cond is None else cond[sl])

    def _loss(self, x0: Tensor, t: Tensor, w: Tensor, noise: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The training loss of ``config.loss`` and, for a learned schedule, its variance term
        (:func:`~sdediff.training.objective.training_loss`)."""
        return training_loss(self.config, self.sde, self._train_net, TrainingBatch(x0, t, w, noise, cond),
                             time_input=self.time_input, generator=self.generator, trains_schedule=bool(self.sde_params))

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
            for p in self.sde_params:  # not in DDP: average their gradients over the ranks here
                self.dist.all_reduce_mean_(p.grad)
        global_loss = loss.detach().float()
        if self.dist.world_size > 1:
            global_loss = self.dist.all_reduce_mean_(global_loss.clone())
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
        check_int("stop_at", end, 0, cfg.steps)
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
            remove_stale_temporaries(self.out_dir)  # our temporary files left by a process killed mid-write
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
        held-out points (:func:`~sdediff.training.evaluation.evaluate_model`); draws from its own generator, so
        training randomness is unaffected. Rank 0 only (other ranks return ``{}``); results are appended to
        :attr:`evals` and ``metrics.json``."""
        if not self.is_main:
            return {}
        cfg = self.config
        with requires_grad_off(self.sde_params):  # no graph to a learned schedule while evaluating
            g = torch.Generator(self.device).manual_seed(cfg.seed + 1_000_003 + self.step)
            samples_path = None if self.out_dir is None else self.out_dir / f"samples_{self.step:08d}.safetensors"
            reference = self.data if self.eval_data is None else self.eval_data
            metrics, samples = evaluate_model(self.score_fn(ema=True), reference, cfg, g, device=self.device,
                                              dtype=self.param_dtype, transform=self.transform, samples_path=samples_path)
            result: dict[str, Any] = {"step": self.step, **metrics}
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
        tensors = {**with_prefix("model", self.net.state_dict()), **with_prefix("ema", self.ema.state_dict())}
        if isinstance(self.sde, nn.Module):  # a learned schedule, trained or frozen: a run holds its state
            tensors.update(with_prefix("sde", self.sde.state_dict()))
        if self.ema_sde is not self.sde:
            tensors.update(with_prefix("ema_sde", self.ema_sde.state_dict()))
        opt = self.optimizer.state_dict()
        optim_tensors, scalars = split_optimizer_state(opt["state"])
        tensors.update(optim_tensors)
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
            self.net.load_state_dict(without_prefix("model", tensors))
            self.ema.load_state_dict(without_prefix("ema", tensors))
            sde_state = without_prefix("sde", tensors)
            if self.sde_params or sde_state:
                self.sde.load_state_dict(sde_state)
            if self.ema_sde is not self.sde:  # checkpoints from before the schedule had an EMA: start it at the schedule
                self.ema_sde.load_state_dict(without_prefix("ema_sde", tensors) or sde_state)
            state = join_optimizer_state(tensors, meta["optim_scalars"])
            self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        except (RuntimeError, KeyError, ValueError) as err:
            raise CheckpointError(f"checkpoint {path} does not match this model or optimizer: {err}") from err
        changed = self.config.resume_conflicts(TrainConfig.from_dict(meta["config"]))
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
