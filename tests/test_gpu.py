"""On a CUDA machine (the device): real GPU runs. Run with `pytest -m gpu`."""

from __future__ import annotations

from pathlib import Path

import pytest
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


def test_training_steps_never_synchronise_the_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA's sync debug mode raises on any device-to-host wait inside a step that does not log."""
    from t240dist.module import ClassifierModule

    step = ClassifierModule.training_step

    def strict_step(self: ClassifierModule, batch: object, batch_idx: int) -> torch.Tensor:
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step(self, batch, batch_idx)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(ClassifierModule, "training_step", strict_step)
    overrides = [*TINY, "trainer.log_every_n_steps=50", "module.mixup_alpha=0.2", "model.channels_last=true"]
    assert train(compose(overrides), run_dir=tmp_path)["global_step"] == 8
