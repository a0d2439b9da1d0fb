"""The sampling entry point :func:`sample`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ._utils import all_finite
from ._validate import check_bool, check_device, check_dtype, check_float, check_int, check_ints
from .processes import ScoreFn
from .sdes.base import SDE
from .solvers.base import Callback, Solver, get_solver
from .solvers.grids import GridFn, make_grid


@dataclass
class SampleResult:
    """What :func:`sample` returns with ``return_info=True``.

    Attributes
    ----------
    samples : Tensor
        The samples at ``t = eps`` (or the denoised ``x_0`` estimate with ``denoise=True``).
    nfe : int
        Score evaluations used (the final denoising step included).
    times : Tensor
        The time grid, decreasing from ``T`` to ``eps``.
    trajectory : Tensor or None
        With ``keep_trajectory=True``, the states at every time of ``times``, shape
        ``(len(times), *samples.shape)``.
    stats : dict
        Solver-specific figures, e.g. ``"nfe_per_sample"`` (a ``(batch,)`` tensor) from solvers with
        per-sample adaptive steps.
    """

    samples: Tensor
    nfe: int
    times: Tensor
    trajectory: Tensor | None = None
    stats: dict[str, Any] = field(default_factory=dict)


def check_eps(eps: float, sde: SDE) -> float:
    """Validate the final time ``eps`` in ``(0, T)``."""
    return check_float("eps", eps, 0.0, sde.T, low_open=True, high_open=True)


def _check_x_init(x_init: Tensor, shape: tuple[int, ...]) -> Tensor:
    if not isinstance(x_init, Tensor):
        raise TypeError(f"x_init must be a tensor, got {type(x_init).__name__}")
    if tuple(x_init.shape) != shape:
        raise ValueError(f"x_init has shape {tuple(x_init.shape)}, expected shape {shape}")
    if not x_init.is_floating_point():
        raise TypeError(f"x_init must be a real floating-point tensor, got {x_init.dtype}")
    if not all_finite(x_init):
        raise ValueError("x_init holds NaN or infinite values; every solver needs a finite starting state")
    return x_init


@torch.no_grad()
def sample(sde: SDE, score_fn: ScoreFn, shape: Sequence[int], solver: str | Solver = "euler_maruyama",
           steps: int = 1000, eps: float = 1e-3, x_init: Tensor | None = None,
           generator: torch.Generator | None = None, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None, *, time_grid: str | GridFn | Sequence[float] | Tensor = "uniform",
           denoise: bool = False, progress: bool = False, callback: Callback | None = None,
           return_info: bool = False, keep_trajectory: bool = False, batch_size: int | None = None,
           **solver_options: Any) -> Tensor | SampleResult:
    r"""Draw samples by running a reverse-time solver from ``t = T`` down to ``t = eps``.

    Sampling runs without autograd (``torch.no_grad()``), like the samplers of k-diffusion and diffusers:
    no graph is kept across steps, and the solvers write their states into reused buffers. A score
    function that needs gradients itself (an energy model, the guided scores of :mod:`sdediff.guidance`)
    takes them under ``torch.enable_grad()``.

    Parameters
    ----------
    sde : SDE
        The forward SDE.
    score_fn : callable
        ``score_fn(x, t) -> tensor like x`` with ``t`` a ``(batch,)`` tensor; an approximation of
        :math:`\nabla_x \log p_t(x)` (wrap ε-, x₀- or v-prediction networks with
        :class:`sdediff.score.ScoreModel`).
    shape : tuple of int
        ``(batch, ...)``, any number of trailing dimensions.
    solver : str or Solver
        A registered name (see :func:`sdediff.available_solvers`): ``"euler_maruyama"``,
        ``"reverse_diffusion"``, ``"ancestral"``, ``"pc"``, ``"langevin"``, ``"euler"``, ``"heun"``,
        ``"ode"``, ... or a solver instance.
    steps : int
        Number of time steps on the grid (ignored by adaptive ``"ode"`` except for trajectories).
    eps : float
        Final time, in ``(0, T)``; the samples follow :math:`p_{eps}`.
    x_init : Tensor, optional
        Starting state at ``T``, replacing the prior draw.
    generator : torch.Generator, optional
        Source of every random number drawn (prior and solver noise).
    device, dtype : optional
        Where and in what precision to sample (default: ``x_init``'s, else the generator's device and
        the default dtype).
    time_grid : str, callable or sequence
        ``"uniform"`` (default), ``"quadratic"``, ``"log_snr"``, ``"karras"``, a callable
        ``(sde, steps, eps) -> times`` or explicit decreasing times from ``T`` to ``eps``.
    denoise : bool
        Finish with one noise-free denoising step to ``t = 0`` (Tweedie's
        :math:`\hat x_0 = (x + s^2 s_\theta)/m` for linear SDEs); costs one score evaluation.
    progress : bool
        Show a tqdm progress bar (over the steps; over the chunks with ``batch_size``).
    callback : callable, optional
        ``callback(i, t, x)`` after each step ``i`` with the new time and state (for plots).
    return_info : bool
        Return a :class:`SampleResult` (samples, NFE, time grid, trajectory) instead of a tensor.
    keep_trajectory : bool
        Store the state at every grid time in ``SampleResult.trajectory`` (implies ``return_info``).
    batch_size : int, optional
        Run the solver on chunks of at most this many samples, one after the other, each written into
        one output tensor allocated once: the peak memory is the output plus one chunk's working memory
        (the output itself is still ``shape``). The chunks draw from ``generator`` in turn, so results
        depend on ``batch_size``; ``callback`` is called for every chunk, and ``progress`` shows a bar over
        the chunks.
    **solver_options
        Passed to the solver (e.g. ``snr=``, ``corrector_steps=`` for ``"pc"``; ``rtol=``, ``atol=``,
        ``method=`` for ``"ode"``; ``noise_scale=`` for ``"euler_maruyama"``).

    Returns
    -------
    Tensor of ``shape`` (or :class:`SampleResult`).
    """
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdediff.SDE, got {type(sde).__name__}")
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable (x, t) -> tensor like x, got {type(score_fn).__name__}")
    check_int("steps", steps)
    eps = check_eps(eps, sde)
    the_solver = get_solver(solver, **solver_options)
    shape = check_ints("shape", shape)
    n = shape[0]
    check_int("batch_size", batch_size, optional=True)
    for name, flag in (("denoise", denoise), ("progress", progress), ("return_info", return_info),
                       ("keep_trajectory", keep_trajectory)):
        check_bool(name, flag)
    dtype = check_dtype("dtype", dtype)
    device = check_device("device", device)
    chunk = min(batch_size or n, n)
    if chunk < n and keep_trajectory:
        raise ValueError("keep_trajectory needs the whole batch at once; drop batch_size or sample fewer points")
    if x_init is not None:
        x_init = _check_x_init(x_init, shape)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable (i, t, x) or None, got {type(callback).__name__}")
    process = sde.reverse(score_fn, the_solver.noise_scale, generator=generator)  # counts every evaluation
    out, stats, trajectory, ts = None, {}, None, None
    starts = range(0, n, chunk)
    for start in tqdm(starts, desc="chunks", leave=False) if progress and chunk < n else starts:
        size = min(chunk, n - start)
        if x_init is None:
            x = sde.prior_sample((size, *shape[1:]), generator=generator, dtype=dtype or torch.get_default_dtype(),
                                 device=device if device is not None or generator is None else generator.device)
        else:
            x = x_init[start:start + size]
            x = x.to(device=device or x.device, dtype=dtype or x.dtype)
        if ts is None:
            ts = make_grid(sde, steps, eps, time_grid, device=x.device, dtype=x.dtype)
        solution = the_solver.solve(process, x, ts, callback=callback, progress=progress and chunk == n,
                                    keep_trajectory=keep_trajectory)
        x, trajectory = solution.x, solution.trajectory
        for key, value in solution.stats.items():
            stats.setdefault(key, []).append(value)
        del solution
        if denoise:
            x = sde.denoise(x, ts[-1], process.score(x, ts[-1]))
        if chunk == n:
            out = x
        else:  # the chunks go into one output, allocated once: peak memory is the output and one chunk's work
            if out is None:
                out = torch.empty((n, *x.shape[1:]), dtype=x.dtype, device=x.device)
            out[start:start + size].copy_(x)
            del x
    if return_info or keep_trajectory:
        stats = {k: (torch.cat(v) if isinstance(v[0], Tensor) else v if len(v) > 1 else v[0]) for k, v in stats.items()}
        return SampleResult(samples=out, nfe=process.nfe, times=ts, trajectory=trajectory, stats=stats)
    return out
