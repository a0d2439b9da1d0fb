"""diffusers and k-diffusion interop (sdediff.interop) against each library's own sampling loops and analytic truth.

diffusers tests use a small randomly initialised ``UNet2DModel`` (no download) and skip without diffusers;
k-diffusion tests load its ``sampling.py`` (``sdediff.interop.kdiffusion.load_sampling``) and skip without it.
"""

import copy
import math
import subprocess
import sys

import pytest
import torch
from problems import MIXTURE, T64, Float64Torch, gaussian_flow_error, gen

import sdediff
from sdediff.interop.diffusers import DiffusersModel, DiscreteVPSDE, from_diffusers, scheduler_time_grid
from sdediff.interop.kdiffusion import KDiffusionDenoiser, from_kdiffusion, load_sampling, sigma_of_time
from sdediff.metrics import noise_floor, sliced_wasserstein


def _ddpm_alphas_cumprod(n=1000, beta_start=1e-4, beta_end=0.02):
    """diffusers' default "linear" schedule, computed like diffusers does (float32)."""
    return torch.cumprod(1 - torch.linspace(beta_start, beta_end, n, dtype=torch.float32), 0)


# --- the continuous-time schedule -----------------------------------------------------------------
def test_discrete_vp_sde_passes_through_the_schedule():
    alphas = _ddpm_alphas_cumprod()
    sde = DiscreteVPSDE(alphas)
    k = torch.arange(1000)
    t = sde.time_of_timestep(k)
    assert torch.equal(t, (k + 1).to(T64) / 1000) and sde.T == 1.0 and sde.prior_std == 1.0
    # the kernel at the knots is diffusers' alpha_bar, and m^2 + s^2 = 1 everywhere
    torch.testing.assert_close(sde.mean_coeff(t) ** 2, alphas.to(T64), rtol=1e-13, atol=0)
    tt = torch.rand(500, dtype=T64, generator=gen(0))
    torch.testing.assert_close(sde.mean_coeff(tt) ** 2 + sde.marginal_std(tt) ** 2, torch.ones_like(tt))
    assert sde.mean_coeff(torch.zeros(1, dtype=T64)) == 1 and sde.marginal_std(torch.zeros(1, dtype=T64)) == 0
    # the exact transition between neighbouring knots is DDPM's step: r^2 = alpha_k, sigma^2 = beta_k
    r, sigma = sde.transition(t[1:], t[1:] - t[:-1])
    betas = 1 - alphas.to(T64)[1:] / alphas.to(T64)[:-1]
    torch.testing.assert_close(r**2, 1 - betas, rtol=1e-12, atol=0)
    torch.testing.assert_close(sigma**2, betas, rtol=1e-8, atol=0)
    # drift and diffusion generate the kernel: d log m/dt = a, d(s^2)/dt = 2 a s^2 + g^2 (inside a segment)
    u, h = (k[:-1].to(T64) + 0.3) / 1000, 1e-6
    tu = torch.stack([u - h, u, u + h])
    log_m, var = sde.mean_coeff(tu).log(), sde.marginal_std(tu) ** 2
    a, g = sde.drift_coef(u), sde.diffusion(u)
    torch.testing.assert_close((log_m[2] - log_m[0]) / (2 * h), a, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close((var[2] - var[0]) / (2 * h), 2 * a * var[1] + g**2, rtol=1e-6, atol=1e-9)
    # its continuous limit is the VP SDE with beta(t) = N * beta_k: beta_min = 0.1, beta_max = 20
    vp = sdediff.VPSDE(0.1, 20.0)
    assert (sde.mean_coeff(tt) - vp.mean_coeff(tt)).abs().max() < 2e-3
    # the fractional timestep inverts time_of_timestep, and clamps outside [0, N-1]
    torch.testing.assert_close(sde.timestep(t), k.to(T64))
    assert sde.timestep(torch.tensor([0.0, 0.0015])).tolist() == [0.0, 0.5]
    assert sde.timestep(torch.tensor([0.0015]), nearest=True).tolist() == [0.0]


def test_exact_likelihood_runs_on_the_discrete_schedule():
    """The probability flow through the piecewise-constant beta(t) gives the exact log-density of p_eps."""
    sde = DiscreteVPSDE(_ddpm_alphas_cumprod())
    x = MIXTURE.sample(32, generator=gen(0), dtype=T64)
    res = sdediff.log_likelihood(sde, MIXTURE.score_fn(sde), x, eps=1e-3)
    assert (res.log_prob - MIXTURE.log_prob(x, sde, 1e-3)).abs().max() < 0.03


def test_discrete_vp_sde_beta_is_continuous_and_positive():
    """The cubic interpolation of log alpha_bar: beta(t) is continuous at the knots (the slopes from both sides agree)
    and positive, and the kernel still passes through the knots; the linear one has a piecewise-constant beta,
    right-continuous at the knots (its value at t_k is the segment after it)."""
    alphas = _ddpm_alphas_cumprod()
    cubic, linear = DiscreteVPSDE(alphas), DiscreteVPSDE(alphas, interpolation="linear")
    knots = torch.arange(1, 1000, dtype=T64) / 1000
    h = 1e-9
    below, at, above = (cubic.diffusion(knots + d) ** 2 for d in (-h, 0.0, h))
    torch.testing.assert_close(below, at, rtol=1e-6, atol=0)
    torch.testing.assert_close(above, at, rtol=1e-6, atol=0)
    fine = torch.linspace(0, 1, 200_001, dtype=T64)
    assert (cubic.diffusion(fine) > 0).all() and (cubic.mean_coeff(fine).diff() < 0).all()
    t = cubic.time_of_timestep(torch.arange(1000))
    torch.testing.assert_close(cubic.mean_coeff(t) ** 2, alphas.to(T64), rtol=1e-13, atol=0)
    torch.testing.assert_close(linear.mean_coeff(t) ** 2, alphas.to(T64), rtol=1e-13, atol=0)
    betas = 1 - alphas.to(T64)[1:] / alphas.to(T64)[:-1]  # beta_k on [t_{k-1}, t_k): at t_{k-1} and just after
    torch.testing.assert_close(linear.diffusion(t[:-1]) ** 2, -1000 * torch.log1p(-betas), rtol=1e-9, atol=0)
    torch.testing.assert_close(linear.diffusion(t[:-1] + 1e-7) ** 2, -1000 * torch.log1p(-betas), rtol=1e-9, atol=0)
    assert sdediff.sdes.sde_from_config(cubic.to_config()).interpolation == "cubic"
    assert sdediff.sdes.sde_from_config(linear.to_config()).interpolation == "linear"
    with pytest.raises(ValueError, match="interpolation"):
        DiscreteVPSDE(alphas, interpolation="spline")


def test_heun_keeps_its_order_on_the_discrete_schedule():
    """Gaussian data, exact flow: Heun in t converges at order 2 on the cubic interpolation (as on sdediff.VPSDE), and
    is far less accurate on the linear one (piecewise-constant beta), most of all on the diffusers timesteps."""
    alphas = _ddpm_alphas_cumprod()
    rates = {}
    for interpolation in ("cubic", "linear"):
        sde = DiscreteVPSDE(alphas, interpolation=interpolation)
        errs = [gaussian_flow_error(sde, "heun", n, "uniform") for n in (25, 50, 100, 200)]
        rates[interpolation] = [math.log2(errs[i] / errs[i + 1]) for i in range(3)]
        print(f"heun on DiscreteVPSDE ({interpolation}): errors {errs}, rates {rates[interpolation]}")
    assert all(abs(r - 2) < 0.1 for r in rates["cubic"]), rates
    assert all(r < 1.0 for r in rates["linear"]), rates
    # the 999 steps between the 1000 timesteps (eps = t_0 = 1e-3): 7.9e-7 against 1.2e-3
    on_knots = {i: gaussian_flow_error(DiscreteVPSDE(alphas, interpolation=i), "heun", 999, "uniform")
                for i in ("cubic", "linear")}
    assert on_knots["cubic"] < 2e-6 and on_knots["linear"] > 500 * on_knots["cubic"], on_knots


def test_discrete_vp_sde_rejects_bad_schedules():
    with pytest.raises(ValueError, match="decreasing"):
        DiscreteVPSDE([0.9, 0.95, 0.5])
    with pytest.raises(ValueError, match=r"open interval \(0, 1\)"):
        DiscreteVPSDE([0.9, 0.5, 0.0])
    with pytest.raises(ValueError, match="1-d"):
        DiscreteVPSDE([0.5])
    with pytest.raises(TypeError, match="alphas_cumprod"):
        DiscreteVPSDE("abc")
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 2\]"):
        DiscreteVPSDE([0.9, 0.5, 0.1]).time_of_timestep([3])


def test_from_diffusers_converts_every_prediction_type():
    """ε-, sample- and v-prediction of the exact posterior give the exact score of a Gaussian mixture."""
    sde = DiscreteVPSDE(_ddpm_alphas_cumprod())
    score = MIXTURE.score_fn(sde)
    x = torch.randn(64, 2, dtype=T64, generator=gen(1))
    t = torch.rand(64, dtype=T64, generator=gen(2)) * 0.99 + 0.005
    true = score(x, t)
    m, s = sde.mean_coeff(t)[:, None], sde.marginal_std(t)[:, None]
    eps = -s * true
    x0 = (x - s * eps) / m
    outputs = {"epsilon": eps, "sample": x0, "v_prediction": m * eps - s * x0}
    for prediction_type, out in outputs.items():
        def model(x_in, timestep, scale=0.0, out=out):  # a diffusers-style network: model(x, timestep, **kwargs)
            torch.testing.assert_close(timestep, sde.timestep(t))
            return (out * scale,)  # what return_dict=False gives
        _, score_fn = from_diffusers(model, alphas_cumprod=_ddpm_alphas_cumprod(), prediction_type=prediction_type,
                                     model_kwargs={"scale": 1.0})
        torch.testing.assert_close(score_fn(x, t), true, rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        from_diffusers(model, alphas_cumprod=_ddpm_alphas_cumprod(), prediction_type="flow")
    with pytest.raises(ValueError, match="timesteps must be one of"):
        from_diffusers(model, alphas_cumprod=_ddpm_alphas_cumprod(), timesteps="round")
    with pytest.raises(ValueError, match="alphas_cumprod"):
        from_diffusers(model)
    with pytest.raises(ValueError, match="shaped like x"):
        DiffusersModel(lambda x, k: torch.cat([x, x], 1))(x, t)


def test_importing_sdediff_interop_does_not_import_diffusers():
    code = ("import sys, sdediff; assert 'sdediff.interop' not in sys.modules; sdediff.interop.diffusers.from_diffusers; "
            "sdediff.interop.kdiffusion.KDiffusionDenoiser; assert 'diffusers' not in sys.modules; "
            "assert not any(name.startswith('k_diffusion') for name in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- diffusers' own sampling loops -----------------------------------------------------------------
@pytest.fixture(scope="module")
def unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)  # diffusers initialises its weights from the global generator
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2).eval()


@pytest.fixture(scope="module")
def unet64(unet):
    return copy.deepcopy(unet).double()


def _diffusers_loop(unet, scheduler, x, **step_kwargs):
    with torch.no_grad():
        for k in scheduler.timesteps:
            x = scheduler.step(unet(x, k).sample, k, x, **step_kwargs).prev_sample
    return x


def _ours(unet, scheduler, solver, x_init=None, generator=None, shape=(2, 3, 8, 8), **options):
    sde, score_fn = from_diffusers(unet, scheduler)
    times, denoise = scheduler_time_grid(scheduler, sde)
    with torch.no_grad():
        return sdediff.sample(sde, score_fn, shape, solver=solver, steps=len(times) - 1, time_grid=times,
                              denoise=denoise, x_init=x_init, generator=generator, **options)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("set_alpha_to_one,spacing", [(True, "leading"), (False, "leading"), (False, "trailing")])
def test_ddim_reproduces_diffusers_ddim_scheduler(unet, prediction_type, set_alpha_to_one, spacing):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, prediction_type=prediction_type,
                              set_alpha_to_one=set_alpha_to_one, timestep_spacing=spacing, steps_offset=1)
    scheduler.set_timesteps(8)
    x_T = torch.randn(2, 3, 8, 8, generator=gen(1))
    ref = _diffusers_loop(unet, scheduler, x_T)
    ours = _ours(unet, scheduler, "ddim", x_init=x_T)
    # float32 on both sides; the random UNet's ε-predictions make DDIM's x̂0 = (x - s ε)/m reach ~200 (m(T) = 0.006),
    # where one float32 ulp is 1.5e-5, hence the small rtol next to atol = 1e-4
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-6)
    assert ref.std() > 0.1


def test_ddim_is_diffusers_ddim_to_float64_rounding(unet):
    """In float64 (model and schedule) the two loops agree to rounding: the same arithmetic, not just a close one."""
    from diffusers import DDIMScheduler

    unet64 = copy.deepcopy(unet).double()
    scheduler = DDIMScheduler(clip_sample=False, timestep_spacing="trailing")
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()  # diffusers keeps them in float32
    scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.double()
    scheduler.set_timesteps(8)
    x_T = torch.randn(2, 3, 8, 8, generator=gen(1), dtype=T64)
    ref = _diffusers_loop(unet64, scheduler, x_T)
    ours = _ours(unet64, scheduler, "ddim", x_init=x_T)
    assert ours.dtype == ref.dtype == T64
    torch.testing.assert_close(ours, ref, atol=0, rtol=1e-10)


def test_ddim_with_eta_matches_diffusers_draw_for_draw(unet):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(clip_sample=False, prediction_type="v_prediction")
    scheduler.set_timesteps(6)
    g = gen(2)
    ref = _diffusers_loop(unet, scheduler, torch.randn(2, 3, 8, 8, generator=g), eta=0.7, generator=g)
    torch.testing.assert_close(_ours(unet, scheduler, "ddim", generator=gen(2), eta=0.7), ref, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("variance_type,solver", [("fixed_small", "ancestral"), ("fixed_large", "ddpm")])
def test_ancestral_reproduces_diffusers_ddpm_scheduler_draw_for_draw(unet, variance_type, solver):
    """Same prior draw and same per-step noise from the same generator: the same samples."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(clip_sample=False, prediction_type="v_prediction", variance_type=variance_type)
    scheduler.set_timesteps(6)
    g = gen(3)
    ref = _diffusers_loop(unet, scheduler, torch.randn(2, 3, 8, 8, generator=g), generator=g)
    torch.testing.assert_close(_ours(unet, scheduler, solver, generator=gen(3)), ref, atol=1e-5, rtol=1e-6)


def test_ancestral_matches_diffusers_ddpm_in_distribution():
    """On a 2-D Gaussian mixture with the exact ε-model, diffusers' DDPM loop (1000 steps) and our ancestral sampler
    on the same timesteps (independent seeds) both give samples indistinguishable from the data distribution."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDPMScheduler(clip_sample=False)
    scheduler.set_timesteps(1000)
    sde = DiscreteVPSDE(scheduler.alphas_cumprod)
    score = MIXTURE.score_fn(sde)

    def eps_model(x, timestep):  # the exact ε-prediction at an integer timestep
        t = sde.time_of_timestep(timestep).to(x).expand(x.shape[0])
        return -sde.marginal_std(t)[:, None] * score(x, t)

    n = 2000
    g = gen(4)
    x = torch.randn(n, 2, dtype=T64, generator=g)
    for k in scheduler.timesteps:
        x = scheduler.step(eps_model(x, k), k, x, generator=g).prev_sample
    ours = _ours(eps_model, scheduler, "ancestral", generator=gen(5), shape=(n, 2), dtype=T64)
    exact = MIXTURE.sample(n, generator=gen(6), dtype=T64)
    floor = noise_floor(lambda k, generator: MIXTURE.sample(k, generator=generator, dtype=T64), n, repeats=8,
                        generator=gen(7)).mean()
    mean_lp = MIXTURE.log_prob(MIXTURE.sample(100_000, generator=gen(8), dtype=T64)).mean()
    for label, samples in (("diffusers DDPM", x), ("sdediff ancestral", ours)):
        sw = sliced_wasserstein(samples, exact, generator=gen(9))
        lp = MIXTURE.log_prob(samples)
        z = (lp.mean() - mean_lp) / (lp.std() / math.sqrt(n))
        assert sw < 2 * floor and abs(z) < 4, f"{label}: sw={sw:.4f} floor={floor:.4f} logp z={z:.2f}"
    assert sliced_wasserstein(x, ours, generator=gen(9)) < 2 * floor


def test_scheduler_time_grid_checks_the_loop(unet):
    from diffusers import DDIMScheduler, DDPMScheduler

    ddpm = DDPMScheduler()
    ddpm.set_timesteps(10)
    times, denoise = scheduler_time_grid(ddpm)
    assert denoise and torch.equal(times, (ddpm.timesteps.to(T64) + 1) / 1000)
    ddim = DDIMScheduler(set_alpha_to_one=False)  # leading spacing ends at timestep 0: the final step is a no-op
    ddim.set_timesteps(10)
    times, denoise = scheduler_time_grid(ddim)
    assert not denoise and len(times) == 10 and float(times[-1]) == 1e-3
    ddim = DDIMScheduler(timestep_spacing="linspace")  # steps to k - 100 but evaluates at k - 111
    ddim.set_timesteps(10)
    with pytest.raises(ValueError, match="not through its own timesteps"):
        scheduler_time_grid(ddim)
    ddpm.set_timesteps(1)
    with pytest.raises(ValueError, match="one-step loop"):
        scheduler_time_grid(ddpm)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler_time_grid(type("S", (), {"alphas_cumprod": ddpm.alphas_cumprod, "timesteps": []})())


def test_ddpm_fixed_large_trailing_adds_noise_to_its_last_step(unet64):
    """Pins the one difference: with a last timestep above 0, diffusers' fixed_large step to alpha_bar = 1 adds
    sqrt(1 - alpha_bar_k) z to x̂0 (variance beta = 1 - alpha_bar_k); sdediff's denoise returns x̂0. The z is the draw
    that follows ours from the same generator (float64 on both sides)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(clip_sample=False, variance_type="fixed_large", timestep_spacing="trailing")
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    scheduler.set_timesteps(5)
    last = int(scheduler.timesteps[-1])
    assert last > 0
    g = gen(3)
    ref = _diffusers_loop(unet64, scheduler, torch.randn(2, 3, 8, 8, generator=g, dtype=T64), generator=g)
    g = gen(3)
    ours = _ours(unet64, scheduler, "ddpm", generator=g, dtype=T64)
    z = torch.randn(2, 3, 8, 8, generator=g, dtype=T64)
    torch.testing.assert_close(ours + (1 - scheduler.alphas_cumprod[last]).sqrt() * z, ref, rtol=1e-10, atol=1e-10)
    assert (ours - ref).abs().max() > 0.1


# --- diffusers' multistep and Heun schedulers, in float64 -------------------------------------------------------
def _sigma(scheduler, k):
    """sqrt((1 - alpha_bar_k) / alpha_bar_k) in float64."""
    ac = scheduler.alphas_cumprod.double()[torch.as_tensor(k).long()]
    return ((1 - ac) / ac).sqrt()


def _float64_loop(monkeypatch, model, scheduler, x, scaled=False):
    """The scheduler's own loop in float64 (``scaled``: the model sees ``scale_model_input``, as for Heun)."""
    monkeypatch.setattr(sys.modules[type(scheduler).__module__], "torch", Float64Torch("torch"))
    with torch.no_grad():
        for k in scheduler.timesteps:
            model_in = scheduler.scale_model_input(x, k) if scaled else x
            x = scheduler.step(model(model_in, k).sample, k, x).prev_sample
    monkeypatch.undo()
    return x


DPM_CASES = [
    # algorithm, solver_type, final_sigmas_type, order, steps, sdediff's lower_order_final
    ("dpmsolver++", "midpoint", "zero", 2, 5, "diffusers"),
    ("dpmsolver++", "midpoint", "zero", 2, 20, "diffusers"),
    ("dpmsolver++", "midpoint", "zero", 1, 8, "diffusers"),
    ("dpmsolver++", "heun", "zero", 2, 5, "diffusers"),
    ("dpmsolver++", "midpoint", "sigma_min", 2, 5, True),
    ("dpmsolver", "midpoint", "sigma_min", 2, 8, True),
]


@pytest.mark.parametrize("algorithm,solver_type,final,order,steps,lower_order_final", DPM_CASES)
def test_dpm_solver_reproduces_diffusers_dpm_solver_multistep(unet64, monkeypatch, algorithm, solver_type, final, order,
                                                              steps, lower_order_final):
    """dpm_solver with the scheduler's solver_type and prediction, on scheduler_time_grid, is the scheduler's default
    loop to float64 rounding: lower_order_final="diffusers" where it ends with the step to sigma = 0, True where it
    ends at alpha_bar_0."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(solver_order=order, algorithm_type=algorithm, solver_type=solver_type,
                                            final_sigmas_type=final)
    scheduler.set_timesteps(steps)
    end = _sigma(scheduler, [0]) if final == "sigma_min" else torch.zeros(1, dtype=T64)
    scheduler.sigmas = torch.cat([_sigma(scheduler, scheduler.timesteps), end])  # float64 levels (diffusers': float32)
    x_T = torch.randn(2, 3, 8, 8, generator=gen(1), dtype=T64)
    ref = _float64_loop(monkeypatch, unet64, scheduler, x_T)
    prediction = "data" if algorithm == "dpmsolver++" else "noise"
    options = dict(order=order, solver_type=solver_type, prediction=prediction)
    ours = _ours(unet64, scheduler, "dpm_solver", x_init=x_T, lower_order_final=lower_order_final, **options)
    scale = float(ref.abs().max())
    print(f"DPMSolverMultistep {algorithm} {solver_type} {final} order {order}, {steps} steps: max |ours - ref| / max |ref| "
          f"= {float((ours - ref).abs().max()) / scale:.1e}")
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12 * scale)
    if order == 2 and steps < 14 and final == "zero":  # sdediff's own rule lowers the last two steps instead
        assert (_ours(unet64, scheduler, "dpm_solver", x_init=x_T, **options) - ref).abs().max() > 1e-6 * scale


def test_edm_heun_reproduces_diffusers_heun_discrete(unet64, monkeypatch):
    """HeunDiscreteScheduler repeats each timestep (two stages per step): scheduler_time_grid takes each once, and
    edm_heun with denoise on it is that loop, in sigma and y = x / m (the model sees scale_model_input(y) = x)."""
    from diffusers import HeunDiscreteScheduler

    scheduler = HeunDiscreteScheduler()
    scheduler.set_timesteps(10)  # linspace(0, 999, 10): integer timesteps
    distinct = scheduler.timesteps.unique_consecutive()
    levels = _sigma(scheduler, distinct)
    scheduler.sigmas = torch.cat([levels[:1], levels[1:].repeat_interleave(2), torch.zeros(1, dtype=T64)])
    times, denoise = scheduler_time_grid(scheduler)
    assert denoise and len(times) == 10 and torch.equal(times, (distinct.to(T64) + 1) / 1000)
    x_T = torch.randn(2, 3, 8, 8, generator=gen(1), dtype=T64)
    ref = _float64_loop(monkeypatch, unet64, scheduler, x_T * (1 + levels[0] ** 2).sqrt(), scaled=True)
    ours = _ours(unet64, scheduler, "edm_heun", x_init=x_T)
    print(f"HeunDiscrete: max |ours - ref| / max |ref| = {float((ours - ref).abs().max() / ref.abs().max()):.1e}")
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()))


def test_scheduler_time_grid_reads_the_last_noise_level_and_refuses_other_sigmas():
    from diffusers import DPMSolverMultistepScheduler, HeunDiscreteScheduler

    zero = DPMSolverMultistepScheduler()
    zero.set_timesteps(10)
    times, denoise = scheduler_time_grid(zero)
    assert denoise and len(times) == 10
    sigma_min = DPMSolverMultistepScheduler(final_sigmas_type="sigma_min")
    sigma_min.set_timesteps(10)
    times, denoise = scheduler_time_grid(sigma_min)  # one more step, to timestep 0 (alpha_bar_0)
    assert not denoise and len(times) == 11 and float(times[-1]) == 1e-3
    torch.testing.assert_close(times[:-1], (sigma_min.timesteps.to(T64) + 1) / 1000, rtol=0, atol=0)
    for scheduler, steps in [(DPMSolverMultistepScheduler(use_karras_sigmas=True), 10), (HeunDiscreteScheduler(), 7)]:
        scheduler.set_timesteps(steps)  # Karras sigmas at rounded timesteps; fractional timesteps (999 * j / 6)
        with pytest.raises(ValueError, match="not those of its timesteps"):
            scheduler_time_grid(scheduler)
    heun = HeunDiscreteScheduler()
    heun.set_timesteps(10)
    times, denoise = scheduler_time_grid(heun)  # repeated timesteps, taken once: a valid grid for sample
    assert denoise and (times.diff() < 0).all() and len(times) == 10


# --- k-diffusion ---------------------------------------------------------------------------------------
def _kdiffusion():
    kds, note = load_sampling()
    if kds is None:
        pytest.skip(note)
    return kds


def _gaussian_ve_denoiser(mean, cov):
    r"""The exact k-diffusion denoiser of N(mean, cov): D(y, σ) = μ + Σ(Σ + σ²I)⁻¹(y - μ)."""
    eye = torch.eye(len(mean), dtype=T64)

    def denoiser(y, sigma):
        gain = cov @ torch.linalg.inv(cov + sigma[:, None, None] ** 2 * eye)  # (batch, d, d)
        return mean + (gain @ (y - mean)[..., None])[..., 0]

    return denoiser


def test_denoiser_and_score_conversions_are_exact():
    vp = sdediff.VPSDE()
    score = MIXTURE.score_fn(vp)
    t = torch.rand(50, dtype=T64, generator=gen(1)) * 0.99 + 0.01
    x = torch.randn(50, 2, dtype=T64, generator=gen(2)) * 3
    m = vp.mean_coeff(t)[:, None]
    denoiser = KDiffusionDenoiser(vp, score)
    torch.testing.assert_close(denoiser.time_of(sigma_of_time(vp, t)), t, rtol=0, atol=1e-12)
    d = denoiser(x / m, sigma_of_time(vp, t))
    torch.testing.assert_close(d, vp.denoise(x, t, score(x, t)), rtol=1e-10, atol=1e-12)
    # and back: the denoiser seen as an sdediff model on the same SDE has the original score
    _, back = from_kdiffusion(denoiser, sde=vp)
    torch.testing.assert_close(back(x, t), score(x, t), rtol=1e-9, atol=1e-9)
    # an analytic VE-form denoiser becomes the exact score of the Gaussian under the VE SDE with its sigma range
    mean, cov = MIXTURE.means[0], MIXTURE.covs[0]
    gaussian = sdediff.data.GaussianMixture([1.0], mean[None], cov[None])
    raw = _gaussian_ve_denoiser(mean, cov)
    raw.sigma_min, raw.sigma_max = 0.01, 50.0
    ve, score_fn = from_kdiffusion(raw)
    assert isinstance(ve, sdediff.VESDE) and (ve.sigma_min, ve.sigma_max) == (0.01, 50.0)
    torch.testing.assert_close(score_fn(x, t), gaussian.score(x, t, ve), rtol=1e-9, atol=1e-9)
    assert denoiser.sigma_max == pytest.approx(float(sigma_of_time(vp, torch.tensor([1.0]))))
    with pytest.raises(ValueError, match="sigma_min and sigma_max"):
        from_kdiffusion(lambda y, sigma: y)
    with pytest.raises(ValueError, match="t_min"):
        KDiffusionDenoiser(vp, score, t_min=1.0)


@pytest.mark.parametrize("kd_name,solver", [("sample_heun", "edm_heun"), ("sample_euler", "ddim")])
def test_kdiffusion_sampler_on_an_sdediff_model_equals_the_sdediff_solver(kd_name, solver):
    """k-diffusion's Heun (Euler) in σ on the sdediff model through the denoiser is sdediff's edm_heun (ddim)."""
    kds = _kdiffusion()
    vp = sdediff.VPSDE()
    score = MIXTURE.score_fn(vp)
    ts = torch.linspace(1.0, 1e-3, 9, dtype=T64)
    x_T = torch.randn(200, 2, dtype=T64, generator=gen(3))
    ours = sdediff.sample(vp, score, x_T.shape, solver=solver, steps=8, time_grid=ts, x_init=x_T)
    m = vp.mean_coeff(ts)
    y = getattr(kds, kd_name)(KDiffusionDenoiser(vp, score), x_T / m[0], sigma_of_time(vp, ts), disable=True)
    torch.testing.assert_close(y * m[-1], ours, rtol=1e-9, atol=1e-9)


def test_sdediff_solver_on_a_kdiffusion_denoiser_equals_the_kdiffusion_sampler():
    """The reverse: a k-diffusion denoiser run by sdediff's edm_heun (+ final denoise) is k-diffusion's Heun to σ = 0."""
    kds = _kdiffusion()
    denoiser = _gaussian_ve_denoiser(MIXTURE.means[1], MIXTURE.covs[1])
    ve, score_fn = from_kdiffusion(denoiser, 0.01, 50.0)
    ts = torch.linspace(1.0, 0.2, 9, dtype=T64)
    x_T = ve.prior_sample((200, 2), generator=gen(4), dtype=T64)
    ours = sdediff.sample(ve, score_fn, x_T.shape, solver="edm_heun", steps=8, time_grid=ts, x_init=x_T, denoise=True)
    sigmas = torch.cat([ve.sigma(ts), torch.zeros(1, dtype=T64)])
    ref = kds.sample_heun(denoiser, x_T, sigmas, disable=True)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_dpm_solver_midpoint_reproduces_kdiffusion_dpmpp_2m(unet64):
    """k-diffusion's sample_dpmpp_2m, on the diffusers UNet through KDiffusionDenoiser (float64, sigmas of an sdediff
    grid and a final 0), is dpm_solver's midpoint form with no lower-order final step and denoise=True."""
    kds = _kdiffusion()
    sde, score_fn = from_diffusers(unet64, alphas_cumprod=_ddpm_alphas_cumprod())
    times = sdediff.solvers.grids.log_snr(sde, 8, 1e-3).to(T64)
    x_T = torch.randn(2, 3, 8, 8, generator=gen(1), dtype=T64)
    with torch.no_grad():
        ours = sdediff.sample(sde, score_fn, x_T.shape, solver="dpm_solver", solver_type="midpoint",
                              lower_order_final=False, steps=8, time_grid=times, x_init=x_T, denoise=True)
        sigmas = torch.cat([sigma_of_time(sde, times), torch.zeros(1, dtype=T64)])
        ref = kds.sample_dpmpp_2m(KDiffusionDenoiser(sde, score_fn), x_T / sde.mean_coeff(times[:1]), sigmas,
                                  disable=True)
    print(f"sample_dpmpp_2m: max |ours - ref| / max |ref| = {float((ours - ref).abs().max() / ref.abs().max()):.1e}")
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()))
