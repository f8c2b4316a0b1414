"""``python -m train.bench bench.task=data``: the training input pipeline alone, as the run builds it.

It iterates the run's own training loader (reading, decoding, augmenting and collating in
``data.num_workers`` DataLoader workers, or the device batch maker under ``data.on_gpu``; under
``data.decode=device`` the workers read files and the GPU decodes and crops them) with nothing training,
once for each worker count in ``bench.data_workers``, and reports images/s and images/s per worker.
Given the rate the GPU trains at (``bench.feed_images_per_s``, e.g. from ``python -m train.bench`` on
that GPU), it also says how many workers keep it fed, so a run can be sized before the GPU waits on
JPEG decoding.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from t240dist.config import check_steps
from t240dist.data import DecodedAhead, ImageDataModule, loader_workers, usable_cpus


def run_data_bench(bench: dict[str, Any], conf: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Time ``bench.steps`` training batches after ``bench.warmup_steps``, ``bench.repeats`` times, for each
    worker count; print the table and write ``bench.json``."""
    data = ImageDataModule(conf["data"], conf["seed"])  # read and checked once; a loader per worker count
    check_steps(conf, data.info.train_size, ranks=1)  # a batch larger than the split: one line
    rows = {}
    for requested in bench["data_workers"] or [conf["data"]["num_workers"]]:
        workers = loader_workers(requested)  # lowered to the CPUs this process may use, as a run lowers it
        data.cfg = {**data.cfg, "num_workers": workers}
        timed = [_timed_batches(data, bench) for _ in range(bench["repeats"])]
        rates = [images / seconds for images, seconds, _ in timed]
        rate = statistics.median(rates)
        rows[str(workers)] = {
            "images_timed": timed[0][0],  # per repeat
            "warmup_batches": timed[0][2],  # bench.warmup_steps, or the batches the workers start at once
            "images_per_s": rate,
            "images_per_s_per_worker": rate / workers if workers else None,
            "repeats_images_per_s": rates,
        }
    feed = bench["feed_images_per_s"]
    result = {
        "task": "data",
        "data": conf["data"]["name"],
        "batch_size": conf["data"]["batch_size"],
        "image_size": conf["data"].get("image_size"),
        "augment": conf["data"].get("augment"),
        "steps": bench["steps"],
        "workers": rows,
        "feed_images_per_s": feed,
        "workers_to_feed": _workers_to_feed(rows, feed),
        "cpus": usable_cpus(),
        "decode": conf["data"].get("decode"),
        "gpu": torch.cuda.is_available(),
    }
    (run_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    _print_table(result)
    return result


def _workers_to_feed(rows: dict[str, dict[str, Any]], feed: float | None) -> int | None:
    """The fewest workers measured that fed ``feed`` img/s; where none did, extrapolated from the slowest
    per-worker rate measured (workers share the CPUs, so more of them decode slower each). Under
    ``data.decode=device`` the workers only read files, and a few may feed the GPU already."""
    if not feed:
        return None
    fed = [int(workers) for workers, row in rows.items() if row["images_per_s"] >= feed]
    per_worker = [r["images_per_s_per_worker"] for r in rows.values() if r["images_per_s_per_worker"]]
    if fed:
        return min(fed)
    return math.ceil(feed / min(per_worker)) if per_worker else None


def _verdict(result: dict[str, Any]) -> str:
    """What the workers needed mean on this machine: a worker count to train with, or where to decode."""
    need, cpus = result["workers_to_feed"], result["cpus"]
    if need < cpus:  # a CPU stays for the training process
        return f"this machine has {cpus} CPUs: train with data.num_workers={need}"
    fix = ""
    if result["decode"] == "workers":  # (data.decode=device decodes on the CPU where there is no GPU)
        fix = ": decode on the GPU, data.decode=device" if result["gpu"] else ": time it on the GPU's machine"
    return f"more than this machine's {cpus} CPUs leave beside training{fix}"


def _timed_batches(data: ImageDataModule, bench: dict[str, Any]) -> tuple[int, float, int]:
    """Images and seconds of ``bench.steps`` batches out of a fresh training loader, after its first
    ``bench.warmup_steps`` (worker start-up); epochs follow each other on the same workers, as in training.

    The warm-up also takes every batch that the workers start at once (``prefetch_factor`` each): timed,
    they would count work done before the clock started (16 workers timed over 12 batches read 4x fast).
    """
    loader = data.train_dataloader()
    batches = (batch for _ in itertools.count() for batch in loader)
    workers = loader.loader if isinstance(loader, DecodedAhead) else loader
    in_flight = workers.num_workers * (workers.prefetch_factor or 0) if isinstance(workers, DataLoader) else 0
    warmup = max(bench["warmup_steps"], in_flight)
    try:
        for _ in range(warmup):
            next(batches)
        images, start = 0, time.perf_counter()
        for _ in range(bench["steps"]):
            images += len(next(batches)[0])
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # what data.decode=device has queued on the GPU
        return images, time.perf_counter() - start, warmup
    finally:
        batches.close()
        data.teardown("fit")  # a decoding loader's thread and workers end here, not while the next is timed


def _print_table(result: dict[str, Any]) -> None:
    print(f"input pipeline · {result['data']} · batch {result['batch_size']} · {result['steps']} batches")
    table = Table()
    for column in ("workers", "img/s", "img/s per worker"):
        table.add_column(column, justify="right")
    for workers, row in result["workers"].items():
        per = row["images_per_s_per_worker"]
        table.add_row(workers, f"{row['images_per_s']:,.0f}", "-" if per is None else f"{per:,.0f}")
    Console().print(table)
    if result["workers_to_feed"] is not None:  # 0: the main process alone fed it
        need = f"{result['workers_to_feed']} workers"
        print(f"to feed {result['feed_images_per_s']:,.0f} img/s: {need} — {_verdict(result)}")
    elif result["feed_images_per_s"]:
        print("bench.feed_images_per_s: time 1 worker or more (bench.data_workers=[4]) to size the feed")
