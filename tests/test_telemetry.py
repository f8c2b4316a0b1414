"""GPU telemetry on CPU: a fake NVML behind pynvml's interface drives the real sampler, the real
2-rank gloo job, the real event files and a real TensorBoard server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import fake_nvml
import pytest
from conftest import TINY, run_cli, scalars
from test_loggers import assert_same_points, csv_points, mlflow_run

from t240dist.report import COMPARED
from t240dist.telemetry import PEAKS, NvmlSampler

TESTS = Path(__file__).parent
GPUS = [{"uuid": f"GPU-{letter}", "name": f"Fake H100 {letter}"} for letter in "abc"]


def _spec(monkeypatch: pytest.MonkeyPatch, **spec: object) -> None:
    monkeypatch.setattr(fake_nvml, "SPEC", {"gpus": GPUS, **spec})


def _sample(uuids: list[str], seconds: float = 0.3) -> tuple[NvmlSampler, dict]:
    sampler = NvmlSampler(fake_nvml, uuids, interval_s=0.01, slow_interval_s=0.03)
    assert sampler.start() is None
    time.sleep(seconds)
    window = sampler.drain()
    return sampler, window


def test_gpus_are_found_by_uuid_whatever_the_order(monkeypatch: pytest.MonkeyPatch) -> None:
    _spec(monkeypatch)
    sampler, window = _sample(["GPU-c", "GPU-a"])
    sampler.stop()
    assert list(window) == ["GPU-c", "GPU-a"]
    c, a = window["GPU-c"]["values"], window["GPU-a"]["values"]
    assert (c["temp_c"], c["util_pct"], c["mem_used_gib"], c["power_w"]) == (42, 52, 3, 120)
    assert (a["temp_c"], a["util_pct"], a["mem_used_gib"], a["power_w"]) == (40, 50, 1, 100)
    assert a["proc_mem_gib"] == 0.5 and a["sm_clock_mhz"] == 1980 and a["throttled_pct"] == 0
    assert 0 < a["energy_j"] < 100 * 0.5  # 100 W for at most the time since NVML started
    assert 0.5 < a["pcie_tx_mib_s"] < 1.5 and 1.5 < a["pcie_rx_mib_s"] < 2.5
    assert window["GPU-a"]["available"][:3] == ["clock_events", "clocks", "energy"]
    assert window["GPU-a"]["missing"] == {"gpm": "NotSupported (GPM needs Hopper or newer)"}


@pytest.mark.parametrize(
    ("visible", "expected"), [(["2", "0"], ["GPU-c", "GPU-a"]), (["GPU-b", "GPU-c"], ["GPU-b", "GPU-c"])]
)
def test_each_rank_maps_its_cuda_device_to_its_gpu(
    monkeypatch: pytest.MonkeyPatch, visible: list[str], expected: list[str]
) -> None:
    from t240dist.telemetry import job_gpu_uuids

    _spec(monkeypatch, visible=visible)
    found = []
    for local_rank in range(2):
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        found += job_gpu_uuids(fake_nvml, device=None)
    assert found == expected


def test_unsupported_and_forbidden_metrics_are_dropped_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = {
        **GPUS[0],
        "unsupported": ["nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetFieldValues"],
        "no_permission": ["nvmlDeviceGetComputeRunningProcesses"],
    }
    monkeypatch.setattr(fake_nvml, "SPEC", {"gpus": [gpu]})
    sampler, window = _sample(["GPU-a"])
    sampler.stop()
    report = window["GPU-a"]
    assert report["missing"] == {
        "energy": "NotSupported",
        "pcie": "NotSupported",
        "process_memory": "NoPermission",
        "gpm": "NotSupported (GPM needs Hopper or newer)",
    }
    assert {"util_pct", "power_w", "temp_c", "throttle_power_pct"} <= set(report["values"])
    assert not {"energy_j", "pcie_tx_mib_s", "proc_mem_gib"} & set(report["values"])


def test_a_lost_gpu_is_reported_once_and_the_others_go_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fake_nvml, "SPEC", {"gpus": [{**GPUS[0], "lost_after_s": 0.1}, GPUS[1]]})
    sampler, first = _sample(["GPU-a", "GPU-b"])
    time.sleep(0.1)
    second = sampler.drain()
    sampler.stop()
    assert first["GPU-a"]["news"] == ["lost (NVML: GPU is lost) — it is no longer monitored"]
    assert second["GPU-a"]["news"] == []
    assert set(second["GPU-a"]["values"]) == {"energy_j"}  # no new readings, its energy until it was lost
    assert second["GPU-b"]["values"]["temp_c"] == 41


def _fake_env(**spec: object) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return {"FAKE_NVML": json.dumps({"gpus": GPUS, **spec}), "PYTHONPATH": path}


FAKE = ["monitor.library=fake_nvml", "monitor.interval_s=0.02", "monitor.slow_interval_s=0.05"]


def test_without_the_nvml_library_one_warning_and_training_goes_on(tmp_path: Path) -> None:
    done = run_cli(
        [*TINY, *FAKE, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        **_fake_env(visible=["0"], library_missing=True),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    output = done.stdout + done.stderr  # Hydra's job logging prints warnings to stdout (and train.log)
    assert output.count("GPU telemetry off") == 1
    assert "GPU telemetry off: NVML cannot start (LibraryNotFound) — training goes on without it" in output
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["energy_j"] is None and summary["test_acc"] >= 0


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """A 2-rank gloo job whose ranks compute on fake GPUs 2 and 0 of three; GPU 2 runs slow clocks. It logs
    to TensorBoard, CSV and MLflow (a folder store beside the run dir)."""
    tmp = tmp_path_factory.mktemp("telemetry")
    gpus = [GPUS[0], GPUS[1], {**GPUS[2], "sm_clock_mhz": 1500}]
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.max_epochs=3"]
    loggers = ["logger=[tensorboard,csv,mlflow]", f"logger.mlflow.tracking_uri=file:{tmp / 'mlruns'}"]
    done = run_cli(
        [*TINY, *FAKE, *ddp, *loggers, f"hydra.run.dir={tmp / 'run'}"],
        cwd=tmp,
        **{**_fake_env(visible=["2", "0"]), "FAKE_NVML": json.dumps({"gpus": gpus, "visible": ["2", "0"]})},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "run", done


@pytest.mark.slow
def test_two_ranks_write_each_gpu_once_on_the_step_axis(
    two_rank_run: tuple[Path, subprocess.CompletedProcess],
) -> None:
    run_dir, done = two_rank_run
    tags = scalars(run_dir)
    gpu_tags = {t for t in tags if t.startswith("gpu/temp_c/")}
    assert gpu_tags == {"gpu/temp_c/rank0", "gpu/temp_c/rank1"}
    assert {v for _, v in tags["gpu/temp_c/rank0"]} == {42} and {v for _, v in tags["gpu/temp_c/rank1"]} == {
        40
    }
    assert {v for _, v in tags["gpus/temp_c/min"]} == {40} and {v for _, v in tags["gpus/temp_c/max"]} == {42}
    assert {v for _, v in tags["gpus/slowest_rank"]} == {0}  # rank 0 computes on the slow-clocked GPU
    # no constant series and no peak of a 0/100 flag: the GPU section holds what changes and means something
    assert not [t for t in tags if "mem_total" in t]
    peaks = {t.split("/")[1].removesuffix(".max") for t in tags if ".max/" in t}
    assert peaks == PEAKS and {"throttled_pct", "sm_clock_mhz"}.isdisjoint(peaks)
    steps = [s for s, _ in tags["gpu/util_pct/rank0"]]
    assert steps == sorted(steps) and max(steps) <= max(s for s, _ in tags["train/loss"])
    assert all(v > 0 for _, v in tags["perf/energy_per_image_j"])
    assert done.stdout.count("GPU rank0 is a straggler: SM clock 1500 MHz vs 1980 MHz") == 1
    assert len(re.findall(r"GPU telemetry rank\d Fake H100 . \(GPU-.(, 80 GiB)\): ", done.stdout)) == 2
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["energy_j"] > 0 and summary["energy_per_image_j"] > 0
    assert summary["gpu_util_mean"] == pytest.approx(51) and summary["gpu_mem_peak_gib"] == 3
    assert 0 < summary["telemetry_host_s"] < summary["train_s"] and summary["telemetry_thread_cpu_s"] > 0


@pytest.mark.slow
def test_csv_and_mlflow_receive_the_gpu_series_that_tensorboard_does(
    two_rank_run: tuple[Path, subprocess.CompletedProcess],
) -> None:
    run_dir, _ = two_rank_run
    telemetry = ("gpu/", "gpus/", "perf/")
    board = {tag: points for tag, points in scalars(run_dir).items() if tag.startswith(telemetry)}
    expected = {"gpu/temp_c/rank1", "gpu/util_pct.max/rank0", "gpus/temp_c/min", "gpus/slowest_rank"}
    assert expected <= set(board) and "perf/energy_per_image_j" in board
    table = {tag: points for tag, points in csv_points(run_dir).items() if tag.startswith(telemetry)}
    _, history = mlflow_run(f"file:{run_dir.parent / 'mlruns'}", run_dir)
    assert_same_points(table, board, tensorboard=True)
    assert_same_points({tag: points for tag, points in history.items() if tag.startswith(telemetry)}, table)


@pytest.mark.slow
def test_a_tensorboard_server_serves_the_gpu_dashboard_and_training_curves(
    two_rank_run: tuple[Path, subprocess.CompletedProcess],
) -> None:
    run_dir, _ = two_rank_run
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(run_dir),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = _served_at(server)
        tags = _get(f"{url}/data/plugin/scalars/tags")["."]
        assert {"train/loss", "val/acc", "gpu/util_pct/rank0", "gpu/power_w/rank1"} <= set(tags)
        points = _get(f"{url}/data/plugin/scalars/scalars?run=.&tag=gpu/temp_c/rank1")
        assert points and {p[2] for p in points} == {40}
        layout = _get(f"{url}/data/plugin/custom_scalars/layout")
        charts = {c["title"]: c for cat in layout["category"] for c in cat["chart"]}
        assert charts["GPU utilization %"]["multiline"]["tag"] == ["^gpu/util_pct/"]
        assert "loss" in charts and "power W" in charts
        assert "SM activity % (GPM)" not in charts  # the fake GPUs have no GPM: no empty chart
        # the GPUs' constants once, as text; the HParams tab opens on the keys people compare
        about = _get(f"{url}/data/plugin/text/text?run=.&tag=gpus/text_summary")
        assert "80 GiB" in about[0]["text"]
        request = urllib.parse.quote(json.dumps({"experimentName": ""}))
        experiment = _get(f"{url}/data/plugin/hparams/experiment?request={request}")
        shown = [h["name"] for h in experiment["hparamInfos"][:5]]  # the columns the tab opens on
        assert shown == sorted(COMPARED) and all(h["differs"] for h in experiment["hparamInfos"][:5])
        assert not any(h["differs"] for h in experiment["hparamInfos"][5:])
        assert [m["name"]["tag"] for m in experiment["metricInfos"]][:2] == ["test/acc", "test/loss"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def _served_at(server: subprocess.Popen) -> str:
    """The address TensorBoard prints once it listens (it picks a free port for --port 0)."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = server.stdout.readline()
        found = re.search(r"(http://127\.0\.0\.1:\d+)", line)
        if found:
            return found.group(1)
    raise AssertionError("TensorBoard did not start")


def _get(url: str) -> object:
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.loads(response.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
