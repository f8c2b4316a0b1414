"""Checkpoints you can trust: crash-consistent writes, and a signature checked before anything is unpickled.

A checkpoint stays a plain ``torch.save`` zip file (``torch.load(path, weights_only=True)`` still reads
it); its sha256 and an HMAC-SHA256 under a key kept outside the run dir ride in the zip's comment field,
which zip readers skip. Writes go to a temp file in the destination directory, are fsynced, and replace
the final name atomically, so a kill or a full disk never leaves a half-written file under that name.
They happen in a background thread, in the order they were asked for, from a copy of the state taken
when it was asked for: training goes on meanwhile.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import io
import json
import logging
import os
import re
import secrets
import struct
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn

from t240dist.errors import CheckpointError, own_dir_hint

log = logging.getLogger(__name__)

KEY_ENV = "T240DIST_CHECKPOINT_KEY"
_MARK = b"t240dist-signature "
_END_OF_ZIP = b"PK\x05\x06"  # end-of-central-directory record: 22 bytes, then the comment
LAST = "last.ckpt"  # the latest state saved: every save also appears under this name
BEST = "best.ckpt"  # the best checkpoint by checkpoint.monitor
_LIGHTNING_KEY_MODE = re.compile(r"'mode': '(\w+)'")  # in a ModelCheckpoint's key, as Lightning names it


class SignedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic, fsynced, signed writes, done in a background thread, and
    verified reads.

    A save copies the state's tensors where they are (on the GPU: a queued copy, no wait) and queues the
    write; serialising, signing, writing and fsyncing (~0.35 s an epoch for ResNet-18 on an H200's host)
    no longer hold up training. Removals and ``after_writes`` actions join the same queue, so a top-k file
    is removed, and ``best.ckpt`` renamed, only after the writes asked for before them. A failed write
    (a full disk) is raised on the training thread at the next save or ``flush``, and nothing queued after
    it is done. Loading and ``written`` wait for the queue; the end of a stage (``teardown``) does not, so
    that the final save is written while the test runs (a run waits with ``written`` before its summary).
    Whatever is still queued when the interpreter exits is written first (the executor joins its thread).

    Hand-written rather than Lightning's experimental AsyncCheckpointIO, which removes rotated top-k files
    at once, while their writes may still be queued, and cannot queue other work behind a write.
    """

    def __init__(self, trust_unsigned: bool) -> None:
        self.trust_unsigned = trust_unsigned
        self.seconds = 0.0  # the training thread's time in saves: the copy of the state and the queueing
        self._writer: ThreadPoolExecutor | None = None
        self._queued: list[Future] = []

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        started = time.perf_counter()
        snapshot = apply_to_collection(checkpoint, torch.Tensor, lambda t: t.detach().clone())
        self._queue(self.write, snapshot, Path(path))
        self.seconds += time.perf_counter() - started

    def write(self, checkpoint: dict[str, Any], path: Path) -> None:
        """Write ``path`` now; ``last.ckpt`` beside it then names the same file: the newest save is last."""
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_atomically(path, sign(buffer.getvalue(), checkpoint_key()))
        if path.name != LAST:
            alias(path, path.with_name(LAST))

    def remove_checkpoint(self, path: Any) -> None:
        self._queue(super().remove_checkpoint, path)

    def after_writes(self, action: Callable[[], None]) -> None:
        """Do ``action`` in the writer once every save asked for so far is written."""
        self._queue(action)

    def flush(self) -> None:
        """Wait until everything queued is done, and let the writer's thread go; raise the first failure."""
        queued, self._queued = self._queued, []
        try:
            for future in queued:
                future.result()
        finally:
            if self._writer is not None:  # the next save starts another: a sweep's trials leave none behind
                self._writer.shutdown(wait=True)
                self._writer = None

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: Any = None
    ) -> dict[str, Any]:
        self.flush()
        return load_checkpoint(Path(path), self.trust_unsigned, map_location)

    def _queue(self, action: Callable[..., None], *args: Any) -> None:
        """Queue ``action(*args)`` behind the earlier work; first raise what failed of that work."""
        for done in [f for f in self._queued if f.done()]:
            self._queued.remove(done)
            done.result()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="t240dist-checkpoints")
        earlier = list(self._queued)

        def after_earlier() -> None:
            if not any(f.exception() for f in earlier):  # nothing after a failed write
                action(*args)

        self._queued.append(self._writer.submit(after_earlier))


def written(trainer: pl.Trainer) -> None:
    """Return once every checkpoint asked for is on disk, on every rank (rank 0 writes them all)."""
    checkpoint_io = trainer.strategy.checkpoint_io
    if isinstance(checkpoint_io, SignedCheckpointIO):
        checkpoint_io.flush()
    trainer.strategy.barrier("t240dist-checkpoints-written")


def checkpoint_callbacks(cfg: dict[str, Any], directory: Path) -> list[pl.Callback]:
    """The run's savers: the best by ``checkpoint.monitor`` (first), a recovery checkpoint every
    ``checkpoint.every_n_steps`` and the final state; every save is also ``last.ckpt``."""
    keep = {k: cfg[k] for k in ("monitor", "mode", "save_top_k")}
    best = BestCheckpoint(dirpath=directory, filename="epoch{epoch:03d}-step{step:06d}", **keep)
    return [best, RecoveryCheckpoint(directory, cfg["every_n_steps"]), FinalCheckpoint(directory)]


class RunDirCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint whose bookkeeping follows its run dir when that is moved or copied.

    Lightning reloads only ``best_model_path`` when the saved dirpath differs from the current one, still
    pointing at the old place: the test would score a file elsewhere (or gone), and the top-k history
    would be lost. A stored path whose file name is in the current checkpoint folder is taken as that file
    instead (a resume from another run's file, ``resume=PATH``, keeps its paths).
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        here = Path(self.dirpath)

        def moved(path: str | None) -> str | None:
            inside = here / Path(path).name if path else None
            return str(inside) if inside is not None and inside.is_file() else path

        state = {**state_dict, "dirpath": self.dirpath}
        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            state[key] = moved(state_dict.get(key))
        state["best_k_models"] = {moved(k): v for k, v in state_dict.get("best_k_models", {}).items()}
        super().load_state_dict(state)


class BestCheckpoint(RunDirCheckpoint):
    """Lightning's top-k checkpoints by the monitored metric, with the best one also named ``best.ckpt``.

    ``save_last`` is off: Lightning rewrites ``last`` only when it saves a top-k checkpoint, so ``last``
    would be an older state whenever the metric did not improve. ``SignedCheckpointIO`` names it instead.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(auto_insert_metric_name=False, save_last=False, **kwargs)
        self.best_step: int | None = None  # the step whose weights the best file holds, if saved by this fit
        self._seen_best = ""
        self._other_choice = False  # resumed with another monitor or mode: the saved scores don't count
        self._relink = False  # name the restored best best.ckpt (rank 0 of a fit)

    @property
    def state_key(self) -> str:
        """One key whatever the monitor (Lightning's names it and mode): a run resumed with another
        ``checkpoint.monitor`` finds the state it saved, and Lightning asks for no callback it cannot add."""
        return type(self).__name__

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "mode": self.mode}

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """A run resumed with another ``checkpoint.monitor`` or ``mode`` picks its best anew: the saved best
        was chosen by another measure. Its file stays where it is, and rank 0 names it."""
        states = checkpoint.get("callbacks", {})
        for key in [k for k in states if k.startswith(f"{self.state_key}{{")]:  # saved under Lightning's key
            states.setdefault(self.state_key, {"mode": _LIGHTNING_KEY_MODE.search(key)[1], **states.pop(key)})
        saved = states.get(self.state_key)
        self._relink = trainer.is_global_zero and trainer.state.fn == TrainerFn.FITTING
        chosen = (self.monitor, self.mode)
        self._other_choice = saved is not None and (saved["monitor"], saved["mode"]) != chosen
        if self._other_choice and trainer.state.fn == TrainerFn.FITTING and trainer.is_global_zero:
            best = Path(saved["best_model_path"]).name if saved["best_model_path"] else None
            log.warning(
                f"the checkpoint's best was chosen by {saved['monitor']} ({saved['mode']}), this run's by "
                f"{self.monitor} ({self.mode}): its best is picked anew from its next validation"
                + (f", and {best} stays as it is" if best else "")
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._other_choice:
            return
        super().load_state_dict(state_dict)
        self._seen_best = self.best_model_path  # a resumed run's best: its step's weights are not in memory
        best = Path(self.best_model_path) if self.best_model_path else None
        if self._relink and best is not None and best.parent.resolve() == Path(self.dirpath).resolve():
            _name_if_there(best, BEST)  # killed between the save and naming it best: best.ckpt was older

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A run resumed from another run's file (``resume=PATH``) takes that run's best into its own folder
        (a hard link, else a copy), so that it has a ``best.ckpt`` even where it never improves on it."""
        super().on_train_start(trainer, pl_module)
        best = Path(self.best_model_path) if self.best_model_path else None
        here = Path(self.dirpath) / best.name if best else None
        if best is None or here == best or not best.is_file():
            return
        if trainer.is_global_zero:
            here.parent.mkdir(parents=True, exist_ok=True)
            alias(best, here)
        trainer.strategy.barrier("best checkpoint taken in")
        self.load_state_dict(self.state_dict())  # RunDirCheckpoint's paths now find the file here
        self._name_best(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)  # where Lightning saves when validation ends epochs
        self._name_best(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._name_best(trainer)

    def _name_best(self, trainer: pl.Trainer) -> None:
        if self.best_model_path != self._seen_best:  # saved just now, from the weights in memory
            self._seen_best, self.best_step = self.best_model_path, trainer.global_step
        best = Path(self.best_model_path) if self.best_model_path else None
        if trainer.is_global_zero and best is not None:
            trainer.strategy.checkpoint_io.after_writes(
                lambda: best.is_file() and alias(best, best.with_name(BEST))
            )


class RecoveryCheckpoint(RunDirCheckpoint):
    """The latest state every ``every_n_steps`` optimizer steps (0: never), kept once.

    Written only at a step boundary (``at_step_boundary``), the first one at or after each multiple.
    Always among the callbacks, under one state key, so a resume with another ``every_n_steps`` (or none)
    finds the state it saved and Lightning does not warn.
    """

    def __init__(self, directory: Path, every_n_steps: int) -> None:
        super().__init__(
            dirpath=directory,
            filename="recovery-step{step:06d}",
            auto_insert_metric_name=False,
            every_n_train_steps=every_n_steps,
            every_n_epochs=0,
        )

    @property
    def state_key(self) -> str:
        return type(self).__name__

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._every_n_train_steps and at_step_boundary(trainer, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class FinalCheckpoint(pl.Callback):
    """Saves the state at the end of training as ``last.ckpt``: a rerun of a finished run resumes there
    and finds nothing left to train. ``trained`` says whether this fit ran a training batch at all."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LAST
        self.trained = False

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.trained = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.trained and not trainer.fast_dev_run:  # Lightning's checkpoints skip a fast_dev_run too
            trainer.save_checkpoint(self.path, weights_only=False)


def _name_if_there(path: Path, name: str) -> None:
    """Let ``name`` beside ``path`` be that file, if it exists (a moved run dir may have lost it)."""
    if path.is_file():
        alias(path, path.with_name(name))


def at_step_boundary(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether a mid-epoch save may follow this batch: it ended an optimizer step (not a micro-batch of
    an accumulation, whose gradients a checkpoint does not hold) and it is not the epoch's last batch
    (``limit_train_batches`` counted). Lightning resumes a checkpoint saved after the last batch at the
    next epoch, leaving out that epoch's validation and epoch-end saves, which follow it a moment later."""
    stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
    return stepped and batch_idx + 1 < trainer.num_training_batches


def resume_checkpoint(resume: str, directory: Path, trust_unsigned: bool) -> Path | None:
    """What a run continues from: ``resume=PATH``; with ``auto`` the newest valid checkpoint in
    ``directory`` (damaged or foreign ones are skipped with a warning); None to start fresh.

    ``never`` refuses a run dir that holds checkpoints: the new run's would mix with the old run's.
    """
    if resume == "never":
        if any(directory.glob("*.ckpt")):
            raise CheckpointError(
                f"resume=never, but {directory} holds an earlier run's checkpoints — "
                f"{own_dir_hint('this run')}, or continue that run with resume=auto"
            )
        return None
    if resume != "auto":
        verify(Path(resume).read_bytes(), Path(resume), trust_unsigned)  # before any work, with one line
        return Path(resume)

    # Newest first. File times are coarse (a clock tick of a few ms): two saves a step apart can share one.
    # Then ``last.ckpt``, a link to the newest save, decides; else the later step in the name.
    def newest(path: Path) -> tuple[int, bool, int]:
        step = re.search(r"step(\d+)", path.name)
        return path.stat().st_mtime_ns, path.name == LAST, int(step.group(1)) if step else -1

    found = sorted(directory.glob("*.ckpt"), key=newest, reverse=True)
    for path in found:
        try:
            verify(path.read_bytes(), path, trust_unsigned)
        except CheckpointError as err:
            log.warning("resume=auto skips %s", err)
            continue
        if path.name == LAST:  # the save's own name, which the next save does not take over
            return next((other for other in found if other != path and other.samefile(path)), path)
        last = directory / LAST
        if not (last.exists() and last.samefile(path)):  # killed between the save and naming it last
            alias(path, last)
        return path
    return None


def load_checkpoint(path: Path, trust_unsigned: bool, map_location: Any = None) -> dict[str, Any]:
    """Verify ``path`` and only then deserialise it, with ``weights_only=True`` always."""
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist — check the path, or use resume=auto|never")
    payload = verify(path.read_bytes(), path, trust_unsigned)
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as err:  # weights_only refuses anything but tensors and plain containers
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"{path} holds more than weights ({first}) — it was refused unopened") from None


def sign(payload: bytes, key: bytes) -> bytes:
    """``payload`` (a zip without comment, as torch.save writes it) with its signature as the comment."""
    if not payload.endswith(b"\x00\x00") or payload[-22:-18] != _END_OF_ZIP:
        raise ValueError("expected a zip file without comment, as torch.save writes")
    note = (
        _MARK
        + json.dumps(
            {"sha256": hashlib.sha256(payload).hexdigest(), "hmac_sha256": _mac(key, payload)}
        ).encode()
    )
    return payload[:-2] + struct.pack("<H", len(note)) + note


def verify(data: bytes, path: Path, trust_unsigned: bool) -> bytes:
    """The signed payload of ``data`` if its hash and HMAC hold under this machine's key."""
    at = data.rfind(_MARK)
    end = at - 22
    if at < 22 or data[end : end + 4] != _END_OF_ZIP:
        if trust_unsigned:
            return data
        raise CheckpointError(
            f"{path} carries no t240dist signature — load it only if you trust where it came from, "
            "with checkpoint.trust_unsigned=true"
        )
    payload = data[: end + 20] + b"\x00\x00"
    try:
        note = json.loads(data[at + len(_MARK) :])
    except ValueError:
        note = {}
    if note.get("sha256") != hashlib.sha256(payload).hexdigest():
        raise CheckpointError(f"{path} is damaged (its sha256 does not match) — use an earlier checkpoint")
    if not hmac.compare_digest(str(note.get("hmac_sha256")), _mac(checkpoint_key(), payload)):
        raise CheckpointError(
            f"{path} was signed with another key or altered — set {KEY_ENV} to the key it was made with"
        )
    return payload


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` all or nothing: temp file beside it, fsync, rename, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise CheckpointError(
                f"cannot write {path}: {os.strerror(err.errno)} — free space (or raise the file-size limit) "
                "and resume; the previous checkpoint is intact"
            ) from None
        raise


def alias(path: Path, name: Path) -> None:
    """Let ``name`` be the file ``path`` is (a hard link, swapped in atomically); a copy where the
    filesystem has no hard links. A hard link survives the deletion of ``path`` (top-k rotation)."""
    tmp = name.with_name(f".{name.name}.{os.getpid()}.link")
    try:
        tmp.unlink(missing_ok=True)
        os.link(path, tmp)
        os.replace(tmp, name)
        # rename() between two links of one file does nothing and leaves both: ``name`` was ``path`` already
        tmp.unlink(missing_ok=True)
    except OSError:
        tmp.unlink(missing_ok=True)
        write_atomically(name, path.read_bytes())


def checkpoint_key() -> bytes:
    """The signing key: ``T240DIST_CHECKPOINT_KEY``, else a key file (mode 0600) made on first use.

    The key file lives in the user's config dir, never in a run dir; jobs on several machines need the
    same key, so set the variable there.
    """
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV].encode()
    path = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "t240dist" / "checkpoint.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(secrets.token_hex(32))
        tmp.chmod(0o600)
        try:
            os.link(tmp, path)  # appears whole, or not at all if another rank made it first
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip().encode()


def _mac(key: bytes, payload: bytes) -> str:
    return hmac.new(key, payload, hashlib.sha256).hexdigest()
