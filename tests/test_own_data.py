"""Your own data through the command line: a folder of PNGs and an .npy array trained, sampled and scored by
``sdediff train/sample/likelihood``, the dataset record in run.json, and one-line errors for bad data."""

import json
import math

import numpy as np
import pytest
import torch

import sdediff
from sdediff import cli
from sdediff.data.record import DatasetRecord
from sdediff.distributed import chunk_generator

PIL = pytest.importorskip("PIL.Image")

TINY = ["--steps", "3", "--batch-size", "4", "--eval-samples", "4", "--eval-sample-steps", "2", "--eval-nll-points",
        "2", "--no-progress"]


def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def write_pngs(folder, sizes=((8, 8),) * 6, classes=("cats", "dogs"), seed=0):
    """Greyscale PNGs in class subfolders: noise, with the top half white for the second class."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        (folder / name).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            pixels = rng.integers(0, 256, (h, w), dtype=np.uint8)
            if k == 1:
                pixels[: h // 2] = 255
            PIL.fromarray(pixels).save(folder / name / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    images = write_pngs(root / "images")
    out = root / "run"
    assert run("train", "--data", images, "--out", out, "--base-channels", "8", "--split", "0.25", "--class-cond",
               "--hflip", "--classifier-steps", "5", *TINY) == 0
    return images, out


@pytest.fixture(scope="module")
def array_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("own_array")
    x = np.random.default_rng(1).normal(size=(40, 3)) * 5 + 2  # continuous, far from [-1, 1]
    np.save(root / "x.npy", x)
    out = root / "run"
    assert run("train", "--data", root / "x.npy", "--out", out, "--hidden", "16", "--depth", "1", *TINY) == 0
    return root, x, out


def test_image_run_records_its_data(image_run):
    images, out = image_run
    doc = json.loads((out / "run.json").read_text())
    d = doc["dataset"]
    assert d["kind"] == "folder" and d["source"] == str(images.resolve()) and d["shape"] == [1, 8, 8]
    assert d["transform"] == {"low": 0, "high": 255, "levels": 256} and d["bit_depth"] == 8
    assert (d["split"], d["split_seed"], d["n_train"], d["n_held_out"]) == (0.25, 0, 9, 3)
    assert d["class_names"] == ["cats", "dogs"]
    assert doc["model"]["class"] == "UNet" and "unet_config" in doc["model"]["choice"]
    assert doc["model"]["config"]["num_classes"] == 2 and doc["classifier"]["steps"] == 5
    for name in ("split.safetensors", "classifier.safetensors", "samples.png", "config.toml"):
        assert (out / name).is_file(), name
    loaded = sdediff.load_run(out)
    assert loaded.dataset == DatasetRecord.from_dict(d) and loaded.dataset.num_classes == 2
    assert DatasetRecord.from_dict(loaded.dataset.to_dict()) == loaded.dataset
    final = json.loads((out / "metrics.json").read_text())["evals"][-1]
    assert final["bits_per_dim"] == pytest.approx(final["nll"] / (64 * math.log(2)) + 7)  # 8 bits on [-1, 1]


def test_image_samples_grid_in_data_levels(image_run, tmp_path, capsys):
    _, out = image_run
    path = tmp_path / "s.safetensors"
    assert run("sample", "--run", out, "--steps", "2", "--n", "6", "--classes", "0", "1", "--out", path,
               "--no-progress") == 0
    from safetensors.torch import load_file

    x = load_file(str(path))["samples"]
    assert x.shape == (6, 1, 8, 8) and bool(torch.isfinite(x).all())
    grid = np.asarray(PIL.open(path.with_suffix(".png")))
    assert grid.shape == (4 * (1 + 2 * 9), 4 * (1 + 3 * 9))  # two rows (classes) of three 8x8 tiles, drawn 4x
    levels = torch.floor((x.double() + 1) * 128).clamp(0, 255).to(torch.uint8).numpy()  # the bins of 256 levels
    for i in range(6):
        r, c = divmod(i, 3)
        tile = grid[4 * (1 + 9 * r):4 * (9 + 9 * r):4, 4 * (1 + 9 * c):4 * (9 + 9 * c):4]
        np.testing.assert_array_equal(tile, levels[i, 0])
    doc = json.loads(path.with_suffix(".json").read_text())
    scores = doc["features"]
    assert "not FID" in scores["note"] and "not FID" in capsys.readouterr().out
    assert scores["n_samples"] == 6 and scores["n_held_out"] == 3 and scores["floor"]["n"] == 6
    for part in (scores, scores["floor"]):
        assert math.isfinite(part["frechet"]) and part["frechet"] >= 0 and math.isfinite(part["kernel"])
        assert 1 <= part["score"] <= 2 and 0 <= part["balance"] <= 1 and 0.5 <= part["confidence"] <= 1
        assert sum(part["class_fractions"]) == pytest.approx(1)
    assert 0 <= scores["class_accuracy"] <= 1


def test_fid_needs_pytorch_fid_installed(image_run, tmp_path, capsys):
    _, out = image_run
    status = run("sample", "--run", out, "--steps", "2", "--n", "4", "--fid", "--out", tmp_path / "f.npy",
                 "--no-progress")
    err = capsys.readouterr().err
    try:
        import pytorch_fid  # noqa: F401
    except ImportError:
        assert status == 2 and "--fid needs pytorch-fid" in err and "never downloads" in err
        assert not (tmp_path / "f.npy").exists()
    else:  # installed: FID where its weights are on disk, else the same one-line refusal
        assert status == 0 or "weights are not at" in err


def test_image_likelihood_in_bits_per_dim(image_run, tmp_path):
    _, out = image_run
    path = tmp_path / "l.json"
    assert run("likelihood", "--run", out, "--rtol", "1e-2", "--atol", "1e-2", "--bound-times", "2", "--probes", "2",
               "--out", path, "--no-progress") == 0
    doc = json.loads(path.read_text())
    assert doc["n"] == 3 and doc["trace"] == "hutchinson"  # the recorded held-out split; 64 dims
    assert doc["bits_per_dim"] == pytest.approx(doc["nll"] / (64 * math.log(2)) + 7)
    assert math.isfinite(doc["bits_per_dim_se"]) and doc["bits_per_dim_se"] > 0
    assert math.isfinite(doc["bits_per_dim_probe_se"])
    assert doc["bits_per_dim_bound"] == pytest.approx(doc["nll_bound"] / (64 * math.log(2)) + 7)
    assert math.isfinite(doc["bits_per_dim_bound_se"])


def test_array_samples_and_likelihood_in_data_units(array_run, tmp_path):
    root, x, out = array_run
    loaded = sdediff.load_run(out)
    d = loaded.dataset
    assert d.kind == "array" and d.shape == (3,) and d.transform.levels is None and loaded.dataset.n_held_out == 4
    from safetensors.torch import load_file

    train = x[load_file(str(out / "split.safetensors"))["train_indices"].numpy()]
    low, high = train.min(), train.max()
    assert (d.transform.low, d.transform.high) == pytest.approx((low, high))
    path = tmp_path / "s.npy"
    assert run("sample", "--run", out, "--steps", "2", "--n", "5", "--seed", "3", "--out", path, "--no-progress") == 0
    y = np.load(path)
    with torch.no_grad():  # the same draws by hand, on the model's scale
        model = sdediff.sample(loaded.sde, loaded.score, (5, 3), solver="heun", steps=2, eps=1e-3,
                               generator=chunk_generator(3, 0, torch.device("cpu")))
    np.testing.assert_allclose(y, (low + high) / 2 + (high - low) / 2 * model.numpy(), rtol=1e-5, atol=1e-4)
    lik = tmp_path / "l.json"
    assert run("likelihood", "--run", out, "--rtol", "1e-3", "--atol", "1e-3", "--bound-times", "2", "--out", lik,
               "--no-progress") == 0
    doc = json.loads(lik.read_text())
    jacobian = 3 * math.log((high - low) / 2)  # -log p_y(y) = -log p_x(x) + D log s
    assert doc["n"] == 4 and doc["trace"] == "exact"
    assert doc["nll_data_units"] == pytest.approx(doc["nll"] + jacobian)
    assert doc["nll_bound_data_units"] == pytest.approx(doc["nll_bound"] + jacobian)


def test_older_toy_record_still_loads(tmp_path):
    out = tmp_path / "moons"
    assert run("train", "--data", "moons", "--out", out, "--steps", "2", "--batch-size", "8", "--n-train", "64",
               "--hidden", "8", "--depth", "1", "--eval-samples", "0", "--eval-nll-points", "0", "--no-plot",
               "--no-progress") == 0
    doc = json.loads((out / "run.json").read_text())
    assert doc["dataset"]["kind"] == "toy"
    del doc["dataset"]  # as written before the dataset record existed
    (out / "run.json").write_text(json.dumps(doc))
    loaded = sdediff.load_run(out)
    assert loaded.dataset.kind == "toy" and loaded.dataset.source == "moons" and loaded.dataset.n_train == 64
    assert run("train", "--data", "moons", "--out", out, "--steps", "3", "--batch-size", "8", "--n-train", "64",
               "--hidden", "8", "--depth", "1", "--eval-samples", "0", "--eval-nll-points", "0", "--no-plot",
               "--no-progress", "--resume") == 0


def bad_folder(tmp_path, kind):
    folder = tmp_path / kind
    folder.mkdir()
    if kind == "sizes":
        write_pngs(folder, sizes=((8, 8), (8, 6)))
    elif kind == "unreadable":
        write_pngs(folder)
        (folder / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return folder


@pytest.mark.parametrize("case, message", [
    ("empty", "is empty"),
    ("sizes", "images differ in size"),
    ("unreadable", "cannot read image"),
    ("nonfinite", "non-finite values"),
    ("one", "has 1 sample(s)"),
    ("unlabelled", "--class-cond needs labelled data"),
    ("hflip", "--hflip flips images"),
])
def test_bad_data_is_one_line(tmp_path, capsys, case, message):
    extra = []
    if case in ("empty", "sizes", "unreadable"):
        data = bad_folder(tmp_path, case)
    else:
        data = tmp_path / "x.npy"
        values = {"nonfinite": np.array([[0.0, 1.0], [np.nan, 2.0], [3.0, 4.0]]), "one": np.zeros((1, 4))}
        np.save(data, values.get(case, np.arange(20.0).reshape(10, 2)))
        extra = {"unlabelled": ["--class-cond"], "hflip": ["--hflip"]}.get(case, [])
    assert run("train", "--data", data, "--out", tmp_path / "run", *extra, *TINY) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("sdediff train: error:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err
    if case == "sizes":
        assert "--image-size" in lines[0]
    if case == "unreadable":
        assert "broken.png" in lines[0]


def test_torchvision_set_not_on_disk(tmp_path, capsys):
    status = run("train", "--data", "torchvision:MNIST", "--data-root", tmp_path, "--out", tmp_path / "run", *TINY)
    err = capsys.readouterr().err
    assert "Traceback" not in err and len([line for line in err.splitlines() if "error:" in line]) == 1
    try:
        import torchvision  # noqa: F401
    except ImportError:
        assert status == 1 and "needs torchvision" in err
    else:
        assert status == 2 and "not found under" in err and "never downloads" in err


def test_builtin_sets_refuse_data_options(tmp_path, capsys):
    assert run("train", "--data", "digits", "--split", "0.2", "--out", tmp_path / "run") == 2
    assert "--split applies to images" in capsys.readouterr().err


def test_train_transform_dequantises_then_flips_half():
    from sdediff.cli.data import TrainTransform
    from sdediff.data import ValueTransform

    values = ValueTransform.bits(8)
    k = torch.randint(0, 256, (2000, 1, 2, 3), generator=torch.Generator().manual_seed(0))
    k[:, :, :, 0] = 0  # left column black, right column white: a flip is visible in every image
    k[:, :, :, 2] = 255
    x = values.to_model(k, torch.float32)
    y = TrainTransform(values, hflip=True)(x, torch.Generator().manual_seed(1))
    levels = values.to_data(y)
    flipped = (levels == k.flip(-1)).flatten(1).all(1)
    assert bool((flipped | (levels == k).flatten(1).all(1)).all())  # each image as it was or mirrored, same bins
    assert abs(flipped.double().mean().item() - 0.5) < 0.05  # 2000 fair coins: sd 0.011
    assert not torch.equal(y, values.to_model(levels, torch.float32))  # spread within the bins, not bin centres
    assert torch.equal(TrainTransform(values, hflip=False)(x, torch.Generator().manual_seed(1)),
                       values.dequantize(x, torch.Generator().manual_seed(1)))


def test_split_zero_is_refused(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.arange(20.0).reshape(10, 2))
    assert run("train", "--data", tmp_path / "x.npy", "--split", "0", "--out", tmp_path / "run") == 2
    assert "--split must be above 0" in capsys.readouterr().err


def test_changed_source_is_refused(tmp_path, capsys):
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(2).normal(size=(30, 2)))
    out = tmp_path / "run"
    assert run("train", "--data", data, "--out", out, "--hidden", "8", "--depth", "1", "--steps", "2", "--batch-size",
               "8", "--eval-samples", "0", "--eval-nll-points", "0", "--no-plot", "--no-progress") == 0
    assert run("likelihood", "--run", out, "--n", "2", "--no-bound", "--out", tmp_path / "a.json") == 0
    np.save(data, np.random.default_rng(3).normal(size=(31, 2)))  # another sample count: another split
    assert run("likelihood", "--run", out, "--n", "2", "--no-bound", "--out", tmp_path / "b.json") == 2
    assert "has changed since" in capsys.readouterr().err and not (tmp_path / "b.json").exists()
