"""The data model of a coupled group: :class:`Member` (one parameter's
share) and :class:`Group` (the slices removed together, unit by unit), with
the lookups and checks that bind a group to a model. Finding groups is
``regkern.groups``; heads are ``regkern.attention``; both build these."""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

ROLES = ("producer", "row", "column")


@dataclasses.dataclass(frozen=True, eq=False)
class Member:
    """One parameter's share of a group.

    ``name`` is the parameter's qualified name in the model (``"layer1.0.conv1.weight"``);
    unit ``u`` owns ``param.index_select(dim, index[u])`` (``index``: int64
    ``[units, width]``). ``role``: ``"producer"`` for the weight rows whose
    outputs define the units (a conv/linear weight on dim 0; for attention
    the q, k and v projections), ``"row"`` for other dim-0 members that follow
    them (biases, BatchNorm/LayerNorm channels, depthwise convs), ``"column"``
    for the consumers' input columns (dim 1) and other non-row slices.
    """

    name: str
    dim: int
    index: Tensor
    role: str


@dataclasses.dataclass(eq=False)
class Group:
    """A set of coupled slices, removed unit by unit.

    ``name`` names the group (its first producer module). ``attributes`` lists
    module attributes that count units, as ``(module_name, attribute,
    per_unit)``: slicing ``n`` units subtracts ``n * per_unit`` (e.g.
    ``("blocks.0.attn", "num_heads", 1)``). Shapes of standard modules
    (conv/linear/norm channel counts) are updated by slicing itself.

    ``buffers`` (added for slicing): non-parameter tensors cut with the group,
    as members named by their qualified buffer name (BatchNorm running
    statistics); scores and lambdas ignore them.

    :meth:`bind` records the model's tensors (``tensors``) and their shapes
    (``shapes``): a bound group refuses another model and a model sliced
    since (``find_groups`` binds every group it returns).
    """

    name: str
    units: int
    members: List[Member]
    attributes: List[Tuple[str, str, int]] = dataclasses.field(default_factory=list)
    buffers: List[Member] = dataclasses.field(default_factory=list)
    tensors: Dict[str, Tensor] = dataclasses.field(default_factory=dict, repr=False)
    shapes: Dict[str, Tuple[int, ...]] = dataclasses.field(default_factory=dict, repr=False)

    def by_role(self, *roles: str) -> List[Member]:
        return [m for m in self.members if m.role in roles]

    def bind(self, model: nn.Module) -> "Group":
        """Check the group against ``model`` and remember its tensors; returns self."""
        self.tensors, self.shapes = {}, {}
        check_group(model, self)
        named = named_tensors(model)
        for m in self.members + self.buffers:
            self.tensors[m.name] = named[m.name]
            self.shapes[m.name] = tuple(named[m.name].shape)
        return self

    def __repr__(self) -> str:
        parts = ", ".join(f"{m.name}[{m.dim}]x{m.index.shape[1]}" for m in self.members)
        return f"Group({self.name!r}, units={self.units}, members=[{parts}])"


# --------------------------------------------------------------------------- lookup and checks

def param_index(model: nn.Module) -> Dict[str, nn.Parameter]:
    """Qualified name -> parameter, a shared (tied) parameter under each of its names."""
    return dict(model.named_parameters(remove_duplicate=False))


def named_tensors(model: nn.Module) -> Dict[str, Tensor]:
    """Qualified name -> parameter or buffer, shared ones under each of their names."""
    return {**dict(model.named_buffers(remove_duplicate=False)), **param_index(model)}


def canonical_names(model: nn.Module) -> Dict[str, str]:
    """Every name of a parameter or buffer -> the first name ``named_parameters()``
    / ``named_buffers()`` give it: tied weights (an embedding shared with the
    output layer) are one tensor, cut once whichever name a group uses."""
    first: Dict[int, str] = {}
    out: Dict[str, str] = {}
    for named in (model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)):
        for name, t in named:
            out[name] = first.setdefault(id(t), name)
    return out


def projection_dims(module: nn.Module) -> Optional[Tuple[int, int]]:
    """(output dim, input dim) of a projection's weight: ``(0, 1)`` for
    ``nn.Linear``, ``(1, 0)`` for Hugging Face's ``Conv1D`` (GPT-2's
    transposed linear layer, ``weight`` of shape ``[nx, nf]``); None otherwise."""
    if isinstance(module, nn.Linear):
        return 0, 1
    if is_conv1d(module):
        return 1, 0
    return None


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (recognized without importing transformers)."""
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(weight, Tensor) and weight.dim() == 2 \
        and tuple(weight.shape) == (getattr(module, "nx", None), getattr(module, "nf", None))


def check_group(model: nn.Module, group: Group) -> None:
    """``ValueError`` unless every member of ``group`` fits ``model``: names
    exist, indices are int64 ``[units, width]`` within the dimension and not
    repeated, and a bound group was bound to this model's tensors, with the
    same shapes."""
    if not isinstance(group, Group):
        raise ValueError(f"expected a regkern.groups.Group, got {type(group).__name__}")
    if not isinstance(group.units, int) or group.units < 1:
        raise ValueError(f"group {group.name!r} has {group.units!r} units; it needs at least one")
    params = param_index(model)
    buffers = dict(model.named_buffers(remove_duplicate=False))
    for kind, table, members in (("parameter", params, group.members), ("buffer", buffers, group.buffers)):
        for m in members:
            where = f"member {m.name}[{m.dim}] of group {group.name!r}"
            if m.name not in table:
                raise ValueError(f"{where}: the model has no {kind} named {m.name!r}; is the group from another model?")
            tensor = table[m.name]
            bound = group.tensors.get(m.name)
            if bound is not None and bound is not tensor:
                raise ValueError(f"{where}: group {group.name!r} was found on another model (its {m.name} is a different tensor)")
            if m.name in group.shapes and tuple(tensor.shape) != group.shapes[m.name]:
                raise ValueError(f"{where}: {m.name} has shape {tuple(tensor.shape)}, not {group.shapes[m.name]} as when the group was found; the model was sliced since, call find_groups again")
            if m.role not in ROLES:
                raise ValueError(f"{where} has role {m.role!r}; roles are {ROLES}")
            if not 0 <= m.dim < tensor.dim():
                raise ValueError(f"{where}: dim {m.dim} is out of range for {m.name} of shape {tuple(tensor.shape)}")
            index = m.index
            if not isinstance(index, Tensor) or index.dtype != torch.int64 or index.dim() != 2 \
                    or index.shape[0] != group.units or index.shape[1] < 1:
                raise ValueError(f"{where}: index must be an int64 tensor of shape [{group.units}, width >= 1]")
            flat = index.reshape(-1)
            if flat.min() < 0 or flat.max() >= tensor.shape[m.dim]:
                raise ValueError(f"{where}: indices must lie in [0, {tensor.shape[m.dim]})")
            if flat.unique().numel() != flat.numel():
                raise ValueError(f"{where}: an index belongs to two units")


# --------------------------------------------------------------------------- tracing
