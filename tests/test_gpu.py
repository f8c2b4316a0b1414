"""On a CUDA machine (the device): real GPU runs. Run with `pytest -m gpu`."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY, compose

from t240dist.run import train

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA GPU: run them on the device with `pytest -m gpu`")


def test_auto_picks_the_gpu_and_bf16_trains(tmp_path: Path) -> None:
    summary = train(compose([*TINY, "trainer.precision=bf16-mixed"]), run_dir=tmp_path)
    assert summary["devices"] == [torch.cuda.get_device_name(0)] and summary["precision"] == "bf16-mixed"
    assert summary["test_loss"] == summary["test_loss"]  # finite, not NaN


class StrictSync(pl.Callback):
    """CUDA's sync debug mode set to raise over whole training steps 1 and 2, Lightning's loop included."""

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == 1:
            torch.cuda.set_sync_debug_mode("error")
        elif trainer.global_step == 3:
            torch.cuda.set_sync_debug_mode("default")


def test_training_steps_never_synchronise_the_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = pl.Trainer

    def strict_trainer(*args: object, callbacks: list, **kwargs: object) -> pl.Trainer:
        return original(*args, callbacks=[*callbacks, StrictSync()], **kwargs)

    monkeypatch.setattr(pl, "Trainer", strict_trainer)
    overrides = [*TINY, "trainer.log_every_n_steps=50", "trainer.enable_progress_bar=true"]
    overrides += ["module.mixup_alpha=0.2", "model.channels_last=true", "trainer.precision=bf16-mixed"]
    try:
        assert train(compose(overrides), run_dir=tmp_path)["global_step"] == 8
    finally:
        torch.cuda.set_sync_debug_mode("default")
