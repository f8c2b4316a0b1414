"""Non-finite values: a NaN/inf loss or gradient stops the run naming the step, or skips that update;
a model with NaN/inf weights is never written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY, compose, run_cli
from torch.utils.data import DataLoader, TensorDataset

from t240dist.callbacks import NonFiniteGuard
from t240dist.checkpoint import KEY_ENV, load_checkpoint
from t240dist.config import validate
from t240dist.data import DataInfo, ImageDataModule
from t240dist.errors import NonFiniteError
from t240dist.fit import build_trainer
from t240dist.module import ClassifierModule

POISONED_BATCH = 3


def test_diverging_run_stops_at_the_bad_step_and_writes_no_nan_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "test-key")
    run_dir = tmp_path / "run"
    done = run_cli(
        [*TINY, "optim.lr=1e6", "checkpoint.every_n_steps=1", f"hydra.run.dir={run_dir}"], tmp_path
    )
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    # the loss check, or the save of the step when BatchNorm statistics overflowed first
    found = re.fullmatch(r"NonFiniteError: .+ NaN/inf at step (\d+)[ ,].+ — .+", last)
    assert found, last
    bad_step = int(found.group(1))
    saved = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert saved, "the steps before the bad one were saved"
    for path in saved:
        ckpt = load_checkpoint(path, trust_unsigned=False)
        assert ckpt["global_step"] <= bad_step
        assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values() if t.is_floating_point())


@pytest.mark.slow
def test_two_ranks_stop_together_at_the_bad_step_and_the_job_says_it_once(tmp_path: Path) -> None:
    """Under DDP the ranks agree on the first bad step (at logging steps) and both stop with the same
    error, which the job prints once: no traceback, no dead rank."""
    args = [
        *TINY,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "optim.lr=1e6",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    done = run_cli(args, tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "RankDied" not in done.stderr
    # (the loss of a step, or the weights that the last step made)
    lines = [line for line in done.stderr.splitlines() if line.startswith("NonFiniteError: ")]
    assert len(lines) == 1 and re.match(r"NonFiniteError: the (loss|weights)[^—]+ at step \d+", lines[0])
    assert done.stderr.strip().splitlines()[-1] == lines[0]


def _fit_with_a_nan_image(run_dir: Path, mode: str) -> tuple[ClassifierModule, object]:
    """A real Trainer of ``python -m train`` on data whose batch ``POISONED_BATCH`` holds a NaN pixel."""
    conf = validate(compose([*TINY, "trainer.max_epochs=1", f"nonfinite={mode}"]))
    batch_size = conf["data"]["batch_size"]
    x = torch.randn(6 * batch_size, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(len(x)) % 10
    x[POISONED_BATCH * batch_size, 0, 0, 0] = float("nan")
    info = DataInfo(
        num_classes=10,
        channels=3,
        image_size=8,
        class_names=list("abcdefghij"),
        train_size=len(x),
        mean=[0.0] * 3,
        std=[1.0] * 3,
        resize=8,
    )
    module = ClassifierModule.from_config(conf, info)
    trainer, _, _ = build_trainer(conf, run_dir)
    clean = TensorDataset(x[:batch_size], y[:batch_size])
    trainer.fit(
        module,
        train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=batch_size),
        val_dataloaders=DataLoader(clean, batch_size=batch_size),
    )
    return module, trainer


def test_skip_drops_only_the_bad_update_and_trains_on(tmp_path: Path) -> None:
    module, trainer = _fit_with_a_nan_image(tmp_path, "skip")
    guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))
    assert guard.skipped == 1
    assert trainer.global_step == 6  # every step ran; one of them left the weights alone
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_stop_names_the_poisoned_step(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteError, match=f"became NaN/inf at step {POISONED_BATCH} — "):
        _fit_with_a_nan_image(tmp_path, "stop")


class NanGradientAt(pl.Callback):
    """Poisons one gradient after the backward pass of step ``step``; the loss stays finite."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.global_step == self.step:
            next(module.parameters()).grad.view(-1)[0] = float("nan")


def _fit_with_a_nan_gradient_at(run_dir: Path, step: int, mode: str) -> tuple[ClassifierModule, pl.Trainer]:
    conf = validate(compose([*TINY, "trainer.max_epochs=1", f"nonfinite={mode}"]))  # 4 steps
    data = ImageDataModule(conf["data"], conf["seed"])
    module = ClassifierModule.from_config(conf, data.info)
    trainer, _, _ = build_trainer(conf, run_dir, extra=[NanGradientAt(step)])
    trainer.fit(module, datamodule=data)
    return module, trainer


@pytest.mark.parametrize(
    ("step", "error"),
    [
        (1, "the loss became NaN/inf at step 2 — "),  # the weights it made give the next step a NaN loss
        (3, r"the weights or buffers \(e.g. BatchNorm statistics\) are NaN/inf at step 4, so no checkpoint"),
    ],
    ids=["mid-run", "last step"],
)
def test_stop_catches_a_nan_gradient_under_a_finite_loss(tmp_path: Path, step: int, error: str) -> None:
    """stop reads no gradient: a NaN one shows in the next step's loss, or after the last step in the
    weights, which the epoch's save checks before it writes anything."""
    with pytest.raises(NonFiniteError, match=error):
        _fit_with_a_nan_gradient_at(tmp_path, step, "stop")
    assert not list((tmp_path / "checkpoints").glob("*.ckpt"))


def test_skip_drops_the_update_of_a_nan_gradient_under_a_finite_loss(tmp_path: Path) -> None:
    module, trainer = _fit_with_a_nan_gradient_at(tmp_path, 1, "skip")
    guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))
    assert guard.skipped == 1 and all(torch.isfinite(p).all() for p in module.parameters())


def test_a_model_with_nan_weights_is_never_saved(tmp_path: Path) -> None:
    module, trainer = _fit_with_a_nan_image(tmp_path, "skip")
    with torch.no_grad():
        next(module.parameters())[0].fill_(float("inf"))
    path = tmp_path / "poisoned.ckpt"
    with pytest.raises(
        NonFiniteError,
        match=r"the weights or buffers \(e.g. BatchNorm statistics\) are NaN/inf at step 6, so no checkpoint",
    ):
        trainer.save_checkpoint(path)
    assert not path.exists() and not list(tmp_path.glob(".poisoned*"))
