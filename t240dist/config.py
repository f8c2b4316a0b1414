"""The config's schema: types and ranges of every user-facing key, checked before any work.

Defaults live in ``conf/`` only (shipped inside the package as ``t240dist.conf``); the models here have none,
so a key missing from the YAML is an error too. ``validate`` turns the first problem into a one-line
``ConfigError`` that names the key and the fix. The schema and every check that needs no torch
(``check_run``) import no torch, so a command line's mistakes are answered before torch loads; the checks
that ask torch about this machine and torchvision about its models come after (``check_machine``).
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import math
import os
import secrets
from datetime import datetime
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, Literal

from hydra import compose, initialize_config_module
from hydra.core.plugins import Plugins
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Tag,
    ValidationError,
    field_validator,
)

from t240dist import noise
from t240dist.errors import ConfigError

log = logging.getLogger(__name__)

CONF_PACKAGE = "t240dist.conf"  # conf/ of the checkout, installed as this package
CONF_PATH = f"pkg://{CONF_PACKAGE}"  # what the entry points give hydra.main: found wherever it is installed


def compose_config(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose ``conf/`` with command-line style overrides, as ``python -m train`` would (no run dir)."""
    hydra_setup()
    with initialize_config_module(config_module=CONF_PACKAGE, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides or [])


def without_bench(cfg: DictConfig) -> DictConfig:
    """The run config inside a benchmark's config (``python -m train.bench``): every key but ``bench``."""
    return OmegaConf.masked_copy(cfg, [key for key in cfg if key != "bench"])


def validate(cfg: DictConfig) -> dict[str, Any]:
    """Check the composed config against the schema and this machine; return it as a plain, resolved dict."""
    return validate_run(plain(cfg))


# Keys that name files or folders: a leading ~ is the user's home, as torchvision's datasets read their
# root, whatever the shell expanded (bash leaves the ~ of data.root=~/x, quoted for Hydra, to the program).
USER_PATHS = (("data", "root"), ("resume",), ("ckpt",), ("input",), ("output",))


def plain(cfg: DictConfig) -> dict[str, Any]:
    """The composed config as a plain, resolved dict, ``~`` expanded in ``USER_PATHS``; a value left at
    ``???`` is a one-line error."""
    try:
        raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        key = err.full_key
        raise ConfigError(f"{key} is not set — give it on the command line, e.g. {key}=...") from None
    return expand_home(raw)


def expand_home(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with a leading ``~`` expanded in the values of ``USER_PATHS`` (in place)."""
    for *parents, key in USER_PATHS:
        node = raw
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(key), str):
            node[key] = os.path.expanduser(node[key])
    return raw


def validate_run(raw: dict[str, Any]) -> dict[str, Any]:
    """Check a plain run config (composed, or stored in a checkpoint and overridden) against the schema
    and this machine; return it with its ``auto`` settings decided for this machine (``decide_auto``)."""
    raw = expand_home(raw)  # a stored config's keys given again on the command line come this way
    check_run(raw)
    check_machine(raw)
    return decide_auto(raw)


def decide_auto(raw: dict[str, Any]) -> dict[str, Any]:
    """The run config with what ``auto`` means on this machine: ``trainer.precision`` is bf16-mixed on a GPU
    that computes in bf16 (Ampere and later), else 32-true; ``model.compile`` is the fast path, step, where
    a step can be replayed (one GPU, no conflict of ``_step_graph_conflicts``), else false. Every rank of a
    job on like machines decides alike; the run's config.yaml and checkpoints record the decision."""
    import torch

    trainer, model = raw["trainer"], raw["model"]
    gpu = trainer["accelerator"] != "cpu" and torch.cuda.is_available()
    precision = trainer["precision"]
    if precision == "auto":
        precision = "bf16-mixed" if gpu and torch.cuda.is_bf16_supported() else "32-true"
    decided = {**raw, "trainer": {**trainer, "precision": precision}, "data": decide_decode(raw["data"], gpu)}
    compiled = model["compile"]
    if compiled == "auto":
        several = trainer["devices"] == "auto" and torch.cuda.device_count() > 1
        compiled = "step" if gpu and not several and not _step_graph_conflicts(decided) else False
    return {**decided, "model": {**model, "compile": compiled}}


def decide_decode(data: dict[str, Any], gpu: bool) -> dict[str, Any]:
    """An image folder's ``data.decode=auto`` decided: device where a GPU trains and crops the files (any
    crop but pad), else workers. On one H200 with 16 host cores, decoding on the GPU trained ResNet-50
    faster than 16 Pillow workers did (BENCHMARKS.md); on a CPU the workers decode in parallel."""
    if data.get("decode") != "auto":
        return data
    on_device = gpu and data["augment"]["crop"] != "pad"
    return {**data, "decode": "device" if on_device else "workers"}


def check_run(raw: dict[str, Any]) -> None:
    """Every check of a plain run config that needs no torch: types, ranges, keys, options, combinations."""
    model = raw.get("model")
    if isinstance(model, dict) and "width" in model and model.get("name") != "small_cnn":
        raise ConfigError(f"model.name: {unknown_model(str(model.get('name')))}")  # in the small_cnn group
    check(RunConfig, raw)
    _check_trainer_extras(raw["trainer"])
    _check_loggers(raw["logger"])
    _check_step_graph(raw)
    _check_launch(raw["trainer"])
    if raw["resume"] not in ("auto", "never") and not Path(raw["resume"]).is_file():
        raise ConfigError(
            f"resume={raw['resume']} is not a checkpoint file — give its path, or auto or never"
        )


def check_machine(raw: dict[str, Any]) -> None:
    """The checks that ask torch about this machine and torchvision about its models (both imported here,
    once a run is going to need them)."""
    import torch
    import torchvision

    _check_trainer_arguments(raw["trainer"])
    name = raw["model"]["name"]
    if name != "small_cnn" and name not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(f"model.name: {unknown_model(name)}")
    trainer = raw["trainer"]
    cuda = torch.cuda.is_available()
    if trainer["accelerator"] in ("gpu", "cuda") and not cuda:
        raise ConfigError(
            f"trainer.accelerator={trainer['accelerator']} but no CUDA GPU is visible — "
            "use trainer=cpu or trainer=auto"
        )
    on_cpu = trainer["accelerator"] == "cpu" or not cuda
    if on_cpu and trainer["precision"] == "16-mixed":
        raise ConfigError("trainer.precision=16-mixed needs a GPU — use bf16-mixed or 32-true on the CPU")
    if raw["model"]["compile"] == "step":
        if on_cpu:
            raise ConfigError("model.compile=step needs a GPU — use model.compile=true or false on the CPU")
        if trainer["devices"] == "auto" and torch.cuda.device_count() > 1:
            raise ConfigError(
                "model.compile=step cannot replay a step with several devices (DDP) — set trainer.devices=1"
            )


def check_steps(raw: dict[str, Any], train_size: int, ranks: int) -> None:
    """The checks that need the training split's size: made once the data is loaded, before any model or
    Trainer exists. A run that would take no optimizer step stops (each of the ``ranks`` shards keeps only
    whole batches: training loaders drop a ragged last batch); an EMA that averages over more steps than
    the run takes is warned about (its weights, which validation, test and checkpoints use, would stay
    close to the initial ones).

    A batch larger than the split is refused rather than trained with the ragged batch kept: a batch
    smaller than ``data.batch_size`` would silently change the effective batch, the learning rate that
    ``optim.lr_scaling`` derives from it, and the statistics BatchNorm learns from that batch.
    """
    data, trainer = raw["data"], raw["trainer"]
    batch, shard = data["batch_size"], train_size // ranks
    if shard < batch:
        split = f"{train_size} images" + (f", {shard} for each of {ranks} ranks" if ranks > 1 else "")
        fix = (
            f"set data.batch_size={_power_of_two_upto(shard)}"
            if shard
            else f"use at most {train_size} ranks"
            if train_size
            else "give it training images"
        )
        raise ConfigError(
            f"data.batch_size={batch} is larger than the training split ({split}), so the run would train "
            f"nothing — {fix}"
        )
    batches = shard // batch
    limit = trainer["limit_train_batches"]
    kept = int(batches * limit) if isinstance(limit, float) else min(limit, batches)  # as Lightning counts
    if kept == 0:
        raise ConfigError(
            f"trainer.limit_train_batches={limit} keeps none of the {batches} training batches of an epoch "
            f"— set trainer.limit_train_batches={math.ceil(1000 / batches) / 1000} or more (or a number of "
            "batches)"
        )
    steps = math.ceil(kept / trainer["accumulate_grad_batches"]) * trainer["max_epochs"]
    if trainer["max_steps"] > 0:
        steps = trainer["max_steps"] if trainer["max_epochs"] == -1 else min(steps, trainer["max_steps"])
    decay = raw["module"]["ema_decay"]
    if decay is not None and 1 / (1 - decay) > steps and global_rank() == 0:
        shorter = [d for d in (0.9999, 0.999, 0.99, 0.9) if 1 / (1 - d) <= steps / 2]
        fix = f"module.ema_decay={shorter[0]}" if shorter else "module.ema_decay=null (no EMA)"
        log.warning(
            f"module.ema_decay={decay} averages the weights over about {1 / (1 - decay):.0f} optimizer "
            f"steps, more than the {steps} this run takes: validation, test and checkpoints would use "
            f"weights close to the initial ones — use {fix}, or train longer"
        )


def _power_of_two_upto(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def unknown_model(name: str) -> str:
    """What is wrong with ``model.name=NAME`` and a command line that works: torchvision's model of that
    name, or the closest one it has (torchvision is imported here, on this error's path only)."""
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name in known:
        return f"the small_cnn group has no model '{name}' — use model=torchvision model.name={name}"
    closest = difflib.get_close_matches(name, known, n=1, cutoff=0.75) or ["resnet18"]
    return (
        f"'{name}' is not a torchvision classifier — use model=torchvision model.name={closest[0]} "
        f"(or another of the {len(known)} in torchvision.models.list_models()), or model=small_cnn"
    )


def with_later_keys(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored run config (a checkpoint's) completed with the keys it lacks because t240dist added them
    later, at their defaults in conf/: from the file of the stored group option (``data/cifar10.yaml``
    for ``data.name=cifar10``; ``trainer/default.yaml`` for a group whose options share one), from the
    default option of a group added later (``logger``), and from config.yaml. Stored values are never
    changed."""
    conf = files(CONF_PACKAGE)
    top = OmegaConf.to_container(OmegaConf.create((conf / "config.yaml").read_text()))
    chosen = dict(next(iter(entry.items())) for entry in top["defaults"] if isinstance(entry, dict))
    for group, option in chosen.items():
        if group not in stored and option is not None:
            stored[group] = OmegaConf.to_container(
                OmegaConf.create((conf / group / f"{option}.yaml").read_text())
            )
    for group, node in stored.items():
        option = conf / group / f"{node.get('name', 'default')}.yaml" if isinstance(node, dict) else None
        if option is not None and option.is_file():
            _fill(node, OmegaConf.to_container(OmegaConf.create(option.read_text())))
    _fill(stored, {k: v for k, v in top.items() if k not in ("defaults", "hydra")})
    return stored


def _fill(into: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Add the keys of ``defaults`` that ``into`` lacks, recursively."""
    for key, value in defaults.items():
        if key not in into:
            into[key] = value
        elif isinstance(into[key], dict) and isinstance(value, dict):
            _fill(into[key], value)


def check(schema: type[BaseModel], raw: dict[str, Any]) -> None:
    """Validate ``raw`` against ``schema``; the first problem becomes a one-line ``ConfigError``."""
    try:
        schema.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_one_line(err.errors()[0], raw)) from None


def hydra_setup() -> None:
    """What every entry point gives Hydra before composing: the resolvers that name run dirs
    (``${run_name:}``, ``${rank_zero_only:VALUE}``) and the Optuna sweeper (``sweep=optuna``); and the
    stack's known noise silenced (``t240dist.noise``) before anything of it is imported.

    Hydra 1.3 finds plugins by listing the ``hydra_plugins`` package's folders, which an editable install
    by setuptools >= 64 hides (it maps packages with an import hook, which lists nothing): the sweeper is
    registered here by Hydra's own ``Plugins.register``, wherever and however the package is installed.
    """
    noise.silence()
    from hydra_plugins.t240dist_optuna.optuna_sweeper import OptunaSweeper

    Plugins.instance().register(OptunaSweeper)
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", _run_name, use_cache=True)
        OmegaConf.register_new_resolver("rank_zero_only", lambda value: value if global_rank() == 0 else None)


def _run_name() -> str:
    """``DATE/TIME-RANDOM``: unique even for runs started in the same second.

    Where every process of a job composes its own config, the name must not depend on the clock: under
    torchrun ``torchrun/RDZV_ID``, the rendezvous id that all nodes share; for the tasks of a SLURM job
    ``slurm/JOB_ID``, which a requeued job keeps, so it resumes in the same run dir.
    """
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id is None:
        if slurm_starts_the_ranks():
            return f"slurm/{os.environ['SLURM_JOB_ID']}"
        return f"{datetime.now():%Y-%m-%d/%H-%M-%S}-{secrets.token_hex(3)}"
    if run_id == "none":
        raise ConfigError(
            "torchrun was started without --rdzv-id, so the nodes cannot agree on a run dir — "
            "pass --rdzv-id=<unique job name> or hydra.run.dir=DIR"
        )
    return f"torchrun/{run_id}"


def global_rank() -> int:
    """This process's rank before Lightning knows it: torchrun's RANK, or the task id of a SLURM job."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    return int(os.environ["SLURM_PROCID"]) if slurm_starts_the_ranks() else 0


def world_size() -> int:
    """How many ranks this process's job has before Lightning knows it: torchrun's (and the elastic
    agent's) WORLD_SIZE, or the tasks of a SLURM job; 1 for a process that trains alone."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return int(os.environ["SLURM_NTASKS"]) if slurm_starts_the_ranks() else 1


def slurm_starts_the_ranks() -> bool:
    """Whether SLURM started this process as a task of a job (as Lightning decides it; Lightning is imported
    only where SLURM's variables are set)."""
    if "SLURM_NTASKS" not in os.environ:
        return False
    from t240dist.distributed import slurm_runs_the_tasks

    return slurm_runs_the_tasks()


class Strict(BaseModel):
    """A config node: unknown keys are errors, nothing has a default."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


Fraction = Annotated[float, Field(gt=0, lt=1)]


class Augment(Strict):
    crop: Literal["none", "pad", "resized"]
    padding: NonNegativeInt
    hflip: bool


def _on_gpu_setting(value: Any) -> Any:
    """``data.on_gpu``: auto, true or false (Hydra gives booleans for true and false)."""
    if isinstance(value, bool) or value == "auto":
        return value
    raise ValueError(f"'{value}' is not an on_gpu setting — use auto, true or false")


OnGpu = Annotated[bool | Literal["auto"], BeforeValidator(_on_gpu_setting)]


def _not_held(why: str) -> Any:
    """``data.on_gpu`` of a dataset not held in memory: ``true`` is refused, saying ``why``."""

    def refuse_true(on_gpu: bool | str) -> bool | str:
        if on_gpu is True:
            raise ValueError(f"true needs images held in memory, but {why} — set data.on_gpu=false")
        return on_gpu

    return Annotated[OnGpu, AfterValidator(refuse_true)]


class _InMemoryData(Strict):
    """Datasets held in memory as uint8 tensors: their batches can be made on the training device."""

    augment: Augment
    on_gpu: OnGpu
    on_gpu_max_share: Annotated[float, Field(gt=0, le=1)]

    @field_validator("on_gpu")
    @classmethod
    def _crop_on_device(cls, on_gpu: bool | str, info: Any) -> bool | str:
        augment = info.data.get("augment")
        if on_gpu is True and augment is not None and augment.crop == "resized":
            raise ValueError(
                "true makes batches on the device, which has no random-resized crop — "
                "set data.augment.crop=pad or none, or data.on_gpu=auto"
            )
        return on_gpu


class DigitsData(_InMemoryData):
    name: Literal["digits"]
    batch_size: PositiveInt
    num_workers: NonNegativeInt
    split_seed: NonNegativeInt
    val_fraction: Fraction
    test_fraction: Fraction


class SyntheticData(Strict):
    name: Literal["synthetic"]
    batch_size: PositiveInt
    num_workers: NonNegativeInt
    on_gpu: _not_held("synthetic ones are made per index")
    image_size: Annotated[int, Field(ge=4, le=4096)]
    channels: Annotated[int, Field(ge=1, le=64)]
    num_classes: Annotated[int, Field(ge=2)]
    noise: NonNegativeFloat
    seed: NonNegativeInt
    train_size: PositiveInt
    val_size: PositiveInt
    test_size: PositiveInt


class Cifar10Data(_InMemoryData):
    name: Literal["cifar10"]
    root: str
    batch_size: PositiveInt
    num_workers: NonNegativeInt
    split_seed: NonNegativeInt
    val_fraction: Fraction


class MnistData(Cifar10Data):
    name: Literal["mnist"]  # type: ignore[assignment]


class ImageFolderData(Strict):
    name: Literal["imagefolder"]
    root: str
    batch_size: PositiveInt
    num_workers: NonNegativeInt
    on_gpu: _not_held("image folders are decoded lazily from disk")
    image_size: Annotated[int, Field(ge=8, le=4096)]
    split_seed: NonNegativeInt
    val_fraction: Fraction
    on_corrupt: Literal["error", "skip"]
    augment: Augment
    decode: Literal["auto", "workers", "device"]
    worker_decode_share: Annotated[float, Field(ge=0, le=1)]

    @field_validator("decode")
    @classmethod
    def _crop_on_device(cls, decode: str, info: Any) -> str:
        augment = info.data.get("augment")
        if decode == "device" and augment is not None and augment.crop == "pad":
            raise ValueError(
                "device crops files with crop=resized or none, not pad — set data.augment.crop=resized, "
                "or data.decode=workers"
            )
        return decode


Data = Annotated[
    DigitsData | SyntheticData | Cifar10Data | MnistData | ImageFolderData, Field(discriminator="name")
]


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "step", "auto")


def _compile_setting(value: Any) -> Any:
    """``model.compile``: false, true (torch.compile's default mode), a torch.compile mode name, step (the
    fast path) or auto (step where it can run, else false)."""
    if isinstance(value, bool) or value in COMPILE_MODES:
        return value
    raise ValueError(f"'{value}' is not a compile setting — use false, true, {', '.join(COMPILE_MODES[1:])}")


CompileSetting = Annotated[bool | str, BeforeValidator(_compile_setting)]


class ModelSwitches(Strict):
    """The switches every model has (conf/config.yaml's ``model:``)."""

    channels_last: bool
    compile: CompileSetting


class SmallCnnModel(ModelSwitches):
    name: Literal["small_cnn"]
    width: Annotated[int, Field(ge=4, le=1024)]
    dropout: Annotated[float, Field(ge=0, lt=1)]


class TorchvisionModel(ModelSwitches):
    name: str
    cifar_stem: bool

    @field_validator("cifar_stem")
    @classmethod
    def _stem_fits(cls, cifar_stem: bool, info: Any) -> bool:
        name = info.data.get("name", "")
        if cifar_stem and not name.startswith(("resnet", "wide_resnet", "resnext")):
            raise ValueError(
                f"the CIFAR stem exists for ResNet-family models only, not '{name}' — set it false"
            )
        return cifar_stem


Model = Annotated[
    Annotated[SmallCnnModel, Tag("small_cnn")] | Annotated[TorchvisionModel, Tag("torchvision")],
    Discriminator(lambda v: "small_cnn" if dict(v).get("name") == "small_cnn" else "torchvision"),
]


class _Optim(Strict):
    partial: Literal[True] = Field(alias="_partial_")
    lr: PositiveFloat
    weight_decay: NonNegativeFloat
    lr_scaling: Literal["none", "linear", "sqrt"]
    reference_batch_size: PositiveInt


Betas = tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]]


class Sgd(_Optim):
    target: Literal["torch.optim.SGD"] = Field(alias="_target_")
    momentum: Annotated[float, Field(ge=0, lt=1)]
    nesterov: bool


class Adam(_Optim):
    target: Literal["torch.optim.Adam"] = Field(alias="_target_")
    betas: Betas
    eps: PositiveFloat


class AdamW(_Optim):
    target: Literal["torch.optim.AdamW"] = Field(alias="_target_")
    betas: Betas
    eps: PositiveFloat


class Adagrad(_Optim):
    target: Literal["torch.optim.Adagrad"] = Field(alias="_target_")
    lr_decay: NonNegativeFloat
    eps: PositiveFloat


Optim = Annotated[Sgd | Adam | AdamW | Adagrad, Field(discriminator="target")]


class NoSched(Strict):
    name: Literal["none"]


class WarmupCosine(Strict):
    name: Literal["warmup_cosine"]
    warmup_fraction: Annotated[float, Field(ge=0, lt=1)]
    warmup_start_factor: Annotated[float, Field(gt=0, le=1)]
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)]


class OneCycle(Strict):
    name: Literal["onecycle"]
    pct_start: Fraction
    div_factor: Annotated[float, Field(ge=1)]
    final_div_factor: Annotated[float, Field(ge=1)]


Sched = Annotated[NoSched | WarmupCosine | OneCycle, Field(discriminator="name")]

Limit = Annotated[float, Field(gt=0, le=1)] | PositiveInt


def _some_steps(max_steps: int) -> int:
    """``trainer.max_steps``: -1 (run ``max_epochs``) or a number of steps; 0 would train nothing."""
    if max_steps == 0:
        raise ValueError("0 trains nothing — use -1 (train trainer.max_epochs) or a number of steps >= 1")
    return max_steps


def _some_epochs(max_epochs: int, info: Any) -> int:
    """``trainer.max_epochs``: a number of epochs, or -1 (as Lightning's: epochs without end) where
    ``trainer.max_steps`` ends the run."""
    if max_epochs == -1 and info.data.get("max_steps", -1) == -1:
        raise ValueError("-1 trains without end — set trainer.max_steps=N too, or a number of epochs >= 1")
    return max_epochs


class Trainer(Strict):
    accelerator: Literal["auto", "cpu", "gpu", "cuda"]
    devices: PositiveInt | Literal["auto"] | list[NonNegativeInt]
    num_nodes: PositiveInt
    strategy: Literal["auto", "ddp"]
    collective_timeout_s: PositiveInt
    max_restarts: NonNegativeInt
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"]
    max_steps: Annotated[int, Field(ge=-1), AfterValidator(_some_steps)]  # before max_epochs, which reads it
    max_epochs: Annotated[PositiveInt | Literal[-1], AfterValidator(_some_epochs)]
    limit_train_batches: Limit
    limit_val_batches: Limit
    limit_test_batches: Limit
    check_val_every_n_epoch: PositiveInt
    num_sanity_val_steps: NonNegativeInt
    log_every_n_steps: PositiveInt
    gradient_clip_val: PositiveFloat | None
    accumulate_grad_batches: PositiveInt
    deterministic: bool
    enable_progress_bar: bool
    profiler: Literal["simple", "advanced"] | None

    # Any other key is an argument of Lightning's Trainer, given as +trainer.NAME=VALUE and passed on as it
    # is: its name is checked against the Trainer's signature once Lightning is loaded (check_machine).
    model_config = ConfigDict(extra="allow", populate_by_name=True)


# Arguments of Lightning's Trainer that t240dist sets itself: why, and what to use instead.
OWNED_TRAINER_ARGS = {
    "logger": (
        "t240dist builds the loggers",
        "pick them with logger=csv, logger=mlflow or 'logger=[tensorboard,csv]'",
    ),
    "callbacks": (
        "t240dist's callbacks checkpoint, resume and log the run",
        "use checkpoint.*, early_stopping.patience=N, monitor=... and logger=...",
    ),
    "enable_checkpointing": (
        "resume and the run's test read t240dist's checkpoints",
        "use checkpoint.save_top_k and checkpoint.every_n_steps, or debug=fdr for a run that saves nothing",
    ),
    "default_root_dir": ("the run dir is Hydra's", "use hydra.run.dir=DIR"),
    "plugins": (
        "t240dist's plugins sign the checkpoints and find the SLURM or torchrun environment",
        "use trainer.precision for mixed precision",
    ),
    "use_distributed_sampler": (
        "t240dist's data module shards every split across ranks itself, so that a resume is exact",
        "leave it out",
    ),
    "barebones": (
        "it switches off the logging, checkpoints and callbacks that a run relies on",
        "use debug=fdr or debug=limit for a quick run",
    ),
}


class TensorBoardLog(Strict):
    """No settings: event files in the run dir."""


class CsvLog(Strict):
    flush_logs_every_n_steps: PositiveInt


class MlflowLog(Strict):
    tracking_uri: str
    experiment_name: str


class Loggers(Strict):
    """The logger group: one or more of its options (logger=csv, 'logger=[tensorboard,csv]')."""

    tensorboard: TensorBoardLog | None = None
    csv: CsvLog | None = None
    mlflow: MlflowLog | None = None


class EarlyStopping(Strict):
    patience: PositiveInt | None
    min_delta: NonNegativeFloat


class Checkpoint(Strict):
    monitor: Literal["val/acc", "val/loss"]
    mode: Literal["min", "max"]
    save_top_k: Annotated[int, Field(ge=-1)]
    save_last: bool
    every_n_steps: NonNegativeInt
    trust_unsigned: bool


class NvmlMonitor(Strict):
    name: Literal["nvml"]
    library: str
    interval_s: Annotated[float, Field(ge=0.01, le=60)]
    slow_interval_s: Annotated[float, Field(ge=0.01, le=600)]
    straggler_tolerance: Annotated[float, Field(gt=0, lt=1)]
    throttle_warn_pct: Annotated[float, Field(gt=0, le=100)]


class NoMonitor(Strict):
    name: Literal["off"]


Monitor = Annotated[NvmlMonitor | NoMonitor, Field(discriminator="name")]


class Module(Strict):
    label_smoothing: Annotated[float, Field(ge=0, lt=1)]
    mixup_alpha: NonNegativeFloat
    cutmix_alpha: NonNegativeFloat
    ema_decay: Annotated[float, Field(gt=0, lt=1)] | None


class SweepTrial(Strict):
    number: NonNegativeInt
    id: NonNegativeInt
    slot: NonNegativeInt


class Sweep(Strict):
    objective: Literal["val/acc", "val/loss", "test/acc", "test/loss"]
    direction: Literal["maximize", "minimize"]
    trial: SweepTrial | None


class RunConfig(Strict):
    seed: NonNegativeInt
    resume: str
    nonfinite: Literal["stop", "skip"]
    sweep: Sweep
    data: Data
    model: Model
    optim: Optim
    sched: Sched
    trainer: Trainer
    checkpoint: Checkpoint
    early_stopping: EarlyStopping
    monitor: Monitor
    logger: Loggers
    module: Module


class EvaluateOptions(Strict):
    """``train.evaluate``'s own keys beside the run's (conf/evaluate.yaml); predict and export add theirs."""

    ckpt: str


class PredictOptions(EvaluateOptions):
    input: str
    output: str
    top_k: PositiveInt


class ExportOptions(EvaluateOptions):
    format: Literal["onnx"]
    output: str
    tolerance: PositiveFloat
    check_images: PositiveInt


_UNIONS = {"data", "model", "optim", "sched", "monitor"}
_FIXES = {
    "extra_forbidden": "remove it or fix its spelling (python -m train --cfg job lists the keys)",
    "missing": "add it to the config group or give it on the command line",
    "literal_error": "pick one of those",
    "union_tag_invalid": "pick one of those",
}


def _one_line(error: dict[str, Any], raw: dict[str, Any]) -> str:
    """Say which key is wrong, what is wrong with it and how to fix it, on one line."""
    loc = list(error["loc"])
    if loc and loc[0] in _UNIONS and len(loc) > 1:
        del loc[1]  # the union's tag (e.g. 'torch.optim.SGD') is not part of the user's key
    key = ".".join(str(p) for p in loc if not _type_tag(p))
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        ours = known_as(key)
        if ours:
            return f"{key} is not a config key — use {ours}={_cli_value(error['input'])} (t240dist's key)"
        return f"{key} is not a config key — {_FIXES[kind]}"
    if kind == "value_error":
        return f"{key}: {msg.removeprefix('Value error, ')}"
    got = error.get("input")
    shown = f" (got {got!r})" if not isinstance(got, dict) else ""
    fix = _FIXES.get(kind) or _range_fix(error)
    what = msg.replace("Input should be", "must be").replace("Field required", "is missing")
    return f"{key} {what}{shown} — {fix}"


def _type_tag(part: Any) -> bool:
    """Whether ``part`` of an error's location names a member of a type union (e.g. ``constrained-float``
    of ``float | int``) rather than a config key."""
    return isinstance(part, str) and (
        part.startswith("constrained-") or part in ("int", "float", "str", "bool")
    )


def _range_fix(error: dict[str, Any]) -> str:
    """Turn pydantic's constraint context (gt, ge, lt, le) into a hint."""
    ctx = error.get("ctx") or {}
    bounds = [
        f"{op} {ctx[k]}" for k, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")) if k in ctx
    ]
    if bounds:
        return "use a value " + " and ".join(bounds)
    return "use a value of the right type (see conf/ for an example)"


def _check_step_graph(raw: dict[str, Any]) -> None:
    """``model.compile=step`` replays one captured step: refuse what a fixed replay cannot do."""
    if raw["model"]["compile"] == "step":
        for what, fix in _step_graph_conflicts(raw):
            raise ConfigError(f"model.compile=step cannot replay a step with {what} — set {fix}")


def _step_graph_conflicts(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """What of the run a fixed replay of one captured step cannot do, each with its fix."""
    trainer, module = raw["trainer"], raw["module"]
    conflicts = [
        (
            trainer["precision"] == "16-mixed",
            "16-mixed (GradScaler skips steps)",
            "trainer.precision=bf16-mixed",
        ),
        (
            trainer["accumulate_grad_batches"] > 1,
            "gradient accumulation",
            "trainer.accumulate_grad_batches=1",
        ),
        (
            module["mixup_alpha"] > 0 or module["cutmix_alpha"] > 0,
            "MixUp/CutMix",
            "module.mixup_alpha=0 module.cutmix_alpha=0",
        ),
        (raw["nonfinite"] == "skip", "nonfinite=skip (a host decision per step)", "nonfinite=stop"),
        (
            trainer["strategy"] == "ddp" or trainer["num_nodes"] > 1 or _listed(trainer["devices"]) > 1,
            "several devices (DDP)",
            "trainer.devices=1, or model.compile=reduce-overhead with DDP",
        ),
    ]
    return [(what, fix) for conflict, what, fix in conflicts if conflict]


def _trainer_extras(trainer: dict[str, Any]) -> dict[str, Any]:
    """The ``+trainer.NAME=VALUE`` keys: Lightning Trainer arguments that t240dist passes on as they are."""
    return {name: value for name, value in trainer.items() if name not in Trainer.model_fields}


def _check_trainer_extras(trainer: dict[str, Any]) -> None:
    """Refuse Trainer arguments that t240dist sets itself, saying why and what to use instead."""
    for name in _trainer_extras(trainer):
        owned = owned_trainer_argument(name)
        if owned:
            raise ConfigError(owned)


def owned_trainer_argument(name: str) -> str | None:
    """Why ``trainer.NAME`` is t240dist's to set and what to use instead; None where it is not."""
    if name not in OWNED_TRAINER_ARGS:
        return None
    why, fix = OWNED_TRAINER_ARGS[name]
    return f"trainer.{name} is t240dist's to set: {why} — {fix}"


def _check_trainer_arguments(trainer: dict[str, Any]) -> None:
    """Each ``+trainer.NAME`` must be an argument of Lightning's Trainer: else name the closest one.

    Here, not in ``check_run``: the names come from the Trainer's signature, and the config is checked
    before Lightning (and torch) are imported.
    """
    for name, value in _trainer_extras(trainer).items():
        wrong = not_a_trainer_argument(name, _cli_value(value))
        if wrong:
            raise ConfigError(wrong)


# What other tools call a setting (Lightning's Trainer of old, timm's and torchvision's training scripts),
# and the key that holds it here, whatever the groups chosen: `python -m train lr=0.05` is told optim.lr.
FOREIGN_NAMES = {
    "lr": "optim.lr",
    "learning_rate": "optim.lr",
    "wd": "optim.weight_decay",
    "weight_decay": "optim.weight_decay",
    "epochs": "trainer.max_epochs",
    "num_epochs": "trainer.max_epochs",
    "max_epochs": "trainer.max_epochs",
    "max_steps": "trainer.max_steps",
    "batch_size": "data.batch_size",
    "bs": "data.batch_size",
    "workers": "data.num_workers",
    "num_workers": "data.num_workers",
    "gpus": "trainer.devices",
    "devices": "trainer.devices",
    "num_nodes": "trainer.num_nodes",
    "precision": "trainer.precision",
    "smoothing": "module.label_smoothing",
    "label_smoothing": "module.label_smoothing",
    "mixup": "module.mixup_alpha",
    "cutmix": "module.cutmix_alpha",
    "model_ema_decay": "module.ema_decay",
    "compile": "model.compile",
    "channels_last": "model.channels_last",
}


def known_as(key: str) -> str | None:
    """The key here for what ``key`` (its last part: lr, epochs, batch_size, gpus, ...) names in other
    tools; None where that is not one of ``FOREIGN_NAMES``, or is ``key`` itself."""
    ours = FOREIGN_NAMES.get(key.rpartition(".")[2])
    return ours if ours != key else None


def not_a_trainer_argument(name: str, value: str) -> str | None:
    """Why ``+trainer.NAME=VALUE`` is refused, with the closest argument of Lightning's Trainer (imported
    here); None where NAME is one."""
    import inspect

    import pytorch_lightning as pl

    known = list(inspect.signature(pl.Trainer).parameters)
    if name in known:
        return None
    ours = known_as(f"trainer.{name}")
    if ours:
        return (
            f"trainer.{name} is not an argument of Lightning's Trainer — use {ours}={value} (t240dist's key)"
        )
    close = difflib.get_close_matches(name, known, n=1)
    if not close:
        return (
            f"trainer.{name} is not an argument of Lightning's Trainer — see its arguments with "
            "python -c 'import inspect, pytorch_lightning as pl; print(inspect.signature(pl.Trainer))'"
        )
    guess = close[0]
    if guess in OWNED_TRAINER_ARGS:
        fix = f"did you mean trainer.{guess}? {' — '.join(OWNED_TRAINER_ARGS[guess])}"
    else:
        plus = "" if guess in Trainer.model_fields else "+"
        fix = f"did you mean {plus}trainer.{guess}={value}?"
    return f"trainer.{name} is not an argument of Lightning's Trainer — {fix}"


def _cli_value(value: Any) -> str:
    """A value as it is typed on the command line (true, null, 0.5, [0,1], text)."""
    return value if isinstance(value, str) else json.dumps(value).replace(" ", "")


def _check_loggers(loggers: dict[str, Any]) -> None:
    """MLflow's package must be installed (found without importing it: importing takes seconds)."""
    if loggers.get("mlflow") and importlib.util.find_spec("mlflow") is None:
        raise ConfigError("logger=mlflow needs the mlflow package — pip install 't240dist[mlflow]'")


def _listed(devices: int | str | list[int]) -> int:
    """How many devices ``trainer.devices`` names (``auto``: 1 here; ``check_machine`` counts the GPUs)."""
    if devices == "auto":
        return 1
    return len(devices) if isinstance(devices, list) else int(devices)


def _check_launch(trainer: dict[str, Any]) -> None:
    """Catch a SLURM or submitit job whose tasks do not match the trainer's devices and nodes, early."""
    local_tasks = int(os.environ.get("SUBMITIT_LOCAL_NTASKS", "1"))
    if local_tasks > 1:
        raise ConfigError(
            f"hydra.launcher.tasks_per_node={local_tasks} starts {local_tasks} copies of the same run on "
            f"this machine — keep it 1 and use trainer=ddp trainer.devices={local_tasks}"
        )
    if not slurm_starts_the_ranks():
        return
    tasks, nodes = int(os.environ.get("SLURM_NTASKS_PER_NODE", "1")), int(os.environ.get("SLURM_NNODES", "1"))
    devices = trainer["devices"]
    if isinstance(devices, int) and devices != tasks:
        raise ConfigError(
            f"trainer.devices={devices} but SLURM runs {tasks} task(s) per node, one per rank — make them "
            f"equal: --ntasks-per-node={devices} (hydra.launcher.tasks_per_node) or trainer.devices={tasks}"
        )
    if trainer["num_nodes"] != nodes:
        raise ConfigError(
            f"trainer.num_nodes={trainer['num_nodes']} but the SLURM job has {nodes} node(s) — make them "
            f"equal: --nodes={trainer['num_nodes']} (hydra.launcher.nodes) or trainer.num_nodes={nodes}"
        )
