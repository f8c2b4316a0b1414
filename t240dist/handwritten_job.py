"""The whole job as a good engineer writes it by hand: the baseline of ``train.bench bench.task=job``.

``python -m t240dist.handwritten_job SPEC.json RESULT.json``. It does the work of a t240dist run of the same
config, with nothing but torch and torchvision: CIFAR-10 python batches read into device memory as uint8,
the same train/val split, a random crop after zero padding and a flip per image made on the device, the
torchvision network (CIFAR stem), channels_last, autocast, SGD or AdamW with weight decay off for norms and
biases, the same per-step schedule, label smoothing; validation after every epoch, a checkpoint written
and fsynced after every epoch (the best also kept), and the test split scored with the best weights.
It imports nothing of t240dist but this file, so its process pays only for what such a script needs.

RESULT.json holds what the benchmark compares: seconds from process start to the first step's end, the
training images per second (the first step and validation left out), and the seconds spent in
validation, in checkpoints and in the test, with the test accuracy.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn


def main(spec: dict[str, Any]) -> dict[str, Any]:
    """Train, validate, checkpoint and test as ``spec`` says; return the timings and the test accuracy."""
    torch.manual_seed(spec["seed"])
    device = torch.device("cuda" if torch.cuda.is_available() and spec["accelerator"] != "cpu" else "cpu")
    torch.backends.cudnn.benchmark = True  # what a hand-written GPU script turns on
    train, val, test, mean, std = _cifar_on(
        device, Path(spec["root"]), spec["val_fraction"], spec["split_seed"]
    )
    net = _network(spec, device)
    optimizer = _optimizer(net, spec)
    steps_per_epoch = len(train[1]) // spec["batch_size"]
    scheduler = _scheduler(optimizer, spec, steps_per_epoch * spec["epochs"])
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if spec["precision"] == "bf16-mixed"
        else nullcontext()
    )
    folder = Path(spec["out_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    seconds = {"train": 0.0, "validation": 0.0, "checkpoints": 0.0, "test": 0.0}
    first_step_at, images_after_first, best_loss = None, 0, math.inf
    window = [time.time(), 0.0]
    for epoch in range(spec["epochs"]):
        net.train()
        started = time.perf_counter()
        order = torch.randperm(len(train[1]), device=device)
        for step in range(steps_per_epoch):
            index = order[step * spec["batch_size"] : (step + 1) * spec["batch_size"]]
            x = _augment(train[0][index], spec["padding"], spec["hflip"])
            x = _normalise(x, mean, std, spec["channels_last"])
            with autocast:
                loss = F.cross_entropy(net(x), train[1][index], label_smoothing=spec["label_smoothing"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if first_step_at is None:
                _sync(device)
                first_step_at = _process_age_s()
                started = time.perf_counter()  # the first step's one-off costs stay out of the rate
            else:
                images_after_first += len(index)
        _sync(device)
        seconds["train"] += time.perf_counter() - started

        started = time.perf_counter()
        val_loss, _ = _evaluate(net, val, mean, std, spec, autocast)
        seconds["validation"] += time.perf_counter() - started

        started = time.perf_counter()
        state = {
            "model": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
        }
        _save(state, folder / "last.pt")
        if val_loss < best_loss:
            best_loss = val_loss
            os.link(folder / "last.pt", folder / "best.tmp")
            os.replace(folder / "best.tmp", folder / "best.pt")
        seconds["checkpoints"] += time.perf_counter() - started
    window[1] = time.time()

    started = time.perf_counter()
    net.load_state_dict(torch.load(folder / "best.pt", map_location=device, weights_only=True)["model"])
    _, test_acc = _evaluate(net, test, mean, std, spec, autocast)
    seconds["test"] = time.perf_counter() - started
    return {
        "first_step_s": first_step_at,
        "train_images_per_s": images_after_first / seconds["train"],
        "validation_s": seconds["validation"],
        "checkpoint_s": seconds["checkpoints"],
        "test_s": seconds["test"],
        "test_acc": test_acc,
        "train_window": window,
    }


Split = tuple[torch.Tensor, torch.Tensor]  # uint8 images (N, C, H, W) and labels, on the device


def _cifar_on(
    device: torch.device, root: Path, val_fraction: float, split_seed: int
) -> tuple[Split, Split, Split, torch.Tensor, torch.Tensor]:
    """The CIFAR-10 python batches in device memory: train and val carved from the training batches (as
    t240dist carves them), the test batch; the train split's per-channel mean and std."""

    def load(names: list[str]) -> Split:
        batches = [pickle.loads((root / name).read_bytes(), encoding="bytes") for name in names]
        images = torch.cat([torch.as_tensor(b[b"data"]).view(-1, 3, 32, 32) for b in batches])
        labels = torch.cat([torch.as_tensor(b[b"labels"], dtype=torch.long) for b in batches])
        return images, labels

    images, labels = load([f"data_batch_{i}" for i in range(1, 6)])
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    n_val = round(len(labels) * val_fraction)
    val_idx, train_idx = order[:n_val], order[n_val:]
    on = [
        (x.to(device), y.to(device))
        for x, y in (
            (images[train_idx], labels[train_idx]),
            (images[val_idx], labels[val_idx]),
            load(["test_batch"]),
        )
    ]
    pixels = on[0][0].float().div_(255)
    mean, std = pixels.mean(dim=(0, 2, 3)), pixels.std(dim=(0, 2, 3))
    return on[0], on[1], on[2], mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)


def _network(spec: dict[str, Any], device: torch.device) -> nn.Module:
    net = torchvision.models.get_model(spec["model"], weights=None, num_classes=10)
    if spec["cifar_stem"]:
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net = net.to(device)
    return net.to(memory_format=torch.channels_last) if spec["channels_last"] else net


def _optimizer(net: nn.Module, spec: dict[str, Any]) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or AdamW; no weight decay on norms and biases."""
    decay = [p for p in net.parameters() if p.ndim > 1]
    rest = [p for p in net.parameters() if p.ndim <= 1]
    groups = [{"params": decay}, {"params": rest, "weight_decay": 0.0}]
    if spec["optimizer"] == "sgd":
        return torch.optim.SGD(
            groups,
            lr=spec["lr"],
            momentum=spec["momentum"],
            nesterov=spec["nesterov"],
            weight_decay=spec["weight_decay"],
        )
    return torch.optim.AdamW(groups, lr=spec["lr"], weight_decay=spec["weight_decay"])


def _scheduler(optimizer: torch.optim.Optimizer, spec: dict[str, Any], total: int) -> Any:
    """One-cycle, or a constant rate, stepped every step."""
    if spec["schedule"] == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=spec["lr"],
            total_steps=total,
            pct_start=spec["pct_start"],
            div_factor=spec["div_factor"],
            final_div_factor=spec["final_div_factor"],
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def _augment(images: torch.Tensor, padding: int, hflip: bool) -> torch.Tensor:
    """A random crop after zero padding and a random horizontal flip, per image, in one gather."""
    n, _, h, w = images.shape
    device = images.device
    shifts = torch.randint(2 * padding + 1, (2, n), device=device)
    flips = torch.rand(n, device=device) < 0.5 if hflip else torch.zeros(n, dtype=torch.bool, device=device)
    padded = F.pad(images, (padding,) * 4)
    rows = shifts[0, :, None] + torch.arange(h, device=device)
    columns = torch.arange(w, device=device)
    columns = shifts[1, :, None] + torch.where(flips[:, None], w - 1 - columns, columns)
    return padded[
        torch.arange(n, device=device)[:, None, None, None],
        torch.arange(images.shape[1], device=device)[None, :, None, None],
        rows[:, None, :, None],
        columns[:, None, None, :],
    ]


def _normalise(
    images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels_last: bool
) -> torch.Tensor:
    x = images.float().div_(255).sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _evaluate(
    net: nn.Module, split: Split, mean: torch.Tensor, std: torch.Tensor, spec: dict[str, Any], autocast: Any
) -> tuple[float, float]:
    """Mean loss and accuracy over a split, summed on the device and read once."""
    net.eval()
    total = torch.zeros(2, device=split[0].device)
    with torch.inference_mode(), autocast:
        for start in range(0, len(split[1]), spec["batch_size"]):
            x = _normalise(split[0][start : start + spec["batch_size"]], mean, std, spec["channels_last"])
            y = split[1][start : start + spec["batch_size"]]
            logits = net(x)
            total[0] += F.cross_entropy(logits.float(), y, reduction="sum")
            total[1] += (logits.argmax(dim=1) == y).sum()
    loss, correct = (total / len(split[1])).tolist()
    return loss, correct


def _save(state: dict[str, Any], path: Path) -> None:
    """torch.save to a temp file, fsync, rename: a crash never leaves half a checkpoint."""
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _process_age_s() -> float:
    """Seconds since this process started (Linux /proc), imports included."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    spec_file, result_file = map(Path, sys.argv[1:3])
    result_file.write_text(json.dumps(main(json.loads(spec_file.read_text())), indent=2) + "\n")
