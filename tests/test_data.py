"""Datasets: splits are disjoint and reproducible, synthetic images are a function of the seed; batches made
where the images are held (data.on_gpu, here on the CPU) match the DataLoader's and resume exactly."""

from __future__ import annotations

import importlib
import multiprocessing
import pickle
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose, crop_cases, crop_info, decoded_both_ways, run_cli, torchvision_crop
from datasets_on_disk import (
    JPEG_FLAVOURS,
    write_bad_tree,
    write_cifar,
    write_field_tree,
    write_garbled_jpeg,
    write_image_tree,
    write_jpeg_flavours,
    write_mnist,
)
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_jpeg

from t240dist.config import validate
from t240dist.data import (
    FIT,
    BatchAugment,
    DeviceBatches,
    FileImage,
    ImageDataModule,
    _crop_resize_each,
    _crop_resizer,
    _kernel_failure,
    load_rgb,
)
from t240dist.errors import ConfigError


def _data(*overrides: str) -> ImageDataModule:
    return ImageDataModule(validate(compose(list(overrides)))["data"], seed=0)


def test_digits_splits_are_disjoint_standardised_and_fixed_by_split_seed() -> None:
    data = _data()
    sizes = [len(s) for s in (data.train_set, data.val_set, data.test_set)]
    assert sum(sizes) == 1797 and sizes[2] == round(1797 * 0.2)
    train = torch.stack([data.train_set[i][0] for i in range(sizes[0])])  # as the model sees them
    assert abs(float(train.mean())) < 1e-4 and float(train.std()) == pytest.approx(1.0, abs=1e-3)
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
    write_cifar(tmp_path)
    data = _data("data=cifar10", f"data.root={tmp_path}")
    assert len(data.train_set) + len(data.val_set) == 100 and len(data.test_set) == 20
    assert data.info.class_names == [f"c{i}" for i in range(10)]
    x, _ = data.test_set[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_imagefolder_reads_class_folders(tmp_path: Path) -> None:
    write_image_tree(tmp_path, per_class=1)
    data = _data("data=imagefolder", f"data.root={tmp_path}", "data.image_size=16")
    assert data.info.class_names == ["cat", "dog"] and data.test_set is data.val_set
    assert data.train_set[0][0].shape == (3, 16, 16) and data.val_set[1][1] == 1


@pytest.mark.parametrize("name", ["cifar10", "mnist", "imagefolder"])
def test_missing_root_is_a_config_error_naming_the_fix(tmp_path: Path, name: str) -> None:
    with pytest.raises(
        ConfigError, match=rf"data.root '{tmp_path}/nope' does not exist — .*pick data=digits"
    ):
        _data(f"data={name}", f"data.root={tmp_path}/nope")
    (tmp_path / "empty").mkdir()  # there, but without class folders
    with pytest.raises(ConfigError, match=rf"data.root '{tmp_path}/empty' has no .* — .*pick data=digits"):
        _data(f"data={name}", f"data.root={tmp_path}/empty")


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_reads_idx_files_plain_or_gzip(tmp_path: Path, compress: bool) -> None:
    write_mnist(tmp_path, compress)
    data = _data("data=mnist", f"data.root={tmp_path}", "data.val_fraction=0.2")
    assert (len(data.train_set), len(data.val_set), len(data.test_set)) == (40, 10, 20)
    x, y = data.test_set[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == 3
    assert data.info.class_names == [str(d) for d in range(10)] and data.info.image_size == 28


@pytest.mark.parametrize(
    ("name", "files", "root"),
    [
        ("cifar10", "cifar-10-batches-py", "."),  # torchvision.datasets.CIFAR10(root, download=True)
        ("mnist", "MNIST/raw", "."),  # torchvision.datasets.MNIST(root, download=True)
        ("mnist", "MNIST/raw", "MNIST"),
    ],
)
def test_torchvision_download_layouts_are_found_under_the_root(
    tmp_path: Path, name: str, files: str, root: str
) -> None:
    (tmp_path / files).mkdir(parents=True)
    write_cifar(tmp_path / files) if name == "cifar10" else write_mnist(tmp_path / files, compress=True)
    found = _data(f"data={name}", f"data.root={tmp_path / root}", "data.val_fraction=0.2")
    direct = _data(f"data={name}", f"data.root={tmp_path / files}", "data.val_fraction=0.2")
    assert torch.equal(found.test_set.images, direct.test_set.images)
    assert found.info == direct.info and len(found.train_set) == len(direct.train_set) > 0


def test_a_quoted_home_relative_root_is_read_from_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "HOME", str(tmp_path)
    )  # what the one-line error for an unquoted ~ tells a user to type
    (tmp_path / "cifar").mkdir()
    write_cifar(tmp_path / "cifar")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "last.ckpt").write_bytes(b"")  # validation only looks for the file
    conf = validate(compose(["data=cifar10", 'data.root="~/cifar"', 'resume="~/runs/last.ckpt"']))
    assert conf["data"]["root"] == str(tmp_path / "cifar") and conf["resume"] == str(
        tmp_path / "runs/last.ckpt"
    )
    assert len(ImageDataModule(conf["data"], seed=0).train_set) > 0


def test_truncated_mnist_file_is_a_config_error(tmp_path: Path) -> None:
    write_mnist(tmp_path, compress=False)
    images = tmp_path / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(ConfigError, match="t10k-images-idx3-ubyte holds 15580 bytes, its header says 15680"):
        _data("data=mnist", f"data.root={tmp_path}")


@pytest.mark.parametrize("seed", range(6))
def test_every_split_labels_a_file_by_the_training_splits_classes_and_hidden_entries_are_not_data(
    tmp_path: Path, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    classes = ["ant", "bee", "cat", "dog", "eel"]
    for split in ("train", "val", "test"):  # each evaluation split lacks some classes, a different set each
        present = (
            classes if split == "train" else sorted(rng.choice(classes, rng.integers(1, 5), replace=False))
        )
        for name in [*present, ".ipynb_checkpoints"]:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (12, 10), tuple(rng.integers(0, 256, 3).tolist())).save(
                tmp_path / split / name / "a.png"
            )
        (tmp_path / split / present[0] / "._a.png").write_bytes(b"\0\5\x16\7 macOS resource fork")
    for decode in ("workers", "device"):
        data = _data(
            "data=imagefolder", f"data.root={tmp_path}", "data.image_size=8", f"data.decode={decode}"
        )
        assert data.info.class_names == classes
        for split in (data.train_set, data.val_set, data.test_set):
            assert [classes[label] for _, label in split.samples] == [
                Path(p).parent.name for p, _ in split.samples
            ]
            assert [split[i][1] for i in range(len(split))] == [label for _, label in split.samples]


def test_one_class_folder_is_a_config_error_not_a_run_at_accuracy_1(tmp_path: Path) -> None:
    write_image_tree(tmp_path, per_class=2)
    shutil.rmtree(tmp_path / "train" / "dog")
    with pytest.raises(
        ConfigError, match=r"train' has one class folder \(cat\): a classifier needs two or more"
    ):
        _data("data=imagefolder", f"data.root={tmp_path}")


def test_an_evaluation_class_that_training_lacks_is_a_config_error(tmp_path: Path) -> None:
    write_image_tree(tmp_path, per_class=1)
    (tmp_path / "val" / "cow").mkdir()
    with pytest.raises(
        ConfigError, match=rf"^'{tmp_path}/val' has class folder\(s\) that train/ lacks \(cow\) — add them to"
    ):
        _data("data=imagefolder", f"data.root={tmp_path}")


def test_bad_files_stop_the_run_with_one_line_naming_them(tmp_path: Path) -> None:
    write_bad_tree(tmp_path)
    with pytest.raises(ConfigError) as err:
        _data("data=imagefolder", f"data.root={tmp_path}", "data.image_size=16")
    message = str(err.value)
    assert "has 4 unreadable image(s) or empty class folder(s)" in message and "\n" not in message
    assert message.endswith("— fix or remove them, or set data.on_corrupt=skip")


def test_a_tree_as_peoples_folders_come_trains_on_each_image_once_under_its_class(tmp_path: Path) -> None:
    """``write_field_tree``: every image is found once under its class (hidden folders, ``__MACOSX`` and a
    loop left out, a linked folder followed), photos with data after the image are kept, ``Training``/``Test``
    are the splits (validation carved from training), and the one broken link is named."""
    root = tmp_path / "root"
    expected = write_field_tree(root, tmp_path / "outside")
    args = ["data=imagefolder", f"data.root={root}", "data.image_size=16", "data.augment.crop=none"]
    gone = f"{root}/Training/pear/gone.jpg: cannot be read (No such file or directory)"
    with pytest.raises(ConfigError) as err:
        _data(*args)
    assert str(err.value) == (
        f"data.root '{root}' has 1 unreadable image(s) or empty class folder(s) ({gone}) — fix or remove "
        "them, or set data.on_corrupt=skip"
    )
    data = _data(*args, "data.on_corrupt=skip")
    assert data.info.class_names == ["apple", "pear"] and data.info.skipped == (gone,)
    training = data.train_set.dataset
    assert training.root == str(root / "Training") and data.test_set.root == str(root / "Test")
    assert sorted(data.train_set.indices + data.val_set.indices) == list(range(len(training.samples)))
    found: dict[str, list[str]] = {"apple": [], "pear": []}
    for path, label in training.samples:
        name = data.info.class_names[label]
        found[name].append(str(Path(path).relative_to(root / "Training" / name)))
    assert {c: sorted(files) for c, files in found.items()} == {c: sorted(f) for c, f in expected.items()}
    for split in (data.train_set, data.val_set, data.test_set):
        assert all(split[i][0].shape == (3, 16, 16) for i in range(len(split)))  # each one decodes


def test_files_that_fail_only_when_decoded_stop_the_run_with_one_line_or_are_stood_in_for(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A JPEG with a garbled scan and a truncated BMP pass the check before training (headers and end
    markers): decoding them names the file in one line, where the workers decode and where the device
    does; under ``data.on_corrupt=skip`` the next file of the same split stands in (the next image of its
    batch, on the device), with a warning."""
    write_image_tree(tmp_path, per_class=4)
    write_garbled_jpeg(tmp_path / "val" / "cat" / "garbled.jpg")
    args = ["data=imagefolder", f"data.root={tmp_path}", "data.image_size=16", "data.num_workers=0"]
    args += ["data.augment.crop=none", "data.batch_size=64"]  # the whole validation split in one batch
    samples = [Path(p).relative_to(tmp_path).as_posix() for p, _ in _data(*args).val_set.samples]
    garbled = samples.index("val/cat/garbled.jpg")
    with pytest.raises(
        ConfigError, match=r"^\S+/val/cat/garbled.jpg cannot be decoded \(.+\) — fix or remove"
    ):
        next(iter(_data(*args, "data.decode=device").val_dataloader()))
    for decode in ("workers", "device"):
        x, y = next(iter(_data(*args, f"data.decode={decode}", "data.on_corrupt=skip").val_dataloader()))
        assert torch.equal(x[garbled], x[garbled + 1]) and y[garbled] == y[garbled + 1]
    said = [r.getMessage() for r in caplog.records if "cannot be decoded" in r.getMessage()]
    assert [m.rsplit(": ", 1)[1] for m in said] == [
        "the next file of its split stands in",
        "another image of its batch stands in",
    ]
    Image.new("RGB", (40, 30), (9, 9, 9)).save(tmp_path / "train" / "dog" / "half.bmp")
    half = (tmp_path / "train" / "dog" / "half.bmp").read_bytes()
    (tmp_path / "train" / "dog" / "half.bmp").write_bytes(half[: len(half) // 2])
    with pytest.raises(ConfigError, match=r"^\S+/train/dog/half.bmp cannot be decoded \(image file is trunc"):
        _data(*args)  # the normalisation's sample decodes every training file here


def test_a_file_that_a_loader_worker_cannot_decode_stops_the_run_with_its_own_line(tmp_path: Path) -> None:
    """The error raised in a DataLoader worker comes back with the worker's traceback in its message: the
    run prints the error's own line, exit 2."""
    write_image_tree(tmp_path / "tree", per_class=4)
    write_garbled_jpeg(tmp_path / "tree" / "val" / "cat" / "garbled.jpg")
    args = ["data=imagefolder", f"data.root={tmp_path / 'tree'}", "data.image_size=16", "data.num_workers=2"]
    args += ["data.batch_size=4", "trainer.max_epochs=1", "monitor=off", f"hydra.run.dir={tmp_path / 'run'}"]
    done = run_cli(args, tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    garbled = tmp_path / "tree" / "val" / "cat" / "garbled.jpg"
    assert done.stderr.strip().splitlines()[-1] == (
        f"ConfigError: {garbled} cannot be decoded (broken data stream when reading image file) — fix or "
        "remove it, or set data.on_corrupt=skip"
    )


def test_skip_trains_on_the_rest_and_converts_odd_modes(tmp_path: Path) -> None:
    write_bad_tree(tmp_path)
    data = _data("data=imagefolder", f"data.root={tmp_path}", "data.image_size=16", "data.on_corrupt=skip")
    reasons = sorted(line.rsplit(": ", 1)[1] for line in data.info.skipped)
    assert reasons == ["empty class folder", "empty file", "not an image", "truncated JPEG"]
    names = sorted(Path(p).name for p, _ in data.train_set.samples)
    assert names == ["cmyk.jpg", "deep.png", "good.jpg", "good.jpg"]
    deep = next(i for i, (p, _) in enumerate(data.train_set.samples) if p.endswith("deep.png"))
    x, _ = data.val_set[0]
    assert data.train_set[deep][0].shape == x.shape == (3, 16, 16)
    deep_path = data.train_set.samples[deep][0]
    assert np.asarray(load_rgb(deep_path))[0, 0].tolist() == [155] * 3  # 16-bit 40000 scaled to 8 bits
    assert data.info.class_names == ["bird", "cat", "dog"]


def test_augmentation_is_random_on_the_train_split_only(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    data = _data("data=cifar10", f"data.root={tmp_path}")
    assert not all(torch.equal(data.train_set[i][0], data.train_set[i][0]) for i in range(5))
    assert all(torch.equal(data.val_set[i][0], data.val_set[i][0]) for i in range(5))
    plain = _data(
        "data=cifar10", f"data.root={tmp_path}", "data.augment.crop=none", "data.augment.hflip=false"
    )
    assert torch.equal(plain.train_set[0][0], plain.train_set[0][0])


def test_every_split_is_normalised_by_the_train_splits_channel_statistics(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    data = _data(
        "data=cifar10", f"data.root={tmp_path}", "data.augment.crop=none", "data.augment.hflip=false"
    )
    train = torch.stack([data.train_set[i][0] for i in range(len(data.train_set))])
    assert train.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert torch.allclose(train.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-2)
    assert data.test_set[0][0].shape == (3, 32, 32)


def test_one_imagefolder_is_split_by_val_fraction_and_seed(tmp_path: Path) -> None:
    write_image_tree(tmp_path, per_class=10, splits=False)
    args = ("data=imagefolder", f"data.root={tmp_path}", "data.image_size=16", "data.val_fraction=0.3")
    a, b, c = _data(*args), _data(*args), _data(*args, "data.split_seed=1")
    assert (len(a.train_set), len(a.val_set)) == (14, 6) and a.test_set is a.val_set
    assert a.val_set.indices == b.val_set.indices != c.val_set.indices
    assert not set(a.train_set.indices) & set(a.val_set.indices)
    assert a.info.class_names == ["cat", "dog"] and a.train_set[0][0].shape == (3, 16, 16)


def test_cifar_batches_pickled_again_by_python_3_read_as_the_originals(tmp_path: Path) -> None:
    """Protocol 2 pickles bytes as ``_codecs.encode`` of latin-1 text, and numpy labels as numpy scalars:
    a copy of the batches loaded and dumped again that way gives the same images and labels."""
    for name in ("original", "again"):
        (tmp_path / name).mkdir()
    write_cifar(tmp_path / "original")
    for path in (tmp_path / "original").iterdir():
        batch = pickle.loads(path.read_bytes())
        if b"labels" in batch:
            batch[b"labels"] = [np.int64(label) for label in batch[b"labels"]]
        (tmp_path / "again" / path.name).write_bytes(pickle.dumps(batch, protocol=2))
    original, again = (
        _data("data=cifar10", f"data.root={tmp_path / name}") for name in ("original", "again")
    )
    for split in ("val_set", "test_set"):  # (the training split's crops and flips are drawn per call)
        for i in (0, -1):
            x, y = getattr(again, split)[i]
            assert torch.equal(x, getattr(original, split)[i][0]) and y == getattr(original, split)[i][1]
    assert again.info.class_names == original.info.class_names
    (tmp_path / "again" / "data_batch_1").write_bytes(  # the text of bytes decoded another way: refused
        pickle.dumps({b"data": 1}, protocol=2).replace(b"latin1", b"utf_8_", 1)
    )
    with pytest.raises(ConfigError, match=r"data_batch_1 is not a CIFAR-10 python batch \(bytes pickled as"):
        _data("data=cifar10", f"data.root={tmp_path / 'again'}")


def test_a_crafted_cifar_batch_is_refused_and_its_payload_never_runs(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self) -> tuple:
            return (Path.touch, (marker,))

    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": Payload(), b"labels": [0]}))
    with pytest.raises(ConfigError, match=r"data_batch_3 is not a CIFAR-10 python batch .* — replace it"):
        _data("data=cifar10", f"data.root={tmp_path}")
    assert not marker.exists()


def _cifar_on_device(root: Path, *overrides: str) -> ImageDataModule:
    write_cifar(root)
    return _data("data=cifar10", f"data.root={root}", "data.batch_size=8", "data.on_gpu=true", *overrides)


def test_device_batches_are_the_dataloaders_when_nothing_is_random(tmp_path: Path) -> None:
    plain = ("data.augment.crop=none", "data.augment.hflip=false")
    device = _cifar_on_device(tmp_path, *plain)
    host = _data("data=cifar10", f"data.root={tmp_path}", "data.batch_size=8", *plain)  # auto, on the CPU
    for make in ("train_dataloader", "test_dataloader"):
        a, b = getattr(host, make)(), getattr(device, make)()
        assert isinstance(a, DataLoader) and isinstance(b, DeviceBatches) and len(a) == len(b)
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):  # the same samples, normalised the same way
            assert xb.dtype == torch.float32 and torch.equal(xa, xb) and torch.equal(ya, yb)
    assert (len(b), len(b.sampler)) == (3, 20)  # a ragged last test batch; training drops it
    assert len(device.train_dataloader()) == 90 // 8


@pytest.mark.parametrize("padding", [0, 2])
def test_device_crop_and_flip_only_shift_and_mirror_each_image(tmp_path: Path, padding: int) -> None:
    data = _cifar_on_device(tmp_path, "data.batch_size=16", f"data.augment.padding={padding}")
    loader = data.train_dataloader()
    x, y = next(iter(loader))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    index = list(loader.sampler)[:16]
    assert torch.equal(y, data.train_set.labels[index])
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in (data.info.mean, data.info.std))
    pixels = (x * std + mean).mul_(255).round_()  # back to the uint8 values
    sources = F.pad(data.train_set.images[index], (padding,) * 4).float()
    seen = set()
    for image, source in zip(pixels, sources, strict=True):
        windows = {
            (dy, dx): source[:, dy : dy + 32, dx : dx + 32]
            for dy in range(2 * padding + 1)
            for dx in range(2 * padding + 1)
        }
        views = {(*at, flip): w.flip(-1) if flip else w for at, w in windows.items() for flip in (0, 1)}
        [found] = [key for key, view in views.items() if torch.equal(view, image)]
        seen.add(found)
    assert {flip for _, _, flip in seen} == {0, 1}  # some mirrored, some not
    offsets = {(dy, dx) for dy, dx, _ in seen}
    assert len(offsets) > 1 if padding else offsets == {(0, 0)}


def test_device_augmentation_is_fixed_by_seed_epoch_and_batch_and_resumes_mid_epoch(tmp_path: Path) -> None:
    data, again = _cifar_on_device(tmp_path), _cifar_on_device(tmp_path)

    def epoch(data: ImageDataModule, number: int) -> list[torch.Tensor]:
        loader = data.train_dataloader()
        loader.sampler.set_epoch(number)  # as Lightning does
        return [x for x, _ in loader]

    rng = torch.get_rng_state()
    first = epoch(data, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, epoch(again, 1), strict=True))
    assert not torch.equal(first[0], epoch(data, 2)[0])
    again.resume_at(1, 4)
    resumed = [x for x, _ in again.train_dataloader()]  # made in epoch 1, before Lightning sets it
    assert len(resumed) == len(first) - 4 and all(
        torch.equal(a, b) for a, b in zip(first[4:], resumed, strict=True)
    )
    assert len(epoch(again, 1)) == len(first)  # only the first epoch after resume_at is shortened
    assert torch.equal(rng, torch.get_rng_state())  # the global RNG is left alone

    images = data.train_set.images[:8]  # the same images: each part of the key changes the crops and flips
    keys = [(0, 1, 0, 3), (0, 1, 0, 3), (1, 1, 0, 3), (0, 2, 0, 3), (0, 1, 1, 3), (0, 1, 0, 4)]
    made = [BatchAugment(seed, padding=4, hflip=True)(images, *key) for seed, *key in keys]
    assert torch.equal(made[0], made[1]) and not any(torch.equal(made[0], other) for other in made[2:])


def test_device_decode_gives_the_workers_images_for_every_kind_of_file(tmp_path: Path) -> None:
    write_bad_tree(tmp_path)  # RGB JPEGs, a CMYK JPEG and a 16-bit PNG (decoded by the workers), bad files
    grey = np.random.default_rng(1).integers(0, 256, (18, 26), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "val" / "cat" / "grey.jpg")  # a grey JPEG: decoded to RGB
    plain = ["data.augment.crop=none", "data.augment.hflip=false", "data.num_workers=0", "data.batch_size=4"]
    args = ["data=imagefolder", f"data.root={tmp_path}", "data.image_size=16", "data.on_corrupt=skip", *plain]
    workers, device = _data(*args, "data.decode=workers"), _data(*args, "data.decode=device")
    assert validate(compose(args))["data"]["decode"] == "workers"  # the default
    for y, labels, grey_levels in decoded_both_ways(workers, device):
        assert torch.equal(labels, y) and grey_levels.shape[1:] == (3, 16, 16)
        assert float(grey_levels.max()) <= 1.01  # the same pixels, up to the workers' rounding to 8 bits
    files = next(iter(device.train_dataloader().loader))  # what the workers hand over
    assert sorted(files.encoded) == [False, False, True, True]  # the CMYK JPEG and the PNG came decoded


def test_device_decode_reads_jpegs_of_every_flavour_as_the_workers_do(tmp_path: Path) -> None:
    """Progressive, optimised, 4:2:2 and 4:4:4, restart markers, an EXIF orientation, grey, 1×1: every file
    decoded where it trains (libjpeg here, nvJPEG on a GPU: tests/test_gpu.py) is the workers' image."""
    write_jpeg_flavours(tmp_path)
    plain = ["data.augment.crop=none", "data.augment.hflip=false", "data.num_workers=0", "data.batch_size=16"]
    args = ["data=imagefolder", f"data.root={tmp_path}", "data.image_size=16", *plain]
    workers, device = _data(*args, "data.decode=workers"), _data(*args, "data.decode=device")
    files = next(iter(device.train_dataloader().loader))
    assert all(files.encoded) and len(files.encoded) == 2 * (len(JPEG_FLAVOURS) + 1)  # all go to the decoder
    for y, labels, grey_levels in decoded_both_ways(workers, device):
        assert torch.equal(labels, y) and float(grey_levels.max()) <= 1.01


def test_device_decode_crops_flips_and_fits_each_image_as_torchvision_does(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for k in range(10):  # JPEGs of many sizes, and a PNG per split (decoded by the workers)
            folder = tmp_path / split / f"c{k % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (int(rng.integers(12, 60)), int(rng.integers(12, 60)), 3), np.uint8)
            Image.fromarray(pixels).save(folder / (f"{k}.png" if k == 3 else f"{k}.jpg"))
    augment = ["data.augment.crop=resized", "data.augment.hflip=true", "data.num_workers=0"]
    args = ["data=imagefolder", f"data.root={tmp_path}", "data.image_size=16", "data.batch_size=4", *augment]
    data = _data(*args, "data.decode=device")
    info = data.info
    seen: set[tuple[bool, bool, bool]] = set()
    for loader in (data.train_dataloader().loader, data.val_dataloader().loader):
        for files in loader:
            images, labels = files.decode(torch.device("cpu"), info)
            assert torch.equal(labels, files.labels) and images.shape == (len(labels), 3, 16, 16)
            jpegs = iter(files.jpegs.split(files.sizes))
            others = iter(files.decoded_in_workers(torch.device("cpu")))
            for image, jpeg, box, flip in zip(images, files.encoded, files.boxes, files.flips, strict=True):
                pixels = decode_jpeg(next(jpegs), mode=ImageReadMode.RGB) if jpeg else next(others)
                torch.testing.assert_close(image, torchvision_crop(pixels, box, flip, info))
                seen.add((jpeg, box == FIT, flip))
    # every kind met: JPEG and PNG, random boxes and fitted files, flipped and not
    assert {jpeg for jpeg, *_ in seen} == {True, False} and {fit for _, fit, _ in seen} == {True, False}
    assert {flip for *_, flip in seen} == {True, False}


@pytest.fixture
def interpreted_crops(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """``t240dist.crops`` with its Triton kernel run by Triton's interpreter, on CPU tensors. (The kernel
    calls Triton's builtins only: its library functions, such as ``tl.zeros``, are made when Triton is
    imported, and would need ``TRITON_INTERPRET`` set before that.)"""
    pytest.importorskip("triton")
    import t240dist.crops

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield importlib.reload(t240dist.crops)  # the kernel is made when the module is
    monkeypatch.undo()
    importlib.reload(t240dist.crops)


@pytest.mark.parametrize(("size", "resize", "sizes"), [(20, 23, (6, 90)), (24, 16, (3, 30))])
def test_one_launch_crops_flips_and_fits_a_batch_as_torchvision_does(
    interpreted_crops: ModuleType, size: int, resize: int, sizes: tuple[int, int]
) -> None:
    """Boxes shrunk and enlarged, files fitted (and padded where ``resize`` is under ``size``), flips: the
    batch kernel gives each image what torchvision's transforms give it, whatever the image's size."""
    images, boxes, flips = crop_cases(size, 18, sizes)
    info = crop_info(size, resize, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    batch = interpreted_crops.crop_resize(images, boxes, flips, info)
    expected = [torchvision_crop(*case, info) for case in zip(images, boxes, flips, strict=True)]
    grey_levels = (batch - torch.stack(expected)).abs() * torch.tensor(info.std).view(3, 1, 1) * 255
    assert float(grey_levels.max()) < 1e-3
    assert {box == FIT for box in boxes} == {True, False} and set(flips) == {True, False}
    # strided images, as pil_to_tensor hands them (height, width and channel strides): the same pixels
    strided = [image.permute(1, 2, 0).contiguous().permute(2, 0, 1) for image in images]
    assert torch.equal(interpreted_crops.crop_resize(strided, boxes, flips, info), batch)
    with pytest.raises(ValueError, match=r"uint8 \(3, H, W\) images, not torch.float32 \(3, 8, 8\)"):
        interpreted_crops.crop_resize([torch.zeros(3, 8, 8)], [FIT], [False], info)


def test_the_batch_kernel_is_used_only_where_its_first_run_agrees_with_the_per_image_resize(
    interpreted_crops: ModuleType,
) -> None:
    cpu = torch.device("cpu")
    assert _kernel_failure(interpreted_crops.crop_resize, cpu) is None

    def no_compiler(*args: object) -> torch.Tensor:
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    def unflipped(images: list[torch.Tensor], boxes: list, flips: list[bool], *rest: object) -> torch.Tensor:
        return interpreted_crops.crop_resize(images, boxes, [False] * len(flips), *rest)

    failure = _kernel_failure(no_compiler, cpu)
    assert (
        failure
        == "failed: RuntimeError: Failed to find C compiler. Please specify via CC environment variable."
    )
    assert "from the per-image resize" in _kernel_failure(unflipped, cpu)
    assert _crop_resizer(cpu) is _crop_resize_each  # the CPU resizes image by image


@pytest.mark.parametrize("arch", [70, 80, 90])
def test_the_batch_kernel_compiles_for_volta_ampere_and_hopper(arch: int) -> None:
    """Compiled ahead to each GPU's machine code by Triton's own compiler and ptxas, here without a GPU: the
    kernel every GPU run of ``data.decode=device`` takes, checked on the CPU machine of the CI."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    from t240dist import crops

    floats = {name: "fp32" for name in ("mean0", "mean1", "mean2", "std0", "std1", "std2")}
    signature = {"table": "*i64", "out": "*fp32", "size": "i32", **floats, "BLOCK": "constexpr"}
    source = triton.compiler.ASTSource(crops._crop_resize, signature, constexprs={"BLOCK": 256})
    assert triton.compile(source, target=GPUTarget("cuda", arch, 32)).asm["cubin"]


def test_the_workers_decode_their_share_of_jpegs_the_same_files_each_epoch_and_the_batch_is_the_same(
    tmp_path: Path,
) -> None:
    """``data.worker_decode_share``: under ``data.decode=device`` that share of the JPEG files comes
    decoded by the workers (the same files every time, picked by path), the rest as bytes; the batch the
    device makes is the one it makes decoding every file itself (libjpeg both ways here)."""
    write_image_tree(tmp_path, per_class=40)
    jpegs = [str(p) for p in sorted(tmp_path.glob("*/*/*.jpg"))]
    decoded = [isinstance(FileImage.read(p, share=0.5).content, torch.Tensor) for p in jpegs]
    assert 0.3 < sum(decoded) / len(jpegs) < 0.7
    assert decoded == [isinstance(FileImage.read(p, share=0.5).content, torch.Tensor) for p in jpegs]
    assert not any(isinstance(FileImage.read(p).content, torch.Tensor) for p in jpegs)
    assert all(isinstance(FileImage.read(p, share=1.0).content, torch.Tensor) for p in jpegs)
    args = ["data=imagefolder", f"data.root={tmp_path}", "data.image_size=16", "data.decode=device"]
    args += [
        "data.num_workers=0",
        "data.batch_size=160",
        "data.augment.crop=none",
        "data.augment.hflip=false",
    ]
    x, y = next(iter(_data(*args).val_dataloader()))
    for share in (0.5, 1.0):
        shared_x, shared_y = next(iter(_data(*args, f"data.worker_decode_share={share}").val_dataloader()))
        assert torch.equal(shared_y, y) and torch.allclose(shared_x, x, atol=1e-5)


def test_device_decode_crops_are_seeded_per_sample_whatever_the_worker(tmp_path: Path) -> None:
    write_image_tree(tmp_path, per_class=6)
    args = ["data=imagefolder", f"data.root={tmp_path}", "data.image_size=16", "data.batch_size=4"]
    one, two = (_data(*args, "data.decode=device", f"data.num_workers={n}") for n in (0, 2))
    epoch0 = list(one.train_dataloader().loader)  # what the workers hand over: files, boxes and flips
    assert [(b.boxes, b.flips) for b in epoch0] == [(b.boxes, b.flips) for b in two.train_dataloader().loader]
    assert len({box for b in epoch0 for box in b.boxes}) > len(epoch0)  # random-resized boxes, not one fit
    assert {flip for b in epoch0 for flip in b.flips} == {False, True}
    # decoded ahead in a thread: the same images, batch by batch, whichever worker count read them
    for (x1, y1), (x2, y2) in zip(one.train_dataloader(), two.train_dataloader(), strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.shape == (4, 3, 16, 16)
    one.resume_at(1, 0)
    assert [b.boxes for b in one.train_dataloader().loader] != [b.boxes for b in epoch0]  # each epoch anew
    one.teardown("fit")
    two.teardown("fit")  # the loaders made so far, their epochs run out: their workers end
    assert multiprocessing.active_children() == []
    ahead = two.train_dataloader()
    batches = iter(ahead)
    assert len(ahead) == len(epoch0) and next(batches)[0].isfinite().all()
    workers = multiprocessing.active_children()
    assert len(workers) == 2

    def decoding() -> bool:
        return any(t.name == "t240dist-decode" for t in threading.enumerate())

    batches.close()  # left early: the thread stops, the workers stay for the next epoch
    assert not decoding() and multiprocessing.active_children() == workers
    for epoch in range(2):  # whole epochs on the same workers, each batch as the first loader gave it
        ahead.sampler.set_epoch(epoch)  # as Lightning sets it each epoch
        one.resume_at(epoch, 0)
        for (x1, _), (x2, _) in zip(one.train_dataloader(), ahead, strict=True):
            assert torch.equal(x1, x2)
        assert multiprocessing.active_children() == workers
    next(iter(ahead))  # an iteration under way when the loader is made again
    again = two.train_dataloader()  # +trainer.reload_dataloaders_every_n_epochs: it replaces the last
    assert multiprocessing.active_children() == [] and not decoding()  # the last's thread and workers end
    assert len(ahead) == 0  # what Lightning's teardown after an exception reads
    with pytest.raises(RuntimeError, match="closed"):
        iter(ahead)
    next(iter(again))  # an iteration under way when the stage ends
    assert len(multiprocessing.active_children()) == 2 and decoding()
    two.teardown("fit")  # ends it and the workers, as Lightning's teardown does for its DataLoaders
    assert multiprocessing.active_children() == [] and not decoding()
