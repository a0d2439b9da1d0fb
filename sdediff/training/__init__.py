"""Training: the denoising score-matching loss, small networks, checkpoints and a trainer (DDP-ready)."""

from ..elbo import nll_bound
from .checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
    load_state_dict_file,
    load_weights,
    save_checkpoint,
)
from .config import TrainConfig
from .losses import dsm_loss, sample_time
from .models import MLP, FourierEmbedding, SinusoidalEmbedding, UNet
from .ssm import ssm_loss
from .trainer import NonFiniteLossError, Trainer, seed_everything

__all__ = [
    "dsm_loss", "nll_bound", "sample_time", "MLP", "UNet", "SinusoidalEmbedding", "FourierEmbedding", "Trainer",
    "TrainConfig", "NonFiniteLossError", "seed_everything", "CheckpointError", "save_checkpoint", "load_checkpoint",
    "latest_checkpoint", "list_checkpoints", "load_model", "load_weights", "load_state_dict_file",
    "ssm_loss",
]
