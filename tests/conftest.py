"""Shared helpers: compose configs like the CLI does, run the CLI, read TensorBoard event files back."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from t240dist.checkpoint import KEY_ENV
from t240dist.config import compose_config
from t240dist.data import FIT, DataInfo, ImageDataModule

# A run that takes a few seconds on two CPU cores: tiny synthetic images, tiny CNN, two epochs.
TINY = [
    "data=synthetic",
    "data.image_size=8",
    "data.train_size=128",
    "data.val_size=64",
    "data.test_size=64",
    "data.batch_size=32",
    "model.width=8",
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
]


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)


@pytest.fixture
def reap() -> Iterator[list[subprocess.Popen]]:
    """Processes a test started in sessions of their own: whatever is left of them is killed at its end."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def start_run(args: list[str], run_dir: Path, reap: list[subprocess.Popen]) -> subprocess.Popen:
    """``python -m train ARGS`` into ``run_dir``, signed with the tests' key, in a session of its own (a
    signal to it reaches nothing else; ``reap`` kills what is left of it): its stderr piped, as text."""
    job = subprocess.Popen(
        [sys.executable, "-m", "train", *args, f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent,
        env={**os.environ, KEY_ENV: "test-key"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    reap.append(job)
    return job


def compose(overrides: list[str]) -> DictConfig:
    return compose_config(overrides)


def run_cli(
    args: list[str], cwd: Path, timeout: float = 300, entry: str = "train", **env: str
) -> subprocess.CompletedProcess:
    """Run ``python -m ENTRY ARGS`` (``train``, ``train.evaluate``, ...) in a subprocess; capture output."""
    full_env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    full_env.update(PYTHONUNBUFFERED="1", **env)
    return subprocess.run(
        [sys.executable, "-m", entry, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# What Lightning, torch and the libraries print that t240dist silences or answers better (t240dist.noise)
NOISE = (
    "💡 Tip",
    "was configured so 100%",
    "LeafSpec",
    "Total FLOPs",
    "ExperimentalWarning",
    "Skipping constant folding",
    "unused nodes",
    "Our suggested max number of worker",
)


def fits_80_columns(output: str, paths: list[str]) -> None:
    """Every line of a table or tree in ``output`` fits 80 columns, and each path is whole on one line."""
    drawn = [line for line in output.splitlines() if any(c in line for c in "│┃┌└┏┗━─")]
    assert drawn and max(len(line) for line in drawn) <= 80, max(drawn, key=len)
    for path in paths:
        assert any(path in line for line in output.splitlines()), path


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in the run dir's event files, as (step, value) pairs: what TensorBoard shows, where
    a file that starts at an earlier step than the last one reached (a resumed run) drops the points from
    that step on (its purge of a restart's orphans).

    The files are taken in the order they were made, each read on its own: TensorBoard takes a folder's
    files in name order, in which those that one process makes within a second sort by a counter as text
    (…10 before …9), and would purge the wrong points (runs in one test process)."""
    files = []
    for path in run_dir.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        points = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
        files.append((acc.FirstEventTimestamp(), points))
    curves: dict[str, list[tuple[int, float]]] = {}
    for _, points in sorted(files, key=lambda made: made[0]):
        start = min((step for tag in points.values() for step, _ in tag), default=None)
        if start is None:
            continue
        curves = {tag: [(s, v) for s, v in kept if s < start] for tag, kept in curves.items()}
        for tag, new in points.items():
            curves.setdefault(tag, []).extend(new)
    return {tag: kept for tag, kept in curves.items() if kept}


def assert_same_end(run_dir: Path, whole_dir: Path, since: int = 0) -> None:
    """The run in ``run_dir`` ended as the one in ``whole_dir``: the same weights (``model_fingerprint``),
    test metrics and curves from step ``since`` on, every tag at every step once with equal values
    (``perf/images_per_s``, a timing: equal steps)."""
    got, want = (json.loads((d / "run_summary.json").read_text()) for d in (run_dir, whole_dir))
    keys = ("model_fingerprint", "test_acc", "test_loss")
    assert {k: got[k] for k in keys} == {k: want[k] for k in keys}
    curves = scalars(run_dir)
    expected = {tag: [(s, v) for s, v in points if s >= since] for tag, points in scalars(whole_dir).items()}
    assert curves.keys() == {tag for tag, points in expected.items() if points}
    for tag, points in curves.items():
        if tag == "perf/images_per_s":
            assert [s for s, _ in points] == [s for s, _ in expected[tag]], tag
        else:
            assert points == expected[tag], tag


def process_tree(root: int) -> dict[int, dict[str, str]]:
    """The live descendants of ``root``, each with the environment it was started with (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue  # ended while we looked
    tree, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid in [pid for pid, ppid in parents.items() if ppid == parent]:
            try:
                raw = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            tree[pid] = dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
            frontier.append(pid)
    return tree


def wait_for_checkpoint(pattern: Path, min_step: int) -> None:
    """Wait (up to 2 minutes) until a checkpoint matching ``pattern`` of step ``min_step`` or later exists."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if any(int(p.stem.split("step")[1]) >= min_step for p in pattern.parent.glob(pattern.name)):
            return
        time.sleep(0.02)


def crop_cases(
    seed: int, count: int, sizes: tuple[int, int], device: str = "cpu"
) -> tuple[list[torch.Tensor], list[tuple[int, int, int, int]], list[bool]]:
    """Random uint8 images (3, H, W), H and W drawn from ``sizes``, each with a random-resized box (as
    torchvision draws it) or ``FIT`` (every third), and a random flip: the cases a batch of files brings."""
    rng = np.random.default_rng(seed)
    images, boxes, flips = [], [], []
    for k in range(count):
        h, w = (int(rng.integers(*sizes)) for _ in range(2))
        image = torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)).to(device)
        images.append(image)
        torch.manual_seed(seed * 1000 + k)
        boxes.append(
            FIT if k % 3 == 0 else tuple(RandomResizedCrop.get_params(image, [0.08, 1], [3 / 4, 4 / 3]))
        )
        flips.append(bool(rng.integers(2)))
    return images, boxes, flips


def crop_info(size: int, resize: int, mean: list[float], std: list[float]) -> DataInfo:
    """The data facts a batch resize reads: the size, the fitted files' shorter side, the normalisation."""
    return DataInfo(2, 3, size, [], 1, mean, std, resize)


def decoded_both_ways(
    workers: ImageDataModule, device: ImageDataModule
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each split's first batch decoded by the loader workers and by ``data.decode=device``: its labels as
    each gives them, and how far apart their pixels are, in grey levels (on the host)."""
    std = torch.tensor(workers.info.std).view(1, -1, 1, 1)
    for loader in ("train_dataloader", "val_dataloader"):
        x, y = next(iter(getattr(workers, loader)()))
        decoded, labels = next(iter(getattr(device, loader)()))
        assert decoded.shape == x.shape
        yield y, labels.cpu(), (decoded.cpu() - x).abs() * std * 255


def torchvision_crop(
    image: torch.Tensor, box: tuple[int, int, int, int], flip: bool, info: DataInfo
) -> torch.Tensor:
    """What torchvision's transforms make of a uint8 image, its box (or ``FIT``: resize then centre-crop),
    a flip and the normalisation: the reference for every GPU decode path."""
    pixels, size = image.float(), info.image_size
    if box == FIT:
        fitted = TF.center_crop(TF.resize(pixels, [info.resize], antialias=True), [size])
    else:
        fitted = TF.resized_crop(pixels, *box, [size, size], antialias=True)
    return TF.normalize((TF.horizontal_flip(fitted) if flip else fitted) / 255, info.mean, info.std)
