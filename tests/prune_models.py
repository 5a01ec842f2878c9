"""Tiny models and a deterministic training loop for the regkern.prune tests
(no tests here)."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regkern

# Kernel backend for the schedule tests. The schedules only write state, so
# any backend checks them; the reference is the contract.
BACKEND = "reference"


pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    """A ResNet BasicBlock without downsampling."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + x)


class TinyResNet(nn.Module):
    """conv1 / layer1 / layer2 / fc, like a CIFAR ResNet: stages 0, 1, 2, 3."""

    def __init__(self, c: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.layer1 = nn.Sequential(Block(c))
        self.layer2 = nn.Sequential(Block(c))
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(x.mean((2, 3)))


class TinyVGG(nn.Module):
    """Two conv-BN-ReLU layers and a classifier (layers 0, 1, 2)."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.classifier = nn.Linear(12, classes)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


def make(cls=TinyResNet, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return cls(**kwargs)


def example_inputs():
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(123))


def batch(i: int, classes: int = 4):
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, classes, (8,), generator=g)


def sgd(model, lr: float = 0.02, **kwargs):
    return regkern.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4, backend=BACKEND, **kwargs)


def train_step(model, optimizer, schedule, i: int) -> None:
    """One deterministic step on batch ``i``; the loss graph is dropped before
    the schedule runs (a live graph must not see its parameters resliced)."""
    x, y = batch(i)
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    del loss
    optimizer.step()
    if schedule is not None:
        schedule.step()


def roundtrip(obj):
    """``obj`` through torch.save / torch.load(weights_only=True)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def snapshot(model, optimizer, schedule):
    return roundtrip({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "schedule": schedule.state_dict()})


def same_tensors(a: dict, b: dict) -> bool:
    """Same keys, bit-equal tensors, equal other values."""
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)
