"""A fake NVML with pynvml's interface, for machines without GPUs (``monitor.library=fake_nvml``).

Configured by the JSON in ``FAKE_NVML``: ``gpus`` (each ``uuid``, ``name`` and optionally
``unsupported``/``no_permission`` function names, ``lost_after_s``, ``sm_clock_mhz``, ``throttle_mask``),
``visible`` (what each local rank's CUDA device is: a GPU index or a UUID, like CUDA_VISIBLE_DEVICES
entries) and ``library_missing``. Readings are a function of the GPU's index so tests can tell GPUs apart:
temperature 40 + index °C, utilization 50 + index %, (index + 1) GiB used, 100 + 10 × index W.
"""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace
from typing import Any

from pynvml import (
    NVML_CLOCK_MEM,
    NVML_CLOCK_SM,
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_NOT_FOUND,
    NVML_FI_DEV_PCIE_COUNT_RX_BYTES,
    NVML_FI_DEV_PCIE_COUNT_TX_BYTES,
    NVML_PERF_POLICY_POWER,
    NVML_PERF_POLICY_THERMAL,
    NVML_TEMPERATURE_GPU,
    NVMLError,
    NVMLError_GpuIsLost,
    NVMLError_LibraryNotFound,
    NVMLError_NoPermission,
    NVMLError_NotFound,
    NVMLError_NotSupported,
    nvmlMemory_v2,
)

# pynvml's constants and errors that the monitor reads from its NVML module, re-exported
__all__ = [
    "NVML_CLOCK_MEM",
    "NVML_ERROR_GPU_IS_LOST",
    "NVML_ERROR_NOT_FOUND",
    "NVML_PERF_POLICY_POWER",
    "NVML_PERF_POLICY_THERMAL",
    "NVML_TEMPERATURE_GPU",
    "NVMLError",
    "nvmlMemory_v2",
]

SPEC: dict[str, Any] = json.loads(os.environ.get("FAKE_NVML", '{"gpus": []}'))
_started = 0.0


def fake_rank_gpus() -> list[str]:
    """The GPU this rank computes on: entry LOCAL_RANK of ``visible``, an index or a UUID."""
    entry = str(SPEC["visible"][int(os.environ.get("LOCAL_RANK", "0"))])
    return [SPEC["gpus"][int(entry)]["uuid"] if entry.isdigit() else entry]


def nvmlInit() -> None:
    global _started
    if SPEC.get("library_missing"):
        raise NVMLError_LibraryNotFound()
    _started = time.monotonic()


def nvmlShutdown() -> None:
    pass


def nvmlDeviceGetHandleByUUID(uuid: str) -> int:
    for index, gpu in enumerate(SPEC["gpus"]):
        if gpu["uuid"] == uuid:
            return index
    raise NVMLError_NotFound()


def _gpu(handle: int, function: str) -> dict[str, Any]:
    """The GPU's spec, after raising what the spec says this function raises now."""
    gpu = SPEC["gpus"][handle]
    if time.monotonic() - _started > gpu.get("lost_after_s", float("inf")):
        raise NVMLError_GpuIsLost()
    if function in gpu.get("unsupported", []):
        raise NVMLError_NotSupported()
    if function in gpu.get("no_permission", []):
        raise NVMLError_NoPermission()
    return gpu


def nvmlDeviceGetName(handle: int) -> str:
    return _gpu(handle, "nvmlDeviceGetName")["name"]


def nvmlDeviceGetUtilizationRates(handle: int) -> SimpleNamespace:
    _gpu(handle, "nvmlDeviceGetUtilizationRates")
    return SimpleNamespace(gpu=50 + handle, memory=20 + handle)


def nvmlDeviceGetMemoryInfo(handle: int, version: int | None = None) -> SimpleNamespace:
    _gpu(handle, "nvmlDeviceGetMemoryInfo")
    return SimpleNamespace(used=(handle + 1) * 2**30, total=80 * 2**30)


def nvmlDeviceGetPowerUsage(handle: int) -> int:
    _gpu(handle, "nvmlDeviceGetPowerUsage")
    return (100 + 10 * handle) * 1000


def nvmlDeviceGetTemperature(handle: int, sensor: int) -> int:
    _gpu(handle, "nvmlDeviceGetTemperature")
    return 40 + handle


def nvmlDeviceGetClockInfo(handle: int, clock: int) -> int:
    gpu = _gpu(handle, "nvmlDeviceGetClockInfo")
    return gpu.get("sm_clock_mhz", 1980) if clock == NVML_CLOCK_SM else 2619


def nvmlDeviceGetCurrentClocksEventReasons(handle: int) -> int:
    return _gpu(handle, "nvmlDeviceGetCurrentClocksEventReasons").get("throttle_mask", 0)


def nvmlDeviceGetTotalEnergyConsumption(handle: int) -> int:
    _gpu(handle, "nvmlDeviceGetTotalEnergyConsumption")
    return int(1e6 + (100 + 10 * handle) * 1000 * (time.monotonic() - _started))  # mJ at the fake power


def nvmlDeviceGetViolationStatus(handle: int, policy: int) -> SimpleNamespace:
    _gpu(handle, "nvmlDeviceGetViolationStatus")
    return SimpleNamespace(violationTime=0)


def nvmlDeviceGetFieldValues(handle: int, fields: list[int]) -> list[SimpleNamespace]:
    _gpu(handle, "nvmlDeviceGetFieldValues")
    elapsed = time.monotonic() - _started
    per_s = {NVML_FI_DEV_PCIE_COUNT_TX_BYTES: 2**20, NVML_FI_DEV_PCIE_COUNT_RX_BYTES: 2**21}
    return [
        SimpleNamespace(nvmlReturn=0, value=SimpleNamespace(ullVal=int(per_s[f] * elapsed))) for f in fields
    ]


def nvmlDeviceGetComputeRunningProcesses(handle: int) -> list[SimpleNamespace]:
    _gpu(handle, "nvmlDeviceGetComputeRunningProcesses")
    return [SimpleNamespace(pid=os.getpid(), usedGpuMemory=2**29)]


def nvmlGpmQueryDeviceSupport(handle: int) -> SimpleNamespace:
    _gpu(handle, "nvmlGpmQueryDeviceSupport")
    return SimpleNamespace(isSupportedDevice=0)
