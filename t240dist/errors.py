"""Errors a user can fix, and the one place that turns them into one line and exit code 2."""

from __future__ import annotations

import atexit
import contextlib
import difflib
import gc
import os
import re
import shutil
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
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
    """The run was asked to stop (SIGTERM/SIGUSR1/SIGUSR2); a rerun resumes from what it saved."""

    exit_code = EXIT_PREEMPTED


class Interrupted(Preempted):
    """The run was stopped by Ctrl-C (SIGINT); a rerun resumes from what it saved."""

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
    exit_without_final_collection()
    with one_line_errors(), preempted_by_signals(_stopped_hint):
        app()


def _stopped_hint() -> str:
    """How to go on after a signal outside training and testing: from the job's run dir, or a grid's sweep
    dir (Hydra's config is the last job's between a sweep's jobs); before any job, nothing was done."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return resume_hint(Path(HydraConfig.get().runtime.output_dir).absolute())
    return "nothing was trained yet: rerun the same command"


def exit_without_final_collection() -> None:
    """Let this entry point's process exit without the interpreter's last full garbage collections.

    At exit CPython collects every generation of a heap that torch, Lightning and their imports made
    large, for memory that goes back to the system with the process anyway: py-spy saw ``gc_collect_main``
    fill the last 1.8 s of a 2-core default run (summary to exit: 1.7-2.2 s, 0.3-0.5 s without them).
    ``gc.freeze()``, in an atexit handler registered before the run and so run after the handlers that the
    run's libraries register (loggers, worker pools), moves every object to the permanent generation that
    collections skip. Objects are still freed by reference counting as the modules are torn down.
    """
    atexit.register(gc.freeze)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Print a user error as one line on stderr and exit 2; a full traceback with HYDRA_FULL_ERROR=1."""
    try:
        yield
    except UserError as err:
        _fail(f"{type(err).__name__}: {_own_line(err)}", err)
    except Preempted as err:
        exit_preempted(err)
    except RankDied as err:
        print(f"RankDied: {err}", file=sys.stderr, flush=True)
        sys.exit(err.exit_code)
    except (HydraException, OmegaConfBaseException) as err:
        _fail(f"ConfigError: {_hydra_line(err)}", err)


class RunDirMadeHere(Callback):
    """Remembers the run dir of a single run, or the sweep dir of a multirun, that Hydra is about to make,
    and the parents it makes with it.

    Hydra makes the run dir (with ``.hydra/`` and the job's log file) before the task runs, and a sweep dir
    (with ``multirun.yaml``) before the first trial, so a user error that stops the run or every trial
    before anything of its own was written would leave an empty dir behind for each mistyped command:
    ``forget_unused_run_dir`` removes what this process made. A dir that was there before (a run resumed
    in its own dir, a sweep rerun into its sweep dir) is never touched.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _remember_if_new(Path(config.hydra.run.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _remember_if_new(Path(config.hydra.sweep.dir))


def _remember_if_new(folder: Path) -> None:
    folder = folder.absolute()
    _made.clear()
    if not folder.exists():
        top = folder
        while not top.parent.exists():
            top = top.parent
        _made.update(run_dir=folder, top=top)


_made: dict[str, Path] = {}  # what RunDirMadeHere saw Hydra about to make in this process
# what Hydra writes there before any work: a run's record, resolved config and log; a sweep's multirun.yaml
_HYDRAS_OWN = (".hydra", "config.yaml", "multirun.yaml")


def forget_unused_run_dir() -> None:
    """Remove the run or sweep dir that Hydra made for this process, and the parents it made, if nothing
    but Hydra's own files (``_HYDRAS_OWN``, logs) was written there."""
    run_dir, top = _made.pop("run_dir", None), _made.pop("top", None)
    if run_dir is None or top is None or not run_dir.is_dir():
        return
    entries = list(run_dir.iterdir())
    if any(p.name not in _HYDRAS_OWN and p.suffix != ".log" for p in entries):
        return
    for path in entries:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    for folder in (run_dir, *run_dir.parents):
        with contextlib.suppress(OSError):  # not empty: another run's
            folder.rmdir()
        if folder == top or folder.exists():
            return


def exit_preempted(err: Preempted) -> NoReturn:
    """End a preempted (exit 75: rerun or requeue to resume) or interrupted (exit 130) process."""
    print(f"{type(err).__name__}: {err}", file=sys.stderr, flush=True)
    sys.exit(err.exit_code)


def resume_hint(run_dir: Any) -> str:
    """How to continue a stopped run: the default run dir is new on every run, so it names this one. A
    trial's: the grid's sweep dir (its rerun goes on with the stopped trial; the finished ones find
    themselves finished); nothing for an Optuna study in a storage (its rerun runs the trial again, in its
    run dir). A rank's process has no Hydra config: its agent, in the sweep's process, words the hint."""
    hydra = _multirun()
    if hydra is None:
        return f"rerun the same command with hydra.run.dir={run_dir} to resume"
    if hydra.sweeper.get("storage"):
        return "rerun the same command to resume: the study runs this trial again, in its run dir"
    if is_grid(hydra.sweeper):
        return f"rerun the same command with hydra.sweep.dir={Path(hydra.sweep.dir).absolute()} to resume"
    return f"rerun this trial's overrides with hydra.run.dir={run_dir} to resume it (the study was in memory)"


def own_dir_hint(who: str) -> str:
    """How to keep a new run out of an earlier run's dir: a run dir of its own, or a sweep dir for a sweep."""
    if _multirun() is not None:
        return "give the sweep a hydra.sweep.dir of its own"
    return f"give {who} a hydra.run.dir of its own"


def _multirun() -> DictConfig | None:
    """Hydra's config (``hydra.*``) in a multirun's job, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return HydraConfig.get()


def is_grid(sweeper: DictConfig) -> bool:
    """Whether ``sweeper`` (``hydra.sweeper``) is Hydra's basic sweeper, which runs a grid."""
    return str(sweeper._target_).endswith(".BasicSweeper")


PREEMPTING = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)  # a scheduler's: SLURM's, submitit's, kill's


@contextmanager
def preempted_by_signals(hint: Callable[[], str]) -> Iterator[None]:
    """Let a preempting signal raise ``Preempted`` (exit 75, one line: the signal and ``hint()``) while
    nothing else handles it: a run's own handler (``callbacks.Preemption``) takes over while it trains
    and tests, and hands back to this one. Without it a signal between a sweep's trials or before a run
    trained killed the process (exit 143) with nothing said and a sweep's summary unwritten."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> NoReturn:
        raise Preempted(f"stopped by {signal.Signals(signum).name} — {hint()}")

    previous = {signum: signal.signal(signum, stop) for signum in PREEMPTING}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def reraised(line: str, default: type[Exception] | None) -> Exception | None:
    """The exception that ``Type: message`` (how another process recorded it) names, if t240dist defines
    ``Type``; else ``default(line)``, or None without a default."""
    name, _, message = line.partition(": ")
    known = {cls.__name__: cls for cls in (*_subclasses(UserError), Preempted, Interrupted, RankDied)}
    if name in known:
        return known[name](message)
    return default(line) if default else None


def _own_line(err: UserError) -> str:
    """A user error's message. One raised in a DataLoader worker is raised again in this process with the
    worker's traceback in its message (``Caught ConfigError in DataLoader worker process 0. Original
    Traceback ...``), whose last line is the error's own: ``t240dist.errors.ConfigError: <message>``."""
    text = str(err)
    if text.startswith("Caught ") and "Original Traceback" in text:
        return text.splitlines()[-1].partition(": ")[2]
    return text


def _subclasses(cls: type) -> list[type]:
    """``cls``'s subclasses, theirs too: the user errors of this module (where every one is defined)."""
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


def _fail(line: str, err: BaseException) -> NoReturn:
    """End the process on a user error: its line (after the traceback, with HYDRA_FULL_ERROR=1), exit 2
    either way; a run dir that Hydra made for this run and nothing else wrote into goes too."""
    forget_unused_run_dir()
    if _FULL_TRACEBACK:
        traceback.print_exception(err)
    print(line, file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def _hydra_line(err: BaseException) -> str:
    """Fold Hydra's and OmegaConf's multi-line messages into `<what> — <fix>`."""
    text = str(err).split("Config search path")[0]
    unknown = re.match(r"Could not override '([^']+)'", text)
    if unknown and "+" in text:
        from t240dist.config import known_as, not_a_trainer_argument, owned_trainer_argument  # (imports this)

        key = unknown.group(1)
        append = re.search(r"use (\+\S+)", text)
        if key.startswith("trainer.") and append:  # a Lightning Trainer argument that t240dist does not set?
            name, value = key.removeprefix("trainer."), append.group(1).split("=", 1)[1]
            wrong = owned_trainer_argument(name) or not_a_trainer_argument(name, value)
            if wrong:
                return wrong
            preset = _DEBUG_PRESETS.get(key)
            return (
                f"{key} is not one of t240dist's trainer keys — pass it to Lightning's Trainer with "
                f"{append.group(1)}" + (f", or use {preset}" if preset else "")
            )
        ours, closest = known_as(key), _closest_key(key, err.__cause__)
        value = re.search(rf"\+{re.escape(key)}=(.*)", text)
        options = _options_with(key)
        if options and value:  # a key of another option of its group: data.root under data=digits
            group, given = key.partition(".")[0], f"{key}={_as_typed(key, value.group(1))}"
            what = f"{key} is not a key of this {group}"
            if len(options) == 1:
                return f"{what} — use {group}={options[0]} {given} (the one that has it)"
            *others, last = (f"{group}={option}" for option in options)
            return f"{what} — pick one that has it: {', '.join(others)} or {last}, with {given}"
        if (ours or closest) and value:
            why = "t240dist's key" if ours else "the closest key; python -m train --cfg job lists them all"
            fix = f"{ours or closest}={_as_typed(key, value.group(1))}"
            return f"{key} is not a config key — use {fix} ({why})"
        # (+KEY=... would be refused too: only trainer takes new keys, handled above)
        return f"{key} is not a config key — check its spelling (python -m train --cfg job lists the keys)"
    unread = re.match(r"LexerNoViableAltException: ([\w.+]+)=(\S*)", text)
    if unread and unread.group(2).startswith("~"):  # bash expands ~ after ckpt=, not data.root= (nor zsh)
        key, value = unread.groups()
        return (
            f"{key}={value}: Hydra reads a bare ~ as its delete operator — quote the value, "
            f"'{key}=\"{value}\"', or write {key}=$HOME{value[1:]}"
        )
    if unread:  # a character Hydra's grammar takes only in quotes: ü, a space after escaping, ...
        key, value = unread.groups()
        return f"{key}={value}: Hydra reads this value only in quotes — write '{key}=\"{value}\"'"
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


def _options_with(key: str) -> list[str]:
    """The options of config group GROUP that define ``key`` (GROUP.NAME), in name order."""
    import importlib.resources

    import yaml

    from t240dist.config import CONF_PACKAGE  # (imports this module)

    group, _, name = key.partition(".")
    folder = importlib.resources.files(CONF_PACKAGE) / group
    if not name or "." in name or not folder.is_dir():
        return []
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".yaml")), key=lambda f: f.name)
    return [f.name.removesuffix(".yaml") for f in files if name in (yaml.safe_load(f.read_text()) or {})]


def _as_typed(key: str, value: str) -> str:
    """The value of ``key`` as the command line gave it: a sweep's ``0.1,0.2`` under ``-m``, where Hydra
    names one job's ``0.1``; else ``value`` as Hydra names it."""
    typed = [arg.partition("=")[2] for arg in sys.argv[1:] if arg.partition("=")[0].lstrip("+") == key]
    return typed[-1] if typed else value.strip()


def _closest_key(key: str, cause: BaseException | None) -> str | None:
    """The existing key that ``key`` was most likely meant to be, from the config node that OmegaConf says
    lacks it: for a key at the top, the one key of the whole config that ends in it (``steps`` in the
    benchmark's config: bench.steps); else the value next to it that difflib finds closest to its last
    part (not a config group, such as sweep, which takes an option); None where none is."""
    parent = getattr(cause, "parent_node", None)
    if parent is None:
        return None
    tree = OmegaConf.to_container(parent, resolve=False)  # interpolations stay as written
    head, _, leaf = key.rpartition(".")
    ending = [] if head else [path for path in _value_paths(tree) if path.rpartition(".")[2] == leaf]
    if len(ending) == 1:
        return ending[0]
    values = [str(name) for name, value in tree.items() if not isinstance(value, dict)]
    found = difflib.get_close_matches(leaf, values, n=1, cutoff=0.6)
    return f"{head}.{found[0]}" if found and head else found[0] if found else None


def _value_paths(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys of every value in ``tree`` (nested dicts walked, lists taken as values)."""
    paths = []
    for name, value in tree.items():
        path = f"{prefix}{name}"
        paths += _value_paths(value, f"{path}.") if isinstance(value, dict) else [path]
    return paths
