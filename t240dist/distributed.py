"""A DDP job's ranks in Lightning: the strategy, the process group's end, and small flags the ranks agree on.

How the ranks are started is ``t240dist.agent``'s. While they train, the ranks agree on small flags
without waiting for the GPU (``Agreed``, read back through ``t240dist.readback``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_fabric.plugins.environments import (
    LightningEnvironment,
    LSFEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)
from pytorch_lightning.strategies import DDPStrategy

from t240dist.errors import ConfigError
from t240dist.readback import host_copy

log = logging.getLogger(__name__)


@contextmanager
def ends_process_group() -> Iterator[None]:
    """Destroy the default process group on the way out, if there is one. Lightning destroys only NCCL
    groups at exit; a gloo group left to interpreter teardown now and then aborts a finished process
    ('terminate called without an active exception', pytorch/pytorch#190489), and its agent reports a
    failed job."""
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def gather_ranks(conf: dict[str, Any], device: str, weights: str | None) -> list[dict[str, Any]]:
    """Every rank's host, device, config fingerprint and ``weights`` (its parameters' fingerprint; None in
    one process), in rank order; refuse ranks with other configs, and warn where the ranks ended with other
    weights: DDP gives every rank the same gradients, so only an update made otherwise on some rank (its
    own learning rate, say) parts them, and the checkpoints hold rank 0's alone."""
    mine = {
        "rank": dist.get_rank() if dist.is_initialized() else 0,
        "host": socket.gethostname(),
        "device": device,
        "config_sha256": hashlib.sha256(json.dumps(conf, sort_keys=True).encode()).hexdigest(),
        "weights_sha256": weights,
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
    parted = [r["rank"] for r in ranks if r["weights_sha256"] != ranks[0]["weights_sha256"]]
    if parted and mine["rank"] == 0:
        log.warning(
            "ranks %s ended training with weights other than rank 0's, which the checkpoints hold: an update "
            "differed between ranks (weights_sha256 in run_summary.json's ranks)",
            parted,
        )
    return ranks


def slurm_runs_the_tasks() -> bool:
    """Whether SLURM started this process as one task (rank) of a job, as Lightning sees it.

    torchrun inside a SLURM allocation takes precedence, as in Lightning's own choice of environment.
    """
    return SLURMEnvironment.detect() and not TorchElasticEnvironment.detect()


# What an MPI launcher (Open MPI, MPICH/Intel MPI's Hydra, PMIx, MVAPICH) sets in every process it starts
MPI_LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


def cluster_plugins() -> list[Any]:
    """The cluster environment, where t240dist knows it better or sooner than Lightning's detection.

    - SLURM runs the tasks: Lightning's SLURM environment without its auto-requeue. Requeue belongs to
      whatever started the job (launch/slurm.sbatch on exit code 75, or submitit), and the save to the
      ``Preemption`` callback at a step boundary. Lightning's auto-requeue would save an ``hpc_ckpt`` from
      inside its SIGUSR1 handler, mid-step and outside ``checkpoints/``, and requeue again.
    - No launcher started this process: Lightning's own single-machine environment, the one its detection
      ends with. Its detection would first import ``mpi4py`` wherever that is installed, and so start MPI,
      to ask for a world size (0.43 s of a run's start on an H200 host); that probe is kept for processes
      that an MPI launcher started.
    - Otherwise (torchrun, LSF's jsrun, mpirun): nothing, and Lightning detects it.
    """
    if slurm_runs_the_tasks():
        return [SLURMEnvironment(auto_requeue=False)]
    launched = TorchElasticEnvironment.detect() or LSFEnvironment.detect()
    if launched or any(name in os.environ for name in MPI_LAUNCHER_VARIABLES):
        return []
    return [LightningEnvironment()]


class DDP(DDPStrategy):
    """Lightning's DDP strategy without its per-step SIGTERM broadcast, and without a DDP wrapper for a job
    of one rank (``trainer=ddp trainer.devices=1``), whose gradients have no one to be averaged with.

    Lightning (since 2.5.2) broadcasts a SIGTERM flag from rank 0 before every training step and reads it
    back with .item(): a device sync per step, ~6 ms of a 66 ms ResNet-50 step on 2 H100s (Lightning issue
    #21487, open). t240dist's Preemption callback handles SIGTERM instead, agreeing at logging steps; its
    handler replaces Lightning's, whose flag then never rises, so that broadcast only costs. It is turned
    off here, through the loop's private attribute, until Lightning makes it optional.
    """

    def configure_ddp(self) -> None:
        if self.world_size > 1:
            super().configure_ddp()

    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        loop = trainer.fit_loop.epoch_loop
        if hasattr(loop, "_broadcast_sigterm_tensor"):
            loop._broadcast_sigterm_tensor = _no_broadcast


def _no_broadcast() -> None:
    """Nothing to agree on before a step: ``Preemption`` agrees on SIGTERM at logging steps."""


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
