"""Networks of the demo: a small BatchNorm conv net for 8x8 digits and the
CIFAR networks of the papers' tables (ResNet-56, VGG-19 with BatchNorm)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

MODELS = ("small", "resnet56", "vgg19")


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SmallNet(nn.Module):
    """Three 3x3 conv + BatchNorm + ReLU layers (8x8 -> 4x4 -> 2x2 by max
    pooling), global average pooling and a linear classifier: every conv
    filter is prunable, the classifier's outputs are not."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        c1, c2, c3 = widths
        self.features = nn.Sequential(_conv_bn(in_channels, c1), _conv_bn(c1, c2), nn.MaxPool2d(2),
                                      _conv_bn(c2, c3), nn.MaxPool2d(2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c3, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    """ResNet basic block; a strided or widening block has a 1x1 conv + BN
    shortcut (option B), which the dependency tracer follows like any conv."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016): a 3x3 stem of 16 channels, three
    stages of ``n`` basic blocks (16, 32, 64 channels), depth ``6n + 2``."""

    def __init__(self, depth: int = 56, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        layers, c_in = [], 16
        for stage, width in enumerate((16, 32, 64)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(c_in, width, 2 if stage > 0 and i == 0 else 1))
                c_in = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


VGG19_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512)


class CifarVGG(nn.Module):
    """VGG-19 with BatchNorm for 32x32 inputs, as in network slimming and
    GReg's CIFAR experiments: 16 conv layers, a final 2x2 average pool and
    one linear classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, cfg=VGG19_CFG) -> None:
        super().__init__()
        layers, c_in = [], in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def build(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """The network the command line asks for."""
    if name == "small":
        return SmallNet(in_channels, num_classes)
    if name == "resnet56":
        return CifarResNet(56, num_classes, in_channels)
    if name == "vgg19":
        return CifarVGG(num_classes, in_channels)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def classifier_of(model: nn.Module) -> nn.Module:
    """The final linear layer, whose outputs (the classes) are never pruned."""
    return model.fc if isinstance(model, CifarResNet) else model.classifier
