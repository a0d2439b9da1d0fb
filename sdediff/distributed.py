r"""Sharded evaluation under ``torchrun``: the same numbers on one process or on many.

Work over :math:`n` items (samples to draw, data points to score) is cut into fixed-size chunks
:math:`[kc, \min((k+1)c, n))`, :math:`k = 0, \dots, K-1` with :math:`K = \lceil n/c \rceil`. Chunk :math:`k`
draws its random numbers from its own generator seeded with :func:`~sdediff.distributed.chunk_seed`
``(seed, k)``, and is computed by rank :math:`k \bmod W` of the :math:`W` processes; rank 0 gathers the
chunks and puts them back in the order of :math:`k`. Neither the chunks nor their random streams depend on
:math:`W`, so a run under ``torchrun --nproc_per_node=W`` returns exactly (bit for bit, on the same
hardware) what one process returns. The process group is the one :func:`setup_distributed` joins for the
trainer too (``torchrun``'s ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; NCCL on CUDA, gloo on the CPU)::

    with DistributedEval(device="cpu") as group:
        chunks = chunk_slices(n, 1000)
        parts = group.map(lambda k: work(x[chunks[k]], chunk_generator(seed, k)), len(chunks))
        if group.is_main:
            result = torch.cat(parts)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._validate import check_int

__all__ = ["DistributedContext", "DistributedEval", "DistributedError", "chunk_slices", "chunk_seed", "chunk_generator",
           "local_device", "process_rank", "setup_distributed", "world_size"]

T = TypeVar("T")


class DistributedError(RuntimeError):
    """A rank failed while computing its chunks (raised on every rank, so none waits forever)."""


def chunk_slices(n: int, chunk_size: int) -> list[slice]:
    r"""The fixed-size chunks :math:`[kc, \min((k+1)c, n))` of ``n`` items, :math:`k = 0, \dots, \lceil n/c \rceil - 1`.

    Parameters
    ----------
    n : int
        Number of items (>= 0).
    chunk_size : int
        Items per chunk ``c`` (>= 1); the last chunk may be shorter.

    Returns
    -------
    list of slice
    """
    check_int("n", n, 0)
    check_int("chunk_size", chunk_size, 1)
    return [slice(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]


def chunk_seed(seed: int, index: int) -> int:
    """The seed of chunk ``index`` of a run seeded with ``seed``: the first 63 bits of BLAKE2b(``"seed:index"``).

    Hashing keeps the streams of neighbouring chunks (and of neighbouring seeds) unrelated, unlike
    ``seed + index``, and the value depends only on ``(seed, index)``, never on the number of processes.

    Parameters
    ----------
    seed, index : int
        The run's seed and the chunk's index (both >= 0).

    Returns
    -------
    int
        A seed in ``[0, 2**63)`` for :meth:`torch.Generator.manual_seed`.
    """
    check_int("seed", seed, 0)
    check_int("index", index, 0)
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def chunk_generator(seed: int, index: int, device: torch.device | str | None = None) -> torch.Generator:
    """A :class:`torch.Generator` on ``device`` (default CPU) seeded with :func:`chunk_seed` ``(seed, index)``."""
    return torch.Generator(device=device if device is not None else "cpu").manual_seed(chunk_seed(seed, index))


def process_rank() -> int:
    """This process's rank as ``torchrun`` sets it (``RANK``; 0 outside ``torchrun``), known before any group exists."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of processes ``torchrun`` started (``WORLD_SIZE``; 1 outside ``torchrun``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_device(device: torch.device | str) -> torch.device:
    """``device``, with an index-less ``cuda`` made ``cuda:LOCAL_RANK`` under ``torchrun`` (one GPU per process)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


@dataclass
class DistributedContext:
    """This process's place in a ``torchrun`` job (one process of rank 0 outside ``torchrun``).

    Attributes
    ----------
    world_size, rank, local_rank : int
        The number of processes, this one's rank and its rank on its machine (its GPU index).
    created : bool
        Whether :func:`setup_distributed` created the process group (so :meth:`close` destroys it).
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    created: bool = False

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0."""
        return self.rank == 0

    def device(self, preference: str | None) -> torch.device:
        """The device of this process: ``preference`` (an index-less ``cuda`` becomes ``cuda:local_rank`` in a job of
        several processes); without one, ``cuda:local_rank`` when CUDA is available, else the CPU."""
        if preference is not None:
            device = torch.device(preference)
            if device.type == "cuda" and device.index is None and self.world_size > 1:
                device = torch.device("cuda", self.local_rank)
            return device
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """``module`` in :class:`~torch.nn.parallel.DistributedDataParallel` in a job of several processes (its
        gradients are then averaged over the ranks during ``backward``); ``module`` itself otherwise."""
        if self.world_size <= 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

    def all_reduce_mean_(self, tensor: Tensor) -> Tensor:
        r"""Replace ``tensor`` in place by its mean over the ranks, :math:`\frac1W \sum_r x_r`, and return it
        (nothing to do in a single process)."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor)
            tensor /= self.world_size
        return tensor

    def close(self) -> None:
        """Leave the process group if :func:`setup_distributed` created it; all ranks meet at a barrier first,
        so no rank tears gloo down while a peer is still working (which can abort at interpreter exit)."""
        if self.created:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()
            self.created = False


def setup_distributed(device_preference: str | None = None) -> DistributedContext:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), if any.

    A group that already exists is used as is; otherwise one is created, with NCCL (after selecting the GPU
    ``LOCAL_RANK``) when CUDA is available and ``device_preference`` is ``None`` or a CUDA device, gloo otherwise.

    Parameters
    ----------
    device_preference : str, optional
        The device the caller will compute on (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).

    Returns
    -------
    DistributedContext
        World size 1 and rank 0 outside ``torchrun`` (``WORLD_SIZE`` unset or 1), with nothing initialised.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedContext()
    import torch.distributed as dist

    if "RANK" not in os.environ:
        raise RuntimeError(f"WORLD_SIZE={world} is set but RANK is not; launch with torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    created = False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and (device_preference is None or device_preference.startswith("cuda"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        created = True
    return DistributedContext(dist.get_world_size(), dist.get_rank(), local_rank, created)


class DistributedEval:
    """The process group of a ``torchrun`` job, used to share chunks of evaluation work out and gather them.

    Outside ``torchrun`` (``WORLD_SIZE`` unset or 1) this is a single process of rank 0 and nothing is
    initialised. A group it creates is left again by :meth:`close` (also on leaving a ``with`` block):
    every rank meets at a barrier, so none tears the group down while a peer still uses it. A group that
    already exists is used and left alone; since torch cannot create the default group a second time in
    a ``torchrun`` process, a program that evaluates several times should create the group once itself
    (:func:`torch.distributed.init_process_group`) and destroy it at the end.

    Parameters
    ----------
    device : str or torch.device, optional
        The evaluation device; a CUDA device (or ``None`` with CUDA available) selects NCCL and the
        GPU ``LOCAL_RANK``, anything else gloo.

    Attributes
    ----------
    rank, world_size : int
        This process's rank and the number of processes.
    is_main : bool
        Whether this is rank 0, the one that receives the gathered results and writes files.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self._dist = setup_distributed(None if device is None else str(device))
        self.rank, self.world_size = self._dist.rank, self._dist.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def map(self, fn: Callable[[int], T], num_chunks: int, progress: bool = False) -> list[T] | None:
        """Compute ``fn(k)`` for ``k = 0 .. num_chunks - 1``: rank ``r`` takes ``k = r, r + W, r + 2W, ...``.

        Parameters
        ----------
        fn : callable
            ``fn(k) -> result`` for chunk ``k``; results travel to rank 0 pickled, so return CPU tensors.
        num_chunks : int
            Number of chunks ``K``.
        progress : bool
            Show a progress bar over the chunks of rank 0.

        Returns
        -------
        list or None
            On rank 0, ``[fn(0), ..., fn(K - 1)]`` in chunk order; ``None`` on the other ranks.

        Raises
        ------
        DistributedError
            On every rank, when ``fn`` raised on some rank (with that rank's message).
        """
        check_int("num_chunks", num_chunks, 0)
        mine = range(self.rank, num_chunks, self.world_size)
        chunks = tqdm(mine, desc="chunks", leave=False, disable=not (progress and self.is_main and len(mine) > 1))
        if self.world_size == 1:
            return [fn(k) for k in chunks]
        import torch.distributed as dist

        results: dict[int, Any] = {}
        error = None
        try:
            for k in chunks:
                results[k] = fn(k)
        except Exception as err:  # reported to every rank below instead of leaving the others waiting
            error, results = f"rank {self.rank}: {type(err).__name__}: {err}", {}
        gathered: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object((error, results), gathered, dst=0)
        status = [next((e for e, _ in gathered if e is not None), None) if gathered is not None else None]
        dist.broadcast_object_list(status, src=0)
        if status[0] is not None:
            raise DistributedError(f"evaluation failed on {status[0]}")
        if gathered is None:
            return None
        merged = {k: v for _, part in gathered for k, v in part.items()}
        return [merged[k] for k in range(num_chunks)]

    def close(self) -> None:
        """Leave the process group if this object created it (all ranks meet at a barrier first)."""
        self._dist.close()

    def __enter__(self) -> DistributedEval:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
