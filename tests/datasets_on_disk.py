"""Tiny real copies of each on-disk format (CIFAR-10 batches, MNIST IDX, ImageFolder trees) for tests."""

from __future__ import annotations

import gzip
import io
import os
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


def write_garbled_jpeg(path: Path) -> None:
    """A JPEG whose scan has 400 bytes of noise, its markers intact: only decoding it finds that out."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    scan = data.find(b"\xff\xda")
    data[scan + 2000 : scan + 2400] = rng.integers(0, 256, 400, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


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


def _jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (24, 16)) -> bytes:
    noise = np.random.default_rng(sum(colour)).integers(0, 40, (size[1], size[0], 3))
    out = io.BytesIO()
    Image.fromarray((noise + np.array(colour) * 0.8).astype(np.uint8)).save(out, "JPEG")
    return out.getvalue()


def write_field_tree(root: Path, outside: Path) -> dict[str, list[str]]:
    """A tree as people's folders come: Fruits-360's ``Training``/``Test`` split names, photos with data after
    the image (a phone's trailer, zero padding), a PNG with bytes after its end, GIF and JFIF files, a NAS's
    hidden thumbnail folder and macOS's ``.AppleDouble`` inside a class, a Mac zip's ``__MACOSX`` folder, a
    symlink back up the tree, a class sub-folder linked from ``outside``, a broken link. Returns each
    class's training files that are images (relative to ``Training/<class>``), by class."""
    expected: dict[str, list[str]] = {"apple": [], "pear": []}
    for split, count in (("Training", 6), ("Test", 2)):
        for c, colour in (("apple", (200, 40, 40)), ("pear", (40, 200, 40))):
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{i}.jpg").write_bytes(_jpeg(colour))
                expected[c] += [f"{i}.jpg"] if split == "Training" else []
    apple, pear = root / "Training" / "apple", root / "Training" / "pear"
    (apple / "phone.jpg").write_bytes(_jpeg((210, 30, 30)) + b"SEFH" + b"\x01" * 100)
    (apple / "padded.JPG").write_bytes(_jpeg((190, 50, 50)) + b"\0" * 500)
    shot = io.BytesIO()
    Image.new("RGB", (20, 20), (220, 20, 20)).save(shot, "PNG")
    (apple / "shot.png").write_bytes(shot.getvalue() + b"extra" * 20)
    Image.new("RGB", (20, 20), (30, 210, 30)).save(pear / "web.gif")
    (pear / "web.jfif").write_bytes(_jpeg((30, 190, 30)))
    expected["apple"] += ["padded.JPG", "phone.jpg", "shot.png"]
    expected["pear"] += ["web.gif", "web.jfif"]
    for hidden in (apple / ".@__thumb", apple / ".AppleDouble", root / "Training" / "__MACOSX" / "pear"):
        hidden.mkdir(parents=True)
        (hidden / "0.jpg").write_bytes(_jpeg((0, 0, 250)))
    os.symlink("..", pear / "up")  # a loop: would walk Training/ (apple's files as pears) again and again
    (outside / "ripe").mkdir(parents=True)
    (outside / "ripe" / "r.jpg").write_bytes(_jpeg((60, 220, 60)))
    os.symlink(outside / "ripe", pear / "ripe")
    os.symlink(root / "gone.jpg", pear / "gone.jpg")
    expected["pear"] += ["ripe/r.jpg"]
    return expected
