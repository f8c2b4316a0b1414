"""On a CUDA machine (the device): real GPU runs. Run with `pytest -m gpu`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY, compose, decoded_both_ways, scalars, wait_for_checkpoint
from datasets_on_disk import write_cifar
from PIL import Image

from t240dist.checkpoint import KEY_ENV
from t240dist.config import compose_config
from t240dist.data import DeviceBatches, ImageDataModule
from t240dist.inference import evaluate, predict
from t240dist.run import train

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA GPU: run them on the device with `pytest -m gpu`")


def test_auto_picks_the_gpu_and_bf16_trains(tmp_path: Path) -> None:
    summary = train(compose([*TINY, "trainer.precision=bf16-mixed"]), run_dir=tmp_path)
    assert summary["devices"] == [torch.cuda.get_device_name(0)] and summary["precision"] == "bf16-mixed"
    assert summary["test_loss"] == summary["test_loss"]  # finite, not NaN


class StrictSync(pl.Callback):
    """CUDA's sync debug mode set to raise over whole training steps 1 and 2, Lightning's loop included."""

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == 1:
            torch.cuda.set_sync_debug_mode("error")
        elif trainer.global_step == 3:
            torch.cuda.set_sync_debug_mode("default")


def _add_callbacks(monkeypatch: pytest.MonkeyPatch, *extra: pl.Callback) -> None:
    """Every Trainer the run builds gets ``extra`` callbacks too."""
    original = pl.Trainer

    def trainer_with_extra(*args: object, callbacks: list, **kwargs: object) -> pl.Trainer:
        return original(*args, callbacks=[*callbacks, *extra], **kwargs)

    monkeypatch.setattr(pl, "Trainer", trainer_with_extra)


@pytest.mark.parametrize("on_gpu", ["auto", "false"])  # batches made on the GPU; a DataLoader's, copied
def test_training_steps_never_synchronise_the_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_gpu: str
) -> None:
    """Logging steps included: every step logs its curves and refreshes the progress bar."""
    _add_callbacks(monkeypatch, StrictSync())
    overrides = [*TINY, f"data.on_gpu={on_gpu}", "trainer.log_every_n_steps=1"]
    overrides += ["trainer.enable_progress_bar=true"]
    overrides += ["module.mixup_alpha=0.2", "model.channels_last=true", "trainer.precision=bf16-mixed"]
    try:
        assert train(compose(overrides), run_dir=tmp_path)["global_step"] == 8
    finally:
        torch.cuda.set_sync_debug_mode("default")
    curves = scalars(tmp_path)  # written once they reached the host, every point, timed by CUDA events
    for tag in ("train/loss", "train/acc", "train/lr", "perf/images_per_s"):
        assert [step for step, _ in curves[tag]] == list(range(8)), tag
    assert all(v > 0 for _, v in curves["perf/images_per_s"])


def test_a_host_batch_reaches_the_gpu_whole_while_the_training_stream_is_busy() -> None:
    """The copy runs on a stream of its own; what the training stream queues next sees all of it."""
    data = ImageDataModule(compose([*TINY, "data.on_gpu=false"])["data"], seed=0)
    x, y = torch.rand(256, 3, 224, 224).pin_memory(), torch.arange(256).pin_memory()
    busy = torch.rand(2048, 2048, device="cuda")
    for _ in range(50):  # queued on the training stream ahead of the copy
        busy = torch.sin(busy @ busy)
    moved = data.transfer_batch_to_device((x, y), torch.device("cuda", 0), 0)
    assert isinstance(moved, tuple) and all(t.is_cuda for t in moved)
    assert torch.equal((moved[0] + 0).cpu(), x) and torch.equal((moved[1] + 0).cpu(), y)


class TrainLoader(pl.Callback):
    """Keeps the training loader the run got."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.loader = trainer.train_dataloader


def test_on_gpu_auto_makes_batches_on_the_gpu_without_a_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data.on_gpu=auto holds a small CIFAR copy on the GPU; crops, flips and steps never wait for it."""
    write_cifar(tmp_path, per_batch=64)  # 288 training images: 9 batches of 32 an epoch
    kept = TrainLoader()
    _add_callbacks(monkeypatch, StrictSync(), kept)
    overrides = ["data=cifar10", f"data.root={tmp_path}", "data.batch_size=32", "model.width=8"]
    overrides += ["trainer.max_epochs=2", "trainer.log_every_n_steps=50", "trainer.precision=bf16-mixed"]
    try:
        summary = train(compose(overrides), run_dir=tmp_path / "run")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert isinstance(kept.loader, DeviceBatches) and kept.loader.images.device.type == "cuda"
    assert summary["global_step"] == 18 and summary["test_loss"] == summary["test_loss"]


def test_real_nvml_sees_the_training_gpu(tmp_path: Path) -> None:
    """Real NVML during a real run: the job's GPU by UUID, plausible utilization and power, energy growing."""
    overrides = [
        "data=synthetic",
        "data.image_size=32",
        "data.train_size=16384",
        "data.batch_size=256",
        "data.num_workers=4",
        "model=resnet18_cifar",
        "trainer.max_epochs=2",
        "trainer.precision=bf16-mixed",
        "trainer.log_every_n_steps=5",
        "trainer.enable_progress_bar=false",
        "monitor.interval_s=0.1",
        "monitor.slow_interval_s=0.3",
    ]
    summary = train(compose(overrides), run_dir=tmp_path)
    tags = scalars(tmp_path)
    assert {"gpu/util_pct/rank0", "gpu/power_w/rank0", "gpu/energy_j/rank0", "gpu/mem_used_gib/rank0"} <= set(
        tags
    )
    assert max(v for _, v in tags["gpu/util_pct/rank0"]) > 20
    assert all(20 < v < 1500 for _, v in tags["gpu/power_w/rank0"])
    energy = [v for _, v in tags["gpu/energy_j/rank0"]]
    assert energy == sorted(energy) and energy[-1] > energy[0] >= 0  # joules since the start
    assert summary["energy_j"] > 0 and 0 < summary["energy_per_image_j"] < 1
    assert 0 < summary["gpu_mem_peak_gib"] < 200 and summary["gpu_util_mean"] > 0


def test_nvml_uuid_matches_cuda_device_whatever_cuda_visible_devices_says() -> None:
    import pynvml

    from t240dist.telemetry import job_gpu_uuids

    [uuid] = job_gpu_uuids(pynvml, torch.device("cuda", 0))
    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        assert pynvml.nvmlDeviceGetUUID(handle) == uuid
    finally:
        pynvml.nvmlShutdown()
    by_uuid = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.get_device_properties(0).uuid)"],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": uuid},
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"GPU-{by_uuid.stdout.strip()}" == uuid


def test_evaluate_and_predict_run_on_the_gpu_in_bf16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "test-key")
    bf16 = [*TINY, "trainer.precision=bf16-mixed", "model.channels_last=true"]
    run = train(compose(bf16), run_dir=tmp_path / "run")
    ckpt = f"ckpt={run['best_checkpoint']}"
    scored = evaluate(compose_config([ckpt], "evaluate"), [ckpt], tmp_path / "eval")
    assert scored["test_acc"] == run["test_acc"] and scored["device"] == torch.cuda.get_device_name(0)

    (tmp_path / "images").mkdir()
    for i, size in enumerate((8, 30, 100)):
        pixels = np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "images" / f"{i}.png")
    overrides = [ckpt, f"input={tmp_path / 'images'}", f"output={tmp_path / 'preds.csv'}"]
    overrides.append("data.num_workers=2")
    summary = predict(compose_config(overrides, "predict"), overrides, tmp_path / "predict")
    assert summary["images"] == 3 and summary["skipped_files"] == 0
    assert summary["device"] == torch.cuda.get_device_name(0) and summary["precision"] == "bf16-mixed"
    assert len((tmp_path / "preds.csv").read_text().splitlines()) == 1 + 3


@pytest.mark.parametrize("fast_path", ["model.compile=step", "model.compile=reduce-overhead"])
def test_cuda_graph_fast_path_follows_the_eager_loss_curve(tmp_path: Path, fast_path: str) -> None:
    """The whole step replayed as one CUDA graph (model.compile=step), or torch.compile's CUDA graphs of the
    network (reduce-overhead), trains like eager: same first loss, same descent, same step count."""
    base = [
        "data=synthetic",
        "data.train_size=4096",
        "data.batch_size=256",
        "model=resnet18_cifar",
        "model.channels_last=true",
        # a learning rate without a loss spike: at 0.1 the early loss jumps to ~13, which amplifies the bf16
        # differences of compiled and eager kernels (early means 12 % apart on an H200, both deterministic)
        "optim.lr=0.02",
        "trainer.precision=bf16-mixed",
        "trainer.max_epochs=4",  # validation every 16 steps: the captured step must keep learning after it
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
    ]
    eager = train(compose(base), run_dir=tmp_path / "eager")
    fast = train(compose([*base, fast_path]), run_dir=tmp_path / "fast")
    curves = [[v for _, v in scalars(tmp_path / run)["train/loss"]] for run in ("eager", "fast")]
    assert len(curves[0]) == len(curves[1]) == eager["global_step"] == fast["global_step"] == 64
    first, early = [c[0] for c in curves], [sum(c[:16]) / 16 for c in curves]
    assert abs(first[0] - first[1]) < 0.01 * first[0]  # the same weights and batch: bf16 differences only
    assert abs(early[0] - early[1]) < 0.02 * early[0]  # the descent (0.6 % apart on an H200)
    assert max(c[-1] for c in curves) < 0.01 * min(first)  # and both learn the task


@pytest.mark.parametrize("compile_mode", ["false", "step"])
def test_a_killed_bf16_deterministic_gpu_run_resumes_to_the_same_weights(
    tmp_path: Path, compile_mode: str
) -> None:
    """SIGKILL in the second epoch, then the same command: GPU-resident data, bf16, deterministic kernels,
    eager and the fast path (whose first steps after a resume run eagerly while it recaptures)."""
    args = [
        "data.on_gpu=true",
        "trainer.precision=bf16-mixed",
        "trainer.deterministic=true",
        "trainer.max_epochs=3",
        "trainer.enable_progress_bar=false",
        "checkpoint.every_n_steps=5",
        f"model.compile={compile_mode}",
    ]
    expected = train(compose(args), run_dir=tmp_path / "uninterrupted")
    run_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "train", *args, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, KEY_ENV: "test-key"}
    killed = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    steps_per_epoch = expected["global_step"] // 3
    wait_for_checkpoint(run_dir / "checkpoints" / "recovery-*.ckpt", min_step=steps_per_epoch + 5)
    killed.kill()
    killed.wait()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = json.loads((run_dir / "run_summary.json").read_text())
    assert resumed["resumed_from"] and resumed["global_step"] == expected["global_step"]
    assert resumed["model_fingerprint"] == expected["model_fingerprint"]
    assert resumed["test_acc"] == expected["test_acc"]


def test_ddp_on_one_gpu_runs_through_the_agent_on_nccl(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            *TINY,
            "trainer=ddp",
            "trainer.devices=1",
            f"hydra.run.dir={tmp_path}",
        ],
        env={**os.environ, KEY_ENV: "test-key"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert summary["backend"] == "nccl" and summary["world_size"] == 1
    assert summary["devices"] == [torch.cuda.get_device_name(0)]


def test_image_folders_are_decoded_on_the_gpu_like_the_workers_decode_them(tmp_path: Path) -> None:
    from datasets_on_disk import write_image_tree

    from t240dist.config import validate
    from t240dist.data import ImageDataModule

    write_image_tree(tmp_path / "tree", per_class=6)
    tree = [f"data.root={tmp_path / 'tree'}", "data.decode=device"]
    args = ["data=imagefolder", *tree, "data.image_size=32", "data.batch_size=8"]
    conf = validate(compose(args))
    workers = ImageDataModule({**conf["data"], "decode": "workers", "num_workers": 0}, 0)
    device = ImageDataModule({**conf["data"], "num_workers": 0}, 0)
    assert next(iter(device.val_dataloader()))[0].is_cuda
    for y, labels, grey_levels in decoded_both_ways(workers, device):
        # nvJPEG's IDCT is not libjpeg's: a few grey levels apart at most, about one on average
        assert torch.equal(labels, y) and float(grey_levels.max()) < 12 and float(grey_levels.mean()) < 1.5
    default = [a for a in args if a != "data.decode=device"]  # auto: decoded on the GPU
    summary = train(compose([*default, "trainer.max_epochs=2", "model.width=8"]), run_dir=tmp_path / "run")
    assert summary["global_step"] > 0 and summary["test_loss"] == summary["test_loss"]
    assert "decode: device" in (tmp_path / "run" / "config.yaml").read_text()


def test_jpegs_of_every_flavour_are_decoded_by_nvjpeg_like_the_workers_decode_them(tmp_path: Path) -> None:
    """Progressive, optimised, 4:2:2 and 4:4:4, restart markers, an EXIF orientation, grey, 1×1: nvJPEG's
    batched decoder takes them all (its hardware engine only some; torchvision hands it the rest)."""
    from datasets_on_disk import write_jpeg_flavours

    from t240dist.config import validate
    from t240dist.data import ImageDataModule

    write_jpeg_flavours(tmp_path)
    plain = ["data.augment.crop=none", "data.augment.hflip=false", "data.batch_size=16", "data.image_size=16"]
    conf = validate(compose(["data=imagefolder", f"data.root={tmp_path}", "data.decode=device", *plain]))
    workers = ImageDataModule({**conf["data"], "decode": "workers", "num_workers": 0}, 0)
    device = ImageDataModule({**conf["data"], "num_workers": 0}, 0)
    assert next(iter(device.val_dataloader()))[0].is_cuda
    for y, labels, grey_levels in decoded_both_ways(workers, device):
        assert torch.equal(labels, y) and float(grey_levels.max()) < 12 and float(grey_levels.mean()) < 1.5


def test_a_jpeg_whose_scan_is_garbled_is_decoded_by_nvjpeg_without_an_error(tmp_path: Path) -> None:
    """nvJPEG does not report a garbled scan (its markers intact), where libjpeg and Pillow do (the CPU
    test): the batch comes out whole and finite, that file's pixels whatever the decoder made of them, and
    ``data.on_corrupt=error`` does not stop the run (the README says so)."""
    from datasets_on_disk import write_garbled_jpeg, write_image_tree

    from t240dist.config import validate
    from t240dist.data import ImageDataModule

    write_image_tree(tmp_path, per_class=4)
    write_garbled_jpeg(tmp_path / "val" / "cat" / "garbled.jpg")
    args = ["data=imagefolder", f"data.root={tmp_path}", "data.image_size=16", "data.decode=device"]
    conf = validate(compose([*args, "data.augment.crop=none", "data.batch_size=64", "data.num_workers=0"]))
    x, y = next(iter(ImageDataModule(conf["data"], 0).val_dataloader()))
    assert (
        x.is_cuda and x.shape[0] == y.shape[0] == len(list(tmp_path.glob("val/*/*"))) and x.isfinite().all()
    )


@pytest.mark.parametrize(("size", "sizes"), [(224, (40, 1600)), (32, (8, 200))])
def test_one_launch_crops_flips_and_fits_a_batch_on_the_gpu_as_torchvision_does(
    size: int, sizes: tuple[int, int]
) -> None:
    """The batch kernel, compiled for this GPU, against torchvision's per-image transforms on the same GPU:
    ImageNet-size files and larger (boxes shrunk up to 7×), small ones enlarged; and it is what
    ``data.decode=device`` uses here."""
    from conftest import crop_cases, crop_info, torchvision_crop

    from t240dist import crops
    from t240dist.data import _crop_resizer

    assert _crop_resizer(torch.device("cuda")) is crops.crop_resize
    images, boxes, flips = crop_cases(size, 64, sizes, device="cuda")
    info = crop_info(size, size * 8 // 7, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    batch = crops.crop_resize(images, boxes, flips, info)
    cases = zip(images, boxes, flips, strict=True)
    expected = torch.stack([torchvision_crop(*case, info) for case in cases])
    grey_levels = (batch - expected).abs() * torch.tensor(info.std, device="cuda").view(3, 1, 1) * 255
    # torch's CUDA resize sums the taps in another order than the kernel (the CPU's, under Triton's
    # interpreter, agrees to 1e-3): 0.016 of a grey level apart at most on an H200
    assert float(grey_levels.max()) < 0.05, grey_levels.amax(dim=(1, 2, 3))


def test_imagenet_size_jpegs_decoded_ahead_stay_whole_while_a_resnet_trains(tmp_path: Path) -> None:
    """nvJPEG's hardware engine (vision#9606) corrupted a ResNet-50 run (NaN at step 3) where small images did
    not: decode ImageNet-size batches ahead while a ResNet-50 trains on the training stream, and compare each
    batch with the same batch decoded on an idle GPU."""
    import torchvision

    from t240dist.config import validate
    from t240dist.data import ImageDataModule

    rng = np.random.default_rng(0)
    for k in range(96):
        folder = tmp_path / "tree" / ("train", "val")[k % 2] / f"c{k % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        field = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).resize((500, 375))
        grain = np.asarray(field, dtype=np.float32) + rng.normal(0, 10, (375, 500, 3))
        Image.fromarray(grain.clip(0, 255).astype(np.uint8)).save(folder / f"{k}.jpg", quality=90)
    tree = ["data=imagefolder", f"data.root={tmp_path / 'tree'}", "data.decode=device", "data.num_workers=2"]
    conf = validate(compose([*tree, "data.image_size=224", "data.batch_size=8"]))
    data = ImageDataModule(conf["data"], 0)
    cuda = torch.device("cuda")
    reference = [batch.decode(cuda, data.info)[0] for batch in data.val_dataloader().loader]
    torch.cuda.synchronize()
    model = torchvision.models.resnet50(num_classes=3).to(cuda, memory_format=torch.channels_last)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = 0
    for (images, labels), expected in zip(data.val_dataloader(), reference, strict=True):
        for _ in range(3):  # queue steps that free and take memory while the next batches decode
            with torch.autocast("cuda", torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
        assert float((images - expected).abs().max()) < 0.05 and torch.isfinite(loss), batches
        batches += 1
    assert batches == len(reference) == 6
