"""Exact resume, as a property: a run resumed from any state it saved ends as the uninterrupted run ends.

One uninterrupted run keeps a copy of its run dir as it stands after every save (``last.ckpt`` is
overwritten, recovery checkpoints rotate); then each copy is resumed with ``resume=auto``, as a rerun of
the same command would, and must end with the uninterrupted run's weights, test metrics and curves.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import compose, scalars
from datasets_on_disk import write_cifar

from t240dist.checkpoint import KEY_ENV, CheckpointError, SignedCheckpointIO, load_checkpoint
from t240dist.run import train

TIMED = "perf/images_per_s"  # its values are timings: only its steps must match


def snapshot_every_save(monkeypatch: pytest.MonkeyPatch, run_dir: Path, into: Path) -> list[Path]:
    """Copy ``run_dir`` after each checkpoint is written into ``into/NN``; returns the list it fills.

    The copy is made in the checkpoint writer's thread, as the write ends: training may have gone on
    meanwhile, as it does when a run is killed after a save.
    """
    copies: list[Path] = []
    write = SignedCheckpointIO.write

    def write_and_copy(self: SignedCheckpointIO, checkpoint: dict, path: Path) -> None:
        write(self, checkpoint, path)
        copies.append(into / f"{len(copies):02d}-{path.stem}")
        shutil.copytree(run_dir, copies[-1])

    monkeypatch.setattr(SignedCheckpointIO, "write", write_and_copy)
    return copies


def assert_same_curves(resumed: Path, whole: Path) -> None:
    """Every tag at every step once, with equal values (timings: equal steps)."""
    got, want = scalars(resumed), scalars(whole)
    assert got.keys() == want.keys()
    for tag, points in want.items():
        if tag == TIMED:
            assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        else:
            assert got[tag] == points, tag


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root, per_batch=24)  # 108 training images: 6 batches of 16 an epoch, and a ragged rest
    return root


BASE = [
    "data=cifar10",
    "data.batch_size=16",
    "data.augment.crop=pad",
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
    "plain": [],
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
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_from_every_saved_state_matches_the_uninterrupted_run(
    case: str, cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "test-key")
    overrides = [*BASE, f"data.root={cifar}", *CASES[case]]
    whole_dir = tmp_path / "whole"
    copies = snapshot_every_save(monkeypatch, whole_dir, tmp_path / "saved")
    whole = train(compose(overrides), run_dir=whole_dir)
    monkeypatch.undo()
    monkeypatch.setenv(KEY_ENV, "test-key")
    names = {copy.name.split("-", 1)[1].split("-step")[0] for copy in copies}
    assert {"recovery", "last"} <= names and any(n.startswith("epoch") for n in names), names

    for copy in copies[:-1]:  # the last copy is the finished run (a rerun of it: see the test below)
        resumed = train(compose(overrides), run_dir=copy)
        assert resumed["resumed_from"] is not None, copy.name
        assert resumed["model_fingerprint"] == whole["model_fingerprint"], copy.name
        assert (resumed["test_acc"], resumed["test_loss"]) == (whole["test_acc"], whole["test_loss"])
        assert_same_curves(copy, whole_dir)


def test_a_finished_run_reruns_as_finished_and_trains_on_when_max_epochs_rises(
    cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """No schedule, so that two epochs and then one more are the same training as three at once."""
    monkeypatch.setenv(KEY_ENV, "test-key")
    overrides = [*BASE, f"data.root={cifar}", "sched=none"]
    three = train(compose([*overrides, "trainer.max_epochs=3"]), run_dir=tmp_path / "three")
    two = train(compose([*overrides, "trainer.max_epochs=2"]), run_dir=tmp_path / "run")
    saved = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "checkpoints").iterdir()}
    capsys.readouterr()

    again = train(compose([*overrides, "trainer.max_epochs=2"]), run_dir=tmp_path / "run")
    assert again == two
    assert "this run already finished" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "checkpoints").iterdir()} == saved

    longer = train(compose([*overrides, "trainer.max_epochs=3"]), run_dir=tmp_path / "run")
    assert longer["resumed_from"] is not None
    assert longer["global_step"] == three["global_step"] > two["global_step"]
    assert longer["model_fingerprint"] == three["model_fingerprint"]


def test_last_is_the_final_state_and_best_names_the_best(
    cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "test-key")
    done = train(compose([*BASE, f"data.root={cifar}"]), run_dir=tmp_path)
    folder = tmp_path / "checkpoints"
    last = load_checkpoint(folder / "last.ckpt", trust_unsigned=False)
    assert last["global_step"] == done["global_step"]
    assert (folder / "best.ckpt").read_bytes() == Path(done["best_checkpoint"]).read_bytes()


def test_resume_never_refuses_a_run_dir_that_holds_checkpoints(
    cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "test-key")
    overrides = [*BASE, f"data.root={cifar}", "trainer.max_epochs=1"]
    train(compose(overrides), run_dir=tmp_path)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(CheckpointError, match=r"resume=never, but .* holds an earlier run's checkpoints — "):
        train(compose([*overrides, "resume=never"]), run_dir=tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
