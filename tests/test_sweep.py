"""Sweeps as users run them: a grid multirun, Optuna studies (pruning, NaN, resume, parallel DDP trials)."""

from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import (
    TINY,
    assert_same_end,
    compose,
    fits_80_columns,
    process_tree,
    run_cli,
    scalars,
    wait_for_checkpoint,
)
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from hydra_plugins.t240dist_optuna import _study
from hydra_plugins.t240dist_optuna.optuna_sweeper import OptunaSweeperConf
from t240dist.checkpoint import KEY_ENV
from t240dist.errors import EXIT_RANK_DIED, PREEMPTING, ConfigError, SweepError
from t240dist.run import train
from t240dist.sweep import take_own_share, write_sweep_summary

# An Optuna sweep over optim.lr alone, each value tried once, in an order fixed by the seed.
OPTUNA_LR = [
    "-m",
    "sweep=optuna",
    "optim.weight_decay=0",
    "module.label_smoothing=0",
    "hydra.sweeper.sampler._target_=optuna.samplers.BruteForceSampler",
    "hydra.sweeper.sampler.seed=0",
]


def _pruner(**kwargs: float) -> list[str]:
    """Replace the median pruner by a threshold pruner, which prunes the same trials whatever their order."""
    args = ",".join(f"{k}:{v}" for k, v in kwargs.items())
    return [
        "hydra.sweeper.pruner=null",
        f"hydra.sweeper.pruner={{_target_:optuna.pruners.ThresholdPruner,{args}}}",
    ]


def _sweep_dirs(root: Path) -> list[Path]:
    return sorted(root.glob("multirun/*/*"))


def _rows(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / "sweep_summary.csv") as f:
        return list(csv.DictReader(f))


def _run_summary(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / "run_summary.json").read_text())


@pytest.mark.slow
def test_grid_sweep_gives_each_trial_a_run_dir_its_hparams_and_a_summary_best_first(tmp_path: Path) -> None:
    tiny = [a for a in TINY if not a.startswith("trainer.max_epochs=")]
    sweep = ["optim.lr=0.1,0.02", "module.label_smoothing=0,0.1", "trainer.max_epochs=1"]
    done = run_cli(["-m", *tiny, *sweep], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]

    [sweep_dir] = _sweep_dirs(tmp_path)
    runs = sorted(p.parent for p in sweep_dir.glob("*/run_summary.json"))
    assert [r.name for r in runs] == ["0", "1", "2", "3"]
    compared = set()
    for run in runs:
        acc = EventAccumulator(str(run))
        acc.Reload()
        content = acc.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        hparams = start.session_start_info.hparams
        experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
        assert {"val/acc", "test/acc"} <= {m.name.tag for m in experiment.metric_infos}
        summary = _run_summary(run)
        # the HParams table shows the last value of each metric tag: the run's final metrics
        assert scalars(run)["test/acc"][-1][1] == pytest.approx(summary["test_acc"])
        assert hparams["optim.lr"].number_value == pytest.approx(summary["lr"])
        compared.add((hparams["optim.lr"].number_value, hparams["module.label_smoothing"].number_value))
        # the HParams tab opens on the swept keys, then on those people compare: five in all
        first = {h.name for h in experiment.hparam_infos if h.differs}
        assert first == {
            "module.label_smoothing",
            "optim.lr",
            "optim._target_",
            "data.batch_size",
            "model.name",
        }
    assert compared == {(0.1, 0.0), (0.1, 0.1), (0.02, 0.0), (0.02, 0.1)}

    rows = _rows(sweep_dir)
    objectives = [float(r["objective"]) for r in rows]
    assert len(rows) == 4 and objectives == sorted(objectives, reverse=True)  # val/acc, best first
    assert {r["run_dir"] for r in rows} == {str(r) for r in runs} and {r["state"] for r in rows} == {
        "complete"
    }
    assert objectives[0] == _run_summary(rows[0]["run_dir"])["val_acc"]
    assert "sweep summary" in done.stdout


@pytest.mark.slow
def test_optuna_records_a_pruned_and_a_nan_trial_and_the_sweep_goes_on(tmp_path: Path) -> None:
    objective = ["sweep.objective=val/loss", "sweep.direction=minimize", "trainer.max_epochs=3"]
    # nonfinite=skip: the diverged trial trains on to the end (stop would end it with NonFiniteError,
    # which fails the trial the same way), so its NaN objective is what fails it
    sweep = [
        "nonfinite=skip",
        "optim.lr=choice(0.1,1e-6,1e30)",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.max_failure_rate=0.5",
    ]
    # lr 1e-6 is still at val/loss 2.25 after epoch 1 (0.1 is at 2.01); lr 1e30 ends in NaN
    done = run_cli(
        [*OPTUNA_LR, *TINY, *objective, *sweep, *_pruner(upper=2.15, n_warmup_steps=1)],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]

    [sweep_dir] = _sweep_dirs(tmp_path)
    rows = _rows(sweep_dir)
    assert [(r["state"], r["overrides"]) for r in rows] == [
        ("complete", "optim.lr=0.1"),
        ("pruned", "optim.lr=1e-06"),
        ("fail", "optim.lr=1e+30"),
    ]
    good, pruned, nan = (_run_summary(r["run_dir"]) for r in rows)
    assert float(rows[0]["objective"]) == pytest.approx(good["val_loss"]) and good["epochs"] == 3
    assert pruned["pruned_at_epoch"] == 1 and pruned["epochs"] == 2  # stopped after 2 of 3 epochs
    assert float(rows[1]["objective"]) == pytest.approx(pruned["val_loss"])  # the last value it reported
    assert rows[2]["error"] == "the objective val/loss is nan" and nan["epochs"] == 3
    assert "failed: the objective val/loss is nan" in done.stdout + done.stderr
    # optuna's notices about the heartbeats the sweeper keeps itself are gone; the sampler's, which the test
    # chose, stays (it tells the user something true)
    assert re.findall(r"ExperimentalWarning: (\w+)", done.stderr) == ["BruteForceSampler"]


def _start(args: list[str], cwd: Path, name: str) -> subprocess.Popen:
    """Start ``python -m train ARGS``, its output in files (a sweep's output would fill a pipe)."""
    out = open(cwd / f"{name}.out", "w")  # noqa: SIM115 — closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "train", *args],
        cwd=cwd,
        env=dict(os.environ),
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def _wait_for(root: Path, pattern: str, process: subprocess.Popen, timeout: float = 240) -> Path:
    """The first file matching ``pattern`` under ``root``, once it exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(root.glob(pattern))
        if found:
            return found[0]
        assert process.poll() is None, (
            f"the sweep ended (exit {process.returncode}) before {pattern} appeared"
        )
        time.sleep(0.1)
    raise AssertionError(f"no {pattern} after {timeout} s")


@pytest.mark.slow
def test_optuna_study_in_sqlite_resumes_after_sigkill_and_sigterm(tmp_path: Path) -> None:
    storage = [
        "hydra.sweeper.storage=sqlite:///study.db",
        "hydra.sweeper.study_name=lr",
        "hydra.sweeper.sampler.seed=0",
    ]
    args = [
        "-m",
        "sweep=optuna",
        *TINY,
        "trainer.max_epochs=12",  # long enough that a signal sent after a trial's first save lands mid-trial
        *storage,
        "hydra.sweeper.heartbeat_interval=1",
    ]

    # a sweep dir each, in start order: multirun/s/1, 2, 3
    first = _start([*args, "hydra.sweeper.n_trials=2", "hydra.sweep.dir=multirun/s/1"], tmp_path, "first")
    _wait_for(tmp_path, "multirun/s/1/1/.hydra/overrides.yaml", first)  # trial 1 has started
    first.kill()
    assert first.wait() == -signal.SIGKILL
    time.sleep(2.5)  # trial 1 goes stale: no heartbeat for twice the heartbeat interval

    second = _start([*args, "hydra.sweeper.n_trials=3", "hydra.sweep.dir=multirun/s/2"], tmp_path, "second")
    _wait_for(tmp_path, "multirun/s/2/3/checkpoints/*.ckpt", second)  # its 2nd trial (trial 3) has saved
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=120) == 75, (tmp_path / "second.out").read_text()[-2000:]
    assert "Preempted: saved" in (tmp_path / "second.out").read_text()

    third = run_cli([*args, "hydra.sweeper.n_trials=3", "hydra.sweep.dir=multirun/s/3"], cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-2000:]

    study = optuna.load_study(study_name="lr", storage=f"sqlite:///{tmp_path / 'study.db'}")
    trials = study.trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "FAIL", "COMPLETE"]
    assert (
        trials[2].params == trials[1].params and trials[4].params == trials[3].params
    )  # run again as they were
    assert trials[3].user_attrs["error"].startswith("Preempted: saved")
    sweeps = _sweep_dirs(tmp_path)
    assert trials[0].user_attrs["run_dir"] == str(sweeps[0] / "0")  # trial 0 ran once, in the first sweep
    # trial 4 continued the preempted trial 3 in its run dir, from the checkpoint it saved on SIGTERM
    assert trials[4].user_attrs["run_dir"] == trials[3].user_attrs["run_dir"] == str(sweeps[1] / "3")
    rerun = _run_summary(sweeps[1] / "3")
    assert Path(rerun["resumed_from"]).parent == sweeps[1] / "3" / "checkpoints"
    assert rerun["epochs"] == 12 and not list(sweeps[2].glob("*/run_summary.json"))  # no new run dir
    rows = _rows(sweeps[2])  # the summary covers the whole study
    assert [r["state"] for r in rows] == ["complete"] * 3 + ["fail"] * 2
    assert {r["error"] for r in rows[3:]} == {"interrupted", trials[3].user_attrs["error"]}
    # the preempted trial's rerun ended as a run of its parameters that nothing stopped: weights, test
    # metrics, curves (the rerun of trial 1, killed at its start, began from scratch)
    params = trials[4].user_attrs["overrides"].split()
    train(compose([*TINY, "trainer.max_epochs=12", *params]), run_dir=tmp_path / "alone")
    assert_same_end(sweeps[1] / "3", tmp_path / "alone")


@pytest.mark.slow
def test_a_sweep_killed_and_rerun_at_once_in_its_sweep_dir_reruns_its_trial_and_gives_new_ones_their_dirs(
    tmp_path: Path,
) -> None:
    """SIGKILL to the sweeper while trial 1 trains, then the same command at once, into the same sweep dir:
    trial 1's heartbeats are not stale yet (default interval, 60 s), but its sweeper is gone, so it is run
    again, in its run dir, from its checkpoint; the rerun's new trial runs in a dir of its own (its job
    numbers had restarted at 0 and put it in trial 0's dir, where it found trial 0 finished and reported
    trial 0's result as its own)."""
    args = ["-m", "sweep=optuna", *TINY, "data.train_size=2048", "trainer.max_epochs=3", "monitor=off"]
    args += ["hydra.sweeper.storage=sqlite:///study.db", "hydra.sweeper.study_name=s", "hydra.sweep.dir=sw"]
    first = _start([*args, "hydra.sweeper.n_trials=2"], tmp_path, "first")
    _wait_for(tmp_path, "sw/1/checkpoints/epoch000-*.ckpt", first)
    first.kill()
    assert first.wait() == -signal.SIGKILL
    rerun = run_cli([*args, "hydra.sweeper.n_trials=3"], cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'study.db'}").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[2].params == trials[1].params and trials[3].params != trials[0].params
    sweep_dir = tmp_path / "sw"
    assert [t.user_attrs["run_dir"] for t in trials] == [str(sweep_dir / n) for n in ("0", "1", "1", "3")]
    assert "epoch000-" in _run_summary(sweep_dir / "1")["resumed_from"]
    assert _run_summary(sweep_dir / "3")["resumed_from"] is None  # trial 3 trained from scratch
    assert {r["trial"] for r in _rows(sweep_dir)} == {"0", "1", "2", "3"}


@pytest.mark.slow
def test_a_grid_sweep_signalled_at_any_moment_stops_with_one_line_and_its_rerun_ends_as_the_whole_grid(
    tmp_path: Path, reap: list[subprocess.Popen]
) -> None:
    """SIGTERM at seeded random moments of a two-trial grid (starting up, in a trial, between trials): exit
    75 and one line, never death by the signal (exit 143) with nothing said; rerun into the sweep dir its
    line names, the grid ends with the metrics of a grid that nothing stopped."""
    args = ["-m", "optim.lr=0.1,0.05", *TINY, "monitor=off"]
    started = time.monotonic()
    whole = run_cli([*args, "hydra.sweep.dir=whole"], tmp_path, **{KEY_ENV: "test-key"})
    assert whole.returncode == 0, whole.stderr[-2000:]
    took = time.monotonic() - started
    metrics = {r["overrides"]: (r["test_acc"], r["val_acc"]) for r in _rows(tmp_path / "whole")}
    for k, delay in enumerate(random.Random(0).uniform(1.0, took) for _ in range(3)):
        job = subprocess.Popen(
            [sys.executable, "-m", "train", *args, f"hydra.sweep.dir=sw{k}"],
            cwd=tmp_path,
            env={**os.environ, KEY_ENV: "test-key"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        reap.append(job)
        time.sleep(delay)
        job.send_signal(signal.SIGTERM)
        stderr = job.communicate(timeout=120)[1]
        if job.returncode == 0:
            continue  # it had ended
        assert job.returncode == 75 and "Traceback" not in stderr, (delay, stderr[-2000:])
        line = stderr.strip().splitlines()[-1]
        assert re.fullmatch(
            rf"Preempted: .+ — (rerun the same command with hydra\.sweep\.dir={tmp_path / f'sw{k}'} to "
            "resume|nothing was trained yet: rerun the same command)",
            line,
        ), (delay, line)
        rerun = run_cli([*args, f"hydra.sweep.dir=sw{k}"], tmp_path, **{KEY_ENV: "test-key"})
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert {r["overrides"]: (r["test_acc"], r["val_acc"]) for r in _rows(tmp_path / f"sw{k}")} == metrics


@pytest.mark.slow
@pytest.mark.xfail(
    reason="known, not yet fixed: a signal as the sweep ends can leave an OmegaConf error after the "
    "Preempted line (exit 75), or end the process by SIGTERM (exit 143): session 38's note",
    strict=False,
)
def test_an_optuna_study_signalled_at_any_moment_stops_with_one_line_and_its_rerun_completes_it(
    tmp_path: Path, reap: list[subprocess.Popen]
) -> None:
    """SIGTERM, SIGUSR1 and SIGUSR2 (a scheduler's) at seeded random moments of a two-trial study in a
    storage (starting up, in a trial, between trials): exit 75 and one line that says to rerun the same
    command, never death by the signal; the same command then ends the study with its two trials complete,
    a trial stopped mid-run resumed in its run dir."""
    args = ["-m", "sweep=optuna", *TINY, "monitor=off", "hydra.sweeper.n_trials=2"]
    args += ["hydra.sweeper.sampler.seed=0", "hydra.sweeper.study_name=s"]
    started = time.monotonic()
    whole = run_cli([*args, "hydra.sweeper.storage=sqlite:///whole.db", "hydra.sweep.dir=whole"], tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]
    took = time.monotonic() - started
    moments = random.Random(1).sample([random.Random(k).uniform(1.0, took) for k in range(3)], 3)
    for k, (delay, sig) in enumerate(zip(moments, PREEMPTING, strict=True)):
        command = [*args, f"hydra.sweeper.storage=sqlite:///s{k}.db", f"hydra.sweep.dir=sw{k}"]
        job = subprocess.Popen(
            [sys.executable, "-m", "train", *command],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        reap.append(job)
        time.sleep(delay)
        job.send_signal(sig)
        stderr = job.communicate(timeout=120)[1]
        if job.returncode != 0:  # else it had ended
            assert job.returncode == 75 and "Traceback" not in stderr, (sig, delay, stderr[-2000:])
            line = stderr.strip().splitlines()[-1]
            assert line.startswith("Preempted: ") and "rerun the same command" in line, (sig, delay, line)
        rerun = run_cli(command, tmp_path)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        trials = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / f's{k}.db'}").trials
        done = [t for t in trials if t.state.name == "COMPLETE"]
        assert len(done) == 2 and all(t.state.name in ("COMPLETE", "FAIL") for t in trials), (sig, trials)
        for stopped in (t for t in trials if t.state.name == "FAIL"):  # preempted: run again, in its dir
            again = [t for t in done if t.user_attrs["run_dir"] == stopped.user_attrs["run_dir"]]
            assert again and again[0].params == stopped.params, (sig, delay)
        assert [r["state"] for r in _rows(tmp_path / f"sw{k}")].count("complete") == 2


@pytest.mark.slow
def test_a_mistyped_search_parameter_fails_its_trial_once_and_the_corrected_command_runs_new_trials(
    tmp_path: Path,
) -> None:
    """A search parameter that is no config key: one line, exit 2, and its trial failed (it had been left
    running, and every rerun ran it again with its bad key). The corrected command asks new trials, and the
    trial that never ran counts neither toward ``n_trials`` nor as a failure."""
    args = ["-m", "sweep=optuna", *TINY, "trainer.max_epochs=1", "monitor=off", "hydra.sweeper.n_trials=2"]
    args += ["hydra.sweeper.storage=sqlite:///study.db", "hydra.sweeper.study_name=s", "hydra.sweep.dir=sw"]
    typo = run_cli([*args, "optim.lrr=interval(0.01,0.1)"], cwd=tmp_path)
    assert typo.returncode == 2 and typo.stderr.strip().splitlines()[-1].startswith(
        "ConfigError: optim.lrr is not a config key"
    ), typo.stderr[-2000:]
    fixed = run_cli(args, cwd=tmp_path)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'study.db'}").trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert "optim.lrr" in trials[0].params and all("optim.lrr" not in t.params for t in trials[1:])
    assert [r["state"] for r in _rows(tmp_path / "sw")] == ["complete", "complete", "fail"]


@pytest.mark.slow
def test_a_trial_preempted_twice_is_run_again_each_time_and_ends_as_one_nothing_stopped(
    tmp_path: Path,
) -> None:
    """A preemptible partition may stop a trial more than once: each SIGTERM queues it again (a killed
    sweeper's trial is run again once), in its run dir, and the third run completes it; the study has
    its one trial complete, not a failure over ``max_failure_rate``."""
    args = ["-m", "sweep=optuna", *TINY, "data.train_size=1024", "trainer.max_epochs=3", "monitor=off"]
    args += ["hydra.sweeper.storage=sqlite:///study.db", "hydra.sweeper.study_name=s", "hydra.sweep.dir=sw"]
    args += ["hydra.sweeper.n_trials=1", "checkpoint.every_n_steps=1"]
    saves = tmp_path / "sw" / "0" / "checkpoints" / "*-step*.ckpt"
    for k, step in enumerate((5, 40)):
        sweep = _start(args, tmp_path, f"run{k}")
        wait_for_checkpoint(saves, min_step=step)
        sweep.send_signal(signal.SIGTERM)
        assert sweep.wait(timeout=120) == 75, (tmp_path / f"run{k}.out").read_text()[-2000:]
    done = run_cli(args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'study.db'}").trials
    assert [t.state.name for t in trials] == ["FAIL", "FAIL", "COMPLETE"]
    assert {t.user_attrs["run_dir"] for t in trials} == {str(tmp_path / "sw" / "0")}
    assert len({tuple(t.params.items()) for t in trials}) == 1
    summary = _run_summary(tmp_path / "sw" / "0")
    assert "preempted-step" in summary["resumed_from"] and summary["epochs"] == 3


@pytest.mark.slow
def test_submitit_local_runs_two_rank_trials_concurrently_with_their_sampled_params(tmp_path: Path) -> None:
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.max_epochs=3"]
    parallel = ["hydra/launcher=submitit_local", "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=2"]
    storage = ["hydra.sweeper.storage=sqlite:///study.db", "hydra.sweeper.study_name=ddp"]
    # across 2 ranks, lr 1e-6 stays at val/acc 0.20 after epoch 1 (0.1 is at 0.33)
    sweep = ["optim.lr=choice(0.1,1e-6)", *_pruner(lower=0.25, n_warmup_steps=1)]
    done = run_cli([*OPTUNA_LR, *TINY, *ddp, *parallel, *storage, *sweep], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]

    [sweep_dir] = _sweep_dirs(tmp_path)
    rows = _rows(sweep_dir)
    assert [(r["state"], r["overrides"]) for r in rows] == [
        ("complete", "optim.lr=0.1"),
        ("pruned", "optim.lr=1e-06"),
    ]
    spans = []
    for row in rows:
        summary = _run_summary(row["run_dir"])
        assert [r["rank"] for r in summary["ranks"]] == [0, 1]
        assert len({r["config_sha256"] for r in summary["ranks"]}) == 1  # both ranks: the trial's config
        assert summary["lr"] == float(row["overrides"].removeprefix("optim.lr="))
        end = (Path(row["run_dir"]) / "run_summary.json").stat().st_mtime
        spans.append((end - summary["wall_s"], end))
    assert _run_summary(rows[1]["run_dir"])["epochs"] == 2  # pruned: both ranks stopped after epoch 1
    (start_a, end_a), (start_b, end_b) = spans
    assert start_a < end_b and start_b < end_a  # the two trials ran at the same time
    assert not (tmp_path / "outputs").exists()  # ranks > 0 made no run dirs of their own


@pytest.mark.slow
def test_a_failed_grid_trial_is_summarised_with_its_error_and_the_others_still_run(tmp_path: Path) -> None:
    done = run_cli(["-m", *TINY, "optim.lr=1e30,0.1"], cwd=tmp_path, COLUMNS="80")
    diverged = "NonFiniteError: the loss became NaN/inf at step 1"
    assert done.returncode == 2  # the first error, once every trial has run
    assert done.stderr.strip().splitlines()[-1].startswith(diverged)
    [sweep_dir] = _sweep_dirs(tmp_path)
    rows = _rows(sweep_dir)
    assert [(r["state"], r["overrides"].split()[-1]) for r in rows] == [
        ("complete", "optim.lr=0.1"),
        ("fail", "optim.lr=1e+30"),
    ]
    assert rows[1]["error"].startswith(diverged)
    assert _run_summary(rows[0]["run_dir"])["lr"] == 0.1
    # its table too, in 80 columns: each trial on one line with the override that differs
    table = done.stdout[done.stdout.index("sweep summary: maximize val/acc") :]
    fits_80_columns(table, [f"wrote {sweep_dir / 'sweep_summary.csv'}", f"trial 0 fail: {diverged}"])
    assert re.search(r"\n +1 +complete +[\d.]+ +[\d.]+ +optim\.lr=0\.1 *\n", table)  # best first
    assert re.search(r"\n +0 +fail +optim\.lr=1e\+30 *\n", table)  # no objective, no test_acc


DDP_TRIALS = [
    *TINY,
    "data.train_size=512",
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "checkpoint.every_n_steps=1",
]


def _kill_rank1_of_trial(sweep: subprocess.Popen, run_dir: Path) -> int:
    """SIGKILL rank 1 of the DDP trial in ``run_dir`` once it has saved a step; its pid."""
    _wait_for(run_dir / "checkpoints", "recovery-step*.ckpt", sweep)
    [rank1] = [pid for pid, env in process_tree(sweep.pid).items() if env.get("RANK") == "1"]
    os.kill(rank1, signal.SIGKILL)
    return rank1


def _rank_died(pid: int, hint: str) -> str:
    return f"RankDied: rank 1 (pid {pid}) was killed by SIGKILL — the job stops; {hint}"


@pytest.mark.slow
def test_a_grid_sweep_survives_a_killed_rank_of_one_ddp_trial(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    args = ["-m", *DDP_TRIALS, "optim.lr=0.1,0.05,0.02", f"hydra.sweep.dir={sweep_dir}"]
    sweep = _start(args, tmp_path, "grid")
    rank1 = _kill_rank1_of_trial(sweep, sweep_dir / "1")
    assert sweep.wait(timeout=400) == EXIT_RANK_DIED  # as a failed grid ends: with its first error

    rows = {r["overrides"].split()[-1]: r for r in _rows(sweep_dir)}
    assert {o: r["state"] for o, r in rows.items()} == {
        "optim.lr=0.1": "complete",
        "optim.lr=0.02": "complete",
        "optim.lr=0.05": "fail",
    }
    died = _rank_died(rank1, f"rerun the same command with hydra.sweep.dir={sweep_dir} to resume")
    assert rows["optim.lr=0.05"]["error"] == died
    assert (tmp_path / "grid.out").read_text().strip().splitlines()[-1] == died


@pytest.mark.slow
def test_an_optuna_sweep_survives_a_killed_rank_of_one_ddp_trial(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    space = ["optim.lr=choice(0.1,0.05)", "hydra.sweeper.n_trials=2", "hydra.sweeper.max_failure_rate=0.5"]
    args = [*OPTUNA_LR, *DDP_TRIALS, *space, f"hydra.sweep.dir={sweep_dir}"]
    sweep = _start(args, tmp_path, "optuna")
    rank1 = _kill_rank1_of_trial(sweep, sweep_dir / "0")
    assert sweep.wait(timeout=400) == 0

    rows = _rows(sweep_dir)
    assert [r["state"] for r in rows] == ["complete", "fail"]
    in_memory = f"rerun this trial's overrides with hydra.run.dir={sweep_dir / '0'} to resume it"
    in_memory += " (the study was in memory)"
    assert rows[1]["error"] == _rank_died(rank1, in_memory)


def test_search_space_takes_params_and_command_line_sweeps_which_win() -> None:
    params = {"optim.lr": "tag(log, interval(0.001, 0.5))", "data.batch_size": "choice(32, 64)", "seed": 3}
    space, fixed = _study.search_space(params, ["data.batch_size=range(16,65,16)", "optim.lr=0.1", "+x=1"])
    assert space == {"data.batch_size": IntDistribution(16, 64, step=16)}
    assert fixed == {"seed": "seed=3", "optim.lr": "optim.lr=0.1", "+x": "+x=1"}
    space, _ = _study.search_space(
        params, ["model.width=choice(8,16)", "module.label_smoothing=interval(0,0.2)"]
    )
    assert space["optim.lr"] == FloatDistribution(0.001, 0.5, log=True)
    assert space["model.width"] == CategoricalDistribution([8, 16])
    assert space["module.label_smoothing"] == FloatDistribution(0.0, 0.2)


@pytest.mark.parametrize(
    "run_dir", ["/runs/a b,c=d/0", "/runs/it's/1", "/runs/x\\'y/2", "/runs/end\\", "/runs/${x}/3"]
)
def test_a_rerun_is_placed_in_the_interrupted_trials_run_dir_whatever_its_name(run_dir: str) -> None:
    study = optuna.create_study()
    trial = study.ask({"optim.lr": FloatDistribution(0.01, 0.1)})
    assert not any(o.startswith("hydra.") for o in _study._overrides(trial, {}, slot=0))  # a first run
    trial.set_user_attr("run_dir", run_dir)  # as the trial records it, and its rerun inherits it
    parsed = OverridesParser.create().parse_overrides(_study._overrides(trial, {}, slot=0))
    hydra = {o.key_or_group: o.value() for o in parsed if o.key_or_group.startswith("hydra.")}
    place = OmegaConf.create(hydra)  # resolved by OmegaConf, as the job's config is
    assert Path(place["hydra.sweep.dir"]) / place["hydra.sweep.subdir"] == Path(run_dir)


def _settings(**changes: object) -> OptunaSweeperConf:
    values = dict(sampler=None, pruner=None, direction="maximize", storage=None, study_name=None, n_trials=4)
    values.update(n_jobs=1, max_failure_rate=0.25, heartbeat_interval=60, params={})
    return OptunaSweeperConf(**{**values, **changes})


def test_more_failed_trials_than_max_failure_rate_of_n_trials_stop_the_sweep() -> None:
    study = optuna.create_study(direction="maximize")
    for value in (0.5, None):
        _study._record(study, study.ask(), value=value, error=None if value else "ValueError: boom")
    _study._check_failures(study, _settings())  # 1 failure of at most 0.25 x 4
    _study._record(study, study.ask(), error="RuntimeError: CUDA out of memory")
    with pytest.raises(
        SweepError, match=r"2 of the study's trials failed, .* \(last: RuntimeError: CUDA out of"
    ):
        _study._check_failures(study, _settings())


def test_a_stored_study_is_found_by_its_name_and_keeps_its_direction(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    with pytest.raises(ConfigError, match=r"hydra\.sweeper\.study_name is not set — .*study_name=NAME"):
        _study._storage(_settings(storage=url), launcher=None)  # type: ignore[arg-type]
    settings = _settings(storage=url, study_name="lr")
    _study.open_study(settings, _study._storage(settings, launcher=None))  # type: ignore[arg-type]
    minimize = _settings(storage=url, study_name="lr", direction="minimize")
    with pytest.raises(
        ConfigError, match=r"study 'lr' in .* is to maximize, not minimize — use sweep.direction="
    ):
        _study.open_study(minimize, _study._storage(minimize, launcher=None))  # type: ignore[arg-type]
    study = _study.open_study(settings, _study._storage(settings, launcher=None))  # type: ignore[arg-type]
    logged = {"optim.lr": FloatDistribution(0.001, 0.5, log=True)}
    study.tell(study.ask(logged), 0.5)
    _study._check_space(study, {**logged, "model.width": CategoricalDistribution([8, 16])})  # a new one: fine
    with pytest.raises(
        ConfigError, match=r"^study 'lr' sampled optim\.lr from FloatDistribution\(.*log=True"
    ):
        _study._check_space(study, {"optim.lr": FloatDistribution(0.01, 0.1)})  # its ask raised mid-trial
    for url, why in [
        (f"sqlite:///{tmp_path / 'absent' / 'x.db'}", "unable to open database file"),
        ("sqlite3://x.db", "Can't load plugin: sqlalchemy.dialects:sqlite3"),
    ]:
        with pytest.raises(
            ConfigError, match=rf"^hydra\.sweeper\.storage=\S+ cannot be opened \({why}\) — check"
        ):
            _study._storage(_settings(storage=url, study_name="lr"), launcher=None)  # type: ignore[arg-type]


@pytest.mark.gpu
def test_trials_that_submitit_local_runs_together_take_gpus_of_their_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pynvml

    pynvml.nvmlInit()
    count = pynvml.nvmlDeviceGetCount()
    pynvml.nvmlShutdown()
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    for slot in range(3):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # what submitit gives every job with gpus_per_node=1
        take_own_share(OmegaConf.create({"number": slot, "id": slot, "slot": slot}))
        assert os.environ["CUDA_VISIBLE_DEVICES"] == str(slot % count)


def test_an_error_line_with_brackets_is_printed_as_text(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    error = (
        "RuntimeError: [/__w/pytorch/third_party/gloo/transport/tcp/pair.cc:561] Connection closed by peer"
    )
    row = dict.fromkeys(("trial", "objective", "test_acc", "val_acc", "overrides", "run_dir"))
    row = {**row, "trial": 0, "state": "fail", "error": error, "overrides": "optim.lr=0.1"}
    write_sweep_summary([row], tmp_path, "val/acc", "maximize")
    printed = capsys.readouterr().out
    assert error in " ".join(printed.split())  # printed (wrapped), where rich markup would raise on "[/__w"
    [written] = csv.DictReader((tmp_path / "sweep_summary.csv").open())
    assert written["error"] == error
