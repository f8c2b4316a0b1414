"""The study loop of the t240dist Optuna sweeper: ask for a batch of trials, launch them, tell their results.

A study in a storage survives: rerunning the same command loads it and runs until it has ``n_trials``
finished trials (complete, pruned or failed), so finished trials are not rerun. A trial whose job raised,
or whose objective is NaN or infinite, is told FAIL with its error line (user attribute ``error``) and the
sweep goes on until more than ``max_failure_rate`` of ``n_trials`` have failed. Trials left running by a
killed sweep (its process gone from this machine, or their heartbeats stale) are failed by the next run and
run again once, and preempted ones however often they are preempted: with the same parameters, in their run
dirs, from their last checkpoints. Trial N runs in the run dir of job number N, so no new trial lands in an
earlier one's.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import socket
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    check_distribution_compatibility,
)
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, Trial, TrialState
from sqlalchemy.exc import SQLAlchemyError

from hydra_plugins.t240dist_optuna.optuna_sweeper import OptunaSweeperConf
from t240dist import sweep
from t240dist.errors import ConfigError, Preempted, Pruned, SweepError

log = logging.getLogger(__name__)
# A trial that a killed sweep left unfinished is run again, once: one that kills the sweep itself must not be
# retried forever. A preempted trial (a signal, Ctrl-C) is run again however often it is preempted: a
# preemptible partition may stop it many times, and that is no failure of its parameters.
RERUN_INTERRUPTED = RetryHeartbeatStaleTrialCallback(max_retry=1)
RERUN_PREEMPTED = RetryHeartbeatStaleTrialCallback(max_retry=None)
OWNER = "sweeper"  # a trial's user attribute: host:pid of the sweeper process that runs it
UNLAUNCHED = "unlaunched"  # a trial's user attribute: its launch raised before its job ran


def run_study(
    settings: OptunaSweeperConf, launcher: Launcher, config: DictConfig, arguments: list[str]
) -> None:
    """Run the study to ``n_trials`` finished trials; write its summary in the sweep dir in any case."""
    sweep_dir = Path(config.hydra.sweep.dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, sweep_dir / "multirun.yaml")  # the sweep's record, as Hydra's basic sweeper keeps
    space, fixed = search_space(settings.params, arguments)
    storage = _storage(settings, launcher)
    study = open_study(settings, storage)
    objective = config.sweep.objective
    where = settings.storage or "in memory"
    log.info(
        f"Optuna study '{study.study_name}' ({where}): {settings.direction} {objective}, "
        f"{len(counted_trials(study))} of {settings.n_trials} trials finished"
    )
    _check_space(study, space)
    _rerun_orphans(study)
    try:
        with sweep.sharing(study):
            while True:
                # before each batch, as study.optimize does: trials that a killed sweep (or another
                # sweeper on the study) left running are failed and queued to run again
                optuna.storages.fail_stale_trials(study)
                left = settings.n_trials - len(counted_trials(study))
                if left <= 0:
                    break
                trials = [study.ask(space) for _ in range(min(settings.n_jobs, left))]
                overrides = [_overrides(trial, fixed, slot) for slot, trial in enumerate(trials)]
                with _heartbeats(storage, trials), _told_if_unlaunched(study, trials):
                    returns = _launch(launcher, trials, overrides)
                # every job of the batch is told, a preempted one too, before the sweep stops for it
                exhausted = [
                    _tell(study, trial, job, objective) for trial, job in zip(trials, returns, strict=True)
                ]
                preempted = [job._return_value for job in returns if isinstance(job._return_value, Preempted)]
                if preempted:
                    raise preempted[0]
                _check_failures(study, settings)
                if any(exhausted):
                    log.info("the sampler has tried its whole search space")
                    break
    finally:
        rows = [_row(trial) for trial in study.get_trials(deepcopy=False)]
        sweep.write_sweep_summary(rows, sweep_dir, objective, settings.direction)


def search_space(
    params: Mapping[str, Any], arguments: list[str]
) -> tuple[dict[str, BaseDistribution], dict[str, str]]:
    """Optuna distributions of the sweep overrides in ``params`` and on the command line (which win), and the
    fixed overrides every trial gets."""
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    lines = [f"{key}={value}" for key, value in params.items()] + arguments
    for override in OverridesParser.create().parse_overrides(lines):
        key = override.get_key_element()
        if override.is_sweep_override():
            space[key] = _distribution(override)
            fixed.pop(key, None)
        else:
            fixed[key] = override.input_line
            space.pop(key, None)
    return space, fixed


def _distribution(override: Override) -> BaseDistribution:
    """``interval`` (``tag(log, ...)`` for log scale), ``range`` and ``choice`` as Optuna distributions."""
    sweep_value = override.value()
    if override.is_interval_sweep():
        return FloatDistribution(sweep_value.start, sweep_value.end, log="log" in sweep_value.tags)
    choices = list(override.sweep_iterator(transformer=Transformer.encode))
    if override.is_range_sweep() and not sweep_value.shuffle:
        kind = IntDistribution if all(isinstance(c, int) for c in choices) else FloatDistribution
        return kind(choices[0], choices[-1], step=sweep_value.step)
    return CategoricalDistribution(choices)


def _storage(settings: OptunaSweeperConf, launcher: Launcher) -> RDBStorage | None:
    """The study's storage with heartbeats (a stale trial is run again once), or None for one in memory."""
    if settings.storage is None:
        if not isinstance(launcher, BasicLauncher):
            raise ConfigError(
                "an in-memory study cannot hear from trials in other processes — "
                "give hydra.sweeper.storage=sqlite:///PATH and hydra.sweeper.study_name=NAME"
            )
        return None
    if settings.study_name is None:
        raise ConfigError(
            "hydra.sweeper.study_name is not set — a rerun finds the study in hydra.sweeper.storage by its "
            "name: give hydra.sweeper.study_name=NAME"
        )
    try:
        return RDBStorage(
            settings.storage,
            heartbeat_interval=settings.heartbeat_interval,
            heartbeat_stale_trial_callback=RERUN_INTERRUPTED,
        )
    except SQLAlchemyError as err:  # a folder that is not there, a malformed URL, a server not answering
        why = str(getattr(err, "orig", None) or err).splitlines()[0]
        raise ConfigError(
            f"hydra.sweeper.storage={settings.storage} cannot be opened ({why}) — check the URL; for "
            "sqlite:///PATH, that PATH's folder exists (sqlite:////ABS/PATH for an absolute path)"
        ) from None


def open_study(settings: OptunaSweeperConf, storage: RDBStorage | None) -> optuna.Study:
    """Create the study, or load it from its storage, to the sweep's direction."""
    study = optuna.create_study(
        storage=storage,
        sampler=settings.sampler,
        pruner=settings.pruner or optuna.pruners.NopPruner(),
        study_name=settings.study_name,
        direction=settings.direction,
        load_if_exists=True,
    )
    stored = study.direction.name.lower()
    if stored != settings.direction:  # optuna keeps a loaded study's direction without a word
        raise ConfigError(
            f"study '{study.study_name}' in {settings.storage} is to {stored}, not {settings.direction} — "
            f"use sweep.direction={stored}, or another hydra.sweeper.study_name"
        )
    return study


def counted_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Finished trials that count toward ``n_trials``: one that was run again counts through its rerun, one
    whose job never started (its overrides composed no config) not at all."""
    trials = study.get_trials(deepcopy=False)
    rerun = {n for trial in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(trial)}
    return [
        t
        for t in trials
        if t.state.is_finished() and t.number not in rerun and UNLAUNCHED not in t.user_attrs
    ]


def _overrides(trial: Trial, fixed: dict[str, str], slot: int) -> list[str]:
    """The job's overrides: the sampled parameters, the fixed ones, and the trial's identity for pruning.

    A rerun of an interrupted trial (which inherits its user attributes) runs in that trial's run dir,
    so ``resume=auto`` continues it from its last checkpoint and its curves go on in the same place.
    """
    params = [f"{name}={value}" for name, value in trial.params.items()]
    trial.set_user_attr("overrides", " ".join(params))
    trial.set_user_attr(OWNER, f"{socket.gethostname()}:{os.getpid()}")
    # A storage knows a trial by an id that optuna keeps in a private attribute; Trial(study, id) is public.
    identity = f"sweep.trial={{number:{trial.number},id:{trial._trial_id},slot:{slot}}}"
    interrupted = trial.user_attrs.get("run_dir")
    if interrupted is None:  # a new trial: a run dir holding checkpoints is another trial's, not its own
        return [*params, *fixed.values(), identity, "resume=never"]
    run_dir = Path(interrupted)
    place = [f"hydra.sweep.dir={_quoted(str(run_dir.parent))}", f"hydra.sweep.subdir={_quoted(run_dir.name)}"]
    return [*params, *fixed.values(), identity, *place]


def _check_space(study: optuna.Study, space: dict[str, BaseDistribution]) -> None:
    """One line where the search gives a parameter another kind or scale of range than the stored study
    sampled it from: optuna keeps one per parameter name, and its ``ask`` raised, mid-trial."""
    for trial in study.get_trials(deepcopy=False):
        for name, sampled in trial.distributions.items():
            try:
                check_distribution_compatibility(sampled, space.get(name, sampled))
            except ValueError as err:
                raise ConfigError(
                    f"study '{study.study_name}' sampled {name} from {sampled}, not {space[name]} "
                    f"({str(err).rstrip('.')}) — sweep it as before, or give the new search another "
                    "hydra.sweeper.study_name"
                ) from None


def _launch(launcher: Launcher, trials: list[Trial], overrides: list[list[str]]) -> list[JobReturn]:
    """Run the trials' jobs, each numbered as its trial (``hydra.job.num``, the run dir's default name):
    numbered from 0 in every sweeper run, a new trial of a resumed study landed in an earlier trial's run
    dir, and resumed that trial. Trials whose numbers follow each other (those of one batch, as a rule) are
    launched together."""
    returns: list[JobReturn] = []
    start = 0
    for end in range(1, len(trials) + 1):
        if end == len(trials) or trials[end].number != trials[end - 1].number + 1:
            returns += launcher.launch(overrides[start:end], initial_job_idx=trials[start].number)
            start = end
    return returns


def _fail_to_rerun(
    study: optuna.Study,
    trial: Trial,
    error: str | None = None,
    again: RetryHeartbeatStaleTrialCallback = RERUN_PREEMPTED,
) -> None:
    """Fail an interrupted trial (``error`` as its user attribute) and queue it to run again (``again`` says
    how often), with its parameters and run dir."""
    _record(study, trial, state=TrialState.FAIL, error=error)
    # a copy: the callback appends to the trial's retry history, which must not change the study's own
    again(study, copy.deepcopy(study.get_trials(deepcopy=False)[trial.number]))


@contextmanager
def _told_if_unlaunched(study: optuna.Study, trials: list[Trial]) -> Iterator[None]:
    """Tell the trials of a launch that raised instead of returning: a signal or Ctrl-C stopped the sweep
    (run again when it resumes), or their overrides composed no config (a mistyped search parameter:
    failed with its line, not counted, so that the corrected command asks new trials in their place).
    Left running, each came back with its bad parameter at every rerun."""
    try:
        yield
    except BaseException as err:
        stored = study.get_trials(deepcopy=False)
        for trial in [t for t in trials if stored[t.number].state == TrialState.RUNNING]:
            if isinstance(err, (Preempted, KeyboardInterrupt)):
                _fail_to_rerun(study, trial, sweep.error_line(err))
            else:  # never a job: it counts neither toward n_trials nor as a failure
                trial.set_user_attr(UNLAUNCHED, True)
                _record(study, trial, error=sweep.error_line(err))
        raise


def _rerun_orphans(study: optuna.Study) -> None:
    """Fail, and queue to run again, the trials that a sweeper process of this machine, now gone (killed),
    left running: their heartbeats would take two intervals to go stale, and a rerun started sooner
    asked new trials in their place and left them running for good."""
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        where, _, pid = trial.user_attrs.get(OWNER, "").rpartition(":")
        if where == host and pid.isdigit() and not _alive(int(pid)):
            _fail_to_rerun(
                study, Trial(study, trial._trial_id), again=RERUN_INTERRUPTED
            )  # id: see _overrides


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def _quoted(text: str) -> str:
    """``text`` as a quoted value of a Hydra override: quotes escaped, and the backslashes before them;
    ``${`` escaped, so that OmegaConf does not read it as an interpolation."""
    text = text.replace("${", "\\${")
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), text) + "'"


@contextmanager
def _heartbeats(storage: RDBStorage | None, trials: list[Trial]) -> Iterator[None]:
    """Record a heartbeat of each running trial while its job runs, so a killed sweep leaves stale trials.

    Optuna records heartbeats in ``study.optimize`` only; a sweeper that asks and tells does it itself.
    """
    if storage is None:
        yield
        return
    interval = storage.get_heartbeat_interval()
    stop = threading.Event()

    def beat() -> None:
        while True:
            for trial in trials:
                storage.record_heartbeat(trial._trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _tell(study: optuna.Study, trial: Trial, job: JobReturn, objective: str) -> bool:
    """Record a job's outcome: its objective, pruned, or failed with its error line (a preempted trial
    fails and is queued to run again when the sweep resumes).

    True if the sampler has nothing left to try.
    """
    trial.set_user_attr("run_dir", str(job.hydra_cfg.hydra.runtime.output_dir))
    # The job's return value, or its exception (JobReturn.return_value would print a line and re-raise it).
    outcome = job._return_value
    if isinstance(outcome, Pruned):
        return _record(study, trial, state=TrialState.PRUNED)
    if isinstance(outcome, Preempted):  # the sweep was asked to stop: run this trial again when resumed
        _fail_to_rerun(study, trial, sweep.error_line(outcome))
        return False
    if job.status == JobStatus.FAILED:  # its traceback: hydra.verbose=hydra_plugins.t240dist_optuna._study
        log.debug(f"trial {trial.number} raised", exc_info=outcome)
        return _record(study, trial, error=sweep.error_line(outcome))
    if not math.isfinite(outcome):
        return _record(study, trial, error=f"the objective {objective} is {outcome}")
    return _record(study, trial, value=outcome)


def _record(
    study: optuna.Study,
    trial: Trial,
    value: float | None = None,
    state: TrialState = TrialState.COMPLETE,
    error: str | None = None,
) -> bool:
    """Tell the study; a trial with an error fails and keeps it as user attribute ``error``.

    True if the sampler has nothing left to try: grid and brute-force samplers then call ``study.stop()``,
    which outside ``study.optimize`` raises after the trial is recorded.
    """
    if error is not None:
        trial.set_user_attr("error", error)
        state = TrialState.FAIL
        log.warning(f"trial {trial.number} failed: {error}")
    else:
        log.info(f"trial {trial.number}: {state.name.lower()}" + ("" if value is None else f", {value:.4g}"))
    try:
        study.tell(trial, value, state=state)
    except RuntimeError as err:
        if "Study.stop" not in str(err):
            raise
        return True
    return False


def _check_failures(study: optuna.Study, settings: OptunaSweeperConf) -> None:
    """Stop the sweep once more than ``max_failure_rate`` of ``n_trials`` have failed."""
    failed = [t for t in counted_trials(study) if t.state == TrialState.FAIL]
    if len(failed) > settings.max_failure_rate * settings.n_trials:
        last = failed[-1].user_attrs.get("error", "interrupted")
        raise SweepError(
            f"{len(failed)} of the study's trials failed, more than max_failure_rate="
            f"{settings.max_failure_rate} of n_trials={settings.n_trials} (last: {last}) — "
            "fix the cause, or raise hydra.sweeper.max_failure_rate"
        )


def _row(trial: FrozenTrial) -> dict[str, Any]:
    """One trial of the study, as a row of the sweep summary."""
    run_dir = trial.user_attrs.get("run_dir")
    return {
        "trial": trial.number,
        "state": trial.state.name.lower(),
        "objective": trial.value,
        **sweep.run_metrics(run_dir),
        "overrides": trial.user_attrs.get("overrides", ""),
        "run_dir": run_dir or "",
        # a rerun inherits the user attributes of the trial it reruns: an error is shown for failures only
        "error": trial.user_attrs.get("error", "interrupted") if trial.state == TrialState.FAIL else "",
    }
