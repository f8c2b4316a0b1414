"""``hydra/sweeper=t240dist_optuna`` (what ``sweep=optuna`` picks): an Optuna study of Hydra jobs.

The project's own sweeper because the stock hydra-optuna-sweeper 1.3 pins optuna<3 (whose sqlite studies then
need sqlalchemy<2), lets a NaN objective or one raising trial end the whole sweep, cannot resume a study, and
hides the trial from the job, so nothing can prune. The settings keep the stock plugin's names (``n_trials``,
``n_jobs``, ``storage``, ``study_name``, ``direction``, ``sampler``, ``params``, ``max_failure_rate``, plus
``pruner``); their values live in ``conf/sweep/optuna.yaml``.

Hydra imports every public module under ``hydra_plugins`` at start-up, so this one stays light: optuna is
imported by ``_study`` when a sweep runs. (No ``from __future__ import annotations``: Hydra executes the
module before registering it in ``sys.modules``, where dataclasses look up string annotations.)
"""

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import MISSING, DictConfig


@dataclass
class OptunaSweeperConf:
    """The sweeper's settings and their types; conf/sweep/optuna.yaml gives the values."""

    _target_: str = "hydra_plugins.t240dist_optuna.optuna_sweeper.OptunaSweeper"
    sampler: Any = MISSING  # {_target_: optuna.samplers.X, ...}
    pruner: Any = MISSING  # {_target_: optuna.pruners.X, ...} or null
    direction: str = MISSING
    storage: Any = MISSING  # an SQLAlchemy URL (sqlite:///PATH) or null (in memory)
    study_name: Any = MISSING
    n_trials: int = MISSING
    n_jobs: int = MISSING
    max_failure_rate: float = MISSING
    heartbeat_interval: int = MISSING
    params: Any = MISSING  # {config.key: Hydra sweep syntax}


ConfigStore.instance().store(group="hydra/sweeper", name="t240dist_optuna", node=OptunaSweeperConf)


class OptunaSweeper(Sweeper):
    """Asks Optuna for ``n_jobs`` trials at a time, runs them with Hydra's launcher, tells their results."""

    def __init__(self, **settings: Any) -> None:
        self.settings = OptunaSweeperConf(**settings)  # sampler and pruner arrive instantiated

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        from hydra_plugins.t240dist_optuna._study import run_study

        run_study(self.settings, self.launcher, self.config, arguments)
