"""Datasets: splits are disjoint and reproducible, synthetic images are a function of the seed."""

from __future__ import annotations

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


@pytest.mark.parametrize("name", ["cifar10", "imagefolder"])
def test_missing_root_is_a_config_error_naming_the_fix(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match=rf"data.root '{tmp_path}/nope' has no .* — .*pick data=digits"):
        _data(f"data={name}", f"data.root={tmp_path}/nope")
