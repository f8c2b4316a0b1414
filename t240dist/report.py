"""What a run tells people: the config tree at the start, HParams, run_summary.json and a table at the end."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from pytorch_lightning.loggers import Logger, TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text
from rich.tree import Tree
from tensorboard.plugins.hparams import plugin_data_pb2
from torch.utils.tensorboard.summary import hparams

from t240dist.data import DataInfo

log = logging.getLogger(__name__)

HPARAM_METRICS = ("test/acc", "test/loss", "val/acc", "val/loss", "train/loss")
# What people compare runs by: the optimizer, learning rate, batch size, model and precision
COMPARED = ("optim._target_", "optim.lr", "data.batch_size", "model.name", "trainer.precision")
SHOWN_ITEMS = 10  # longer lists and dicts of a summary are written to its file, not printed
# Summary entries that are paths, said whole on log lines of their own, never cut to fit a table cell:
# those read or used, and those written (as "wrote PATH")
PATHS = ("best_checkpoint", "resumed_from", "run_dir", "checkpoint", "input")
WRITTEN = ("output",)


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
    """Say the effective batch size and the learning rate the scaling rule derived from it."""
    rule = batch["lr_scaling"]
    scaled = "" if rule == "none" else f" × ({batch['effective_batch_size']}/{batch['reference_batch_size']})"
    scaled += "^½" if rule == "sqrt" else ""
    log.info(
        f"effective batch {batch['effective_batch_size']} = {batch['batch_size']} per device × "
        f"{batch['devices']} device(s) × {batch['num_nodes']} node(s) × {batch['accumulate_grad_batches']} "
        f"accumulation; lr {batch['base_lr']:g}{scaled} = {batch['lr']:g} (optim.lr_scaling={rule})"
    )


@rank_zero_only
def show_resume(path: Path | None) -> None:
    """Say where the run continues from."""
    log.info(f"resuming from {path}" if path else "starting fresh (no checkpoint to resume)")


@rank_zero_only
def show_replan(changed: list[str], saved_steps: int, steps: int, step: int) -> None:
    """Say that a resumed run's optimizer settings and lr schedule are its config's, not its checkpoint's
    (``changed``: which of ``sched``, ``steps`` and ``optim`` differ)."""
    names = {"steps": f"length ({saved_steps} steps, now {steps})"}
    log.info(
        f"the checkpoint was saved with another {' and '.join(names.get(key, key) for key in changed)}: from "
        f"step {step} the optimizer takes this config's settings and the lr schedule is planned again"
    )


@rank_zero_only
def show_regrouped(ranks: int, batch: int, now: int, new_batch: int) -> None:
    """Say that a job resumes from an epoch's end on other ranks or batches than it saved with."""
    log.warning(
        f"resuming a checkpoint of {ranks} rank(s) × {batch} a batch on {now} rank(s) × {new_batch} from an "
        "epoch's end: the run is not bit-exact with one that kept its ranks and batch size"
    )


@rank_zero_only
def show_finished(summary: dict[str, Any], max_epochs: int, max_steps: int) -> None:
    """Say that a rerun found its run finished, and how to train it further."""
    stopped = summary.get("stopped_early_at_epoch")
    if stopped is not None:
        more = f"a larger early_stopping.patience (early stopping ended it at epoch {stopped})"
    elif 0 < max_steps <= summary["global_step"]:
        more = f"a higher trainer.max_steps (now {max_steps})"
    else:
        more = f"a higher trainer.max_epochs (now {max_epochs})"
    log.info(
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
def log_hparams(loggers: list[Logger], conf: dict[str, Any], run_dir: Path) -> None:
    """Give every logger the run's config, flattened (``optim.lr``): TensorBoard as its HParams tab.

    The HParams tab opens on five hyperparameter columns: those whose ``differs`` flag is set, by name (the
    plugin sorts them so, and takes the flag from a run's experiment summary rather than comparing the runs
    when runs carry one, as these do: the summary is what names the metric columns). So the flag goes on at
    most five keys: those a sweep varies, then those people compare runs by (``COMPARED``). The metric
    columns read the run's own scalar tags, so no value is logged twice.
    """
    flat = _flatten(conf)
    swept = _swept(flat, run_dir)
    flagged = {*swept, *[key for key in COMPARED if key not in swept][: max(0, 5 - len(swept))]}
    for logger in loggers:
        if not isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(flat)
            continue
        experiment, start, end = hparams(flat, dict.fromkeys(HPARAM_METRICS, 0.0))
        plugin = experiment.value[0].metadata.plugin_data
        content = plugin_data_pb2.HParamsPluginData.FromString(plugin.content)
        for info in content.experiment.hparam_infos:
            info.differs = info.name in flagged
        plugin.content = content.SerializeToString()
        for summary in (experiment, start, end):
            logger.experiment.file_writer.add_summary(summary)


def _swept(flat: dict[str, Any], run_dir: Path) -> list[str]:
    """The keys of ``flat`` that the sweep this run is a trial of varies: its sweep overrides
    (``optim.lr=0.1,0.05``; a group's, ``model=a,b``, names its ``name`` or ``_target_``) and its
    sweeper's search space, from the sweep's record (``multirun.yaml`` in the sweep dir above the run
    dir); none for a run outside a sweep."""
    record = next((p / "multirun.yaml" for p in run_dir.parents[:2] if (p / "multirun.yaml").is_file()), None)
    if record is None:
        return []
    hydra = OmegaConf.to_container(OmegaConf.load(record).hydra, resolve=False)
    overrides = OverridesParser.create().parse_overrides(hydra["overrides"]["task"])
    varied = [
        *(hydra["sweeper"].get("params") or {}),
        *(o.key_or_group for o in overrides if o.is_sweep_override()),
    ]
    keys = (next((k for k in (key, f"{key}.name", f"{key}._target_") if k in flat), None) for key in varied)
    return sorted({key for key in keys if key is not None})


@rank_zero_only
def write_summary(
    summary: dict[str, Any], run_dir: Path, name: str = "run", also: tuple[Path, ...] = ()
) -> None:
    """Write ``<name>_summary.json`` (atomically), print the summary table and say where things are.

    The table fits the console (80 columns and up): values missing (None, empty) are left out, numbers
    rounded, and lists and dicts of lists or of more than ``SHOWN_ITEMS`` entries (a confusion matrix,
    the ranks, skipped files) stay in the file. Paths (``PATHS``; then what was written: ``WRITTEN``, the
    summary file, the files in ``also``) follow as log lines of their own, whole, so they can be copied
    and stay in the log.
    """
    path = run_dir / f"{name}_summary.json"
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, path)
    show_summary(summary, path, wrote=(*(summary[key] for key in WRITTEN if summary.get(key)), path, *also))


@rank_zero_only
def show_summary(summary: dict[str, Any], path: Path, wrote: tuple[Path | str, ...] = ()) -> None:
    """Print the summary table of ``path`` (see ``write_summary``), its paths, and what was ``wrote``."""
    table = Table(title=f"{path.name.removesuffix('_summary.json')} summary", show_header=False)
    for key, value in summary.items():
        if key not in PATHS + WRITTEN and value not in (None, [], {}):
            table.add_row(key, Text(_shown(value, path.name)))  # not markup: values may hold "[...]"
    Console().print(table)
    for key in PATHS:  # whole, wherever the command was given them from
        if summary.get(key):
            log.info(f"{key}: {Path(summary[key]).absolute()}")
    for written in wrote:
        log.info(f"wrote {Path(written).absolute()}")


def _shown(value: Any, file: str) -> str:
    """A summary value as the table shows it."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | dict):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        if len(value) > SHOWN_ITEMS or any(isinstance(v, list | dict) for _, v in items):
            return f"{len(value)} {'entry' if len(value) == 1 else 'entries'}, in {file}"
        if isinstance(value, dict):
            return ", ".join(f"{k}={_shown(v, file)}" for k, v in value.items())
        return ", ".join(_shown(v, file) for v in value)
    return str(value)


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
