"""Copies of a run dir as it stands after each checkpoint is written: the states a resume can start from.

The copy is made in the checkpoint writer's thread, as the write ends: training may have gone on meanwhile,
as it does when a run is killed after a save. In one process, ``copy_after_every_write`` replaces the
writer's ``write`` (``monkeypatch.setattr``). A DDP job that ``python -m train`` starts trains in the
elastic agent's workers, out of a test's reach; so

    torchrun --standalone --nproc-per-node=2 tests/snapshots.py RUN_DIR INTO OVERRIDE...

trains the job under torchrun instead, where ``train`` trains as the rank itself (README: both launchers
train the same model), and rank 0, the only rank that writes checkpoints, keeps the copies in ``INTO``.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from t240dist.checkpoint import SignedCheckpointIO


def copy_after_every_write(run_dir: Path, into: Path) -> Callable[[SignedCheckpointIO, dict, Path], None]:
    """``SignedCheckpointIO.write`` that then copies ``run_dir`` to ``into/NN-NAME`` (NN counts the
    writes, NAME is the checkpoint's stem)."""
    write = SignedCheckpointIO.write

    def write_and_copy(self: SignedCheckpointIO, checkpoint: dict, path: Path) -> None:
        write(self, checkpoint, path)
        into.mkdir(parents=True, exist_ok=True)
        shutil.copytree(run_dir, into / f"{len(list(into.iterdir())):02d}-{path.stem}")

    return write_and_copy


if __name__ == "__main__":
    from t240dist.config import compose_config
    from t240dist.run import train

    run_dir, into, *overrides = sys.argv[1:]
    SignedCheckpointIO.write = copy_after_every_write(Path(run_dir), Path(into))
    train(compose_config(overrides), run_dir=Path(run_dir))
