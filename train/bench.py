"""``python -m train.bench [bench.task=train|predict|job|data] [overrides]``: t240dist vs hand-written code,
same model, batch and data: the training step (``train``; with ``trainer=ddp`` on ranks started through the
elastic agent as training's are), batch inference (``predict``), or the whole job as processes (``job``);
or the training input pipeline alone (``data``)."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from t240dist.config import CONF_PATH, hydra_setup, plain, without_bench
from t240dist.errors import ConfigError, one_line_errors, run_app

BENCHES = ("train", "predict", "job", "data")


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="bench")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        if cfg.bench.task not in BENCHES:
            raise ConfigError(
                f"bench.task={cfg.bench.task} is not a benchmark — pick train, predict, job or data"
            )
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        if cfg.bench.task == "job":
            from t240dist.whole_job_bench import run_job_bench  # no Lightning: the timed processes load it

            conf = plain(without_bench(cfg))
            run_job_bench(plain(cfg.bench), conf, job_overrides(HydraConfig.get().overrides.task), run_dir)
        elif cfg.bench.task == "data":
            from t240dist.config import validate
            from t240dist.data_bench import run_data_bench

            conf = validate(without_bench(cfg))
            run_data_bench(plain(cfg.bench), conf, run_dir)
        else:
            from t240dist.bench import bench  # torch: once there is work to do

            bench(cfg, run_dir)
        if (run_dir / "bench.json").is_file():  # (a DDP bench's other ranks write none)
            print(f"wrote {(run_dir / 'bench.json').absolute()}")


def job_overrides(overrides: list[str]) -> list[str]:
    """The command line of the benchmarked job: this one's, less the benchmark's keys and its run dir."""
    return [o for o in overrides if not o.lstrip("+~").startswith(("bench.", "hydra.run.", "hydra.sweep."))]


if __name__ == "__main__":
    hydra_setup()
    run_app(main)
