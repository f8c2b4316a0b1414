"""``python -m train.bench bench.task=job``: the whole job, as users run it, against a hand-written script.

Each repeat runs, one after the other, the hand-written job (``t240dist.handwritten_job``) and t240dist's
real ``python -m train`` with the benchmark's own overrides (and each of ``bench.job_variants``), each as
a process of its own. For each it reports the process's wall time, the time from its start to its first
training step's end, its training images per second (first step and validation left out), the seconds
spent in validation, in checkpoints and in the test, and the GPU utilization while it trained, read by
this process with NVML for every side alike; then each t240dist side's ratio to the hand-written job.

This process composes and waits: it imports neither Lightning nor CUDA, so it takes nothing from the
processes it times.
"""

from __future__ import annotations

import json
import pickle
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from t240dist.config import validate_run
from t240dist.errors import ConfigError
from t240dist.optim import scaled_lr

HAND_WRITTEN = "hand-written"
T240DIST = "t240dist"
# What the hand-written job can do of a run config; a config that needs more is refused with one line.
_MIRRORED = {
    "data.name": ("cifar10",),
    "optim": ("torch.optim.SGD", "torch.optim.AdamW"),
    "sched.name": ("onecycle", "none"),
    "trainer.precision": ("32-true", "bf16-mixed"),
    "data.augment.crop": ("pad", "none"),
}


def run_job_bench(bench: dict[str, Any], conf: dict[str, Any], overrides: list[str], run_dir: Path) -> dict:
    """Time the hand-written job and t240dist's ``bench.repeats`` times, interleaved; write ``bench.json``.

    ``conf`` is the run config that ``overrides`` (the command line without ``bench.*``) compose to.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    if bench["make_data"]:
        root = run_dir / "cifar-10-batches-py"
        write_class_coloured_cifar(root, bench["make_data_seed"])
        overrides = [*overrides, f"data.root={root}"]
        conf = {**conf, "data": {**conf["data"], "root": str(root)}}
    spec = handwritten_spec(conf)
    sides: dict[str, list[str]] = {HAND_WRITTEN: [], T240DIST: []}
    sides.update({f"{T240DIST} {variant}": variant.split() for variant in bench["job_variants"]})
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    gpus = UtilTrace.of_job(conf)
    for repeat in range(bench["repeats"]):
        for name, extra in sides.items():
            out = run_dir / f"{name.replace(' ', '_').replace('=', '-')}-{repeat}"
            print(
                f"bench.task=job: repeat {repeat + 1} of {bench['repeats']}, {name} ({out / 'log.txt'})",
                flush=True,
            )
            if name == HAND_WRITTEN:
                runs[name].append(_run_handwritten(spec, out, gpus))
            else:
                runs[name].append(_run_t240dist([*overrides, *extra], out, gpus))
            print(f"  {runs[name][-1]['wall_s']:.1f} s", flush=True)
    result = {
        "task": "job",
        "overrides": overrides,
        "epochs": conf["trainer"]["max_epochs"],
        "repeats": bench["repeats"],
        "sides": {name: _median_row(rows) for name, rows in runs.items()},
        "runs": runs,
    }
    result["ratios"] = {name: _ratios(result["sides"][name], result["sides"][HAND_WRITTEN]) for name in sides}
    (run_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    _print_table(result)
    return result


def handwritten_spec(conf: dict[str, Any]) -> dict[str, Any]:
    """What the hand-written job needs to do the same work as a t240dist run of ``conf``; a one-line
    ``ConfigError`` for what it cannot mirror. Its ``auto`` settings are decided as the run decides them."""
    conf = validate_run(conf)
    data, model, optim, sched, trainer, module = (
        conf[k] for k in ("data", "model", "optim", "sched", "trainer", "module")
    )
    found = {
        "data.name": data["name"],
        "optim": optim["_target_"],
        "sched.name": sched["name"],
        "trainer.precision": trainer["precision"],
        "data.augment.crop": data.get("augment", {}).get("crop"),
    }
    for key, value in found.items():
        if value not in _MIRRORED[key]:
            raise ConfigError(
                f"bench.task=job: the hand-written job has no {key}={value} — use one of "
                f"{', '.join(_MIRRORED[key])} (experiment=cifar10_resnet18 is the preset it mirrors)"
            )
    unmirrored = {
        "model.name=small_cnn": model["name"] == "small_cnn",
        "module.mixup_alpha/cutmix_alpha": module["mixup_alpha"] > 0 or module["cutmix_alpha"] > 0,
        "module.ema_decay": module["ema_decay"] is not None,
        "trainer.strategy=ddp": trainer["strategy"] == "ddp" or trainer["num_nodes"] > 1,
        "trainer.accumulate_grad_batches": trainer["accumulate_grad_batches"] > 1,
        "trainer.check_val_every_n_epoch": trainer["check_val_every_n_epoch"] > 1,
        "trainer.limit_*_batches": any(
            trainer[f"limit_{s}_batches"] != 1.0 for s in ("train", "val", "test")
        ),
        "trainer.max_steps": trainer["max_steps"] != -1,
    }
    for what, used in unmirrored.items():
        if used:
            raise ConfigError(
                f"bench.task=job: the hand-written job does not do {what} — leave it at its default "
                "(experiment=cifar10_resnet18 is the preset it mirrors)"
            )
    return {
        "root": data["root"],
        "val_fraction": data["val_fraction"],
        "split_seed": data["split_seed"],
        "batch_size": data["batch_size"],
        "padding": data["augment"]["padding"] if data["augment"]["crop"] == "pad" else 0,
        "hflip": data["augment"]["hflip"],
        "model": model["name"],
        "cifar_stem": model["cifar_stem"],
        "channels_last": model["channels_last"],
        "optimizer": "sgd" if optim["_target_"] == "torch.optim.SGD" else "adamw",
        "lr": scaled_lr(optim, data["batch_size"]),
        "momentum": optim.get("momentum"),
        "nesterov": optim.get("nesterov"),
        "weight_decay": optim["weight_decay"],
        "schedule": sched["name"],
        **{k: sched.get(k) for k in ("pct_start", "div_factor", "final_div_factor")},
        "label_smoothing": module["label_smoothing"],
        "epochs": trainer["max_epochs"],
        "precision": trainer["precision"],
        "accelerator": trainer["accelerator"],
        "seed": conf["seed"],
    }


def write_class_coloured_cifar(root: Path, seed: int, train: int = 50_000, test: int = 10_000) -> None:
    """CIFAR-10 python batches of random 32x32 images tinted by class, a task that can be learnt."""
    if (root / "batches.meta").is_file():
        return
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tints = rng.integers(0, 256, (10, 3, 1, 1))
    parts = {f"data_batch_{i}": train // 5 for i in range(1, 6)} | {"test_batch": test}
    for name, n in parts.items():
        labels = rng.integers(0, 10, n)
        noise = rng.integers(0, 256, (n, 3, 32, 32))
        images = ((3 * noise + tints[labels]) // 4).astype(np.uint8).reshape(n, 3072)
        (root / name).write_bytes(pickle.dumps({b"data": images, b"labels": labels.tolist()}))
    names = [f"class{i}".encode() for i in range(10)]
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))


def _run_handwritten(spec: dict[str, Any], out: Path, gpus: UtilTrace) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps({**spec, "out_dir": str(out)}, indent=2))
    command = [
        sys.executable,
        "-m",
        "t240dist.handwritten_job",
        str(out / "spec.json"),
        str(out / "result.json"),
    ]
    wall, trace, ended = _timed(command, out, gpus)
    done = json.loads((out / "result.json").read_text())
    done["exit_s"] = ended - (out / "result.json").stat().st_mtime
    row = _row(wall, trace, done["first_step_s"], done, done["train_images_per_s"])
    return {**row, "monitor_share": None}


def _run_t240dist(overrides: list[str], out: Path, gpus: UtilTrace) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "train", *overrides, f"hydra.run.dir={out}"]
    wall, trace, ended = _timed(command, out, gpus)
    summary = json.loads((out / "run_summary.json").read_text())
    phases = summary["phases_s"]
    done = {
        "validation_s": phases["validation"],
        "checkpoint_s": phases["checkpoints"],
        "test_s": phases["test"],
        "test_acc": summary["test_acc"],
        "exit_s": ended - (out / "run_summary.json").stat().st_mtime,
    }
    # what GPU telemetry took of the training thread, measured by the monitor itself (None: it was off)
    host = summary["telemetry_host_s"]
    monitor_share = host / summary["train_s"] if host is not None else None
    row = _row(wall, trace, phases["to_first_step"], done, summary["train_images_per_s"])
    return {**row, "monitor_share": monitor_share}


def _timed(command: list[str], out: Path, gpus: UtilTrace) -> tuple[float, list[tuple[float, float]], float]:
    """Run ``command`` (output to ``out/log.txt``): its wall time, the GPU utilization while it ran as
    (seconds since its start, %) pairs, and when it ended (epoch seconds, to compare with the mtime of the
    last file it wrote); a failure stops the benchmark with the log's last line."""
    with (out / "log.txt").open("w") as log:
        gpus.begin()
        started = time.perf_counter()
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
        wall = time.perf_counter() - started
        ended = time.time()
    trace = gpus.end()
    if done.returncode != 0:
        last = (out / "log.txt").read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise ConfigError(
            f"bench.task=job: {' '.join(command[2:4])} failed ({last[0]}) — see {out / 'log.txt'}"
        )
    return wall, trace, ended


def _row(
    wall: float, trace: list[tuple[float, float]], to_first_step: float, done: dict[str, Any], rate: float
) -> dict[str, Any]:
    """One run's figures; the GPU utilization is the mean from its first step to the start of its test.
    ``exit_s``: from the last file the run wrote (its result or summary) to the end of its process."""
    keys = ("validation_s", "checkpoint_s", "test_s", "exit_s", "test_acc")
    training = [pct for at, pct in trace if to_first_step <= at <= wall - done["test_s"]]
    return {
        "wall_s": wall,
        "to_first_step_s": to_first_step,
        "train_images_per_s": rate,
        **{k: done[k] for k in keys},
        "gpu_util_mean": statistics.fmean(training) if training else None,
    }


def _median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over the repeats, and the spread of the wall times."""
    row: dict[str, Any] = {}
    for key in rows[0]:
        values = [r[key] for r in rows if r[key] is not None]
        row[key] = statistics.median(values) if values else None
    walls = [r["wall_s"] for r in rows]
    row["wall_s_spread"] = max(walls) - min(walls)
    return row


def _ratios(side: dict[str, Any], hand: dict[str, Any]) -> dict[str, float | None]:
    """This side ÷ the hand-written job: >1 means more time (wall), or more images/s (training)."""
    return {
        "wall": side["wall_s"] / hand["wall_s"],
        "train_images_per_s": side["train_images_per_s"] / hand["train_images_per_s"],
        "gpu_util_points": (
            side["gpu_util_mean"] - hand["gpu_util_mean"]
            if side["gpu_util_mean"] is not None and hand["gpu_util_mean"] is not None
            else None
        ),
    }


def _print_table(result: dict[str, Any]) -> None:
    """One column per side, one row per figure: it fits 80 columns with a few sides."""
    from rich.console import Console
    from rich.table import Table

    sides, ratios = result["sides"], result["ratios"]
    table = Table(title=f"whole job · {result['epochs']} epochs · median of {result['repeats']}")
    table.add_column("")
    for name in sides:
        table.add_column(name, justify="right", overflow="fold")
    figures = [
        ("wall s", lambda n: sides[n]["wall_s"], "{:.1f}"),
        ("to 1st step s", lambda n: sides[n]["to_first_step_s"], "{:.1f}"),
        ("train img/s", lambda n: sides[n]["train_images_per_s"], "{:,.0f}"),
        ("validation s", lambda n: sides[n]["validation_s"], "{:.2f}"),
        ("checkpoints s", lambda n: sides[n]["checkpoint_s"], "{:.2f}"),
        ("test s", lambda n: sides[n]["test_s"], "{:.2f}"),
        ("exit s", lambda n: sides[n]["exit_s"], "{:.2f}"),
        ("GPU util %", lambda n: sides[n]["gpu_util_mean"], "{:.0f}"),
        ("monitor host %", lambda n: sides[n]["monitor_share"] and 100 * sides[n]["monitor_share"], "{:.2f}"),
        ("wall ÷ hand", lambda n: ratios[n]["wall"], "{:.3f}"),
        ("img/s ÷ hand", lambda n: ratios[n]["train_images_per_s"], "{:.3f}"),
    ]
    for label, value, shown in figures:
        table.add_row(label, *("-" if value(n) is None else shown.format(value(n)) for n in sides))
    Console().print(table)


class UtilTrace:
    """The job's GPUs' utilization every 0.1 s, with its time, read in a thread while a side runs.

    Hand-written rather than ``telemetry.NvmlSampler``: that one aggregates windows as a job's own
    callback sees them; here every side is read alike, from outside, and cut to its training phase later.
    """

    def __init__(self, nvml: Any, handles: list[Any]) -> None:
        self.nvml, self.handles = nvml, handles
        self._points: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0.0

    @classmethod
    def of_job(cls, conf: dict[str, Any]) -> UtilTrace:
        """The trace of the GPU a one-device run computes on (CUDA device 0, mapped by UUID); nothing on a
        machine without GPUs or without NVML."""
        import torch

        if conf["trainer"]["accelerator"] == "cpu" or not torch.cuda.is_available():
            return cls(None, [])
        try:
            import pynvml

            from t240dist.telemetry import job_gpu_uuids

            pynvml.nvmlInit()
            uuids = job_gpu_uuids(pynvml, torch.device("cuda", 0))
            return cls(pynvml, [pynvml.nvmlDeviceGetHandleByUUID(u) for u in uuids])
        except Exception:  # no NVML: the table shows no GPU column values
            return cls(None, [])

    def begin(self) -> None:
        self._points, self._start = [], time.perf_counter()
        if self.handles:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def end(self) -> list[tuple[float, float]]:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        return self._points

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            pct = statistics.fmean(self.nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self.handles)
            self._points.append((time.perf_counter() - self._start, pct))
