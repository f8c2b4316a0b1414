"""``train(cfg)``: one run from a composed config to a tested model and its summary.

Importable without Hydra's CLI: tests and sweeps call it with a config from Hydra's compose API. A DDP
job's ranks start through torch's elastic agent (``t240dist.agent``), and this process only waits for
them, with torch loaded but not Lightning; a run of one process trains here (``t240dist.fit``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from t240dist import sweep
from t240dist.config import check_run, plain


def train(cfg: DictConfig, run_dir: Path | None = None) -> dict[str, Any]:
    """Check, fit and test; write ``run_summary.json`` in the run dir and return the summary.

    ``run_dir`` defaults to Hydra's output dir of the running job.
    """
    started = time.perf_counter()
    before_train = process_age_s()
    conf = plain(cfg)
    check_run(conf)
    run_dir = Path(run_dir or HydraConfig.get().runtime.output_dir)
    from t240dist.agent import agent_workers, launch_workers

    workers = agent_workers(conf)
    if workers:
        launch_workers(conf, run_dir, workers)
        return sweep.read_summary(run_dir)
    from t240dist.fit import fit_and_test

    return fit_and_test(conf, run_dir, started, before_train, rank_writes_config=True)


def train_rank(config: Path) -> dict[str, Any]:
    """One rank of a job that ``train`` started through the elastic agent: the resolved config in
    ``config``, trained in its run dir."""
    started = time.perf_counter()
    before_train = process_age_s()
    from t240dist.agent import stop_when_orphaned
    from t240dist.fit import fit_and_test

    stop_when_orphaned()
    conf = yaml.safe_load(config.read_text())
    return fit_and_test(conf, config.parent, started, before_train, rank_writes_config=False)


def process_age_s() -> float | None:
    """Seconds since this process started (from /proc on Linux; None elsewhere): the start-up cost that
    comes before ``train`` is called, imports and config composition included."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time in ticks
