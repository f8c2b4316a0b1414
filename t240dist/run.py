"""``train(cfg)``: one run from a composed config to a tested model and its summary.

Importable without Hydra's CLI: tests and sweeps call it with a config from Hydra's compose API.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from pytorch_lightning.callbacks import EMAWeightAveraging, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from t240dist import report
from t240dist.callbacks import ProgressBar, TrainSpeed
from t240dist.config import validate
from t240dist.data import ImageDataModule
from t240dist.module import ClassifierModule


def train(cfg: DictConfig, run_dir: Path | None = None) -> dict[str, Any]:
    """Validate, build, fit and test; write ``run_summary.json`` in the run dir and return the summary.

    ``run_dir`` defaults to Hydra's output dir of the running job.
    """
    started = time.perf_counter()
    conf = validate(cfg)
    run_dir = Path(run_dir or HydraConfig.get().runtime.output_dir)
    pl.seed_everything(conf["seed"], workers=True, verbose=False)

    data = ImageDataModule(conf["data"])
    info = data.info
    module = ClassifierModule.from_config(conf, info)
    trainer, speed, checkpoint = build_trainer(conf, run_dir)

    report.show_config(conf, run_dir)
    report.write_data_notes(info, run_dir)
    report.log_hparams(trainer.logger, conf)
    trainer.fit(module, datamodule=data)
    val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    tested = trainer.test(module, datamodule=data, ckpt_path="best" if checkpoint.best_model_path else None)

    summary = {
        "test_acc": tested[0]["test/acc"],
        "test_top5": tested[0].get("test/top5"),
        "test_loss": tested[0]["test/loss"],
        "val_acc": val.get("val/acc"),
        "val_loss": val.get("val/loss"),
        "wall_s": time.perf_counter() - started,
        "train_s": speed.train_s,
        "train_images_per_s": speed.images_per_s,
        "global_step": trainer.global_step,
        "epochs": trainer.current_epoch,
        "world_size": trainer.world_size,
        "precision": conf["trainer"]["precision"],
        "devices": _device_names(trainer),
        "model": conf["model"]["name"],
        "params": sum(p.numel() for p in module.net.parameters()),
        "data": conf["data"]["name"],
        "train_size": info.train_size,
        "skipped_files": len(info.skipped),
        "seed": conf["seed"],
        "best_checkpoint": checkpoint.best_model_path or None,
        "run_dir": str(run_dir),
        "versions": {"torch": torch.__version__, "lightning": pl.__version__},
    }
    report.write_summary(summary, run_dir)
    return summary


def build_trainer(
    conf: dict[str, Any], run_dir: Path, extra: list[pl.Callback] | None = None
) -> tuple[pl.Trainer, TrainSpeed, ModelCheckpoint]:
    """The Trainer of every run (training and benchmark alike), with its logger and callbacks."""
    speed = TrainSpeed()
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="epoch{epoch:03d}-step{step:06d}",
        auto_insert_metric_name=False,
        **conf["checkpoint"],
    )
    callbacks: list[pl.Callback] = [speed, checkpoint, *(extra or [])]
    if conf["module"]["ema_decay"] is not None:
        callbacks.append(EMAWeightAveraging(decay=conf["module"]["ema_decay"]))
    trainer_cfg = conf["trainer"]
    if trainer_cfg["enable_progress_bar"]:
        callbacks.append(ProgressBar(refresh_rate=trainer_cfg["log_every_n_steps"]))
    logger = TensorBoardLogger(save_dir=run_dir, name="", version="", default_hp_metric=False)
    trainer = pl.Trainer(**trainer_cfg, logger=logger, callbacks=callbacks, default_root_dir=run_dir)
    return trainer, speed, checkpoint


def _device_names(trainer: pl.Trainer) -> list[str]:
    """Names of this node's devices in the job (one entry per rank on this node)."""
    root = trainer.strategy.root_device
    if root.type == "cuda":
        return [torch.cuda.get_device_name(i) for i in trainer.device_ids]
    return ["cpu"] * len(trainer.device_ids)
