"""One config for every rank: how ``python -m train trainer=ddp`` stays one job under Hydra.

Lightning's DDP launcher starts ranks > 0 by re-running the command line. Under Hydra that re-composes
the config (a multirun re-sweeps, an Optuna sweeper samples again) and makes run dirs of its own. So
rank 0 writes the resolved config into its run dir and names it in ``T240DIST_RUN_CONFIG``; a process
that Lightning starts as a local rank > 0 finds that variable and trains exactly that config in that run
dir, without composing anything. Processes started by torchrun or SLURM never see the variable.
Inside another program's worker (a submitit job of a sweep), Lightning would rerun that program, so there
the ranks are started as ``python -m train``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from t240dist.errors import ConfigError

RUN_CONFIG_ENV = "T240DIST_RUN_CONFIG"
# What Lightning's launcher writes into rank 0's environment; left there, a second fit in the same
# process (the next trial of a multirun) would believe its ranks were started externally and hang.
_LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", RUN_CONFIG_ENV)


def launched_rank() -> tuple[DictConfig, Path] | None:
    """The config and run dir that rank 0 handed to this process, if Lightning started it as a rank > 0."""
    path = os.environ.get(RUN_CONFIG_ENV)
    if not path or int(os.environ.get("LOCAL_RANK", "0")) == 0:
        return None
    return OmegaConf.load(path), Path(path).parent


@contextmanager
def one_job(config_path: Path) -> Iterator[None]:
    """Hand ``config_path`` to the ranks Lightning launches; afterwards leave the process as it was."""
    saved = {name: os.environ.get(name) for name in _LAUNCHER_ENV}
    os.environ[RUN_CONFIG_ENV] = str(config_path.resolve())
    try:
        with _ranks_start_as_train():
            yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def _ranks_start_as_train() -> Iterator[None]:
    """Make Lightning start ranks > 0 as ``python -m train`` when this process runs another main module.

    Lightning's launcher reruns ``__main__`` (by its spec, else ``sys.argv[0]``) with ``sys.argv``; in a
    submitit worker that is ``submitit.core._submit``, which refuses the arguments. ``python -m train``
    started with the run config in its environment trains that config, whatever its arguments.
    """
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name == "train.__main__":
        yield
        return
    argv = sys.argv
    main.__spec__, sys.argv = importlib.util.find_spec("train.__main__"), argv[:1]
    try:
        yield
    finally:
        main.__spec__, sys.argv = spec, argv


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
