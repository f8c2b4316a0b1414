"""The logger group: TensorBoard, CSV and MLflow receive the same points, each read back by its own reader
(TensorBoard's event files, the CSV file, MLflow's client), and a resumed run holds each step once in all."""

from __future__ import annotations

import csv
import itertools
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import TINY, compose, scalars

from t240dist.checkpoint import SignedCheckpointIO
from t240dist.config import validate
from t240dist.errors import ConfigError
from t240dist.loggers import RUN_DIR_TAG
from t240dist.run import train

ALL = "logger=[tensorboard,csv,mlflow]"
TIMED = "perf/images_per_s"  # its values are timings: only its steps must match

Points = dict[str, list[tuple[int, float]]]


def csv_points(run_dir: Path) -> Points:
    """Every metric of ``<run dir>/csv/metrics.csv``, as (step, value) pairs in file order."""
    points: Points = {}
    with (run_dir / "csv" / "metrics.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            step = int(row.pop("step"))
            for key, value in row.items():
                if value != "":
                    points.setdefault(key, []).append((step, float(value)))
    return points


def mlflow_run(uri: str, run_dir: Path) -> tuple[Any, Points]:
    """The MLflow run of ``run_dir`` (the only one with its tag) and every metric's history, by step."""
    from mlflow.tracking import MlflowClient

    if uri.startswith("file:"):
        os.environ.setdefault(
            "MLFLOW_ALLOW_FILE_STORE", "true"
        )  # MLflow 3 opens a folder store only if asked
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("t240dist")
    runs = client.search_runs([experiment.experiment_id], f"tags.`{RUN_DIR_TAG}` = '{run_dir.absolute()}'")
    assert len(runs) == 1, runs
    run = runs[0]
    history = {key: client.get_metric_history(run.info.run_id, key) for key in run.data.metrics}
    return run, {key: sorted((m.step, m.value) for m in points) for key, points in history.items()}


def assert_same_points(got: Points, want: Points, tensorboard: bool = False) -> None:
    """Each metric at the same steps, each step once, with equal values (timings: equal steps).

    TensorBoard stores float32: its values are compared to the others' float64 to float32's precision.
    """
    assert got.keys() == want.keys()
    for key, points in want.items():
        steps = [s for s, _ in got[key]]
        assert steps == [s for s, _ in points] and len(set(steps)) == len(steps), key
        if key != TIMED:
            values = [v for _, v in points]
            expected = pytest.approx(values, rel=1e-6) if tensorboard else values
            assert [v for _, v in got[key]] == expected, key


def test_every_logger_receives_the_same_curves_metrics_and_hyperparameters(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    summary = train(compose([*TINY, ALL, f"logger.mlflow.tracking_uri={uri}", "optim.lr=0.05"]), run_dir)

    table = csv_points(run_dir)
    run, history = mlflow_run(uri, run_dir)
    assert_same_points(history, table)
    assert_same_points(scalars(run_dir), table, tensorboard=True)
    assert [s for s, _ in table["train/loss"]] == list(range(8))  # 2 epochs of 4 steps, every step logged
    assert [s for s, _ in table["val/acc"]] == [3, 7]
    assert table["test/acc"] == [(8, summary["test_acc"])]

    hparams = yaml.safe_load((run_dir / "csv" / "hparams.yaml").read_text())
    assert hparams["optim.lr"] == 0.05 and hparams["model.name"] == "small_cnn"
    assert run.data.params["optim.lr"] == "0.05" and run.data.params["logger.mlflow.tracking_uri"] == uri
    assert run.info.run_name == str(run_dir.absolute()) and run.info.status == "FINISHED"


@pytest.mark.slow
def test_a_resumed_run_holds_each_step_once_in_every_logger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resumed from each save, with the loggers as the next save left them: as after a kill that came once
    more points were written than the checkpoint it resumes from holds."""
    store, run_dir = tmp_path / "mlruns", tmp_path / "run"
    uri = f"file:{store}"
    overrides = [*TINY, ALL, f"logger.mlflow.tracking_uri={uri}", "checkpoint.every_n_steps=3", "monitor=off"]
    copies: list[Path] = []
    save = SignedCheckpointIO.save_checkpoint

    def save_and_copy(self: SignedCheckpointIO, checkpoint: dict, path: Any, **kwargs: Any) -> None:
        save(self, checkpoint, path, **kwargs)
        self.flush()  # the checkpoint written; the copy is made before training goes on
        copies.append(tmp_path / "saved" / f"{len(copies):02d}")
        shutil.copytree(run_dir, copies[-1] / "run")
        shutil.copytree(store, copies[-1] / "store")

    monkeypatch.setattr(SignedCheckpointIO, "save_checkpoint", save_and_copy)
    whole = train(compose(overrides), run_dir)
    monkeypatch.undo()
    want = scalars(run_dir), csv_points(run_dir), mlflow_run(uri, run_dir)[1]
    assert len(copies) == 5  # recovery at step 3, epoch 0, recovery at step 6, epoch 1, the final state

    for saved, later in itertools.pairwise(copies):
        for folder in (run_dir, store):
            shutil.rmtree(folder)
        shutil.copytree(later / "run", run_dir, ignore=shutil.ignore_patterns("checkpoints"))
        shutil.copytree(saved / "run" / "checkpoints", run_dir / "checkpoints")
        shutil.copytree(later / "store", store)

        resumed = train(compose(overrides), run_dir)
        assert resumed["resumed_from"] is not None and resumed["test_acc"] == whole["test_acc"], saved.name
        assert_same_points(scalars(run_dir), want[0])
        assert_same_points(csv_points(run_dir), want[1])
        run, history = mlflow_run(uri, run_dir)
        assert_same_points(history, want[2])
        assert run.info.status == "FINISHED"


def test_mlflow_without_its_package_is_one_line_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what Python's import system does for a missing package
    with pytest.raises(ConfigError) as err:
        validate(compose(["logger=mlflow"]))
    assert str(err.value) == "logger=mlflow needs the mlflow package — pip install 't240dist[mlflow]'"
