"""Shared test problems and helpers, imported by the test files (which never import each other or conftest).

* Seeds and SDEs: ``gen``, ``SDES`` (the VP, sub-VP and VE SDEs by name), ``OU`` (a custom SDE with only drift,
  diffusion and a prior) and ``ALL_SDES`` (the three and OU).
* The 2-D skewed Gaussian mixture ``MIXTURE`` with its exact marginals: ``exact_reference`` (an exact sample of
  p_eps, its expected log-density and the sliced-W2 noise floor), ``check_against_exact`` (samples indistinguishable
  from exact ones), ``run`` (a sampler with the exact score), ``ode_reference`` and ``rms_error`` (pathwise error
  against a tight dopri8 solve of the probability flow). ``NARROW``: a mixture with one very narrow mode.
* Gaussian data N(0, V I): ``kernel``, ``exact_model`` (a network for its exact score) and ``gaussian_data``; Gaussian
  data N(MEAN, V I) with its closed-form probability flow: ``gaussian_score``, ``gaussian_flow``, ``gaussian_flow_error``.
* ``custom_linear_sde``: a linear SDE with no closed-form kernel.
* Counting and seeding checks for solvers: ``Counted``, ``assert_nfe_counts``, ``assert_seeded``.
* ``load_benchmark``: a script of benchmarks/ loaded as a module; ``Float64Torch``: torch with float32 read as float64,
  for a peer's module that casts to float32.
"""

import importlib
import math
import sys
import types
from pathlib import Path

import torch

import sdediff
from sdediff import score as sc
from sdediff.data import GaussianMixture, skewed_mixture
from sdediff.metrics import noise_floor, sliced_wasserstein
from sdediff.sdes import gaussian_log_prob, gaussian_sample

T64 = torch.float64
EPS = 1e-3
SDES = {"vp": sdediff.VPSDE, "subvp": sdediff.SubVPSDE, "ve": sdediff.VESDE}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """The script ``benchmarks/{name}.py`` imported as module ``name``, as ``python benchmarks/{name}.py`` imports
    its siblings (the folder goes first on ``sys.path``), so that every script and test shares one copy of each."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


class Float64Torch(types.ModuleType):
    """torch with float32 read as float64. diffusers' DPMSolverMultistepScheduler.step casts the sample to
    torch.float32; with this module in the scheduler module's namespace (monkeypatch its ``torch``) the cast keeps
    float64, so a loop runs in float64 throughout and compares with sdediff's to rounding."""

    float32 = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


class Counted:
    """A score function that counts its calls (``.calls``): one per evaluation on a whole batch."""

    def __init__(self, score):
        self.score, self.calls = score, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.score(x, t)


def assert_nfe_counts(sde, score, expected: dict, steps: int = 10) -> dict:
    """For each ``solver: nfe`` of ``expected``, ``steps`` steps on a (8, 2) batch report ``nfe`` evaluations, make
    exactly that many calls and return ``steps + 1`` times; returns each solver's SampleResult."""
    infos = {}
    for solver, nfe in expected.items():
        counted = Counted(score)
        info = sdediff.sample(sde, counted, (8, 2), solver=solver, steps=steps, generator=gen(0), return_info=True)
        assert info.nfe == nfe == counted.calls, solver
        assert info.samples.shape == (8, 2) and info.times.shape == (steps + 1,)
        infos[solver] = info
    return infos


def assert_seeded(sde, score, solvers) -> None:
    """Each solver draws the same samples from the same generator seed whatever the global RNG, others from another."""
    for solver in solvers:
        a = sdediff.sample(sde, score, (64, 2), solver=solver, steps=20, generator=gen(7))
        torch.manual_seed(123)
        b = sdediff.sample(sde, score, (64, 2), solver=solver, steps=20, generator=gen(7))
        c = sdediff.sample(sde, score, (64, 2), solver=solver, steps=20, generator=gen(8))
        assert torch.equal(a, b), solver
        assert not torch.allclose(a, c), solver


# --- the skewed mixture, exact samples and the statistical check ---------------------------------------------
MIXTURE = skewed_mixture()

# two modes of very different width: samples bound for the narrow one are stiff near eps
NARROW = GaussianMixture(weights=[0.5, 0.5], means=[[-2.0, 0.0], [2.0, 0.0]],
                         covs=[[[1e-4, 0.0], [0.0, 1e-4]], [[0.5, 0.0], [0.0, 0.5]]])


class OU(sdediff.SDE):
    """A custom SDE written with the general base class only: drift, diffusion and a prior."""

    theta, sigma = 2.0, 1.5

    def __init__(self):
        super().__init__(T=3.0)

    def drift(self, x, t):
        return -self.theta * x

    def diffusion(self, t):
        return torch.full_like(t, self.sigma)

    @property
    def stationary_std(self):
        return self.sigma / math.sqrt(2 * self.theta)

    def prior_sample(self, shape, generator=None, device=None, dtype=None):
        return gaussian_sample(shape, self.stationary_std, generator, device, dtype)

    def prior_log_prob(self, z):
        return gaussian_log_prob(z, self.stationary_std)


class OUKernel:
    """The OU kernel in closed form, known to the test (not to the SDE): m = e^{-theta t}, s^2 = ..."""

    def mean_coeff(self, t):
        return torch.exp(-OU.theta * t)

    def marginal_std(self, t):
        return torch.sqrt(OU.sigma**2 / (2 * OU.theta) * -torch.expm1(-2 * OU.theta * t))


ALL_SDES = {**SDES, "ou": OU}


def kernel_of(sde):
    return OUKernel() if isinstance(sde, OU) else sde


_EXACT_REFERENCES = {}


def exact_reference(name, n):
    """Exact p_eps: an exact sample of size n, the expected log-density, and the SW2 noise floor for n."""
    key = (name, n)
    if key not in _EXACT_REFERENCES:
        sde = ALL_SDES[name]()
        exact = MIXTURE.marginal(kernel_of(sde), EPS)
        mean_lp = exact.log_prob(exact.sample(100_000, generator=gen(10), dtype=T64)).mean()
        ref = exact.sample(n, generator=gen(11), dtype=T64)
        floor = noise_floor(lambda k, generator: exact.sample(k, generator=generator, dtype=T64), n, repeats=16,
                            generator=gen(12))
        _EXACT_REFERENCES[key] = exact, ref, mean_lp, floor
    return _EXACT_REFERENCES[key]


def check_against_exact(name, x, label):
    n = x.shape[0]
    exact, ref, mean_lp, floor = exact_reference(name, n)
    sw = sliced_wasserstein(x, ref, generator=gen(1))
    lp = exact.log_prob(x)
    z = (lp.mean() - mean_lp) / (lp.std() / math.sqrt(n))
    props = torch.bincount(exact.component_posterior(x).argmax(1), minlength=4).to(T64) / n
    prop_err = (props - MIXTURE.weights).abs().max()
    msg = f"{label}: sw={sw:.4f} floor={floor.mean():.4f}±{floor.std():.4f} logp z={z:.2f} prop_err={prop_err:.4f}"
    assert torch.isfinite(x).all(), msg
    assert sw <= 2 * floor.mean(), msg
    assert abs(z) < 4, msg
    assert prop_err < 0.02, msg


def run(name, solver, n, steps, seed=2, **options):
    sde = ALL_SDES[name]()
    return sdediff.sample(sde, MIXTURE.score_fn(kernel_of(sde)), (n, 2), solver=solver, steps=steps, eps=EPS,
                          generator=gen(seed), dtype=T64, **options)


# --- pathwise error against a tight solve of the probability flow ------------------------------------------
_ODE_REFERENCES = {}


def ode_reference(name, n, eps=EPS, seed=5):
    """Exact p_T samples and their images at eps under a tight dopri8 solve of the probability flow."""
    key = (name, n, eps, seed)
    if key not in _ODE_REFERENCES:
        sde = SDES[name]()
        score = MIXTURE.score_fn(sde)
        x_T = MIXTURE.marginal(sde, sde.T).sample(n, generator=gen(seed), dtype=T64)
        ref = sdediff.sample(sde, score, x_T.shape, solver="ode", eps=eps, x_init=x_T, rtol=1e-11, atol=1e-11,
                             method="dopri8")
        _ODE_REFERENCES[key] = sde, score, x_T, ref
    return _ODE_REFERENCES[key]


def rms_error(name, solver, steps, grid, n=256, **options):
    sde, score, x_T, ref = ode_reference(name, n)
    x = sdediff.sample(sde, score, x_T.shape, solver=solver, steps=steps, eps=EPS, x_init=x_T, time_grid=grid,
                       **options)
    return float((x - ref).pow(2).mean().sqrt())


def custom_linear_sde():
    """A linear SDE with no closed-form kernel (m, s integrated numerically by LinearSDE)."""
    return sdediff.LinearSDE(drift_coef=lambda t: -(1 + 2 * t), diffusion=lambda t: (2 * (1 + 2 * t)).sqrt() + 0.1)


# --- Gaussian data N(0, V I) and its exact score ------------------------------------------------------------
V = 0.6  # data variance


def kernel(sde, t):
    t = torch.as_tensor([t], dtype=T64)
    return float(sde.mean_coeff(t)), float(sde.marginal_std(t)), float(sde.diffusion(t))


def exact_model(sde, prediction="score", shift=0.0):
    """Network predicting `prediction` for the exact score of N(0, V I), plus a constant `shift` added to the score."""

    def net(x, t):
        m = sdediff._utils.expand_as(sde.mean_coeff(t), x)
        s = sdediff._utils.expand_as(sde.marginal_std(t), x)
        score = -x / (m**2 * V + s**2) + shift
        return sc.convert(score, x, t, sde, "score", prediction)

    return net


def gaussian_data(n, shape=(3,), seed=0):
    return math.sqrt(V) * torch.randn(n, *shape, generator=gen(seed), dtype=T64)


# --- Gaussian data N(MEAN, V I): the probability flow in closed form ------------------------------------------
MEAN = torch.tensor([0.5, -0.3], dtype=T64)


def gaussian_marginal(sde, t):
    """Mean (2,) and standard deviation (a float) of p_t = N(m MEAN, (m^2 V + s^2) I)."""
    m, s, _ = kernel(sde, t)
    return m * MEAN, math.sqrt(m**2 * V + s**2)


def gaussian_score(sde):
    """The exact score of N(MEAN, V I) under a linear SDE: -(x - m MEAN) / (m^2 V + s^2)."""

    def score(x, t):
        m, s = sde.mean_coeff(t)[:, None], sde.marginal_std(t)[:, None]
        return -(x - m * MEAN.to(x)) / (m**2 * V + s**2)

    return score


def gaussian_flow(sde, x, t_from, t_to):
    """The probability flow of N(MEAN, V I) from t_from to t_to: the monotone affine map between the marginals,
    x -> mean' + (std'/std) (x - mean)."""
    (mean, std), (mean_to, std_to) = gaussian_marginal(sde, t_from), gaussian_marginal(sde, t_to)
    return mean_to + (std_to / std) * (x - mean)


def gaussian_flow_error(sde, solver, steps, grid, eps=EPS, n=64, **options):
    """Relative RMS error at eps of ``solver`` on N(MEAN, V I), from exact p_T draws, against the closed-form flow."""
    mean, std = gaussian_marginal(sde, sde.T)
    x_T = mean + std * torch.randn(n, 2, generator=gen(0), dtype=T64)
    x = sdediff.sample(sde, gaussian_score(sde), x_T.shape, solver=solver, steps=steps, eps=eps, x_init=x_T,
                       time_grid=grid, **options)
    ref = gaussian_flow(sde, x_T, sde.T, eps)
    return float((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
