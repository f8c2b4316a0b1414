"""Shared helpers: compose configs like the CLI does, run the CLI, read TensorBoard event files back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from t240dist.config import compose_config

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


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in the run dir's event files, as (step, value) pairs."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
