"""Callbacks of every run: throughput and lr, a progress bar that costs no sync, resume bookkeeping."""

from __future__ import annotations

import logging
import math
import random
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Checkpoint, EarlyStopping, ModelSummary, TQDMProgressBar
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.model_summary import get_human_readable_count
from tensorboard.compat.proto.event_pb2 import Event, SessionLog

from t240dist import report, sweep
from t240dist.agent import is_submitit_requeue
from t240dist.checkpoint import at_step_boundary, written
from t240dist.data import ImageDataModule
from t240dist.distributed import Agreed
from t240dist.errors import PREEMPTING, CheckpointError, Interrupted, NonFiniteError, Preempted, resume_hint
from t240dist.loggers import log_metrics, tensorboard
from t240dist.module import TRAIN_CURVES
from t240dist.readback import host_copy, timing_event
from t240dist.run import process_age_s

log = logging.getLogger(__name__)


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, showing the training loss that :class:`TrainLog` has last written.

    Values logged with ``prog_bar=True`` are turned into floats by Lightning after every batch, which
    waits for the GPU each step; this bar shows the loss already on the host instead.
    """

    def __init__(self, refresh_rate: int, curves: TrainLog) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.curves = curves

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        if self.curves.last_loss is not None and trainer.training:
            metrics["loss"] = f"{self.curves.last_loss:.4g}"
        return metrics


class ModelSize(ModelSummary):
    """Lightning's model summary as one log line: the network's parameters and their size.

    Lightning's table lists the network as one row beside the metrics (no parameters each), with a FLOPs
    column of zeros and "Total FLOPs: 0": it counts FLOPs only on an ``example_input_array``, which a
    network of any input size has none of.
    """

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        log.info(
            f"model: {get_human_readable_count(total_parameters)} parameters "
            f"({get_human_readable_count(trainable_parameters)} trainable), {model_size:.3g} MB"
        )


class LongCpuRun(pl.Callback):
    """Says once, early, how long a run on the CPU will train when that is long, and how to shorten it.

    Measured, not guessed: from the end of the first step (which carries the start-up costs) over the next
    ``TIMED_STEPS`` steps, for the optimizer steps left (validation not counted).
    """

    LONG_S = 120  # a run this long on the CPU surprises people who tried the 12 s default first
    TIMED_STEPS = 5

    def __init__(self) -> None:
        self._first: tuple[int, float] | None = None  # (step, time) at the end of the first step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if pl_module.device.type != "cpu" or not trainer.is_global_zero:
            return
        step, now = trainer.global_step, time.perf_counter()
        if self._first is None:
            self._first = (step, now)
        elif step - self._first[0] == self.TIMED_STEPS:
            per_step = (now - self._first[1]) / self.TIMED_STEPS
            left = trainer.estimated_stepping_batches - step
            if per_step * left > self.LONG_S:
                steps = max(1, int(60 / per_step))  # about a minute of training
                log.info(
                    f"this run trains {left} more steps on the CPU, {per_step:.2g} s each: about "
                    f"{per_step * left / 60:.0f} min — for a first look, trainer.max_steps={steps} trains "
                    f"for about {steps * per_step:.0f} s"
                )


Stamp = torch.cuda.Event | float  # a point on the device's timeline: a CUDA event, or host time on the CPU


class TrainLog(pl.Callback):
    """Writes the training curves at logging steps without waiting for the GPU; totals training time.

    At each of Lightning's logging steps the training step hands over ``TRAIN_CURVES`` as one device
    tensor (its output ``curves``); this callback adds ``train/lr`` and ``perf/images_per_s`` over the
    window since the last logging step. On a GPU the values are copied to pinned memory behind the
    step's work and a CUDA event stamps that point; they are written once the event has passed (checked
    at each later step, never waited for), the window's rate timed by the events themselves. On the CPU
    they are written at once.

    Hand-written because Lightning's ``self.log`` costs ~0.4 ms of host time per value and its logger
    connector reads every value back right away: a wait for the GPU, after which the logging step's host
    work leaves the GPU idle. ThroughputMonitor synchronises after every batch, and LearningRateMonitor
    splits the lr into one tag per parameter group. ``images_per_s`` leaves out the first step, which
    carries the one-off costs (compilation, autotuning, the workers' first batch) reported as
    ``first_step_s``. Validation, and the checkpoints saved after an epoch's validation, are left out of
    training time; the time in validation is ``validation_s``.
    """

    def __init__(self) -> None:
        self.images = 0
        self.train_s = 0.0
        self.validation_s = 0.0  # validation inside fit (sanity checks left out)
        self.first_step_s: float | None = None  # from the start of fit's training to the first step's end
        self.to_first_step_s: float | None = None  # from this process's start to the first step's end
        self._epoch_done = False  # the epoch's last batch ran: what follows its validation is not training
        self._validation_start = 0.0
        self.last_loss: float | None = None  # the latest written train/loss
        self._after_first = (0, 0.0)  # (images, train_s) at the first step's end
        self._train_start = 0.0
        self._clock: float | None = None  # host time the current stretch of training started
        self._window: tuple[int, Stamp] | None = None  # (images, stamp) where the logged window opened
        # logged, not yet written: (step, curves, stamp, lr, images so far)
        self._pending: list[tuple[int, torch.Tensor, Stamp, float, int]] = []

    @property
    def images_per_s(self) -> float:
        images, seconds = self.images - self._after_first[0], self.train_s - self._after_first[1]
        return images / seconds if seconds > 0 else 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_start = time.perf_counter()
        self._start(trainer, pl_module)  # a run resumed mid-epoch starts with no on_train_epoch_start

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_done = False
        self._start(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _validating_in_fit(trainer):
            self._stop(trainer, pl_module)
            self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _validating_in_fit(trainer):
            self.validation_s += time.perf_counter() - self._validation_start
            if not self._epoch_done:  # a validation inside the epoch: training goes on
                self._start(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Every point up to the saved step is on disk before the checkpoint is: a run killed after a save
        # and resumed from it loses no point (the save waits for the GPU anyway)
        self._write(trainer, wait=True)
        for logger in trainer.loggers:
            logger.save()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, err: BaseException) -> None:
        self._write(trainer, wait=True)  # a stopped run (preempted, NaN) keeps the points up to its last step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.images += len(batch[1]) * trainer.world_size
        self._epoch_done = batch_idx + 1 >= trainer.num_training_batches
        if self.first_step_s is None:
            self._stop(trainer, pl_module)  # one sync, once: the first step's work is done
            self.first_step_s = time.perf_counter() - self._train_start
            self.to_first_step_s = process_age_s()
            self._after_first = (self.images, self.train_s)
            self._clock = time.perf_counter()  # the logged window goes on: the curve shows what happened
        # A logging step's curves (ClassifierModule.training_step); rank 0 alone writes, as Lightning does
        if self._window is not None and isinstance(outputs, dict) and "curves" in outputs:
            curves, event = host_copy(outputs["curves"])
            stamp: Stamp = time.perf_counter() if event is None else event
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            self._pending.append((step, curves, stamp, lr, self.images))
        if self._pending:
            self._write(trainer, wait=False)

    def _write(self, trainer: pl.Trainer, wait: bool) -> None:
        """Write the pending points whose values have reached the host (all of them if ``wait``), in order."""
        while self._pending and self._window is not None:
            step, curves, stamp, lr, images = self._pending[0]
            if isinstance(stamp, torch.cuda.Event) and not stamp.query():
                if not wait:
                    return
                stamp.synchronize()
            images0, stamp0 = self._window
            metrics = dict(zip(TRAIN_CURVES, curves.tolist(), strict=True))
            metrics["train/lr"] = lr
            metrics["perf/images_per_s"] = (images - images0) / _seconds(stamp0, stamp)
            log_metrics(trainer, metrics, step)
            self.last_loss = metrics["train/loss"]
            self._window = (images, stamp)
            self._pending.pop(0)

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._clock = time.perf_counter()
        if trainer.is_global_zero and trainer.loggers:
            stamp = timing_event() if pl_module.device.type == "cuda" else self._clock
            self._window = (self.images, stamp)

    def _stop(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._clock is None:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # once per epoch, so the total counts finished work
        self.train_s += time.perf_counter() - self._clock
        self._clock = None
        self._write(trainer, wait=True)


def _validating_in_fit(trainer: pl.Trainer) -> bool:
    """Whether this validation runs inside fit (not a sanity check, not ``trainer.validate``). During fit's
    validation the stage is VALIDATING, so ``trainer.training`` is False there."""
    return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking


def _seconds(start: Stamp, end: Stamp) -> float:
    """Seconds between two stamps of the same kind (CUDA events both, or host times both)."""
    if isinstance(start, torch.cuda.Event):
        return start.elapsed_time(end) / 1e3
    return end - start


class ContinueLog(pl.Callback):
    """On resume, tells TensorBoard to drop points the interrupted run logged past the resumed step
    (``restart_curves``), at the first resumed step, once Lightning has settled its step counter. (CSV and
    MLflow cannot forget points: ``t240dist.loggers``.)"""

    def __init__(self) -> None:
        self._resumed = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logs = tensorboard(trainer) is not None and trainer.is_global_zero
        self._resumed = logs and trainer.ckpt_path is not None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not self._resumed:
            return
        self._resumed = False
        restart_curves(trainer, trainer.fit_loop.epoch_loop._batches_that_stepped)


@rank_zero_only
def restart_curves(trainer: pl.Trainer, step: int) -> None:
    """Tell TensorBoard that the run goes on from ``step``: it drops the points at or after ``step`` that an
    earlier attempt in this run dir logged (TensorBoard purges them at a ``SessionLog.START`` event), so the
    curves show every step once. A run that starts from scratch does so at step 0, before anything else is
    logged: an attempt stopped before its first save (SIGKILL, a lost node) may have left points."""
    logger = tensorboard(trainer)
    if logger is not None:
        writer = logger.experiment.file_writer
        writer.add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))


class ExactResume(pl.Callback):
    """What Lightning leaves out of a resume: RNG states, and where the next training batch comes from.

    Lightning saves no RNG state (dropout and MixUp of a resumed run would differ) and replays a plain
    DataLoader from the start of the epoch. Every rank's RNG states are gathered into the checkpoint and
    each rank restores its own before the first resumed step. The position of the next batch, (epoch,
    batches done), is read from Lightning's loop as it stands at the save: after an epoch's last batch it
    is the next epoch's start. Callback states are restored before the training loader is made, so the
    data module makes it at that position (``resume_at``).

    A job resumed on another number of ranks (``trainer.devices``, ``trainer.num_nodes``) or another
    ``data.batch_size`` from an epoch's end goes on with the next epoch, as the same epochs are drawn
    whatever the ranks; it is not bit-exact (each rank trains on other samples), and ranks the checkpoint
    has no RNG state for keep their own. From inside an epoch it is refused: Lightning's restored count of
    the epoch's batches, in the saving job's batches, would end that epoch at the wrong place.
    """

    def __init__(self) -> None:
        self._pending: list[dict[str, Any]] | None = None
        self._trainer: pl.Trainer | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        mine = _rng_state()
        ranks: list[Any] = [mine]
        if dist.is_available() and dist.is_initialized():
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
        trainer = self._trainer
        return {
            "ranks": ranks,
            "next_batch": _next_batch(trainer) if trainer else (0, 0),
            "batch_size": _batch_size(trainer) if trainer else 0,  # per rank; the ranks are len(ranks)
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict["ranks"]
        trainer = self._trainer
        data = trainer.datamodule if trainer else None
        # testing a checkpoint (the run's best after fit) resumes nothing
        fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        if not fitting or not isinstance(data, ImageDataModule) or "next_batch" not in state_dict:
            return
        epoch, done = state_dict["next_batch"]
        ranks, now = len(self._pending), _batch_size(trainer)
        batch = state_dict.get("batch_size", now)  # a checkpoint saved before it was recorded: this one's
        if (ranks, batch) != (trainer.world_size, now):
            if done:
                raise CheckpointError(
                    f"{trainer.ckpt_path} was saved {done} batch(es) into epoch {epoch} by {ranks} rank(s) × "
                    f"{batch} a batch, and this job has {trainer.world_size} × {now}: resume it with as many "
                    f"ranks (trainer.devices × trainer.num_nodes) and data.batch_size={batch}"
                    f"{_epoch_end_hint(trainer.ckpt_path)}"
                )
            report.show_regrouped(ranks, batch, trainer.world_size, now)
        data.resume_at(epoch, done)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._pending is not None:
            if trainer.global_rank < len(self._pending):
                _set_rng_state(self._pending[trainer.global_rank])
            self._pending = None


def _batch_size(trainer: pl.Trainer) -> int:
    """A rank's training batch size (``data.batch_size``)."""
    datamodule = trainer.datamodule
    return datamodule.cfg["batch_size"] if isinstance(datamodule, ImageDataModule) else 0


def _epoch_end_hint(path: str) -> str:
    """The hint to resume from the newest epoch-end checkpoint beside ``path`` (names hold the step)."""
    ends = sorted(Path(path).parent.glob("epoch*-step*.ckpt"), key=lambda p: p.stem.split("-step")[-1])
    return f", or go on from an epoch's end with resume={ends[-1]}" if ends else ""


def _next_batch(trainer: pl.Trainer) -> tuple[int, int]:
    """(epoch, batches of it done) of the next training batch, counted by Lightning's loop: the batches the
    loop has consumed, not those the loader's workers or Lightning's fetcher have prefetched."""
    done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    if done >= trainer.num_training_batches:
        return trainer.current_epoch + 1, 0
    return trainer.current_epoch, done


def _rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python RNG states, in types ``torch.load(weights_only=True)`` reads."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos},
        "numpy_gauss": (has_gauss, cached),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy = state["numpy"]
    np.random.set_state(
        (numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], *state["numpy_gauss"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class Preemption(Checkpoint):
    """SIGTERM, SIGUSR1 (SLURM's ``--signal``), SIGUSR2 (submitit's) or Ctrl-C (SIGINT) set a flag; the run
    saves at the next step boundary and stops with ``Preempted`` (exit code 75), or ``Interrupted`` (130)
    for Ctrl-C. Nothing is done inside the signal handler, and a second Ctrl-C stops at once.

    A ``Checkpoint`` callback, so that Lightning calls it after every other callback, as it calls its
    savers: a step's state is whole only once every ``on_train_batch_end`` has run (EMA's update of the
    averaged weights among them; saved before it, a resumed EMA run missed one update).

    A step boundary (``at_step_boundary``) ends an optimizer step and is not an epoch's last batch: a
    signal at the last batch is acted on one batch later, after the epoch's validation and saves. With
    several ranks, they exchange the flag at logging steps (:class:`Agreed`: no wait) and all stop after
    the same step, one logging window after a rank saw the signal. In a submitit job, submitit's own
    handler for its signal, which this one displaced, runs after the save: it requeues the job (submitit
    owns requeue there) and exits.
    """

    SIGNALS = (*PREEMPTING, signal.SIGINT)

    def __init__(self, directory: Path, run_dir: Path) -> None:
        self.directory = directory
        self.run_dir = run_dir
        self.received: set[int] = set()
        self._stop = False  # the ranks agreed to stop, at the next step boundary
        self._previous: dict[int, Any] = {}
        self._whole_run = False  # inside ``handling``
        self._trained = False  # this process fitted (its training is saved by the time it tests)
        self._agreed = Agreed()

    @contextmanager
    def handling(self) -> Iterator[None]:
        """Handle the signals from before training until after the test (``fit_and_test``). Lightning puts
        its own handler in at each stage's start (taken over again at ``on_train_start`` and
        ``on_test_start``), and between and after the stages the default action would be left: its
        handler ended a test with exit 0 and nothing said, the default one killed the process."""
        self._whole_run = True
        self._take_over()
        try:
            yield
        finally:
            self._whole_run = False
            self._restore()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trained = True
        self._take_over()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._whole_run:
            self._restore()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if not self._whole_run:
            self._restore()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._whole_run:
            self._take_over()
            self._stop_testing()

    def on_test_batch_end(self, *args: Any, **kwargs: Any) -> None:
        if self._whole_run:
            self._stop_testing()

    def _stop_testing(self) -> None:
        """A signal once training is saved (after its last step, in the test; or in ``train.evaluate``):
        stop at the next test batch. A rerun finds the run trained and tests it."""
        if self.received:
            self._stop_now(f"stopped before the test ended{'; training is saved' if self._trained else ''}")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.world_size == 1:
            self._stop = bool(self.received)
        elif self._agreed.due(trainer.global_step, trainer.log_every_n_steps):
            # a signal seen by any rank, acted on by all one logging window later
            flag = torch.full((1,), float(bool(self.received)), device=pl_module.device)
            seen = self._agreed.exchange(flag, None, ranks=True)
            self._stop |= seen is not None and seen[0][0] > 0
        if self._stop and at_step_boundary(trainer, batch_idx):
            # stop right here: a graceful stop would run epoch-end hooks and save as if the epoch ended
            path = self.directory / f"preempted-step{trainer.global_step:06d}.ckpt"
            trainer.save_checkpoint(path, weights_only=False)  # the whole state (and no note about it)
            written(trainer)
            self._stop_now(f"saved {path} at step {trainer.global_step}")

    def _stop_now(self, what: str) -> NoReturn:
        """End the run after the signal: in a submitit job, submitit's handler for its signal requeues the
        job and exits (on rank 0; it returns elsewhere); then ``Preempted``, or ``Interrupted`` for Ctrl-C."""
        for signum in self.received:
            if is_submitit_requeue(self._previous.get(signum)):
                self._previous[signum](signum, None)
        kind = Interrupted if signal.SIGINT in self.received else Preempted
        raise kind(f"{what} — {resume_hint(self.run_dir)}")

    def _take_over(self) -> None:
        """Put this handler in (over Lightning's), keeping the handlers from before the first time."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.SIGNALS:
            if not (signum == signal.SIGINT and signum in self.received):  # a second Ctrl-C: not ours
                self._previous.setdefault(signum, signal.signal(signum, self._request))

    def _request(self, signum: int, frame: Any) -> None:
        self.received.add(signum)
        if signum == signal.SIGINT:  # a second Ctrl-C: Python's KeyboardInterrupt, at once
            signal.signal(signum, self._previous[signum])

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


class EarlyStop(EarlyStopping):
    """Lightning's EarlyStopping on the checkpoints' metric (``checkpoint.monitor`` and ``checkpoint.mode``).

    Its state (best score, validations without improvement) is saved in every checkpoint, so a resumed run
    stops where the uninterrupted one would. A rerun of a run it stopped trains nothing (Lightning would
    start the next epoch), and the patience of the config, not the checkpoint's, decides: a rerun with a
    larger ``early_stopping.patience`` trains on.
    """

    def __init__(self, checkpoint: dict[str, Any], patience: int, min_delta: float) -> None:
        # checked after each validation, not at each epoch's end (Lightning's choice where validation ends
        # every epoch): a run whose max_steps ends its first epoch early has no val/loss there to compare,
        # and Lightning stopped it with a RuntimeError
        super().__init__(
            monitor=checkpoint["monitor"],
            mode=checkpoint["mode"],
            patience=patience,
            min_delta=min_delta,
            check_on_train_epoch_end=False,
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        patience = self.patience
        super().load_state_dict(state_dict)
        self.patience = patience

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.wait_count >= self.patience:
            trainer.should_stop = True


def optuna_trial(cfg: dict[str, Any], run_dir: Path) -> OptunaTrial | None:
    """The callback of a job that is an Optuna trial; None for any other run."""
    if cfg["trial"] is None:
        return None
    return OptunaTrial(cfg["trial"], "val/" + cfg["objective"].split("/")[1], run_dir)


class OptunaTrial(pl.Callback):
    """A job's side of its Optuna trial: records the trial's run dir (user attribute ``run_dir``) as training
    starts, before any checkpoint, so that a rerun after a killed or preempted sweep continues there; reports
    the validation metric after each epoch, and stops training when the trial is pruned.

    Hand-written: optuna-integration's PyTorchLightningPruningCallback is built on the ``lightning`` package
    (t240dist's Trainer is ``pytorch_lightning``'s) and, under DDP, has every rank open the storage. Here only
    rank 0 talks to Optuna and broadcasts the decision, and a pruned trial stops like an early-stopped run
    (every rank leaves ``fit`` normally, the best checkpoint is still tested), so nothing crashes.
    """

    def __init__(self, trial: dict[str, Any], metric: str, run_dir: Path) -> None:
        self.ref, self.metric, self.run_dir = trial, metric, run_dir
        self.pruned_at: int | None = None
        self._trial: Any = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self._trial = sweep.open_trial(self.ref, self.run_dir)
            if self._trial is not None:
                self._trial.set_user_attr("run_dir", str(self.run_dir.absolute()))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        prune = False
        if trainer.is_global_zero and self._trial is not None:
            value = float(trainer.callback_metrics[self.metric])
            # A NaN would make Optuna's pruners prune the trial; left unreported, it ends as a failed trial.
            if math.isfinite(value):
                self._trial.report(value, step=trainer.current_epoch)
                prune = self._trial.should_prune()
        if trainer.strategy.broadcast(prune, src=0):
            trainer.should_stop = True
            self.pruned_at = trainer.current_epoch


def _refuse_nonfinite(state: dict[str, torch.Tensor], when: str) -> None:
    """Stop with one line if a floating-point weight or buffer of ``state`` is NaN/inf."""
    tensors = [t for t in state.values() if t.is_floating_point()]
    if not torch.stack([torch.isfinite(t).all() for t in tensors]).all():
        raise NonFiniteError(
            f"the weights or buffers (e.g. BatchNorm statistics) are NaN/inf at step {when} — lower "
            "optim.lr or set trainer.gradient_clip_val; earlier checkpoints are intact"
        )


class NonFiniteGuard(pl.Callback):
    """Keeps NaN and inf out of the weights and the checkpoints (Lightning checks no loss by default).

    ``nonfinite=stop`` checks each optimizer step's loss on the device and flags the step in a ring of
    ``log_every_n_steps`` slots, one per step of the logging window: one kernel on one number a step.
    At each logging step the ring is exchanged (:class:`Agreed`: max-reduced across ranks, copied to the
    host behind the step's work, read one window later) and cleared; the run stops with one line naming
    the first bad step, every rank at the same step. Gradients are not read: a NaN/inf gradient makes
    the weights non-finite, so the next step's loss is flagged; after the last step, and at every save,
    the weights and buffers themselves are checked, so a non-finite model is never written as ``last``
    or top-k, nor left at the end of training. Checking every gradient cost a pass over them each step
    (0.09 ms of ResNet-50's 64 ms on an H100). ``skip`` must decide before the update, so it checks the
    loss and every gradient (GradScaler's one-kernel check) and reads the result at once (one sync),
    drops a bad step's gradients (the optimizer then leaves the weights and its own state as they were)
    and puts back the buffers that its forward pass changed (BatchNorm statistics), kept from the last
    good step.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.skipped = 0
        self._probe: torch.Tensor | None = None  # the step's losses summed: NaN/inf survive any sum
        self._flags: torch.Tensor | None = None  # stop: 1 in the slot of each bad step of the window
        self._unit: torch.Tensor | None = None  # the check's scale: 1, on the device
        self._agreed = Agreed()  # stop: the flags on their way to the host, with the window's first step
        self._good_buffers: list[torch.Tensor] = []  # skip: the buffers as the last good step left them

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unit = torch.ones((), device=pl_module.device)
        if self.mode == "stop":
            self._flags = torch.zeros(trainer.log_every_n_steps, device=pl_module.device)
        else:
            self._good_buffers = [b.detach().clone() for b in pl_module.buffers()]

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        loss = loss.detach()
        self._probe = loss if self._probe is None else self._probe + loss

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        probe, self._probe = self._probe, None
        if probe is None:
            return
        if self._flags is not None:  # stop
            slot = self._flags[trainer.global_step % len(self._flags)]
            torch._amp_foreach_non_finite_check_and_unscale_([probe], slot, self._unit)
            return
        checked = [probe]
        if trainer.precision != "16-mixed":  # GradScaler skips non-finite gradients and lowers its scale
            checked += [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        # GradScaler's own multi-tensor check: one kernel sets `found` if any element is NaN/inf (and
        # multiplies by 1, a no-op). A norm per tensor (torch._foreach_norm) made one output per tensor
        # and cost 0.16 ms of host time a step on the H100's host (ResNet-18, cProfile).
        found = torch.zeros((), device=probe.device)
        torch._amp_foreach_non_finite_check_and_unscale_(checked, found, self._unit)
        self._skip_unless(not found.item(), trainer, pl_module, optimizer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._flags is not None and self._agreed.due(trainer.global_step, len(self._flags)):
            self._exchange(trainer)  # reads the flags staged one window ago

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_now(trainer)
        _refuse_nonfinite(pl_module.state_dict(), f"{trainer.global_step}, the end of training")

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._check_now(trainer)  # the first bad step, named, rather than the save that found NaN weights
        _refuse_nonfinite(checkpoint["state_dict"], f"{trainer.global_step}, so no checkpoint was written")

    def _exchange(self, trainer: pl.Trainer) -> None:
        """Stage the flags of the steps since the last exchange (ranks agree on them) and clear them; stop if
        the previous exchange's flags mark a bad step."""
        step = trainer.global_step
        first = step - 1 - (step - 1) % len(self._flags)  # the window's first step: its slot is 0
        self._stop_if_bad(self._agreed.exchange(self._flags, first, ranks=trainer.world_size > 1))
        self._flags.zero_()

    @staticmethod
    def _stop_if_bad(seen: tuple[list[float], int] | None) -> None:
        """Stop, naming the first bad step, if exchanged flags mark one."""
        if seen is None:
            return
        flags, first = seen
        bad = [first + slot for slot, flag in enumerate(flags) if flag]
        if bad:
            raise NonFiniteError(
                f"the loss became NaN/inf at step {bad[0]} — lower optim.lr, set trainer."
                "gradient_clip_val, or train on with nonfinite=skip; earlier checkpoints are intact"
            )

    def _check_now(self, trainer: pl.Trainer) -> None:
        """Read every flag so far (a wait): stop if any step was bad."""
        if self._flags is not None:
            self._exchange(trainer)
            self._stop_if_bad(self._agreed.collect())

    def _skip_unless(
        self,
        finite: bool,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        """Keep a good step's buffers; undo a bad step: no update, the buffers of the last good step."""
        buffers = [b.detach() for b in pl_module.buffers()]
        if finite:
            torch._foreach_copy_(self._good_buffers, buffers)  # one launch for every buffer
            return
        optimizer.zero_grad(set_to_none=True)
        torch._foreach_copy_(buffers, self._good_buffers)
        self.skipped += 1
        log.warning("step %d: non-finite loss or gradients, update skipped", trainer.global_step)
