"""A job's side of a sweep: the objective it returns, Optuna pruning while it trains, and the sweep summary.

The Optuna sweeper itself is a Hydra plugin (``hydra_plugins/t240dist_optuna``). It names each trial in the
job's config (``sweep.trial``); a trial's training reports to it through ``callbacks.OptunaTrial``. This
module imports neither torch nor Lightning: the entry point uses it before a job is known to train.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from t240dist.config import global_rank
from t240dist.errors import Preempted, Pruned, exit_preempted, is_grid, one_line_errors

log = logging.getLogger(__name__)
SUMMARY_FILE = "sweep_summary.csv"
ERROR_FILE = "run_error.txt"  # a failed grid trial's error line, in its run dir
COLUMNS = ("trial", "state", "objective", "test_acc", "val_acc", "overrides", "run_dir", "error")
_STATE_ORDER = {"complete": 0, "pruned": 1}  # then fail, running, waiting (Optuna's trial states)

_grid: dict[str, DictConfig] = {}  # the config of the grid sweep running in this process, once it started
# The study of the Optuna sweeper running in this process (basic launcher): trials in this process report to
# it directly, the only way to reach a study in memory.
_shared: dict[str, Any] = {}


def objective(summary: dict[str, Any], sweep: dict[str, Any]) -> float:
    """The run's value of ``sweep.objective`` (``val/acc`` reads the summary's ``val_acc``); NaN if none."""
    value = summary[sweep["objective"].replace("/", "_")]
    return math.nan if value is None else float(value)


@contextmanager
def job_errors(trial: DictConfig | None) -> Iterator[None]:
    """How an error ends a ``python -m train`` job.

    A single run prints one line and exits. A job of a sweep passes its error to the sweeper, which records
    the trial as failed and goes on: the Optuna sweeper tells the study; Hydra's basic sweeper runs its
    other jobs and then raises the first error (one line, exit 2), ``SweepSummary`` keeping each one.
    Preemption is the exception: it stops a grid sweep at once, as it stops an Optuna one.
    """
    if trial is not None:  # an Optuna trial: its sweeper handles preemption too
        yield
    elif HydraConfig.get().mode != RunMode.MULTIRUN:
        with one_line_errors():
            yield
    else:
        try:
            yield
        except Preempted as err:
            exit_preempted(err)


def error_line(err: BaseException) -> str:
    """``Type: first line of the message``: what a sweep's summary keeps of a trial's exception."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def trial_result(summary: dict[str, Any]) -> float:
    """What a job hands its sweeper: the objective, or ``Pruned`` for a trial the pruner stopped."""
    if summary["pruned_at_epoch"] is not None:
        raise Pruned(f"pruned after epoch {summary['pruned_at_epoch']}")
    return summary["objective"]


def open_trial(ref: dict[str, Any], run_dir: Path) -> Any:
    """The running Optuna trial ``ref`` names: through the sweeper's study in this process, or its storage;
    None where neither reaches it (a rank of a DDP trial whose study is in the sweeper's memory).

    A job in a process of its own finds the sweeper's settings in its Hydra config: a submitit job has it
    loaded, a rank that the elastic agent started reads the run dir's ``.hydra/hydra.yaml``.
    """
    import optuna

    study = _shared.get("study")
    if study is not None:
        return optuna.trial.Trial(study, ref["id"])
    if HydraConfig.initialized():
        sweeper = HydraConfig.get().sweeper
    else:
        sweeper = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.sweeper
    if sweeper.storage is None:
        log.warning(
            "this trial's ranks cannot reach a study in the sweeper's memory, so it runs to the end unpruned "
            "— give hydra.sweeper.storage=sqlite:///PATH and hydra.sweeper.study_name=NAME to prune it"
        )
        return None
    pruner = instantiate(sweeper.pruner) if sweeper.pruner else optuna.pruners.NopPruner()
    study = optuna.load_study(study_name=sweeper.study_name, storage=sweeper.storage, pruner=pruner)
    return optuna.trial.Trial(study, ref["id"])


@contextmanager
def sharing(study: Any) -> Iterator[None]:
    """Let trials that run in this process report to ``study`` while the sweeper runs it."""
    _shared["study"] = study
    try:
        yield
    finally:
        _shared.clear()


def take_own_share(trial: DictConfig | None) -> None:
    """Give each of the trials that submitit's local executor runs at once GPUs of its own.

    That executor hands every job the same first ``gpus_per_node`` GPUs; trial ``slot`` k of a batch takes
    the k-th group of that size instead (wrapping around). Must run before CUDA starts in the process.
    (Ports need no such care: each DDP trial's agent takes a free one for its rendezvous.)
    """
    if trial is None or os.environ.get("SUBMITIT_EXECUTOR") != "local":
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if not visible:
        return
    import pynvml  # counts every GPU, whatever CUDA_VISIBLE_DEVICES says

    pynvml.nvmlInit()
    try:
        total = pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()
    per_job = len(visible.split(","))
    first = trial.slot * per_job
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str((first + i) % total) for i in range(per_job))


class SweepSummary(Callback):
    """``sweep_summary.csv`` in the sweep dir of Hydra's basic sweeper, best first: rewritten after every job
    (a failed one leaves its error line in its run dir), so it is whole even when a failed trial ends the
    multirun with an error; printed as a table at the end. The Optuna sweeper writes its own.
    """

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if global_rank() or not _basic_sweep(config):
            return
        if job_return.status == JobStatus.FAILED:
            run_dir = Path(job_return.hydra_cfg.hydra.runtime.output_dir)
            # the exception itself (JobReturn.return_value would raise it)
            (run_dir / ERROR_FILE).write_text(error_line(job_return._return_value) + "\n")
        _write_basic_summary(config, show=False)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not global_rank() and _basic_sweep(config):
            _grid["config"] = config

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if _grid.pop("config", None) is not None:
            _write_basic_summary(config, show=True)


def with_grid_summary(app: Callable[[], Any]) -> Callable[[], None]:
    """``app`` (an entry point's Hydra main) printing a grid sweep's table also when a failed trial ends
    the multirun: Hydra's basic sweeper then raises that trial's error and never calls on_multirun_end."""

    def run() -> None:
        try:
            app()
        except BaseException:
            config = _grid.pop("config", None)
            if config is not None:
                _write_basic_summary(config, show=True)
            raise

    return run


def _basic_sweep(config: DictConfig) -> bool:
    return config.hydra.mode == RunMode.MULTIRUN and is_grid(config.hydra.sweeper)


def _write_basic_summary(config: DictConfig, show: bool) -> None:
    """The grid's table and CSV; none where no trial started (a mistyped override stops every one before
    it has a run dir): the error's exit then removes the sweep dir (``errors.forget_unused_run_dir``)."""
    sweep_dir = Path(config.hydra.sweep.dir).absolute()
    rows = [_row_of_run_dir(path.parent.parent) for path in sweep_dir.glob("**/.hydra/overrides.yaml")]
    if rows:
        write_sweep_summary(rows, sweep_dir, config.sweep.objective, config.sweep.direction, show)


def _row_of_run_dir(run_dir: Path) -> dict[str, Any]:
    """One trial of a basic sweep, from its run dir: its overrides and its run summary, or its error line
    ("interrupted" when it left neither)."""
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    summary = read_summary(run_dir)
    error = run_dir / ERROR_FILE
    return {
        "trial": int(run_dir.name) if run_dir.name.isdigit() else run_dir.name,
        "state": "complete" if summary else "fail",
        "objective": summary.get("objective"),
        "test_acc": summary.get("test_acc"),
        "val_acc": summary.get("val_acc"),
        "overrides": " ".join(overrides),
        "run_dir": str(run_dir),
        "error": "" if summary else error.read_text().strip() if error.exists() else "interrupted",
    }


def read_summary(run_dir: Path, name: str = "run") -> dict[str, Any]:
    """``<name>_summary.json`` of a run dir, or {} where the run wrote none (it failed or was stopped)."""
    path = run_dir / f"{name}_summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def run_metrics(run_dir: str | None) -> dict[str, Any]:
    """``test_acc`` and ``val_acc`` of a trial's run summary, None where the trial wrote none."""
    summary = read_summary(Path(run_dir)) if run_dir else {}
    return {"test_acc": summary.get("test_acc"), "val_acc": summary.get("val_acc")}


def write_sweep_summary(
    rows: list[dict[str, Any]], sweep_dir: Path, objective: str, direction: str, show: bool = True
) -> None:
    """Write ``sweep_summary.csv`` (completed trials best first, then pruned, then the rest); print it if
    ``show``."""
    sign = -1.0 if direction == "maximize" else 1.0

    def rank(row: dict[str, Any]) -> tuple[int, float, Any]:
        value = row["objective"]
        known = value is not None and math.isfinite(value)
        trial = row["trial"]  # a number, or a basic sweep's run dir name that is not one
        order = (0, trial, "") if isinstance(trial, int) else (1, 0, str(trial))
        return _STATE_ORDER.get(row["state"], 2), sign * value if known else math.inf, order

    rows = sorted(rows, key=rank)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / SUMMARY_FILE, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    if show:
        show_sweep_summary(rows, sweep_dir / SUMMARY_FILE, objective, direction)


def show_sweep_summary(rows: list[dict[str, Any]], csv_file: Path, objective: str, direction: str) -> None:
    """Print the trials, best first, in a table that fits the console (80 columns and up): the overrides
    that differ between trials (all of one trial's), numbers rounded; then each failed trial's error line,
    and the CSV's path, whole, on a line of its own (the CSV has every trial's run dir and full overrides)."""
    table = Table(title=f"sweep summary: {direction} {objective}", box=box.SIMPLE_HEAD)
    for column in ("trial", "state", objective, "test_acc", "overrides"):
        table.add_column(column, overflow="fold")
    shared = set.intersection(*(set(row["overrides"].split()) for row in rows)) if len(rows) > 1 else set()
    for row in rows:
        varied = " ".join(_rounded(o) for o in row["overrides"].split() if o not in shared)
        numbers = (f"{v:.4g}" if v is not None else "" for v in (row["objective"], row["test_acc"]))
        table.add_row(Text(str(row["trial"])), Text(row["state"]), *map(Text, numbers), Text(varied))
    console = Console()
    console.print(table)
    for row in rows:
        if row["error"]:
            # Text, not markup: error lines quote paths such as "[/path/file.cc:561]"
            console.print(Text(f"trial {row['trial']} {row['state']}: {row['error']}"))
    console.print(Text(f"wrote {Path(csv_file).absolute()}"), soft_wrap=True)


def _rounded(override: str) -> str:
    """``key=value`` with a number shown to 4 significant digits, as the table shows numbers."""
    key, _, value = override.partition("=")
    try:
        return f"{key}={float(value):.4g}" if "." in value or "e" in value else override
    except ValueError:
        return override
