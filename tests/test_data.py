"""Datasets: splits are disjoint and reproducible, synthetic images are a function of the seed."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose
from PIL import Image

from t240dist.config import validate
from t240dist.data import ImageDataModule
from t240dist.errors import ConfigError


def _data(*overrides: str) -> ImageDataModule:
    return ImageDataModule(validate(compose(list(overrides)))["data"])


def test_digits_splits_are_disjoint_standardised_and_fixed_by_split_seed() -> None:
    data = _data()
    sizes = [len(s) for s in (data.train_set, data.val_set, data.test_set)]
    assert sum(sizes) == 1797 and sizes[2] == round(1797 * 0.2)
    flat = [s.images.flatten(1) for s in (data.train_set, data.val_set, data.test_set)]
    assert abs(float(flat[0].mean())) < 1e-4 and float(flat[0].std()) == pytest.approx(1.0, abs=1e-3)
    assert torch.equal(_data().test_set.labels, data.test_set.labels)
    assert not torch.equal(_data("data.split_seed=1").test_set.labels, data.test_set.labels)
    x, y = data.train_set[0]
    assert x.shape == (1, 8, 8) and 0 <= y < 10 and data.info.num_classes == 10


def test_synthetic_images_are_reproducible_by_seed_and_any_shape() -> None:
    args = ("data=synthetic", "data.image_size=20", "data.channels=5", "data.num_classes=3")
    a, b, c = _data(*args), _data(*args), _data(*args, "data.seed=1")
    x, y = a.train_set[7]
    assert x.shape == (5, 20, 20) and 0 <= y < 3
    assert torch.equal(x, b.train_set[7][0]) and not torch.equal(x, c.train_set[7][0])
    assert not torch.equal(a.train_set[0][0], a.val_set[0][0])
    assert a.info.num_classes == 3 and a.info.channels == 5


def test_cifar10_reads_python_batches_and_keeps_class_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), b"labels": list(range(10)) * 2}
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    names = [f"c{i}".encode() for i in range(10)]
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    data = _data("data=cifar10", f"data.root={tmp_path}")
    assert len(data.train_set) + len(data.val_set) == 100 and len(data.test_set) == 20
    assert data.info.class_names == [f"c{i}" for i in range(10)]
    x, _ = data.test_set[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_imagefolder_reads_class_folders(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / split / cls / "a.png")
    data = _data("data=imagefolder", f"data.root={tmp_path}", "data.image_size=16")
    assert data.info.class_names == ["cat", "dog"] and data.test_set is data.val_set
    assert data.train_set[0][0].shape == (3, 16, 16) and data.val_set[1][1] == 1


@pytest.mark.parametrize("name", ["cifar10", "mnist", "imagefolder"])
def test_missing_root_is_a_config_error_naming_the_fix(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match=rf"data.root '{tmp_path}/nope' has no .* — .*pick data=digits"):
        _data(f"data={name}", f"data.root={tmp_path}/nope")


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_reads_idx_files_plain_or_gzip(tmp_path: Path, compress: bool) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 50), ("t10k", 20)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), compress)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte", np.arange(n) % 10, compress)
    data = _data("data=mnist", f"data.root={tmp_path}", "data.val_fraction=0.2")
    assert (len(data.train_set), len(data.val_set), len(data.test_set)) == (40, 10, 20)
    x, y = data.test_set[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == 3
    assert data.info.class_names == [str(d) for d in range(10)] and data.info.image_size == 28


def test_truncated_mnist_file_is_a_config_error(tmp_path: Path) -> None:
    for split, n in (("train", 10), ("t10k", 10)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte", np.zeros((n, 28, 28)), False)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte", np.zeros(n), False)
    images = tmp_path / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(ConfigError, match="t10k-images-idx3-ubyte holds 7740 bytes, its header says 7840"):
        _data("data=mnist", f"data.root={tmp_path}")


def _bad_tree(root: Path) -> None:
    """A tree with one good image per class and each kind of bad or odd file."""
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            Image.new("RGB", (20, 20), (0, 90, 200)).save(root / split / cls / "good.jpg")
    train = root / "train"
    Image.new("CMYK", (20, 20), (10, 20, 30, 40)).save(train / "cat" / "cmyk.jpg")
    Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)).save(train / "cat" / "deep.png")
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(train / "dog" / "truncated.jpg")
    full = (train / "dog" / "truncated.jpg").read_bytes()
    (train / "dog" / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (train / "dog" / "empty.png").write_bytes(b"")
    (train / "dog" / "notes.png").write_text("this is not a picture")
    (train / "bird").mkdir()


def test_bad_files_stop_the_run_with_one_line_naming_them(tmp_path: Path) -> None:
    _bad_tree(tmp_path)
    with pytest.raises(ConfigError) as err:
        _data("data=imagefolder", f"data.root={tmp_path}", "data.image_size=16")
    message = str(err.value)
    assert "has 4 unreadable image(s) or empty class folder(s)" in message and "\n" not in message
    assert message.endswith("— fix or remove them, or set data.on_corrupt=skip")


def test_skip_trains_on_the_rest_and_converts_odd_modes(tmp_path: Path) -> None:
    _bad_tree(tmp_path)
    data = _data("data=imagefolder", f"data.root={tmp_path}", "data.image_size=16", "data.on_corrupt=skip")
    reasons = sorted(line.rsplit(": ", 1)[1] for line in data.info.skipped)
    assert reasons == ["empty class folder", "empty file", "not an image", "truncated JPEG"]
    names = sorted(Path(p).name for p, _ in data.train_set.samples)
    assert names == ["cmyk.jpg", "deep.png", "good.jpg", "good.jpg"]
    deep = next(i for i, (p, _) in enumerate(data.train_set.samples) if p.endswith("deep.png"))
    x, _ = data.val_set[0]
    assert data.train_set[deep][0].shape == x.shape == (3, 16, 16)
    assert data.info.class_names == ["bird", "cat", "dog"]
