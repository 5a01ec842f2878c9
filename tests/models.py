"""Small models shared by the group, slicing and schedule tests (CNN part).

Each is a few thousand parameters so tracing and slicing tests stay fast;
inputs are ``[N, 3, 16, 16]`` images (``image_batch``). Every model has a
final classifier named ``fc`` (ignore it when finding groups).
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def image_batch(n: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class VGG(nn.Module):
    """VGG-style: conv-BN-ReLU stacks with max pooling, a flatten of a 2x2
    map into a hidden Linear (each channel owns 4 columns), and ``fc``."""

    def __init__(self, widths=(8, 8, 12, 12), hidden: int = 16, classes: int = 10) -> None:
        super().__init__()
        layers, cin = [], 3
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
            cin = w
        self.features = nn.Sequential(*layers)
        self.hidden = nn.Linear(cin * 4 * 4, hidden)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x):
        x = self.features(x)
        return self.fc(F.relu(self.hidden(torch.flatten(x, 1))))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """CIFAR-style ResNet: stem conv, stages ``layer1..`` of ``block``s (the
    first block of a stage downsamples when the shape changes), global
    average pooling, ``fc``."""

    def __init__(self, block=BasicBlock, blocks=(2, 1), widths=(8, 16), stem: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem)
        cin = stem
        for i, (n, w) in enumerate(zip(blocks, widths)):
            stage = []
            for j in range(n):
                stage.append(block(cin, w, stride=2 if (i > 0 and j == 0) else 1))
                cin = w * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.stages = len(blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet_basic() -> ResNet:
    return ResNet(BasicBlock, blocks=(2, 1), widths=(8, 16), stem=8)


def resnet_bottleneck() -> ResNet:
    return ResNet(Bottleneck, blocks=(2, 1), widths=(4, 8), stem=8)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection;
    a residual add when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 3) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = nn.Sequential(*conv_bn(cin, hidden, 1), nn.ReLU6())
        self.depthwise = nn.Sequential(*conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6())
        self.project = conv_bn(hidden, cout, 1)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


class MobileNetV2Like(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 8, 3, 2), nn.ReLU6())
        self.block1 = InvertedResidual(8, 8, 1)    # with residual
        self.block2 = InvertedResidual(8, 12, 2)   # without
        self.head = nn.Sequential(*conv_bn(12, 16, 1), nn.ReLU6())
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.head(self.block2(self.block1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ConcatNet(nn.Module):
    """Two branches concatenated into a conv (consumer columns at an offset),
    and a second concatenation pooled to 2x2 and flattened into ``fc``
    (a concatenation Torch-Pruning 1.6 leaves unmapped by itself)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 8), nn.ReLU())
        self.left = nn.Sequential(*conv_bn(8, 6), nn.ReLU())
        self.right = nn.Sequential(*conv_bn(8, 4, 1), nn.ReLU())
        self.mix = nn.Sequential(*conv_bn(10, 8), nn.ReLU())
        self.side = nn.Conv2d(10, 5, 1)
        self.fc = nn.Linear((8 + 5) * 4, classes)

    def forward(self, x):
        x = self.stem(x)
        cat = torch.cat([self.left(x), self.right(x)], dim=1)
        out = torch.cat([self.mix(cat), self.side(cat)], dim=1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 2), 1))


class ConvBNConv(nn.Module):
    """conv -> BN -> ReLU -> conv -> pool -> fc: the smallest coupled group."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.conv2(F.relu(self.bn(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ResNeXtBlock(nn.Module):
    """ResNeXt / RegNet bottleneck: 1x1 reduce, grouped 3x3 (``groups``
    groups of equal width), 1x1 expand, residual add."""

    def __init__(self, channels: int = 8, width: int = 12, groups: int = 3) -> None:
        super().__init__()
        self.reduce = nn.Sequential(*conv_bn(channels, width, 1), nn.ReLU())
        self.grouped = nn.Sequential(*conv_bn(width, width, 3, groups=groups), nn.ReLU())
        self.expand = conv_bn(width, channels, 1)

    def forward(self, x):
        return F.relu(x + self.expand(self.grouped(self.reduce(x))))


class ResNeXtLike(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 8), nn.ReLU())
        self.block = ResNeXtBlock()
        self.widen = nn.Conv2d(8, 12, 3, padding=1, groups=2)  # a grouped conv whose input is 2 x 4 channels
        self.fc = nn.Linear(12, classes)

    def forward(self, x):
        x = self.widen(self.block(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class GroupNormNet(nn.Module):
    """Convs with GroupNorm (2 groups of channels) instead of BatchNorm."""

    def __init__(self, classes: int = 10, widths=(8, 12)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1)
        self.gn1 = nn.GroupNorm(2, widths[0])
        self.conv2 = nn.Conv2d(widths[0], widths[1], 3, padding=1, groups=2)
        self.gn2 = nn.GroupNorm(3, widths[1])
        self.fc = nn.Linear(widths[1], classes)

    def forward(self, x):
        x = F.relu(self.gn2(self.conv2(F.relu(self.gn1(self.conv1(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TransposedNet(nn.Module):
    """A strided conv, then a transposed conv back up (a decoder), then a conv."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.down = nn.Sequential(*conv_bn(3, 8, 3, 2), nn.ReLU())
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.bn = nn.BatchNorm2d(6)
        self.mix = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5, classes)

    def forward(self, x):
        x = self.mix(F.relu(self.bn(self.up(self.down(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


CNNS = {
    "vgg_bn": VGG,
    "resnet_basic": resnet_basic,
    "resnet_bottleneck": resnet_bottleneck,
    "mobilenet_v2": MobileNetV2Like,
    "concat": ConcatNet,
}


# --------------------------------------------------------------------------- helpers for slicing tests

def random_removals(groups, fraction: float = 0.4, seed: int = 0):
    """{group: units}: about ``fraction`` of each group's units (at least one, never all)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for g in groups:
        n = min(max(1, round(fraction * g.units)), g.units - 1)
        out[g] = torch.randperm(g.units, generator=gen)[:n].sort().values
    return out


@torch.no_grad()
def mask_units(model: nn.Module, removals, optimizer=None) -> None:
    """Zero every member slice of the removed units in ``model`` (found by
    name, so groups of a structurally identical model work), and the same
    entries of the optimizer's parameter-shaped state tensors."""
    params = dict(model.named_parameters())
    for group, units in removals.items():
        units = torch.as_tensor(units, dtype=torch.int64)
        for m in group.members:
            p = params[m.name]
            idx = m.index[units].reshape(-1)
            p.index_fill_(m.dim, idx, 0)
            if optimizer is not None and p in optimizer.state:
                for value in optimizer.state[p].values():
                    if isinstance(value, torch.Tensor) and value.shape == p.shape:
                        value.index_fill_(m.dim, idx, 0)


def restrict(t: torch.Tensor, cuts) -> torch.Tensor:
    """``t`` restricted to the kept indices ``{dim: keep}`` (from ``regkern.slicing.kept_indices``)."""
    for dim, keep in cuts.items():
        t = t.index_select(dim, keep)
    return t
