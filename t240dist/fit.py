"""One run trained and tested in this process (the only one, or one rank of a job): the Trainer and its
callbacks, fit, test and the run summary. ``t240dist.run.train`` decides where a run trains and calls this.
"""

from __future__ import annotations

import hashlib
import math
import signal
import threading
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import EMAWeightAveraging
from pytorch_lightning.profilers import AdvancedProfiler, PassThroughProfiler, Profiler, SimpleProfiler
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from t240dist import report, sweep
from t240dist.agent import resume_after_restart, write_run_config
from t240dist.callbacks import (
    ContinueLog,
    EarlyStop,
    ExactResume,
    LongCpuRun,
    ModelSize,
    NonFiniteGuard,
    Preemption,
    ProgressBar,
    TrainLog,
    optuna_trial,
    restart_curves,
)
from t240dist.checkpoint import (
    BestCheckpoint,
    FinalCheckpoint,
    SignedCheckpointIO,
    checkpoint_callbacks,
    load_checkpoint,
    resume_checkpoint,
    written,
)
from t240dist.config import check_steps, global_rank, validate_run, world_size
from t240dist.data import ImageDataModule
from t240dist.distributed import DDP, cluster_plugins, ends_process_group, gather_ranks
from t240dist.errors import CheckpointError, ConfigError, own_dir_hint
from t240dist.loggers import build_loggers
from t240dist.module import VAL, ClassifierModule
from t240dist.optim import scaled_lr
from t240dist.telemetry import GpuMonitor, Totals

CallbackT = TypeVar("CallbackT", bound=pl.Callback)


def fit_and_test(
    conf: dict[str, Any], run_dir: Path, started: float, before_train: float | None, rank_writes_config: bool
) -> dict[str, Any]:
    """Check ``conf`` against this machine, fit and test it here; write ``run_summary.json`` (rank 0).

    ``rank_writes_config``: rank 0 saves the resolved config as ``config.yaml`` (the agent's workers find
    it written already, and read it).
    """
    entered = time.perf_counter()  # after the imports of this module (Lightning, torchvision, ...)
    conf = resume_after_restart(validate_run(conf))  # any agent's restart: ours, or torchrun's
    # A file-size limit must surface as EFBIG (and a one-line CheckpointError), not kill the process.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    debug = _fast_dev_run(conf)
    if debug:  # a debug run saves nothing: it neither resumes a run nor writes its summary over one's
        if any((run_dir / "checkpoints").glob("*.ckpt")):
            raise CheckpointError(
                f"{debug} saves nothing, but {run_dir} holds a run's checkpoints — "
                f"{own_dir_hint('the debug run')}"
            )
        resume = None
    else:
        trust_unsigned = conf["checkpoint"]["trust_unsigned"]
        resume = resume_checkpoint(conf["resume"], run_dir / "checkpoints", trust_unsigned)
    if rank_writes_config and global_rank() == 0:
        write_run_config(conf, run_dir)
    pl.seed_everything(conf["seed"], workers=True, verbose=False)
    data = ImageDataModule(conf["data"], conf["seed"])
    info = data.info
    check_steps(conf, info.train_size, world_size())
    data_ready = time.perf_counter()
    trial = optuna_trial(conf["sweep"], run_dir)
    trainer, curves, checkpoint = build_trainer(conf, run_dir, [trial] if trial else None, resume)
    batch = _effective_batch(conf, trainer)
    module = ClassifierModule.from_config({**conf, "optim": {**conf["optim"], "lr": batch["lr"]}}, info)
    startup = {
        "before_train": before_train,  # interpreter, the entry point's imports, Hydra's compose
        "imports": entered - started,  # the training modules: Lightning, torchvision, ...
        "data": data_ready - entered,  # the config's checks against this machine, the data
        "model_and_trainer": time.perf_counter() - data_ready,
    }

    report.show_config(conf, run_dir)
    report.show_resume(resume)
    report.show_batch(batch)
    report.write_data_notes(info, run_dir)
    if resume is None:
        restart_curves(trainer, step=0)
    report.log_hparams(trainer.loggers, conf, run_dir)
    with ends_process_group(), callback_of(trainer, Preemption).handling():
        trainer.fit(module, datamodule=data, ckpt_path=resume)
        finished = _finished_before(resume, trainer, run_dir)
        if finished is not None:
            written(trainer)
            return finished
        # the last validation's metrics: this fit's, else those its checkpoint kept (it trained nothing)
        val = {**module.validated, **{k: float(v) for k, v in trainer.callback_metrics.items() if k in VAL}}
        stopped = _stopped_early(trainer)  # before the test, which loads the callbacks' state of the best
        # the final weights, before testing loads the best; and, for the ranks to compare, the weights alone
        fingerprint, weights = model_fingerprints(module.net, weights=trainer.world_size > 1)
        test_started = time.perf_counter()
        # verbose=False: Lightning's table of the test metrics says again what the run summary says
        tested = trainer.test(
            module, datamodule=data, ckpt_path=_best_weights(conf, trainer, checkpoint, module), verbose=False
        )
        test_s = time.perf_counter() - test_started
        written(trainer)  # the final save, written while the test ran
        ranks = gather_ranks(conf, report.device_name(trainer.strategy.root_device), weights)
        backend = dist.get_backend() if dist.is_initialized() else None  # nccl, gloo; None: one process

    summary = {
        **({"debug_run": f"{debug}: a check that the run works; nothing saved or logged"} if debug else {}),
        "test_acc": tested[0]["test/acc"],
        "test_top5": tested[0].get("test/top5"),
        "test_loss": tested[0]["test/loss"],
        "val_acc": val.get("val/acc"),
        "val_loss": val.get("val/loss"),
        "wall_s": time.perf_counter() - started,
        "train_s": curves.train_s,
        "train_images_per_s": curves.images_per_s,
        "startup_s": {**startup, "first_step": curves.first_step_s},  # first_step: compile, autotune, workers
        "phases_s": {
            "to_first_step": curves.to_first_step_s,  # from the process's start (imports included)
            "validation": curves.validation_s,
            "input_wait": trainer.profiler.input_wait_s,  # the training loop's, within train_s
            "checkpoints": trainer.strategy.checkpoint_io.seconds,  # the training thread's share of saves
            "test": test_s,
        },
        "global_step": trainer.global_step,
        "epochs": trainer.current_epoch,
        "world_size": trainer.world_size,
        "backend": backend,
        "precision": conf["trainer"]["precision"],
        "effective_batch_size": batch["effective_batch_size"],
        "lr": batch["lr"],
        "devices": [r["device"] for r in ranks],
        "model": conf["model"]["name"],
        "params": sum(p.numel() for p in module.net.parameters()),
        "model_fingerprint": fingerprint,
        "data": conf["data"]["name"],
        "train_size": info.train_size,
        "skipped_files": len(info.skipped),
        "nonfinite_skipped_steps": callback_of(trainer, NonFiniteGuard).skipped,
        **(monitor.summary() if (monitor := callback_of(trainer, GpuMonitor)) else Totals().summary(0)),
        "seed": conf["seed"],
        "best_checkpoint": checkpoint.best_model_path or None,
        "resumed_from": str(resume) if resume else None,
        "run_dir": str(run_dir),
        "pruned_at_epoch": trial.pruned_at if trial else None,
        "stopped_early_at_epoch": stopped,
        "ranks": ranks,
        "versions": {"torch": torch.__version__, "lightning": pl.__version__},
    }
    summary["objective"] = sweep.objective(summary, conf["sweep"])
    report.write_summary(summary, run_dir)
    if resume is not None and not callback_of(trainer, FinalCheckpoint).trained:  # tested what it resumed
        report.show_finished(summary, trainer.max_epochs, trainer.max_steps)
    return summary


def build_trainer(
    conf: dict[str, Any], run_dir: Path, extra: list[pl.Callback] | None = None, resume: Path | None = None
) -> tuple[pl.Trainer, TrainLog, BestCheckpoint]:
    """The Trainer of every run (training and benchmark alike), with its loggers and callbacks.

    ``resume``: the checkpoint the run continues from, if any (the loggers continue its curves). Every
    ``+trainer.NAME`` key of the config is passed to Lightning's Trainer as it is.
    """
    curves = TrainLog()
    directory = run_dir / "checkpoints"
    savers = checkpoint_callbacks(conf["checkpoint"], directory)
    callbacks: list[pl.Callback] = [
        curves,
        *savers,  # the final save comes before EMA's on_train_end puts the averaged weights in the model
        ContinueLog(),
        ExactResume(),
        Preemption(directory, run_dir),
        NonFiniteGuard(conf["nonfinite"]),
        ModelSize(),
        LongCpuRun(),
    ]
    callbacks += extra or []
    if conf["monitor"]["name"] == "nvml":
        callbacks.append(GpuMonitor(conf["monitor"]))
    if conf["module"]["ema_decay"] is not None:
        callbacks.append(EMAWeightAveraging(decay=conf["module"]["ema_decay"]))
    if conf["early_stopping"]["patience"] is not None:
        callbacks.append(EarlyStop(conf["checkpoint"], **conf["early_stopping"]))
    trainer_cfg = dict(conf["trainer"])
    timeout = timedelta(seconds=trainer_cfg.pop("collective_timeout_s"))
    trainer_cfg.pop("max_restarts")  # the agent's
    if trainer_cfg["strategy"] == "ddp":
        trainer_cfg["strategy"] = DDP(timeout=timeout)
    if trainer_cfg["enable_progress_bar"]:
        callbacks.append(ProgressBar(trainer_cfg["log_every_n_steps"], curves))
    profiler = _profiler(trainer_cfg.pop("profiler"), run_dir)
    try:
        trainer = pl.Trainer(
            **trainer_cfg,
            logger=build_loggers(conf["logger"], run_dir, resumed=resume is not None),
            callbacks=callbacks,
            default_root_dir=run_dir,
            use_distributed_sampler=False,  # ImageDataModule shards the data itself
            plugins=[SignedCheckpointIO(conf["checkpoint"]["trust_unsigned"]), *cluster_plugins()],
            profiler=profiler,
        )
    except (
        MisconfigurationException
    ) as err:  # a +trainer value that Lightning refuses (t240dist's are checked)
        raise ConfigError(
            f"Lightning's Trainer refused a trainer value: {str(err).splitlines()[0]} — fix it "
            "(python -m train --cfg job shows them)"
        ) from None
    return trainer, curves, savers[0]


def _fast_dev_run(conf: dict[str, Any]) -> str | None:
    """``trainer.fast_dev_run=N`` as people read it (debug=fdr sets it), or None for a run that trains."""
    batches = conf["trainer"].get("fast_dev_run")  # a +trainer key: Lightning takes true or a number
    return f"trainer.fast_dev_run={batches}" if batches else None


def _profiler(name: str | None, run_dir: Path) -> Profiler:
    """Lightning's simple or advanced profiler, writing its report to ``<run dir>/<stage>-profile.txt``;
    without one, ``NoProfiler``. Each times the training loop's waits for input (``InputWait``)."""
    if name is None:
        return NoProfiler()
    kind = {"simple": WaitingSimpleProfiler, "advanced": WaitingAdvancedProfiler}[name]
    return kind(dirpath=run_dir, filename="profile")


class InputWait:
    """Mixed into the run's profiler: the seconds the training loop waited for its next batch.

    Lightning brackets each fetch of a training batch with the profiler's ``start`` and ``stop`` (the
    action ``[_TrainingEpochLoop].train_dataloader_next`` of its profiler reports): the time the loop
    spent there is the time it waited for the DataLoader, its workers, or the decoding ahead.
    """

    FETCH = "train_dataloader_next"  # the end of Lightning's action name
    input_wait_s = 0.0
    _fetching = 0.0

    def start(self, action_name: str) -> None:
        if action_name.endswith(self.FETCH):
            self._fetching = time.perf_counter()
        super().start(action_name)  # type: ignore[misc]

    def stop(self, action_name: str) -> None:
        super().stop(action_name)  # type: ignore[misc]
        if action_name.endswith(self.FETCH):
            self.input_wait_s += time.perf_counter() - self._fetching


class WaitingSimpleProfiler(InputWait, SimpleProfiler):
    """Lightning's simple profiler, timing the waits for input too."""


class WaitingAdvancedProfiler(InputWait, AdvancedProfiler):
    """Lightning's advanced profiler, timing the waits for input too."""


class NoProfiler(InputWait, PassThroughProfiler):
    """Lightning's default "no profiler", without its per-call cost.

    Lightning wraps every hook of every callback in ``profiler.profile(...)``, ~150 times a step;
    PassThroughProfiler still builds a generator context manager each time (~1.5 µs), which a
    launch-bound step pays in full. One shared null context does the same nothing. It still times the
    waits for input (``InputWait``: two clock reads a step).
    """

    _NOTHING = nullcontext()

    def profile(self, action_name: str) -> nullcontext:
        return self._NOTHING


def model_fingerprints(net: torch.nn.Module, weights: bool = False) -> tuple[str, str | None]:
    """sha256 of the network's weights and buffers, in key order: equal fingerprints, equal models; and,
    where ``weights``, of its weights alone (the ranks of a DDP job share their weights, not their
    BatchNorm statistics), else None.

    The tensors' bytes are gathered where they are and copied to the host at once, for both (one copy, not
    one per tensor: 0.36 s of a ResNet-18 run's end on an H200 went to ~120 small copies).
    """
    state = sorted(net.state_dict().items())
    parameters = {name for name, _ in net.named_parameters()} if weights else set()
    raw = [tensor.detach().contiguous().reshape(-1).view(torch.uint8) for _, tensor in state]
    host = torch.cat([r.to(raw[0].device) for r in raw]).cpu().numpy() if raw else None
    everything, alone, offset = hashlib.sha256(), hashlib.sha256(), 0
    for (name, _), part in zip(state, raw, strict=True):
        digests = (everything, alone) if name in parameters else (everything,)
        for digest in digests:
            digest.update(name.encode())
            digest.update(host[offset : offset + part.numel()])
        offset += part.numel()
    return everything.hexdigest(), alone.hexdigest() if weights else None


def _effective_batch(conf: dict[str, Any], trainer: pl.Trainer) -> dict[str, Any]:
    """The effective batch of one optimizer step and the learning rate that the scaling rule gives it."""
    parts = {
        "batch_size": conf["data"]["batch_size"],
        "devices": trainer.num_devices,
        "num_nodes": trainer.num_nodes,
        "accumulate_grad_batches": conf["trainer"]["accumulate_grad_batches"],
    }
    effective = math.prod(parts.values())
    optim = conf["optim"]
    return {
        **parts,
        "effective_batch_size": effective,
        "base_lr": optim["lr"],
        "lr_scaling": optim["lr_scaling"],
        "reference_batch_size": optim["reference_batch_size"],
        "lr": scaled_lr(optim, effective),
    }


def callback_of(trainer: pl.Trainer, kind: type[CallbackT]) -> CallbackT | None:
    """The trainer's callback of type ``kind`` (build_trainer adds at most one of each), or None."""
    return next((c for c in trainer.callbacks if isinstance(c, kind)), None)


def _stopped_early(trainer: pl.Trainer) -> int | None:
    """The epoch that early stopping ended training at; None if it did not (or was off)."""
    stopper = callback_of(trainer, EarlyStop)
    return stopper.stopped_epoch if stopper is not None and stopper.wait_count >= stopper.patience else None


def _best_weights(
    conf: dict[str, Any], trainer: pl.Trainer, checkpoint: BestCheckpoint, module: ClassifierModule
) -> str | None:
    """What ``trainer.test`` scores: the best checkpoint's path, or None to score the module as it is.

    The module as it is where the best checkpoint was saved from its weights at the last step (the usual
    end of a run): the test then runs while the last saves are written. Otherwise every rank waits until
    they are on disk, and the test loads the file. With EMA, Lightning's WeightAveraging puts the raw
    weights back when a checkpoint is loaded after fit, so the averaged weights that the best checkpoint
    holds (and evaluate scores) are loaded here.
    """
    best = checkpoint.best_model_path
    ema = conf["module"]["ema_decay"] is not None
    if not best or (checkpoint.best_step == trainer.global_step and not ema):
        return None
    written(trainer)
    if not ema:
        return best  # the file itself: "best" would make Lightning warn about several ModelCheckpoints
    module.load_state_dict(load_checkpoint(Path(best), conf["checkpoint"]["trust_unsigned"])["state_dict"])
    return None


def _finished_before(resume: Path | None, trainer: pl.Trainer, run_dir: Path) -> dict[str, Any] | None:
    """The summary of a finished run that was resumed, found nothing left to train and trained nothing.

    Such a rerun tests and writes nothing again: it says so, and how to train on, and returns the run's
    summary. ``None`` when this fit trained, or when the summary is missing (a run stopped after its final
    save: it is tested now).
    """
    final = callback_of(trainer, FinalCheckpoint)
    if resume is None or final is None or final.trained:
        return None
    done = sweep.read_summary(run_dir)  # {} where the run wrote none
    if done:
        report.show_summary(done, run_dir / "run_summary.json")
        report.show_finished(done, trainer.max_epochs, trainer.max_steps)
    return done or None
