"""One contract, run over every registered solver (as diffusers' SchedulerCommonTest does for its schedulers).

Every solver that ``sdediff.available_solvers()`` lists must: return samples of the requested shape, dtype and
device; be deterministic given a generator; report as ``nfe`` exactly the score evaluations it made (counted
here by the score function itself) and, for the fixed-step solvers, the number their docstrings state; accept
the standard grids, an explicit grid and a callable grid; and never modify ``x_init``.
"""

import pytest
import torch

import sdediff
from sdediff.data import GaussianMixture

#: concrete names for families registered as "family:<option>"
FAMILIES = {"torchsde:<method>": "torchsde:heun"}
NAMES = [FAMILIES.get(name, name) for name in sdediff.available_solvers()]
STEPS = 6
#: score evaluations per run of STEPS steps, as each solver's docstring states
NFE = {"euler": STEPS, "heun": 2 * STEPS, "euler_maruyama": STEPS, "reverse_diffusion": STEPS, "ancestral": STEPS,
       "ddpm": STEPS, "ddim": STEPS, "dpm_solver": STEPS, "lms": STEPS, "ipndm": STEPS, "deis": STEPS,
       "edm_heun": 2 * STEPS, "unipc": STEPS,
       "sde_dpm_solver": STEPS, "pc": 2 * STEPS, "langevin": STEPS, "torchsde:heun": 2 * STEPS + 1}
ADAPTIVE = {"ode", "adaptive_ode", "adaptive_sde"}
MIXTURE = GaussianMixture.ring(num_components=4, radius=2.0, std=0.4)


def uniform_only(name):
    """torchsde's solvers step with one fixed dt: they accept only uniform grids."""
    return name.startswith("torchsde")


class Counting:
    """The mixture's exact score, counting its own calls."""

    def __init__(self, sde):
        self.score, self.calls = MIXTURE.score_fn(sde), 0

    def __call__(self, x, t):
        self.calls += 1
        return self.score(x, t)


def run(name, sde=None, shape=(5, 2), dtype=torch.float64, seed=0, **kwargs):
    sde = sde or sdediff.VPSDE()
    score = Counting(sde)
    x_init = kwargs.pop("x_init", None)
    res = sdediff.sample(sde, score, shape, solver=name, steps=kwargs.pop("steps", STEPS), x_init=x_init,
                         generator=torch.Generator().manual_seed(seed), dtype=dtype, return_info=True, **kwargs)
    return res, score.calls


@pytest.mark.parametrize("name", NAMES)
class TestSolverContract:
    @pytest.mark.parametrize("shape", [(3, 2), (2, 1, 2, 3), (4, 5)])
    def test_shape(self, name, shape):
        sde = sdediff.VESDE()
        score = lambda x, t: -x / (1 + sde.marginal_std(t) ** 2).reshape(-1, *[1] * (x.dim() - 1))  # noqa: E731
        out = sdediff.sample(sde, score, shape, solver=FAMILIES.get(name, name), steps=STEPS,
                             generator=torch.Generator().manual_seed(0))
        assert out.shape == shape and torch.isfinite(out).all()

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_dtype_and_device(self, name, dtype):
        res, _ = run(name, dtype=dtype)
        assert res.samples.dtype == dtype and res.samples.device.type == "cpu" and torch.isfinite(res.samples).all()

    def test_determinism_with_a_generator(self, name):
        a, _ = run(name, seed=3)
        b, _ = run(name, seed=3)
        assert torch.equal(a.samples, b.samples)
        solver = sdediff.solvers.get_solver(name)
        if solver.stochastic:
            c, _ = run(name, seed=4)
            assert not torch.equal(a.samples, c.samples)

    def test_nfe_accounting(self, name):
        res, calls = run(name)
        assert res.nfe == calls
        if name in NFE:
            assert res.nfe == NFE[name]
        if name in ADAPTIVE:
            assert res.stats["nfe_per_sample"].max() <= res.nfe if "nfe_per_sample" in res.stats else res.nfe > 0

    @pytest.mark.parametrize("grid", ["uniform", "quadratic", "log_snr", "karras", "explicit", "callable"])
    def test_grid_acceptance(self, name, grid):
        sde = sdediff.VPSDE()
        if uniform_only(name) and grid != "uniform":
            with pytest.raises(ValueError, match="uniform"):
                run(name, sde, time_grid=sdediff.solvers.grids.karras(sde, STEPS, 1e-3))
            return
        time_grid = {"explicit": torch.linspace(sde.T, 1e-3, STEPS + 1, dtype=torch.float64),
                     "callable": sdediff.solvers.grids.quadratic}.get(grid, grid)
        res, _ = run(name, sde, time_grid=time_grid)
        assert len(res.times) == STEPS + 1 and torch.isfinite(res.samples).all()

    def test_input_is_not_modified(self, name):
        sde = sdediff.VPSDE()
        x = sde.prior_sample((5, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        copy = x.clone()
        for callback in (None, lambda i, t, y: None):
            run(name, sde, x_init=x, callback=callback)
            assert torch.equal(x, copy)

    def test_a_callback_sees_the_states_and_changes_nothing(self, name):
        """A callback sees every grid state; for fixed-step solvers it changes no number (adaptive ones must then
        step onto every grid time, which changes their steps)."""
        sde = sdediff.SubVPSDE()
        x = sde.prior_sample((5, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        seen = []
        plain, _ = run(name, sde, x_init=x)
        observed, _ = run(name, sde, x_init=x, callback=lambda i, t, y: seen.append((i, y.clone())))
        if name not in ADAPTIVE:
            torch.testing.assert_close(observed.samples, plain.samples, rtol=1e-12, atol=1e-12)
        assert [i for i, _ in seen] == list(range(STEPS))
        torch.testing.assert_close(seen[-1][1], observed.samples, rtol=0, atol=0)


def test_nfe_is_counted_through_nested_wrappers():
    """A step that builds its own process from the one it is given (or from the counted score) still counts."""

    @sdediff.register_solver("test_nested_counter")
    class Nested(sdediff.solvers.FixedStepSolver):
        def step(self, process, state, x, t, t_next):
            inner = process.sde.probability_flow(process.score)
            return x + (t_next - t) * inner.drift(x, t), state

    try:
        res, calls = run("test_nested_counter")
        assert res.nfe == calls == STEPS
    finally:
        sdediff.solvers.base._REGISTRY.pop("test_nested_counter")


def test_every_solver_is_covered():
    assert set(NAMES) - set(NFE) == ADAPTIVE
