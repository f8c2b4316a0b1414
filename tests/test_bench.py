"""The benchmarks' reports on CPU (training and batch inference): both loops run on the same batches; no
timing is asserted."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from conftest import TINY, run_cli
from datasets_on_disk import write_cifar, write_image_tree

from t240dist.bench import PLAIN, SINGLE, run_bench, run_predict_bench
from t240dist.config import compose_config
from t240dist.data import ImageDataModule
from t240dist.data_bench import _verdict, _workers_to_feed
from t240dist.whole_job_bench import write_class_coloured_cifar


def test_bench_times_both_loops_and_writes_bench_json(tmp_path: Path) -> None:
    overrides = [
        *TINY,
        "bench.warmup_steps=2",
        "bench.steps=3",
        "bench.repeats=2",
        "bench.distinct_batches=2",
    ]
    result = run_bench(compose_config(overrides, config_name="bench"), tmp_path)
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(result))
    assert result["device"] == "cpu" and result["model"] == "small_cnn" and result["batch_size"] == 32
    loops = result["loops"]
    assert set(loops) == {"hand-written", "t240dist", PLAIN}
    assert loops["hand-written"]["ratio_to_hand_written"] == 1.0
    assert loops[PLAIN]["ratio_to_same_hand_written"] == loops[PLAIN]["ratio_to_hand_written"]
    for row in loops.values():
        assert len(row["repeats_ms"]) == 2 and all(ms > 0 for ms in row["repeats_ms"])
        assert row["images_per_s"] == pytest.approx(32e3 / row["ms_per_step"])


def test_predict_bench_times_both_inference_loops_and_writes_bench_json(tmp_path: Path) -> None:
    overrides = [
        *TINY,
        "bench.task=predict",
        "bench.top_k=3",
        "bench.warmup_steps=1",
        "bench.steps=3",
        "bench.repeats=2",
        "bench.distinct_batches=2",
        "model.channels_last=true",
    ]
    result = run_predict_bench(compose_config(overrides, config_name="bench"), tmp_path)
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(result))
    assert result["task"] == "predict" and result["device"] == "cpu" and result["top_k"] == 3
    assert result["batch_size"] == 32 and result["image_size"] == 8 and result["channels_last"] is True
    loops = result["loops"]
    assert set(loops) == {"hand-written", "t240dist"}
    assert loops["hand-written"]["ratio_to_hand_written"] == 1.0
    for row in loops.values():
        assert len(row["repeats_ms"]) == 2 and all(ms > 0 for ms in row["repeats_ms"])
        assert row["images_per_s"] == pytest.approx(32e3 / row["ms_per_step"])


@pytest.mark.slow
def test_ddp_bench_times_ddp_loops_and_their_scaling(tmp_path: Path) -> None:
    """Two gloo ranks started through the elastic agent, as training's are: the hand-written DDP loop and
    t240dist's DDP path, each against the hand-written loop alone on one device (the scaling baseline),
    reported by rank 0 only."""
    overrides = [
        *TINY,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "bench.warmup_steps=2",
        "bench.steps=3",
        "bench.repeats=1",
        "bench.distinct_batches=2",
        f"hydra.run.dir={tmp_path}",
    ]
    done = run_cli(overrides, cwd=tmp_path, entry="train.bench")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["world_size"] == 2 and result["batch_size"] == 32
    loops = result["loops"]
    assert set(loops) == {"hand-written", "t240dist", PLAIN, SINGLE}
    single = loops[SINGLE]["images_per_s"]
    for name in ("hand-written", "t240dist", PLAIN):
        assert loops[name]["images_per_s"] == pytest.approx(2 * 32e3 / loops[name]["ms_per_step"])
        assert loops[name]["scaling"] == pytest.approx(loops[name]["images_per_s"] / (2 * single))
    assert loops[SINGLE]["images_per_s"] == pytest.approx(32e3 / loops[SINGLE]["ms_per_step"])
    assert loops[SINGLE]["ratio_to_hand_written"] is None and loops[SINGLE]["scaling"] is None
    assert done.stdout.count("scaling") == 1  # one table, from rank 0


@pytest.mark.slow
def test_job_bench_times_both_whole_jobs_as_processes_and_reports_their_phases(tmp_path: Path) -> None:
    """t240dist's real ``python -m train`` and the hand-written whole-job script, each a process of its own,
    on the same CIFAR-format data (torchvision's ResNet-18 stem keeps it small on a CPU)."""
    root = tmp_path / "cifar"
    root.mkdir()
    write_cifar(root, per_batch=20)
    overrides = [
        "experiment=cifar10_resnet18",
        "model.cifar_stem=false",
        f"data.root={root}",
        "data.batch_size=32",
        "trainer.max_epochs=1",
        "bench.task=job",
        "bench.repeats=1",
        "bench.job_variants=['monitor=off']",
        f"hydra.run.dir={tmp_path / 'bench'}",
    ]
    done = run_cli(overrides, cwd=tmp_path, entry="train.bench")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert result["task"] == "job" and result["epochs"] == 1 and result["repeats"] == 1
    for side in ("hand-written", "t240dist", "t240dist monitor=off"):  # each side said as it starts
        assert f"bench.task=job: repeat 1 of 1, {side} (" in done.stdout
    assert set(result["sides"]) == {"hand-written", "t240dist", "t240dist monitor=off"}
    assert not any(o.startswith(("bench.", "hydra.run.")) for o in result["overrides"])
    for name, row in result["sides"].items():
        [run] = result["runs"][name]
        assert 0 < run["to_first_step_s"] < run["wall_s"], name
        assert run["train_images_per_s"] > 0 and run["test_acc"] >= 0, name
        assert all(run[k] > 0 for k in ("validation_s", "checkpoint_s", "test_s", "exit_s")), name
        assert run["to_first_step_s"] + run["exit_s"] < run["wall_s"], name
        assert run["gpu_util_mean"] is None  # no GPU here
        assert row["wall_s"] == run["wall_s"]
        ratio = result["ratios"][name]
        assert ratio["wall"] == pytest.approx(run["wall_s"] / result["sides"]["hand-written"]["wall_s"])
    assert result["ratios"]["hand-written"]["train_images_per_s"] == 1.0
    # each t240dist side is a real run of the benchmark's own overrides, in a run dir of its own
    summary = json.loads((tmp_path / "bench" / "t240dist-0" / "run_summary.json").read_text())
    assert summary["model"] == "resnet18" and summary["epochs"] == 1 and summary["data"] == "cifar10"
    assert "whole job" in done.stdout


def test_job_bench_refuses_what_the_hand_written_job_cannot_mirror(tmp_path: Path) -> None:
    done = run_cli(["bench.task=job", "module.mixup_alpha=0.2"], cwd=tmp_path, entry="train.bench")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "ConfigError: bench.task=job: the hand-written job has no data.name=digits — use one of cifar10 "
        "(experiment=cifar10_resnet18 is the preset it mirrors)"
    )


def test_made_cifar_data_loads_as_cifar_10_with_every_class(tmp_path: Path) -> None:
    write_class_coloured_cifar(tmp_path, seed=0, train=500, test=100)
    data = ImageDataModule(compose_config(["data=cifar10", f"data.root={tmp_path}"])["data"], seed=0)
    assert data.info.train_size == 450 and data.info.num_classes == 10
    assert set(data.test_set.labels.tolist()) == set(range(10))


@pytest.mark.parametrize(
    ("rates", "needed"),
    [
        ({1: 307, 8: 1800, 16: 1895}, 40),  # Pillow workers on the H200's host: none fed it; 16 at 118 each
        ({8: 6897, 16: 6207}, 8),  # GPU decoding: 8 reading workers fed it already
        ({0: 5000, 2: 9000}, 0),  # the main process alone
    ],
)
def test_workers_to_feed_is_the_fewest_measured_that_fed_else_the_slowest_rate_extrapolated(
    rates: dict[int, float], needed: int
) -> None:
    rows = {
        str(w): {"images_per_s": r, "images_per_s_per_worker": r / w if w else None} for w, r in rates.items()
    }
    assert _workers_to_feed(rows, 4697) == needed and _workers_to_feed(rows, None) is None


def test_data_bench_times_the_runs_own_training_loader_for_each_worker_count(tmp_path: Path) -> None:
    write_image_tree(tmp_path / "tree", per_class=12)  # 24 training JPEG/PNG files: 6 batches of 4
    data = ["data=imagefolder", f"data.root={tmp_path / 'tree'}", "data.image_size=16", "data.batch_size=4"]
    overrides = [
        "bench.task=data",
        *data,
        "bench.data_workers=[0,1]",
        "bench.warmup_steps=1",
        "bench.steps=3",
        "bench.repeats=2",
        "bench.feed_images_per_s=1000",
        f"hydra.run.dir={tmp_path / 'bench'}",
    ]
    done = run_cli(overrides, cwd=tmp_path, entry="train.bench")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert result["task"] == "data" and result["data"] == "imagefolder" and result["batch_size"] == 4
    assert set(result["workers"]) == {"0", "1"}
    for row in result["workers"].values():
        assert row["images_timed"] == 3 * 4  # bench.steps whole batches, after the warm-up batch
        assert len(row["repeats_images_per_s"]) == 2 and all(r > 0 for r in row["repeats_images_per_s"])
    # a worker starts 2 batches at once (DataLoader's prefetch_factor): neither is timed
    assert [result["workers"][w]["warmup_batches"] for w in ("0", "1")] == [1, 2]
    assert result["workers"]["0"]["images_per_s_per_worker"] is None  # decoded in the main process
    one = result["workers"]["1"]
    assert one["images_per_s_per_worker"] == one["images_per_s"]
    fed = [int(w) for w, row in result["workers"].items() if row["images_per_s"] >= 1000]
    # the fewest workers measured that fed it, else extrapolated from the one worker's rate
    assert result["workers_to_feed"] == (min(fed) if fed else math.ceil(1000 / one["images_per_s"]))
    assert f"to feed 1,000 img/s: {result['workers_to_feed']} workers — " in done.stdout
    assert result["cpus"] == len(os.sched_getaffinity(0)) and result["decode"] == "workers"  # auto on a CPU
    assert _verdict(result) in done.stdout
    assert f"wrote {tmp_path / 'bench' / 'bench.json'}" in done.stdout


@pytest.mark.parametrize(
    ("need", "cpus", "decode", "gpu", "verdict"),
    [
        (12, 16, "workers", True, "this machine has 16 CPUs: train with data.num_workers=12"),
        (
            25,
            16,
            "workers",
            True,
            "more than this machine's 16 CPUs leave beside training: decode on the GPU, data.decode=device",
        ),
        (
            13,
            2,
            "workers",
            False,
            "more than this machine's 2 CPUs leave beside training: time it on the GPU's machine",
        ),  # no GPU here: the feed rate is another machine's
        (16, 16, "device", True, "more than this machine's 16 CPUs leave beside training"),
    ],
)
def test_the_workers_needed_are_weighed_against_this_machines_cpus(
    need: int, cpus: int, decode: str, gpu: bool, verdict: str
) -> None:
    assert _verdict({"workers_to_feed": need, "cpus": cpus, "decode": decode, "gpu": gpu}) == verdict
