"""A dying rank: the others stop within a minute with one line naming it; torchrun restarts and resumes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, process_tree, wait_for_checkpoint

from t240dist.checkpoint import KEY_ENV
from t240dist.errors import EXIT_PREEMPTED, EXIT_RANK_DIED

DDP = [*TINY, "data.train_size=512", "trainer=ddp", "trainer.accelerator=cpu", "checkpoint.every_n_steps=1"]


def _gone(pid: int, within_s: float) -> bool:
    """Whether process ``pid`` has ended (or is a zombie) within ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


def _two_ranks_training(tmp_path: Path, reap: list[subprocess.Popen]) -> tuple[subprocess.Popen, int, Path]:
    """A long 2-rank CPU run, once it has saved a step: rank 0's process (rank 1 shares its stderr pipe),
    rank 1's pid and the run dir."""
    run_dir = tmp_path / "run"
    args = [*DDP, "trainer.max_epochs=1000", f"hydra.run.dir={run_dir}"]
    rank0 = subprocess.Popen(
        [sys.executable, "-m", "train", *args],
        cwd=tmp_path,
        env={**os.environ, KEY_ENV: "test-key"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    reap.append(rank0)
    wait_for_checkpoint(run_dir / "checkpoints" / "recovery-*.ckpt", min_step=1)
    [rank1] = [pid for pid, env in process_tree(rank0.pid).items() if env.get("LOCAL_RANK") == "1"]
    return rank0, rank1, run_dir


@pytest.mark.parametrize(("victim", "how"), [(1, "was killed by SIGKILL"), (0, "is gone")])
def test_a_killed_rank_stops_the_other_within_a_minute_with_one_line(
    tmp_path: Path, reap: list[subprocess.Popen], victim: int, how: str
) -> None:
    rank0, rank1, _ = _two_ranks_training(tmp_path, reap)
    pids = {0: rank0.pid, 1: rank1}
    os.kill(pids[victim], signal.SIGKILL)

    stderr = rank0.communicate(timeout=60)[1]  # the end of the pipe: both ranks have ended
    assert _gone(pids[1 - victim], within_s=5)
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"RankDied: rank {victim} (pid {pids[victim]}) {how} — the job stops; "
        "rerun the same command to resume from the last checkpoint"
    )
    if victim == 1:
        assert rank0.returncode == EXIT_RANK_DIED


def test_sigterm_to_rank_1_alone_stops_both_after_one_save(
    tmp_path: Path, reap: list[subprocess.Popen]
) -> None:
    """The ranks agree on a signal that only one of them got (Lightning's own per-step SIGTERM broadcast,
    from rank 0 only, is off under t240dist's DDP): both stop after the same step, one checkpoint is
    saved, exit code 75."""
    rank0, rank1, run_dir = _two_ranks_training(tmp_path, reap)
    os.kill(rank1, signal.SIGTERM)

    stderr = rank0.communicate(timeout=60)[1]
    assert rank0.returncode == EXIT_PREEMPTED and _gone(rank1, within_s=5)
    assert "Traceback" not in stderr and "RankDied" not in stderr
    [saved] = (run_dir / "checkpoints").glob("preempted-step*.ckpt")
    assert stderr.strip().splitlines()[-1].startswith(f"Preempted: saved {saved} at step ")


def test_torchrun_restarts_after_a_killed_worker_and_resumes_from_the_last_checkpoint(
    tmp_path: Path, reap: list[subprocess.Popen]
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rdzv = ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=restart"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=1", *rdzv]
    agent = subprocess.Popen(
        [*cmd, "-m", "train", *DDP],
        cwd=tmp_path,
        env={**os.environ, KEY_ENV: "test-key", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},  # as torchrun.sh
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    reap.append(agent)
    run_dir = tmp_path / "outputs" / "torchrun" / "restart"
    wait_for_checkpoint(run_dir / "checkpoints" / "recovery-*.ckpt", min_step=3)
    [worker] = [pid for pid, env in process_tree(agent.pid).items() if env.get("RANK") == "1"]
    os.kill(worker, signal.SIGKILL)

    output = agent.communicate(timeout=300)[0]
    assert agent.returncode == 0, output[-3000:]
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert Path(summary["resumed_from"]).parent == run_dir / "checkpoints"
    assert summary["global_step"] == 2 * 512 // (32 * 2) and summary["world_size"] == 2
