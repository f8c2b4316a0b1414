"""What a run tells people: the config tree at the start, HParams, run_summary.json and a table at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from pytorch_lightning.loggers import Logger, TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text
from rich.tree import Tree
from torch.utils.tensorboard.summary import hparams

from t240dist.data import DataInfo

HPARAM_METRICS = ("test/acc", "test/loss", "val/acc", "val/loss", "train/loss")
SHOWN_ITEMS = 10  # longer lists and dicts of a summary are written to its file, not printed


def device_name(device: torch.device) -> str:
    """A device as people name it in reports: the GPU's model, or cpu."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@rank_zero_only
def show_config(conf: dict[str, Any], run_dir: Path) -> None:
    """Print the composed config as a tree of groups (``one_job`` saves it as ``config.yaml``)."""
    tree = Tree(f"[bold]config[/bold]  →  {run_dir}")
    for group, value in conf.items():
        body = yaml.safe_dump(value, sort_keys=False) if isinstance(value, dict) else str(value)
        tree.add(f"[bold]{group}[/bold]").add(Syntax(body.strip(), "yaml", theme="ansi_dark"))
    Console().print(tree)


@rank_zero_only
def show_batch(batch: dict[str, Any]) -> None:
    """Print the effective batch size and the learning rate the scaling rule derived from it."""
    rule = batch["lr_scaling"]
    scaled = "" if rule == "none" else f" × ({batch['effective_batch_size']}/{batch['reference_batch_size']})"
    scaled += "^½" if rule == "sqrt" else ""
    Console().print(
        f"effective batch {batch['effective_batch_size']} = {batch['batch_size']} per device × "
        f"{batch['devices']} device(s) × {batch['num_nodes']} node(s) × {batch['accumulate_grad_batches']} "
        f"accumulation; lr {batch['base_lr']:g}{scaled} = {batch['lr']:g} (optim.lr_scaling={rule})"
    )


@rank_zero_only
def show_resume(path: Path | None) -> None:
    """Say where the run continues from."""
    Console().print(f"resuming from {path}" if path else "starting fresh (no checkpoint to resume)")


@rank_zero_only
def show_finished(summary: dict[str, Any], max_epochs: int) -> None:
    """Say that a rerun found its run finished, and how to train it further."""
    stopped = summary.get("stopped_early_at_epoch")
    more = (
        f"a larger early_stopping.patience (early stopping ended it at epoch {stopped})"
        if stopped is not None
        else f"a higher trainer.max_epochs (now {max_epochs})"
    )
    Console().print(
        f"this run already finished: {summary['epochs']} epoch(s), step {summary['global_step']}, "
        f"test_acc {summary['test_acc']:.4f}; nothing trained — to train on, rerun with {more}"
    )


@rank_zero_only
def write_data_notes(info: DataInfo, run_dir: Path) -> None:
    """Write ``classes.txt`` (the name of each label index) and, if any, ``skipped_files.txt``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "classes.txt").write_text("".join(f"{name}\n" for name in info.class_names))
    if info.skipped:
        (run_dir / "skipped_files.txt").write_text("".join(f"{line}\n" for line in info.skipped))


@rank_zero_only
def log_hparams(loggers: list[Logger], conf: dict[str, Any]) -> None:
    """Give every logger the run's config, flattened (``optim.lr``): TensorBoard as its HParams tab.

    The HParams tab's metric columns read the run's own scalar tags, so no value is logged twice.
    """
    flat = _flatten(conf)
    for logger in loggers:
        if not isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(flat)
            continue
        writer = logger.experiment.file_writer
        for summary in hparams(flat, dict.fromkeys(HPARAM_METRICS, 0.0)):
            writer.add_summary(summary)


@rank_zero_only
def write_summary(summary: dict[str, Any], run_dir: Path, name: str = "run") -> None:
    """Write ``<name>_summary.json`` (atomically) and print the summary table.

    Lists and dicts of more than ``SHOWN_ITEMS`` entries (a confusion matrix, skipped files) stay in the file.
    """
    path = run_dir / f"{name}_summary.json"
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, path)
    table = Table(title=f"{name} summary", show_header=False)
    for key, value in summary.items():
        if isinstance(value, float):
            shown = f"{value:.4g}"
        elif isinstance(value, list | dict) and len(value) > SHOWN_ITEMS:
            shown = f"{len(value)} entries, in {path.name}"
        else:
            shown = str(value)
        table.add_row(key, Text(shown))  # not markup: values may hold "[...]"
    Console().print(table)


def _flatten(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested config into ``group.key`` entries of types every logger accepts."""
    flat: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat
