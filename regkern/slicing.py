"""Structured slicing: remove units of coupled groups from a model in place.

The Parameter objects stay the same (``param.data`` is replaced), so an
optimizer built on the model keeps training: its state is sliced with the
parameters, its cached step plans see the new storage and rebuild, and its
``state_dict`` loads into a fresh optimizer on the sliced model.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from regkern.flops import count_flops, count_params
from regkern.group import Group, canonical_names, check_group, is_conv1d, named_tensors
from regkern.sharding import is_dtensor
from regkern.terms import COLUMN_STATE, ROW_STATE, SHARED_STATE

# Optimizer-state entries with one value per row W[r] (first dimension), per
# column W[:, c], or shared by a whole param group come from regkern.terms;
# every other tensor entry must have the parameter's shape (momentum, element
# masks and lambdas, ADMM, RDA and SAS-ADMM state, Adam's moments ...) or be
# a scalar.

Removals = Union[Mapping[Group, Any], Sequence[Tuple[Group, Any]]]


@dataclasses.dataclass
class LayerCut:
    """One sliced tensor dimension: ``kept`` of ``total`` entries remain."""

    name: str
    dim: int
    kept: int
    total: int


@dataclasses.dataclass
class SliceSummary:
    """What ``slice_model`` did: parameter counts and MACs (with
    ``example_inputs``) before and after, and every sliced parameter dimension.

    A sharded (FSDP2) model is cut by masks (:func:`regkern.masks.mask_cut`):
    ``masked`` is then True, the counts are those the cut model will have,
    and ``plan`` is the cut in :func:`regkern.export.make_plan`'s format, for
    :func:`regkern.export.apply_plan` on a plain copy of the model."""

    params_before: int
    params_after: int
    macs_before: Optional[int]
    macs_after: Optional[int]
    layers: List[LayerCut]
    masked: bool = False
    plan: Optional[Dict[str, Any]] = dataclasses.field(default=None, repr=False)

    def __str__(self) -> str:
        def ratio(after, before):
            return f"{after:,} / {before:,} ({100.0 * after / before:.1f}% kept)" if before else f"{after} / {before}"

        lines = [f"params: {ratio(self.params_after, self.params_before)}"]
        if self.masked:
            lines[0] += "  (masked in the sharded model; regkern.export.apply_plan(copy, plan) cuts a plain copy)"
        if self.macs_before is not None:
            lines.append(f"MACs:   {ratio(self.macs_after, self.macs_before)}")
        width = max([len(c.name) for c in self.layers] + [9])
        lines.append(f"{'parameter':<{width}}  dim  kept/total")
        lines += [f"{c.name:<{width}}  {c.dim:>3}  {c.kept}/{c.total}" for c in self.layers]
        return "\n".join(lines)


def _units(group: Group, units) -> Tensor:
    """The removed units of ``group`` as a sorted int64 vector (checked)."""
    if isinstance(units, Tensor):
        u = units.detach().cpu()
        if u.dtype == torch.bool or u.is_floating_point() or u.is_complex():
            raise ValueError(f"units of group {group.name!r} must be integers, got a {u.dtype} tensor")
        u = u.reshape(-1).long()
    else:
        values = [units] if isinstance(units, int) else list(units)
        if not all(isinstance(v, int) and not isinstance(v, bool) or
                   (isinstance(v, Tensor) and v.dim() == 0 and not v.is_floating_point() and v.dtype != torch.bool)
                   for v in values):
            raise ValueError(f"units of group {group.name!r} must be integers, got {units!r}")
        u = torch.tensor([int(v) for v in values], dtype=torch.int64)
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= group.units):
        raise ValueError(f"units of group {group.name!r} must lie in [0, {group.units}), got {u.tolist()}")
    if u.unique().numel() != u.numel():
        raise ValueError(f"units of group {group.name!r} are repeated: {u.tolist()}")
    if u.numel() >= group.units:
        raise ValueError(f"removing all {group.units} units of group {group.name!r} would leave its layers empty")
    return u.sort().values


def removal_list(removals: Removals) -> List[Tuple[Group, Tensor]]:
    """``removals`` as checked ``(group, sorted int64 units)`` pairs."""
    items = list(removals.items()) if isinstance(removals, Mapping) else list(removals)
    out, seen = [], set()
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError("removals must be {group: units} or a list of (group, units) pairs")
        group, units = item
        if not isinstance(group, Group):
            raise ValueError(f"removals must be keyed by regkern Groups, got {type(group).__name__}")
        if id(group) in seen:
            raise ValueError(f"group {group.name!r} is listed twice in removals")
        seen.add(id(group))
        out.append((group, _units(group, units)))
    return out


def kept_indices(model: nn.Module, removals: Removals) -> Dict[str, Dict[int, Tensor]]:
    """For every tensor the removals cut: ``{name: {dim: kept indices}}``
    (int64, sorted), after all checks of ``slice_model``; nothing is changed.
    Useful to compare a sliced model with a masked copy."""
    return _plan_cuts(model, removal_list(removals))


def _plan_cuts(model: nn.Module, removals: List[Tuple[Group, Tensor]]):
    """Kept indices per (tensor, dim), checked."""
    tensors = named_tensors(model)
    canonical = canonical_names(model)  # a tied weight is cut once, under its first name
    removed: Dict[str, Dict[int, List[Tensor]]] = {}
    for group, units in removals:
        check_group(model, group)
        if not units.numel():
            continue
        for m in group.members + group.buffers:
            name = canonical.get(m.name, m.name)
            removed.setdefault(name, {}).setdefault(m.dim, []).append(m.index[units].reshape(-1))
    _add_norm_statistics(model, removed)
    kept: Dict[str, Dict[int, Tensor]] = {}
    for name, dims in removed.items():
        kept[name] = {}
        for dim, parts in sorted(dims.items()):
            size = tensors[name].shape[dim]
            drop = torch.zeros(size, dtype=torch.bool)
            drop[torch.cat(parts)] = True
            keep = (~drop).nonzero().reshape(-1)
            if not keep.numel():
                raise ValueError(f"the removals leave no entry of {name} along dim {dim}")
            kept[name][dim] = keep
    return kept


def _add_norm_statistics(model: nn.Module, removed) -> None:
    """Cut a norm layer's running statistics with its channels when no group names them."""
    norms = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
    for mname, module in model.named_modules():
        if not isinstance(module, norms):
            continue
        prefix = f"{mname}." if mname else ""
        cut = removed.get(prefix + "weight", removed.get(prefix + "bias", {})).get(0)
        if cut is None:
            continue
        for stat in ("running_mean", "running_var"):
            if getattr(module, stat, None) is not None and prefix + stat not in removed:
                removed[prefix + stat] = {0: list(cut)}


def _owner(modules: Dict[str, nn.Module], name: str) -> Tuple[str, nn.Module, str]:
    mname, _, attr = name.rpartition(".")
    return mname, modules[mname], attr


def _new_shape(shape, cuts: Dict[int, Tensor]) -> Tuple[int, ...]:
    return tuple(cuts[d].numel() if d in cuts else s for d, s in enumerate(shape))


def _module_updates(model: nn.Module, kept, shapes: Dict[str, Tuple[int, ...]]) -> List[Tuple[nn.Module, str, Any]]:
    """New shape attributes of standard modules owning cut tensors, with the
    checks that their tensors stay consistent (a conv's bias follows its rows)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    touched = {}
    for name, first in canonical_names(model).items():  # every layer that holds a cut tensor, tied ones too
        if first in kept:
            mname, module, _ = _owner(modules, name)
            touched[mname] = module
    updates = []
    canonical = canonical_names(model)

    def size(mname, attr, dim):
        prefix = f"{mname}." if mname else ""
        return shapes.get(prefix + attr, (None,) * (dim + 1))[dim]

    def evenly_kept(mname, module, attr, dim, groups) -> bool:
        """Whether the cut of ``attr`` along ``dim`` keeps as many entries in
        each of its ``groups`` equal blocks (a grouped conv's or GroupNorm's groups)."""
        cut = kept.get(canonical.get(f"{mname}.{attr}" if mname else attr), {}).get(dim)
        if cut is None or groups == 1:
            return True
        counts = torch.bincount(cut // (getattr(module, attr).shape[dim] // groups), minlength=groups)
        return bool((counts == counts[0]).all())

    for mname, m in touched.items():
        where = f"module {mname!r} ({type(m).__name__})"
        if isinstance(m, nn.modules.conv._ConvNd):
            # weight [out, in / groups, k...]; transposed: [in, out / groups, k...]
            out_dim, in_dim = (1, 0) if m.transposed else (0, 1)
            rows, cols = size(mname, "weight", out_dim), size(mname, "weight", in_dim)
            depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels and not m.transposed
            outputs, inputs = (rows * m.groups, cols) if m.transposed else (rows, cols * m.groups)
            if m.bias is not None and size(mname, "bias", 0) != outputs:
                raise ValueError(f"{where}: its weight and bias would keep different channel counts")
            if depthwise:
                updates += [(m, "out_channels", rows), (m, "in_channels", rows), (m, "groups", rows)]
            else:
                if outputs % m.groups or inputs % m.groups or not evenly_kept(mname, m, "weight", 0, m.groups):
                    raise ValueError(f"{where}: the cut would leave its {m.groups} groups unequal ({outputs} output and "
                                     f"{inputs} input channels); remove the same position from every group "
                                     f"(the units find_groups gives)")
                updates += [(m, "out_channels", outputs), (m, "in_channels", inputs)]
        elif isinstance(m, nn.Linear):
            rows, cols = size(mname, "weight", 0), size(mname, "weight", 1)
            if m.bias is not None and size(mname, "bias", 0) != rows:
                raise ValueError(f"{where}: its weight and bias would keep different row counts")
            updates += [(m, "out_features", rows), (m, "in_features", cols)]
        elif is_conv1d(m):  # weight [nx, nf]
            outputs, inputs = size(mname, "weight", 1), size(mname, "weight", 0)
            if m.bias is not None and size(mname, "bias", 0) != outputs:
                raise ValueError(f"{where}: its weight and bias would keep different output counts")
            updates += [(m, "nf", outputs), (m, "nx", inputs)]
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
            counts = {shapes[f"{mname}.{a}" if mname else a][0] for a in ("weight", "bias", "running_mean", "running_var")
                      if getattr(m, a, None) is not None}
            if len(counts) != 1:
                raise ValueError(f"{where}: its weight, bias and running statistics would keep different channel counts")
            updates.append((m, "num_features", counts.pop()))
        elif isinstance(m, nn.LayerNorm):
            if len(m.normalized_shape) != 1:
                raise ValueError(f"{where} normalizes over {tuple(m.normalized_shape)}; regkern slices 1-D LayerNorms only")
            counts = {shapes[f"{mname}.{a}" if mname else a][0] for a in ("weight", "bias") if getattr(m, a, None) is not None}
            if len(counts) != 1:
                raise ValueError(f"{where}: its weight and bias would keep different sizes")
            updates.append((m, "normalized_shape", (counts.pop(),)))
        elif isinstance(m, nn.GroupNorm):
            counts = {size(mname, a, 0) for a in ("weight", "bias") if getattr(m, a, None) is not None}
            if len(counts) != 1:
                raise ValueError(f"{where}: its weight and bias would keep different channel counts")
            channels = counts.pop()
            if channels % m.num_groups or not evenly_kept(mname, m, "weight", 0, m.num_groups):
                raise ValueError(f"{where}: {channels} channels cannot form its {m.num_groups} equal groups; remove "
                                 f"the same position from every group (the units find_groups gives)")
            updates.append((m, "num_channels", channels))
        elif isinstance(m, nn.Embedding):
            updates.append((m, "embedding_dim", size(mname, "weight", 1)))
            updates.append((m, "num_embeddings", size(mname, "weight", 0)))
        elif isinstance(m, nn.PReLU):
            updates.append((m, "num_parameters", size(mname, "weight", 0)))
    return updates


def _attribute_updates(model: nn.Module, removals) -> List[Tuple[nn.Module, str, Any]]:
    modules = dict(model.named_modules())
    totals: Dict[Tuple[str, str], int] = {}
    for group, units in removals:
        for entry in group.attributes:
            if not (isinstance(entry, (tuple, list)) and len(entry) == 3):
                raise ValueError(f"group {group.name!r}: attributes must be (module_name, attribute, per_unit) triples")
            mname, attr, per_unit = entry
            if mname not in modules:
                raise ValueError(f"group {group.name!r}: the model has no module {mname!r} (attribute {attr!r})")
            value = getattr(modules[mname], attr, None)
            if not isinstance(value, int) or isinstance(value, bool) or not isinstance(per_unit, int):
                raise ValueError(f"group {group.name!r}: {mname}.{attr} must be an int attribute with an int per_unit")
            totals[(mname, attr)] = totals.get((mname, attr), 0) + units.numel() * per_unit
    updates = []
    for (mname, attr), drop in totals.items():
        value = getattr(modules[mname], attr) - drop
        if value < 1:
            raise ValueError(f"the removals would set {mname}.{attr} to {value}")
        updates.append((modules[mname], attr, value))
    return updates


def _cut(t: Tensor, cuts: Dict[int, Tensor]) -> Tensor:
    for dim, keep in cuts.items():
        t = t.index_select(dim, keep.to(t.device))
    return t.contiguous()


def _state_updates(optimizer, params: Dict[str, Tensor], kept) -> List[Tuple[Dict, str, Tensor, Tensor]]:
    """(state dict, key, tensor, sliced tensor) for every per-parameter state tensor of a cut parameter."""
    if optimizer is None:
        return []
    out = []
    for name, cuts in kept.items():
        p = params.get(name)
        if p is None or p not in optimizer.state:
            continue
        state = optimizer.state[p]
        for key, value in state.items():
            if not isinstance(value, Tensor) or value.dim() == 0 or key in SHARED_STATE:
                continue
            where = f"optimizer state {key!r} of {name} ({tuple(value.shape)})"
            if is_dtensor(value):
                raise ValueError(f"{where} is sharded (DTensor); slice_model slices plain tensors only")
            if value.shape == p.shape:
                new = _cut(value, cuts)
            elif key in ROW_STATE and p.dim() >= 1 and value.shape[0] == p.shape[0]:
                new = _cut(value, {0: cuts[0]} if 0 in cuts else {})
            elif key in COLUMN_STATE and p.dim() >= 2 and value.shape == (p.shape[1],):
                new = _cut(value, {0: cuts[1]} if 1 in cuts else {})
            else:
                raise ValueError(f"{where} matches neither the parameter's shape {tuple(p.shape)} nor a known per-row or per-column entry; slice_model cannot cut it")
            out.append((state, key, value, new))
    return out


def slice_model(model: nn.Module, removals: Removals, optimizer: Optional[torch.optim.Optimizer] = None,
                example_inputs: Any = None) -> SliceSummary:
    """Physically remove units of groups from ``model`` (and ``optimizer``).

    ``removals``: ``{group: units}`` or ``[(group, units), ...]`` with groups
    from ``find_groups`` on this model and unit indices (ints, a list, a
    1-D integer tensor). Every member slice of a removed unit goes: weight
    rows and columns, biases, norm channels and running statistics. Each
    parameter keeps its identity (``param.data`` is replaced) and its
    ``.grad`` is cut along; so is every state tensor the optimizer holds for
    it: W-shaped entries (momentum, element masks / lambdas, ADMM, RDA and
    SAS-ADMM state, Adam moments) along each cut dimension, per-row entries
    (``lam``, ``l1``, ``prox_lam``, a row ``mask``, ``row_norms``) along the
    rows, ``lam_cols`` along the columns; the group-shared ``polar`` and
    scalars stay. Shape attributes of Conv (grouped and transposed too),
    Linear, Hugging Face ``Conv1D``, BatchNorm / InstanceNorm, GroupNorm,
    LayerNorm, Embedding and PReLU modules follow the new shapes (every layer
    holding a tied tensor), and each group's ``attributes`` drop by
    ``units * per_unit``.

    Everything is checked before anything changes: groups bound to another
    model or found before an earlier slice, units out of range, repeated, or
    all of a group's, state that cannot be matched, cuts that would leave a
    grouped convolution's or a GroupNorm's groups unequal raise
    ``ValueError`` and leave the model and the optimizer as they were. Groups touching the sliced
    tensors must be found again afterwards.

    Under ``DistributedDataParallel`` (``model`` is the wrapper, or the
    module inside a live one), call it on every rank: the ranks first check
    that they remove the same units (``RuntimeError`` otherwise, nothing
    changed), and the wrapper is rebuilt in place over the sliced module
    afterwards (:func:`regkern.distributed.rebuild_ddp`), so the training
    loop keeps its wrapper and optimizer.

    Returns a :class:`SliceSummary` (MACs need ``example_inputs``).
    """
    from regkern import distributed

    if not isinstance(model, nn.Module):
        raise ValueError(f"slice_model needs an nn.Module, got {type(model).__name__}")
    pairs = removal_list(removals)
    kept = _plan_cuts(model, pairs)
    wrappers = distributed.wrappers_of(model)
    ddp_options = [distributed.ddp_options(w) for w in wrappers]
    tensors = named_tensors(model)
    params = dict(model.named_parameters())
    for name in kept:
        if is_dtensor(tensors[name]):
            raise ValueError(f"{name} is sharded (DTensor); slice_model slices plain tensors only: cut a sharded "
                             "model with regkern.masks.mask_cut (a schedule's prune() does) and apply its plan "
                             "to a plain copy with regkern.export.apply_plan")
    new_shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    new_shapes.update({name: _new_shape(tensors[name].shape, kept[first])
                       for name, first in canonical_names(model).items() if first in kept})
    module_updates = _module_updates(model, kept, new_shapes) + _attribute_updates(model, pairs)
    state_updates = _state_updates(optimizer, params, kept)
    params_before = count_params(model)
    macs_before = count_flops(model, example_inputs) if example_inputs is not None else None

    for wrapper in wrappers:
        distributed.agree(wrapper.process_group, "units to slice",
                          {name: {dim: keep for dim, keep in cuts.items()} for name, cuts in kept.items()})
    if not wrappers:
        distributed.agree_here("units to slice", {name: dict(cuts) for name, cuts in kept.items()})

    # Everything checked; build the new tensors, then swap them in.
    totals = {name: tuple(tensors[name].shape) for name in kept}
    new_data = {name: _cut(tensors[name].detach(), cuts) for name, cuts in kept.items()}
    new_grads = {name: _cut(params[name].grad, cuts) for name, cuts in kept.items()
                 if name in params and params[name].grad is not None}
    for name, data in new_data.items():
        t = tensors[name]
        if name in params:
            t.grad = None
            # A graph still alive from the last forward (e.g. the last loss)
            # holds the parameter's gradient accumulator, which keeps the old
            # shape and is reused by the next backward. torch drops it when
            # the dtype changes, so pass through an empty tensor of another dtype.
            t.data = torch.empty(0, dtype=torch.float16 if t.dtype != torch.float16 else torch.float32,
                                 device=t.device)
        t.data = data
        if name in new_grads:
            t.grad = new_grads[name]
    for state, key, value, new in state_updates:
        value.data = new
        state[key] = value  # a tracked state ticks its clock: cached step plans rebuild
    for module, attr, value in module_updates:
        setattr(module, attr, value)

    for wrapper, options in zip(wrappers, ddp_options):
        distributed.rebuild_ddp(wrapper, options)

    order = {name: i for i, name in enumerate(params)}
    layers = [LayerCut(name, dim, keep.numel(), totals[name][dim])
              for name in sorted((n for n in kept if n in params), key=order.get)
              for dim, keep in sorted(kept[name].items())]
    return SliceSummary(params_before, count_params(model), macs_before,
                        count_flops(model, example_inputs) if example_inputs is not None else None, layers)
