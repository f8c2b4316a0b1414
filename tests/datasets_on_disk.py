"""Tiny real copies of each on-disk format (CIFAR-10 batches, MNIST IDX, ImageFolder trees) for tests."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def write_cifar(root: Path, per_batch: int = 20) -> None:
    """CIFAR-10 python batches of random images, labels cycling through the 10 classes."""
    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        images = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [i % 10 for i in range(per_batch)]
        (root / name).write_bytes(pickle.dumps({b"data": images, b"labels": labels}))
    names = [f"c{i}".encode() for i in range(10)]
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))


def write_mnist(root: Path, compress: bool) -> None:
    """MNIST IDX files (50 train, 20 test images of 28x28), plain or gzip."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 50), ("t10k", 20)):
        _write_idx(root / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), compress)
        _write_idx(root / f"{split}-labels-idx1-ubyte", np.arange(n) % 10, compress)


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def write_image_tree(root: Path, per_class: int, splits: bool = True) -> None:
    """PNG/JPEG class folders `cat` and `dog`: ROOT/train and ROOT/val, or ROOT itself when not splits."""
    rng = np.random.default_rng(0)
    for split in ("train", "val") if splits else ("",):
        for label, cls in enumerate(("cat", "dog")):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 60, (30, 40, 3), dtype=np.uint8) + 150 * label
                Image.fromarray(pixels.astype(np.uint8)).save(
                    root / split / cls / f"{i}.{'png' if i % 2 else 'jpg'}"
                )


def write_bad_tree(root: Path) -> None:
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


def _exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


JPEG_FLAVOURS = {  # how cameras, phones and the web write JPEGs: Pillow's save options
    "baseline": {},
    "subsampled-422": {"subsampling": 1},
    "full-444": {"subsampling": 0, "quality": 98},
    "progressive": {"progressive": True},
    "optimised": {"optimize": True},
    "restarts": {"restart_marker_blocks": 3},
    "oriented": {"exif": _exif_orientation(6)},  # rotate 90°: neither decode path applies it
}


def write_jpeg_flavours(root: Path) -> None:
    """ROOT/train and ROOT/val, class folders `a` and `b`: a JPEG of each of ``JPEG_FLAVOURS`` per class,
    of odd sizes from 1×1 up to 321×203, and a grey one."""
    rng = np.random.default_rng(5)
    sizes = [(1, 1), (7, 3), (33, 17), (203, 321), (48, 64), (90, 31), (64, 64)]
    for split in ("train", "val"):
        for label, cls in enumerate(("a", "b")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for (name, options), (h, w) in zip(JPEG_FLAVOURS.items(), sizes, strict=True):
                field = (
                    rng.integers(0, 256, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8) // 2
                    + 100 * label
                )
                Image.fromarray(field).resize((w, h)).save(folder / f"{name}.jpg", **options)
            grey = rng.integers(0, 256, (19, 23), dtype=np.uint8)
            Image.fromarray(grey).save(folder / "grey.jpg")
