"""Every user-facing key is typed and range-checked before any work, with one line that says the fix."""

from __future__ import annotations

import csv
import json
import re
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files
from pathlib import Path

import pytest
from conftest import TINY, compose, run_cli
from omegaconf import OmegaConf

from t240dist.config import (
    CONF_PACKAGE,
    FOREIGN_NAMES,
    decide_decode,
    known_as,
    plain,
    validate,
    validate_run,
    with_later_keys,
)
from t240dist.errors import ConfigError


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["optim.lr=-1"], "optim.lr must be greater than 0 (got -1) — use a value > 0"),
        (["data.batch_size=0"], "data.batch_size must be greater than 0 (got 0)"),
        (
            ["trainer.precision=fp8"],
            "trainer.precision must be 'auto', '32-true', 'bf16-mixed' or '16-mixed' (got 'fp8')",
        ),
        (
            ["model=torchvision", "model.name=nosuchnet"],
            "model.name: 'nosuchnet' is not a torchvision classifier",
        ),
        (
            ["model.name=vgg11"],
            "the small_cnn group has no model 'vgg11' — use model=torchvision model.name=vgg11",
        ),
        (["+foo=1"], "foo is not a config key — remove it or fix its spelling"),
        (["+lr=0.05"], "lr is not a config key — use optim.lr=0.05 (t240dist's key)"),
        (
            ["+trainer.gpus=2"],
            "trainer.gpus is not an argument of Lightning's Trainer — use trainer.devices=2",
        ),
        (["+optim.momentum2=0.9"], "optim.momentum2 is not a config key"),
        (["optim=adam", "optim.betas=[0.9,2]"], "optim.betas.1 must be less than 1 (got 2)"),
        (["trainer.max_epochs=abc"], "trainer.max_epochs must be a valid integer"),
        (["model=torchvision"], "model.name is not set — give it on the command line"),
        (["model=torchvision", "model.name=vgg11", "model.cifar_stem=true"], "ResNet-family models only"),
        (["module.label_smoothing=1.5"], "module.label_smoothing must be less than 1 (got 1.5)"),
        (["trainer.accelerator=gpu"], "no CUDA GPU is visible — use trainer=cpu or trainer=auto"),
        (["trainer=cpu", "trainer.precision=16-mixed"], "16-mixed needs a GPU"),
        (["data=imagefolder"], "data.root is not set"),
        (["nonfinite=bogus"], "nonfinite must be 'stop' or 'skip' (got 'bogus')"),
        (["model.compile=fast"], "model.compile: 'fast' is not a compile setting — use false, true, reduce"),
        (["trainer.limit_val_batches=0"], "trainer.limit_val_batches must be greater than 0 (got 0)"),
        (["trainer.max_steps=0"], "trainer.max_steps: 0 trains nothing — use -1"),
        (["trainer.max_epochs=-1"], "trainer.max_epochs: -1 trains without end — set trainer.max_steps=N"),
        (["monitor.interval_s=0"], "monitor.interval_s must be greater than or equal to 0.01 (got 0)"),
        (
            ["model.compile=step"],
            "model.compile=step needs a GPU — use model.compile=true or false on the CPU",
        ),
        (["model.compile=step", "trainer.precision=16-mixed"], "— set trainer.precision=bf16-mixed"),
        (["model.compile=step", "trainer=ddp"], "with several devices (DDP) — set trainer.devices=1"),
        (["model.compile=step", "module.mixup_alpha=0.2"], "with MixUp/CutMix"),
        (["model.compile=step", "nonfinite=skip"], "— set nonfinite=stop"),
        (["model.compile=step", "trainer.accumulate_grad_batches=2"], "with gradient accumulation"),
        (
            ["data=imagefolder", "data.root=x", "data.decode=device", "data.augment.crop=pad"],
            "data.decode: device crops files with crop=resized or none, not pad — set data.augment.crop=",
        ),
        (
            ["data=imagefolder", "data.root=x", "data.decode=gpu"],
            "data.decode must be 'auto', 'workers' or 'device'",
        ),
        (["data.on_gpu=fast"], "data.on_gpu: 'fast' is not an on_gpu setting — use auto, true or false"),
        (["data.on_gpu=1"], "data.on_gpu: '1' is not an on_gpu setting"),
        (["data=mnist", "data.on_gpu_max_share=0"], "data.on_gpu_max_share must be greater than 0 (got 0)"),
        (
            ["data=synthetic", "data.on_gpu=true"],
            "data.on_gpu: true needs images held in memory, but synthetic ones are made per index — "
            "set data.on_gpu=false",
        ),
        (
            ["data=imagefolder", "data.root=/data", "data.on_gpu=true"],
            "but image folders are decoded lazily from disk — set data.on_gpu=false",
        ),
        (
            ["+trainer.use_distributed_sampler=true"],
            "trainer.use_distributed_sampler is t240dist's to set: t240dist's data module shards every split",
        ),
        (["+trainer.plugins=[]"], "trainer.plugins is t240dist's to set: t240dist's plugins sign"),
        (
            ["+trainer.benchmrk=true"],
            "not an argument of Lightning's Trainer — did you mean +trainer.benchmark=true?",
        ),
        (["+trainer.accumulate=2"], "did you mean trainer.accumulate_grad_batches=2?"),
        (["+trainer.val_check_intervals=[0.5]"], "did you mean +trainer.val_check_interval=[0.5]?"),
        (["trainer.profiler=pytorch"], "trainer.profiler must be 'simple' or 'advanced' (got 'pytorch')"),
        (["early_stopping.patience=0"], "early_stopping.patience must be greater than 0 (got 0)"),
        (
            ["logger=csv", "logger.csv.flush_logs_every_n_steps=0"],
            "logger.csv.flush_logs_every_n_steps must be",
        ),
        (
            ["data=cifar10", "data.augment.crop=resized", "data.on_gpu=true"],
            "data.on_gpu: true makes batches on the device, which has no random-resized crop — "
            "set data.augment.crop=pad or none, or data.on_gpu=auto",
        ),
    ],
)
def test_bad_value_is_one_config_error_naming_key_and_fix(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(compose(overrides))
    message = str(err.value)
    assert expected in message
    assert "\n" not in message and " — " in message


def _options(group: str) -> list[str]:
    """The options of a config group, as the installed package holds them."""
    options = (files(CONF_PACKAGE) / group).iterdir()
    return sorted(
        p.name[: -len(".yaml")] for p in options if p.name.endswith(".yaml") and p.name != "default.yaml"
    )


@pytest.mark.parametrize("option", _options("optim") + _options("sched"))
def test_every_optim_and_sched_option_validates(option: str) -> None:
    group = "optim" if option in _options("optim") else "sched"
    conf = validate(compose([f"{group}={option}"]))
    assert conf[group] and conf["data"]["name"] == "digits"


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_validates_with_synthetic_data(experiment: str) -> None:
    conf = validate(compose([f"experiment={experiment}", "data=synthetic", "trainer=cpu"]))
    assert conf["data"]["name"] == "synthetic"


@pytest.mark.parametrize("group", ["data", "model", "optim", "sched", "trainer"])
def test_every_key_that_foreign_names_point_to_exists_whatever_the_groups(group: str) -> None:
    """lr=..., epochs=..., gpus=... are answered with a key that each option of each group has."""
    for option in _options(group):
        extra = ["data.root=x"] if group == "data" and option in ("cifar10", "mnist", "imagefolder") else []
        extra += ["model.name=resnet18"] if group == "model" and option == "torchvision" else []
        cfg, absent = compose([f"{group}={option}", *extra]), object()
        for foreign, ours in FOREIGN_NAMES.items():
            assert OmegaConf.select(cfg, ours, default=absent) is not absent, (group, option, foreign)
            assert known_as(foreign) == ours and known_as(f"trainer.{foreign}") in (ours, None)


@pytest.mark.parametrize("trainer", _options("trainer"))
def test_trainer_variants_inherit_the_defaults(trainer: str) -> None:
    cfg = compose([f"trainer={trainer}"])
    assert cfg.trainer.max_epochs == compose([]).trainer.max_epochs
    assert cfg.trainer.accelerator == {"auto": "auto", "cpu": "cpu", "gpu": "gpu", "ddp": "auto"}[trainer]


def test_cli_config_errors_are_one_line_exit_2_without_traceback(tmp_path: Path) -> None:
    cases = [
        (["optim.lr=-1"], "ConfigError: optim.lr must be greater than 0"),
        (["optim.foo=1"], "ConfigError: optim.foo is not a config key"),
        (
            ["data.root=/data"],  # a key of other data options, not of the default digits
            "ConfigError: data.root is not a key of this data — pick one that has it: data=cifar10, "
            "data=imagefolder or data=mnist, with data.root=/data",
        ),
        (["model=nosuch"], "ConfigError: In 'config': Could not find 'model/nosuch' — Available options"),
        (
            ["data=cifar10", "data.root=/nonexistent"],
            "ConfigError: data.root '/nonexistent' does not exist — give the folder of the CIFAR-10 python "
            "batches",
        ),
        (
            ["trainer.benchmrk=true"],  # neither a key of trainer/ nor a Trainer argument: the one it meant
            "ConfigError: trainer.benchmrk is not an argument of Lightning's Trainer — did you mean "
            "+trainer.benchmark=true?",
        ),
        (
            ["trainer.logger=false"],  # a Trainer argument that t240dist sets: why, and what to use, at once
            "ConfigError: trainer.logger is t240dist's to set: t240dist builds the loggers — pick them with",
        ),
        (
            ["data=cifar10", "data.root=~/cifar"],  # as bash and zsh pass it on
            "ConfigError: data.root=~/cifar: Hydra reads a bare ~ as its delete operator — quote the value, "
            "'data.root=\"~/cifar\"', or write data.root=$HOME/cifar",
        ),
        (
            ["data=cifar10", "data.root=/data/größe"],  # and the quoted value reads: the line after this
            "ConfigError: data.root=/data/größe: Hydra reads this value only in quotes — write "
            "'data.root=\"/data/größe\"'",
        ),
        (
            ["data=cifar10", 'data.root="/data/größe"'],
            "ConfigError: data.root '/data/größe' does not exist",
        ),
    ]
    with ThreadPoolExecutor(len(cases)) as pool:  # four interpreters start at once, not one after another
        runs = pool.map(
            lambda i: run_cli([*cases[i][0], f"hydra.run.dir={tmp_path / str(i)}"], cwd=tmp_path),
            range(len(cases)),
        )
        for i, done in enumerate(runs):
            expected = cases[i][1]
            lines = done.stderr.strip().splitlines()
            assert done.returncode == 2, done.stderr
            assert lines == [lines[-1]] and lines[-1].startswith(expected), done.stderr
            assert "Traceback" not in done.stdout + done.stderr
            assert not (tmp_path / str(i)).exists()  # no work was done, and no empty run dir is left


def test_a_config_error_leaves_no_run_dir_but_keeps_one_that_was_there(tmp_path: Path) -> None:
    earlier = tmp_path / "earlier"
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run's")
    fresh, kept = (
        run_cli(["optim.lr=-1", *where], cwd=tmp_path)
        for where in ([], [f"hydra.run.dir={earlier}", "data=cifar10", f"data.root={tmp_path / 'none'}"])
    )
    assert fresh.returncode == kept.returncode == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier"]  # outputs/DATE/TIME went, parents too
    assert (earlier / "checkpoints" / "last.ckpt").read_bytes() == b"an earlier run's"
    assert (earlier / ".hydra").is_dir()  # the rerun's own record, in the dir it was given


def test_a_checkpoints_config_from_before_the_logger_group_validates_with_the_defaults() -> None:
    """A checkpoint's stored config lacks the keys added since (evaluate, predict and export read it)."""
    stored = plain(compose(["trainer=ddp", "data=synthetic"]))
    del stored["logger"], stored["early_stopping"], stored["trainer"]["profiler"]
    conf = validate_run(with_later_keys(stored))
    assert conf["logger"] == {"tensorboard": {}} and conf["early_stopping"]["patience"] is None
    assert conf["trainer"]["profiler"] is None and conf["trainer"]["strategy"] == "ddp"


def test_config_errors_and_the_config_print_import_no_torch(tmp_path: Path) -> None:
    """Issue 19's start-up goal holds with the logger and debug groups and +trainer arguments."""
    for args in (
        ["optim.lr=-1"],
        ["+trainer.logger=csv"],
        ["--cfg", "job", "logger=[tensorboard,csv,mlflow]", "debug=fdr", "+trainer.benchmark=true"],
    ):
        done = run_cli([*args, f"hydra.run.dir={tmp_path}"], cwd=tmp_path, PYTHONPROFILEIMPORTTIME="1")
        imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
        assert done.returncode in (0, 2) and "hydra" in imported, done.stderr[-2000:]
        assert not imported & {"torch", "pytorch_lightning", "mlflow"}, args


@pytest.mark.parametrize(
    ("entry", "mistake", "hint"),
    [
        (
            "train.bench",
            "steps=5",
            "steps is not a config key — use bench.steps=5 (",
        ),  # the one key ending so
        ("train", "patience=2", "patience is not a config key — use early_stopping.patience=2 ("),
        ("train", "steps=5", "steps is not a config key — check its spelling"),  # not sweep, a group
        ("train", "name=resnet18", "name is not a config key — check its spelling"),  # data.name, model.name
    ],
)
def test_a_key_given_without_its_group_is_answered_with_the_one_key_that_ends_so(
    tmp_path: Path, entry: str, mistake: str, hint: str
) -> None:
    done = run_cli([mistake], cwd=tmp_path, entry=entry)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and last.startswith(f"ConfigError: {hint}"), done.stderr[-1000:]


def test_hydra_full_error_gives_the_traceback_and_still_exit_2(tmp_path: Path) -> None:
    done = run_cli(["optim.lr=-1", f"hydra.run.dir={tmp_path}"], cwd=tmp_path, HYDRA_FULL_ERROR="1")
    assert done.returncode == 2
    assert "Traceback" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("ConfigError: optim.lr must be greater than 0")


@pytest.mark.parametrize(
    ("mistake", "error"),
    [
        (["optim.lrr=0.1"], "ConfigError: optim.lrr is not a config key — use optim.lr=0.1"),
        (
            ["lr=0.05"],
            "ConfigError: lr is not a config key — use optim.lr=0.05 (t240dist's key)",
        ),  # timm's name
        (["epochs=1"], "ConfigError: epochs is not a config key — use trainer.max_epochs=1"),
        (
            ["trainer.gpus=1"],
            "ConfigError: trainer.gpus is not an argument of Lightning's Trainer — use trainer",
        ),
        (["+workers=0"], "ConfigError: workers is not a config key — use data.num_workers=0"),
        (["model.name=nosuchnet"], "ConfigError: model.name: 'nosuchnet' is not a torchvision classifier"),
        (["model=torchvision", "model.name=resnet19"], "— use model=torchvision model.name=resnet18"),
        (
            ["optim=adam", "optim.momentum=0.8"],
            "ConfigError: optim.momentum is not a key of this optim — use optim=sgd optim.momentum=0.8 (",
        ),
        (["patience=1"], "ConfigError: patience is not a config key — use early_stopping.patience=1"),
    ],
)
@pytest.mark.slow
def test_a_hint_leads_to_a_command_that_works(tmp_path: Path, mistake: list[str], error: str) -> None:
    tiny = [a for a in TINY if a != "model.width=8"]  # a key of the small_cnn group only
    done = run_cli([*mistake, *tiny], cwd=tmp_path)
    assert done.returncode == 2 and error in done.stderr, done.stderr
    fixed = re.search(r" — use (.+?)(?: \(|,|$)", done.stderr).group(1).split()  # the hint, whole
    quick = ["trainer.max_steps=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
    rerun = run_cli([*fixed, *tiny, *quick, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "run_summary.json").read_text())["global_step"] == 1


@pytest.mark.slow
def test_a_mistyped_key_in_a_sweep_is_answered_with_the_sweep_that_works(tmp_path: Path) -> None:
    tiny = [a for a in TINY if a != "model.width=8"]
    for where in ([f"hydra.sweep.dir={tmp_path / 'typo' / 'grid'}"], []):  # given, and Hydra's default
        done = run_cli(["-m", "optim.lrr=0.01,0.02", *tiny, *where], cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("ConfigError: optim.lrr is not a config key — use optim.lr=0.01,0.02 ("), last
        assert "sweep summary" not in done.stdout + done.stderr  # no empty table, no empty CSV
        assert not list(tmp_path.iterdir()), list(tmp_path.rglob("*"))  # a mistake leaves nothing behind
    quick = ["trainer.max_steps=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
    sweep = ["-m", "optim.lr=0.01,0.02", f"hydra.sweep.dir={tmp_path / 's'}"]
    rerun = run_cli([*sweep, *tiny, *quick], cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "s" / "sweep_summary.csv").open()))
    assert [row["state"] for row in rows] == ["complete", "complete"], rows


@pytest.mark.parametrize("crop", ["none", "pad", "resized"])
def test_decode_auto_decodes_on_the_gpu_where_it_can_crop_and_else_in_the_workers(crop: str) -> None:
    args = ["data=imagefolder", "data.root=x", f"data.augment.crop={crop}"]
    data = plain(compose(args))["data"]
    assert data["decode"] == "auto"  # the default
    for gpu in (False, True):
        assert decide_decode(data, gpu)["decode"] == ("device" if gpu and crop != "pad" else "workers")
        for chosen in ("workers", "device")[: 1 if crop == "pad" else 2]:  # pad: device refused (above)
            assert decide_decode({**data, "decode": chosen}, gpu)["decode"] == chosen
    assert decide_decode({"name": "digits"}, True) == {"name": "digits"}  # not an image folder: no decode
    assert validate(compose(args))["data"]["decode"] == "workers"  # this machine: no GPU
