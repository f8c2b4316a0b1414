"""How ``python -m train trainer=ddp`` starts a job's ranks: through torch's elastic agent.

The process that composes the job never trains in it. It writes the resolved config into the run dir and
starts torch's elastic agent (the engine behind torchrun: rendezvous on a free port, worker monitoring,
restarts) for the job's ``trainer.devices`` workers; each worker (``python -m train.worker``) trains that
file as a rank that Lightning sees was started by torchelastic. What the workers raise reaches this
process through the agent's error files and is reworded here once: a user error as itself, a dead rank
as ``RankDied`` naming the rank and its signal. Under torchrun or SLURM, which start the ranks
themselves, ``python -m train`` trains as one rank of theirs. This module imports torch but not
Lightning: the composing process needs no more.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, ProcessFailure, SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from t240dist import errors
from t240dist.config import slurm_starts_the_ranks
from t240dist.errors import ConfigError, Interrupted, Preempted, RankDied

CONFIG_FILE = "config.yaml"  # the resolved config of a run, in its run dir: what every worker trains
AGENT_PID = "T240DIST_AGENT_PID"  # set for the workers by the process that runs their agent
# The signals the agent forwards to the workers as it shuts them down: torch's default set, plus SLURM's
# and submitit's warnings before a time limit (the workers save on each). Saved and put back around a
# launch, since the agent leaves its handlers installed in the process that ran it.
_AGENT_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


def write_run_config(conf: dict[str, Any], run_dir: Path) -> Path:
    """Save the resolved run config as ``config.yaml`` in the run dir; return its path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CONFIG_FILE
    path.write_text(yaml.safe_dump(conf, sort_keys=False))
    return path


def agent_workers(conf: dict[str, Any]) -> int:
    """How many workers this process starts through the elastic agent: 0 to train here.

    A DDP job starts its ranks unless an engine that starts them already did (torchrun, SLURM tasks).
    """
    trainer = conf["trainer"]
    started = "TORCHELASTIC_RUN_ID" in os.environ or slurm_starts_the_ranks()
    if trainer["strategy"] != "ddp" or started:
        return 0
    if trainer["num_nodes"] > 1:
        raise ConfigError(
            f"trainer.num_nodes={trainer['num_nodes']} needs one agent per node — start them with torchrun "
            "(launch/torchrun.sh, python -m train.launch torchrun) or SLURM (hydra/launcher=slurm)"
        )
    devices = trainer["devices"]
    gpus = torch.cuda.device_count() if trainer["accelerator"] != "cpu" else 0
    count = len(devices) if isinstance(devices, list) else (gpus or 1) if devices == "auto" else devices
    if gpus and count > gpus:
        raise ConfigError(
            f"trainer.devices={devices} but this machine has {gpus} GPU(s) — give at most {gpus}"
        )
    return count


def launch_workers(conf: dict[str, Any], run_dir: Path, workers: int, task: str = "train") -> None:
    """Run the job as ``workers`` processes of ``python -m train.worker TASK CONFIG`` under torch's
    elastic agent; return once they all finished, raise what stopped them otherwise.

    The rendezvous runs on 127.0.0.1 at a free port, so jobs on one host never collide; the agent's
    per-rank files live in a temporary dir that goes with the job. ``trainer.max_restarts`` restarts all
    workers after a failure, and they resume from the last checkpoint (``resume_after_restart``).
    """
    config = write_run_config(conf, run_dir)
    if conf["trainer"]["max_restarts"]:
        # torch's documented opt-out, read by the agent's rendezvous: restarted workers that share the
        # agent's store find the dead workers' gloo addresses there and fail to connect
        # (pytorch/pytorch#135712, seen with torch 2.14). Set for this process from here on.
        os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    launch = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=workers,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=conf["trainer"]["max_restarts"],
        local_addr="127.0.0.1",
        signals_to_handle=",".join(s.name for s in _AGENT_SIGNALS),
    )
    handlers = {signum: signal.getsignal(signum) for signum in _AGENT_SIGNALS}
    os.environ[AGENT_PID] = str(os.getpid())  # the workers' parent, for them to tell that it is gone
    started = time.time_ns()
    try:
        with tempfile.TemporaryDirectory(prefix="t240dist-agent-") as logs:
            launch.logs_specs = DefaultLogsSpecs(log_dir=logs)
            _quietly(elastic_launch(launch, sys.executable), "-m", "train.worker", task, str(config))
    except ChildFailedError as err:
        raise _reworded(err.failures, run_dir) from None
    except SignalException as err:  # the agent forwarded it to the workers and waited for them
        if is_submitit_requeue(handlers[err.sigval]):
            handlers[err.sigval](err.sigval, None)  # submitit requeues the job and exits
        kind = Interrupted if err.sigval == signal.SIGINT else Preempted
        raise kind(f"{_saved_since(run_dir, started)} — {errors.resume_hint(run_dir)}") from None
    finally:
        os.environ.pop(AGENT_PID)  # the next in-process job (a sweep's) may train here, with no agent
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def _quietly(entry: elastic_launch, *args: str) -> None:
    """Run the agent without its log lines: it logs each step of a failure and of its shutdown (up to
    ERROR, through loggers with levels of their own), and what matters of that is raised as one line
    instead. Nothing else of this process logs while it waits for the workers."""
    logging.disable(logging.ERROR)
    try:
        entry(*args)
    finally:
        logging.disable(logging.NOTSET)


def _reworded(failures: dict[int, ProcessFailure], run_dir: Path) -> BaseException:
    """The exception that the failed workers amount to: what the first of them raised, if t240dist words
    it (a user error, a preemption), else ``RankDied`` naming it; a traceback a worker left is printed."""
    # A rank that saved and stopped on a signal (75, or 130 for Ctrl-C) explains the others: they failed
    # in a collective with it, or were stopped by the agent.
    stops = {errors.EXIT_PREEMPTED: Preempted, errors.EXIT_INTERRUPTED: Interrupted}
    stopped = {rank: f for rank, f in failures.items() if f.exitcode in stops}
    if stopped:
        _, first = _first(stopped)
        line, _ = _recorded(first)
        kind = stops[first.exitcode]
        return errors.reraised(line, kind) if line else kind(errors.resume_hint(run_dir))
    rank, first = _first(failures)
    line, trace = _recorded(first)
    if first.exitcode < 0:
        how = f"was killed by {signal.Signals(-first.exitcode).name}"
    elif line:
        known = errors.reraised(line, None)
        if known is not None:
            return known
        print(trace, file=sys.stderr, end="")
        how = f"failed with {line.splitlines()[0]}"
    else:
        how = f"exited with code {first.exitcode}"
    return RankDied(f"rank {rank} (pid {first.pid}) {how} — the job stops; {errors.resume_hint(run_dir)}")


def _recorded(failure: ProcessFailure) -> tuple[str, str]:
    """``Type: message`` and the traceback that a worker wrote to its error file; empty without one."""
    message = failure.error_file_data.get("message")
    if not isinstance(message, dict):  # no error file (killed by a signal), or one written otherwise
        return (message or "", "")
    return message["message"], message["extraInfo"]["py_callstack"]


def _saved_since(run_dir: Path, started_ns: int) -> str:
    """What the workers saved when they were stopped by a signal: the preemption checkpoint of this launch;
    else (stopped in the test, training saved) its newest save, ``last.ckpt``."""
    found = (run_dir / "checkpoints").glob("preempted-step*.ckpt")
    saved = [path for path in found if path.stat().st_mtime_ns > started_ns]
    if saved:
        return f"saved {max(saved, key=lambda path: path.stat().st_mtime_ns)}"
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file() and last.stat().st_mtime_ns > started_ns:
        return f"stopped; the newest save of this launch is {last}"
    return "stopped before the ranks could save"


def _first(failures: dict[int, ProcessFailure]) -> tuple[int, ProcessFailure]:
    """The failure that caused the others.

    A rank that raised wrote its error file at a known moment; for a rank killed by a signal only the
    agent's stamp of when it noticed is known, a whole second, so the death lies within about a second
    of it. A failure that certainly came after another is a consequence. Among the rest, a rank killed
    by a signal (a crash, the OOM killer, a user's kill) comes before one that raised (often in a
    collective with the dead one), before one that exited, before one that the agent itself stopped
    with SIGTERM once the first had failed; then the earliest.
    """
    spans = {rank: _when(failure) for rank, failure in failures.items()}
    latest = min(last for _, last in spans.values())
    possible = [rank for rank, (first, _) in spans.items() if first <= latest]
    rank = min(possible, key=lambda rank: (_kind(failures[rank]), spans[rank][0]))
    return rank, failures[rank]


def _when(failure: ProcessFailure) -> tuple[float, float]:
    """The earliest and the latest moment at which ``failure`` can have happened."""
    try:
        written = os.stat(failure.error_file).st_mtime
    except OSError:
        return failure.timestamp - 1.0, failure.timestamp + 1.0
    return written, written


def _kind(failure: ProcessFailure) -> int:
    """0 killed by a signal other than SIGTERM, 1 raised, 2 exited, 3 stopped with SIGTERM."""
    if failure.exitcode == -signal.SIGTERM:
        return 3
    if failure.exitcode < 0:
        return 0
    return 1 if failure.error_file_data.get("message") else 2


def is_submitit_requeue(handler: Any) -> bool:
    """Whether ``handler`` is the one submitit installs in its jobs: checkpoint the call, requeue, exit."""
    submitit = sys.modules.get("submitit.core.job_environment")  # imported in every submitit job
    if submitit is None:
        return False
    return getattr(handler, "__func__", None) is submitit.SignalHandler.checkpoint_and_try_requeue


def resume_after_restart(conf: dict[str, Any]) -> dict[str, Any]:
    """The config of a worker that the agent restarted after a failure: it resumes from the last
    checkpoint of its run dir, whatever ``resume`` said for the first attempt."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return {**conf, "resume": "auto"}
    return conf


def stop_when_orphaned(poll_s: float = 1.0) -> None:
    """Send this worker SIGTERM when its agent is gone (killed with SIGKILL, say): the ranks then save at
    the next step boundary and stop, as when they are preempted, instead of training on unwatched.

    The agent starts workers in sessions of their own, so nothing else reaches them when it dies. Its pid
    comes from ``launch_workers`` (an agent that died before this call already left the worker to init);
    under torchrun the agent is the parent at this call.
    """
    agent = int(os.environ.get(AGENT_PID, os.getppid()))

    def watch() -> None:
        while os.getppid() == agent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="agent-watch", daemon=True).start()
