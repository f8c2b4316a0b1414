"""One job over several processes: how ``python -m train trainer=ddp`` starts its ranks and stops them.

Lightning's DDP launcher starts ranks > 0 by re-running the command line. Under Hydra that re-composes
the config (a multirun re-sweeps, an Optuna sweeper samples again) and makes run dirs of its own; under
a submitit job the command line is submitit's, not ours. So rank 0 writes the resolved config into its
run dir and names it in ``T240DIST_RUN_CONFIG``, and starts each rank > 0 as plain ``python -m train``,
which finds that variable and trains exactly that config in that run dir, without composing anything.
Rank 0 and the ranks it started watch each other (``RankWatch``): when one dies, the others stop with
one line instead of a traceback or a hang. Processes started by torchrun or SLURM never see the variable;
there torchrun's agent, or a failed or timed-out collective under SLURM, stops a job that lost a process.
While they train, the ranks agree on small flags without waiting for the GPU (``Agreed``, read back
through ``t240dist.readback``).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import yaml
from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning_fabric.utilities.distributed import _set_num_threads_if_needed
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from pytorch_lightning.utilities import rank_zero_only

from t240dist.config import RUN_CONFIG_ENV
from t240dist.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_RANK_DIED, ConfigError
from t240dist.readback import host_copy

RANK0_PID_ENV = "T240DIST_RANK0_PID"  # set for the ranks that rank 0 starts: their parent, to watch
# What the launcher writes into rank 0's environment (as Lightning's does); left there, a second fit in
# the same process (the next trial of a multirun) would believe its ranks were started externally and hang.
_LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", RUN_CONFIG_ENV)


@contextmanager
def ends_process_group() -> Iterator[None]:
    """Destroy the default process group on the way out, if there is one. Lightning destroys only NCCL
    groups at exit; a gloo group left to interpreter teardown now and then aborts a finished process
    ('terminate called without an active exception', pytorch/pytorch#190489), and its launcher reports a
    failed job."""
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


@contextmanager
def one_job(conf: dict[str, Any], run_dir: Path) -> Iterator[None]:
    """Save the resolved run config as ``config.yaml`` in the run dir (rank 0) and hand it to the ranks that
    rank 0 starts; afterwards leave the process as it was."""
    config_path = run_dir / "config.yaml"
    if rank_zero_only.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path.write_text(yaml.safe_dump(conf, sort_keys=False))
    saved = {name: os.environ.get(name) for name in _LAUNCHER_ENV}
    os.environ[RUN_CONFIG_ENV] = str(config_path.resolve())
    try:
        with ends_process_group():
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def gather_ranks(conf: dict[str, Any], device: str) -> list[dict[str, Any]]:
    """Every rank's host, device and config fingerprint, in rank order; refuse ranks with other configs."""
    mine = {
        "rank": dist.get_rank() if dist.is_initialized() else 0,
        "host": socket.gethostname(),
        "device": device,
        "config_sha256": hashlib.sha256(json.dumps(conf, sort_keys=True).encode()).hexdigest(),
    }
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    ranks: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    if len({r["config_sha256"] for r in ranks}) > 1:
        raise ConfigError(
            "the ranks of this job trained different configs — start every rank with the same command "
            "line (or let python -m train trainer=ddp start them)"
        )
    return ranks


def slurm_runs_the_tasks() -> bool:
    """Whether SLURM started this process as one task (rank) of a job, as Lightning sees it.

    torchrun inside a SLURM allocation takes precedence, as in Lightning's own choice of environment.
    """
    return SLURMEnvironment.detect() and not TorchElasticEnvironment.detect()


def cluster_plugins() -> list[Any]:
    """Lightning's SLURM environment without its auto-requeue, when SLURM runs the tasks.

    Requeue belongs to whatever started the job (launch/slurm.sbatch on exit code 75, or submitit), and
    the save to the ``Preemption`` callback at a step boundary. Lightning's auto-requeue would save an
    ``hpc_ckpt`` from inside its SIGUSR1 handler, mid-step and outside ``checkpoints/``, and requeue again.
    """
    return [SLURMEnvironment(auto_requeue=False)] if slurm_runs_the_tasks() else []


class WatchedDDP(DDPStrategy):
    """Lightning's DDP with ranks started by ``RankLauncher``: a dying rank stops the others, in one line."""

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        self._launcher = RankLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        # Lightning (since 2.5.2) broadcasts a SIGTERM flag from rank 0 before every training step and reads
        # it back with .item(): a device sync per step, ~6 ms of a 66 ms ResNet-50 step on 2 H100s
        # (Lightning issue #21487, open). t240dist's Preemption callback handles SIGTERM instead, agreeing
        # at logging steps; its handler replaces Lightning's, whose flag then never rises, so that
        # broadcast only costs. Turned off here until Lightning makes it optional.
        loop = trainer.fit_loop.epoch_loop
        if hasattr(loop, "_broadcast_sigterm_tensor"):
            loop._broadcast_sigterm_tensor = _no_broadcast

    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        # A dead peer reaches the survivors' collectives as a RuntimeError (gloo: "Connection closed by
        # peer"): name the rank that died instead of printing that traceback.
        if isinstance(exception, RuntimeError):
            self.launcher.watch.stop_if_dead(wait_s=RankWatch.NOTICE_S)

    def teardown(self) -> None:
        self.launcher.watch.stop()
        super().teardown()


def _no_broadcast() -> None:
    """Nothing to agree on before a step: ``Preemption`` agrees on SIGTERM at logging steps."""


class RankLauncher(_SubprocessScriptLauncher):
    """Lightning's script launcher with two changes.

    Ranks > 0 start as plain ``python -m train``: they train the handed config, so it does not matter what
    started rank 0 (a Hydra multirun, a submitit job). And ``RankWatch`` replaces Lightning's child
    observer, which SIGKILLs rank 0 without a word up to 5 s after a rank died.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.watch = RankWatch({}, None)

    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
        first = self.cluster_environment.node_rank() * self.num_processes
        rank0_pid = os.environ.get(RANK0_PID_ENV)
        children = {first + i: proc for i, proc in enumerate(self.procs, start=1)}
        self.watch = RankWatch(children, (first, int(rank0_pid)) if rank0_pid else None)
        self.watch.start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)

    def _call_children_scripts(self) -> None:
        self._check_can_spawn_children()
        env = self.cluster_environment
        os.environ.update(
            MASTER_ADDR=env.main_address,
            MASTER_PORT=str(env.main_port),
            NODE_RANK=str(env.node_rank()),
            LOCAL_RANK=str(env.local_rank()),
            WORLD_SIZE=str(self.num_processes * self.num_nodes),
        )
        for local_rank in range(1, self.num_processes):
            child_env = {**os.environ, "LOCAL_RANK": str(local_rank), RANK0_PID_ENV: str(os.getpid())}
            self.procs.append(subprocess.Popen([sys.executable, "-m", "train"], env=child_env))


class RankWatch:
    """Stops this process with one line when another rank of its job dies, instead of a hang or a traceback.

    Rank 0 polls the ranks it started; a rank it started notices when rank 0, its parent, is gone. A rank
    that exited 0 (done) or 75 (preempted, like all the others) did not die.
    """

    POLL_S = 0.2
    NOTICE_S = 2.0  # how long an error in a collective waits for the death that caused it to show

    def __init__(self, children: dict[int, subprocess.Popen], parent: tuple[int, int] | None) -> None:
        self.children = children
        self.parent = parent  # (rank, pid)
        self._stopped = threading.Event()

    def start(self) -> None:
        if self.children or self.parent:
            threading.Thread(target=self._watch, name="rank-watch", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()

    def stop_if_dead(self, wait_s: float) -> None:
        """Stop the job if a rank died or dies within ``wait_s``; return otherwise."""
        deadline = time.monotonic() + wait_s
        while (self.children or self.parent) and time.monotonic() < deadline:
            death = self._death()
            if death:
                self._stop_job(death)
            time.sleep(self.POLL_S)

    def _watch(self) -> None:
        while not self._stopped.wait(self.POLL_S):
            death = self._death()
            if death:
                self._stop_job(death)

    def _death(self) -> str | None:
        """Which rank died and how, in words; None while all are alive or ended well."""
        for rank, proc in self.children.items():
            code = proc.poll()
            if code is not None and code not in (0, EXIT_PREEMPTED, EXIT_INTERRUPTED):
                how = (
                    f"exited with code {code}" if code > 0 else f"was killed by {signal.Signals(-code).name}"
                )
                return f"rank {rank} (pid {proc.pid}) {how}"
        if self.parent and os.getppid() != self.parent[1]:
            return f"rank {self.parent[0]} (pid {self.parent[1]}) is gone"
        return None

    def _stop_job(self, death: str) -> NoReturn:
        """Say which rank died, end the ranks this process started and exit, even from within a collective."""
        with _STOPPING:  # the watch thread and the main thread may both get here: one line only
            fix = "the job stops; rerun the same command to resume from the last checkpoint"
            print(f"RankDied: {death} — {fix}", file=sys.stderr, flush=True)
            for proc in self.children.values():
                if proc.poll() is None:
                    proc.kill()
            sys.stdout.flush()
            os._exit(EXIT_RANK_DIED)


_STOPPING = threading.Lock()


class Agreed:
    """Small flags that every rank reads alike at the same step, without stalling the GPU.

    ``exchange`` max-reduces a device tensor across the ranks (an all-reduce queued behind the step's
    work: no barrier), copies the result to pinned memory behind it, and returns what the previous
    exchange staged. Reading that means waiting for work at least one exchange old, never for the step
    just queued, so the GPU never runs dry; at ``log_every_n_steps`` 10 that work has long finished. Ranks
    exchange at the same steps (``due``), so each reads the same values at the same step and they act
    together. Lightning's ``strategy.reduce`` puts a barrier before its all-reduce, which waits for the
    GPU on every rank.
    """

    def __init__(self) -> None:
        self._staged: tuple[torch.Tensor, torch.cuda.Event | None, Any] | None = None
        self._due_at = -1  # the step of the last exchange that ``due`` allowed

    def due(self, step: int, every: int) -> bool:
        """Whether to exchange at this batch's end: once at each step that is a multiple of ``every`` (the
        micro-batches that follow an optimizer step share its number)."""
        if step % every or step == self._due_at:
            return False
        self._due_at = step
        return True

    def exchange(self, flags: torch.Tensor, tag: Any, ranks: bool) -> tuple[list[float], Any] | None:
        """Stage ``flags`` (max-reduced in place across ``ranks``) and ``tag``; return the previous ones."""
        previous = self.collect()
        if ranks:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        host, event = host_copy(flags)
        self._staged = (host, event, tag)
        return previous

    def collect(self) -> tuple[list[float], Any] | None:
        """What the last exchange staged (waiting for it if it has not landed yet), once; None if nothing."""
        if self._staged is None:
            return None
        host, event, tag = self._staged
        self._staged = None
        if event is not None:
            event.synchronize()
        return host.tolist(), tag
