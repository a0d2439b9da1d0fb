"""Solver overhead: how much time a sampler spends outside the network.

A network that costs a few ms per call on CPU (a 4-layer MLP with a time embedding on 3x32x32 inputs,
batch 64) drives every sdediff solver, torchdiffeq's ``odeint``, torchode's per-sample adaptive solvers,
k-diffusion's samplers and diffusers' scheduler loops, all in one run, at about the same NFE (20 by default). For each we report

    ratio = time of the whole sample / (NFE x time of one network call)

(1.00 = no overhead), both for wall time and, on CPU, for the thread's CPU time (with one torch thread
all the work runs on it, and other processes on a shared machine do not inflate it). Every timed run
is paired with network calls timed just before it, so that a change in machine load shifts both
alike. On CPU, where a call returns when its work is done, every network call inside the run is also
timed where it happens, and

    ratio (in situ) = time of the whole sample / time spent inside the network during it

is the share of time outside the network, free of the network running slower inside a loop than
alone (caches, and the allocator handing back memory that then faults in again); it is the overhead
figure the tables lead with. Each fixed-step update that has a short hand-written form (Euler, Heun, Euler-Maruyama,
reverse diffusion, ancestral, PC, Langevin) is also timed as a minimal loop with coefficients
precomputed, which is the floor for that update: for SDE solvers drawing the noise is part of it.
``samples/s`` is batch / wall time.

On CUDA the script also counts host synchronisations (``torch.cuda.set_sync_debug_mode``) of every
fixed-step solver at N and 2N steps; a count that grows with the steps means a sync inside the loop.

    python benchmarks/overhead.py            # full run (about a minute or two on CPU)
    python benchmarks/overhead.py --quick    # smaller repeats
    python benchmarks/overhead.py --device cuda --batch 1024
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common  # a sibling script (benchmarks/README.md)
import numpy as np
import peers
import torch
import torchdiffeq
from loops import LOOPS
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

import sdediff
from sdediff._io import atomic_write
from sdediff.solvers.grids import make_grid

EPS = 1e-3
#: the in-situ ratio whose time outside the network the pass-cost fit turns into a number of state operations
BUDGET_RATIO = 1.05
TORCHDIFFEQ = {"euler": 1, "rk4": 4, "dopri5": None}


class MLP(nn.Module):
    """A 4-layer MLP score network on images: flatten, concatenate a sinusoidal time embedding, 3 hidden
    layers of width ``hidden`` with SiLU, project back. Small output weights keep trajectories tame."""

    def __init__(self, shape: tuple[int, ...] = (3, 32, 32), hidden: int = 256, temb: int = 32) -> None:
        super().__init__()
        dim = math.prod(shape)
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(1000.0), temb // 2)))
        self.net = nn.Sequential(nn.Linear(dim + temb, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        with torch.no_grad():
            self.net[-1].weight.mul_(0.1)
        self.requires_grad_(False)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        e = t[:, None].to(x.dtype) * self.freqs
        h = torch.cat([x.flatten(1), e.sin(), e.cos()], dim=1)
        return self.net(h).reshape(x.shape)


# --------------------------------------------------------------------------------------------------
class Timed(common.Counted):
    """Count the calls of ``fn`` and add up the wall and thread-CPU time spent inside them (``wall``, ``cpu``,
    seconds). Only meaningful where a call returns when its work is done (CPU), as no device sync is made."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__(fn)
        self.wall = self.cpu = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        w0, c0 = time.perf_counter(), time.thread_time()
        out = super().__call__(*args, **kwargs)
        self.wall += time.perf_counter() - w0
        self.cpu += time.thread_time() - c0
        return out


def count_syncs(fn: Callable[[], Any]) -> int:
    """Host synchronisations made by ``fn`` on CUDA (``torch.cuda.set_sync_debug_mode('warn')``)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _tensors(tree: Any) -> list[Tensor]:
    """The tensors in nested lists, tuples and dicts."""
    if isinstance(tree, Tensor):
        return [tree]
    items = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else ()
    return [t for item in items for t in _tensors(item)]


class StateOps(TorchFunctionMode):
    """Count the torch calls that pass over a state-sized tensor: every call with an input or output of at least half
    the state's elements that computes a tensor or writes in place (a pass over memory of about the state's size).
    Views (an output sharing an input's storage), allocations, attribute reads and small coefficient arithmetic are
    not counted. Run under it with a free network, the count per NFE is the solver's own number of passes over the
    state. (Calls are counted as the solver makes them, at the level of ``torch`` functions and tensor methods.)"""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        inputs, outputs = _tensors((args, kwargs)), _tensors(out)
        if not any(2 * t.numel() >= self.numel for t in inputs + outputs) or name.startswith(("empty", "new_empty")):
            return out
        writes = (name.endswith("_") and not name.endswith("__")) or name == "__setitem__" or "out" in kwargs
        shared = {t.untyped_storage().data_ptr() for t in _tensors((args, {k: v for k, v in kwargs.items() if k != "out"}))}
        view = bool(outputs) and all(t.untyped_storage().data_ptr() in shared for t in outputs)
        if writes or (outputs and not view):
            self.count += 1
        return out


class Bench:
    """Shared state of one overhead run: the network, the start state, timing settings."""

    def __init__(self, device: torch.device, batch: int = 64, shape: tuple[int, ...] = (3, 32, 32),
                 hidden: int = 256, repeats: int = 7, call_repeats: int = 30, seed: int = 0) -> None:
        self.device, self.repeats, self.call_repeats = device, repeats, call_repeats
        torch.manual_seed(seed)
        self.net = MLP(shape, hidden).to(device)
        self.sde = sdediff.VPSDE()
        gen = torch.Generator(device).manual_seed(seed)
        self.x_T = self.sde.prior_sample((batch, *shape), generator=gen, device=device, dtype=torch.float32)
        self.t_probe = torch.full((batch,), 0.5, device=device)
        self.seed = seed
        self.last: Timed | None = None  # the timed network of the latest run

    def counted(self, fn: Callable[..., Any] | None = None) -> Timed:
        """The network (or ``fn``) wrapped to count and time its calls; kept as :attr:`last`."""
        self.last = Timed(self.net if fn is None else fn)
        return self.last

    def generator(self) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(self.seed + 1)

    def t_call(self, repeats: int | None = None) -> tuple[float, float]:
        """Median ``(wall, cpu)`` seconds of one network call over ``repeats`` calls."""
        with torch.inference_mode():
            self.net(self.x_T, self.t_probe)
            times = [common.timed(lambda: self.net(self.x_T, self.t_probe), self.device)
                     for _ in range(repeats or self.call_repeats)]
        return common.median([w for w, _ in times]), common.median([c for _, c in times])

    def measure(self, run: Callable[[], int]) -> dict[str, float]:
        """``run()`` does one whole sample and returns the NFE it used.

        Each of the ``repeats`` timed runs is paired with the median of ``call_repeats`` network calls timed
        just before it, so that a change in machine load shifts both alike; the ratio reported is the
        median over the pairs, for wall time and for CPU time (see :func:`common.timed`). On CPU the
        in-situ ratio divides each run's time by the time its own network calls took inside it.
        """
        with torch.inference_mode():
            nfe = run()  # warm-up, and the NFE
            pairs = []  # (run wall, run CPU, call wall, call CPU, in-run network wall, in-run network CPU)
            for _ in range(self.repeats):
                call_wall, call_cpu = self.t_call()
                wall, cpu = common.timed(run, self.device)
                pairs.append((wall, cpu, call_wall, call_cpu, self.last.wall, self.last.cpu))
        med = common.median
        wall = med([p[0] for p in pairs])
        out = {"nfe": nfe, "t_call_ms": 1e3 * med([p[2] for p in pairs]), "t_call_cpu_ms": 1e3 * med([p[3] for p in pairs]),
               "wall_ms": 1e3 * wall, "cpu_ms": 1e3 * med([p[1] for p in pairs]),
               "ratio_wall": med([p[0] / (nfe * p[2]) for p in pairs]),
               "ratio_cpu": med([p[1] / (nfe * p[3]) for p in pairs]),
               "samples_per_s": self.x_T.shape[0] / wall,
               "outside_us_per_nfe_cpu": 1e6 * med([(p[1] - nfe * p[3]) / nfe for p in pairs]),
               "outside_us_per_nfe_wall": 1e6 * med([(p[0] - nfe * p[2]) / nfe for p in pairs])}
        # the headline overhead figure: on a CPU device the in-situ ratio in CPU time (robust to other processes),
        # else the per-call ratio in wall time
        cpu = self.device.type == "cpu"
        if cpu:
            out.update(net_cpu_ms_in_situ=1e3 * med([p[5] for p in pairs]),
                       ratio_situ_wall=med([p[0] / p[4] for p in pairs]), ratio_situ=med([p[1] / p[5] for p in pairs]),
                       outside_us_per_nfe_situ=1e6 * med([(p[1] - p[5]) / nfe for p in pairs]))
        out["ratio"], out["time_ms"] = (out["ratio_situ"], out["cpu_ms"]) if cpu else (out["ratio_wall"], wall * 1e3)
        return out

    def measure_free(self, run: Callable[[], int]) -> dict[str, float]:
        """Time ``run()`` with a free network (it returns a fixed small random tensor): what is left is the
        solver alone.

        Cleaner than subtracting two large noisy times: ``free_us_per_nfe`` is the *minimum* over the repeats
        of (run time / NFE), in CPU time on a CPU device, else wall time (a busy machine only adds time, so the
        minimum is the least disturbed estimate of a fixed amount of work). ``state_ops_per_nfe``: the
        operations that touch a state-sized tensor per NFE (:class:`StateOps`), from one more run.
        """
        gen = torch.Generator(self.device).manual_seed(self.seed + 2)
        net, out = self.net, 0.1 * torch.randn(self.x_T.shape, generator=gen, device=self.device, dtype=self.x_T.dtype)
        self.net = lambda x, t: out[: x.shape[0]]  # adaptive solvers may call it on part of the batch
        try:
            with torch.inference_mode():
                nfe = run()
                times = [common.timed(run, self.device) for _ in range(self.repeats)]
                with StateOps(self.x_T.numel()) as ops:
                    nfe_counted = run()
        finally:
            self.net = net
        i = 1 if self.device.type == "cpu" else 0
        return {"free_nfe": nfe, "free_us_per_nfe": 1e6 * min(t[i] / nfe for t in times),
                "state_ops_per_nfe": ops.count / nfe_counted}

    # --- the runs -------------------------------------------------------------------------------
    def sdediff_run(self, spec: common.SolverSpec, steps: int, tol: float | None, x: Tensor | None = None) -> int:
        counted = self.counted()
        x = self.x_T if x is None else x
        sdediff.sample(self.sde, counted, x.shape, solver=spec.solver, steps=steps, eps=EPS, x_init=x,
                       generator=self.generator(), time_grid=spec.time_grid, **spec.build_options(tol))
        return counted.calls

    def loop_run(self, spec: common.SolverSpec, steps: int) -> int:
        counted = self.counted()
        ts = make_grid(self.sde, steps, EPS, spec.time_grid, device=self.device, dtype=self.x_T.dtype)
        LOOPS[spec.solver](counted, self.sde, self.x_T, ts, self.generator())
        return counted.calls

    def torchdiffeq_run(self, method: str, steps: int, tol: float | None) -> int:
        counted = self.counted()
        sde, n = self.sde, self.x_T.shape[0]

        def pf(t: Tensor, x: Tensor) -> Tensor:
            t = t.clamp(0.0, sde.T)  # adaptive steps overshoot eps; VP's schedule is undefined below 0
            return sde.drift_coef(t) * x - 0.5 * sde.diffusion(t) ** 2 * counted(x, t.expand(n))

        if tol is None:
            ts = torch.linspace(sde.T, EPS, steps + 1, device=self.device)
            torchdiffeq.odeint(pf, self.x_T, ts, method=method)
        else:
            torchdiffeq.odeint(pf, self.x_T, torch.tensor([sde.T, EPS], device=self.device), method=method,
                               rtol=tol, atol=tol)
        return counted.calls

    def diffusers_run(self, loop: Any, spec: Any, schedule: str, steps: int) -> int:
        """diffusers' ``spec`` loop with the network used directly as its model ``net(x_vp, timestep)``."""
        counted = self.counted()
        n = self.x_T.shape[0]
        loop.sample(spec, schedule, steps, None, self.x_T,
                    model=lambda x, sigma, t: counted(x, torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(n)))
        return counted.calls

    def torchode_run(self, method: str, tol: float) -> int:
        """torchode's per-sample adaptive ``method`` on the probability flow with the network as the score."""
        counted = self.counted()
        return peers.torchode_solve(self.sde, counted, self.x_T, EPS, method, tol, tol).calls

    def kd_run(self, kd_name: str, steps: int, randn_noise: bool = False) -> int:
        kds, _ = common.load_kdiffusion()
        counted = self.counted()  # the network used directly as a denoiser D(y, sigma)
        sigmas = common.kd_sigmas(kds, self.sde, steps, EPS, "karras", self.device).to(self.x_T.dtype)
        y = self.x_T / float(self.sde.mean_coeff(torch.tensor([self.sde.T], dtype=torch.float64)))
        kwargs: dict[str, Any] = {"disable": True}
        noise = kds.default_noise_sampler(y) if randn_noise else \
            common.kd_noise_sampler(kds, kd_name, y, sigmas, self.generator())
        if noise is not None:
            kwargs["noise_sampler"] = noise
        with warnings.catch_warnings():  # torchsde rounds the Brownian tree's end times: queries at them warn
            warnings.filterwarnings("ignore", message="Should have t[ab]")
            getattr(kds, common.KD_SAMPLERS[kd_name][0])(counted, y, sigmas, **kwargs)
        return counted.calls


def run_overhead(bench: Bench, specs: list[common.SolverSpec], nfe: int = 20, tol: float = 1e-3,
                 kdiffusion: bool = True, torchdiffeq_methods: dict[str, int | None] | None = None,
                 sync_check: bool | None = None, schedulers: list[Any] | None = None,
                 torchode_methods: tuple[str, ...] | None = None,
                 log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Time every spec (and its hand-written loop), torchdiffeq, torchode, k-diffusion and diffusers' scheduler loops
    (each on its first own schedule; ``schedulers`` default all) at about ``nfe`` NFE."""
    rows: list[dict[str, Any]] = []
    sync_check = bench.device.type == "cuda" if sync_check is None else sync_check
    x_small = bench.x_T[:2]

    def add(row: dict[str, Any], run: Callable[[], int] | None = None) -> None:
        if run is not None and "error" not in row:
            try:
                row.update(bench.measure_free(run))
                call_ms = row["t_call_cpu_ms"] if bench.device.type == "cpu" else row["t_call_ms"]
                row["predicted_ratio"] = 1 + row["free_us_per_nfe"] / (1e3 * call_ms)
            except Exception as err:
                row["free_error"] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        rows.append(row)
        if "error" in row:
            log(f"  {row['impl']:>11} {row['label']:<28} error: {row['error']}")
        else:
            loop = f"  loop {row['loop_ratio']:.3f}" if row.get("loop_ratio") is not None else ""
            log(f"  {row['impl']:>11} {row['label']:<28} NFE {row['nfe']:>3}  {row['wall_ms']:8.1f} ms  "
                f"ratio {row['ratio_wall']:.3f} wall, {row['ratio_cpu']:.3f} CPU{loop}")

    for spec in specs:
        row: dict[str, Any] = {"impl": "sdediff", "label": spec.label, "solver": spec.solver, "kind": spec.kind,
                               "adaptive": spec.adaptive}
        run = None
        try:
            if spec.adaptive:
                run = lambda spec=spec: bench.sdediff_run(spec, 1, tol)  # noqa: E731
                row.update(bench.measure(run), tol=tol)
            else:
                if spec.nfe_per_step is None:
                    with torch.inference_mode():
                        n4 = bench.sdediff_run(spec, 4, None, x_small)
                        n8 = bench.sdediff_run(spec, 8, None, x_small)
                    a, b = (n8 - n4) / 4, n4 - (n8 - n4)
                else:
                    a, b = spec.nfe_per_step, 0.0
                steps = common.steps_for_budget(nfe, a, b)
                if steps < 1:
                    raise RuntimeError(f"one step costs more than {nfe} NFE")
                row["steps"] = steps
                run = lambda spec=spec, steps=steps: bench.sdediff_run(spec, steps, None)  # noqa: E731
                row.update(bench.measure(run))
                if spec.solver in LOOPS and all(k in ("snr", "corrector_steps") for k in spec.options) \
                        and spec.options.get("snr", 0.16) == 0.16 and spec.options.get("corrector_steps", 1) == 1:
                    loop_run = lambda spec=spec, steps=steps: bench.loop_run(spec, steps)  # noqa: E731
                    loop = bench.measure(loop_run)
                    row.update(loop_ratio=loop["ratio"], loop_ratio_wall=loop["ratio_wall"],
                               loop_time_ms=loop["time_ms"], vs_loop=row["ratio"] / loop["ratio"],
                               loop_free_us_per_nfe=bench.measure_free(loop_run)["free_us_per_nfe"])
                if sync_check:
                    with torch.inference_mode():
                        c1 = count_syncs(lambda spec=spec, steps=steps: bench.sdediff_run(spec, steps, None))
                        c2 = count_syncs(lambda spec=spec, steps=steps: bench.sdediff_run(spec, 2 * steps, None))
                    row.update(syncs=c1, syncs_per_step=(c2 - c1) / steps)
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        add(row, run)

    for method, per_step in (TORCHDIFFEQ if torchdiffeq_methods is None else torchdiffeq_methods).items():
        row = {"impl": "torchdiffeq", "label": f"odeint {method}", "kind": "ode", "adaptive": per_step is None}
        run = None
        try:
            if per_step is None:
                run = lambda method=method: bench.torchdiffeq_run(method, 0, tol)  # noqa: E731
                row.update(bench.measure(run), tol=tol)
            else:
                steps = common.steps_for_budget(nfe, per_step)
                row["steps"] = steps
                run = lambda method=method, steps=steps: bench.torchdiffeq_run(method, steps, None)  # noqa: E731
                row.update(bench.measure(run))
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        add(row, run)

    for method in (peers.TORCHODE_METHODS if torchode_methods is None else torchode_methods):
        row = {"impl": "torchode", "label": f"torchode {method}", "kind": "ode", "adaptive": True, "tol": tol}
        run = lambda method=method: bench.torchode_run(method, tol)  # noqa: E731
        try:
            row.update(bench.measure(run))
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        add(row, run)

    if peers.load_diffusers()[0] is not None:
        loop = peers.DiffusersLoop(bench.sde, EPS)
        for spec in (peers.SCHEDULERS if schedulers is None else schedulers):
            schedule = spec.schedules[0]
            row = {"impl": "diffusers", "label": f"{spec.label} [{schedule}]", "kind": "ode", "adaptive": False}
            run = None
            try:
                steps, _ = loop.steps_for_budget(spec, schedule, nfe)
                row["steps"] = steps
                run = lambda spec=spec, schedule=schedule, steps=steps: bench.diffusers_run(  # noqa: E731
                    loop, spec, schedule, steps)
                row.update(bench.measure(run))
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            add(row, run)

    kds, _ = common.load_kdiffusion()
    if kdiffusion and kds is not None:
        variants = [(name, False) for name in common.KD_SAMPLERS]
        variants += [(name, True) for name in ("dpmpp_2m_sde", "dpmpp_sde")]  # without the Brownian tree
        for kd_name, randn_noise in variants:
            _, kind, per_step = common.KD_SAMPLERS[kd_name]
            label = f"{kd_name} (randn noise)" if randn_noise else kd_name
            row = {"impl": "k-diffusion", "label": label, "kind": kind, "adaptive": False}
            steps = common.steps_for_budget(nfe, per_step)
            row["steps"] = steps
            run = lambda kd_name=kd_name, steps=steps, randn_noise=randn_noise: bench.kd_run(  # noqa: E731
                kd_name, steps, randn_noise)
            try:
                row.update(bench.measure(run))
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            add(row, run)
    return rows


def markdown(results: dict[str, Any]) -> str:
    cpu = results["device"] == "cpu"
    basis = "the in-situ ratio in CPU time" if cpu else "the per-call ratio in wall time"
    out = ["# Solver overhead", "",
           f"Run: `{results['command']}` on {results['environment']}."
           + (f" Machine load (1-min load average) {results['load_average'][0]:.1f} at the start, "
              f"{results['load_average'][1]:.1f} at the end, on {results['cpu_count']} cores."
              if "load_average" in results else ""), "",
           f"Network: {results['network']}; one call: {results['t_call_ms']:.3f} ms wall, {results['t_call_cpu_ms']:.3f} "
           f"ms CPU (median of 100), batch {results['batch']}, float32, VP SDE, eps = {EPS}. Each method runs at about "
           f"{results['nfe']} NFE (adaptive ones at rtol = atol = {results['tol']:g}); each of {results['repeats']} timed "
           f"whole runs is paired with {results['call_repeats']} network calls timed alone just before it, and every "
           "figure is the median over the runs. Definitions:", "",
           "- `ratio (wall)`, `ratio (CPU)`: run time / (NFE × the median time of one network call timed alone) "
           "(1.00 = no time outside the network). CPU time is the thread's (one torch thread does all the work), "
           "which other processes on a shared machine do not inflate.",
           "- `ratio in situ`: run CPU time / the CPU time spent inside the network calls of that same run (each "
           "call timed where it happens; on CPU a call returns when its work is done). This is the share of time "
           "outside the network, the solver's overhead: a network often runs slower inside a sampling loop than "
           "alone (caches; glibc handing freed memory back to the OS, which then faults in again), and the "
           "per-call ratios charge that to the solver. `outside µs/NFE` = (run − in-run network) CPU time / NFE.",
           "- `free µs/NFE`: CPU time per NFE of the same run with a free network (one that returns a fixed tensor; "
           "minimum over the runs), the solver's own cost measured directly; `1 + free/t_call` is the ratio it "
           "implies.",
           "- `state ops/NFE`: tensor operations per NFE that read or write a state-sized tensor (views excluded), "
           "counted with a dispatch mode in a run with the free network: the solver's passes over the state.",
           "- `loop`: the same update as a minimal hand-written loop (coefficients precomputed as Python floats, "
           "out-of-place tensor ops; the SDE loops draw their noise, which is part of their floor); `loop in situ` "
           "its in-situ ratio, `loop free µs/NFE` its own cost, `vs loop` = sdediff's in-situ ratio / the loop's.",
           "- k-diffusion's samplers drive the same network as a denoiser D(y, sigma) on a Karras schedule "
           "(default noise: a seeded Brownian tree for the DPM++ SDE samplers); diffusers' schedulers run their own "
           "set_timesteps/step loop on their first own schedule with the network as the model net(x, timestep) "
           "(`peers.py`); torchode's per-sample adaptive solvers (PID controller) at the adaptive tolerance. "
           "`samples/s` = batch / wall time.",
           "", f"The headline overhead figure is {basis}.", "",
           f"k-diffusion: {results['kdiffusion']}", ""]
    if results["skipped"]:
        out += ["Skipped: " + "; ".join(results["skipped"]), ""]
    sync = any("syncs" in r for r in results["rows"])
    cols = ["solver", "impl", "NFE", "wall ms", "ratio (wall)", "ratio (CPU)", "ratio in situ", "outside µs/NFE",
            "free µs/NFE", "1 + free/t_call", "state ops/NFE", "loop in situ", "loop free µs/NFE", "vs loop", "samples/s"] + \
        (["syncs/run", "syncs/step"] if sync else [])
    out += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def cell(r: dict[str, Any], key: str, spec: str) -> str:
        return format(r[key], spec) if r.get(key) is not None else "—"

    for r in results["rows"]:
        if "error" in r:
            out.append(f"| {r['label']} | {r['impl']} | raised: {r['error'][:80]} |" + " |" * (len(cols) - 3))
            continue
        cells = [r["label"], r["impl"], str(r["nfe"]), f"{r['wall_ms']:.1f}", f"{r['ratio_wall']:.3f}",
                 cell(r, "ratio_cpu", ".3f") if cpu else "—", cell(r, "ratio_situ", ".3f"),
                 cell(r, "outside_us_per_nfe_situ", ".0f"), cell(r, "free_us_per_nfe", ".0f"),
                 cell(r, "predicted_ratio", ".3f"), cell(r, "state_ops_per_nfe", ".1f"), cell(r, "loop_ratio", ".3f"),
                 cell(r, "loop_free_us_per_nfe", ".0f"),
                 cell(r, "vs_loop", ".3f"), f"{r['samples_per_s']:.0f}"]
        if sync:
            cells += [str(r.get("syncs", "—")), cell(r, "syncs_per_step", ".2f")]
        out.append("| " + " | ".join(cells) + " |")
    fit = pass_cost_fit(results)
    if fit is not None:
        out += ["", f"Where the time outside the network goes, for the fixed-step ODE solvers ({fit['rows']} rows): a "
                f"least-squares line through their `outside µs/NFE` against `state ops/NFE` gives {fit['per_op_us']:.0f} µs "
                f"per state operation plus {fit['intercept_us']:.0f} µs per NFE (R² = {fit['r2']:.2f}). At this network "
                f"an in-situ ratio of {BUDGET_RATIO} leaves {fit['budget_us']:.0f} µs per NFE outside it, "
                + (f"room for about {fit['ops_in_budget']:.1f} state operations" if fit["ops_in_budget"] > 0 else
                   "less than the fitted per-NFE intercept alone")
                + ": a one-stage update `a x + b s` takes 2 (eager PyTorch has no fused `a x + b s`), a multistep "
                "update one more per past term it combines, and the final finiteness check 1 per run."]
    if not sync:
        out += ["", "Host syncs are only counted on CUDA (`--device cuda`)."]
    return "\n".join(out)


def pass_cost_fit(results: dict[str, Any]) -> dict[str, float] | None:
    """Least squares ``outside µs/NFE = intercept + per_op × state ops/NFE`` over sdediff's fixed-step ODE rows,
    and how many state operations per NFE an in-situ ratio of ``BUDGET_RATIO`` leaves room for (``None`` with fewer than 3
    rows, or off CPU, where no in-situ figure exists)."""
    rows = [r for r in results["rows"] if r["impl"] == "sdediff" and r.get("kind") == "ode" and not r.get("adaptive")
            and r.get("outside_us_per_nfe_situ") is not None and r.get("state_ops_per_nfe") is not None]
    if len(rows) < 3:
        return None
    ops = np.array([r["state_ops_per_nfe"] for r in rows])
    outside = np.array([r["outside_us_per_nfe_situ"] for r in rows])
    (intercept, per_op), *_ = np.linalg.lstsq(np.stack([np.ones_like(ops), ops], 1), outside, rcond=None)
    residual = outside - intercept - per_op * ops
    r2 = 1 - float(residual @ residual) / max(float(((outside - outside.mean()) ** 2).sum()), 1e-300)
    budget = (BUDGET_RATIO - 1) * 1e3 * results["t_call_cpu_ms"]
    return {"rows": len(rows), "per_op_us": float(per_op), "intercept_us": float(intercept), "r2": r2,
            "budget_us": budget, "ops_in_budget": (budget - float(intercept)) / float(per_op)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true", help="fewer repeats (3 runs, each paired with 8 calls)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--hidden", type=int, default=256, help="MLP width (default 256: a few ms per call on one CPU thread)")
    p.add_argument("--nfe", type=int, default=20, help="NFE budget per sample (default 20)")
    p.add_argument("--tol", type=float, default=1e-3, help="rtol = atol of adaptive solvers (default 1e-3)")
    p.add_argument("--repeats", type=int, default=None, help="whole runs timed per method (default 9, quick 3)")
    p.add_argument("--only", default=None, metavar="REGEX", help="only sdediff specs whose label matches this regular expression")
    p.add_argument("--no-peers", action="store_true", help="skip torchdiffeq, torchode, k-diffusion and diffusers")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="output folder (default benchmarks/results)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device, env = common.setup_torch(args.device)
    print(env)
    notes: list[str] = []
    skipped: list[str] = []
    specs = common.runnable_specs([s for s in common.SPECS if args.only is None or re.search(args.only, s.label)],
                                  log=lambda m: (print(m), skipped.append(m.strip()[5:])))
    _, kd_note = common.load_kdiffusion()
    print(kd_note)
    repeats = args.repeats or (3 if args.quick else 9)
    call_repeats = 8 if args.quick else 15
    bench = Bench(device, batch=args.batch, hidden=args.hidden, repeats=repeats, call_repeats=call_repeats)
    load_start = os.getloadavg()[0]
    t_call, t_call_cpu = bench.t_call(100)
    print(f"network: one call {1e3 * t_call:.3f} ms wall, {1e3 * t_call_cpu:.3f} ms CPU")
    t0 = time.perf_counter()
    rows = run_overhead(bench, specs, nfe=args.nfe, tol=args.tol, kdiffusion=not args.no_peers,
                        torchdiffeq_methods={} if args.no_peers else None, schedulers=[] if args.no_peers else None,
                        torchode_methods=() if args.no_peers else None)
    results = {"command": common.command_line("overhead", argv), "environment": env,
               "device": device.type,
               "network": f"MLP(3x32x32, hidden {args.hidden}, 4 linear layers, SiLU, 32-d time embedding)",
               "t_call_ms": 1e3 * t_call, "t_call_cpu_ms": 1e3 * t_call_cpu, "call_repeats": call_repeats,
               "batch": args.batch, "nfe": args.nfe, "tol": args.tol, "repeats": repeats,
               "kdiffusion": kd_note, "skipped": skipped,
               "optional_modules": notes, "rows": rows, "seconds": time.perf_counter() - t0,
               "load_average": [load_start, os.getloadavg()[0]], "cpu_count": os.cpu_count()}
    results["pass_cost_fit"] = pass_cost_fit(results)
    suffix = "_quick" if args.quick else ""
    if device.type == "cuda":
        suffix += "_cuda"
    text = markdown(results)
    atomic_write(args.out / f"overhead{suffix}.md", text + "\n")
    atomic_write(args.out / f"overhead{suffix}.json", json.dumps(results, indent=1, default=str) + "\n")
    print()
    print(text)
    print(f"\nwrote {args.out}/overhead{suffix}.md, .json in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
