"""The benchmark: t240dist's training path against a hand-written PyTorch loop, same process and data;
and (``bench.task=predict``) its batch-inference path against a hand-written inference loop.

Both consume the same pre-made batches already on the device, so the ratio measures the framework
(Trainer, module, callbacks, logging; or predict's Predictor), not the input pipeline.
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, IterableDataset

from t240dist.agent import agent_workers, launch_workers
from t240dist.config import validate, validate_run, without_bench
from t240dist.data import DataInfo, ImageDataModule
from t240dist.distributed import ends_process_group
from t240dist.fit import build_trainer
from t240dist.inference import Predictor
from t240dist.models import build_model, compile_network
from t240dist.module import GRAPH_WARMUP_STEPS, ClassifierModule
from t240dist.optim import build_optimizer, build_scheduler, configure_optimizers
from t240dist.report import device_name

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def bench(cfg: DictConfig, run_dir: Path) -> None:
    """Run the benchmark that ``bench.task`` names, here, or (``trainer=ddp``) on ranks that this process
    starts through the elastic agent, as ``python -m train`` starts a DDP job's (``bench_rank``)."""
    workers = agent_workers(validate(without_bench(cfg)))
    if workers:
        launch_workers(OmegaConf.to_container(cfg, resolve=True), run_dir, workers, task="bench")
        return
    with ends_process_group():  # the ranks of torchrun, or of the agent
        (run_bench if cfg.bench.task == "train" else run_predict_bench)(cfg, run_dir)


def bench_rank(config: Path) -> None:
    """One rank of a benchmark that ``bench`` started through the elastic agent."""
    bench(OmegaConf.load(config), config.parent)


def run_bench(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Time the loops ``bench.repeats`` times, interleaved; print a table and write ``bench.json``.

    With several ranks (``trainer=ddp``) every rank runs every loop: the hand-written one through
    ``DistributedDataParallel``, t240dist's through its DDP strategy; rank 0 also times the hand-written
    loop alone on its device, the baseline of the scaling column, and reports.
    """
    bench = OmegaConf.to_container(cfg.bench)
    train_cfg = without_bench(cfg)
    if train_cfg.model.compile == "auto":  # eager here; the fast path is its own row (bench.fast_path)
        train_cfg.model.compile = False
    conf = validate(train_cfg)
    device = _join_ranks(conf["trainer"])
    data = ImageDataModule(conf["data"], conf["seed"])
    batches = _batches(data, bench["distinct_batches"], device)
    loops = _train_loops(conf, bench, data.info, batches, device, run_dir)
    result = _measure(loops, conf, bench, batches[0][0], {"task": "train"})
    if _rank() == 0:
        _report(result, run_dir)
    return result


def _train_loops(
    conf: dict[str, Any],
    bench: dict[str, Any],
    info: DataInfo,
    batches: Batches,
    device: torch.device,
    run_dir: Path,
) -> dict[str, Callable[[], float]]:
    """The loops to time, each with its hand-written twin (named as in ``_hand_twin``)."""
    variants: dict[str, dict[str, Any]] = {"": conf}
    if device.type == "cuda" and conf["monitor"]["name"] != "off":  # what GPU telemetry costs
        variants[" monitor=off"] = {**conf, "monitor": {"name": "off"}}
    for mode in bench["compile_modes"]:  # both loops again with the network compiled
        variants[f" compile={mode}"] = {**conf, "model": {**conf["model"], "compile": mode}}
    if _fast_path(bench["fast_path"], conf, device):
        variants[" compile=step"] = validate_run({**conf, "model": {**conf["model"], "compile": "step"}})
    ddp = _world() > 1
    loops: dict[str, Callable[[], float]] = {}
    for suffix, variant in variants.items():
        if suffix != " monitor=off":
            loops[f"hand-written{suffix}"] = partial(
                _hand_written, variant, info, batches, bench, device, ddp
            )
        loops[f"t240dist{suffix}"] = partial(_t240dist, variant, info, batches, bench, run_dir)
    if bench["plain_lightning"]:  # what Lightning's own loop costs, without t240dist's parts
        loops[PLAIN] = partial(_plain_lightning, conf, info, batches, bench)
    if ddp:  # the scaling baseline: rank 0 alone, while the other ranks wait
        loops[SINGLE] = partial(_rank0_alone, _hand_written, conf, info, batches, bench, device, False)
    return loops


SINGLE = "hand-written, one device"  # under DDP: the loop that the scaling column divides by
PLAIN = "plain Lightning"  # a bare LightningModule in a bare Trainer: Lightning's loop alone


def _fast_path(setting: bool | str, conf: dict[str, Any], device: torch.device) -> bool:
    """Whether to time the loops with ``model.compile=step`` too: ``bench.fast_path`` true, or auto (on one
    GPU, unless the run already uses it)."""
    if setting == "auto":
        return device.type == "cuda" and _world() == 1 and conf["model"]["compile"] != "step"
    return bool(setting)


def _hand_twin(loop: str) -> str:
    """The hand-written loop that ``loop`` is compared with: the one with the same model settings."""
    if loop == PLAIN:
        return "hand-written"
    return loop.replace(" monitor=off", "").replace("t240dist", "hand-written")


def _join_ranks(trainer: dict[str, Any]) -> torch.device:
    """This process's device; with several ranks, after joining the job's process group (NCCL on GPUs)."""
    cuda = torch.cuda.is_available() and trainer["accelerator"] != "cpu"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if _world() > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return device


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _rank0_alone(loop: Callable[..., float], *args: Any) -> float:
    """``loop(*args)`` on rank 0 only (NaN elsewhere); every rank returns when it is done."""
    seconds = loop(*args) if _rank() == 0 else math.nan
    dist.barrier()
    return seconds


def _batches(data: ImageDataModule, count: int, device: torch.device) -> Batches:
    """Draw ``count`` batches from the configured dataset and move them to the device once."""
    loader = iter(data.train_dataloader())
    made = [next(loader) for _ in range(count)]
    data.teardown("fit")  # ends the workers (and a decoding loader's thread): the batches are made
    return [(x.to(device), y.to(device)) for x, y in made]


def _hand_written(
    conf: dict[str, Any],
    info: DataInfo,
    batches: Batches,
    bench: dict[str, Any],
    device: torch.device,
    ddp: bool,
) -> float:
    """The baseline: the loop a good engineer writes by hand. Returns seconds per timed step.

    With ``model.compile=step``, forward and backward are captured after three eager steps and replayed
    (the whole-network capture of PyTorch's CUDA-graph notes), the optimizer stepping outside the graph.
    """
    net = build_model(conf["model"], info.channels, info.num_classes).to(device)
    cuda_graphs = compile_network(net, conf["model"]["compile"])
    model = (
        DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        if ddp
        else net
    )
    optimizer = build_optimizer(net, conf["optim"])
    # the run's schedule, stepped every step as t240dist steps it (the capture's warm-up steps included)
    total = bench["warmup_steps"] + bench["steps"] + GRAPH_WARMUP_STEPS
    scheduler = build_scheduler(optimizer, conf["sched"], total)
    precision = conf["trainer"]["precision"]
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16 if precision.startswith("bf16") else torch.float16)
        if precision.endswith("mixed")
        else nullcontext()
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast:
            return _loss(model, conf, x, y)

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss_of(x, y)).backward()
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()

    if conf["model"]["compile"] != "step":
        return _per_batch(step, bench, device)
    for i in range(GRAPH_WARMUP_STEPS):
        step(i)
    static_x, static_y = (t.clone() for t in batches[0])
    optimizer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss_of(static_x, static_y).backward()

    def replay(i: int) -> None:
        x, y = batches[i % len(batches)]
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()

    return _per_batch(replay, bench, device)


def _loss(net: torch.nn.Module, conf: dict[str, Any], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A hand-written step's loss: the batch in the configured memory format, label-smoothed cross-entropy."""
    if conf["model"]["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    return F.cross_entropy(net(x), y, label_smoothing=conf["module"]["label_smoothing"])


class _Cycle(IterableDataset):
    """Yields the pre-made device batches in turn, as many as asked for."""

    def __init__(self, batches: Batches, total: int) -> None:
        self.batches, self.total = batches, total

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return (self.batches[i % len(self.batches)] for i in range(self.total))

    def __len__(self) -> int:
        return self.total


class _StepTimer(pl.Callback):
    """Times the optimizer steps after the warm-up, synchronising the device only at the two ends."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.start = self.end = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            _sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.warmup + self.steps:
            _sync(pl_module.device)
            self.end = time.perf_counter()


def _t240dist(
    conf: dict[str, Any], info: DataInfo, batches: Batches, bench: dict[str, Any], run_dir: Path
) -> float:
    """t240dist's path: ClassifierModule in the Trainer of ``python -m train``, logging and checkpoints on."""
    module = ClassifierModule.from_config(conf, info)
    trainer_conf = {
        **conf,
        "trainer": {
            **conf["trainer"],
            "max_steps": bench["warmup_steps"] + bench["steps"],
            "limit_val_batches": 0,
            "enable_progress_bar": False,
        },
    }
    timer = _StepTimer(bench["warmup_steps"], bench["steps"])
    trainer, _, _ = build_trainer(trainer_conf, run_dir / "t240dist", extra=[timer])
    return _timed_fit(trainer, timer, module, batches, bench)


def _plain_lightning(conf: dict[str, Any], info: DataInfo, batches: Batches, bench: dict[str, Any]) -> float:
    """The hand-written step as a bare LightningModule, in a Trainer with no logger, checkpoints, progress
    bar or callbacks other than the timer: what Lightning's loop costs before t240dist adds anything."""
    timer = _StepTimer(bench["warmup_steps"], bench["steps"])
    keys = ("accelerator", "devices", "num_nodes", "strategy", "precision")
    trainer = pl.Trainer(
        **{k: conf["trainer"][k] for k in keys},
        max_steps=bench["warmup_steps"] + bench["steps"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[timer],
    )
    return _timed_fit(trainer, timer, _PlainModule(conf, info), batches, bench)


def _timed_fit(
    trainer: pl.Trainer,
    timer: _StepTimer,
    module: pl.LightningModule,
    batches: Batches,
    bench: dict[str, Any],
) -> float:
    """Fit ``module`` on the pre-made batches for the warm-up and timed steps; seconds per timed step."""
    total = bench["warmup_steps"] + bench["steps"]
    trainer.fit(module, train_dataloaders=DataLoader(_Cycle(batches, total), batch_size=None))
    return (timer.end - timer.start) / bench["steps"]


class _PlainModule(pl.LightningModule):
    """The network, its loss, optimizer and schedule, as a LightningModule is written by hand."""

    def __init__(self, conf: dict[str, Any], info: DataInfo) -> None:
        super().__init__()
        self.conf = conf
        self.net = build_model(conf["model"], info.channels, info.num_classes)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return _loss(self.net, self.conf, *batch)

    def configure_optimizers(self) -> Any:
        return configure_optimizers(
            self.net, self.conf["optim"], self.conf["sched"], self.trainer.estimated_stepping_batches
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _report(result: dict[str, Any], run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    devices = f" × {result['world_size']}" if result["world_size"] > 1 else ""
    title = (
        f"{result['model']} · batch {result['batch_size']} per device · {result['image_size']} px · "
        f"{result['precision']} · {result['device']}{devices}"
    )
    table = Table(title=title)
    columns = ["loop", "img/s", "ms/step", "peak GiB", "÷ hand-written", "÷ same-mode hand-written"]
    scaled = result["world_size"] > 1
    for column in columns + (["scaling"] if scaled else []):
        table.add_column(column, justify="right")
    for name, row in result["loops"].items():
        cells = [
            name,
            f"{row['images_per_s']:,.0f}",
            f"{row['ms_per_step']:.2f}",
            _fixed(row["peak_gib"], 2),
            _fixed(row["ratio_to_hand_written"], 3),
            _fixed(row["ratio_to_same_hand_written"], 3),
        ]
        table.add_row(*cells, *([_fixed(row["scaling"], 3)] if scaled else []))
    Console().print(table)


def _fixed(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def run_predict_bench(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Batch inference: ``predict``'s path (``Predictor``) against a hand-written ``torch.inference_mode()``
    loop, interleaved ``bench.repeats`` times on the same device-resident batches; writes ``bench.json``."""
    bench = OmegaConf.to_container(cfg.bench)
    conf = validate(without_bench(cfg))
    data = ImageDataModule(conf["data"], conf["seed"])
    predictor = Predictor(ClassifierModule.from_config(conf, data.info), conf["trainer"], bench["top_k"])
    device = predictor.device
    images = [x for x, _ in _batches(data, bench["distinct_batches"], device)]
    net, top_k = predictor.module.net, predictor.top_k
    loops: dict[str, Callable[[], float]] = {
        "hand-written": lambda: _hand_written_inference(net, images, conf, top_k, bench),
        "t240dist": lambda: _per_batch(lambda i: predictor(images[i % len(images)]), bench, device),
    }
    result = _measure(loops, conf, bench, images[0], {"task": "predict", "top_k": top_k})
    _report(result, run_dir)
    return result


def _hand_written_inference(
    net: torch.nn.Module, images: list[torch.Tensor], conf: dict[str, Any], top_k: int, bench: dict[str, Any]
) -> float:
    """The baseline: the inference loop a good engineer writes by hand, top-k read back to the host."""
    device = images[0].device
    channels_last = conf["model"]["channels_last"]
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(conf["trainer"]["precision"])
    net.eval()

    def step(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = images[i % len(images)]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            probs, classes = net(x).float().softmax(dim=1).topk(top_k, dim=1)
            return probs.cpu(), classes.cpu()

    return _per_batch(step, bench, device)


def _per_batch(step: Callable[[int], Any], bench: dict[str, Any], device: torch.device) -> float:
    """Seconds per call of ``step(i)``: ``bench.steps`` timed calls after ``bench.warmup_steps`` others."""
    for i in range(bench["warmup_steps"]):
        step(i)
    _sync(device)
    start = time.perf_counter()
    for i in range(bench["steps"]):
        step(i)
    _sync(device)
    return (time.perf_counter() - start) / bench["steps"]


def _measure(
    loops: dict[str, Callable[[], float]],
    conf: dict[str, Any],
    bench: dict[str, Any],
    example: torch.Tensor,
    task: dict[str, Any],
) -> dict[str, Any]:
    """Time the loops (interleaved repeats) and describe the measurement: the content of ``bench.json``."""
    device = example.device
    times, peak = _interleaved(loops, bench["repeats"], device)
    batch_size = conf["data"]["batch_size"]
    world = _world()
    return {
        **task,
        "device": device_name(device),
        "model": conf["model"]["name"],
        "batch_size": batch_size,  # per device
        "world_size": world,
        "image_size": example.shape[-1],
        "precision": conf["trainer"]["precision"],
        "channels_last": conf["model"]["channels_last"],
        "steps": bench["steps"],
        "versions": {"torch": torch.__version__, "lightning": pl.__version__},
        "loops": _rows(times, peak, batch_size, world),
    }


def _interleaved(
    loops: dict[str, Callable[[], float]], repeats: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Each loop's seconds per step in every repeat (loops take turns) and its peak GPU memory in GiB."""
    times: dict[str, list[float]] = {name: [] for name in loops}
    peak: dict[str, float] = {}
    for _ in range(repeats):
        for name, loop in loops.items():
            # The last loop's Trainer and module sit in reference cycles, their weights and optimizer state
            # still on the GPU until the cycle collector runs: collected here, each peak is its own loop's
            gc.collect()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[name].append(loop())
            if device.type == "cuda":
                peak[name] = torch.cuda.max_memory_allocated(device) / 2**30
    return times, peak


def _rows(
    times: dict[str, list[float]], peak: dict[str, float], batch_size: int, world: int
) -> dict[str, Any]:
    """The report's row of each loop: medians, the ratio to the hand-written loop's images/s, and under
    DDP the scaling: images/s ÷ (devices × the hand-written loop's images/s on one device)."""
    rate = {
        name: (batch_size if name == SINGLE else batch_size * world) / statistics.median(t)
        for name, t in times.items()
    }
    return {
        name: {
            "ms_per_step": 1e3 * statistics.median(t),
            "images_per_s": rate[name],
            # the one-device baseline is compared through the scaling column only
            "ratio_to_hand_written": rate[name] / rate["hand-written"] if name != SINGLE else None,
            "ratio_to_same_hand_written": rate[name] / rate[_hand_twin(name)] if name != SINGLE else None,
            "scaling": rate[name] / (world * rate[SINGLE]) if SINGLE in rate and name != SINGLE else None,
            "peak_gib": peak.get(name),
            "repeats_ms": [1e3 * x for x in t],
        }
        for name, t in times.items()
    }
