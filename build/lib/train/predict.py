"""``python -m train.predict ckpt=PATH input=DIR_OR_FILE [output=preds.csv] [key=value ...]``: classify
image files with a checkpoint."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from t240dist.config import CONF_PATH, hydra_setup
from t240dist.errors import one_line_errors, run_app


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="predict")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    with one_line_errors():
        from t240dist.inference import predict  # torch: once there is work to do

        predict(cfg, list(hydra_cfg.overrides.task), Path(hydra_cfg.runtime.output_dir))


if __name__ == "__main__":
    hydra_setup()
    run_app(main)
