"""Multiply-accumulate count of one forward pass."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from regkern.model_calls import run_in_eval


def _numel(shape) -> int:
    return math.prod(int(s) for s in shape)


def _conv(args, kwargs, out) -> int:
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    return out.numel() * _numel(weight.shape[1:])  # [Cout, Cin / groups, k...]


def _conv_transpose(args, kwargs, out) -> int:
    x = args[0] if args else kwargs["input"]
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    return x.numel() * _numel(weight.shape[1:])  # [Cin, Cout / groups, k...]


def _linear(args, kwargs, out) -> int:
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    return out.numel() * weight.shape[-1]


def _matmul(args, kwargs, out) -> int:
    a = args[0] if args else kwargs["input"]
    return out.numel() * a.shape[-1]


def _rmatmul(args, kwargs, out) -> int:  # b.__rmatmul__(a) is a @ b
    return out.numel() * args[1].shape[-1]


def _addmm(args, kwargs, out) -> int:  # addmm(bias, a, b), baddbmm(bias, a, b)
    a = args[1] if len(args) > 1 else kwargs["mat1" if "mat1" in kwargs else "batch1"]
    return out.numel() * a.shape[-1]


def _sdpa(args, kwargs, out) -> int:
    q = args[0] if args else kwargs["query"]
    k = args[1] if len(args) > 1 else kwargs["key"]
    # scores q k^T, then the weighted sum of v: out has v's last dimension
    return out.numel() // out.shape[-1] * k.shape[-2] * (q.shape[-1] + out.shape[-1])


def _mha(args, kwargs, out) -> int:
    """F.multi_head_attention_forward (nn.MultiheadAttention): projections,
    attention and output projection (the inner calls are not seen)."""
    query, key = args[0], args[1]
    embed = query.shape[-1]
    batch = query.shape[1] if query.dim() == 3 else 1
    lq, lk = query.shape[0], key.shape[0]
    proj = batch * (lq * embed + lk * key.shape[-1] + lk * args[2].shape[-1]) * embed
    return proj + 2 * batch * lq * lk * embed + batch * lq * embed * embed


_COUNTERS = {
    F.linear: _linear,
    F.conv1d: _conv, F.conv2d: _conv, F.conv3d: _conv,
    F.conv_transpose1d: _conv_transpose, F.conv_transpose2d: _conv_transpose,
    F.conv_transpose3d: _conv_transpose,
    torch.matmul: _matmul, Tensor.matmul: _matmul, Tensor.__matmul__: _matmul, Tensor.__rmatmul__: _rmatmul,
    torch.mm: _matmul, Tensor.mm: _matmul, torch.bmm: _matmul, Tensor.bmm: _matmul,
    torch.addmm: _addmm, torch.baddbmm: _addmm,
    F.scaled_dot_product_attention: _sdpa,
    F.multi_head_attention_forward: _mha,
}


class _Counter(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.macs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = _COUNTERS.get(func)
        if count is not None:
            result = out[0] if isinstance(out, tuple) else out
            self.macs += int(count(args, kwargs, result))
        return out


def count_flops(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on
    ``example_inputs`` (a tensor, a tuple of positional inputs or a dict of
    keyword inputs), for the whole batch given.

    Counted wherever they are called: linear layers (``F.linear``),
    convolutions and transposed convolutions, ``matmul`` / ``mm`` / ``bmm`` /
    ``addmm`` / ``baddbmm`` / ``@``, ``scaled_dot_product_attention`` (both
    products) and ``nn.MultiheadAttention``. Norms, activations, pooling and
    additions are not MACs and are not counted; neither is ``einsum``. Runs
    under ``no_grad`` in eval mode (so BatchNorm statistics do not move) and
    restores each module's train/eval flag.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"count_flops needs an nn.Module, got {type(model).__name__}")
    counter = _Counter()
    with counter:
        run_in_eval(model, example_inputs)
    return counter.macs


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters once)."""
    return sum(p.numel() for p in model.parameters())

