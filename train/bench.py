"""``python -m train.bench [bench.task=train|predict] [overrides]``: t240dist vs a hand-written loop, same
model, batch and data; with ``trainer=ddp``, on ranks started through the elastic agent as training's are."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from t240dist.config import CONF_PATH, hydra_setup
from t240dist.errors import ConfigError, one_line_errors, run_app

BENCHES = ("train", "predict")


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="bench")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        if cfg.bench.task not in BENCHES:
            raise ConfigError(f"bench.task={cfg.bench.task} is not a benchmark — pick train or predict")
        from t240dist.bench import bench  # torch: once there is work to do

        bench(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    hydra_setup()
    run_app(main)
