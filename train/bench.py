"""``python -m train.bench [bench.task=train|predict] [overrides]``: t240dist vs a hand-written loop, same
model, batch and data."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from t240dist.bench import run_bench, run_predict_bench
from t240dist.config import CONF_DIR, register_resolvers
from t240dist.distributed import ends_process_group
from t240dist.errors import ConfigError, one_line_errors, run_app

BENCHES = {"train": run_bench, "predict": run_predict_bench}


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="bench")
def main(cfg: DictConfig) -> None:
    with one_line_errors(), ends_process_group():  # the ranks torchrun started
        if cfg.bench.task not in BENCHES:
            raise ConfigError(f"bench.task={cfg.bench.task} is not a benchmark — pick train or predict")
        BENCHES[cfg.bench.task](cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    register_resolvers()
    run_app(main)
