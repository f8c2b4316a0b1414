"""GPU telemetry from NVML: every GPU of the job, sampled in the background, on the training step axis.

Each rank samples the GPUs it computes on in a thread of its own (NVML's ctypes calls release the GIL;
nothing is queried on the step path). About every ``slow_interval_s``, at a step that rank 0 picks from
the step rate so that every window holds a read of the slow counters, the ranks send their window
aggregates to rank 0 over a CPU (gloo) group, so the GPU streams are never touched; rank 0 writes
per-GPU series, the spread across GPUs and energy per image to every logger at the trainer's global
step, and warns about stragglers and throttling. Metrics a GPU does not support are dropped one by one
at start, and said so.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from t240dist.errors import ConfigError
from t240dist.loggers import log_metrics, tensorboard

log = logging.getLogger(__name__)

GIB = 2**30
# Clock-event reasons that mean "slowed down" (idle, application clocks and sync boost do not).
THROTTLE_REASONS = {
    "sw_power_cap": 0x04,
    "hw_slowdown": 0x08,
    "sw_thermal": 0x20,
    "hw_thermal": 0x40,
    "hw_power_brake": 0x80,
}
# The gauges whose peak in a window (gpu/<metric>.max/<gpu>) says what their mean hides: a memory or
# power spike, a hot moment, a burst of work. Clocks and the 0/100 throttle flags get none: a flag's mean
# is already the share of the window it was up, its peak only 0 or 100.
PEAKS = {"util_pct", "mem_bw_util_pct", "mem_used_gib", "proc_mem_gib", "power_w", "temp_c"}
# What a GPU reads that never changes: said once (at start, and as TensorBoard text), never a series.
CONSTANTS = {"mem_total_gib"}
# The gauges charted across GPUs on the dashboard (tag gpu/<metric>/<gpu>): their titles, and the reader
# (READERS) that measures each, so that a GPU without it gets no empty chart.
CHARTS = {
    "util_pct": ("GPU utilization %", "utilization"),
    "mem_bw_util_pct": ("memory-bandwidth utilization %", "utilization"),
    "mem_used_gib": ("memory used GiB", "memory"),
    "proc_mem_gib": ("this job's memory GiB", "process_memory"),
    "power_w": ("power W", "power"),
    "energy_j": ("energy J (since the start)", "energy"),
    "temp_c": ("temperature °C", "temperature"),
    "sm_clock_mhz": ("SM clock MHz", "clocks"),
    "mem_clock_mhz": ("memory clock MHz", "clocks"),
    "throttled_pct": ("throttled % of samples", "clock_events"),
    "throttle_power_pct": ("power-capped % of time", "violations"),
    "throttle_thermal_pct": ("thermally capped % of time", "violations"),
    "pcie_tx_mib_s": ("PCIe tx MiB/s", "pcie"),
    "pcie_rx_mib_s": ("PCIe rx MiB/s", "pcie"),
    "sm_active_pct": ("SM activity % (GPM)", "gpm"),
    "tensor_active_pct": ("tensor-core activity % (GPM)", "gpm"),
}


class GpuMonitor(pl.Callback):
    """Samples this rank's GPUs with :class:`NvmlSampler` and has rank 0 write every GPU to every logger.

    The ranks exchange their windows at the same global steps without asking each other: rank 0 picks
    the next exchange step from the measured step time (about every ``interval_s``) and sends it along.
    """

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.sampler: NvmlSampler | None = None
        self.totals = Totals()
        self._active = False  # this job has GPUs to watch (the same answer on every rank)
        self._group: Any = None
        self._next_step = 0
        self._images = 0
        self._window_start = (0, 0, 0.0)  # (step, images, time) at the previous exchange
        self._warned: set[str] = set()
        self._written_at = -1  # the step of the latest points written
        self._about_gpus: list[str] = []  # what each GPU is, said once, for TensorBoard's text tab

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        nvml = _load(self.cfg["library"])
        uuids = job_gpu_uuids(nvml, trainer.strategy.root_device)
        self._active = bool(uuids)  # every rank of a job answers alike: all on GPUs, or none
        if not self._active:
            return
        if trainer.world_size > 1 and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")  # telemetry never touches the NCCL streams
        self.sampler = NvmlSampler(nvml, uuids, self.cfg["interval_s"], self.cfg["slow_interval_s"])
        failure = self.sampler.start()
        if failure:
            self.sampler = None  # the rank still takes part in the exchanges, with nothing to send
            if trainer.local_rank == 0:
                log.warning("GPU telemetry off: %s — training goes on without it", failure)
        elif trainer.is_global_zero and (board := tensorboard(trainer)) is not None:
            readers = {name for gpu in self.sampler.gpus for name in gpu.readers}  # rank 0's GPUs have
            board.experiment.add_custom_scalars(dashboard_layout(readers))
        self._window_start = (trainer.global_step, 0, time.perf_counter())

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active:
            return
        self._images += len(batch[1]) * trainer.world_size
        if trainer.global_step >= self._next_step:
            self._exchange(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active:
            self._exchange(trainer, last=True)
        self._stop()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, err: BaseException) -> None:
        self._stop()

    def summary(self) -> dict[str, Any]:
        """What ``run_summary.json`` reports of the GPUs (None where nothing was measured)."""
        return self.totals.summary(self._images)

    def _exchange(self, trainer: pl.Trainer, last: bool = False) -> None:
        """Send this rank's window to rank 0 (which writes it) and learn the next exchange step.

        Points go on the step axis of the training curves (the batch that just ended); the last window
        (the final steps and validation) goes on the last step, unless a window was written there already.
        """
        now = time.perf_counter()
        step0, images0, t0 = self._window_start
        step = trainer.global_step
        steps_per_s = (step - step0) / max(now - t0, 1e-9)
        mine = {
            "rank": trainer.global_rank,
            "next_step": step + max(1, math.ceil(self.cfg["slow_interval_s"] * steps_per_s)),
            "window": self.sampler.drain() if self.sampler else {},
        }
        ranks: list[Any] = [mine]
        if trainer.world_size > 1:
            ranks = [None] * trainer.world_size
            dist.all_gather_object(ranks, mine, group=self._group)
        self._next_step = ranks[0]["next_step"]  # rank 0's proposal, so every rank agrees
        self._window_start = (step, self._images, now)
        if trainer.is_global_zero and trainer.loggers:
            metrics = self._metrics(ranks, (self._images - images0) / max(now - t0, 1e-9))
            axis = trainer.fit_loop.epoch_loop._batches_that_stepped - last
            if metrics and axis != self._written_at:
                log_metrics(trainer, metrics, axis)
                self._written_at = axis
            if self._about_gpus and (board := tensorboard(trainer)) is not None:
                board.experiment.add_text("gpus", "\n\n".join(self._about_gpus), axis)
            self._about_gpus.clear()
        self.totals.host_s += time.perf_counter() - now  # what the training thread paid for telemetry

    def _metrics(self, ranks: list[dict[str, Any]], images_per_s: float) -> dict[str, float]:
        """Per-GPU series, the spread across GPUs, energy per image; warnings and totals on the way."""
        gpus: dict[str, tuple[str, dict[str, Any]]] = {}
        for payload in sorted(ranks, key=lambda r: r["rank"]):
            for uuid, window in payload["window"].items():
                gpus.setdefault(uuid, (f"rank{payload['rank']}", window))  # a GPU shared by ranks: once
        metrics: dict[str, float] = {}
        for label, window in gpus.values():
            self._report_news(label, window)
            for name, value in window["values"].items():
                metrics[f"gpu/{name}/{label}"] = value
            for name, value in window["peaks"].items():
                metrics[f"gpu/{name}.max/{label}"] = value
        for name in CHARTS:
            values = {label: w["values"][name] for label, w in gpus.values() if name in w["values"]}
            if len(values) > 1:
                metrics[f"gpus/{name}/min"] = min(values.values())
                metrics[f"gpus/{name}/max"] = max(values.values())
        self._find_stragglers(gpus, metrics)
        # J per image = the job's power (each energy counter over its own read times, which need not line
        # up with the window's edges) ÷ the window's images per second
        watts = [w["energy_w"] for _, w in gpus.values()]
        if watts and None not in watts and images_per_s > 0:
            metrics["perf/energy_per_image_j"] = sum(watts) / images_per_s
        self.totals.add(gpus.values(), sum(w["energy_delta_j"] for _, w in gpus.values()))
        return metrics

    def _find_stragglers(
        self, gpus: dict[str, tuple[str, dict[str, Any]]], metrics: dict[str, float]
    ) -> None:
        """Name the GPU with the slowest SM clock, and warn once about one that lags or throttles."""
        clocks = {
            label: w["values"]["sm_clock_mhz"] for label, w in gpus.values() if "sm_clock_mhz" in w["values"]
        }
        if len(clocks) > 1:
            slowest = min(clocks, key=clocks.__getitem__)
            metrics["gpus/slowest_rank"] = float(slowest.removeprefix("rank"))
            if clocks[slowest] < (1 - self.cfg["straggler_tolerance"]) * max(clocks.values()):
                self._warn_once(
                    f"straggler:{slowest}",
                    f"GPU {slowest} is a straggler: SM clock {clocks[slowest]:.0f} MHz vs "
                    f"{max(clocks.values()):.0f} MHz on the fastest — check its cooling and power cap",
                )
        for label, window in gpus.values():
            throttled = {
                reason: pct
                for reason, pct in window["values"].items()
                if reason.startswith("throttle_") and pct >= self.cfg["throttle_warn_pct"]
            }
            for reason, pct in throttled.items():
                self._warn_once(
                    f"{reason}:{label}",
                    f"GPU {label} is throttled ({reason.removeprefix('throttle_')}) {pct:.0f}% of the time — "
                    "its clocks are capped, so this rank slows every step",
                )

    def _report_news(self, label: str, window: dict[str, Any]) -> None:
        """Say what a GPU is and which metrics it has the first time (in the log, and as TensorBoard text
        for ``_exchange`` to write), and a lost GPU or metric once."""
        if window.get("available") is not None:
            missing = ", ".join(f"{m} ({why})" for m, why in sorted(window["missing"].items())) or "none"
            total = window["constants"].get("mem_total_gib")
            memory = f", {total:.0f} GiB" if total is not None else ""
            line = (
                f"GPU telemetry {label} {window['name']} ({window['uuid']}{memory}): "
                f"{', '.join(window['available'])}; not available: {missing}"
            )
            log.info(line)
            self._about_gpus.append(line)
        for news in window["news"]:
            self._warn_once(f"{label}:{news}", f"GPU {label}: {news}")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    def _stop(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
            self.totals.thread_cpu_s = self.sampler.thread_cpu_s
            self.sampler = None
        if self._group is not None:  # one gloo group a fit: a process that fits again (bench) makes another
            dist.destroy_process_group(self._group)
            self._group = None


@dataclass
class Totals:
    """Run-level figures for the summary, accumulated from every exchanged window."""

    energy_j: float = 0.0
    util: dict[str, list[float]] = field(default_factory=dict)  # each GPU's window means
    mem_peak_gib: float | None = None
    host_s: float = 0.0  # time the training thread spent in telemetry (the exchanges)
    thread_cpu_s: float = 0.0  # CPU time of the sampling thread

    def add(self, windows: Any, energy_j: float) -> None:
        self.energy_j += energy_j
        for label, window in windows:
            if "util_pct" in window["values"]:
                self.util.setdefault(label, []).append(window["values"]["util_pct"])
            peak = window["peaks"].get("mem_used_gib")
            if peak is not None:
                self.mem_peak_gib = max(peak, self.mem_peak_gib or 0.0)

    def summary(self, images: int) -> dict[str, Any]:
        energy = self.energy_j or None
        return {
            "energy_j": energy,
            "energy_per_image_j": energy / images if energy and images else None,
            "gpu_util_mean": _mean([_mean(u) for u in self.util.values()]) if self.util else None,
            "gpu_mem_peak_gib": self.mem_peak_gib,
            "telemetry_host_s": self.host_s if self.thread_cpu_s else None,  # None: nothing was sampled
            "telemetry_thread_cpu_s": self.thread_cpu_s or None,
        }


def job_gpu_uuids(nvml: Any, device: torch.device) -> list[str]:
    """The NVML UUIDs of the GPUs this rank computes on.

    Taken from CUDA's own view of the device, so ``CUDA_VISIBLE_DEVICES`` given as indices in any order
    or as UUIDs maps right (never ``int(CUDA_VISIBLE_DEVICES)``). A fake NVML, on a machine without
    GPUs, says itself which of its GPUs a rank uses.
    """
    fake = getattr(nvml, "fake_rank_gpus", None)
    if fake is not None:
        return fake()
    if device.type != "cuda":
        return []
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    return [uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"]


def _load(library: str) -> Any:
    """The NVML module: ``pynvml`` from nvidia-ml-py, or a fake with the same interface in tests."""
    try:
        return importlib.import_module(library)
    except ImportError as err:
        raise ConfigError(f"monitor.library '{library}' cannot be imported ({err}) — use pynvml") from None


# What the sampler reads: name → (reads one GPU, slow?). A reader returns {metric: value}; counters
# (cumulative, turned into window deltas and rates) are named in COUNTERS.
Reader = Callable[[Any, Any], dict[str, float]]
COUNTERS = {"energy_mj", "power_violation_ns", "thermal_violation_ns", "pcie_tx_bytes", "pcie_rx_bytes"}


def _utilization(nvml: Any, h: Any) -> dict[str, float]:
    rates = nvml.nvmlDeviceGetUtilizationRates(h)
    return {"util_pct": rates.gpu, "mem_bw_util_pct": rates.memory}


def _memory(nvml: Any, h: Any) -> dict[str, float]:
    try:  # v2 counts memory reserved by the driver as not used, as nvidia-smi does
        info = nvml.nvmlDeviceGetMemoryInfo(h, version=nvml.nvmlMemory_v2)
    except nvml.NVMLError:
        info = nvml.nvmlDeviceGetMemoryInfo(h)
    return {"mem_used_gib": info.used / GIB, "mem_total_gib": info.total / GIB}


def _clocks(nvml: Any, h: Any) -> dict[str, float]:
    return {
        "sm_clock_mhz": nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM),
        "mem_clock_mhz": nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM),
    }


def _clock_events(nvml: Any, h: Any) -> dict[str, float]:
    mask = nvml.nvmlDeviceGetCurrentClocksEventReasons(h)
    flags = {f"throttled_{name}_pct": 100.0 * bool(mask & bit) for name, bit in THROTTLE_REASONS.items()}
    return {"throttled_pct": 100.0 * any(flags.values()), **flags}


def _violations(nvml: Any, h: Any) -> dict[str, float]:
    return {
        "power_violation_ns": nvml.nvmlDeviceGetViolationStatus(h, nvml.NVML_PERF_POLICY_POWER).violationTime,
        "thermal_violation_ns": nvml.nvmlDeviceGetViolationStatus(
            h, nvml.NVML_PERF_POLICY_THERMAL
        ).violationTime,
    }


def _pcie(nvml: Any, h: Any) -> dict[str, float]:
    """PCIe byte counters from field values (nvmlDeviceGetPcieThroughput blocks ~20 ms, so not that)."""
    tx, rx = nvml.nvmlDeviceGetFieldValues(
        h, [nvml.NVML_FI_DEV_PCIE_COUNT_TX_BYTES, nvml.NVML_FI_DEV_PCIE_COUNT_RX_BYTES]
    )
    if tx.nvmlReturn or rx.nvmlReturn:
        raise nvml.NVMLError(tx.nvmlReturn or rx.nvmlReturn)
    return {"pcie_tx_bytes": tx.value.ullVal, "pcie_rx_bytes": rx.value.ullVal}


def _process_memory(nvml: Any, h: Any) -> dict[str, float]:
    pid = os.getpid()
    used = [p.usedGpuMemory or 0 for p in nvml.nvmlDeviceGetComputeRunningProcesses(h) if p.pid == pid]
    if not used:  # in a container NVML sees host PIDs
        raise nvml.NVMLError(nvml.NVML_ERROR_NOT_FOUND)
    return {"proc_mem_gib": sum(used) / GIB}


READERS: dict[str, tuple[Reader, bool]] = {
    "utilization": (_utilization, False),
    "memory": (_memory, False),
    "power": (lambda nvml, h: {"power_w": nvml.nvmlDeviceGetPowerUsage(h) / 1e3}, False),
    "temperature": (
        lambda nvml, h: {"temp_c": nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)},
        False,
    ),
    "clocks": (_clocks, False),
    "clock_events": (_clock_events, False),
    # ~3 ms (up to 17 ms) per read on an H100: on the slow cadence
    "energy": (lambda nvml, h: {"energy_mj": nvml.nvmlDeviceGetTotalEnergyConsumption(h)}, True),
    "violations": (_violations, True),  # ~0.6 ms
    "pcie": (_pcie, True),
    "process_memory": (_process_memory, True),
}


class NvmlSampler:
    """Reads NVML for some GPUs (by UUID) every ``interval_s`` in a daemon thread; ``drain`` aggregates.

    Each reader is probed once per GPU at start and dropped alone if NVML says it is not supported, not
    permitted or fails; a GPU that is lost stops being read and is reported once. Slow readers run every
    ``slow_interval_s``.
    """

    def __init__(self, nvml: Any, uuids: list[str], interval_s: float, slow_interval_s: float) -> None:
        self.nvml, self.uuids = nvml, uuids
        self.interval_s, self.slow_interval_s = interval_s, slow_interval_s
        self.gpus: list[_Gpu] = []
        self._opened = False
        self.thread_cpu_s = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="t240dist-nvml", daemon=True)

    def start(self) -> str | None:
        """Open NVML, map the UUIDs to handles, probe every reader, start sampling; or say why not."""
        try:
            self.nvml.nvmlInit()
        except self.nvml.NVMLError as err:
            return f"NVML cannot start ({_why(err)})"
        self._opened = True
        for uuid in self.uuids:
            try:
                handle = self.nvml.nvmlDeviceGetHandleByUUID(uuid)
                self.gpus.append(_Gpu(uuid, handle, _text(self.nvml.nvmlDeviceGetName(handle))))
            except self.nvml.NVMLError as err:
                log.warning("GPU telemetry: NVML has no GPU %s (%s) — it is not monitored", uuid, _why(err))
        for gpu in self.gpus:
            self._probe(gpu)
        self._thread.start()
        return None

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=1.0)
        if self._thread.is_alive():  # inside a slow NVML call: leave the daemon thread, keep NVML open
            log.warning("GPU telemetry: the NVML sampler did not stop within 1 s — leaving it behind")
        elif self._opened:
            self._opened = False
            with contextlib.suppress(self.nvml.NVMLError):
                self.nvml.nvmlShutdown()

    def drain(self) -> dict[str, dict[str, Any]]:
        """Each GPU's window since the previous drain: means, peaks, counter rates; then a new window."""
        with self._lock:
            return {gpu.uuid: gpu.drain() for gpu in self.gpus}

    def _probe(self, gpu: _Gpu) -> None:
        mig = getattr(self.nvml, "nvmlDeviceIsMigDeviceHandle", None)
        is_mig = False
        if mig is not None:
            with contextlib.suppress(self.nvml.NVMLError):
                is_mig = bool(mig(gpu.handle))
        for name, (reader, slow) in READERS.items():
            try:
                gpu.record(reader(self.nvml, gpu.handle), time.monotonic())
                gpu.readers[name] = (reader, slow)
            except self.nvml.NVMLError as err:
                gpu.missing[name] = "MIG instance" if is_mig else _why(err)
        gpm = GpmActivity.probe(self.nvml, gpu.handle)
        if isinstance(gpm, str):
            gpu.missing["gpm"] = "MIG instance" if is_mig else gpm
        else:
            gpu.readers["gpm"] = (gpm.read, True)
        gpu.reset_window()

    def _run(self) -> None:
        last_slow = time.monotonic()
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            slow = now - last_slow >= self.slow_interval_s
            last_slow = now if slow else last_slow
            for gpu in self.gpus:
                if gpu.lost:
                    continue
                readings, failed = self._read(gpu, slow)
                with self._lock:  # drain reads the readers and takes the news: change them under the lock
                    gpu.record(readings, now)
                    gpu.fail(failed)
            self.thread_cpu_s = time.thread_time()

    def _read(self, gpu: _Gpu, slow: bool) -> tuple[dict[str, float], dict[str, str | None]]:
        """One round of this GPU's readers (slow ones too if ``slow``): the readings, and the readers that
        failed with the reason (None: the GPU is lost)."""
        readings: dict[str, float] = {}
        failed: dict[str, str | None] = {}
        for name, (reader, is_slow) in list(gpu.readers.items()):
            if is_slow and not slow:
                continue
            try:
                readings.update(reader(self.nvml, gpu.handle))
            except self.nvml.NVMLError as err:
                lost = getattr(err, "value", None) == self.nvml.NVML_ERROR_GPU_IS_LOST
                failed[name] = None if lost else _why(err)
                if lost:
                    break
        return readings, failed


@dataclass
class _Gpu:
    """One GPU's handle, readers and the aggregates of the current window."""

    uuid: str
    handle: Any
    name: str
    readers: dict[str, tuple[Reader, bool]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    news: list[str] = field(default_factory=list)
    lost: bool = False
    reported: bool = False
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    peaks: dict[str, float] = field(default_factory=dict)
    constants: dict[str, float] = field(default_factory=dict)
    counters: dict[str, tuple[float, float]] = field(default_factory=dict)  # latest (time, value)
    first: dict[str, float] = field(default_factory=dict)  # counter values at the start of the run
    window_start: dict[str, tuple[float, float]] = field(default_factory=dict)

    def record(self, readings: dict[str, float], now: float) -> None:
        for name, value in readings.items():
            if name in COUNTERS:
                self.counters[name] = (now, float(value))
                self.first.setdefault(name, float(value))
                self.window_start.setdefault(name, (now, float(value)))
                continue
            if name in CONSTANTS:
                self.constants[name] = value
                continue
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0) + 1
            if name in PEAKS:
                self.peaks[name] = max(value, self.peaks.get(name, value))

    def fail(self, failed: dict[str, str | None]) -> None:
        """Drop the readers that failed (all of them, once the GPU is lost), with news of it."""
        for name, why in failed.items():
            if why is None:
                self.lost = True
                self.news.append("lost (NVML: GPU is lost) — it is no longer monitored")
            else:
                del self.readers[name]
                self.news.append(f"metric {name} failed ({why}) — dropped, the others go on")

    def reset_window(self) -> None:
        self.sums, self.counts, self.peaks = {}, {}, {}
        self.window_start = dict(self.counters)

    def drain(self) -> dict[str, Any]:
        values = {name: self.sums[name] / self.counts[name] for name in self.sums}
        energy_delta, energy_w = 0.0, None
        for name, (t1, v1) in self.counters.items():
            t0, v0 = self.window_start.get(name, (t1, v1))
            dt = max(t1 - t0, 1e-9)
            if name == "energy_mj":
                values["energy_j"] = (v1 - self.first[name]) / 1e3
                energy_delta = (v1 - v0) / 1e3
                if t1 > t0:
                    energy_w = energy_delta / dt
                    values.setdefault("power_w", energy_w)
            elif name.endswith("violation_ns") and t1 > t0:
                values[f"throttle_{name.removesuffix('_violation_ns')}_pct"] = 100 * (v1 - v0) / 1e9 / dt
            elif name.startswith("pcie") and t1 > t0:
                values[f"{name.removesuffix('_bytes')}_mib_s"] = (v1 - v0) / 2**20 / dt
        window = {
            "uuid": self.uuid,
            "name": self.name,
            "values": values,
            "peaks": dict(self.peaks),
            "energy_delta_j": energy_delta,
            "energy_w": energy_w,  # the energy counter's rate over its reads in the window; None: no new read
            "news": self.news,
            "available": None if self.reported else sorted(self.readers),
            "missing": self.missing,
            "constants": self.constants,
        }
        self.reported, self.news = True, []
        self.reset_window()
        return window


class GpmActivity:
    """SM and tensor-core activity from GPM (Hopper and newer): a metric between two GPM samples."""

    def __init__(self, nvml: Any, handle: Any) -> None:
        self.nvml, self.handle = nvml, handle
        self.samples = [nvml.nvmlGpmSampleAlloc(), nvml.nvmlGpmSampleAlloc()]
        nvml.nvmlGpmSampleGet(handle, self.samples[0])

    @classmethod
    def probe(cls, nvml: Any, handle: Any) -> GpmActivity | str:
        """A reader if this GPU supports GPM, else the reason it does not."""
        try:
            if not nvml.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice:
                return "NotSupported (GPM needs Hopper or newer)"
            return cls(nvml, handle)
        except (nvml.NVMLError, AttributeError) as err:
            return _why(err) if isinstance(err, nvml.NVMLError) else "NotSupported (NVML too old)"

    def read(self, nvml: Any, handle: Any) -> dict[str, float]:
        previous, current = self.samples
        nvml.nvmlGpmSampleGet(handle, current)
        request = nvml.c_nvmlGpmMetricsGet_t()
        request.version = nvml.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = 2
        request.sample1, request.sample2 = previous, current
        request.metrics[0].metricId = nvml.NVML_GPM_METRIC_SM_UTIL
        request.metrics[1].metricId = nvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL
        nvml.nvmlGpmMetricsGet(request)
        self.samples = [current, previous]
        return {"sm_active_pct": request.metrics[0].value, "tensor_active_pct": request.metrics[1].value}


def dashboard_layout(readers: set[str]) -> dict[str, dict[str, list[Any]]]:
    """TensorBoard custom-scalars layout: one chart per GPU metric that ``readers`` measure, across all
    GPUs, beside training."""
    return {
        "training": {
            "loss": ["Multiline", [r"^train/loss$", r"^val/loss$"]],
            "accuracy": ["Multiline", [r"^train/acc$", r"^val/acc$"]],
            "images/s": ["Multiline", [r"^perf/images_per_s$"]],
            "energy per image J": ["Multiline", [r"^perf/energy_per_image_j$"]],
        },
        "GPUs": {
            title: ["Multiline", [rf"^gpu/{name}/"]]
            for name, (title, reader) in CHARTS.items()
            if reader in readers
        },
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _why(err: Exception) -> str:
    """NVML's error as people read it: NotSupported, NoPermission, GpuIsLost, LibraryNotFound, ..."""
    name = type(err).__name__.removeprefix("NVMLError_")
    return name if name != "NVMLError" else str(err)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
