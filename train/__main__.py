"""``python -m train [group=option ...] [key=value ...]``: compose conf/, then train, test and report."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from t240dist import sweep
from t240dist.config import CONF_DIR, register_resolvers
from t240dist.distributed import launched_rank
from t240dist.errors import one_line_errors, run_app
from t240dist.run import train


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    """Run one job; return its ``sweep.objective``, the value a sweeper optimises.

    A sweep's job hands its error to the sweeper, which records it and goes on; a single run's error stops
    the process with one line (``sweep.job_errors``).
    """
    sweep.take_own_share(cfg.sweep.trial)
    with sweep.job_errors(cfg.sweep.trial):
        return sweep.trial_result(train(cfg))


if __name__ == "__main__":
    register_resolvers()
    handed = launched_rank()
    if handed is None:
        run_app(main)
    else:
        with one_line_errors():
            train(*handed)
