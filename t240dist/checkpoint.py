"""Checkpoints you can trust: crash-consistent writes, and a signature checked before anything is unpickled.

A checkpoint stays a plain ``torch.save`` zip file (``torch.load(path, weights_only=True)`` still reads
it); its sha256 and an HMAC-SHA256 under a key kept outside the run dir ride in the zip's comment field,
which zip readers skip. Writes go to a temp file in the destination directory, are fsynced, and replace
the final name atomically, so a kill or a full disk never leaves a half-written file under that name.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import io
import json
import logging
import os
import secrets
import struct
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from t240dist.errors import UserError

log = logging.getLogger(__name__)

KEY_ENV = "T240DIST_CHECKPOINT_KEY"
_MARK = b"t240dist-signature "
_END_OF_ZIP = b"PK\x05\x06"  # end-of-central-directory record: 22 bytes, then the comment


class CheckpointError(UserError):
    """A checkpoint cannot be written, or cannot be trusted."""


class SignedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic, fsynced, signed writes and verified reads."""

    def __init__(self, trust_unsigned: bool) -> None:
        self.trust_unsigned = trust_unsigned

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_atomically(Path(path), sign(buffer.getvalue(), checkpoint_key()))

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: Any = None
    ) -> dict[str, Any]:
        return load_checkpoint(Path(path), self.trust_unsigned, map_location)


def resume_checkpoint(resume: str, directory: Path, trust_unsigned: bool) -> Path | None:
    """What a run continues from: ``resume=PATH``; with ``auto`` the newest valid checkpoint in
    ``directory`` (damaged or foreign ones are skipped with a warning); None to start fresh."""
    if resume == "never":
        return None
    if resume != "auto":
        verify(Path(resume).read_bytes(), Path(resume), trust_unsigned)  # before any work, with one line
        return Path(resume)
    for path in sorted(directory.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns, reverse=True):
        try:
            verify(path.read_bytes(), path, trust_unsigned)
        except CheckpointError as err:
            log.warning("resume=auto skips %s", err)
            continue
        return path
    return None


def load_checkpoint(path: Path, trust_unsigned: bool, map_location: Any = None) -> dict[str, Any]:
    """Verify ``path`` and only then deserialise it, with ``weights_only=True`` always."""
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist — check the path, or use resume=auto|never")
    payload = verify(path.read_bytes(), path, trust_unsigned)
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as err:  # weights_only refuses anything but tensors and plain containers
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"{path} holds more than weights ({first}) — it was refused unopened") from None


def sign(payload: bytes, key: bytes) -> bytes:
    """``payload`` (a zip without comment, as torch.save writes it) with its signature as the comment."""
    if not payload.endswith(b"\x00\x00") or payload[-22:-18] != _END_OF_ZIP:
        raise ValueError("expected a zip file without comment, as torch.save writes")
    note = (
        _MARK
        + json.dumps(
            {"sha256": hashlib.sha256(payload).hexdigest(), "hmac_sha256": _mac(key, payload)}
        ).encode()
    )
    return payload[:-2] + struct.pack("<H", len(note)) + note


def verify(data: bytes, path: Path, trust_unsigned: bool) -> bytes:
    """The signed payload of ``data`` if its hash and HMAC hold under this machine's key."""
    at = data.rfind(_MARK)
    end = at - 22
    if at < 22 or data[end : end + 4] != _END_OF_ZIP:
        if trust_unsigned:
            return data
        raise CheckpointError(
            f"{path} carries no t240dist signature — load it only if you trust where it came from, "
            "with checkpoint.trust_unsigned=true"
        )
    payload = data[: end + 20] + b"\x00\x00"
    try:
        note = json.loads(data[at + len(_MARK) :])
    except ValueError:
        note = {}
    if note.get("sha256") != hashlib.sha256(payload).hexdigest():
        raise CheckpointError(f"{path} is damaged (its sha256 does not match) — use an earlier checkpoint")
    if not hmac.compare_digest(str(note.get("hmac_sha256")), _mac(checkpoint_key(), payload)):
        raise CheckpointError(
            f"{path} was signed with another key or altered — set {KEY_ENV} to the key it was made with"
        )
    return payload


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` all or nothing: temp file beside it, fsync, rename, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise CheckpointError(
                f"cannot write {path}: {os.strerror(err.errno)} — free space (or raise the file-size limit) "
                "and resume; the previous checkpoint is intact"
            ) from None
        raise


def checkpoint_key() -> bytes:
    """The signing key: ``T240DIST_CHECKPOINT_KEY``, else a key file (mode 0600) made on first use.

    The key file lives in the user's config dir, never in a run dir; jobs on several machines need the
    same key, so set the variable there.
    """
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV].encode()
    path = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "t240dist" / "checkpoint.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(secrets.token_hex(32))
        tmp.chmod(0o600)
        try:
            os.link(tmp, path)  # appears whole, or not at all if another rank made it first
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip().encode()


def _mac(key: bytes, payload: bytes) -> str:
    return hmac.new(key, payload, hashlib.sha256).hexdigest()
