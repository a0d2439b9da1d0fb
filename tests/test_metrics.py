"""Sliced 2-Wasserstein distance and its sampling-noise floor against closed-form values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from problems import gen

from sdediff.data import GaussianMixture
from sdediff.metrics import mean_se, noise_floor, sliced_wasserstein


def test_distance_to_itself_and_to_a_permutation_is_zero() -> None:
    x = torch.randn(500, 5, generator=gen(0), dtype=torch.float64)
    assert sliced_wasserstein(x, x, generator=gen(1)) == 0
    shuffled = x[torch.randperm(500, generator=gen(2))]
    assert sliced_wasserstein(x, shuffled, generator=gen(1)) < 1e-12


def test_one_dimensional_unequal_sizes_by_hand() -> None:
    # Quantiles of {0, 1} and {0, 1, 2} differ by 1 on (1/3, 1/2] and (2/3, 1]: W2^2 = 1/6 + 1/3 = 1/2.
    x = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    y = torch.tensor([[2.0], [0.0], [1.0]], dtype=torch.float64)
    torch.testing.assert_close(sliced_wasserstein(x, y, n_projections=3, generator=gen(3)),
                               torch.tensor(math.sqrt(0.5), dtype=torch.float64), rtol=1e-14, atol=0)


@pytest.mark.parametrize(("n", "m"), [(7, 5), (12, 8), (3, 10)])
def test_unequal_sizes_equal_replicated_equal_sizes(n: int, m: int) -> None:
    # Empirical measures are unchanged by repeating every point: W2 of (n, m) sets equals that of
    # (nm, nm) sets, where it is the root mean squared difference of the sorted values.
    x = torch.randn(n, 1, generator=gen(4), dtype=torch.float64)
    y = torch.randn(m, 1, generator=gen(5), dtype=torch.float64) + 0.5
    xs = np.sort(np.repeat(x.numpy().ravel(), m))
    ys = np.sort(np.repeat(y.numpy().ravel(), n))
    expected = math.sqrt(np.mean((xs - ys) ** 2))
    value = sliced_wasserstein(x, y, n_projections=4, generator=gen(6)).item()
    assert value == pytest.approx(expected, rel=1e-12)
    assert sliced_wasserstein(x, torch.cat([x, x, x]), generator=gen(6)) < 1e-12


def test_shift_gives_norm_over_sqrt_dim() -> None:
    d, n = 4, 5000
    shift = torch.tensor([2.0, -1.0, 3.0, 0.5], dtype=torch.float64)
    x = torch.randn(n, d, generator=gen(7), dtype=torch.float64)
    y = torch.randn(n, d, generator=gen(8), dtype=torch.float64) + shift
    value = sliced_wasserstein(x, y, n_projections=1000, generator=gen(9)).item()
    assert value == pytest.approx(shift.norm().item() / math.sqrt(d), rel=0.04)


def test_exact_shift_of_the_same_points() -> None:
    # y = x + delta: each projected quantile moves by u^T delta, so SW2^2 is the mean of (u^T delta)^2.
    x = torch.randn(300, 3, generator=gen(10), dtype=torch.float64)
    delta = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)
    value = sliced_wasserstein(x, x + delta, n_projections=4000, generator=gen(11)).item()
    assert value == pytest.approx(3.0 / math.sqrt(3.0), rel=0.03)


def test_scale_equivariance_determinism_and_event_shapes() -> None:
    x = torch.randn(200, 2, 3, generator=gen(12), dtype=torch.float64)
    y = torch.randn(150, 2, 3, generator=gen(13), dtype=torch.float64) * 1.5
    base = sliced_wasserstein(x, y, generator=gen(14))
    assert base.shape == () and base > 0
    torch.testing.assert_close(sliced_wasserstein(x, y, generator=gen(14)), base, rtol=0, atol=0)
    torch.testing.assert_close(sliced_wasserstein(2.5 * x, 2.5 * y, generator=gen(14)), 2.5 * base)
    flat = sliced_wasserstein(x.reshape(200, 6), y.reshape(150, 6), generator=gen(14))
    torch.testing.assert_close(flat, base)
    value32 = sliced_wasserstein(x.float(), y.float(), generator=gen(14))
    assert value32.dtype == torch.float32
    assert value32.item() == pytest.approx(base.item(), rel=1e-5)


def test_noise_floor_is_positive_and_shrinks_like_inverse_sqrt_n() -> None:
    gm = GaussianMixture.random(3, 2, generator=gen(15))
    small = noise_floor(gm.sample, 250, repeats=8, n_projections=64, generator=gen(16))
    large = noise_floor(gm.sample, 4000, repeats=8, n_projections=64, generator=gen(17))
    assert small.shape == (8,) and large.shape == (8,)
    assert (small > 0).all() and (large > 0).all()
    ratio = (small.mean() / large.mean()).item()
    assert 2.5 < ratio < 6.5  # sqrt(4000 / 250) = 4


def test_noise_floor_is_reproducible() -> None:
    gm = GaussianMixture.ring()
    a = noise_floor(gm.sample, 100, repeats=3, generator=gen(18))
    b = noise_floor(gm.sample, 100, repeats=3, generator=gen(18))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_invalid_inputs_raise() -> None:
    x = torch.zeros(10, 3)
    with pytest.raises(ValueError, match="features"):
        sliced_wasserstein(x, torch.zeros(10, 4))
    with pytest.raises(ValueError, match="y must have shape"):
        sliced_wasserstein(x, torch.zeros(0, 3))
    with pytest.raises(TypeError, match="x must be"):
        sliced_wasserstein(np.zeros((10, 3)), x)
    with pytest.raises(ValueError, match="n_projections"):
        sliced_wasserstein(x, x, n_projections=0)
    gm = GaussianMixture.ring()
    with pytest.raises(ValueError, match="repeats"):
        noise_floor(gm.sample, 10, repeats=0)
    with pytest.raises(ValueError, match="n must be"):
        noise_floor(gm.sample, 0)
    with pytest.raises(TypeError, match="sampler"):
        noise_floor(None, 10)


def test_mean_se_by_hand() -> None:
    # values 1, 2, 3, 6: mean 3, unbiased variance (4 + 1 + 0 + 9) / 3 = 14/3, se = sqrt(14/3 / 4)
    mean, se = mean_se(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    assert mean == 3.0 and se == pytest.approx(math.sqrt(14 / 12), rel=1e-12)
    assert mean_se(torch.tensor([2.5]))[0] == 2.5 and math.isnan(mean_se(torch.tensor([2.5]))[1])
    with pytest.raises(ValueError, match="values"):
        mean_se(torch.ones(2, 2))
