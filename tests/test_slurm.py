"""SLURM without a cluster: launch/slurm.sbatch under a stand-in srun, and hydra/launcher=submitit_local.

In both, a real signal preempts a 2-rank CPU job, the job requeues itself, and the requeued job ends
with the weights of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, process_tree, run_cli, wait_for_checkpoint
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from t240dist.checkpoint import KEY_ENV
from t240dist.config import CONF_PACKAGE, hydra_setup
from t240dist.errors import EXIT_PREEMPTED

REPO = Path(__file__).resolve().parents[1]
ARGS = [*TINY, "data.train_size=512", "trainer=ddp", "trainer.accelerator=cpu", "checkpoint.every_n_steps=1"]
KEY = {KEY_ENV: "test-key"}

# srun's part in the test: start the command as $SLURM_NTASKS_PER_NODE tasks of one node, each with
# SLURM's task variables, and exit with the highest exit code of the tasks.
SRUN = """#!/usr/bin/env bash
while [[ $1 == -* ]]; do shift; done
pids=()
for ((task = 0; task < SLURM_NTASKS_PER_NODE; task++)); do
    SLURM_PROCID=$task SLURM_LOCALID=$task SLURM_NODEID=0 SLURM_NNODES=1 \\
        SLURM_NTASKS=$SLURM_NTASKS_PER_NODE "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
    wait "$pid"; code=$?
    if ((code > status)); then status=$code; fi
done
exit $status
"""
SCONTROL = """#!/usr/bin/env bash
echo "$@" >> "$SCONTROL_LOG"
"""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The summary of the 2-rank run (ranks started by t240dist) that every requeued job must reproduce."""
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    done = run_cli([*ARGS, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent, **KEY)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((run_dir / "run_summary.json").read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sbatch_job_preempted_by_its_signal_requeues_itself_and_resumes_exactly(
    tmp_path: Path, reap: list[subprocess.Popen], uninterrupted: dict
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    job = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "t240dist", "SLURM_NODELIST": "127.0.0.1"}
    job |= {"SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NUM_NODES": "1"}
    env = {**os.environ, **KEY, **job, "SCONTROL_LOG": str(tmp_path / "scontrol")}
    env["PATH"] = f"{bin_dir}:{os.environ['PATH']}"

    def sbatch() -> subprocess.Popen:
        script = ["bash", str(REPO / "launch" / "slurm.sbatch"), *ARGS]
        process = subprocess.Popen(
            script,
            cwd=tmp_path,
            env={**env, "MASTER_PORT": str(_free_port())},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        reap.append(process)
        return process

    run_dir = tmp_path / "outputs" / "slurm" / "4242"
    first = sbatch()
    wait_for_checkpoint(run_dir / "checkpoints" / "recovery-*.ckpt", min_step=2)
    tasks = [pid for pid, task_env in process_tree(first.pid).items() if "SLURM_PROCID" in task_env]
    assert len(tasks) == 2
    for pid in tasks:  # SLURM signals every task of the job
        os.kill(pid, signal.SIGUSR1)
    output = first.communicate(timeout=120)[0]
    assert first.returncode == EXIT_PREEMPTED, output[-3000:]
    assert "slurm.sbatch: preempted after a checkpoint; requeueing job 4242" in output
    assert (tmp_path / "scontrol").read_text() == "requeue 4242\n"
    [saved] = (run_dir / "checkpoints").glob("preempted-step*.ckpt")

    requeued = sbatch()  # SLURM runs the same script again, with the same job id
    output = requeued.communicate(timeout=300)[0]
    assert requeued.returncode == 0, output[-3000:]
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["resumed_from"] == str(saved)
    assert [r["rank"] for r in summary["ranks"]] == [0, 1]
    assert summary["model_fingerprint"] == uninterrupted["model_fingerprint"]
    assert list((tmp_path / "outputs").glob("*/*")) == [run_dir]  # both tasks, both times: one run dir
    assert output.count("run summary") == 1  # rank 0 reports


@pytest.mark.slow
def test_submitit_job_preempted_by_its_signal_requeues_itself_and_resumes_exactly(
    tmp_path: Path, reap: list[subprocess.Popen], uninterrupted: dict
) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=submitit_local", *ARGS, f"hydra.sweep.dir={sweep}"]
    hydra = subprocess.Popen(
        [sys.executable, "-m", "train", *args],
        cwd=tmp_path,
        env={**os.environ, **KEY},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    reap.append(hydra)
    run_dir = sweep / "0"
    wait_for_checkpoint(run_dir / "checkpoints" / "recovery-*.ckpt", min_step=2)
    tree = process_tree(hydra.pid)  # hydra -> submitit's controller -> its task (the agent) -> 2 ranks
    task = next(
        pid
        for pid, env in tree.items()
        if "SUBMITIT_LOCAL_GLOBALID" in env and "TORCHELASTIC_RUN_ID" not in env
    )
    os.kill(task, signal.SIGUSR2)  # what submitit's scheduler sends before the time limit

    output = hydra.communicate(timeout=300)[0]
    assert hydra.returncode == 0, output[-3000:]
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert "Requeued job" in logs
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert "preempted-step" in summary["resumed_from"]
    assert summary["model_fingerprint"] == uninterrupted["model_fingerprint"]


def test_slurm_tasks_that_do_not_match_the_devices_stop_the_run_with_one_line(tmp_path: Path) -> None:
    task = {"SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "t240dist", "SLURM_PROCID": "0", "SLURM_NNODES": "1"}
    done = run_cli([*ARGS], cwd=tmp_path, SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", **task)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "ConfigError: trainer.devices=2 but SLURM runs 1 task(s) per node, one per rank — make them equal: "
        "--ntasks-per-node=2 (hydra.launcher.tasks_per_node) or trainer.devices=1"
    ]


def test_slurm_launcher_sizes_the_job_from_the_trainer() -> None:
    overrides = ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]
    hydra_setup()
    with initialize_config_module(config_module=CONF_PACKAGE, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 4, 4)
    assert launcher["signal_delay_s"] > 0 and launcher["max_num_timeout"] > 0


@pytest.mark.slow
def test_one_process_submitit_job_signalled_in_its_test_requeues_and_its_rerun_tests(tmp_path: Path) -> None:
    """A one-device trial under submitit (no agent: t240dist's handler displaced submitit's in the process
    that trains) gets submitit's signal once training is saved, during the final test: the job is requeued,
    as a signal during training requeues it, and the requeued job trains nothing and tests."""
    sweep = tmp_path / "sweep"
    args = [*TINY, "trainer.max_epochs=1", "data.test_size=20000", "monitor=off", f"hydra.sweep.dir={sweep}"]
    hydra = subprocess.Popen(
        [sys.executable, "-m", "train", "-m", "hydra/launcher=submitit_local", *args],
        cwd=tmp_path,
        env={**os.environ, **KEY},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log = sweep / "0" / "train.log"
        deadline = time.monotonic() + 240
        while not (log.exists() and "`Trainer.fit` stopped" in log.read_text()):
            assert time.monotonic() < deadline and hydra.poll() is None, "the job never reached its test"
            time.sleep(0.01)
        [task] = [pid for pid, env in process_tree(hydra.pid).items() if "SUBMITIT_LOCAL_GLOBALID" in env]
        os.kill(task, signal.SIGUSR2)  # what submitit's scheduler sends before the time limit
        output = hydra.communicate(timeout=300)[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(hydra.pid, signal.SIGKILL)
    assert hydra.returncode == 0, output[-3000:]
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert "Requeued job" in logs, logs[-3000:]
    assert "this run already finished: 1 epoch(s)" in logs
    summary = json.loads((sweep / "0" / "run_summary.json").read_text())
    assert summary["test_acc"] is not None and summary["epochs"] == 1
