"""``python -m train [group=option ...] [key=value ...]``: compose conf/, then train, test and report."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from t240dist.config import CONF_DIR, register_resolvers
from t240dist.distributed import launched_rank
from t240dist.errors import one_line_errors, run_app
from t240dist.run import train


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    """Run one job; return the test accuracy (the objective a sweeper maximises)."""
    with one_line_errors():
        return train(cfg)["test_acc"]


if __name__ == "__main__":
    register_resolvers()
    handed = launched_rank()
    if handed is None:
        run_app(main)
    else:
        with one_line_errors():
            train(*handed)
