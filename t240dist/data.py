"""Datasets and loaders: bundled digits, synthetic images, CIFAR-10 batches, MNIST IDX, ImageFolder trees.

``ImageDataModule`` loads (or checks) its data when it is built, so a missing root fails with a
``ConfigError`` before any model exists. Small datasets live in memory as tensors; ImageFolder reads
lazily from disk. With ``data.on_gpu`` the in-memory splits live on the training device and whole batches
are made there (``DeviceBatches``) instead of by a DataLoader.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gzip
import hashlib
import importlib.util
import io
import logging
import math
import os
import pickle
import queue
import signal
import threading
import zlib
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lightning_fabric.utilities.seed import pl_worker_init_function
from PIL import Image, UnidentifiedImageError
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler, Subset
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as TF

from t240dist.errors import ConfigError

log = logging.getLogger(__name__)

STATS_SAMPLE = 512  # ImageFolder images read (decoded once) to estimate the normalisation
EVAL_CROP = 0.875  # image files are resized to image_size / EVAL_CROP, then centre-cropped (ImageNet's eval)


class Trained(NamedTuple):
    """What a checkpoint fixes about the data it is given: the training data's normalisation, and its
    classes, which number an image folder's labels (the folder may hold any of them)."""

    mean: list[float]
    std: list[float]
    classes: list[str]


@dataclass(frozen=True)
class DataInfo:
    """What the model and the reports need to know about the data."""

    num_classes: int
    channels: int
    image_size: int
    class_names: list[str]
    train_size: int
    mean: list[float]  # the normalisation every split gets (the train split's statistics)
    std: list[float]
    resize: int  # an image file's shorter side is resized to this, then centre-cropped to image_size
    skipped: tuple[str, ...] = ()  # "path: reason" of each unreadable file left out (data.on_corrupt=skip)

    @property
    def preprocess(self) -> dict[str, Any]:
        """How an image file becomes a model input, in plain types: stored in checkpoints for inference."""
        keys = ("channels", "image_size", "resize", "mean", "std")
        return {key: getattr(self, key) for key in keys}


class ImageDataModule(pl.LightningDataModule):
    """Train/val/test loaders for the dataset named by ``data.name``, sharded across DDP ranks.

    Sharding is done here (the Trainer runs with ``use_distributed_sampler=False``): training shards
    drop the remainder, so each sample is seen at most once per epoch; evaluation shards are not padded,
    so metrics reduced over ranks equal a single-process evaluation. A run resumed mid-epoch goes on at
    the next batch (``resume_at``). ``trained`` (a checkpoint's) replaces the train split's statistics and
    an image folder's classes, so a model is evaluated with the preprocessing and the labels it was trained
    with, whatever data it is given.
    Where ``batch_device`` says so, the loaders are ``DeviceBatches`` instead of DataLoaders.
    """

    def __init__(self, cfg: dict[str, Any], seed: int, trained: Trained | None = None) -> None:
        super().__init__()
        self.cfg, self.seed = cfg, seed  # cfg as config.validate decided it (data.decode=auto included)
        self._resume: tuple[int, int] = (0, 0)  # (epoch, batches done) where the next training loader starts
        self._placement: tuple[torch.device, torch.device | None] | None = None  # (trainer's, batches')
        # the live loader of each split under data.decode=device (keyed by split), until teardown or its next
        self._decoding: dict[tuple[int, bool], DecodedAhead] = {}
        self._copying: dict[torch.device, torch.cuda.Stream] = {}  # transfer_batch_to_device's stream per GPU
        self.train_set, self.val_set, self.test_set, self.info = _LOADERS[cfg["name"]](cfg, trained)

    def train_dataloader(self) -> DataLoader | DeviceBatches | DecodedAhead:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader | DeviceBatches | DecodedAhead:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader | DeviceBatches | DecodedAhead:
        return self._loader(self.test_set, train=False)

    def teardown(self, stage: str) -> None:
        """End the decode threads and loader workers of the stage's ``DecodedAhead`` loaders: Lightning's
        own teardown ends the workers of the DataLoaders it holds, and cannot see into these."""
        for loader in self._decoding.values():
            loader.close()
        self._decoding.clear()

    def on_exception(self, exception: BaseException) -> None:
        self.teardown("exception")

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """A DataLoader's host batch copied to a GPU on a CUDA stream of its own, which the training stream
        then waits for: the copy overlaps the step before, which is still on the GPU while the training
        thread runs ahead. Lightning's own copy is queued on the training stream, behind that step: fed by
        12 Pillow workers, an H100 trained ResNet-50 at 0.965 of its step's rate, a gap of ~2.3 ms a step,
        about the time a float batch at 224 px (154 MB) takes over PCIe (BENCHMARKS, session 38; the gain
        here is not yet timed). Batches made on the device (``data.on_gpu``, ``data.decode=device``) are
        left as they are."""
        tensors = isinstance(batch, tuple | list) and all(isinstance(t, torch.Tensor) for t in batch)
        if device.type != "cuda" or not tensors or any(t.is_cuda for t in batch):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        if device not in self._copying:
            self._copying[device] = torch.cuda.Stream(device)
        training, copying = torch.cuda.current_stream(device), self._copying[device]
        with torch.cuda.stream(copying):
            moved = [t.to(device, non_blocking=True) for t in batch]
        training.wait_stream(copying)
        for t in moved:
            t.record_stream(training)  # freed once the training stream is done with it, not before
        return type(batch)(moved)

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Let the next training loader start in ``epoch``, after its first ``batches_done`` batches.

        The epoch is set on the sampler when the loader is made, not left to Lightning's ``set_epoch``: on
        a resume Lightning creates the loader's iterator before it sets the epoch and keeps that iterator,
        and DataLoader workers draw their first indices as the iterator is created.
        """
        self._resume = (epoch, batches_done)

    @property
    def batch_device(self) -> torch.device | None:
        """Where whole batches are made from the resident uint8 splits (``data.on_gpu``), or None for the
        DataLoader path: the trainer's root device (the CPU without a trainer), decided once per device.
        ``auto`` picks a CUDA device when the splits fit in ``data.on_gpu_max_share`` of its memory (its
        total, not what is free now: every rank of a job on like GPUs decides alike)."""
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        if self._placement is None or self._placement[0] != device:
            self._placement = (device, self._batch_device_on(device))
        return self._placement[1]

    def _batch_device_on(self, device: torch.device) -> torch.device | None:
        setting = self.cfg["on_gpu"]
        if setting is False or not isinstance(self.train_set, TensorImages):
            return None
        if setting is True:
            return device
        if device.type != "cuda" or self.cfg["augment"]["crop"] == "resized":
            return None
        splits = {id(s): s for s in (self.train_set, self.val_set, self.test_set)}.values()
        size = sum(s.images.nbytes + s.labels.nbytes for s in splits)
        total = torch.cuda.get_device_properties(device).total_memory
        return device if size <= self.cfg["on_gpu_max_share"] * total else None

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader | DeviceBatches | DecodedAhead:
        device = self.batch_device
        if device is not None:
            return self._device_loader(dataset, train, device)
        workers = loader_workers(self.cfg["num_workers"])
        options = {
            "batch_size": self.cfg["batch_size"],
            "num_workers": workers,
            "persistent_workers": workers > 0,
            "pin_memory": torch.cuda.is_available(),
            "worker_init_fn": start_worker,
        }
        # A generator of its own: each iterator a DataLoader makes draws its workers' seed from it, which
        # must not move the global RNG that dropout and MixUp use (a validation would shift them otherwise)
        options["generator"] = torch.Generator().manual_seed(self.seed)
        if self.cfg.get("decode") == "device":  # no pinning: a FileBatch holds nothing to pin
            collate = functools.partial(FileBatch.collate, skip_corrupt=self.cfg["on_corrupt"] == "skip")
            options.update(collate_fn=collate, pin_memory=False)
        if not train:
            loader = DataLoader(dataset, sampler=self._eval_shard(dataset), **options)
        else:
            # Exact resume: the sampler can start mid-epoch (``resume_at``), and each sample's augmentation
            # is seeded by (seed, epoch, index), whatever process or worker draws it.
            order, skip = self._resumed_order(dataset)
            tagged = EpochTagged(order, skip * self.cfg["batch_size"])
            # drop_last: no ragged last training batch (BatchNorm dislikes batches of one)
            loader = DataLoader(EpochSeeded(dataset, self.seed), sampler=tagged, drop_last=True, **options)
        if self.cfg.get("decode") == "device":
            # a split's new loader replaces its last (+trainer.reload_dataloaders_every_n_epochs): the
            # last's workers end now, as Lightning's dropped DataLoaders' do, not at teardown
            key = (id(dataset), train)
            if key in self._decoding:
                self._decoding[key].close()
            self._decoding[key] = DecodedAhead(loader, self.decode_device, self.info)
            return self._decoding[key]
        return loader

    @property
    def decode_device(self) -> torch.device:
        """Where ``data.decode=device`` decodes: the trainer's device; without a trainer, a GPU if any."""
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _device_loader(self, split: TensorImages, train: bool, device: torch.device) -> DeviceBatches:
        """Batches made on ``device`` from the split's uint8 images, copied there at the first loader."""
        images, labels = split.on(device)
        mean, std = (torch.tensor(v, device=device).view(-1, 1, 1) for v in (self.info.mean, self.info.std))
        batch_size = self.cfg["batch_size"]
        if not train:
            shard = self._eval_shard(split) or SequentialSampler(split)
            return DeviceBatches(images, labels, mean, std, shard, batch_size, drop_last=False, augment=None)
        augment = self.cfg["augment"]
        padding = augment["padding"] if augment["crop"] == "pad" else 0
        hflip = augment["hflip"]
        crop_flip = BatchAugment(self.seed, padding, hflip) if padding or hflip else None
        order, skip = self._resumed_order(split)  # drop_last: no ragged last batch, as on the DataLoader
        return DeviceBatches(images, labels, mean, std, order, batch_size, True, crop_flip, skip)

    def _resumed_order(self, dataset: Dataset) -> tuple[DistributedSampler, int]:
        """This rank's shuffled share of the training samples, reshuffled by ``set_epoch`` and set to the
        epoch of ``resume_at``, and the batches of that epoch to leave out (once). Not shuffled under
        Lightning's ``overfit_batches``: every epoch trains on the same first batches."""
        trainer = self.trainer
        ranks = {"num_replicas": trainer.world_size, "rank": trainer.global_rank} if trainer else _ONE_RANK
        shuffle = not (trainer and trainer.overfit_batches)
        order = DistributedSampler(dataset, shuffle=shuffle, seed=self.seed, drop_last=True, **ranks)
        (epoch, skip), self._resume = self._resume, (0, 0)
        order.set_epoch(epoch)
        return order, skip

    def _eval_shard(self, dataset: Dataset) -> Sampler | None:
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return None
        return UnrepeatedDistributedSampler(
            dataset, shuffle=False, num_replicas=trainer.world_size, rank=trainer.global_rank
        )


_ONE_RANK = {"num_replicas": 1, "rank": 0}


@functools.cache  # said once per process and setting, not once per loader
def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, as torch counts them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def loader_workers(requested: int) -> int:
    """``data.num_workers``, at most the CPUs this process may run on (torch's own count), saying so.

    More workers than CPUs only queue behind each other (torch warns of slowness and freezes); the results
    do not change, since each sample's augmentation is seeded by its index, not by its worker.
    """
    cpus = usable_cpus()
    if requested <= cpus:
        return requested
    log.info(f"data.num_workers={requested}, but this process may use {cpus} CPU(s): {cpus} loader workers")
    return cpus


class EpochTagged(Sampler):
    """Yields ``(index, epoch)`` from a sampler with ``set_epoch``, so a dataset knows the epoch.

    ``skip`` drops the first indices of the next iteration only: a resumed epoch goes on where it stopped.
    """

    def __init__(self, sampler: DistributedSampler, skip: int) -> None:
        self.sampler, self.epoch, self.skip = sampler, sampler.epoch, skip

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices, self.skip, epoch = list(self.sampler)[self.skip :], 0, self.epoch
        return ((i, epoch) for i in indices)

    def __len__(self) -> int:
        return len(self.sampler)


class EpochSeeded(Dataset):
    """Draws sample ``index`` of ``epoch`` with the torch RNG seeded by (seed, epoch, index).

    Random augmentations then depend on nothing else: not on the worker, the prefetching or a resume.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int] | int) -> Any:
        # an index alone: under overfit_batches Lightning puts a SequentialSampler in EpochTagged's place
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        cpu = torch.default_generator  # not torch.manual_seed: it also queues CUDA seeding, slowly
        saved = cpu.get_state()
        cpu.manual_seed(_seed_of(self.seed, epoch, index))
        try:
            return self.dataset[index]
        finally:
            cpu.set_state(saved)


class TensorImages(Dataset):
    """Images held in memory as one uint8 tensor, with an optional per-sample transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Any = None) -> None:
        self.images, self.labels, self.transform = images, labels, transform
        self._resident: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The uint8 images and the labels on ``device``, copied there once."""
        if self._resident is None or self._resident[0].device != device:
            self._resident = (self.images.to(device), self.labels.to(device))
        return self._resident

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.images[i]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[i])


class DeviceBatches:
    """A loader of whole batches made where the uint8 images are (``data.on_gpu``), without workers.

    Each batch indexes the images with the sampler's next indices, is cropped and flipped (training:
    ``augment``, for the whole batch at once) and normalised, all on the images' device. Lightning finds
    ``sampler`` (as on a DataLoader; it reads ``batch_sampler`` too) and calls its ``set_epoch``; training
    samplers are ``DistributedSampler``s, whose epoch and rank key the augmentation. ``skip`` batches are
    left out of the next epoch only: a resumed epoch goes on where it stopped.
    """

    batch_sampler = None

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        sampler: Sampler,
        batch_size: int,
        drop_last: bool,
        augment: BatchAugment | None,
        skip: int = 0,
    ) -> None:
        self.images, self.labels, self.mean, self.std = images, labels, mean, std
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.augment, self.skip = augment, skip

    def __len__(self) -> int:
        whole, ragged = divmod(len(self.sampler), self.batch_size)
        return whole + (ragged > 0 and not self.drop_last)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # a generator: the order is drawn at the first batch, after Lightning has set the epoch
        order = torch.tensor(list(self.sampler), dtype=torch.long).to(self.images.device, non_blocking=True)
        start, self.skip = self.skip, 0
        for position in range(start, len(self)):
            index = order[position * self.batch_size : (position + 1) * self.batch_size]
            images = self.images[index]
            if self.augment is not None:
                images = self.augment(images, self.sampler.epoch, self.sampler.rank, position)
            # as v2.ToDtype(scale=True) and v2.Normalize compute it on the DataLoader path
            yield images.to(torch.float32).mul_(1 / 255).sub_(self.mean).div_(self.std), self.labels[index]


@dataclass(frozen=True)
class BatchAugment:
    """``data.augment`` for a whole uint8 batch on its device: a random crop after zero ``padding``
    (0: none) and a random horizontal flip, drawn per batch on the CPU from (seed, epoch, rank, position).

    The draws depend on nothing else (not on the global RNG, not on a resume) and reach the device in one
    small non-blocking copy per batch.
    """

    seed: int
    padding: int
    hflip: bool

    def __call__(self, images: torch.Tensor, epoch: int, rank: int, position: int) -> torch.Tensor:
        gen = _generator(self.seed, epoch, rank, position)
        n = len(images)
        shifts = torch.randint(2 * self.padding + 1, (2, n), generator=gen)
        flips = torch.rand(n, generator=gen) < 0.5 if self.hflip else torch.zeros(n, dtype=torch.bool)
        draws = torch.cat([shifts, flips[None]]).to(images.device, non_blocking=True)
        return crop_and_flip(images, self.padding, draws[:2], draws[2].bool())


def crop_and_flip(
    images: torch.Tensor, padding: int, shifts: torch.Tensor, flips: torch.Tensor
) -> torch.Tensor:
    """Each image (N, C, H, W) zero-padded by ``padding``, cropped back to H x W at offsets ``shifts``
    ((2, N): rows, columns, each in [0, 2 * padding]) and mirrored where ``flips`` (N,) is set, in one
    gather for the whole batch."""
    n, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding,) * 4) if padding else images
    rows = shifts[0, :, None] + torch.arange(h, device=device)
    columns = torch.arange(w, device=device)
    columns = shifts[1, :, None] + torch.where(flips[:, None], w - 1 - columns, columns)
    return padded[
        torch.arange(n, device=device)[:, None, None, None],
        torch.arange(c, device=device)[None, :, None, None],
        rows[:, None, :, None],
        columns[:, None, None, :],
    ]


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
    """A CPU generator seeded by ``key``."""
    return torch.Generator().manual_seed(_seed_of(*key))


def _seed_of(*key: object) -> int:
    """A seed from a hash of ``key`` (torch's CPU generator keeps only 32 bits of a seed)."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=4).digest(), "little")


Splits = tuple[Dataset, Dataset, Dataset, DataInfo]
Labelled = tuple[torch.Tensor, torch.Tensor]  # uint8 images (N, C, H, W) and int labels (N,)


def load_digits(cfg: dict[str, Any], trained: Trained | None) -> Splits:
    """scikit-learn's 8x8 digits (16 grey levels), split train/val/test by ``split_seed``."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = torch.tensor(bunch.images * 255 / 16).round().to(torch.uint8).unsqueeze(1)
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(cfg["split_seed"]))
    n_test = round(len(labels) * cfg["test_fraction"])
    n_val = round(len(labels) * cfg["val_fraction"])
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    splits = [(images[i], labels[i]) for i in (train, val, test)]
    return _in_memory(cfg, *splits, [str(d) for d in range(10)], trained)


def load_synthetic(cfg: dict[str, Any], trained: Trained | None) -> Splits:
    """Synthetic images of any size and class count (already standardised: no normalisation, no augmentation).

    Image files given to a synthetic-trained model are only scaled to [0, 1] (mean 0, std 1).
    """
    sets = [SyntheticImages(cfg[f"{name}_size"], cfg, i) for i, name in enumerate(("train", "val", "test"))]
    names = [f"class_{k}" for k in range(cfg["num_classes"])]
    channels, size = cfg["channels"], cfg["image_size"]
    info = DataInfo(
        cfg["num_classes"], channels, size, names, cfg["train_size"], [0.0] * channels, [1.0] * channels, size
    )
    return (*sets, info)


def load_cifar10(cfg: dict[str, Any], trained: Trained | None) -> Splits:
    """CIFAR-10 python batches; a validation split is carved from the training batches.

    Read by hand because torchvision's CIFAR10 insists on the md5 of the official archive files (which
    refuses re-packed copies of the same format) and unpickles them without restriction.
    """
    needed = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]
    root = _data_dir(
        _root(cfg, "the CIFAR-10 python batches"),
        ["cifar-10-batches-py"],
        lambda d: all((d / n).is_file() for n in needed),
    )
    for name in needed:
        if not (root / name).is_file():
            raise ConfigError(
                f"data.root '{root}' has no {name} — put the CIFAR-10 python batches there "
                "(or set data.root) or pick data=digits"
            )
    train_x, train_y = _cifar_batches([root / f"data_batch_{i}" for i in range(1, 6)])
    names = [
        n.decode() if isinstance(n, bytes) else n for n in _unpickle(root / "batches.meta")[b"label_names"]
    ]
    val, train = _val_split(len(train_y), cfg)
    test = _cifar_batches([root / "test_batch"])
    splits = (train_x[train], train_y[train]), (train_x[val], train_y[val]), test
    return _in_memory(cfg, *splits, names, trained)


def load_mnist(cfg: dict[str, Any], trained: Trained | None) -> Splits:
    """MNIST IDX files (plain or gzip); a validation split is carved from the training images."""
    stems = (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    )

    def idx_file(folder: Path, stem: str) -> list[Path]:
        return [p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()]

    root = _data_dir(
        _root(cfg, "the MNIST IDX files"), ["raw", "MNIST/raw"], lambda d: all(idx_file(d, s) for s in stems)
    )
    files = {}
    for stem in stems:
        found = idx_file(root, stem)
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
    train_x, test_x, train_y, test_y = (
        train_x.unsqueeze(1),
        test_x.unsqueeze(1),
        train_y.long(),
        test_y.long(),
    )
    val, train = _val_split(len(train_y), cfg)
    splits = (train_x[train], train_y[train]), (train_x[val], train_y[val]), (test_x, test_y)
    return _in_memory(cfg, *splits, [str(d) for d in range(10)], trained)


def _root(cfg: dict[str, Any], holding: str) -> Path:
    """``data.root``, which must exist: else one line saying so, with the folder a relative root is read
    from (the run's working directory)."""
    root = Path(cfg["root"])
    if not root.exists():
        raise ConfigError(
            f"data.root '{root}' does not exist — give the folder of {holding} (relative to {Path.cwd()}), "
            "or pick data=digits"
        )
    return root


def _data_dir(root: Path, layouts: list[str], complete: Callable[[Path], bool]) -> Path:
    """``root``, or the first of its sub-folders in torchvision's download layouts (``CIFAR10(root)`` keeps
    the batches in ``root/cifar-10-batches-py``, ``MNIST(root)`` the IDX files in ``root/MNIST/raw``) that
    holds every file; ``root`` itself when none does, for the error to name what it lacks."""
    return next((root / sub for sub in layouts if not complete(root) and complete(root / sub)), root)


def _in_memory(
    cfg: dict[str, Any],
    train: Labelled,
    val: Labelled,
    test: Labelled,
    names: list[str],
    trained: Trained | None,
) -> Splits:
    """Datasets over uint8 tensors: augmentation on the train split only, normalised by its statistics.

    Image files given to the trained model are resized to the training size (a file of that size is
    left as it is), then centre-cropped.
    """
    mean, std = trained[:2] if trained else _channel_stats(train[0])
    size = train[0].shape[-1]
    train_tf, eval_tf = _transforms(cfg["augment"], size, mean, std, resize=None)
    sets = [TensorImages(*train, train_tf), TensorImages(*val, eval_tf), TensorImages(*test, eval_tf)]
    return (*sets, DataInfo(len(names), train[0].shape[1], size, names, len(train[1]), mean, std, size))


def file_transform(preprocess: dict[str, Any]) -> v2.Compose:
    """The eval transform of image files from ``DataInfo.preprocess`` (as a checkpoint stores it)."""
    fit = _fit_file(preprocess["image_size"], preprocess["resize"])
    return v2.Compose([*fit, *_normalise(preprocess["mean"], preprocess["std"])])


def _fit_file(size: int, resize: int) -> list[v2.Transform]:
    """A decoded file of any size to ``size`` x ``size``: shorter side to ``resize``, centre crop."""
    return [v2.ToImage(), v2.Resize(resize, antialias=True), v2.CenterCrop(size)]


def _normalise(mean: list[float], std: list[float]) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def _transforms(
    augment: dict[str, Any], size: int, mean: list[float], std: list[float], resize: int | None
) -> tuple[v2.Transform, v2.Transform]:
    """The train transform (``data.augment``) and the eval transform; both end in normalisation.

    Files (any size; ``resize`` given) are resized and centre-cropped to ``size`` first; tensors have it.
    """
    fit = [] if resize is None else _fit_file(size, resize)
    crop = {
        "none": fit,
        "pad": [*fit, v2.RandomCrop(size, padding=augment["padding"])],
        "resized": [*fit[:1], v2.RandomResizedCrop(size, antialias=True)],
    }[augment["crop"]]
    flip = [v2.RandomHorizontalFlip()] if augment["hflip"] else []
    normalise = _normalise(mean, std)
    return v2.Compose([*crop, *flip, *normalise]), v2.Compose([*fit, *normalise])


def _val_split(n: int, cfg: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of a validation split of ``data.val_fraction`` and the rest, fixed by ``data.split_seed``."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg["split_seed"]))
    n_val = round(n * cfg["val_fraction"])
    return order[:n_val], order[n_val:]


def _cifar_batches(paths: list[Path]) -> Labelled:
    """Concatenate CIFAR batches into uint8 images (N, 3, 32, 32) and labels."""
    parts = [_unpickle(p) for p in paths]
    images = torch.cat([torch.as_tensor(b[b"data"]).view(-1, 3, 32, 32) for b in parts])
    labels = torch.cat([torch.as_tensor(b[b"labels"], dtype=torch.long) for b in parts])
    return images, labels


class _ArraysOnly(pickle.Unpickler):
    """Unpickles data files allowing only numpy arrays and scalars, and the bytes of a batch that Python 3
    pickled again (``_codecs.encode`` of latin-1 text): a crafted file cannot run code."""

    ALLOWED = frozenset(
        {
            (numpy_core, name)
            for numpy_core in ("numpy.core.multiarray", "numpy._core.multiarray")
            for name in ("_reconstruct", "scalar")
        }
        | {("numpy", "ndarray"), ("numpy", "dtype")}
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a data file")


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """How protocol 2 pickles bytes: their latin-1 text, encoded again."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"bytes pickled as {encoding} text are not allowed in a data file")
    return text.encode("latin1")


def _unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            return _ArraysOnly(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise ConfigError(
            f"{path} is not a CIFAR-10 python batch ({err}) — replace it with the original file"
        ) from None


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


def start_worker(worker_id: int) -> None:
    """A loader worker leaves SIGTERM, SIGUSR1 and SIGUSR2 to the training process, which saves at its next
    step and then ends its workers: a scheduler signals every process of a job (SLURM), and workers that
    died of it took the run down before it saved. A SIGTERM from the training process itself (its
    DataLoader's, or multiprocessing's at exit, ending workers that did not stop) still ends the worker.
    Then Lightning's worker seeding, which it adds only to loaders without a ``worker_init_fn``
    (``seed_everything(workers=True)``)."""
    for signum in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):  # not on macOS: there a SIGTERM ends the worker, as before
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # this thread's, and those it starts
        threading.Thread(target=_end_on_parents_sigterm, args=(os.getppid(),), daemon=True).start()
    pl_worker_init_function(worker_id)


def _end_on_parents_sigterm(parent: int) -> None:
    """Take each SIGTERM sent to this worker; one that ``parent`` sent ends it, with exit code 0: the
    DataLoader's SIGCHLD handler, still in place where the run ended by an error, would raise on a worker
    killed by a signal (inside multiprocessing's exit, printing a traceback after the run's one line)."""
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass
    os._exit(0)


def load_imagefolder(cfg: dict[str, Any], trained: Trained | None) -> Splits:
    """Class folders decoded lazily by torchvision: ROOT/train + ROOT/val (+ ROOT/test), or one ROOT split.

    One folder of class folders is split into train/val by ``data.val_fraction`` and ``data.split_seed``
    (test = val). Files are checked before training (``_preflight``); normalisation comes from a seeded
    sample of up to ``STATS_SAMPLE`` training images, and the classes are the training split's class
    folders, unless ``trained`` gives them.
    """
    root, size = _root(cfg, "your class folders"), cfg["image_size"]
    if not root.is_dir() or not class_folders(root):
        raise ConfigError(
            f"data.root '{root}' has no class folders — lay out ROOT/train/<class>/*.jpg and "
            "ROOT/val/<class>/*.jpg (or ROOT/<class>/*.jpg), or pick data=digits"
        )
    found = split_folders(root)
    carve = "val" not in found  # the validation split comes out of the training files
    trees = [found[name] for name in ("train", "val", "test") if name in found] if found else [root]
    for tree in trees[1:]:
        if not class_folders(tree):
            loose = sum(visible_image(f) for f in tree.iterdir())
            raise ConfigError(
                f"'{tree}' has no class folders ({loose} image files directly in it): its labels are "
                f"unknown — sort them into {tree}/<class>/ as in {trees[0]} (ImageNet's val/ comes flat: "
                f"sort it by its ground-truth file), or move {tree} out of data.root"
            )
    classes = trained.classes if trained else class_folders(trees[0])
    if len(classes) < 2:
        raise ConfigError(
            f"'{trees[0]}' has one class folder ({classes[0]}): a classifier needs two or more — "
            "set data.root to the folder that holds the class folders (or their train/ and val/)"
        )
    for tree in trees:  # each split's labels number the same classes: the training split's, or the model's
        unknown = ", ".join(sorted(set(class_folders(tree)) - set(classes)))
        if unknown and trained:
            raise ConfigError(
                f"'{tree}' has class folder(s) that the checkpoint was not trained on ({unknown}) — "
                "remove them, or evaluate a checkpoint trained on them"
            )
        if unknown:
            raise ConfigError(
                f"'{tree}' has class folder(s) that train/ lacks ({unknown}) — add them to {trees[0]} or "
                f"remove them from {tree}"
            )
    sets = [ClassFolders(tree, classes, cfg["on_corrupt"] == "skip") for tree in trees]
    bad = [(path, why) for ds in sets for path, why in _preflight(ds)]
    if bad and cfg["on_corrupt"] == "error":
        shown = "; ".join(f"{path}: {why}" for path, why in bad[:3])
        raise ConfigError(
            f"data.root '{root}' has {len(bad)} unreadable image(s) or empty class folder(s) ({shown}"
            f"{'; ...' if len(bad) > 3 else ''}) — fix or remove them, or set data.on_corrupt=skip"
        )
    unreadable = {path for path, _ in bad}
    for ds in sets:
        ds.samples = ds.imgs = [(p, t) for p, t in ds.samples if p not in unreadable]
        ds.targets = [t for _, t in ds.samples]
        if not ds.samples:
            raise ConfigError(
                f"'{ds.root}' holds no image that can be read ({', '.join(IMAGE_EXTENSIONS)} in its class "
                "folders) — add images, or point data.root at the folder that holds them"
            )
    if carve:
        val_idx, train_idx = _val_split(len(sets[0]), cfg)
        held_out = Subset(copy.copy(sets[0]), val_idx.tolist())
        sets = [Subset(sets[0], train_idx.tolist()), held_out, *sets[1:]]
        for ds in sets[:2]:
            ds.dataset.members = ds.indices  # a file that cannot be decoded is replaced from its own split
    resize = round(size / EVAL_CROP)
    mean, std = trained[:2] if trained else _file_stats(sets[0], size, resize, cfg["split_seed"])
    if cfg.get("decode") == "device":  # the workers read files and draw crops; the device decodes them
        augment = cfg["augment"]
        train_tf, eval_tf = PlanCrop(augment["crop"], augment["hflip"]), PlanCrop()
        for ds in sets:
            _base(ds).loader = functools.partial(FileImage.read, share=cfg["worker_decode_share"])
    else:
        train_tf, eval_tf = _transforms(cfg["augment"], size, mean, std, resize)
    _set_transform(sets[0], train_tf)
    for ds in sets[1:]:
        _set_transform(ds, eval_tf)
    classes = list(_base(sets[0]).classes)
    skipped = tuple(f"{p}: {w}" for p, w in bad)
    info = DataInfo(len(classes), 3, size, classes, len(sets[0]), mean, std, resize, skipped)
    return sets[0], sets[1], sets[2] if len(sets) > 2 else sets[1], info


def undecodable(path: str, why: str, skip: bool, stand_in: str) -> None:
    """A file that does not decode, for the reason ``why``: stops the run with one line naming it, or under
    ``data.on_corrupt=skip`` (``skip``) warns that ``stand_in`` takes its place. The check before training
    reads only headers and end markers, so this is where the rest of a broken file shows."""
    why = " ".join(why.split()[:12])
    if not skip:
        raise ConfigError(
            f"{path} cannot be decoded ({why}) — fix or remove it, or set data.on_corrupt=skip"
        ) from None  # called where the decoder's error is handled: its traceback is not the user's
    log.warning(f"{path} cannot be decoded ({why}): {stand_in} stands in")


class ClassFolders(datasets.ImageFolder):
    """torchvision's ImageFolder with three changes (each through a method torchvision documents for
    overriding). The classes are given (``find_classes``): numbered from its own sorted folder names, a split
    lacking a class folder would give the rest labels that name other classes than the model's outputs.
    The files are ``folder_images``' (``make_dataset``): hidden files and folders are not images, and a
    symlink back up the tree is not walked again. A file that cannot be decoded (``__getitem__``; the
    check before training reads only headers and end markers) stops the run with one line, or under
    ``data.on_corrupt=skip`` is replaced by the next file of its split, with a warning."""

    def __init__(self, root: Path, classes: list[str], skip_corrupt: bool = False) -> None:
        self.given, self.skip_corrupt = classes, skip_corrupt
        self.members: list[int] | None = None  # the indices of its split where that is a part of it
        self._skipped: set[str] = set()
        super().__init__(str(root), loader=load_rgb, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self.given, {name: i for i, name in enumerate(self.given)}

    @staticmethod
    def make_dataset(
        directory: str | Path, class_to_idx: dict[str, int], *args: Any, **kwargs: Any
    ) -> list[tuple[str, int]]:
        return [
            (str(path), class_to_idx[name])
            for name in sorted(class_to_idx)
            for path in folder_images(Path(directory) / name)
        ]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        order = self.members if self.members is not None else range(len(self.samples))
        for _ in range(len(order)):
            path, target = self.samples[index]
            try:
                sample = self.loader(path)
            except Exception as err:  # decoders raise OSError, SyntaxError, ValueError, DecompressionBomb...
                if path not in self._skipped:
                    why = str(err) or type(err).__name__
                    undecodable(path, why, self.skip_corrupt, "the next file of its split")
                    self._skipped.add(path)
                index = order[(list(order).index(index) + 1) % len(order)]
                continue
            return (self.transform(sample) if self.transform else sample), target
        raise ConfigError(f"no file of '{self.root}' can be decoded — check its images, or data.root")


SPLIT_NAMES = {  # a split's folder, in any case: Fruits-360's Training/Test, Kaggle's valid/
    "train": ("train", "training"),
    "val": ("val", "valid", "validation"),
    "test": ("test", "testing"),
}
IMAGE_EXTENSIONS = (*IMG_EXTENSIONS, ".gif", ".jfif")  # torchvision's, and two more that Pillow reads


def split_folders(root: Path) -> dict[str, Path]:
    """ROOT's split folders by split (``SPLIT_NAMES``), or none where ROOT has no training folder."""
    folders = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    found = {
        split: next(folders[name] for name in names if name in folders)
        for split, names in SPLIT_NAMES.items()
        if any(name in folders for name in names)
    }
    return found if "train" in found else {}


def hidden(name: str) -> bool:
    """A file or folder that is no image or class: dot names (``.ipynb_checkpoints``, macOS's ``._*``
    forks, NAS thumbnail folders) and the ``__MACOSX`` folder of a zip made on a Mac."""
    return name.startswith(".") or name == "__MACOSX"


def class_folders(root: Path) -> list[str]:
    """The names of ``root``'s class folders, sorted: its sub-folders but the hidden ones."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not hidden(p.name))


def visible_image(path: str | Path) -> bool:
    """An image file by its extension (``IMAGE_EXTENSIONS``), and not hidden."""
    name = Path(path).name
    return not hidden(name) and has_file_allowed_extension(name, IMAGE_EXTENSIONS)


def folder_images(folder: Path) -> list[Path]:
    """The image files anywhere under ``folder``, in torchvision's order: symlinked folders are followed
    (torchvision follows them), except one that leads back to ``folder`` or above it, or to a folder
    already walked; hidden files and folders are left out. A broken link named like an image is listed,
    for the check before training to name it."""
    top, seen, found = Path(os.path.realpath(folder)), set(), []
    for here, dirs, files in os.walk(folder, followlinks=True):
        real = Path(os.path.realpath(here))
        if real in seen or (real != top and top.is_relative_to(real)):
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not hidden(d)]
        found.append((here, [f for f in files if visible_image(f)]))
    return [Path(here, name) for here, files in sorted(found) for name in sorted(files)]


def _file_stats(train: Dataset, size: int, resize: int, seed: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a seeded sample of training images, resized like the eval split."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:STATS_SAMPLE]
    fit = v2.Compose(_fit_file(size, resize))  # the files as decoded before a transform is set
    return _channel_stats(torch.stack([fit(train[int(i)][0]) for i in order]))


def _channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and (sample) std of uint8 images (N, C, H, W) scaled to [0, 1]; a constant channel
    gets std 1.

    Exact: integer sums of the pixels and of their squares, a chunk of images at a time (4x faster than
    the float statistics on CIFAR-10's training split, and without its 0.6 GB float copy).
    """
    pixels = images.numpy().reshape(len(images), images.shape[1], -1)
    sums = np.zeros((2, pixels.shape[1]), dtype=np.uint64)
    for start in range(0, len(pixels), chunk):
        part = pixels[start : start + chunk]
        sums[0] += part.sum(axis=(0, 2), dtype=np.uint64)
        sums[1] += np.square(part, dtype=np.uint16).sum(axis=(0, 2), dtype=np.uint64)
    n = pixels.shape[0] * pixels.shape[2]
    total, squares = ([int(v) for v in row] for row in sums)
    # n (n - 1) var = n Σx² - (Σx)², in integers (pixels 0-255): exactly 0 for a constant channel
    spread = [
        math.sqrt((n * q - t * t) / (n * max(n - 1, 1))) / 255 for t, q in zip(total, squares, strict=True)
    ]
    return [t / n / 255 for t in total], [s if s > 0 else 1.0 for s in spread]


def _base(ds: Dataset) -> datasets.ImageFolder:
    return ds.dataset if isinstance(ds, Subset) else ds


def _set_transform(ds: Dataset, transform: v2.Transform) -> None:
    _base(ds).transform = transform


FIT = (0, 0, 0, 0)  # a FileImage's box for "fit the file as the eval split does" (``_fit_file``)


@dataclass
class FileImage:
    """An image file as a loader worker hands it over under ``data.decode=device``: undecoded where the
    device decodes it, and the box of the file's pixels to crop to the training size (drawn in the worker,
    seeded like every augmentation) with whether to flip it."""

    content: bytes | torch.Tensor  # a JPEG's bytes; other files (PNG, CMYK, ...) decoded here (3, H, W)
    height: int
    width: int
    path: str
    box: tuple[int, int, int, int] = FIT  # top, left, height, width; FIT: as the eval split
    flip: bool = False

    @classmethod
    def read(cls, path: str, share: float = 0.0) -> FileImage:
        """The file's bytes where it is a baseline RGB or grey JPEG (nvJPEG's), else its RGB pixels; also
        the pixels of the ``share`` of JPEG files (``data.worker_decode_share``) that the worker decodes
        itself, the same files in every epoch (picked by a hash of the path), to unload the device."""
        data = Path(path).read_bytes()  # read once: the header is parsed from these bytes
        with Image.open(io.BytesIO(data)) as image:
            jpeg = image.format == "JPEG" and image.mode in ("RGB", "L")
            width, height = image.size
        if jpeg and zlib.crc32(path.encode()) % 1024 >= share * 1024:
            return cls(data, height, width, path)
        pixels = TF.pil_to_tensor(load_rgb(io.BytesIO(data)))
        return cls(pixels, pixels.shape[1], pixels.shape[2], path)


class PlanCrop:
    """Where a ``FileImage`` is cropped: a random-resized box (``crop=resized``, torchvision's draw from the
    file's size alone), or ``FIT``; and whether it is flipped."""

    def __init__(self, crop: str = "none", hflip: bool = False) -> None:
        self.random, self.hflip = crop == "resized", hflip

    def __call__(self, file: FileImage) -> FileImage:
        h, w = file.height, file.width
        box = FIT
        if self.random:
            box = tuple(
                RandomResizedCrop.get_params(torch.empty(()).expand(1, h, w), [0.08, 1.0], [3 / 4, 4 / 3])
            )
        flip = self.hflip and bool(torch.rand(()) < 0.5)
        return FileImage(file.content, h, w, file.path, box, flip)


@dataclass
class FileBatch:
    """A batch of ``FileImage`` (``data.decode=device``): decoded, cropped and normalised where it trains.

    The JPEGs travel as one tensor of their bytes, one after another, and the files decoded in the worker
    as one tensor of their pixels: a worker hands the batch over in two shared-memory blocks, not one per
    file, and the device takes the pixels in one copy.
    """

    jpegs: torch.Tensor  # uint8
    sizes: list[int]  # each JPEG's byte count, in batch order
    pixels: torch.Tensor  # uint8: the other files' (3, H, W) pixels, flattened, one after another
    shapes: list[tuple[int, int]]  # their (H, W), in batch order
    encoded: list[bool]  # per image: a JPEG (else the next of ``pixels``)
    boxes: list[tuple[int, int, int, int]]
    flips: list[bool]
    labels: torch.Tensor
    paths: list[str]
    skip_corrupt: bool  # data.on_corrupt=skip: a JPEG that does not decode gives way to another of the batch

    @classmethod
    def collate(cls, samples: list[tuple[FileImage, int]], skip_corrupt: bool = False) -> FileBatch:
        files = [file for file, _ in samples]
        jpegs = [f.content for f in files if isinstance(f.content, bytes)]
        pixels = [f.content for f in files if isinstance(f.content, torch.Tensor)]
        return cls(
            torch.frombuffer(bytearray(b"".join(jpegs)), dtype=torch.uint8) if jpegs else torch.empty(0),
            [len(j) for j in jpegs],
            torch.cat([p.flatten() for p in pixels]) if pixels else torch.empty(0, dtype=torch.uint8),
            [(p.shape[1], p.shape[2]) for p in pixels],
            [isinstance(f.content, bytes) for f in files],
            [f.box for f in files],
            [f.flip for f in files],
            torch.tensor([label for _, label in samples]),
            [f.path for f in files],
            skip_corrupt,
        )

    def decode(self, device: torch.device, info: DataInfo) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float images (N, 3, size, size) and labels on ``device``. The JPEGs are decoded in one
        call (nvJPEG on a GPU, libjpeg on the CPU); boxes and fitted files are resized with antialiasing, as
        torchvision's transforms resize tensors (``_crop_resizer``: on a GPU in one launch for the batch)."""
        jpegs = list(self.jpegs.split(self.sizes)) if self.sizes else []
        if jpegs and device.type == "cuda":
            # nvJPEG's hardware decoder (A100, H100, H200) writes its outputs before the work queued on the
            # stream has run, into memory the caching allocator has handed back while queued kernels still
            # read it: NaNs in the training step on an H200 (vision#9606, torchcodec#1634). Drain it first.
            torch.cuda.current_stream(device).synchronize()
        try:
            decoded = iter(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device) if jpegs else [])
        except RuntimeError:  # a file whose headers read but whose data does not decode: one by one
            decoded = iter(self._decode_each(jpegs, device))
        others = iter(self.decoded_in_workers(device))
        files = [next(decoded) if jpeg else next(others) for jpeg in self.encoded]
        boxes, flips, labels = self.boxes, self.flips, self.labels
        if None in files:  # under data.on_corrupt=skip: the next decoded image of the batch stands in
            good = [i for i, file in enumerate(files) if file is not None]
            if not good:
                raise ConfigError(f"no file of a batch decodes ({', '.join(self.paths)}) — check data.root")
            stand_in = [min(good, key=lambda j, i=i: (j < i, j)) for i in range(len(files))]
            files, boxes, flips = ([seq[i] for i in stand_in] for seq in (files, boxes, flips))
            labels = labels[stand_in]
        images = _crop_resizer(device)(files, boxes, flips, info)
        return images, labels.to(device, non_blocking=True)

    def decoded_in_workers(self, device: torch.device) -> list[torch.Tensor]:
        """The files the workers decoded, (3, H, W) each in batch order, on ``device`` in one copy (none
        where there are none: the usual batch of JPEGs alone)."""
        if not self.shapes:
            return []
        flat = self.pixels.to(device, non_blocking=True).split([3 * h * w for h, w in self.shapes])
        return [image.view(3, h, w) for image, (h, w) in zip(flat, self.shapes, strict=True)]

    def _decode_each(self, jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
        """Each JPEG decoded on its own: a file that does not decode stops the run with one line naming it,
        or under ``data.on_corrupt=skip`` is None, with a warning."""
        paths = [path for path, jpeg in zip(self.paths, self.encoded, strict=True) if jpeg]
        images: list[torch.Tensor | None] = []
        for path, jpeg in zip(paths, jpegs, strict=True):
            try:
                images.append(decode_jpeg(jpeg, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as err:
                undecodable(path, str(err).split(", ")[-1], self.skip_corrupt, "another image of its batch")
                images.append(None)
        return images


CropResize = Callable[
    [list[torch.Tensor], list[tuple[int, int, int, int]], list[bool], DataInfo], torch.Tensor
]


@functools.cache
def _crop_resizer(device: torch.device) -> CropResize:
    """How a batch of decoded images is cropped, resized, flipped and normalised on ``device``: in one
    launch (``t240dist.crops``) where ``device`` is a GPU that Triton compiles for (compute capability 7.0
    or newer; Triton comes with torch's CUDA wheels for Linux) and the kernel passes ``_kernel_failure``
    there; else image by image (``_crop_resize_each``), with a warning where the kernel failed (Triton
    builds its launcher with the host's C compiler)."""
    if device.type != "cuda" or importlib.util.find_spec("triton") is None:
        return _crop_resize_each
    if torch.cuda.get_device_capability(device) < (7, 0):
        return _crop_resize_each
    from t240dist import crops

    if (failure := _kernel_failure(crops.crop_resize, device)) is None:
        return crops.crop_resize
    log.warning("data.decode=device resizes image by image on %s: the batch kernel %s", device, failure)
    return _crop_resize_each


def _kernel_failure(crop_resize: CropResize, device: torch.device) -> str | None:
    """Why ``crop_resize`` cannot stand in for ``_crop_resize_each`` on ``device``, or None: it is run once
    on a random image fitted, shrunk and flipped, and enlarged."""
    image = torch.randint(0, 256, (3, 45, 61), dtype=torch.uint8, generator=_generator("crops"))
    info = DataInfo(2, 3, 16, [], 1, [0.5, 0.4, 0.3], [0.2, 0.3, 0.4], 18)
    boxes, flips = [FIT, (3, 5, 30, 41), (20, 40, 9, 7)], [False, True, False]
    expected = _crop_resize_each([image] * 3, boxes, flips, info)
    try:
        got = crop_resize([image.to(device)] * 3, boxes, flips, info).cpu()
    except Exception as err:  # any failure: the per-image resize still decodes every batch
        return f"failed: {type(err).__name__}: {err}"
    worst = float((got - expected).abs().max())
    return None if worst < 1e-4 else f"is {worst:.2g} from the per-image resize"


def _crop_resize_each(
    images: list[torch.Tensor], boxes: list[tuple[int, int, int, int]], flips: list[bool], info: DataInfo
) -> torch.Tensor:
    """A batch image by image: per image a conversion and a resize (``_crop_and_resize``), the flips and the
    normalisation on the batch."""
    batch = torch.cat([_crop_and_resize(image, box, info) for image, box in zip(images, boxes, strict=True)])
    flipped = torch.tensor(flips).to(batch.device, non_blocking=True)
    batch = torch.where(flipped[:, None, None, None], batch.flip(-1), batch)
    return TF.normalize(batch.div_(255), info.mean, info.std, inplace=True)


def _crop_and_resize(pixels: torch.Tensor, box: tuple[int, int, int, int], info: DataInfo) -> torch.Tensor:
    """One image (3, H, W) of bytes as a (1, 3, size, size) float batch: its box resized, or the file fitted
    as ``_fit_file`` fits it for the eval split."""
    size = info.image_size
    if box == FIT:
        return TF.center_crop(TF.resize(pixels.float(), [info.resize], antialias=True), [size])[None]
    top, left, height, width = box  # cropped before the conversion: only the box becomes floats
    crop = pixels[None, :, top : top + height, left : left + width].float()
    return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class DecodedAhead:
    """A loader of ``FileBatch`` whose batches are decoded ``depth`` batches ahead, in a thread, on a CUDA
    stream of their own: nvJPEG and the crops run while the GPU trains on the batch before.

    Each batch is handed to the training stream behind an event, its memory kept until that stream is done
    with it. Decoding on the training stream instead would serialise decode and step: nvJPEG's hardware
    engine forces a drain of the stream it decodes on (``FileBatch.decode``), and that drain would wait for
    the step. On the CPU the thread decodes ahead without streams. Like a DataLoader it has a length and a
    ``sampler`` (Lightning sets its epoch); an iteration left early stops the thread.

    The DataLoader's iterator, and so its workers, is made in the calling thread, as for any DataLoader;
    the decode thread only takes batches from it. Its workers last from epoch to epoch when the DataLoader
    has ``persistent_workers`` (forking 16 at each epoch and validation took 10 % of the training thread of
    a 3-epoch ResNet-50 run on an H200), until ``close``.
    """

    batch_sampler = None

    def __init__(self, loader: DataLoader, device: torch.device, info: DataInfo, depth: int = 2) -> None:
        self.loader: DataLoader | None = loader
        self.device, self.info, self.depth = device, info, depth
        self.sampler = loader.sampler
        self._iteration: Generator[tuple[torch.Tensor, torch.Tensor], None, None] | None = None

    def __len__(self) -> int:
        # closed: no batches left (Lightning's teardown after an exception still asks, then iterates no more)
        return 0 if self.loader is None else len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._iteration = self._decode_ahead(self._open())
        return self._iteration

    def close(self) -> None:
        """Stop an iteration under way and end the loader's workers: torch shuts persistent workers down
        when the DataLoader's iterator is freed, which dropping the DataLoader does (it is held here only)."""
        if self._iteration is not None:
            self._iteration.close()
        self.loader = self._iteration = None

    def _open(self) -> DataLoader:
        if self.loader is None:
            raise RuntimeError("this DecodedAhead was closed (its data module's teardown); make a new loader")
        return self.loader

    def _decode_ahead(self, loader: DataLoader) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
        ready: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        batches = iter(loader)

        def offer(item: Any) -> bool:
            """Queue ``item`` once there is room; False if the iteration was left meanwhile."""
            while not stop.is_set():
                with contextlib.suppress(queue.Full):
                    ready.put(item, timeout=0.1)
                    return True
            return False

        def decode_all() -> None:
            try:
                # (the stream's context also makes its device the thread's current device)
                with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                    for batch in batches:
                        images, labels = batch.decode(self.device, self.info)
                        done = torch.cuda.Event() if cuda else None
                        if done is not None:
                            done.record(stream)
                        if not offer((images, labels, done)):
                            return
                offer(None)
            except BaseException as err:  # raised where the batches are taken
                offer(err)

        thread = threading.Thread(target=decode_all, name="t240dist-decode", daemon=True)
        thread.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                images, labels, done = item
                if done is not None:
                    training = torch.cuda.current_stream(self.device)
                    training.wait_event(done)
                    images.record_stream(training)
                    labels.record_stream(training)
                yield images, labels
        finally:
            stop.set()
            thread.join()


def load_rgb(path: str | io.BytesIO) -> Image.Image:
    """Open any image as RGB: CMYK, palette, grey and 16-bit files are converted, not rejected."""
    with Image.open(path) as image:
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey (Pillow may open it as mode I)
            image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8))
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
        if n == 0 and (Path(dataset.root) / c).is_dir()  # an evaluation split may lack a class
    ]
    for path, _ in dataset.samples:
        reason = _unreadable(Path(path))
        if reason:
            bad.append((path, reason))
    return bad


def _unreadable(path: Path) -> str | None:
    """Why a file cannot be trained on, or None. A JPEG or PNG whose end marker is not at its end is
    decoded: it is truncated, or data follows the image (a phone's trailer, a motion photo's video)."""
    try:
        size = path.stat().st_size
    except OSError as err:  # a broken link, a file without read permission
        return f"cannot be read ({err.strerror})"
    if size == 0:
        return "empty file"
    kind = None
    try:
        with Image.open(path) as image:
            kind = image.format
            with path.open("rb") as f:
                f.seek(max(0, size - 64))
                tail = f.read().rstrip(b"\0")
            ended = {"JPEG": tail.endswith(b"\xff\xd9"), "PNG": b"IEND" in tail[-12:]}.get(kind, True)
            if not ended:
                image.load()
    except Image.DecompressionBombError as err:
        return f"too large for Pillow ({str(err).split(',')[0]})"  # its decompression-bomb limit
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return "not an image" if kind is None else f"truncated {kind}"
    return None


_LOADERS = {
    "digits": load_digits,
    "synthetic": load_synthetic,
    "cifar10": load_cifar10,
    "mnist": load_mnist,
    "imagefolder": load_imagefolder,
}
