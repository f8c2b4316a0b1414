"""Errors a user can fix, and the one place that turns them into one line and exit code 2."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped by a signal after a checkpoint; rerun/requeue to resume
EXIT_INTERRUPTED = 130  # the shell's code for a process stopped by Ctrl-C (128 + SIGINT)
EXIT_RANK_DIED = 1  # a rank of the job died: the job failed; a rerun resumes from the last checkpoint

# Read once at import: run_app sets the variable for Hydra's sake, the user's wish stays here.
# run_app sets HYDRA_FULL_ERROR for Hydra's sake and marks that it did: the processes this one starts
# inherit both, and print one line too unless the user asked for tracebacks.
_SET_BY_US = "T240DIST_SET_HYDRA_FULL_ERROR"
_FULL_TRACEBACK = os.environ.get("HYDRA_FULL_ERROR") == "1" and _SET_BY_US not in os.environ
# Lightning's debugging arguments and the debug presets (conf/debug/) that set them.
_DEBUG_PRESETS = {"trainer.fast_dev_run": "debug=fdr", "trainer.overfit_batches": "debug=overfit"}


class UserError(Exception):
    """Something the user can fix; its message reads `<what is wrong> — <how to fix it>`."""


class ConfigError(UserError):
    """A config value, key, group option or data path is wrong."""


class NonFiniteError(UserError):
    """The loss, the gradients or the weights became NaN or inf (``nonfinite=stop``)."""


class CheckpointError(UserError):
    """A checkpoint cannot be written, or cannot be trusted."""


class SweepError(UserError):
    """A sweep cannot go on: too many trials failed, or its settings cannot work together."""


class Preempted(Exception):
    """The run was asked to stop (SIGTERM/SIGUSR1/SIGUSR2) and saved a checkpoint to resume from."""

    exit_code = EXIT_PREEMPTED


class Interrupted(Preempted):
    """The run was stopped by Ctrl-C (SIGINT) and saved a checkpoint to resume from."""

    exit_code = EXIT_INTERRUPTED


class RankDied(Exception):
    """A rank of a multi-process job died or failed; the job stopped, its checkpoints are intact."""

    exit_code = EXIT_RANK_DIED


class Pruned(Exception):
    """An Optuna trial was stopped early by the study's pruner: a result of the sweep, not an error."""


def run_app(app: Callable[[], Any]) -> None:
    """Run a ``@hydra.main`` app so that compose errors (unknown key or option) also become one line.

    Hydra prints its own multi-line report and exits 1; with HYDRA_FULL_ERROR set it raises instead,
    which lets ``one_line_errors`` word them like every other user error.
    """
    if os.environ.get("HYDRA_FULL_ERROR") != "1":
        os.environ.update({"HYDRA_FULL_ERROR": "1", _SET_BY_US: "1"})
    with one_line_errors():
        app()


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Print a user error as one line on stderr and exit 2; a full traceback with HYDRA_FULL_ERROR=1."""
    try:
        yield
    except UserError as err:
        _fail(f"{type(err).__name__}: {err}", err)
    except Preempted as err:
        exit_preempted(err)
    except RankDied as err:
        print(f"RankDied: {err}", file=sys.stderr, flush=True)
        sys.exit(err.exit_code)
    except (HydraException, OmegaConfBaseException) as err:
        _fail(f"ConfigError: {_hydra_line(err)}", err)


def exit_preempted(err: Preempted) -> NoReturn:
    """End a preempted (exit 75: rerun or requeue to resume) or interrupted (exit 130) process."""
    print(f"{type(err).__name__}: {err}", file=sys.stderr, flush=True)
    sys.exit(err.exit_code)


def resume_hint(run_dir: Any) -> str:
    """How to continue a stopped run: the default run dir is new on every run, so it names this one."""
    return f"rerun the same command with hydra.run.dir={run_dir} to resume"


def reraised(line: str, default: type[Exception] | None) -> Exception | None:
    """The exception that ``Type: message`` (how another process recorded it) names, if t240dist defines
    ``Type``; else ``default(line)``, or None without a default."""
    name, _, message = line.partition(": ")
    known = {cls.__name__: cls for cls in (*_subclasses(UserError), Preempted, Interrupted, RankDied)}
    if name in known:
        return known[name](message)
    return default(line) if default else None


def _subclasses(cls: type) -> list[type]:
    """``cls``'s subclasses, theirs too: the user errors of this module (where every one is defined)."""
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


def _fail(line: str, err: BaseException) -> NoReturn:
    if _FULL_TRACEBACK:
        raise err
    print(line, file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def _hydra_line(err: BaseException) -> str:
    """Fold Hydra's and OmegaConf's multi-line messages into `<what> — <fix>`."""
    text = str(err).split("Config search path")[0]
    unknown = re.match(r"Could not override '([^']+)'", text)
    if unknown and "+" in text:
        key = unknown.group(1)
        append = re.search(r"use (\+\S+)", text)
        if key.startswith("trainer.") and append:  # a Lightning Trainer argument that t240dist does not set
            preset = _DEBUG_PRESETS.get(key)
            return (
                f"{key} is not one of t240dist's trainer keys — pass it to Lightning's Trainer with "
                f"{append.group(1)}" + (f", or use {preset}" if preset else "")
            )
        return (
            f"{key} is not a config key — check its spelling (python -m train --cfg job lists the keys), "
            f"or add a new key with +{key}=..."
        )
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "full_key" not in ln]
    lines = [ln for ln in lines if not ln.startswith(("object_type", "reference_type"))]
    what, rest = lines[0], lines[1:]
    if err.__cause__ is not None and not rest:
        rest = [str(err.__cause__).splitlines()[0]]
    if len(rest) > 1 and rest[0].endswith(":"):
        rest = [rest[0] + " " + ", ".join(rest[1:])]
    fix = (
        "; ".join(rest) if rest else "check the override's spelling (python -m train --help lists the groups)"
    )
    return f"{what} — {fix}"
