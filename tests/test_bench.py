"""The benchmarks' reports on CPU (training and batch inference): both loops run on the same batches; no
timing is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY, run_cli

from t240dist.bench import PLAIN, SINGLE, run_bench, run_predict_bench
from t240dist.config import compose_config


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
