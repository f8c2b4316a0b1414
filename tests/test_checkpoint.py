"""Checkpoints: signed and verified before unpickling, crash-consistent under SIGKILL and a full disk."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose, process_tree, run_cli, scalars, wait_for_checkpoint
from datasets_on_disk import write_cifar

from t240dist.checkpoint import (
    KEY_ENV,
    CheckpointError,
    alias,
    checkpoint_key,
    load_checkpoint,
    resume_checkpoint,
    sign,
    verify,
)
from t240dist.run import train


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "test-key")


class Payload:
    """Unpickling this creates the file ``marker``: proof that a payload ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def _crafted(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"state_dict": {}, "evil": Payload(marker)}, buffer)
    return buffer.getvalue()


def test_tampered_foreign_and_crafted_checkpoints_are_refused_unopened(
    tmp_path: Path, tiny: list[str], key: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = Path(train(compose(tiny), run_dir=tmp_path / "run")["best_checkpoint"])
    assert load_checkpoint(good, trust_unsigned=False)["global_step"] == 8

    flipped = tmp_path / "flipped.ckpt"
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"flipped.ckpt is damaged \(its sha256 does not match\) — "):
        load_checkpoint(flipped, trust_unsigned=False)

    monkeypatch.setenv(KEY_ENV, "another-key")
    with pytest.raises(
        CheckpointError, match="signed with another key or altered — set T240DIST_CHECKPOINT_KEY"
    ):
        load_checkpoint(good, trust_unsigned=False)
    monkeypatch.setenv(KEY_ENV, "test-key")

    marker = tmp_path / "payload-ran"
    unsigned = tmp_path / "unsigned.ckpt"
    unsigned.write_bytes(_crafted(marker))
    with pytest.raises(
        CheckpointError, match=r"carries no t240dist signature — .*checkpoint.trust_unsigned=true"
    ):
        load_checkpoint(unsigned, trust_unsigned=False)
    with pytest.raises(CheckpointError, match="holds more than weights"):
        load_checkpoint(unsigned, trust_unsigned=True)  # trusted, yet still weights only
    signed = tmp_path / "signed-evil.ckpt"
    signed.write_bytes(sign(_crafted(marker), b"test-key"))
    with pytest.raises(CheckpointError, match="holds more than weights"):
        load_checkpoint(signed, trust_unsigned=False)
    assert not marker.exists()


def test_cli_refuses_a_tampered_checkpoint_with_one_line(tmp_path: Path, tiny: list[str], key: None) -> None:
    good = Path(train(compose(tiny), run_dir=tmp_path / "run")["best_checkpoint"])
    data = bytearray(good.read_bytes())
    data[100] ^= 0x01
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(bytes(data))
    done = run_cli([*tiny, f"resume={bad}", f"hydra.run.dir={tmp_path / 'again'}"], cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"CheckpointError: {bad} is damaged (its sha256 does not match) — use an earlier checkpoint"
    ]


def _steps_run(tmp_path: Path, run_dir: Path, *extra: str, **popen: object) -> subprocess.Popen:
    args = [*TINY, "data.train_size=1024", "trainer.max_epochs=2", "checkpoint.every_n_steps=1", *extra]
    env = {**os.environ, KEY_ENV: "test-key"}
    cmd = [sys.executable, "-m", "train", *args, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen
    )


@pytest.mark.slow
def test_sigkill_during_saves_leaves_only_whole_checkpoints_and_auto_resume_finishes(
    tmp_path: Path, key: None
) -> None:
    run_dir = tmp_path / "run"
    # first, an attempt killed before its first save, once its first curve points are on disk: the next
    # starts from scratch, and they must not show twice
    early = _steps_run(tmp_path, run_dir, "data.train_size=16384", "checkpoint.every_n_steps=0")
    deadline = time.monotonic() + 120
    while not (list(run_dir.glob("events.*")) and scalars(run_dir).get("train/loss")):
        assert time.monotonic() < deadline, "no curve point on disk after 2 minutes"
        time.sleep(0.2)
    early.send_signal(signal.SIGKILL)
    early.wait()
    assert scalars(run_dir)["train/loss"] and not list(run_dir.glob("checkpoints/*.ckpt"))
    rng = random.Random(0)
    for _ in range(3):  # the run saves a checkpoint every step: kills land in and between saves
        process = _steps_run(tmp_path, run_dir, "data.train_size=4096")
        deadline = time.monotonic() + 120
        while not list((run_dir / "checkpoints").glob("recovery-*.ckpt")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.2, 1.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
        for path in (run_dir / "checkpoints").glob("*.ckpt"):  # every final name holds a whole, signed file
            verify(path.read_bytes(), path, trust_unsigned=False)
    done = _steps_run(tmp_path, run_dir, "data.train_size=4096")
    assert done.wait(timeout=300) == 0, done.stderr.read().decode()[-2000:]
    # every point once: each save writes the points up to its step first
    assert [s for s, _ in scalars(run_dir)["train/loss"]] == list(range(2 * 4096 // 32))


@pytest.mark.parametrize("aliased", [True, False], ids=["last-links-the-newest", "no-last"])
def test_resume_auto_takes_the_newest_save_when_saves_share_a_file_time(
    tmp_path: Path, key: None, aliased: bool
) -> None:
    """File times tick in milliseconds: saves a step apart can carry the same one, in any listing order."""
    signed = sign(_crafted(tmp_path / "never"), checkpoint_key())  # verified, never unpickled here
    names = ["recovery-step000007.ckpt", "preempted-step000008.ckpt", "epoch000-step000006.ckpt"]
    for name in names:
        (tmp_path / name).write_bytes(signed)
    newest = tmp_path / "preempted-step000008.ckpt"
    if aliased:
        alias(newest, tmp_path / "last.ckpt")
    for path in tmp_path.glob("*.ckpt"):
        os.utime(path, ns=(1_700_000_000_000_000_000,) * 2)
    picked = resume_checkpoint("auto", tmp_path, trust_unsigned=False)
    assert picked == newest  # by its own name: last.ckpt names the next save once there is one


def test_a_kill_between_a_save_and_its_names_leaves_names_that_the_rerun_puts_right(
    tmp_path: Path, key: None
) -> None:
    """A save is written, then named ``last.ckpt`` (and ``best.ckpt`` where it is the best): a kill in
    between leaves both naming older files. Made here from a finished run's folder, as the kill at the
    end of its last epoch leaves it (the final save and the summary not yet written): the rerun resumes
    from the newest save and names it last, and names the best it restored best."""
    args = [*TINY, "checkpoint.every_n_steps=1", "monitor=off"]
    done = train(compose(args), run_dir=tmp_path)
    folder = tmp_path / "checkpoints"
    newest = Path(done["best_checkpoint"])
    assert newest.name == f"epoch001-step{done['global_step']:06d}.ckpt"  # the last epoch's is the best
    (folder / "last.ckpt").unlink()
    (tmp_path / "run_summary.json").unlink()
    [recovery] = folder.glob("recovery-*.ckpt")
    alias(recovery, folder / "last.ckpt")  # the save before
    alias(recovery, folder / "epoch000-step000004.ckpt")  # the former best, not yet rotated out
    alias(recovery, folder / "best.ckpt")
    later = time.time_ns() + 10**9
    os.utime(newest, ns=(later, later))
    again = train(compose(args), run_dir=tmp_path)
    assert again["resumed_from"] == str(newest) and again["global_step"] == done["global_step"]
    assert (folder / "last.ckpt").samefile(newest) and (folder / "best.ckpt").samefile(newest)
    assert again["test_acc"] == done["test_acc"]


@pytest.mark.slow
def test_full_disk_fails_with_one_line_and_keeps_the_previous_checkpoint(tmp_path: Path, key: None) -> None:
    run_dir = tmp_path / "run"
    first = _steps_run(
        tmp_path, run_dir, "checkpoint.every_n_steps=0", "trainer.max_epochs=1", "model.width=64"
    )
    assert first.wait(timeout=300) == 0, first.stderr.read().decode()[-2000:]
    before = {p: p.read_bytes() for p in (run_dir / "checkpoints").glob("*.ckpt")}
    limit = min(len(b) for b in before.values()) // 2

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    second = _steps_run(
        tmp_path, run_dir, "checkpoint.every_n_steps=0", "model.width=64", preexec_fn=small_files
    )
    assert second.wait(timeout=300) == 2
    lines = second.stderr.read().decode().strip().splitlines()
    assert (
        lines[-1].startswith("CheckpointError: cannot write ") and "File too large — free space" in lines[-1]
    )
    after = {p: p.read_bytes() for p in (run_dir / "checkpoints").glob("*.ckpt")}
    assert after == before  # the previous checkpoints are untouched and still verify
    for path in after:
        verify(after[path], path, trust_unsigned=False)
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))


def _cifar_run(cifar: Path, run_dir: Path, workers: int, *extra: str) -> subprocess.Popen:
    args = ["data=cifar10", f"data.root={cifar}", "data.batch_size=10", f"data.num_workers={workers}"]
    args += [
        "model.width=8",
        "module.mixup_alpha=0.4",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
    ]
    args += ["checkpoint.every_n_steps=1", f"hydra.run.dir={run_dir}", *extra]
    env = {**os.environ, KEY_ENV: "test-key"}
    cmd = [sys.executable, "-m", "train", *args]
    return subprocess.Popen(
        cmd,
        cwd=run_dir.parent,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _finish(process: subprocess.Popen, run_dir: Path) -> dict:
    assert process.wait(timeout=300) == 0, process.stderr.read().decode()[-2000:]
    return json.loads((run_dir / "run_summary.json").read_text())


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CIFAR-10 copy: 180 training images, 18 batches of 10 an epoch."""
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root, per_batch=40)
    return root


@pytest.fixture(scope="module")
def uninterrupted(cifar: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The summary of the run every single-process resume must reproduce (no worker processes)."""
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    return _finish(_cifar_run(cifar, run_dir, 0), run_dir)


@pytest.mark.slow
def test_resume_after_kill_in_the_second_epoch_with_workers_matches_the_single_process_run(
    tmp_path: Path, key: None, cifar: Path, uninterrupted: dict
) -> None:
    """Shuffling, dropout, MixUp and random crops/flips on; SIGKILL in the second epoch (18 steps an epoch)
    of a run with 2 DataLoader workers; the rerun resumes (resume=auto) from whatever was saved last.

    Augmentation is seeded per sample, so 2 worker processes reproduce the single-process run too.
    tests/test_resume.py resumes from every state a run saves, in one process and in a 2-rank DDP job.
    """
    killed = _cifar_run(cifar, tmp_path / "cut", 2)
    wait_for_checkpoint(tmp_path / "cut" / "checkpoints" / "recovery-*.ckpt", min_step=20)
    for pid in [killed.pid, *process_tree(killed.pid)]:  # its DataLoader workers too
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    killed.wait()
    resumed = _finish(_cifar_run(cifar, tmp_path / "cut", 2), tmp_path / "cut")
    assert resumed["resumed_from"] is not None
    assert resumed["global_step"] == uninterrupted["global_step"]
    assert resumed["model_fingerprint"] == uninterrupted["model_fingerprint"]
    assert resumed["test_acc"] == uninterrupted["test_acc"]


@pytest.mark.parametrize(
    ("signum", "code", "kind"),
    [
        (signal.SIGTERM, 75, "Preempted"),
        (signal.SIGUSR1, 75, "Preempted"),
        (signal.SIGINT, 130, "Interrupted"),
    ],
    ids=["SIGTERM", "SIGUSR1", "SIGINT"],
)
@pytest.mark.slow
def test_a_signal_saves_at_a_step_boundary_exits_and_resumes_exactly(
    tmp_path: Path, key: None, cifar: Path, uninterrupted: dict, signum: int, code: int, kind: str
) -> None:
    every_step = "trainer.log_every_n_steps=1"
    run_dir = tmp_path / "cut"
    stopped = _cifar_run(cifar, run_dir, 0, every_step)
    wait_for_checkpoint(run_dir / "checkpoints" / "recovery-*.ckpt", min_step=1)
    stopped.send_signal(signum)
    assert stopped.wait(timeout=60) == code
    last = stopped.stderr.read().decode().strip().splitlines()[-1]
    fix = f"— rerun the same command with hydra.run.dir={run_dir} to resume"
    assert last.startswith(f"{kind}: saved ") and last.endswith(fix), last
    [saved] = (run_dir / "checkpoints").glob("preempted-step*.ckpt")
    verify(saved.read_bytes(), saved, trust_unsigned=False)
    assert (run_dir / "checkpoints" / "last.ckpt").samefile(saved)

    resumed = _finish(_cifar_run(cifar, run_dir, 0, every_step), run_dir)
    assert resumed["resumed_from"] == str(saved)
    assert resumed["model_fingerprint"] == uninterrupted["model_fingerprint"]
    # the curve has every step once, the one the run stopped after included
    assert [step for step, _ in scalars(run_dir)["train/loss"]] == list(range(36))
