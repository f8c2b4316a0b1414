"""Copies of a run dir as it stands after each checkpoint save: the states a resume can start from.

In one process, ``copy_after_every_save`` replaces the checkpoint writer (``monkeypatch.setattr``). A DDP
job that ``python -m train`` starts trains in the elastic agent's workers, out of a test's reach; so

    torchrun --standalone --nproc-per-node=2 tests/snapshots.py RUN_DIR INTO OVERRIDE...

trains the job under torchrun instead, where ``train`` trains as the rank itself (README: both launchers
train the same model), and rank 0, the only rank that writes checkpoints, keeps the copies in ``INTO``.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from t240dist.checkpoint import SignedCheckpointIO


def copy_after_every_save(run_dir: Path, into: Path) -> Callable[..., None]:
    """``SignedCheckpointIO.save_checkpoint`` that then copies ``run_dir`` to ``into/NN-NAME`` (NN counts
    the saves, NAME is the checkpoint's stem)."""
    save = SignedCheckpointIO.save_checkpoint

    def save_and_copy(self: SignedCheckpointIO, checkpoint: dict, path: Any, **kwargs: Any) -> None:
        save(self, checkpoint, path, **kwargs)
        into.mkdir(parents=True, exist_ok=True)
        shutil.copytree(run_dir, into / f"{len(list(into.iterdir())):02d}-{Path(path).stem}")

    return save_and_copy


if __name__ == "__main__":
    from t240dist.config import compose_config
    from t240dist.run import train

    run_dir, into, *overrides = sys.argv[1:]
    SignedCheckpointIO.save_checkpoint = copy_after_every_save(Path(run_dir), Path(into))
    train(compose_config(overrides), run_dir=Path(run_dir))
