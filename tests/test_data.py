"""Toy 2-D data sets and the 8×8 digits: shapes, scale, reproducibility, the fixed split, dequantisation."""

import math
import sys

import pytest
import torch
from problems import gen

import sdediff
from sdediff.data import digits as dg
from sdediff.data import toy_mixture
from sdediff.data.toy import TOY_DATASETS, make_toy, sample_toy


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toy_sets_are_2d_unit_scale_and_reproducible(name):
    x = make_toy(name, 20000, gen(0))
    assert x.shape == (20000, 2) and x.dtype == torch.get_default_dtype() and torch.isfinite(x).all()
    assert float(x.mean(0).abs().max()) < 0.1
    assert 0.85 < float(x.std(0).min()) and float(x.std(0).max()) < 1.15
    assert torch.equal(make_toy(name, 100, gen(1)), make_toy(name, 100, gen(1)))
    assert not torch.equal(make_toy(name, 100, gen(1)), make_toy(name, 100, gen(2)))
    x64 = sample_toy(name, 100, gen(1), dtype=torch.float64)
    torch.testing.assert_close(x64.float(), make_toy(name, 100, gen(1)))  # same draws in any dtype


def test_checkerboard_fills_only_dark_squares():
    x = make_toy("checkerboard", 5000, gen(3), dtype=torch.float64)
    cells = torch.floor(x * 1.15 + 2).long()
    assert cells.min() >= 0 and cells.max() <= 3
    assert bool(((cells[:, 0] + cells[:, 1]) % 2 == 0).all())
    counts = torch.bincount(cells[:, 1] * 4 + cells[:, 0], minlength=16)
    assert int((counts > 0).sum()) == 8 and counts[counts > 0].min() > 500


def test_rings_and_mixture():
    r = make_toy("rings", 4000, gen(4), dtype=torch.float64).norm(dim=1) * 1.95
    assert float(((r - r.round()).abs() < 0.4).double().mean()) > 0.99 and set(r.round().long().tolist()) == {1, 2, 3, 4}
    x = make_toy("gaussian_mixture", 50, gen(5), dtype=torch.float64)
    torch.testing.assert_close(x, toy_mixture().sample(50, generator=gen(5), dtype=torch.float64))


def test_toy_errors():
    with pytest.raises(ValueError, match="moons"):
        make_toy("spirals", 10)
    with pytest.raises(ValueError, match="n must"):
        make_toy("moons", 0)
    with pytest.raises(TypeError, match="dtype"):
        make_toy("moons", 3, dtype=torch.int64)


# --- digits --------------------------------------------------------------------------------------------
def test_digits_fixed_split():
    pytest.importorskip("sklearn")
    train, y_train = dg.load_digits("train")
    test, y_test = dg.load_digits("test")
    full, y_full = dg.load_digits("all")
    assert train.shape == (1438, 1, 8, 8) and test.shape == (359, 1, 8, 8) and full.shape == (1797, 1, 8, 8)
    assert train.dtype == torch.uint8 and y_train.dtype == torch.long
    assert int(full.max()) == 16 and int(full.min()) == 0 and len(full.unique()) == 17
    assert int(full.long().sum()) == 561718  # the bundled data set itself
    train_idx, test_idx = dg.split_indices(y_full)
    assert int(test_idx.sum()) == 320544 and test_idx[:6].tolist() == [0, 5, 10, 13, 18, 26]  # pinned split
    assert len(set(train_idx.tolist()) | set(test_idx.tolist())) == 1797 and not set(train_idx.tolist()) & set(test_idx.tolist())
    assert torch.equal(full[test_idx], test) and torch.equal(y_full[train_idx], y_train)
    counts = torch.bincount(y_test, minlength=10)
    assert int(counts.min()) >= 34 and int(counts.max()) <= 37  # stratified 20 %
    assert dg.load_digits("test", flatten=True)[0].shape == (359, 64)
    with pytest.raises(ValueError, match="split"):
        dg.load_digits("valid")


def test_digits_without_scikit_learn_says_how_to_install(monkeypatch):
    dg._raw.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    try:
        with pytest.raises(ImportError, match=r"pip install 'sdediff\[data\]'"):
            dg.load_digits()
    finally:
        dg._raw.cache_clear()


def test_digit_levels_map_to_their_own_bins():
    k = torch.arange(17, dtype=torch.uint8).repeat(200)
    x = dg.digits_to_model(k, gen(6))
    assert x.dtype == torch.get_default_dtype() and float(x.min()) >= -1 and float(x.max()) < 1
    assert torch.equal(dg.model_to_digits(x), k)
    centres = dg.digits_to_model(k, dequantize=False, dtype=torch.float64)
    torch.testing.assert_close(centres, -1 + 2 * (k.double() + 0.5) / 17)
    assert torch.equal(dg.model_to_digits(centres), k)
    # u ~ U(0, 1): the in-bin offsets are uniform
    u = (x.double() + 1) * 17 / 2 - k.double()
    assert abs(float(u.mean()) - 0.5) < 0.02 and 0 <= float(u.min()) and float(u.max()) < 1
    with pytest.raises(ValueError, match=r"\[0, 16\]"):
        dg.digits_to_model(torch.tensor([17]))


def test_levels_generalise_the_library_bit_depth_versions():
    k = torch.randint(16, (50, 4), generator=gen(7))
    torch.testing.assert_close(dg.dequantize_levels(k, 16, generator=gen(8)), sdediff.dequantize(k, bits=4, generator=gen(8)),
                               rtol=0, atol=0)
    lp = -torch.rand(5, generator=gen(9)) * 100
    # the same formula in another order of operations: equal to float32 rounding
    torch.testing.assert_close(dg.bits_per_dim_levels(lp, 64, 256), sdediff.bits_per_dim(lp, 64, bits=8), rtol=1e-6, atol=0)
    # the uniform density on [-1, 1]^64 codes 17 levels in log2(17) bits per dimension
    uniform = torch.tensor([-64 * math.log(2.0)])
    torch.testing.assert_close(dg.digits_bits_per_dim(uniform), torch.tensor([math.log2(17)]))
    with pytest.raises(ValueError, match="levels"):
        dg.dequantize_levels(k, 1)


def test_toy_labels_come_from_the_same_draws():
    """make_toy(..., return_labels=True) gives the same points as without labels, and the labels mean what the
    module says: the lower moon, the ring index, the dark square, the mixture component."""
    from sdediff.data import TOY_CLASSES, make_toy, toy_mixture

    for name, k in TOY_CLASSES.items():
        x = make_toy(name, 3000, torch.Generator().manual_seed(3), dtype=torch.float64)
        y_pts, y = make_toy(name, 3000, torch.Generator().manual_seed(3), dtype=torch.float64, return_labels=True)
        assert torch.equal(x, y_pts) and y.dtype == torch.int64 and set(y.unique().tolist()) == set(range(k)), name
    x, y = make_toy("moons", 3000, torch.Generator().manual_seed(4), return_labels=True)
    assert x[y == 1, 1].mean() < x[y == 0, 1].mean() - 0.5  # the lower half circle
    x, y = make_toy("rings", 3000, torch.Generator().manual_seed(4), dtype=torch.float64, return_labels=True)
    assert ((x.norm(dim=1) * 1.95 - (1 + y)).abs() < 0.5).all()
    x, y = make_toy("checkerboard", 3000, torch.Generator().manual_seed(4), dtype=torch.float64, return_labels=True)
    col, row = (x * 1.15 + 2).floor().long().unbind(1)
    assert torch.equal(y, 2 * row + col // 2)
    x, y = make_toy("gaussian_mixture", 3000, torch.Generator().manual_seed(4), dtype=torch.float64, return_labels=True)
    nearest = torch.cdist(x, toy_mixture().means.to(x)).argmin(1)
    assert (nearest == y).double().mean() > 0.99
    with pytest.raises(ValueError, match="no class labels"):
        make_toy("swiss_roll", 10, return_labels=True)
