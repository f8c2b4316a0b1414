"""``python -m train.bench [overrides]``: t240dist vs a hand-written loop, same model, batch and data."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from t240dist.bench import run_bench
from t240dist.config import CONF_DIR, register_resolvers
from t240dist.errors import one_line_errors, run_app


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="bench")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        run_bench(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    register_resolvers()
    run_app(main)
