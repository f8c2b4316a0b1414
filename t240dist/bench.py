"""The benchmark: t240dist's training path against a hand-written PyTorch loop, same process and data;
and (``bench.task=predict``) its batch-inference path against a hand-written inference loop.

Both consume the same pre-made batches already on the device, so the ratio measures the framework
(Trainer, module, callbacks, logging; or predict's Predictor), not the input pipeline.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, IterableDataset

from t240dist.config import validate
from t240dist.data import DataInfo, ImageDataModule
from t240dist.inference import Predictor
from t240dist.models import build_model, compile_network
from t240dist.module import ClassifierModule
from t240dist.optim import build_optimizer
from t240dist.run import build_trainer

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def run_bench(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Time both loops ``bench.repeats`` times, interleaved; print a table and write ``bench.json``."""
    bench = OmegaConf.to_container(cfg.bench)
    train_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "bench"])
    conf = validate(train_cfg)
    device = torch.device(
        "cuda" if torch.cuda.is_available() and conf["trainer"]["accelerator"] != "cpu" else "cpu"
    )
    data = ImageDataModule(conf["data"], conf["seed"])
    batches = _batches(data, bench["distinct_batches"], device)
    loops: dict[str, Callable[[], float]] = {
        "hand-written": lambda: _hand_written(conf, data.info, batches, bench, device),
        "t240dist": lambda: _t240dist(conf, data.info, batches, bench, run_dir),
    }
    if device.type == "cuda" and conf["monitor"]["name"] != "off":  # what GPU telemetry costs
        unmonitored = {**conf, "monitor": {"name": "off"}}
        loops["t240dist monitor=off"] = lambda: _t240dist(unmonitored, data.info, batches, bench, run_dir)
    for mode in bench["compile_modes"]:  # both loops again with the network compiled
        compiled = {**conf, "model": {**conf["model"], "compile": mode}}
        loops[f"hand-written compile={mode}"] = partial(
            _hand_written, compiled, data.info, batches, bench, device
        )
        loops[f"t240dist compile={mode}"] = partial(_t240dist, compiled, data.info, batches, bench, run_dir)
    result = _measure(loops, conf, bench, batches[0][0], {"task": "train"})
    _report(result, run_dir)
    return result


def _hand_twin(loop: str) -> str:
    """The hand-written loop that ``loop`` is compared with: the one with the same compile setting."""
    mode = loop.partition(" compile=")[2]
    return f"hand-written compile={mode}" if mode else "hand-written"


def _batches(data: ImageDataModule, count: int, device: torch.device) -> Batches:
    """Draw ``count`` batches from the configured dataset and move them to the device once."""
    loader = iter(data.train_dataloader())
    made = [next(loader) for _ in range(count)]
    return [(x.to(device), y.to(device)) for x, y in made]


def _hand_written(
    conf: dict[str, Any], info: DataInfo, batches: Batches, bench: dict[str, Any], device: torch.device
) -> float:
    """The baseline: the loop a good engineer writes by hand. Returns seconds per timed step."""
    net = build_model(conf["model"], info.channels, info.num_classes).to(device)
    cuda_graphs = compile_network(net, conf["model"]["compile"])
    optimizer = build_optimizer(net, conf["optim"])
    smoothing = conf["module"]["label_smoothing"]
    channels_last = conf["model"]["channels_last"]
    precision = conf["trainer"]["precision"]
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16 if precision.startswith("bf16") else torch.float16)
        if precision.endswith("mixed")
        else nullcontext()
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            loss = F.cross_entropy(net(x), y, label_smoothing=smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return _per_batch(step, bench, device)


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
    total = bench["warmup_steps"] + bench["steps"]
    module = ClassifierModule.from_config(conf, info)
    trainer_conf = {
        **conf,
        "trainer": {
            **conf["trainer"],
            "max_steps": total,
            "limit_val_batches": 0,
            "enable_progress_bar": False,
        },
    }
    timer = _StepTimer(bench["warmup_steps"], bench["steps"])
    trainer, _, _ = build_trainer(trainer_conf, run_dir / "t240dist", extra=[timer])
    trainer.fit(module, train_dataloaders=DataLoader(_Cycle(batches, total), batch_size=None))
    return (timer.end - timer.start) / bench["steps"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _report(result: dict[str, Any], run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    title = (
        f"{result['model']} · batch {result['batch_size']} · {result['image_size']} px · "
        f"{result['precision']} · {result['device']}"
    )
    table = Table(title=title)
    for column in ("loop", "img/s", "ms/step", "peak GiB", "÷ hand-written", "÷ same-mode hand-written"):
        table.add_column(column, justify="right")
    for name, row in result["loops"].items():
        peak = f"{row['peak_gib']:.2f}" if row["peak_gib"] is not None else "-"
        same = row.get("ratio_to_same_hand_written")
        table.add_row(
            name,
            f"{row['images_per_s']:,.0f}",
            f"{row['ms_per_step']:.2f}",
            peak,
            f"{row['ratio_to_hand_written']:.3f}",
            f"{same:.3f}" if same is not None else "-",
        )
    Console().print(table)


def run_predict_bench(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Batch inference: ``predict``'s path (``Predictor``) against a hand-written ``torch.inference_mode()``
    loop, interleaved ``bench.repeats`` times on the same device-resident batches; writes ``bench.json``."""
    bench = OmegaConf.to_container(cfg.bench)
    conf = validate(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "bench"]))
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
    return {
        **task,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": conf["model"]["name"],
        "batch_size": batch_size,
        "image_size": example.shape[-1],
        "precision": conf["trainer"]["precision"],
        "channels_last": conf["model"]["channels_last"],
        "steps": bench["steps"],
        "versions": {"torch": torch.__version__, "lightning": pl.__version__},
        "loops": _rows(times, peak, batch_size),
    }


def _interleaved(
    loops: dict[str, Callable[[], float]], repeats: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Each loop's seconds per step in every repeat (loops take turns) and its peak GPU memory in GiB."""
    times: dict[str, list[float]] = {name: [] for name in loops}
    peak: dict[str, float] = {}
    for _ in range(repeats):
        for name, loop in loops.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[name].append(loop())
            if device.type == "cuda":
                peak[name] = torch.cuda.max_memory_allocated(device) / 2**30
    return times, peak


def _rows(times: dict[str, list[float]], peak: dict[str, float], batch_size: int) -> dict[str, Any]:
    """The report's row of each loop: medians, and the ratio to the hand-written loop's images/s."""
    base = statistics.median(times["hand-written"])
    return {
        name: {
            "ms_per_step": 1e3 * statistics.median(t),
            "images_per_s": batch_size / statistics.median(t),
            "ratio_to_hand_written": base / statistics.median(t),
            "ratio_to_same_hand_written": statistics.median(times[_hand_twin(name)]) / statistics.median(t),
            "peak_gib": peak.get(name),
            "repeats_ms": [1e3 * x for x in t],
        }
        for name, t in times.items()
    }
