"""The run's loggers, built from the logger group: TensorBoard, CSV and MLflow, one or several at once.

Every logger receives the same points through Lightning's ``Logger`` interface, at the global step: the
training curves (``TrainLog``), validation and test metrics (Lightning), the GPU telemetry (``GpuMonitor``)
and the run's config as hyperparameters. What only TensorBoard can show (the HParams tab, the Custom
Scalars dashboard, the purge of points on resume) goes to the TensorBoard logger alone (``tensorboard``).

Exact resume: TensorBoard drops the points past the resumed step (``ContinueLog``). CSV and MLflow keep
what they hold, so a resumed run continues after it: they pass on only the points of steps past the last
one they hold of each metric. The steps a resumed run does again compute the same values (the resume is
exact), so each step is there once; timings and GPU telemetry keep the interrupted run's measurements.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger

from t240dist.config import global_rank

log = logging.getLogger(__name__)

RUN_DIR_TAG = "t240dist.run_dir"  # the MLflow run's tag naming its run dir: a resumed run finds it by this


def build_loggers(cfg: dict[str, Any], run_dir: Path, resumed: bool) -> list[Logger]:
    """The loggers the logger group names, in its order (the first is ``trainer.logger``).

    CSV and MLflow write from rank 0 only, as every Lightning logger does; they are built on rank 0 alone,
    so that other ranks never open the MLflow store. ``resumed``: the run continues from a checkpoint.
    """
    loggers: list[Logger] = []
    for name, settings in cfg.items():
        if settings is None:
            continue
        if name == "tensorboard":
            loggers.append(TensorBoardLogger(save_dir=run_dir, name="", version="", default_hp_metric=False))
        elif global_rank() != 0:
            continue
        elif name == "csv":
            loggers.append(ContinuedCSVLogger(run_dir, settings["flush_logs_every_n_steps"], resumed))
        elif name == "mlflow":
            loggers.append(ContinuedMLFlowLogger(run_dir, settings, resumed))
    return loggers


def tensorboard(trainer: pl.Trainer) -> TensorBoardLogger | None:
    """The trainer's TensorBoard logger, for what only TensorBoard shows; None without one."""
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def log_metrics(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    """Write ``metrics`` at ``step`` to every logger of the trainer."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


class _AfterHeldSteps:
    """A logger that keeps every point it was given: after a resume it passes on only the points of steps
    past the last one it holds of each metric (``held``)."""

    held: dict[str, int]

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.held and step is not None:
            metrics = {k: v for k, v in metrics.items() if step > self.held.get(k, -1)}
            if not metrics:
                return
        super().log_metrics(metrics, step)  # type: ignore[misc]

    def hold(self, key: str, step: int) -> None:
        self.held[key] = max(step, self.held.get(key, -1))


class ContinuedCSVLogger(_AfterHeldSteps, CSVLogger):
    """Lightning's CSVLogger, writing ``<run dir>/csv/metrics.csv`` and ``hparams.yaml``, continued on resume.

    Lightning's writer deletes an existing metrics.csv when it starts. A resumed run moves the file aside
    first, writes its rows back through the new writer and removes the copy only then: a kill at any
    moment leaves every row on disk (the next attempt reads the copy, if it is still there).
    """

    def __init__(self, run_dir: Path, flush_logs_every_n_steps: int, resumed: bool) -> None:
        self.held = {}
        super().__init__(run_dir, name="csv", version="", flush_logs_every_n_steps=flush_logs_every_n_steps)
        if resumed:
            self._take_back(Path(self.log_dir))

    def _take_back(self, folder: Path) -> None:
        metrics, aside = folder / "metrics.csv", folder / "metrics.before-resume.csv"
        if metrics.is_file() and not aside.is_file():
            metrics.replace(aside)
        if not aside.is_file():
            return
        with aside.open(newline="") as f:
            rows = list(csv.DictReader(f))
        for row in rows:
            step = int(row.pop("step"))
            values = {key: float(value) for key, value in row.items() if value != ""}
            self.experiment.log_metrics(values, step)
            for key in values:
                self.hold(key, step)
        self.save()
        aside.unlink()


class ContinuedMLFlowLogger(_AfterHeldSteps, MLFlowLogger):
    """Lightning's MLFlowLogger: one MLflow run per run dir, named after it, continued when the run resumes.

    Points are stored by MLflow's own thread (``synchronous=False``): a sqlite store commits each logging
    step in ~30 ms on a 2-core VM, which the training thread would otherwise wait for. ``save`` (at every
    checkpoint, and at the end) waits until they are stored.

    The run carries the tag ``t240dist.run_dir`` (the run dir's absolute path); a resumed run finds it by that
    tag in the experiment and logs into it. MLflow keeps every point and a param's first value: a resumed
    run passes on only the points past those the MLflow run holds, and leaves the params it holds as they
    are (a changed one is named in a warning).
    """

    def __init__(self, run_dir: Path, cfg: dict[str, Any], resumed: bool) -> None:
        self.held = {}
        self.held_params: dict[str, str] = {}
        uri = cfg["tracking_uri"]
        if "://" not in uri or uri.startswith("file:"):
            # MLflow 3 refuses its folder store unless this says it is wanted: the user chose it by its URI
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        run_dir = run_dir.absolute()
        found = _mlflow_run(uri, cfg["experiment_name"], run_dir) if resumed else None
        super().__init__(
            experiment_name=cfg["experiment_name"],
            run_name=str(run_dir),
            tracking_uri=uri,
            tags={RUN_DIR_TAG: str(run_dir)},
            run_id=found.info.run_id if found else None,
            synchronous=False,
        )
        if found is not None:
            self.experiment.update_run(found.info.run_id, status="RUNNING")
            self.held_params = dict(found.data.params)
            for key in found.data.metrics:
                for point in self.experiment.get_metric_history(found.info.run_id, key):
                    self.hold(key, point.step)

    def save(self) -> None:
        super().save()
        import mlflow

        mlflow.flush_async_logging()

    def log_hyperparams(self, params: dict[str, Any]) -> None:  # type: ignore[override]
        held = self.held_params
        changed = sorted(k for k, v in params.items() if k in held and held[k] != str(v)[:250])  # as stored
        if changed:
            log.warning("MLflow keeps a run's first params: %s keep the values the run started with", changed)
        new = {k: v for k, v in params.items() if k not in self.held_params}
        if new:
            super().log_hyperparams(new)


def _mlflow_run(uri: str, experiment_name: str, run_dir: Path) -> Any:
    """The MLflow run of ``run_dir`` in the experiment (the latest, if several), or None."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return None
    quoted = "'" + str(run_dir).replace("'", "\\'") + "'"
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{RUN_DIR_TAG}` = {quoted}",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None
