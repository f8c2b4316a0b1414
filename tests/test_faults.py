"""A DDP job's ranks run under torch's elastic agent: a dying rank stops the job with one line naming it,
signals to the job save once and stop, nothing outlives the job, and a restart resumes bit-exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, compose, process_tree, start_run, wait_for_checkpoint
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler, ProcessFailure

from t240dist.agent import AGENT_PID, _first
from t240dist.errors import (
    EXIT_INTERRUPTED,
    EXIT_PREEMPTED,
    EXIT_RANK_DIED,
    PREEMPTING,
    Preempted,
    preempted_by_signals,
)
from t240dist.run import train

DDP = [*TINY, "data.train_size=512", "trainer=ddp", "trainer.accelerator=cpu", "checkpoint.every_n_steps=1"]


def _job(tmp_path: Path, reap: list[subprocess.Popen], *args: str) -> tuple[subprocess.Popen, Path]:
    """``python -m train`` of a 2-rank CPU job, in a session of its own, and its run dir."""
    run_dir = tmp_path / "run"
    return start_run([*DDP, *args], run_dir, reap), run_dir


def _training(tmp_path: Path, reap: list[subprocess.Popen]) -> tuple[subprocess.Popen, dict[int, int], Path]:
    """A long 2-rank job once it has saved a step: the composing process, its ranks' pids by rank, the
    run dir."""
    job, run_dir = _job(tmp_path, reap, "trainer.max_epochs=1000")
    wait_for_checkpoint(run_dir / "checkpoints" / "recovery-*.ckpt", min_step=1)
    ranks = {int(env["RANK"]): pid for pid, env in process_tree(job.pid).items() if "RANK" in env}
    assert sorted(ranks) == [0, 1] and job.pid not in ranks.values()  # the composing process is no rank
    return job, ranks, run_dir


def _nothing_left(job: subprocess.Popen) -> bool:
    """Whether the job's whole session has ended (the ranks and their DataLoader workers too)."""
    try:
        os.killpg(job.pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("victim", [0, 1])
@pytest.mark.slow
def test_a_killed_rank_stops_the_job_within_seconds_with_one_line(
    tmp_path: Path, reap: list[subprocess.Popen], victim: int
) -> None:
    job, ranks, run_dir = _training(tmp_path, reap)
    os.kill(ranks[victim], signal.SIGKILL)
    killed = time.monotonic()

    stderr = job.communicate(timeout=60)[1]
    assert time.monotonic() - killed < 30  # the agent's monitor, then its shutdown of the other rank
    assert job.returncode == EXIT_RANK_DIED
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"RankDied: rank {victim} (pid {ranks[victim]}) was killed by SIGKILL — the job stops; "
        f"rerun the same command with hydra.run.dir={run_dir} to resume"
    )
    assert _nothing_left(job) or not process_tree(job.pid)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
@pytest.mark.slow
def test_a_signal_to_every_process_of_a_run_with_loader_workers_saves_and_exits_75(
    tmp_path: Path, reap: list[subprocess.Popen], signum: int
) -> None:
    """SLURM signals every process of a job, the DataLoader workers too: they leave it to the training
    process, which saves at its next step and exits 75 (its workers died of it before, and took the run
    down with a traceback)."""
    run_dir = tmp_path / "run"
    args = [*TINY, "data.train_size=512", "data.num_workers=2", "trainer.max_epochs=1000"]
    job = start_run([*args, "checkpoint.every_n_steps=1"], run_dir, reap)
    wait_for_checkpoint(run_dir / "checkpoints" / "recovery-*.ckpt", min_step=1)
    assert len(process_tree(job.pid)) >= 2  # the workers
    os.killpg(job.pid, signum)
    stderr = job.communicate(timeout=60)[1]
    assert job.returncode == EXIT_PREEMPTED and "Traceback" not in stderr, stderr[-3000:]
    [saved] = (run_dir / "checkpoints").glob("preempted-step*.ckpt")
    assert stderr.strip().splitlines()[-1].startswith(f"Preempted: saved {saved} at step ")


@pytest.mark.parametrize("target", ["job", "rank1"])
@pytest.mark.slow
def test_a_signal_in_a_ddp_jobs_final_test_stops_it_at_once_with_one_line(
    tmp_path: Path, reap: list[subprocess.Popen], target: str
) -> None:
    """Training is saved, the test is under way: SIGTERM to the job (forwarded to every rank) or to one rank
    stops it within seconds, exit 75, its line naming the save (one rank's used to wait for the collective
    timeout and blame another rank)."""
    job, run_dir = _job(tmp_path, reap, "data.test_size=20000", "trainer.max_epochs=1")
    log = run_dir / "train.log"
    while not (log.exists() and "`Trainer.fit` stopped" in log.read_text()):
        time.sleep(0.01)
    ranks = {int(env["RANK"]): pid for pid, env in process_tree(job.pid).items() if "RANK" in env}
    os.kill(job.pid if target == "job" else ranks[1], signal.SIGTERM)
    stopped = time.monotonic()
    stderr = job.communicate(timeout=60)[1]
    assert job.returncode == EXIT_PREEMPTED and time.monotonic() - stopped < 20, stderr[-3000:]
    assert "Traceback" not in stderr and not (run_dir / "run_summary.json").exists()
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("Preempted: stopped") and "rerun the same command with hydra.run.dir=" in last
    assert "before the ranks could save" not in last


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_after_one_save(tmp_path: Path, reap: list[subprocess.Popen]) -> None:
    """The ranks agree on a signal that only one of them got (Lightning's own per-step SIGTERM broadcast
    is off): both stop after the same step, one checkpoint is saved, and the job exits 75."""
    job, ranks, run_dir = _training(tmp_path, reap)
    os.kill(ranks[1], signal.SIGTERM)

    stderr = job.communicate(timeout=60)[1]
    assert job.returncode == EXIT_PREEMPTED
    assert "Traceback" not in stderr and "RankDied" not in stderr
    [saved] = (run_dir / "checkpoints").glob("preempted-step*.ckpt")
    assert stderr.strip().splitlines()[-1].startswith(f"Preempted: saved {saved} at step ")


@pytest.mark.parametrize(("signum", "code", "word"), [(signal.SIGINT, EXIT_INTERRUPTED, "Interrupted")])
@pytest.mark.slow
def test_a_signal_to_the_job_reaches_every_rank_once_they_save_and_it_exits(
    tmp_path: Path, reap: list[subprocess.Popen], signum: int, code: int, word: str
) -> None:
    """Ctrl-C reaches the composing process only (the ranks run in sessions of their own); the agent
    forwards it once, so the ranks save instead of stopping at once as on a second Ctrl-C."""
    job, _, run_dir = _training(tmp_path, reap)
    os.kill(job.pid, signum)

    stderr = job.communicate(timeout=90)[1]
    assert job.returncode == code and "Traceback" not in stderr
    [saved] = (run_dir / "checkpoints").glob("preempted-step*.ckpt")
    assert stderr.strip().splitlines()[-1] == (
        f"{word}: saved {saved} — rerun the same command with hydra.run.dir={run_dir} to resume"
    )
    assert _nothing_left(job)


@pytest.mark.slow
def test_ranks_whose_agent_was_killed_save_and_stop(tmp_path: Path, reap: list[subprocess.Popen]) -> None:
    job, ranks, run_dir = _training(tmp_path, reap)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()

    deadline = time.monotonic() + 90
    while any(Path(f"/proc/{pid}").exists() for pid in ranks.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(Path(f"/proc/{pid}").exists() for pid in ranks.values())
    assert len(list((run_dir / "checkpoints").glob("preempted-step*.ckpt"))) == 1


@pytest.mark.slow
def test_a_restarted_job_resumes_from_the_last_checkpoint_bit_exactly(
    tmp_path: Path, reap: list[subprocess.Popen]
) -> None:
    uninterrupted = tmp_path / "uninterrupted"
    train(compose([*DDP, "trainer.max_epochs=3"]), uninterrupted)
    expected = json.loads((uninterrupted / "run_summary.json").read_text())

    job, run_dir = _job(tmp_path, reap, "trainer.max_epochs=3", "trainer.max_restarts=1")
    wait_for_checkpoint(run_dir / "checkpoints" / "recovery-*.ckpt", min_step=11)  # in the second epoch
    [rank1] = [pid for pid, env in process_tree(job.pid).items() if env.get("RANK") == "1"]
    os.kill(rank1, signal.SIGKILL)

    stderr = job.communicate(timeout=300)[1]
    assert job.returncode == 0, stderr[-3000:]
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert Path(summary["resumed_from"]).parent == run_dir / "checkpoints"
    assert summary["model_fingerprint"] == expected["model_fingerprint"]
    assert summary["test_acc"] == expected["test_acc"] and summary["global_step"] == 3 * 512 // (32 * 2)


def test_a_worker_whose_agent_died_before_it_watched_stops_at_once(tmp_path: Path) -> None:
    """A worker learns its agent's pid from the agent (``T240DIST_AGENT_PID``): one whose agent is gone by
    the time it starts watching (its parent is then init, or a subreaper) is stopped with SIGTERM at once,
    not left training unwatched; one whose agent lives trains on."""
    watch = (
        "from t240dist.agent import stop_when_orphaned; import time; stop_when_orphaned(0.05); time.sleep(5)"
    )
    gone = subprocess.run(
        [sys.executable, "-c", watch], env={**os.environ, AGENT_PID: "999999999"}, timeout=60, check=False
    )
    assert gone.returncode == -signal.SIGTERM
    alive = subprocess.Popen([sys.executable, "-c", watch], env={**os.environ, AGENT_PID: str(os.getpid())})
    with pytest.raises(subprocess.TimeoutExpired):
        alive.wait(timeout=2)
    alive.kill()
    alive.wait()


@pytest.mark.slow
def test_ddp_jobs_leave_this_process_as_they_found_it(tmp_path: Path) -> None:
    """Two DDP jobs in one process (as in a sweep), each on a free port of its own: no rendezvous
    variable, signal handler, process group or child process is left behind."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    before = dict(os.environ)
    earlier = set(process_tree(os.getpid()))  # what earlier tests of this process left
    for name in ("a", "b"):
        assert train(compose(DDP), tmp_path / name)["world_size"] == 2
    # what torch's agent writes for itself (the signals it forwards) is the only new variable
    new = {k: os.environ[k] for k in set(os.environ) - set(before)}
    assert new.keys() <= {"TORCHELASTIC_SIGNALS_TO_HANDLE"}, new
    changed = {k: (v, os.environ.get(k)) for k, v in before.items() if os.environ.get(k) != v}
    assert not changed, changed
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    children = {pid: env for pid, env in process_tree(os.getpid()).items() if pid not in earlier}
    assert not children, {pid: env.get("_", "?") for pid, env in children.items()}
    import torch.distributed as dist

    assert not dist.is_initialized()


def _failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rank: int, exitcode: int, at: float, raised: bool
) -> ProcessFailure:
    """torch's record of a failed worker: one that raised wrote its error file (at ``at``) as workers
    do; for one killed by a signal the agent stamps the whole second at which it noticed."""
    error_file = tmp_path / f"error-{rank}.json"
    if raised:
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
        try:
            raise RuntimeError(f"rank {rank} raised")
        except RuntimeError as err:
            ErrorHandler().record_exception(err)
        os.utime(error_file, (at, at))
    failure = ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(error_file))
    if not raised:
        failure.timestamp = int(at)
    return failure


@pytest.mark.parametrize(
    ("cases", "cause"),
    [
        # SIGKILL at 100.9, noticed in second 101; rank 0 failed in a collective with it at 100.95, then
        # was stopped by the agent: the killed rank, although the agent's stamp is the later one
        ({0: (-signal.SIGTERM, 100.95, True), 1: (-signal.SIGKILL, 101.0, False)}, 1),
        # rank 0 raised; rank 1 aborted seconds later (a NCCL watchdog): rank 0, which certainly came first
        ({0: (1, 100.2, True), 1: (-signal.SIGABRT, 103.0, False)}, 0),
        # rank 1 raised; the agent then stopped rank 0
        ({0: (-signal.SIGTERM, 101.0, False), 1: (1, 100.5, True)}, 1),
        # both raised: the earlier
        ({0: (1, 100.7, True), 1: (1, 100.2, True)}, 1),
    ],
    ids=["killed-before-collective", "raised-before-abort", "raised-then-stopped", "earlier-raise"],
)
def test_the_first_failure_is_named_whatever_order_the_agent_saw_them_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cases: dict, cause: int
) -> None:
    failures = {rank: _failure(tmp_path, monkeypatch, rank, *case) for rank, case in cases.items()}
    assert _first(failures)[0] == cause


def test_a_signal_that_no_run_handles_raises_preempted_and_the_handlers_are_given_back() -> None:
    """Between a sweep's trials, or before a run trains, a scheduler's signal stops the process with
    ``Preempted`` (exit 75, one line), not the default action's death by it (exit 143, nothing said)."""
    before = [signal.getsignal(signum) for signum in PREEMPTING]
    for signum in PREEMPTING:
        stopped = pytest.raises(Preempted, match=rf"^stopped by {signum.name} — go on$")
        with stopped, preempted_by_signals(lambda: "go on"):
            os.kill(os.getpid(), signum)
            time.sleep(5)  # not reached: the handler raises at the next bytecode
    assert [signal.getsignal(signum) for signum in PREEMPTING] == before
