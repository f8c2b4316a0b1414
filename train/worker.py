"""``python -m train.worker TASK RUN_DIR/config.yaml``: one rank of a job that ``python -m train`` (TASK
``train``) or ``python -m train.bench`` (``bench``) started through torch's elastic agent.

Not a command for users. The worker composes nothing: it runs the resolved config in that file, in its run
dir. What stops it is written to the agent's error file for this rank (``TORCHELASTIC_ERROR_FILE``) and
printed once, by the process that started the agent; the exit code says what kind of stop it was.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from t240dist.errors import (
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    Preempted,
    UserError,
    exit_without_final_collection,
)

EXIT_FAILED = 1

TASKS = ("train", "bench")


def main(task: str, config: Path) -> None:
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    try:
        if task == "train":
            from t240dist.run import train_rank

            train_rank(config)
        else:
            from t240dist.bench import bench_rank

            bench_rank(config)
    except SystemExit:
        raise
    except BaseException as err:  # told to the agent's process, which prints the first rank's error once
        get_error_handler().record_exception(err)
        if isinstance(err, Preempted):
            sys.exit(err.exit_code)
        sys.exit(
            EXIT_USER_ERROR
            if isinstance(err, UserError)
            else EXIT_INTERRUPTED
            if isinstance(err, KeyboardInterrupt)
            else EXIT_FAILED
        )


def log_as_hydra_jobs_do(run_dir: Path) -> None:
    """The log lines of a rank, where the Hydra job that started it logs: its ``hydra.job_logging`` (the
    console and the run's ``<job>.log``), read from the run dir's ``.hydra/hydra.yaml``; no Hydra runs
    here to set it up. Without that record (a job started from the library), stdout at INFO."""
    from t240dist import noise

    noise.silence()
    record = run_dir / ".hydra" / "hydra.yaml"
    if record.is_file():
        from hydra.core.utils import configure_log
        from omegaconf import OmegaConf

        hydra = OmegaConf.load(record).hydra
        configure_log(hydra.job_logging, hydra.verbose)
        return
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stdout,
        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s",
    )


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in TASKS:
        sys.exit("usage: python -m train.worker train|bench RUN_DIR/config.yaml (started by python -m train)")
    exit_without_final_collection()
    log_as_hydra_jobs_do(Path(sys.argv[2]).parent)
    main(sys.argv[1], Path(sys.argv[2]))
