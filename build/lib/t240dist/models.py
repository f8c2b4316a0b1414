"""Networks: a small fast CNN for small images, and any torchvision classifier by name."""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import nn


def build_model(cfg: dict[str, Any], in_channels: int, num_classes: int) -> nn.Module:
    """Build the network named by ``model.name`` for the data's channels and classes (untrained)."""
    if cfg["name"] == "small_cnn":
        net = SmallCNN(in_channels, num_classes, cfg["width"], cfg["dropout"])
    else:
        net = torchvision.models.get_model(cfg["name"], weights=None, num_classes=num_classes)
        if cfg["cifar_stem"]:
            net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        if in_channels != 3:
            _adapt_first_conv(net, in_channels)
    if cfg["channels_last"]:
        net = net.to(memory_format=torch.channels_last)
    return net


def compile_network(net: nn.Module, setting: bool | str) -> bool:
    """Compile ``net`` in place as ``model.compile`` says: false, true (torch.compile's default mode), a
    mode name, or step (default mode: ``ClassifierModule`` captures the whole step itself). Returns
    whether torch.compile's own CUDA graphs replay its steps, so that each training step must be marked.

    In place (``nn.Module.compile``), so state_dict keys stay those of the plain network.
    """
    if setting is False:
        return False
    mode = "default" if setting in (True, "step") else str(setting)
    net.compile(mode=mode)
    return mode in ("reduce-overhead", "max-autotune")


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks (one max-pool) and a linear head: ~0.2 M parameters at width 32."""

    def __init__(self, in_channels: int, num_classes: int, width: int, dropout: float) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        self.features = nn.Sequential(
            *block(in_channels, width),
            *block(width, 2 * width),
            nn.MaxPool2d(2),
            *block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _adapt_first_conv(net: nn.Module, in_channels: int) -> None:
    """Replace the first convolution so a 3-channel torchvision model takes grey (or n-channel) images."""
    for parent in net.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                bias = child.bias is not None
                conv = nn.Conv2d(
                    in_channels, child.out_channels, child.kernel_size, child.stride, child.padding, bias=bias
                )
                setattr(parent, name, conv)
                return
