"""``python -m train [group=option ...] [key=value ...]``: compose conf/, then train, test and report.

Only Hydra, OmegaConf and pydantic load before the config is checked: ``--help``, ``--cfg job``, ``--info``
and a mistyped value answer without importing torch or Lightning.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from t240dist import sweep
from t240dist.config import CONF_PATH, check_run, hydra_setup, plain
from t240dist.errors import run_app


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="config")
def main(cfg: DictConfig) -> float:
    """Run one job; return its ``sweep.objective``, the value a sweeper optimises.

    A sweep's job hands its error to the sweeper, which records it and goes on; a single run's error stops
    the process with one line (``sweep.job_errors``).
    """
    sweep.take_own_share(cfg.sweep.trial)
    with sweep.job_errors(cfg.sweep.trial):
        check_run(plain(cfg))
        from t240dist.run import train  # torch (and Lightning where it trains here): once the config is right

        return sweep.trial_result(train(cfg))


if __name__ == "__main__":
    hydra_setup()
    run_app(sweep.with_grid_summary(main))
