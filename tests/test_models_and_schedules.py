"""Networks build for any data shape; schedules follow their documented curves."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import compose
from torch import nn

from t240dist.config import validate
from t240dist.models import build_model
from t240dist.optim import build_optimizer, build_scheduler, scaled_lr


def _model_cfg(*overrides: str) -> dict:
    return validate(compose(list(overrides)))["model"]


def test_resnet18_cifar_stem_keeps_32px_resolution() -> None:
    net = build_model(_model_cfg("model=resnet18_cifar"), in_channels=3, num_classes=10)
    assert (
        net.conv1.kernel_size == (3, 3)
        and net.conv1.stride == (1, 1)
        and isinstance(net.maxpool, nn.Identity)
    )
    features = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
    assert features(torch.randn(2, 3, 32, 32)).shape[-1] == 32
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(("overrides", "channels"), [
    (["model=resnet50"], 3),
    (["model=torchvision", "model.name=mobilenet_v3_small"], 1),
    (["model=torchvision", "model.name=efficientnet_b0", "model.channels_last=true"], 2),
    (["model=small_cnn"], 1),
])  # fmt: skip
def test_any_classifier_takes_the_datas_channels_and_classes(overrides: list[str], channels: int) -> None:
    net = build_model(_model_cfg(*overrides), in_channels=channels, num_classes=7).eval()
    with torch.no_grad():
        assert net(torch.randn(2, channels, 64, 64)).shape == (2, 7)


def _lrs(*overrides: str, steps: int = 100) -> list[float]:
    conf = validate(compose(list(overrides)))
    net = nn.Linear(4, 2)
    optimizer = build_optimizer(net, conf["optim"])
    scheduler = build_scheduler(optimizer, conf["sched"], steps)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return lrs


def test_warmup_cosine_ramps_then_decays_to_the_floor() -> None:
    lrs = _lrs("optim.lr=0.1", "sched.warmup_fraction=0.1", "sched.min_lr_ratio=0.01")
    assert lrs[0] == pytest.approx(0.01)  # warmup_start_factor 0.1 of lr
    assert max(lrs) == pytest.approx(0.1) and lrs.index(max(lrs)) == 10
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[-1] == pytest.approx(0.001, rel=0.05)


def test_onecycle_peaks_at_lr_after_pct_start() -> None:
    lrs = _lrs("optim.lr=0.2", "sched=onecycle", "sched.pct_start=0.3")
    assert max(lrs) == pytest.approx(0.2, rel=1e-3) and 25 <= lrs.index(max(lrs)) <= 31
    assert lrs[0] == pytest.approx(0.2 / 25) and lrs[-1] < lrs[0]


def test_no_schedule_keeps_lr_and_decay_skips_norms_and_biases() -> None:
    assert set(_lrs("sched=none", "optim=adagrad")) == {0.01}
    conf = validate(compose(["optim.weight_decay=0.1"]))
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    decay, no_decay = build_optimizer(net, conf["optim"]).param_groups
    assert decay["weight_decay"] == 0.1 and len(decay["params"]) == 1
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3


def test_lr_scaling_rules_follow_the_effective_batch() -> None:
    optim = validate(compose(["optim.lr=0.1", "optim.reference_batch_size=256"]))["optim"]
    assert scaled_lr(optim, 1024) == 0.1
    assert scaled_lr({**optim, "lr_scaling": "linear"}, 1024) == pytest.approx(0.4)
    assert scaled_lr({**optim, "lr_scaling": "sqrt"}, 1024) == pytest.approx(0.2)
