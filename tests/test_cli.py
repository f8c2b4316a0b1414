"""``python -m train`` as a user runs it: the embedded default and the run directories."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import NOISE, TINY, fits_80_columns, run_cli, scalars


def test_default_run_trains_digits_to_097_and_reports(tmp_path: Path) -> None:
    done = run_cli([f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, COLUMNS="80")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["test_acc"] >= 0.97 and summary["data"] == "digits" and summary["model"] == "small_cnn"
    assert summary["devices"] == ["cpu"]
    startup = summary["startup_s"]
    assert set(startup) == {"before_train", "imports", "data", "model_and_trainer", "first_step"}
    assert all(v > 0 for v in startup.values())  # before_train: from the interpreter's start to train()
    assert sum(startup.values()) - startup["before_train"] < summary["wall_s"]
    phases = summary["phases_s"]
    assert set(phases) == {"to_first_step", "validation", "input_wait", "checkpoints", "test"}
    assert all(v > 0 for v in phases.values()) and phases["input_wait"] < summary["train_s"]
    assert phases["to_first_step"] > sum(startup.values())  # from the process's start; fit's set-up too
    assert phases["validation"] + summary["train_s"] < summary["wall_s"]
    out = done.stdout + done.stderr
    assert "config" in out and "optim" in out and "lr: 0.1" in out  # the composed config tree
    assert "Epoch 19" in out  # the progress bar
    assert "run summary" in out and "test_acc" in out  # the final table
    assert {"train/loss", "val/acc", "test/acc"} <= scalars(tmp_path / "run").keys()
    assert (tmp_path / "run" / ".hydra" / "overrides.yaml").is_file()

    # quiet and readable: no noise; a table of 80 columns without empty rows or raw floats, paths whole
    assert [line for line in out.splitlines() if any(noise in line for noise in NOISE)] == []
    written = tmp_path / "run" / "run_summary.json"
    fits_80_columns(done.stdout, [summary["best_checkpoint"], f"wrote {written}"])
    assert not re.search(r"│ None +│", done.stdout) and "telemetry_host_s" not in done.stdout
    assert all(f"{key}={startup[key]:.4g}" in done.stdout for key in startup)  # not 4.869999999999891
    # the log file holds the run's log lines
    log = (tmp_path / "run" / "train.log").read_text()
    assert "starting fresh" in log and "model: 94.2 K parameters" in log and f"wrote {written}" in log


def test_two_runs_started_together_get_their_own_run_dirs(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "train", *TINY, "trainer.max_epochs=1"]
    runs = [
        subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    assert all(p.wait(timeout=300) == 0 for p in runs)
    dirs = sorted(p.parent for p in tmp_path.glob("outputs/*/*/run_summary.json"))
    assert len(dirs) == 2 and dirs[0] != dirs[1]
