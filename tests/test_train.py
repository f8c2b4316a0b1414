"""Real short Lightning runs through t240dist.run.train: run dir, TensorBoard, checkpoints, switches."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY, compose, scalars
from datasets_on_disk import write_bad_tree, write_cifar, write_image_tree, write_mnist
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.overrides import TorchFunctionMode

from t240dist.checkpoint import load_checkpoint
from t240dist.config import check_steps, validate
from t240dist.data import ImageDataModule
from t240dist.errors import ConfigError
from t240dist.module import ClassifierModule
from t240dist.run import train

SUMMARY_KEYS = {
    "test_acc", "val_acc", "wall_s", "train_images_per_s", "global_step", "epochs",
    "world_size", "precision", "devices",
}  # fmt: skip


def test_short_run_fills_the_run_dir_and_tensorboard(tmp_path: Path, tiny: list[str]) -> None:
    summary = train(compose(tiny), run_dir=tmp_path)

    on_disk = json.loads((tmp_path / "run_summary.json").read_text())
    assert on_disk.keys() >= SUMMARY_KEYS and on_disk == json.loads(json.dumps(summary))
    steps_per_epoch = 128 // 32
    assert summary["global_step"] == 2 * steps_per_epoch and summary["epochs"] == 2
    assert summary["world_size"] == 1 and summary["devices"] == ["cpu"] and summary["precision"] == "32-true"
    assert 0.0 <= summary["test_acc"] <= 1.0 and summary["train_images_per_s"] > 0
    assert (tmp_path / "config.yaml").read_text().startswith("seed: 0")
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()

    curves = scalars(tmp_path)
    for tag in ("train/loss", "train/acc", "val/loss", "val/acc", "val/top5", "test/acc", "train/lr"):
        assert tag in curves, sorted(curves)
    assert [s for s, _ in curves["train/loss"]] == list(range(2 * steps_per_epoch))  # logged every step
    assert [s for s, _ in curves["train/lr"]] == list(range(2 * steps_per_epoch))
    assert [s for s, _ in curves["val/acc"]] == [steps_per_epoch - 1, 2 * steps_per_epoch - 1]
    assert curves["test/acc"][0][1] == pytest.approx(summary["test_acc"])
    assert curves["perf/images_per_s"] and all(v > 0 for _, v in curves["perf/images_per_s"])


def test_hyperparameters_reach_the_hparams_tab(tmp_path: Path, tiny: list[str]) -> None:
    from tensorboard.plugins.hparams import plugin_data_pb2

    train(compose([*tiny, "optim.lr=0.05"]), run_dir=tmp_path)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["optim.lr"].number_value == pytest.approx(0.05)
    assert hparams["model.name"].string_value == "small_cnn"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} >= {"test/acc", "val/acc"}


def test_checkpoint_loads_weights_only_with_plain_hyperparameters(tmp_path: Path, tiny: list[str]) -> None:
    summary = train(compose(tiny), run_dir=tmp_path)
    ckpt = torch.load(summary["best_checkpoint"], weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert type(hp["model"]) is dict and hp["model"]["name"] == "small_cnn" and hp["num_classes"] == 10
    assert hp["class_names"] == [f"class_{k}" for k in range(10)]
    assert (tmp_path / "classes.txt").read_text().splitlines() == hp["class_names"]
    assert all(k.startswith("net.") for k in ckpt["state_dict"] if "acc" not in k and "top5" not in k)


class HostSyncSpy(pl.Callback, TorchFunctionMode):
    """Records tensor read-backs to the host over whole training steps 1 and 2 (Lightning's loop included).

    Reads made by the DataLoader are left out: they touch host tensors only, by design. The non-finite
    guard reads its flags only at logging steps (every 50 here), outside the two steps watched.
    """

    READS = frozenset({"item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu"})

    def __init__(self) -> None:
        pl.Callback.__init__(self)
        TorchFunctionMode.__init__(self)
        self.reads: list[str] = []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == 1:
            self.__enter__()
        elif trainer.global_step == 3:
            self.__exit__(None, None, None)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = getattr(func, "__name__", "")
        if name in self.READS and not any(
            "torch/utils/data" in f.filename for f in traceback.extract_stack()
        ):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def _run_with_spy(run_dir: Path, overrides: list[str], monkeypatch: pytest.MonkeyPatch) -> HostSyncSpy:
    spy, original = HostSyncSpy(), pl.Trainer

    def trainer_with_spy(*args: object, callbacks: list, **kwargs: object) -> pl.Trainer:
        return original(*args, callbacks=[*callbacks, spy], **kwargs)

    monkeypatch.setattr(pl, "Trainer", trainer_with_spy)
    train(compose([*overrides, "trainer.log_every_n_steps=50"]), run_dir=run_dir)
    monkeypatch.undo()
    return spy


def test_training_step_reads_nothing_back_from_the_device(
    tmp_path: Path, tiny: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _run_with_spy(tmp_path / "clean", tiny, monkeypatch).reads == []

    # The spy does see a read-back when a step makes one (the control).
    step = ClassifierModule.training_step

    def step_with_item(self: ClassifierModule, batch: object, batch_idx: int) -> torch.Tensor:
        loss = step(self, batch, batch_idx)
        loss.item()
        return loss

    monkeypatch.setattr(ClassifierModule, "training_step", step_with_item)
    assert _run_with_spy(tmp_path / "control", tiny, monkeypatch).reads == ["item"] * 2


class GradientWatch(pl.Callback):
    """Records, for each batch, whether gradients are held when its forward pass starts."""

    def __init__(self) -> None:
        self.held_at_forward: list[bool] = []

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, *args: object) -> None:
        self.held_at_forward.append(any(p.grad is not None for p in module.parameters()))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_gradients_are_freed_after_each_optimizer_step(
    tmp_path: Path, tiny: list[str], accumulate: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not held through the next forward pass (peak memory), but kept between accumulated micro-batches."""
    watch, original = GradientWatch(), pl.Trainer
    monkeypatch.setattr(
        pl, "Trainer", lambda *a, callbacks, **k: original(*a, callbacks=[*callbacks, watch], **k)
    )
    summary = train(compose([*tiny, f"trainer.accumulate_grad_batches={accumulate}"]), run_dir=tmp_path)
    assert summary["global_step"] * accumulate == len(watch.held_at_forward) > 4
    assert watch.held_at_forward == [i % accumulate != 0 for i in range(len(watch.held_at_forward))]


@pytest.mark.parametrize(
    "switch",
    [
        ["module.label_smoothing=0.1"],
        ["module.mixup_alpha=0.2"],
        ["module.cutmix_alpha=1.0", "module.mixup_alpha=0.2"],
        ["model.channels_last=true"],
        ["sched=onecycle"],
        ["sched=none", "optim=adamw"],
    ],
    ids=lambda s: ",".join(s),
)
def test_each_switch_trains_to_finite_loss(tmp_path: Path, tiny: list[str], switch: list[str]) -> None:
    summary = train(compose([*tiny, *switch]), run_dir=tmp_path)
    assert torch.isfinite(torch.tensor(summary["test_loss"]))
    assert all(v == v for _, v in scalars(tmp_path)["train/loss"])


def test_ema_tests_the_averaged_weights(tmp_path: Path, tiny: list[str]) -> None:
    plain = train(compose(tiny), run_dir=tmp_path / "plain")
    ema = train(compose([*tiny, "module.ema_decay=0.5"]), run_dir=tmp_path / "ema")
    last_plain = torch.load(tmp_path / "plain/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    last_ema = torch.load(tmp_path / "ema/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert not torch.equal(last_plain["net.head.1.weight"], last_ema["net.head.1.weight"])
    assert plain["global_step"] == ema["global_step"]
    # the run's test scored the averaged weights of its best checkpoint, as a plain Trainer does
    scored = _test_of_best_checkpoint(ema)
    assert (scored["test/acc"], scored["test/loss"]) == (ema["test_acc"], pytest.approx(ema["test_loss"]))


@pytest.mark.parametrize("mode", ["min", "max"])  # the best by val/loss, and the worst: an earlier epoch's
def test_the_test_scores_the_best_checkpoints_weights_and_every_file_is_written(
    tmp_path: Path, tiny: list[str], mode: str
) -> None:
    summary = train(compose([*tiny, "trainer.max_epochs=3", f"checkpoint.mode={mode}"]), run_dir=tmp_path)
    # min: the last epoch's state is the best, tested as it is in memory while its files are written;
    # max: an earlier state, tested from its file
    best_step = int(re.search(r"step(\d+)", summary["best_checkpoint"]).group(1))
    assert (best_step == summary["global_step"]) == (mode == "min")
    scored = _test_of_best_checkpoint(summary)
    assert (scored["test/acc"], scored["test/loss"]) == (
        summary["test_acc"],
        pytest.approx(summary["test_loss"]),
    )
    # every save is whole, signed and named when train() returns
    for name in (
        summary["best_checkpoint"],
        tmp_path / "checkpoints/best.ckpt",
        tmp_path / "checkpoints/last.ckpt",
    ):
        assert load_checkpoint(Path(name), trust_unsigned=False)["state_dict"]
    assert load_checkpoint(tmp_path / "checkpoints/last.ckpt", False)["global_step"] == summary["global_step"]
    assert Path(summary["best_checkpoint"]).samefile(tmp_path / "checkpoints/best.ckpt")


def _test_of_best_checkpoint(summary: dict) -> dict[str, float]:
    """The test metrics of a run's best checkpoint, scored by a plain Trainer from the file."""
    best = torch.load(summary["best_checkpoint"], weights_only=True)
    module = ClassifierModule(**best["hyper_parameters"])
    module.load_state_dict(best["state_dict"])
    conf = best["hyper_parameters"]["config"]
    data = ImageDataModule(conf["data"], conf["seed"])
    [scored] = pl.Trainer(logger=False, enable_progress_bar=False).test(
        module, datamodule=data, verbose=False
    )
    return scored


def test_same_seed_gives_the_same_run(tmp_path: Path, tiny: list[str]) -> None:
    a = train(compose(tiny), run_dir=tmp_path / "a")
    b = train(compose(tiny), run_dir=tmp_path / "b")
    c = train(compose([*tiny, "seed=1"]), run_dir=tmp_path / "c")
    assert a["test_loss"] == b["test_loss"] and a["test_loss"] != c["test_loss"]


def test_run_on_a_tree_with_bad_files_skips_and_lists_them(tmp_path: Path) -> None:
    write_bad_tree(tmp_path / "tree")
    overrides = [
        "data=imagefolder",
        f"data.root={tmp_path / 'tree'}",
        "data.on_corrupt=skip",
        "data.image_size=16",
    ]
    overrides += [
        "data.batch_size=2",
        "data.num_workers=0",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
    ]
    summary = train(compose([*overrides, "model.width=8"]), run_dir=tmp_path / "run")
    assert summary["skipped_files"] == 4 and summary["global_step"] == 2
    listed = (tmp_path / "run" / "skipped_files.txt").read_text().splitlines()
    assert len(listed) == 4 and any(line.endswith("truncated.jpg: truncated JPEG") for line in listed)
    assert (tmp_path / "run" / "classes.txt").read_text().split() == ["bird", "cat", "dog"]


@pytest.mark.parametrize(
    "fmt",
    [
        "cifar10",
        "mnist",
        "imagefolder data.num_workers=2",
        "imagefolder data.decode=device data.num_workers=2",
    ],
)
def test_short_run_on_each_on_disk_format(tmp_path: Path, fmt: str) -> None:
    """Each format trains and tests, and no loader worker outlives the run (a worker left alive made the
    process wait at exit: torch joins each for 5 s)."""
    fmt, *options = fmt.split()
    root = tmp_path / "data"
    root.mkdir()
    {"cifar10": write_cifar, "mnist": lambda r: write_mnist(r, compress=True)}.get(
        fmt, lambda r: write_image_tree(r, per_class=4)
    )(root)
    overrides = [
        *options,
        f"data={fmt}",
        f"data.root={root}",
        "data.batch_size=4",
        "model.width=8",
        "trainer.max_epochs=1",
    ]
    overrides += [
        "trainer.enable_progress_bar=false",
        *(["data.image_size=16"] if fmt == "imagefolder" else []),
    ]
    summary = train(compose(overrides), run_dir=tmp_path / "run")
    assert summary["data"] == fmt and summary["global_step"] > 0 and 0 <= summary["test_acc"] <= 1
    assert multiprocessing.active_children() == []


def test_workers_give_the_same_run_twice(tmp_path: Path) -> None:
    """Augmentation runs in 2 DataLoader workers, each seeded from the run's seed."""
    write_cifar(tmp_path)
    overrides = ["data=cifar10", f"data.root={tmp_path}", "data.batch_size=10", "data.num_workers=2"]
    overrides += ["model.width=8", "trainer.max_epochs=1", "trainer.enable_progress_bar=false"]
    a = train(compose(overrides), run_dir=tmp_path / "a")
    b = train(compose(overrides), run_dir=tmp_path / "b")
    c = train(compose([*overrides, "seed=1"]), run_dir=tmp_path / "c")
    assert a["test_loss"] == b["test_loss"] != c["test_loss"]


PHOTOS = ["data=imagefolder", "data.image_size=16", "model.width=8", "trainer.max_epochs=1"]


@pytest.mark.parametrize(
    ("mistake", "error"),
    [
        ([*TINY, "data.batch_size=256"], "data.batch_size=256 is larger than the training split (128"),
        ([*TINY, "trainer.limit_train_batches=0.1"], "trainer.limit_train_batches=0.1 keeps none of the 4"),
        (PHOTOS, "data.batch_size=64 is larger than the training split (22 images), so the run would train"),
    ],
    ids=["batch", "limit", "24-photos"],
)
def test_a_run_that_would_train_nothing_stops_before_any_work_and_its_fix_trains(
    tmp_path: Path, mistake: list[str], error: str, recwarn: pytest.WarningsRecorder
) -> None:
    write_image_tree(tmp_path / "photos", per_class=12, splits=False)  # 24 photos: 22 train, 2 validate
    overrides = [*mistake, f"data.root={tmp_path / 'photos'}"] if mistake is PHOTOS else mistake
    with pytest.raises(ConfigError) as stopped:
        train(compose(overrides), run_dir=tmp_path / "run")
    assert error in str(stopped.value)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.yaml"]  # no checkpoint, no event
    fix = str(stopped.value).split(" — set ")[1].split(" or more")[0]
    summary = train(compose([*overrides, fix, "trainer.enable_progress_bar=false"]), run_dir=tmp_path / "fix")
    assert summary["global_step"] >= 1
    # the image folder's 4 loader workers are at most the CPUs: torch has no worker count to warn about
    assert not [w for w in recwarn if "suggested max number of worker" in str(w.message)]


def test_each_rank_needs_a_whole_batch_of_its_shard(
    tmp_path: Path, tiny: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")  # a rank of a 2-rank job, as torchrun or the agent starts it
    shard = r"\(128 images, 64 for each of 2 ranks\), .* — set data.batch_size=64$"
    with pytest.raises(ConfigError, match=shard):
        train(compose([*tiny, "data.batch_size=96"]), run_dir=tmp_path)


def _readme_switches() -> list[str]:
    """The overrides of the README's switches example (the bash block after "Switches")."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("Switches (timm-style)")[1].split("```bash\n")[1].split("```")[0]
    return block.replace("\\\n", " ").split()[3:]  # after "python -m train"


def test_an_ema_longer_than_the_run_warns_and_the_readmes_switches_do_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    conf = validate(compose(["module.ema_decay=0.999"]))  # the default run: 380 steps of digits
    train_size = ImageDataModule(conf["data"], conf["seed"]).info.train_size
    with caplog.at_level(logging.WARNING, logger="t240dist"):
        check_steps(conf, train_size, ranks=1)
        assert caplog.messages == [
            "module.ema_decay=0.999 averages the weights over about 1000 optimizer steps, more than the 380 "
            "this run takes: validation, test and checkpoints would use weights close to the initial ones — "
            "use module.ema_decay=0.99, or train longer"
        ]
        caplog.clear()
        switches = _readme_switches()
        assert any(s.startswith("module.ema_decay=") for s in switches)
        check_steps(validate(compose(switches)), train_size, ranks=1)
        assert caplog.messages == []


def test_a_long_cpu_run_says_early_how_long_and_how_to_shorten_it(
    tmp_path: Path, tiny: list[str], reap: list
) -> None:
    long = [*tiny, "trainer.max_epochs=100000", f"hydra.run.dir={tmp_path / 'run'}"]
    run = subprocess.Popen(
        [sys.executable, "-m", "train", *long],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    reap.append(run)
    for line in run.stdout:
        if "this run trains" in line:
            break
    note = re.search(r"this run trains (\d+) more steps on the CPU, .* — .* trainer\.max_steps=(\d+) ", line)
    assert note and int(note.group(1)) > 399_000 and 1 <= int(note.group(2)) < int(note.group(1)), line
