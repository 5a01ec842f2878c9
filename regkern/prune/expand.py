"""Pruning the last BatchNorm of a residual branch without narrowing the
residual path.

In a residual block ``out = bn2(conv2(...)) + shortcut(x)`` the channels of
``bn2`` are coupled to every other tensor added to the same residual stream,
so removing one of them through its coupled group would remove that channel
from the whole stage. Polarization pruning (docs/schedules.md,
"Polarization") prunes such a branch on its own instead: the rows of the
branch's last conv and the channels of its BatchNorm go, and a
:class:`ChannelExpand` right after the BatchNorm scatters the kept channels
back to their places in the full residual width, with zeros in the removed
ones, so the addition and every later layer see the width they had.

:func:`branch_ends` finds those (conv, BatchNorm) pairs in the groups of
:func:`regkern.groups.find_groups`; :func:`attach_expand` installs the
expansion (a child module ``channel_expand`` of the BatchNorm, applied by a
forward hook, so the model's own ``forward`` stays as it is and the
parameter names do not change).
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from regkern.group import Group
from regkern.model_calls import run_in_eval
from regkern.prune.base import module_of

EXPAND_NAME = "channel_expand"
_NORMS = (nn.modules.batchnorm._BatchNorm,)


class ChannelExpand(nn.Module):
    """Scatter the ``len(index)`` channels of the input (dim 1) to positions
    ``index`` of an output with ``channels`` channels; the other channels are
    zeros. ``index`` is a buffer (it is saved in the model's state_dict)."""

    def __init__(self, index: Tensor, channels: int) -> None:
        super().__init__()
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        if not 0 < index.numel() <= channels or int(index.min()) < 0 or int(index.max()) >= channels \
                or index.unique().numel() != index.numel():
            raise ValueError(f"ChannelExpand needs between 1 and {channels} distinct channel positions in "
                             f"[0, {channels}), got {index.tolist()}")
        self.channels = int(channels)
        self.register_buffer("index", index.clone())

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.index.numel():
            raise ValueError(f"ChannelExpand expects {self.index.numel()} channels in dim 1, "
                             f"got shape {tuple(x.shape)}")
        out = x.new_zeros((x.shape[0], self.channels) + tuple(x.shape[2:]))
        return out.index_copy(1, self.index, x)

    def extra_repr(self) -> str:
        return f"{self.index.numel()} of {self.channels} channels"


def _expand_output(module: nn.Module, args: Any, output: Tensor) -> Tensor:
    """Forward hook of a BatchNorm that owns a ChannelExpand."""
    return getattr(module, EXPAND_NAME)(output)


def attach_expand(norm: nn.Module, kept: Tensor, channels: int) -> ChannelExpand:
    """Make ``norm`` (a BatchNorm whose channels were just cut to the ``kept``
    positions of its ``channels`` former ones) put its output back to
    ``channels`` channels. When ``norm`` already carries an expansion (a
    second cut), the new positions are composed with the old ones."""
    kept = torch.as_tensor(kept, dtype=torch.int64).reshape(-1).cpu()
    old = getattr(norm, EXPAND_NAME, None)
    device = norm.weight.device if getattr(norm, "weight", None) is not None else kept.device
    if isinstance(old, ChannelExpand):
        old.index = old.index[kept.to(old.index.device)].clone()
        return old
    expand = ChannelExpand(kept, channels).to(device)
    norm.add_module(EXPAND_NAME, expand)
    norm.register_forward_hook(_expand_output)
    return expand


def _pair_norms(model: nn.Module, example_inputs: Any, producers: Sequence[str],
                norms: Sequence[str]) -> Dict[str, str]:
    """``{producer: BatchNorm}`` where the BatchNorm's input is the very
    tensor the producer returned, from one forward pass (eval mode, no
    gradients; the train/eval flags are restored)."""
    modules = dict(model.named_modules())
    outputs: Dict[int, Tuple[Tensor, str]] = {}
    pairs: Dict[str, str] = {}
    handles = []

    def record(name):
        def hook(module, args, output):
            if isinstance(output, Tensor):
                outputs[id(output)] = (output, name)
        return hook

    def match(name):
        def hook(module, args):
            if args and isinstance(args[0], Tensor):
                hit = outputs.get(id(args[0]))
                if hit is not None and hit[0] is args[0]:
                    pairs.setdefault(hit[1], name)
        return hook

    try:
        for name in producers:
            handles.append(modules[name].register_forward_hook(record(name)))
        for name in norms:
            handles.append(modules[name].register_forward_pre_hook(match(name)))
        run_in_eval(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return pairs


def branch_ends(model: nn.Module, example_inputs: Any, joined: Sequence[Group],
                inner: Sequence[Group]) -> List[Tuple[Group, str, int]]:
    """The last (conv/linear, BatchNorm) pair of every residual branch.

    ``joined``: the groups coupled by residual additions (found by
    ``find_groups(..., residual_rule=False)`` and missing from
    ``residual_rule=True``); ``inner``: the other groups. A producer of a
    joined group ends a branch when everything it reads comes from inner
    groups that no other layer reads (the block's own channels, like
    ``conv2`` of a BasicBlock reading ``conv1``; a stem or downsample conv
    reads the image, the residual stream or a tensor the block's first conv
    reads too) and the BatchNorm right after it belongs to the same joined
    group. For each one: a new
    :class:`Group` (named after the producer, same units as the joined group)
    holding only the producer's rows and bias and the BatchNorm's channels
    and running statistics, the BatchNorm's name and its channel count.
    """
    readers: Dict[str, List[set]] = {}  # module -> the consumer sets of the groups it reads from
    for g in list(inner) + list(joined):
        consumers = {module_of(m.name) for m in g.members if m.role == "column"}
        for name in consumers:
            readers.setdefault(name, []).append(consumers if g in inner else set())
    modules = dict(model.named_modules())
    candidates = []
    for g in joined:
        producers = [module_of(m.name) for m in g.by_role("producer") if m.dim == 0 and m.index.shape[1] == 1
                     and readers.get(module_of(m.name)) and all(c == {module_of(m.name)}
                                                                for c in readers[module_of(m.name)])]
        norms = {module_of(m.name) for m in g.members if m.name.endswith(".weight") and m.dim == 0
                 and isinstance(modules.get(module_of(m.name)), _NORMS) and m.index.shape[1] == 1}
        candidates += [(g, producer, norms) for producer in producers]
    if not candidates:
        return []
    pairs = _pair_norms(model, example_inputs, [p for _, p, _ in candidates],
                        sorted(set().union(*(n for _, _, n in candidates))))
    found = []
    for g, producer, norms in candidates:
        norm = pairs.get(producer)
        if norm in norms:
            members = [m for m in g.members if module_of(m.name) in (producer, norm)]
            buffers = [m for m in g.buffers if module_of(m.name) == norm]
            group = Group(producer, g.units, members, buffers=buffers).bind(model)
            found.append((group, norm, int(modules[norm].num_features)))
    return found
