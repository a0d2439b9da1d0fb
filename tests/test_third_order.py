"""Third-order multistep DPM-Solver++: sdediff's against diffusers' and k-diffusion's, on an exact solution.

On Gaussian data N(MEAN, V I) under the VP SDE the probability flow has a closed form (problems.gaussian_flow). From the
same exact p_T draws and on the same time grid, three solvers run to eps = 1e-3:

- sdediff's ``dpm_solver`` with ``order=3`` (multistep, data prediction);
- diffusers' ``DPMSolverMultistepScheduler`` with ``solver_order=3`` (``final_sigmas_type="sigma_min"`` so that the loop
  ends at eps, ``lower_order_final=False``, and ``solver_type="heun"`` for its one second-order warm-up step, as
  k-diffusion's), driven through its own ``step`` with the exact noise prediction and the grid's noise levels in
  float64 (its float32 cast neutralised, problems.Float64Torch);
- k-diffusion's ``sample_dpmpp_3m_sde`` with ``eta=0`` (no noise), on the exact denoiser.

diffusers' ``multistep_dpm_solver_third_order_update`` and k-diffusion's step are the same formula (they agree to
rounding here): its second-difference term is :math:`c_3 D_{012}` where a third-order step needs :math:`c_3 P'' =
2c_3 D_{012}` (sdediff's, see :class:`sdediff.solvers.DPMSolver`), so the omitted :math:`c_3 D_{012} = O(h^3)` per step
leaves them second order. Measured relative errors (64 paths):

    log-SNR grid, 50 / 100 / 200 steps:  sdediff 6.9e-5 / 4.2e-6 / 2.4e-7 (rates 4.04, 4.10)
                                         diffusers = k-diffusion 8.2e-4 / 1.9e-4 / 4.7e-5 (2.10, 2.04)
    Karras grid, 100 / 200 / 400 steps:  sdediff 1.2e-4 / 1.5e-5 / 1.8e-6 (3.03, 3.02)
                                         diffusers = k-diffusion 3.0e-4 / 8.3e-5 / 2.2e-5 (1.84, 1.93)

(sdediff's rate on the log-SNR grid exceeds its order on this problem; on a grid uniform in t the peers' O(h^2) and
O(h^3) errors cancel near 800 steps, so rates there do not show the order.)
"""

import math

import pytest
import torch
from problems import EPS, T64, Float64Torch, gaussian_flow, gaussian_marginal, gaussian_score, gen

import sdediff
from sdediff.interop.kdiffusion import KDiffusionDenoiser, load_sampling, sigma_of_time

SDE = sdediff.VPSDE()
SCORE = gaussian_score(SDE)


def _start():
    mean, std = gaussian_marginal(SDE, SDE.T)
    return mean + std * torch.randn(64, 2, generator=gen(0), dtype=T64)


def _diffusers_third_order(monkeypatch, times, x):
    import diffusers.schedulers.scheduling_dpmsolver_multistep as module
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(solver_order=3, solver_type="heun", final_sigmas_type="sigma_min",
                                            lower_order_final=False)
    scheduler.set_timesteps(len(times) - 1)  # its timesteps only index the steps; the levels are the grid's
    scheduler.sigmas = sigma_of_time(SDE, times)
    monkeypatch.setattr(module, "torch", Float64Torch("torch"))
    for i, k in enumerate(scheduler.timesteps):
        t = times[i].expand(x.shape[0])
        x = scheduler.step(-SDE.marginal_std(t)[:, None] * SCORE(x, t), k, x).prev_sample  # exact noise prediction
    monkeypatch.undo()
    return x


def _kdiffusion_third_order(kds, times, x):
    y = kds.sample_dpmpp_3m_sde(KDiffusionDenoiser(SDE, SCORE), x / SDE.mean_coeff(times[:1]), sigma_of_time(SDE, times),
                                eta=0.0, noise_sampler=lambda sigma, sigma_next: None, disable=True)
    return y * SDE.mean_coeff(times[-1:])


@pytest.mark.parametrize("grid,steps", [("log_snr", (50, 100, 200)), ("karras", (100, 200, 400))])
def test_peers_third_order_multistep_converges_at_order_two(monkeypatch, grid, steps):
    pytest.importorskip("diffusers")
    kds, note = load_sampling()
    if kds is None:
        pytest.skip(note)
    x_T = _start()
    exact = gaussian_flow(SDE, x_T, SDE.T, EPS)

    def error(x):
        return float((x - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt())

    errors = {"sdediff": [], "diffusers": [], "k-diffusion": []}
    for n in steps:
        times = sdediff.solvers.grids.make_grid(SDE, n, EPS, grid, dtype=T64)
        ours = sdediff.sample(SDE, SCORE, x_T.shape, solver="dpm_solver", order=3, steps=n, x_init=x_T, time_grid=times)
        theirs = _diffusers_third_order(monkeypatch, times, x_T)
        kd = _kdiffusion_third_order(kds, times, x_T)
        torch.testing.assert_close(kd, theirs, rtol=1e-10, atol=1e-12)  # one formula
        for name, x in (("sdediff", ours), ("diffusers", theirs), ("k-diffusion", kd)):
            errors[name].append(error(x))
    rates = {name: [math.log2(e[i] / e[i + 1]) for i in range(len(e) - 1)] for name, e in errors.items()}
    print(f"[{grid}] steps {steps}: errors {errors}, rates {rates}")
    assert all(r > 2.8 for r in rates["sdediff"]), rates
    for peer in ("diffusers", "k-diffusion"):
        assert all(abs(r - 2) < 0.3 for r in rates[peer]), rates
    assert errors["sdediff"][-1] < 0.2 * errors["diffusers"][-1]
