"""DDP on CPU (gloo, 2 processes): one job under Hydra, correct sharding, metrics reduced over ranks."""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from conftest import NOISE, TINY, compose, run_cli
from datasets_on_disk import write_image_tree
from torch.utils.data import Dataset

from t240dist.config import validate
from t240dist.data import ImageDataModule
from t240dist.distributed import Agreed, ends_process_group, gather_ranks
from t240dist.module import ClassifierModule

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.max_epochs=1"]


def _summaries(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("run_summary.json"))]


@pytest.mark.slow
def test_two_rank_run_is_one_job_with_one_run_dir(tmp_path: Path) -> None:
    scaling = ["optim.lr_scaling=linear", "optim.reference_batch_size=32"]
    done = run_cli([*TINY, *DDP, *scaling, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    [summary] = _summaries(tmp_path)
    assert summary["world_size"] == 2 and summary["devices"] == ["cpu", "cpu"]
    assert [r["rank"] for r in summary["ranks"]] == [0, 1]
    assert len({r["config_sha256"] for r in summary["ranks"]}) == 1
    assert len({r["weights_sha256"] for r in summary["ranks"]}) == 1 and summary["ranks"][0]["weights_sha256"]
    assert 0 < summary["phases_s"]["input_wait"] < summary["train_s"]  # rank 0's loop, under the agent
    assert summary["global_step"] == 128 // (32 * 2)  # each rank takes half of every epoch
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no run dirs of the other rank
    assert len(list((tmp_path / "run").glob("events.out.tfevents.*"))) >= 1
    assert done.stdout.count("run summary") == 1
    assert summary["effective_batch_size"] == 64 and summary["lr"] == 0.2  # 0.1 x 64/32, linear rule
    assert "effective batch 64 = 32 per device × 2 device(s) × 1 node(s) × 1 accumulation" in done.stdout
    # the ranks log where the job's Hydra logging goes: the console and the run's train.log, quietly
    log = (tmp_path / "run" / "train.log").read_text()
    assert "starting fresh" in log and "`Trainer.fit` stopped" in log
    assert f"wrote {tmp_path / 'run' / 'run_summary.json'}" in log
    assert [line for line in (done.stdout + done.stderr).splitlines() if any(n in line for n in NOISE)] == []


@pytest.mark.slow
def test_multirun_over_two_ranks_runs_each_trial_once_with_the_same_params(tmp_path: Path) -> None:
    done = run_cli(["-m", *TINY, *DDP, "optim.lr=0.1,0.05"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    summaries = _summaries(tmp_path)
    assert len(summaries) == 2 and not (tmp_path / "outputs").exists()
    lrs = []
    for summary in summaries:
        trial = Path(summary["run_dir"])
        assert [r["rank"] for r in summary["ranks"]] == [0, 1]
        assert len({r["config_sha256"] for r in summary["ranks"]}) == 1  # both ranks: the trial's config
        lrs.append(float((trial / "config.yaml").read_text().split("lr: ")[1].split()[0]))
    assert sorted(lrs) == [0.05, 0.1]


class NumberedImages(Dataset):
    """Image i is filled with the number i, so a training step can tell which samples it got."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((1, 4, 4), float(i)), i % 2


class RecordSamples(pl.LightningModule):
    """Writes the sample numbers each rank trained on, per epoch, to ``out``."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out, self.layer, self.seen = out, torch.nn.Linear(16, 2), []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.seen += x[:, 0, 0, 0].long().tolist()
        return torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

    def on_train_epoch_end(self) -> None:
        path = self.out / f"rank{self.global_rank}-epoch{self.current_epoch}.json"
        path.write_text(json.dumps(self.seen))
        self.seen = []

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class EndsItsProcessGroup(pl.Callback):
    """Each spawned rank leaves through ``ends_process_group``, as real runs do: a gloo group left to
    interpreter teardown now and then aborts the rank (SIGABRT), and the test with it."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        ending = ExitStack()
        ending.enter_context(ends_process_group())
        atexit.register(ending.close)


def _spawned_trainer(**kwargs: object) -> pl.Trainer:
    return pl.Trainer(
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        callbacks=[EndsItsProcessGroup()],
        use_distributed_sampler=False,  # as t240dist runs: ImageDataModule shards
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_every_training_sample_is_seen_once_per_epoch_across_ranks(tmp_path: Path) -> None:
    data = ImageDataModule(validate(compose([*TINY, "data.batch_size=8"]))["data"], seed=0)
    data.train_set = NumberedImages(64)
    _spawned_trainer(max_epochs=2).fit(RecordSamples(tmp_path), datamodule=data)
    epochs = []
    for epoch in (0, 1):
        per_rank = [json.loads((tmp_path / f"rank{r}-epoch{epoch}.json").read_text()) for r in (0, 1)]
        assert len(per_rank[0]) == len(per_rank[1]) == 32
        assert sorted(per_rank[0] + per_rank[1]) == list(range(64))
        epochs.append(per_rank[0])
    assert epochs[0] != epochs[1]  # reshuffled every epoch


@pytest.mark.parametrize(
    "overrides",
    [
        [*TINY, "data.test_size=31"],
        ["data=digits", "data.test_fraction=0.0173", "data.on_gpu=true", "model.width=8"],  # 31 images
        [
            "data=imagefolder",
            "data.decode=device",
            "data.num_workers=1",
            "data.image_size=16",
            "model.width=8",
        ],
    ],
    ids=["dataloader", "on_gpu", "decoded_ahead"],
)
def test_two_rank_test_metrics_equal_a_one_process_evaluation(overrides: list[str], tmp_path: Path) -> None:
    if "data=imagefolder" in overrides:  # 14 files to test on, in shards of 7: batches of 4 and 3
        write_image_tree(tmp_path, per_class=7)
        overrides = [*overrides, f"data.root={tmp_path}"]
    conf = validate(compose([*overrides, "data.batch_size=4"]))
    data = ImageDataModule(conf["data"], conf["seed"])
    module = ClassifierModule.from_config(conf, data.info)
    one = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    expected = one.test(module, datamodule=data, verbose=False)[0]
    # a data module of its own: the first one holds the first trainer, whose loaders' generators do not
    # travel to spawned processes
    fresh = ImageDataModule(conf["data"], conf["seed"])
    got = _spawned_trainer().test(module, datamodule=fresh, verbose=False)[0]
    assert got["test/acc"] == expected["test/acc"] and got.get("test/top5") == expected.get("test/top5")
    assert got["test/loss"] == pytest.approx(expected["test/loss"], rel=1e-4)  # every sample once


@pytest.mark.slow
def test_two_torchrun_agents_on_loopback_complete_one_run(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rdzv = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}"]
    args = [*TINY, *DDP, "trainer.devices=1", "trainer.num_nodes=2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *rdzv, "--rdzv-id=pytest-job", "-m", "train", *args]
    agents = [
        subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]
    outputs = [agent.communicate(timeout=300)[0].decode() for agent in agents]
    assert all(agent.returncode == 0 for agent in agents), outputs[0][-2000:] + outputs[1][-2000:]
    [summary] = _summaries(tmp_path)
    assert summary["run_dir"] == str(tmp_path / "outputs" / "torchrun" / "pytest-job")
    assert summary["world_size"] == 2 and [r["rank"] for r in summary["ranks"]] == [0, 1]
    assert len({r["config_sha256"] for r in summary["ranks"]}) == 1
    # ranks started by torchrun's agents, not t240dist's: they end with one set of weights all the same
    assert len({r["weights_sha256"] for r in summary["ranks"]}) == 1 and summary["ranks"][0]["weights_sha256"]


PARTINGS = [["same", "same"], ["w0", "w1"]]  # each rank's weights, for each gather_ranks in turn


def _gather(rank: int, store: str, out: str) -> None:
    """A rank of a 2-process gloo group: gather_ranks with each of PARTINGS, and what each logged."""
    warned: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warned.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("t240dist.distributed").addHandler(handler)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    seen = []
    with ends_process_group():
        for weights in PARTINGS:
            seen.append({"ranks": gather_ranks({"seed": 0}, "cpu", weights[rank]), "warned": warned[:]})
            warned.clear()
    Path(out, f"{rank}.json").write_text(json.dumps(seen))


def test_rank_0_names_the_ranks_whose_weights_parted_from_its_own(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_gather, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    zero, one = (json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1))
    assert [[r["weights_sha256"] for r in seen["ranks"]] for seen in zero] == PARTINGS
    assert [seen["warned"] for seen in one] == [[], []]
    assert [seen["warned"] for seen in zero] == [
        [],
        [
            "ranks [1] ended training with weights other than rank 0's, which the checkpoints hold: an "
            "update differed between ranks (weights_sha256 in run_summary.json's ranks)"
        ],
    ]


def test_ranks_exchange_once_at_each_logging_step_whatever_the_micro_batches() -> None:
    """With 2 micro-batches a step, batch ends see global steps 0, 1, 1, 2, 2, ...: the micro-batch after an
    optimizer step shares its number, and must not exchange again (a wait, and a stop between micro-batches).
    """
    agreed = Agreed()
    seen = [agreed.due(step, every=2) for step in (0, 1, 1, 2, 2, 3, 3, 4, 4)]
    assert seen == [True, False, False, True, False, False, False, True, False]


FAKE_MPI = {  # an installed mpi4py whose world is FAKE_MPI_SIZE processes
    "mpi4py/__init__.py": "",
    "mpi4py/MPI.py": (
        "import os\n"
        "class _World:\n"
        "    def Get_size(self):\n"
        "        return int(os.environ.get('FAKE_MPI_SIZE', '1'))\n"
        "COMM_WORLD = _World()\n"
    ),
    "mpi4py-4.0.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: mpi4py\nVersion: 4.0.0\n",
}
# For each launcher, in order, the environment of a DDP Trainer made with t240dist's plugins, and whether
# MPI has been started by then (in a world of 2, only whether Lightning's detection finds MPI: its MPI
# environment would ask this stand-in for more than a size)
CHOICES = """
import os, sys
import pytorch_lightning as pl
from lightning_fabric.plugins.environments import MPIEnvironment
from t240dist.distributed import cluster_plugins
torchrun = dict(RANK="0", LOCAL_RANK="0", GROUP_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                MASTER_PORT="29500", TORCHELASTIC_RUN_ID="t")
mpirun = [{"OMPI_COMM_WORLD_SIZE": "1"}, {"OMPI_COMM_WORLD_SIZE": "2", "FAKE_MPI_SIZE": "2"}]
for launcher in ({}, torchrun, *mpirun):
    os.environ.update(launcher)
    plugins = cluster_plugins()
    if os.environ.get("FAKE_MPI_SIZE") == "2":
        name = "MPIEnvironment" if not plugins and MPIEnvironment.detect() else "other"
    else:
        trainer = pl.Trainer(accelerator="cpu", devices=1, strategy="ddp", logger=False, plugins=plugins)
        name = type(trainer.strategy.cluster_environment).__name__
    print(name, "mpi4py.MPI" in sys.modules)
    for key in launcher:
        del os.environ[key]
"""


def test_cluster_environment_is_lightnings_choice_without_starting_mpi_needlessly(tmp_path: Path) -> None:
    for name, text in FAKE_MPI.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI", "MV2_"))}
    env = {**env, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", CHOICES], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-4:] == [
        "LightningEnvironment False",  # no launcher: MPI is not started to ask for a world size
        "TorchElasticEnvironment False",
        "LightningEnvironment True",  # mpirun's variables: Lightning asks MPI, which says 1 process
        "MPIEnvironment True",
    ]
