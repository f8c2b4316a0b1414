"""Datasets and loaders: bundled digits, synthetic images, CIFAR-10 batches, MNIST IDX, ImageFolder trees.

``ImageDataModule`` loads (or checks) its data when it is built, so a missing root fails with a
``ConfigError`` before any model exists. Small datasets live in memory as tensors; ImageFolder reads
lazily from disk.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision.transforms import v2

from t240dist.errors import ConfigError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class DataInfo:
    """What the model and the reports need to know about the data."""

    num_classes: int
    channels: int
    image_size: int
    class_names: list[str]
    train_size: int
    skipped: tuple[str, ...] = ()  # "path: reason" of each unreadable file left out (data.on_corrupt=skip)


class ImageDataModule(pl.LightningDataModule):
    """Train/val/test loaders for the dataset named by ``data.name``."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.cfg = cfg
        self.train_set, self.val_set, self.test_set, self.info = _LOADERS[cfg["name"]](cfg)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        workers = self.cfg["num_workers"]
        return DataLoader(
            dataset,
            batch_size=self.cfg["batch_size"],
            shuffle=shuffle,
            drop_last=shuffle,  # no ragged last training batch: BatchNorm dislikes batches of one
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )


class TensorImages(Dataset):
    """Images held in memory as one tensor, with an optional per-sample transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Any = None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.images[i]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[i])


class SyntheticImages(Dataset):
    """Images made on the fly: class k is a fixed smooth random pattern plus Gaussian noise.

    Every image is a pure function of (seed, split, index), so runs are reproducible without storing
    anything, whatever the image size or class count.
    """

    def __init__(self, size: int, cfg: dict[str, Any], split: int) -> None:
        self.size, self.split = size, split
        self.num_classes, self.noise = cfg["num_classes"], cfg["noise"]
        self.shape = (cfg["channels"], cfg["image_size"], cfg["image_size"])
        self.seed = cfg["seed"]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        gen = _generator(self.seed, self.split, i)
        label = int(torch.randint(self.num_classes, (1,), generator=gen))
        image = self._pattern(label) + self.noise * torch.randn(self.shape, generator=gen)
        return image, label

    def _pattern(self, label: int) -> torch.Tensor:
        gen = _generator(self.seed, "pattern", label)
        coarse = torch.randn(1, self.shape[0], 4, 4, generator=gen)
        return F.interpolate(coarse, size=self.shape[1:], mode="bilinear", align_corners=False)[0]


def _generator(*key: object) -> torch.Generator:
    """A CPU generator seeded by a hash of ``key`` (torch's CPU generator keeps only 32 bits of a seed)."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=4).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


Splits = tuple[Dataset, Dataset, Dataset, DataInfo]


def load_digits(cfg: dict[str, Any]) -> Splits:
    """scikit-learn's 8x8 digits, split train/val/test by ``split_seed``, standardised by the train split."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(cfg["split_seed"]))
    n_test = round(len(labels) * cfg["test_fraction"])
    n_val = round(len(labels) * cfg["val_fraction"])
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    info = DataInfo(10, 1, 8, [str(d) for d in range(10)], len(train))
    return (*(TensorImages(images[s], labels[s]) for s in (train, val, test)), info)


def load_synthetic(cfg: dict[str, Any]) -> Splits:
    """Synthetic images of any size and class count."""
    sets = [SyntheticImages(cfg[f"{name}_size"], cfg, i) for i, name in enumerate(("train", "val", "test"))]
    names = [f"class_{k}" for k in range(cfg["num_classes"])]
    info = DataInfo(cfg["num_classes"], cfg["channels"], cfg["image_size"], names, cfg["train_size"])
    return (*sets, info)


def load_cifar10(cfg: dict[str, Any]) -> Splits:
    """CIFAR-10 python batches; a validation split is carved from the training batches.

    Read by hand because torchvision's CIFAR10 insists on the md5 of the official archive files, which
    refuses re-packed copies of the same format.
    """
    root = Path(cfg["root"])
    meta = root / "batches.meta"
    for needed in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]:
        if not (root / needed).is_file():
            raise ConfigError(
                f"data.root '{root}' has no {needed} — put the CIFAR-10 python batches there "
                "(or set data.root) or pick data=digits"
            )
    train_x, train_y = _cifar_batches([root / f"data_batch_{i}" for i in range(1, 6)])
    test_x, test_y = _cifar_batches([root / "test_batch"])
    names = [n.decode() if isinstance(n, bytes) else n for n in _unpickle(meta)[b"label_names"]]
    val, train = _val_split(len(train_y), cfg)
    to_float = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(CIFAR_MEAN, CIFAR_STD)]
    augment = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), *to_float])
    plain = v2.Compose(to_float)
    return (
        TensorImages(train_x[train], train_y[train], augment),
        TensorImages(train_x[val], train_y[val], plain),
        TensorImages(test_x, test_y, plain),
        DataInfo(len(names), 3, 32, names, len(train)),
    )


def _val_split(n: int, cfg: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of a validation split of ``data.val_fraction`` and the rest, fixed by ``data.split_seed``."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg["split_seed"]))
    n_val = round(n * cfg["val_fraction"])
    return order[:n_val], order[n_val:]


def _cifar_batches(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate CIFAR batches into uint8 images (N, 3, 32, 32) and labels."""
    parts = [_unpickle(p) for p in paths]
    images = torch.cat([torch.as_tensor(b[b"data"]).view(-1, 3, 32, 32) for b in parts])
    labels = torch.cat([torch.as_tensor(b[b"labels"], dtype=torch.long) for b in parts])
    return images, labels


def _unpickle(path: Path) -> dict:
    with path.open("rb") as f:
        return pickle.load(f, encoding="bytes")


def load_mnist(cfg: dict[str, Any]) -> Splits:
    """MNIST IDX files (plain or gzip); a validation split is carved from the training images."""
    root = Path(cfg["root"])
    files = {}
    for stem in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        found = [p for p in (root / stem, root / f"{stem}.gz") if p.is_file()]
        if not found:
            raise ConfigError(
                f"data.root '{root}' has no {stem} (or {stem}.gz) — put the MNIST IDX files there "
                "(or set data.root) or pick data=digits"
            )
        files[stem] = _read_idx(found[0])
    train_x, train_y = files["train-images-idx3-ubyte"], files["train-labels-idx1-ubyte"]
    test_x, test_y = files["t10k-images-idx3-ubyte"], files["t10k-labels-idx1-ubyte"]
    for images, labels, stem in ((train_x, train_y, "train"), (test_x, test_y, "t10k")):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ConfigError(
                f"data.root '{root}': {stem} images {tuple(images.shape)} do not match labels "
                f"{tuple(labels.shape)} — replace the IDX files with a complete copy"
            )
    val, train = _val_split(len(train_y), cfg)
    pixels = train_x[train].float() / 255
    mean, std = float(pixels.mean()), float(pixels.std())
    normalise = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize((mean,), (std,))])
    as_images = [x.unsqueeze(1) for x in (train_x[train], train_x[val], test_x)]
    labels = [train_y[train].long(), train_y[val].long(), test_y.long()]
    sets = [TensorImages(x, y, normalise) for x, y in zip(as_images, labels, strict=True)]
    return (*sets, DataInfo(10, 1, train_x.shape[-1], [str(d) for d in range(10)], len(train)))


def _read_idx(path: Path) -> torch.Tensor:
    """One IDX file (unsigned-byte data, as MNIST ships) as a uint8 tensor of its declared shape."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ConfigError(
            f"{path} is not an unsigned-byte IDX file — replace it with the original MNIST file"
        )
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    body = raw[4 + 4 * dims :]
    if len(body) != math.prod(shape):
        raise ConfigError(
            f"{path} holds {len(body)} bytes, its header says {math.prod(shape)} — it is truncated"
        )
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).view(shape)


def load_imagefolder(cfg: dict[str, Any]) -> Splits:
    """ROOT/train and ROOT/val class folders (optional ROOT/test), decoded lazily by torchvision."""
    root, size = Path(cfg["root"]), cfg["image_size"]
    for needed in ("train", "val"):
        if not (root / needed).is_dir():
            raise ConfigError(
                f"data.root '{root}' has no {needed}/ folder — lay out ROOT/train/<class>/*.jpg and "
                "ROOT/val/<class>/*.jpg, or pick data=digits"
            )
    to_float = [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]
    augment = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), *to_float])
    plain = v2.Compose([v2.Resize(round(size / 0.875), antialias=True), v2.CenterCrop(size), *to_float])
    folders = [root / "train", root / "val", *([root / "test"] if (root / "test").is_dir() else [])]
    sets = [
        datasets.ImageFolder(str(folder), transform=t, loader=load_rgb, allow_empty=True)
        for folder, t in zip(folders, (augment, plain, plain), strict=False)
    ]
    bad = [(path, why) for ds in sets for path, why in _preflight(ds)]
    if bad and cfg["on_corrupt"] == "error":
        shown = "; ".join(f"{path}: {why}" for path, why in bad[:3])
        raise ConfigError(
            f"data.root '{root}' has {len(bad)} unreadable image(s) or empty class folder(s) ({shown}"
            f"{'; ...' if len(bad) > 3 else ''}) — fix or remove them, or set data.on_corrupt=skip"
        )
    unreadable = {path for path, _ in bad}
    for ds in sets:
        good = [(p, t) for p, t in ds.samples if p not in unreadable]
        ds.samples = ds.imgs = good
        ds.targets = [t for _, t in good]
    train, val, *rest = sets
    skipped = tuple(f"{path}: {why}" for path, why in bad)
    info = DataInfo(len(train.classes), 3, size, list(train.classes), len(train), skipped)
    return train, val, rest[0] if rest else val, info


def load_rgb(path: str) -> Image.Image:
    """Open any image as RGB: CMYK, palette, grey and 16-bit files are converted, not rejected."""
    with Image.open(path) as image:
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            scale = 257 if image.mode.startswith("I;16") else 65793
            image = Image.fromarray(
                (np.asarray(image, dtype=np.float64) / scale).clip(0, 255).astype(np.uint8)
            )
        return image.convert("RGB")


def _preflight(dataset: datasets.ImageFolder) -> list[tuple[str, str]]:
    """Find unreadable files and empty class folders from headers and file tails, without decoding.

    Reads a few bytes per file: the format header (PIL's lazy open) and the end marker that a truncated
    JPEG or PNG lacks.
    """
    bad: list[tuple[str, str]] = []
    counts = [0] * len(dataset.classes)
    for _, target in dataset.samples:
        counts[target] += 1
    bad += [
        (str(Path(dataset.root) / c), "empty class folder")
        for c, n in zip(dataset.classes, counts, strict=True)
        if n == 0
    ]
    for path, _ in dataset.samples:
        reason = _unreadable(Path(path))
        if reason:
            bad.append((path, reason))
    return bad


def _unreadable(path: Path) -> str | None:
    """Why a file cannot be trained on, or None."""
    size = path.stat().st_size
    if size == 0:
        return "empty file"
    try:
        with Image.open(path) as image:
            kind = image.format
    except (UnidentifiedImageError, OSError):
        return "not an image"
    with path.open("rb") as f:
        f.seek(max(0, size - 64))
        tail = f.read().rstrip(b"\0")
    if kind == "JPEG" and not tail.endswith(b"\xff\xd9"):
        return "truncated JPEG"
    if kind == "PNG" and b"IEND" not in tail[-12:]:
        return "truncated PNG"
    return None


_LOADERS = {
    "digits": load_digits,
    "synthetic": load_synthetic,
    "cifar10": load_cifar10,
    "mnist": load_mnist,
    "imagefolder": load_imagefolder,
}
