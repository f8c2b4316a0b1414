"""Exact resume, as a property: a run resumed from any state it saved ends as the uninterrupted run ends.

One uninterrupted run keeps a copy of its run dir as it stands after every save (``last.ckpt`` is
overwritten, recovery checkpoints rotate; tests/snapshots.py). Then, each time in a fresh copy: every
saved state is resumed with ``resume=auto``, as a rerun of the same command would; the best checkpoint,
an older state than the last, with ``resume=PATH`` into a new run dir and into the finished run's own;
and a run stopped by a real SIGTERM is rerun from its ``preempted-step*`` checkpoint. Each must end with
the uninterrupted run's weights, test metrics and curves. The same holds for a job of 2 DDP ranks.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    assert_same_end,
    compose,
    process_tree,
    run_cli,
    scalars,
    start_run,
    wait_for_checkpoint,
)
from datasets_on_disk import write_cifar, write_image_tree
from snapshots import copy_after_every_write

from t240dist.checkpoint import KEY_ENV, CheckpointError, SignedCheckpointIO, load_checkpoint
from t240dist.errors import Preempted
from t240dist.run import train


@dataclass
class Uninterrupted:
    """A run trained without a stop, and copies of its run dir after each of its saves, in order."""

    overrides: list[str]
    run_dir: Path
    summary: dict[str, Any]
    saved: list[Path]


def assert_ends_as(resumed: dict[str, Any], run_dir: Path, whole: Uninterrupted, since: int = 0) -> None:
    """The run resumed in ``run_dir`` ended as the uninterrupted run, its curves from step ``since`` on."""
    assert resumed["resumed_from"] is not None
    assert_same_end(run_dir, whole.run_dir, since)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root, per_batch=24)  # 108 training images: 6 batches of 16 an epoch, and a ragged rest
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_image_tree(root, per_class=54)  # 108 training files, JPEG and PNG: as the CIFAR case
    return root


CIFAR = ["data=cifar10", "data.augment.crop=pad"]  # the data of every case that names none
BASE = [
    "data.batch_size=16",
    "data.augment.hflip=true",
    "model.width=4",  # small_cnn: dropout on
    "module.mixup_alpha=0.4",
    "trainer.max_epochs=3",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "monitor=off",
    "checkpoint.every_n_steps=4",
]

CASES = {
    "plain": ["seed=1"],  # whose best epoch is the first (every case's best is older than its last state)
    "workers2-cutmix-adamw-onecycle": [
        "data.num_workers=2",
        "module.cutmix_alpha=1.0",
        "optim=adamw",
        "sched=onecycle",
    ],
    "on_gpu-ema-accumulate2": [
        "data.on_gpu=true",
        "module.ema_decay=0.9",
        "trainer.accumulate_grad_batches=2",
        "checkpoint.every_n_steps=2",
    ],
    "val_every_2-limit_batches-smoothing": [
        "trainer.check_val_every_n_epoch=2",
        "trainer.limit_train_batches=0.7",
        "module.label_smoothing=0.1",
        "checkpoint.every_n_steps=3",
    ],
    "imagefolder-decoded-ahead-workers2": [  # random-resized crops drawn in persistent workers
        "seed=1",  # whose best epoch is the second
        "data=imagefolder",
        "data.image_size=16",
        "data.augment.crop=resized",
        "data.decode=device",
        "data.num_workers=2",
    ],
}


@pytest.fixture(scope="module", params=list(CASES))
def uninterrupted(
    request: pytest.FixtureRequest, cifar: Path, images: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Uninterrupted]:
    root = tmp_path_factory.mktemp(request.param)
    case = CASES[request.param]
    data = [f"data.root={images}"] if "data=imagefolder" in case else [*CIFAR, f"data.root={cifar}"]
    overrides = [*data, *BASE, *case]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(KEY_ENV, "test-key")
        with pytest.MonkeyPatch.context() as saving:
            saving.setattr(
                SignedCheckpointIO, "write", copy_after_every_write(root / "whole", root / "saved")
            )
            summary = train(compose(overrides), run_dir=root / "whole")
        yield Uninterrupted(overrides, root / "whole", summary, sorted((root / "saved").iterdir()))


def test_resume_from_every_saved_state_matches_the_uninterrupted_run(uninterrupted: Uninterrupted) -> None:
    names = {copy.name.split("-", 1)[1].split("-step")[0] for copy in uninterrupted.saved}
    assert {"recovery", "last"} <= names and any(n.startswith("epoch") for n in names), names
    for copy in uninterrupted.saved[:-1]:  # the last copy is the finished run (a rerun of it: see below)
        assert_ends_as(train(compose(uninterrupted.overrides), run_dir=copy), copy, uninterrupted)


def test_resume_from_the_best_checkpoint_older_than_the_last_matches_the_uninterrupted_run(
    uninterrupted: Uninterrupted, tmp_path: Path
) -> None:
    """``resume=PATH`` of the best checkpoint: into a new run dir (``hydra.run.dir=runs/r2
    resume=runs/r1/checkpoints/best.ckpt``), whose curves start where it resumed, and into a copy of the
    finished run's own dir, whose later checkpoints and curve points it replaces."""
    best = uninterrupted.run_dir / "checkpoints" / "best.ckpt"
    step = load_checkpoint(best, trust_unsigned=False)["global_step"]
    assert step < uninterrupted.summary["global_step"], (
        "the best is the last state: pick a case whose val/loss rises"
    )

    resumed = train(compose([*uninterrupted.overrides, f"resume={best}"]), run_dir=tmp_path / "r2")
    assert_ends_as(resumed, tmp_path / "r2", uninterrupted, since=step)

    again = shutil.copytree(uninterrupted.run_dir, tmp_path / "again")
    resumed = train(
        compose([*uninterrupted.overrides, f"resume={again}/checkpoints/best.ckpt"]), run_dir=again
    )
    assert_ends_as(resumed, again, uninterrupted)


@contextmanager
def sigterm_after(pattern: Path, min_step: int) -> Iterator[None]:
    """Send this process and its DataLoader workers SIGTERM, as a scheduler signals every process of a job,
    once a checkpoint matching ``pattern`` of step ``min_step`` or later exists (from a thread: the run
    itself is not told). One that came after the run ended would be ignored."""
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def send() -> None:
        wait_for_checkpoint(pattern, min_step)
        pids = [os.getpid(), *process_tree(os.getpid())]
        subprocess.run(["kill", "-s", "TERM", *map(str, pids)], check=True)  # from another process, as a
        # scheduler's: a loader worker takes its parent's SIGTERM for the end of its loader

    sender = threading.Thread(target=send)
    sender.start()
    try:
        yield
    finally:
        sender.join()
        signal.signal(signal.SIGTERM, before)


def test_a_run_preempted_by_sigterm_and_rerun_matches_the_uninterrupted_run(
    uninterrupted: Uninterrupted, tmp_path: Path
) -> None:
    """SIGTERM in the second epoch, once a state of the first epoch's end or later is saved: the run saves
    ``preempted-step*`` at the next step boundary and stops; the rerun (``resume=auto``) continues from it."""
    run_dir = tmp_path / "run"
    first_epoch = uninterrupted.summary["global_step"] // uninterrupted.summary["epochs"]
    saved_then = run_dir / "checkpoints" / "*-step*.ckpt"
    with sigterm_after(saved_then, min_step=first_epoch), pytest.raises(Preempted):
        train(compose(uninterrupted.overrides), run_dir=run_dir)
    [saved] = (run_dir / "checkpoints").glob("preempted-step*.ckpt")
    assert (run_dir / "checkpoints" / "last.ckpt").samefile(saved)

    resumed = train(compose(uninterrupted.overrides), run_dir=run_dir)
    assert resumed["resumed_from"] == str(saved)
    assert_ends_as(resumed, run_dir, uninterrupted)


@pytest.mark.parametrize(
    ("signum", "code", "word"), [(signal.SIGTERM, 75, "Preempted"), (signal.SIGINT, 130, "Interrupted")]
)
@pytest.mark.slow
def test_a_signal_during_the_final_test_stops_it_and_the_rerun_tests_as_the_uninterrupted_run(
    tmp_path: Path, reap: list[subprocess.Popen], signum: int, code: int, word: str
) -> None:
    """Training is saved, the test is under way (a large test split): the signal stops the test with one
    line and its exit code (Lightning's handler had ended it with exit 0 and no summary); the rerun trains
    nothing, tests, and its summary is the uninterrupted run's, validation metrics included (kept in the
    checkpoint: the rerun validates nothing)."""
    args = ["data=synthetic", "data.train_size=512", "data.val_size=256", "data.test_size=20000"]
    args += ["trainer.max_epochs=1", "monitor=off", "trainer.enable_progress_bar=false"]
    uninterrupted = run_cli([*args, f"hydra.run.dir={tmp_path / 'whole'}"], tmp_path)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    run_dir = tmp_path / "run"
    job = start_run(args, run_dir, reap)
    log = run_dir / "train.log"
    while not (log.exists() and "`Trainer.fit` stopped" in log.read_text()):
        time.sleep(0.01)
    os.kill(job.pid, signum)
    stderr = job.communicate(timeout=120)[1]
    assert job.returncode == code and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        f"{word}: stopped before the test ended; training is saved — rerun the same command with "
        f"hydra.run.dir={run_dir} to resume"
    )
    assert not (run_dir / "run_summary.json").exists()
    rerun = run_cli([*args, f"hydra.run.dir={run_dir}"], tmp_path, **{KEY_ENV: "test-key"})  # start_run's
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "this run already finished: 1 epoch(s)" in rerun.stdout + rerun.stderr  # and was tested
    done, whole = (json.loads((d / "run_summary.json").read_text()) for d in (run_dir, tmp_path / "whole"))
    same = ("test_acc", "test_loss", "val_acc", "val_loss", "objective", "model_fingerprint", "global_step")
    assert {k: done[k] for k in same} == {k: whole[k] for k in same}


SNAPSHOTS = Path(__file__).with_name("snapshots.py")
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.max_epochs=2"]  # 3 steps an epoch on 2 ranks


@pytest.mark.slow
def test_resume_of_a_ddp_job_from_every_saved_state_matches_the_uninterrupted_job(
    cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 ranks over gloo. The uninterrupted job runs under torchrun, its rank 0 keeping a copy of the run dir
    after each save (tests/snapshots.py); each copy is resumed as users run a DDP job, through the elastic
    agent: both launchers must train the same model, from the same config."""
    monkeypatch.setenv(KEY_ENV, "test-key")
    overrides = [*CIFAR, *BASE, f"data.root={cifar}", *DDP]
    whole_dir, saved = tmp_path / "whole", tmp_path / "saved"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    done = subprocess.run(
        [*torchrun, str(SNAPSHOTS), str(whole_dir), str(saved), *overrides],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((whole_dir / "run_summary.json").read_text())
    whole = Uninterrupted(overrides, whole_dir, summary, sorted(saved.iterdir()))
    # an epoch's end (the best and the last then), a recovery step in the second epoch, the final state
    names = [copy.name.split("-", 1)[1] for copy in whole.saved]
    assert {"epoch000-step000003", "recovery-step000004"} <= set(names) and names[-1] == "last", names

    for copy in whole.saved[:-1]:
        resumed = train(compose(overrides), run_dir=copy)
        assert [r["config_sha256"] for r in resumed["ranks"]] == [
            r["config_sha256"] for r in summary["ranks"]
        ]
        assert_ends_as(resumed, copy, whole)


def test_a_finished_run_reruns_as_finished_and_trains_on_when_max_epochs_rises(
    cifar: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture,
) -> None:
    """No schedule, so that two epochs and then one more are the same training as three at once."""
    monkeypatch.setenv(KEY_ENV, "test-key")
    overrides = [*CIFAR, *BASE, f"data.root={cifar}", "sched=none"]
    three = train(compose([*overrides, "trainer.max_epochs=3"]), run_dir=tmp_path / "three")
    two = train(compose([*overrides, "trainer.max_epochs=2"]), run_dir=tmp_path / "run")
    saved = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "checkpoints").iterdir()}

    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="t240dist"):
        again = train(compose([*overrides, "trainer.max_epochs=2"]), run_dir=tmp_path / "run")
    assert again == two
    shown = capsys.readouterr().out  # the run's summary table, as it stands
    assert "run summary" in shown and f"{two['test_acc']:.4g}" in shown
    assert any(m.startswith("this run already finished") for m in caplog.messages)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "checkpoints").iterdir()} == saved

    longer = train(compose([*overrides, "trainer.max_epochs=3"]), run_dir=tmp_path / "run")
    assert longer["resumed_from"] is not None
    assert longer["global_step"] == three["global_step"] > two["global_step"]
    assert longer["model_fingerprint"] == three["model_fingerprint"]


@pytest.mark.parametrize(
    ("first", "then"),
    [
        # OneCycleLR stopped with an error past its planned steps
        (["sched=onecycle", "trainer.max_epochs=2"], ["sched=onecycle", "trainer.max_epochs=3"]),
        # max_epochs=-1 (Lightning's epochs without end) with max_steps; the cosine rose again past its end
        (
            ["sched=warmup_cosine", "trainer.max_epochs=-1", "trainer.max_steps=9"],
            ["sched=warmup_cosine", "trainer.max_epochs=-1", "trainer.max_steps=14"],
        ),
        # a plan too short for warm-up steps (a plain cosine saved) trained on to one with them (a
        # SequentialLR): Lightning loaded the one's state into the other and stopped with a KeyError, as the
        # default config did for `trainer.max_epochs=1`, then `trainer.max_epochs=3` (19 steps, then 57)
        (
            ["sched=warmup_cosine", "trainer.max_epochs=-1", "trainer.max_steps=9"],
            ["sched=warmup_cosine", "trainer.max_epochs=-1", "trainer.max_steps=40"],
        ),
        # another sched: none saved no state, and a schedule of another kind would be loaded into this one
        (["sched=none", "trainer.max_epochs=2"], ["sched=onecycle", "trainer.max_epochs=3"]),
        (["sched=onecycle", "trainer.max_epochs=2"], ["sched=warmup_cosine", "trainer.max_epochs=3"]),
        # another optim: the restored optimizer kept its saved lr, momentum and weight decay
        (["sched=none", "trainer.max_epochs=2"], ["sched=none", "trainer.max_epochs=3", "optim.lr=0.5"]),
        (
            ["sched=onecycle", "trainer.max_epochs=2"],
            ["sched=onecycle", "trainer.max_epochs=3", "optim.momentum=0.8", "optim.weight_decay=0.01"],
        ),
        (["optim=adamw", "trainer.max_epochs=2"], ["optim=adamw", "trainer.max_epochs=3", "optim.lr=0.003"]),
    ],
    ids=[
        "onecycle-longer",
        "cosine-more-steps",
        "cosine-gains-warm-up",
        "none-then-onecycle",
        "onecycle-then-cosine",
        "constant-lr-raised",
        "onecycle-momentum-and-decay",
        "adamw-lr",
    ],
)
def test_a_run_trained_on_with_another_schedule_follows_it_as_planned_from_the_start(
    cifar: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    first: list[str],
    then: list[str],
) -> None:
    """Trained on from its end with another length, sched or optim, a run's lr is, step by step, that of a
    run planned so from its start, and its optimizer's settings are that run's; a rerun of the finished run
    names the length to raise."""
    monkeypatch.setenv(KEY_ENV, "test-key")
    overrides = [*CIFAR, *BASE, f"data.root={cifar}"]
    planned = train(compose([*overrides, *then]), run_dir=tmp_path / "planned")
    done = train(compose([*overrides, *first]), run_dir=tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="t240dist"):
        assert train(compose([*overrides, *first]), run_dir=tmp_path / "run") == done
    assert any(
        m.endswith(f"rerun with a higher {first[-1].replace('=', ' (now ')})") for m in caplog.messages
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="t240dist"):
        longer = train(compose([*overrides, *then]), run_dir=tmp_path / "run")
    assert longer["resumed_from"] is not None and longer["global_step"] == planned["global_step"]
    assert planned["global_step"] > done["global_step"] > 0
    prefix = "the checkpoint was saved with another "
    [said] = [m[len(prefix) : m.index(": from step")] for m in caplog.messages if m.startswith(prefix)]
    changed = {f"length ({done['global_step']} steps, now {planned['global_step']})"}
    changed |= {"sched"} if first[0] != then[0] else set()
    changed |= {"optim"} if any(o.startswith("optim.") for o in then) else set()
    assert set(said.split(" and ")) == changed, said
    after = {step: lr for step, lr in scalars(tmp_path / "run")["train/lr"] if step > done["global_step"]}
    assert after == {s: lr for s, lr in scalars(tmp_path / "planned")["train/lr"] if s in after} != {}
    groups = [
        [{k: v for k, v in g.items() if k != "params"} for g in state["optimizer_states"][0]["param_groups"]]
        for state in (
            load_checkpoint(d / "checkpoints" / "last.ckpt", False)
            for d in (tmp_path / "run", tmp_path / "planned")
        )
    ]
    assert groups[0] == groups[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("first", "then"),
    [
        (["sched=onecycle", "trainer.max_epochs=2"], ["sched=onecycle", "trainer.max_epochs=3"]),
        (
            ["sched=warmup_cosine", "trainer.max_epochs=-1", "trainer.max_steps=5"],
            ["sched=warmup_cosine", "trainer.max_epochs=-1", "trainer.max_steps=8"],
        ),
    ],
    ids=["onecycle-longer", "cosine-more-steps"],
)
def test_a_ddp_job_trained_on_with_another_length_replans_on_every_rank(
    cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: list[str], then: list[str]
) -> None:
    """The replan above for 2 ranks over gloo, started by the elastic agent: after the resume the lr is the
    planned job's, step by step, and every rank ends with rank 0's weights (a rank that kept its old plan
    would step with its own lr and part from them, or stop: OneCycleLR refuses steps past its plan)."""
    monkeypatch.setenv(KEY_ENV, "test-key")
    overrides = [*CIFAR, *BASE, f"data.root={cifar}", *DDP[:2]]
    planned = train(compose([*overrides, *then]), run_dir=tmp_path / "planned")
    done = train(compose([*overrides, *first]), run_dir=tmp_path / "run")
    longer = train(compose([*overrides, *then]), run_dir=tmp_path / "run")
    assert longer["resumed_from"] is not None
    assert longer["global_step"] == planned["global_step"] > done["global_step"] > 0
    after = {step: lr for step, lr in scalars(tmp_path / "run")["train/lr"] if step > done["global_step"]}
    assert after == {s: lr for s, lr in scalars(tmp_path / "planned")["train/lr"] if s in after} != {}
    for summary in (planned, done, longer):
        assert summary["world_size"] == 2 and len({r["weights_sha256"] for r in summary["ranks"]}) == 1


@pytest.mark.slow
@pytest.mark.parametrize(("saved", "resumed"), [(2, 3), (3, 2)])
def test_a_ddp_job_goes_on_with_another_number_of_ranks_from_an_epochs_end_and_names_it_otherwise(
    cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, saved: int, resumed: int
) -> None:
    """A job saved by 2 ranks and resumed by 3 (a rerun with another ``trainer.devices``), and the reverse.
    From inside an epoch it is refused with one line that names the epoch-end checkpoint to go on from
    (before, a rank the checkpoint had no RNG state for stopped with an IndexError); from there the job
    trains the epochs left on its new ranks, says once that it is not bit-exact, and its ranks end with
    one set of weights."""
    monkeypatch.setenv(KEY_ENV, "test-key")
    overrides = [*CIFAR, *BASE, f"data.root={cifar}", "sched=none", *DDP[:2]]
    per_epoch = {ranks: 108 // ranks // 16 for ranks in (saved, resumed)}  # 108 images, 16 a batch
    every = per_epoch[saved] + 1  # a recovery checkpoint one batch into the second epoch
    first = [f"trainer.devices={saved}", "trainer.max_epochs=2", f"checkpoint.every_n_steps={every}"]
    train(compose([*overrides, *first]), run_dir=tmp_path / "r1")
    recovery = tmp_path / "r1" / "checkpoints" / f"recovery-step{every:06d}.ckpt"
    then = [*overrides, f"trainer.devices={resumed}", "trainer.max_epochs=3", "hydra.run.dir=r2"]
    refused = run_cli([*then, f"resume={recovery}"], cwd=tmp_path)
    [line] = refused.stderr.strip().splitlines()[-1:]
    assert (
        refused.returncode == 2 and line.startswith("CheckpointError: ") and "Traceback" not in refused.stderr
    )
    assert f"by {saved} rank(s) × 16 a batch, and this job has {resumed} × 16" in line
    hint = line.split("go on from an epoch's end with ")[1]  # resume=PATH: the command it names works
    ran = run_cli([*then, hint], cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    done = json.loads((tmp_path / "r2" / "run_summary.json").read_text())
    step = load_checkpoint(Path(hint.removeprefix("resume=")), trust_unsigned=False)["global_step"]
    epochs_done = step // per_epoch[saved]
    assert done["global_step"] == step + (3 - epochs_done) * per_epoch[resumed] > step
    assert done["world_size"] == resumed and len({r["weights_sha256"] for r in done["ranks"]}) == 1
    said = f"resuming a checkpoint of {saved} rank(s) × 16 a batch on {resumed} rank(s) × 16 from an epoch's"
    assert (tmp_path / "r2" / "train.log").read_text().count(said) == 1


@pytest.mark.parametrize(
    "ranks", [[], pytest.param(DDP[:2], marks=pytest.mark.slow)], ids=["1-rank", "2-ranks"]
)
def test_a_run_resumed_from_another_runs_file_holds_its_best_in_its_own_folder(
    cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ranks: list[str]
) -> None:
    """``resume=PATH`` into a new run dir: where training never improves on the other run's best (none of
    its epochs is validated: ``check_val_every_n_epoch`` past its end), that best is this run's
    ``best.ckpt`` too, and the other run's files stay as they were; under DDP too (rank 0 takes the file in
    while the other ranks wait)."""
    monkeypatch.setenv(KEY_ENV, "test-key")
    overrides = [*CIFAR, *BASE, f"data.root={cifar}", "sched=none", *ranks]
    train(compose([*overrides, "trainer.max_epochs=2"]), run_dir=tmp_path / "r1")
    source = tmp_path / "r1" / "checkpoints"
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    resumed = [f"resume={source / 'best.ckpt'}", "trainer.check_val_every_n_epoch=5", "trainer.max_epochs=4"]
    done = train(compose([*overrides, *resumed]), run_dir=tmp_path / "r2")
    own = tmp_path / "r2" / "checkpoints"
    assert Path(done["best_checkpoint"]).parent == own
    assert (own / "best.ckpt").read_bytes() == before["best.ckpt"]  # no epoch of r2 did better
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before
    assert load_checkpoint(own / "best.ckpt", trust_unsigned=False)["global_step"] < done["global_step"]
    assert done["world_size"] == (2 if ranks else 1)


def test_a_run_resumed_with_another_monitor_picks_its_best_by_it_and_keeps_the_former_best(
    cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A run that chose its best by ``val/loss``, resumed with ``checkpoint.monitor=val/acc`` and
    ``checkpoint.mode=max``: its best is the epoch of highest ``val/acc`` among those it validates, one line
    says so and names the former best, whose file stays as it was; a rerun that keeps the new choice keeps
    its best without a word. Lightning's plea for "the callbacks used to create the checkpoint" is gone."""
    monkeypatch.setenv(KEY_ENV, "test-key")
    overrides = [*CIFAR, *BASE, f"data.root={cifar}"]
    resumed_at = train(compose([*overrides, "trainer.max_epochs=2"]), run_dir=tmp_path)["global_step"]
    folder = tmp_path / "checkpoints"
    former = {p.name: p.read_bytes() for p in folder.glob("epoch*")}
    (former_best,) = [name for name, data in former.items() if data == (folder / "best.ckpt").read_bytes()]
    by_acc = [*overrides, "checkpoint.monitor=val/acc", "checkpoint.mode=max"]
    said = f"this run's by val/acc (max): its best is picked anew from its next validation, and {former_best}"
    for epochs, warned in ((4, 1), (6, 0)):
        caplog.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            done = train(compose([*by_acc, f"trainer.max_epochs={epochs}"]), run_dir=tmp_path)
        assert sum(said in r.getMessage() for r in caplog.records) == warned
        assert not [w for w in caught if "callbacks used to create the checkpoint" in str(w.message)]
        # an epoch's validation is drawn at its last step's index: the steps taken before it, less one
        accuracy = [(acc, -step - 1) for step, acc in scalars(tmp_path)["val/acc"] if step >= resumed_at]
        best = Path(done["best_checkpoint"])
        assert load_checkpoint(best, trust_unsigned=False)["global_step"] == -max(accuracy)[1]
        assert (folder / "best.ckpt").read_bytes() == best.read_bytes()
        assert {name: (folder / name).read_bytes() for name in former} == former


def test_a_checkpoint_that_keeps_its_best_under_lightnings_key_resumes_with_that_best(
    cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints written before the best's state had one key kept it under Lightning's key, which names the
    monitor and mode: a run resumed from one keeps that best where no later epoch is validated."""
    monkeypatch.setenv(KEY_ENV, "test-key")
    overrides = [*CIFAR, *BASE, f"data.root={cifar}"]
    train(compose([*overrides, "trainer.max_epochs=2"]), run_dir=tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    saved = load_checkpoint(last, trust_unsigned=False)
    state = saved["callbacks"].pop("BestCheckpoint")
    del state["mode"]
    key = (
        "BestCheckpoint{'monitor': 'val/loss', 'mode': 'min', 'every_n_train_steps': 0, 'every_n_epochs': 1, "
    )
    saved["callbacks"][key + "'train_time_interval': None}"] = state
    SignedCheckpointIO(trust_unsigned=False).write(saved, last)
    resumed = [*overrides, "trainer.max_epochs=4", "trainer.check_val_every_n_epoch=5"]
    done = train(compose(resumed), run_dir=tmp_path)
    assert done["best_checkpoint"] == state["best_model_path"] and done["global_step"] > saved["global_step"]


def test_last_is_the_final_state_and_best_names_the_best(
    cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With seed 1 the best is the first epoch: best.ckpt is named again at each later validation."""
    monkeypatch.setenv(KEY_ENV, "test-key")
    done = train(compose([*CIFAR, *BASE, f"data.root={cifar}", "seed=1"]), run_dir=tmp_path)
    folder = tmp_path / "checkpoints"
    last = load_checkpoint(folder / "last.ckpt", trust_unsigned=False)
    assert last["global_step"] == done["global_step"]
    assert load_checkpoint(folder / "best.ckpt", trust_unsigned=False)["global_step"] < last["global_step"]
    assert (folder / "best.ckpt").read_bytes() == Path(done["best_checkpoint"]).read_bytes()
    assert not list(folder.glob(".*"))  # no temp file or link is left behind


def test_resume_never_refuses_a_run_dir_that_holds_checkpoints(
    cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "test-key")
    overrides = [*CIFAR, *BASE, f"data.root={cifar}", "trainer.max_epochs=1"]
    train(compose(overrides), run_dir=tmp_path)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(CheckpointError, match=r"resume=never, but .* holds an earlier run's checkpoints — "):
        train(compose([*overrides, "resume=never"]), run_dir=tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
