"""Parameter shape sets for the benchmarks, written out by hand.

Each set is the list of trainable parameters of a real network (torchvision is
not needed): ``ParamShape(name, shape, regularized)``. ``regularized`` marks
the conv/linear weights that GReg penalises row-wise (``RowL2``); BatchNorm /
LayerNorm vectors, biases and embeddings go in a plain group. ``bn_scale``
marks the BatchNorm weights (the scales gamma, not the biases, not LayerNorm):
the set that network slimming (``L1``) and ``Polarization`` regularize
(``bn_scales``).
"""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Tuple


class ParamShape(NamedTuple):
    name: str
    shape: Tuple[int, ...]
    regularized: bool
    bn_scale: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _conv(name: str, out: int, inp: int, k: int) -> ParamShape:
    return ParamShape(f"{name}.weight", (out, inp, k, k), True)


def _linear(name: str, out: int, inp: int, bias: bool = True) -> List[ParamShape]:
    ps = [ParamShape(f"{name}.weight", (out, inp), True)]
    if bias:
        ps.append(ParamShape(f"{name}.bias", (out,), False))
    return ps


def _norm(name: str, channels: int, batchnorm: bool = True) -> List[ParamShape]:
    """A BatchNorm (its weight is a ``bn_scale``) or, ``batchnorm=False``, a LayerNorm."""
    return [ParamShape(f"{name}.weight", (channels,), False, batchnorm),
            ParamShape(f"{name}.bias", (channels,), False)]


def resnet56() -> List[ParamShape]:
    """CIFAR ResNet-56 (He et al. 2016, option A shortcuts: no parameters).

    3 stages of 9 BasicBlocks with 16/32/64 channels, 3x3 convs without bias,
    BatchNorm after each conv, linear 64 -> 10. 853,018 parameters, 167 tensors.
    """
    ps = [_conv("conv1", 16, 3, 3), *_norm("bn1", 16)]
    inp = 16
    for stage, width in enumerate((16, 32, 64), start=1):
        for block in range(9):
            pre = f"layer{stage}.{block}"
            ps += [_conv(f"{pre}.conv1", width, inp, 3), *_norm(f"{pre}.bn1", width),
                   _conv(f"{pre}.conv2", width, width, 3), *_norm(f"{pre}.bn2", width)]
            inp = width
    ps += _linear("fc", 10, 64)
    return ps


def resnet50() -> List[ParamShape]:
    """torchvision ResNet-50 (v1.5: stride on the 3x3 conv; same shapes).

    Bottlenecks 1x1 -> 3x3 -> 1x1 (expansion 4), 3/4/6/3 blocks, a 1x1
    downsample conv + BN in the first block of each stage, fc 2048 -> 1000.
    25,557,032 parameters, 161 tensors.
    """
    ps = [_conv("conv1", 64, 3, 7), *_norm("bn1", 64)]
    inp = 64
    for stage, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), start=1):
        out = width * 4
        for block in range(blocks):
            pre = f"layer{stage}.{block}"
            ps += [_conv(f"{pre}.conv1", width, inp, 1), *_norm(f"{pre}.bn1", width),
                   _conv(f"{pre}.conv2", width, width, 3), *_norm(f"{pre}.bn2", width),
                   _conv(f"{pre}.conv3", out, width, 1), *_norm(f"{pre}.bn3", out)]
            if block == 0:
                ps += [_conv(f"{pre}.downsample.0", out, inp, 1), *_norm(f"{pre}.downsample.1", out)]
            inp = out
    ps += _linear("fc", 1000, 2048)
    return ps


def vit_b16() -> List[ParamShape]:
    """ViT-B/16 at 224x224 (torchvision ``vit_b_16`` layout, torch [out, in]).

    Patch embedding conv 768x3x16x16, class token, 197 position embeddings,
    12 blocks (LayerNorm, qkv 2304x768, proj 768x768, LayerNorm, MLP
    3072x768 and 768x3072, all with bias), final LayerNorm, head 1000x768.
    86,567,656 parameters, 152 tensors. Class token and position embeddings
    are not regularized.
    """
    d, mlp, tokens = 768, 3072, 197
    ps = [ParamShape("conv_proj.weight", (d, 3, 16, 16), True),
          ParamShape("conv_proj.bias", (d,), False),
          ParamShape("class_token", (1, 1, d), False),
          ParamShape("pos_embedding", (1, tokens, d), False)]
    for i in range(12):
        pre = f"encoder.layers.{i}"
        ps += [*_norm(f"{pre}.ln_1", d, batchnorm=False),
               *_linear(f"{pre}.attn.qkv", 3 * d, d),
               *_linear(f"{pre}.attn.proj", d, d),
               *_norm(f"{pre}.ln_2", d, batchnorm=False),
               *_linear(f"{pre}.mlp.fc1", mlp, d),
               *_linear(f"{pre}.mlp.fc2", d, mlp)]
    ps += [*_norm("encoder.ln", d, batchnorm=False), *_linear("heads.head", 1000, d)]
    return ps


def single(rows: int, cols: int) -> Callable[[], List[ParamShape]]:
    """One large regularized ``[rows, cols]`` weight (a bandwidth probe)."""
    def make() -> List[ParamShape]:
        return [ParamShape("weight", (rows, cols), True)]
    make.__doc__ = f"A single {rows}x{cols} weight ({rows * cols / 2**20:.0f}M elements)."
    return make


SHAPE_SETS: Dict[str, Callable[[], List[ParamShape]]] = {
    "resnet56": resnet56,
    "resnet50": resnet50,
    "vit-b": vit_b16,
    "tensor16m": single(4096, 4096),
    "tensor64m": single(8192, 8192),
}


def bn_scales(shapes: List[ParamShape]) -> List[int]:
    """Indices of the BatchNorm scales (gamma) of a shape set (empty for ViT and
    the single tensors)."""
    return [i for i, s in enumerate(shapes) if s.bn_scale]


def shape_set(name: str) -> List[ParamShape]:
    try:
        return SHAPE_SETS[name]()
    except KeyError:
        raise ValueError(f"unknown shape set {name!r}; choose from {', '.join(SHAPE_SETS)}") from None
