r""":func:`sharded_log_likelihood`: :func:`~sdediff.likelihood.log_likelihood` with its chunks of points shared out among
the processes of a ``torchrun`` job (:class:`~sdediff.distributed.DistributedEval`).

Chunk :math:`k` (``batch_size`` points) is integrated by rank :math:`k \bmod W` with its own generator
(:func:`~sdediff.distributed.chunk_generator` ``(seed, k)``), so the result is the same on any number of processes,
and rank 0 gathers the chunks. Every point has its own steps and no process waits on another while integrating: the
ranks meet once, to gather, however different their numbers of steps (a
:class:`~torch.nn.parallel.DistributedDataParallel` model is evaluated through its ``.module``, whose forward passes
make no collective calls).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._validate import check_int
from ..distributed import DistributedEval, chunk_generator, chunk_slices
from ..processes import ScoreFn
from ..sdes.base import SDE
from .engine import LikelihoodResult, cat_results, log_likelihood

__all__ = ["sharded_log_likelihood"]


def sharded_log_likelihood(sde: SDE, score_fn: ScoreFn, x: Tensor, *, batch_size: int, seed: int = 0,
                           device: torch.device | str | None = None, progress: bool = False,
                           **options: Any) -> LikelihoodResult | None:
    """:func:`~sdediff.likelihood.log_likelihood` of ``x`` in chunks of ``batch_size`` points shared among the
    ``torchrun`` processes (one process outside ``torchrun``).

    Parameters
    ----------
    sde, score_fn, x
        As for :func:`~sdediff.likelihood.log_likelihood` (every rank passes the same ``x``; each integrates its own
        chunks, on ``x``'s device).
    batch_size : int
        Points per chunk.
    seed : int
        Seeds the chunks' generators (the Hutchinson probes).
    device : str or torch.device, optional
        The evaluation device, which selects the process group's backend (NCCL for CUDA, gloo otherwise).
    progress : bool
        A progress bar over rank 0's chunks.
    **options
        Passed to :func:`~sdediff.likelihood.log_likelihood` (``eps``, ``tol``, ``trace``, ``num_probes``, ...; not
        ``generator`` or ``batch_size``).

    Returns
    -------
    LikelihoodResult or None
        On rank 0 the result of every point, in order, on the CPU; ``None`` on the other ranks.

    Raises
    ------
    DistributedError
        On every rank, when a chunk failed on some rank.
    """
    check_int("batch_size", batch_size)
    check_int("seed", seed, 0)
    for name in ("generator", "batch_size"):
        if name in options:
            raise TypeError(f"sharded_log_likelihood sets {name} itself (chunk generators from seed)")
    chunks = chunk_slices(x.shape[0], batch_size)
    gen_device = x.device if device is None else torch.device(device)

    def chunk(k: int) -> LikelihoodResult:
        res = log_likelihood(sde, score_fn, x[chunks[k]], generator=chunk_generator(seed, k, gen_device), **options)
        return res.to("cpu")

    with DistributedEval(device if device is not None else x.device) as group:
        parts = group.map(chunk, len(chunks), progress=progress)
    if parts is None:
        return None
    if not parts:
        return log_likelihood(sde, score_fn, x.cpu()[:0], **options)
    return cat_results(parts)
