"""Masks in a regkern optimizer's state: zeros that stay zeros.

``state["mask"]`` (bool: a row mask ``[R]`` or W-shaped) is applied by the
fused step after every update (docs/sgd.md#masks). :func:`apply_mask` puts
one in place; :func:`mask_cut` is the structured cut of a model sharded by
FSDP2, made with masks (docs/groups.md, "Cuts of sharded models").
"""
from __future__ import annotations

from typing import Iterable, List

import torch
from torch import Tensor, nn

from regkern.distributed import agree_here, agreement, distributed_group
from regkern.export import make_plan
from regkern.flops import count_params
from regkern.group import Group
from regkern.optim.features import require_reads
from regkern.reference.sgd import element_mask
from regkern.sharding import is_dtensor, local_tensor, row_state, user_class, whole, write_whole
from regkern.slicing import LayerCut, SliceSummary, kept_indices, removal_list


def apply_mask(optimizer: torch.optim.Optimizer, p: Tensor, keep: Tensor) -> None:
    """Put ``keep`` (bool, whole: ``[R]`` or W-shaped) into ``state[p]["mask"]``
    (joined with a mask already there) and zero the masked weights and their
    momentum now: the fused step keeps them exact zeros from then on. A
    sharded (DTensor) ``p`` gets a mask sharded like it. In a data-parallel
    ``prune()`` the ranks check first that their masks agree."""
    agree_here("masks", keep)
    st = optimizer.state[p]
    old = whole(st.get("mask"))
    if old is not None:
        old = old.to(keep.device)
        if old.shape != keep.shape:  # a row mask and an element mask join per element
            old, keep = element_mask(old, p.shape), element_mask(keep, p.shape)
        keep = keep & old
    if is_dtensor(p):
        mask = row_state(p, dtype=torch.bool) if keep.dim() == 1 and p.dim() > 1 else \
            torch.empty_like(p.detach(), dtype=torch.bool)  # a DTensor laid out like p
        write_whole(mask, keep)
    else:
        mask = keep
    st["mask"] = mask
    weights = local_tensor(p)
    full = element_mask(local_tensor(mask), weights.shape)
    with torch.no_grad():
        weights.mul_(full)
        buf = local_tensor(st.get("momentum_buffer"))
        if isinstance(buf, Tensor) and buf.shape == weights.shape:
            buf.mul_(full)


def _mixes_channels(module: nn.Module) -> bool:
    """Whether a layer normalizes over channels together (GroupNorm,
    LayerNorm, RMSNorm, local response norm, and any other ``*Norm`` that is
    not a batch or instance norm, as Hugging Face's RMSNorm classes): a
    zeroed channel still counts in its statistics."""
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return False
    return isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)) or \
        "Norm" in user_class(module).__name__


def check_mask_cut(model: nn.Module, groups: Iterable[Group], optimizer: torch.optim.Optimizer,
                   what: str = "a cut of a sharded model") -> None:
    """``ValueError`` unless cuts of ``groups`` in the sharded ``model`` can be
    made by masks held by ``optimizer``: its step applies masks, it holds
    every parameter of the groups, and no group member belongs to a layer
    whose statistics mix channels (nor has the model such a layer without
    parameters, whose place in the groups cannot be told). Writes nothing."""
    if optimizer is None:
        raise ValueError(f"{what} is made by masks held by the optimizer that trains the model; pass that optimizer")
    require_reads(optimizer, ("mask",), what)
    modules = dict(model.named_modules())
    unseen = [name for name, m in modules.items() if _mixes_channels(m) and not any(True for _ in m.parameters())]
    if unseen:
        raise ValueError(f"{what} cannot be made by masks in a model with {unseen[0]} "
                         f"({user_class(modules[unseen[0]]).__name__} without parameters), whose statistics would "
                         "count zeroed channels; prune this model in one process or under DistributedDataParallel")
    params = dict(model.named_parameters(remove_duplicate=False))
    held = {p for g in optimizer.param_groups for p in g["params"]}
    for group in groups:
        for m in group.members:
            owner = modules.get(m.name.rsplit(".", 1)[0] if "." in m.name else "")
            if owner is not None and _mixes_channels(owner):
                raise ValueError(f"{what} goes through {m.name} of a {user_class(owner).__name__}, whose statistics "
                                 "mix channels, so masks cannot stand for it; prune this model in one process or "
                                 "under DistributedDataParallel")
            if m.name in params and params[m.name] not in held:
                raise ValueError(f"{what} goes through parameter {m.name}, which the optimizer does not hold, so no "
                                 "mask keeps it at zero; build the optimizer over model.parameters()")


def mask_cut(model: nn.Module, removals, optimizer: torch.optim.Optimizer):
    """The structured cut of a model whose parameters are sharded (FSDP2's
    ``fully_shard``), made with masks: every slice ``slice_model`` would remove
    is zeroed and held at zero by ``state["mask"]`` of ``optimizer`` (a row
    mask where only rows go, else an element mask, sharded like the
    parameter). The model computes what the cut model computes and the
    optimizer steps its kept entries as it would step the cut model's
    (docs/groups.md, "Cuts of sharded models"), but its shapes stay: FSDP2
    fixes each parameter's shards and gather buffers when it shards the
    model. Buffers (BatchNorm running statistics) are left alone: a zeroed
    channel's output is zero whatever they hold.

    Returns a :class:`regkern.slicing.SliceSummary` with ``masked=True`` and
    ``plan`` (:func:`regkern.export.make_plan`): load the trained weights into
    a plain copy of the model (torch's ``get_model_state_dict`` with
    ``full_state_dict=True``) and :func:`regkern.export.apply_plan` cuts it.
    Collective: call it on every rank; the ranks first check that they
    remove the same units. What :func:`check_mask_cut` refuses raises
    ``ValueError`` before anything is written."""
    removals = removal_list(removals)
    check_mask_cut(model, [g for g, _ in removals], optimizer)
    kept = kept_indices(model, removals)
    with agreement(distributed_group(model)):
        agree_here("units to slice", {name: dict(cuts) for name, cuts in kept.items()})
    plan = make_plan(model, removals)
    params = dict(model.named_parameters())
    layers: List[LayerCut] = []
    removed = 0
    for name, cuts in kept.items():
        if name not in params:
            continue
        p = params[name]
        shape = tuple(p.shape)
        keep = torch.ones(shape, dtype=torch.bool)
        for d, index in cuts.items():
            along = torch.zeros(shape[d], dtype=torch.bool)
            along[index] = True
            keep &= along.view([-1 if i == d else 1 for i in range(len(shape))])
        removed += int((~keep).sum())
        if set(cuts) == {0} and len(shape) > 1:  # rows only: a row mask
            keep = keep.reshape(shape[0], -1)[:, 0].clone()
        apply_mask(optimizer, p, keep.to(local_tensor(p).device))
        layers += [LayerCut(name, d, int(k.numel()), shape[d]) for d, k in sorted(cuts.items())]
    before = count_params(model)
    return SliceSummary(before, before - removed, None, None, layers, masked=True, plan=plan)
