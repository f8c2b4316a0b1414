"""Debug presets (debug=fdr|overfit|limit|profiler), early stopping, and any Lightning Trainer argument
given as +trainer.NAME=VALUE: real short runs, and command-line errors whose hints are run to see them."""

from __future__ import annotations

import functools
import json
import logging
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY, compose, run_cli, scalars
from test_loggers import csv_points
from torch.utils.data import DataLoader, Dataset

from t240dist.checkpoint import SignedCheckpointIO
from t240dist.errors import CheckpointError, ConfigError
from t240dist.fit import _profiler
from t240dist.run import train

# TINY without its max_epochs, which a command-line override would hold against a preset's
PRESETS_TINY = [o for o in TINY if not o.startswith("trainer.max_epochs=")]


def test_fast_dev_run_trains_one_batch_saves_nothing_and_says_it_was_a_debug_run(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = tmp_path / "debug"
    summary = train(compose([*TINY, "debug=fdr", "logger=[tensorboard,csv]"]), run_dir)
    assert summary["global_step"] == 1 and summary["best_checkpoint"] is None
    assert summary["debug_run"].startswith("trainer.fast_dev_run=True: a check that the run works")
    assert "debug_run" in capsys.readouterr().out  # the summary table
    assert json.loads((run_dir / "run_summary.json").read_text())["debug_run"] == summary["debug_run"]
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "csv").exists()
    assert not list(run_dir.glob("events.out.tfevents.*"))

    # beside a run that trained, it neither resumes it nor writes its summary over that run's
    trained = tmp_path / "trained"
    train(compose([*TINY, "trainer.max_epochs=1"]), trained)
    before = (trained / "run_summary.json").read_text()
    with pytest.raises(CheckpointError, match=r"saves nothing, but .* holds a run's checkpoints — give the"):
        train(compose([*TINY, "debug=fdr"]), trained)
    assert (trained / "run_summary.json").read_text() == before


def test_overfit_drives_the_training_loss_of_its_few_batches_to_nearly_zero(tmp_path: Path) -> None:
    summary = train(compose([*PRESETS_TINY, "debug=overfit"]), tmp_path)
    loss = [v for _, v in scalars(tmp_path)["train/loss"]]
    assert summary["global_step"] == 2 * 30  # overfit_batches=2 for 30 epochs
    assert loss[-1] < 0.1 * loss[0] and scalars(tmp_path)["train/acc"][-1][1] == 1.0


def test_limit_runs_a_few_batches_of_each_split_with_checkpoints_and_logs(tmp_path: Path) -> None:
    summary = train(compose([*PRESETS_TINY, "data.train_size=512", "debug=limit", "logger=csv"]), tmp_path)
    assert summary["global_step"] == 3 * 5 and summary["epochs"] == 3  # 5 of 16 batches, 3 epochs
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert [s for s, _ in csv_points(tmp_path)["val/acc"]] == [4, 9, 14]
    assert not list(tmp_path.glob("events.out.tfevents.*"))  # logger=csv alone


@pytest.mark.parametrize(("profiler", "mark"), [("simple", "run_training_epoch"), ("advanced", "ncalls")])
def test_a_chosen_profiler_writes_its_report_to_the_run_dir(tmp_path: Path, profiler: str, mark: str) -> None:
    summary = train(compose([*PRESETS_TINY, "debug=profiler", f"trainer.profiler={profiler}"]), tmp_path)
    report = (tmp_path / "fit-profile.txt").read_text()
    assert report.startswith("FIT Profiler Report") and mark in report
    assert 0 < summary["phases_s"]["input_wait"] < summary["train_s"]  # timed under any profiler


DATA_S, STEP_S = 0.02, 0.05  # each item's load, each step's work


class SlowItems(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        time.sleep(DATA_S)
        return torch.ones(2)


class SlowSteps(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: torch.Tensor, _: int) -> torch.Tensor:
        time.sleep(STEP_S)
        return self.layer(batch).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("kind", [None, "simple", "advanced"])
def test_the_run_times_the_training_loops_waits_for_input_and_nothing_else(
    tmp_path: Path, kind: str | None
) -> None:
    """phases_s.input_wait: the loads of every item of 2 epochs (in the loop's process, 0 workers), and
    none of the steps' work, whichever profiler the run has."""
    profiler = _profiler(kind, tmp_path)
    quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2, profiler=profiler, enable_model_summary=False, **quiet
    )
    trainer.fit(SlowSteps(), DataLoader(SlowItems(), batch_size=2))
    loads, steps = 2 * 8 * DATA_S, 2 * 4 * STEP_S
    assert loads <= profiler.input_wait_s < loads + steps / 2


# Runs that early stopping ends: at epoch 1 of 5, no val/loss improving on the first by min_delta=10 (the
# best checkpoint is the last); at epoch 2 of 6, an lr of 1 making val/loss worse after the first epoch (the
# best checkpoint is the first, and the test loads it, callbacks' state included).
EARLY_STOPPED = {
    "best-is-last": (
        [*TINY, "trainer.max_epochs=5", "early_stopping.patience=1", "early_stopping.min_delta=10"],
        1,
    ),
    "best-is-earlier": ([*TINY, "trainer.max_epochs=6", "early_stopping.patience=2", "optim.lr=1.0"], 2),
}


@pytest.mark.parametrize("case", list(EARLY_STOPPED))
def test_early_stopping_stops_on_the_monitored_metric_resumes_exactly_and_reruns_as_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    overrides, stop = EARLY_STOPPED[case]
    run_dir = tmp_path / "run"
    copies: list[Path] = []
    save = SignedCheckpointIO.save_checkpoint

    def save_and_copy(self: SignedCheckpointIO, checkpoint: dict, path: Any, **kwargs: Any) -> None:
        save(self, checkpoint, path, **kwargs)
        self.flush()  # the checkpoint written; the copy is made before training goes on
        copies.append(tmp_path / "saved" / f"{len(copies):02d}")
        shutil.copytree(run_dir, copies[-1])

    monkeypatch.setattr(SignedCheckpointIO, "save_checkpoint", save_and_copy)
    whole = train(compose(overrides), run_dir)
    monkeypatch.undo()
    assert whole["stopped_early_at_epoch"] == stop and whole["epochs"] == stop + 1
    assert whole["global_step"] == 4 * (stop + 1)  # 4 steps an epoch
    best_step = int(Path(whole["best_checkpoint"]).stem.split("step")[1])
    assert (best_step == whole["global_step"]) == (case == "best-is-last")

    resumed = train(compose(overrides), copies[0])  # from the end of epoch 0
    assert resumed["resumed_from"] is not None and resumed["stopped_early_at_epoch"] == stop
    assert resumed["model_fingerprint"] == whole["model_fingerprint"]

    with caplog.at_level(logging.INFO, logger="t240dist"):
        assert train(compose(overrides), run_dir) == whole  # a rerun: nothing left to train
    said = "nothing trained — to train on, rerun with a larger early_stopping.patience"
    assert any(said in message for message in caplog.messages)
    longer = train(compose([*overrides, f"early_stopping.patience={stop + 2}"]), run_dir)
    assert longer["resumed_from"] is not None and longer["global_step"] > whole["global_step"]


def test_any_trainer_argument_reaches_lightnings_trainer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[dict[str, object]] = []  # the keyword arguments of every Trainer the run makes
    original = pl.Trainer

    @functools.wraps(original)  # its signature stays the Trainer's, which the config is checked against
    def recorded(*args: object, **kwargs: object) -> pl.Trainer:
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(pl, "Trainer", recorded)
    extras = {
        "val_check_interval": 0.5,
        "benchmark": False,
        "detect_anomaly": True,
        "max_time": "00:01:00:00",
    }
    overrides = [f"+trainer.{name}={str(value).lower()}" for name, value in extras.items()]
    summary = train(compose([*TINY, *overrides]), tmp_path)
    assert {name: seen[0][name] for name in extras} == extras
    assert [s for s, _ in scalars(tmp_path)["val/acc"]] == [1, 3, 5, 7]  # twice an epoch
    assert summary["global_step"] == 8

    with pytest.raises(
        ConfigError, match=r"^Lightning's Trainer refused a trainer value: `Timer\(duration='1h'\)`"
    ):
        train(compose([*TINY, "+trainer.max_time=1h"]), tmp_path / "refused")


# The commands a hint names: +trainer.NAME=VALUE, trainer.NAME=VALUE, debug=X, logger=X or 'logger=[...]'
HINTED = re.compile(r"'([^']+)'|(\+?trainer\.\w+=[^,? ]+|debug=\w+|logger=\w+)")


@pytest.mark.slow
def test_trainer_argument_errors_name_the_fix_and_the_fix_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cases = {
        "trainer.fast_dev_run=true": ["+trainer.fast_dev_run=true", "debug=fdr"],
        "+trainer.fast_dev_rnu=true": ["+trainer.fast_dev_run=true"],
        "+trainer.max_epoch=1": ["trainer.max_epochs=1"],
        "+trainer.logger=csv": ["logger=csv", "logger=mlflow", "logger=[tensorboard,csv]"],
    }
    with ThreadPoolExecutor(2) as pool:  # the command line as users type it: one line, exit code 2
        errors = list(pool.map(lambda bad: run_cli([*TINY, bad, "hydra.run.dir=bad"], cwd=tmp_path), cases))
    for expected, done in zip(cases.values(), errors, strict=True):
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("ConfigError: "), done.stderr
        named = ["".join(found) for found in HINTED.findall(lines[0].split(" — ", 1)[1])]
        assert named == expected, lines[0]
    assert not (tmp_path / "bad" / "checkpoints").exists()

    monkeypatch.chdir(tmp_path)  # logger=mlflow's default store: ./mlflow.db
    hints = dict.fromkeys(hint for named in cases.values() for hint in named)
    steps = [
        train(compose([*TINY, hint]), tmp_path / f"ok{i}")["global_step"] for i, hint in enumerate(hints)
    ]
    assert steps == [1, 1, 4, 8, 8, 8]  # fast_dev_run twice, one epoch, then three whole runs
