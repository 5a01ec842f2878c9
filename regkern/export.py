"""Saving and reloading sliced Hugging Face transformers models.

After ``regkern.slice_model`` the modules hold the new widths but the
model's ``config`` still describes the old ones, so ``from_pretrained``
would build the wrong shapes. This module closes that gap:

- :func:`update_config` writes the new sizes into ``model.config`` (every
  size field that one value can express) and reports what it cannot;
- :func:`save_pruned` / :func:`load_pruned` save and rebuild any sliced model
  exactly, recording per-layer widths the config cannot hold in
  ``regkern_layers.json`` beside ``config.json``;
- :func:`uniform_removals` turns a removal choice into one that keeps the same
  number of units in every layer of a kind, so the stock config is exact and
  plain ``from_pretrained`` rebuilds the model;
- :func:`make_plan` / :func:`save_plan` / :func:`apply_plan`: which units a
  pruning kept, as a JSON file that re-applies the same cut to a freshly
  built (or freshly downloaded) model.

The file formats and the guarantee are stated in ``docs/export.md``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections import defaultdict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from regkern.group import Group, Member, named_tensors
from regkern.groups import group_scores
from regkern.slicing import kept_indices, slice_model
from regkern.sharding import user_class

LAYERS_FILE = "regkern_layers.json"
LAYERS_FORMAT = "regkern-layers"
PLAN_FORMAT = "regkern-plan"
FORMAT_VERSION = 1

Removals = Union[Mapping[Group, Any], Sequence[Tuple[Group, Any]]]


# --------------------------------------------------------------------------- model structure

def _check_hf_model(model, what: str) -> None:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"{what} needs a Hugging Face transformers model (a PreTrainedModel with a config), got "
                         f"{type(model).__name__}; for other models use make_plan / apply_plan")


def _build_on_meta(model_class, config):
    """The model ``config`` describes, without memory or initialization cost."""
    with torch.device("meta"):
        return model_class(copy.deepcopy(config))


def _is_size(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_size(v) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _structure(model: nn.Module) -> Dict[str, Tuple[Dict[str, Optional[List[int]]], Dict[str, Any]]]:
    """Per module: its own tensors' shapes (None for an empty slot such as
    ``bias=None``) and its numeric attributes (widths, head counts, scales)."""
    out = {}
    for name, module in model.named_modules(remove_duplicate=False):
        shapes = {}
        for table in (module._parameters, module._buffers):
            for key, t in table.items():
                shapes[key] = None if t is None else list(t.shape)
        attributes = {k: v for k, v in vars(module).items()
                      if not k.startswith("_") and k != "training" and _is_size(v)}
        out[name] = (shapes, attributes)
    return out


def _as_json(value):
    return [_as_json(v) for v in value] if isinstance(value, (list, tuple)) else value


def _check_same_tensors(mine, theirs) -> None:
    """Raise unless two ``_structure`` results have the same modules and tensors."""
    if mine.keys() != theirs.keys():
        extra = sorted(mine.keys() ^ theirs.keys())
        raise ValueError(f"the model and the one its config builds differ in their modules (e.g. {extra[0]!r}); "
                         f"regkern exports changed widths only, not added or removed modules")
    for name, (shapes, _) in mine.items():
        ref_shapes = theirs[name][0]
        if shapes.keys() != ref_shapes.keys() or any((shapes[k] is None) != (ref_shapes[k] is None) for k in shapes):
            raise ValueError(f"module {name!r} holds the tensors {sorted(shapes)} but its config builds "
                             f"{sorted(ref_shapes)}; regkern exports changed widths only")


def _differences(target, built) -> Dict[str, Dict[str, Any]]:
    """What ``target`` holds that ``built`` does not (both ``_structure``
    results with the same tensors): ``{module: {"shapes": {tensor: shape},
    "attributes": {attr: value}}}``."""
    diff = {}
    for name, (shapes, attributes) in target.items():
        ref_shapes, ref_attributes = built[name]
        entry = {}
        changed_shapes = {k: s for k, s in shapes.items() if s != ref_shapes[k]}
        changed_attributes = {k: _as_json(v) for k, v in attributes.items()
                              if k in ref_attributes and _as_json(v) != _as_json(ref_attributes[k])}
        if changed_shapes:
            entry["shapes"] = changed_shapes
        if changed_attributes:
            entry["attributes"] = changed_attributes
        if entry:
            diff[name] = entry
    return diff


def _apply_layers(model: nn.Module, layers: Dict[str, Dict[str, Any]], where: str) -> None:
    """Give the modules of a freshly built model the recorded shapes and
    attributes (tensor contents are left to the weights loaded next)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    for name, entry in layers.items():
        if name not in modules:
            raise ValueError(f"{where} names module {name!r}, which the model built from the config does not have; "
                             f"the file belongs to another model")
        module = modules[name]
        for key, shape in entry.get("shapes", {}).items():
            t = module._parameters.get(key, module._buffers.get(key))
            if t is None:
                raise ValueError(f"{where} gives a shape for {name}.{key}, which the model built from the config does "
                                 f"not have; the file belongs to another model")
            # Replacing .data keeps the Parameter object, so tied weights stay tied.
            t.data = torch.empty(shape, dtype=t.dtype, device=t.device)
        for attr, value in entry.get("attributes", {}).items():
            if not hasattr(module, attr):
                raise ValueError(f"{where} sets {name}.{attr}, which the model built from the config does not have; "
                                 f"the file belongs to another model")
            old = getattr(module, attr)
            setattr(module, attr, tuple(value) if isinstance(old, tuple) else value)


# --------------------------------------------------------------------------- config

@dataclasses.dataclass
class ConfigUpdate:
    """What :func:`update_config` did.

    ``written``: the config fields it changed, ``{field: (old, new)}`` (a list
    element as ``"hidden_sizes[1]"``). ``layers``: the per-layer config, every
    module whose tensor shapes or attributes the updated config does not
    produce, ``{module: {"shapes": {tensor: shape}, "attributes": {attr:
    value}}}``; empty when stock ``from_pretrained`` rebuilds the model
    exactly.
    """

    written: Dict[str, Tuple[Any, Any]]
    layers: Dict[str, Dict[str, Any]]

    @property
    def stock_loadable(self) -> bool:
        """True when the config alone rebuilds the model (no per-layer config needed)."""
        return not self.layers

    def __str__(self) -> str:
        fields = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in self.written.items()) or "no field changed"
        if self.stock_loadable:
            return f"config: {fields}; the config alone rebuilds the model (stock from_pretrained works)"
        return (f"config: {fields}; {len(self.layers)} modules need the per-layer config "
                f"(load with regkern.export.load_pruned)")


def _size_fields(config) -> List[Tuple[str, Optional[int], int]]:
    """Every positive int field of the config, and every element of a list
    of positive ints: ``(field, list position or None, value)``."""
    out = []
    for field, value in vars(config).items():
        if field.startswith("_") or isinstance(value, bool):
            continue
        if isinstance(value, int) and value > 0:
            out.append((field, None, value))
        elif isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                       for v in value):
            out += [(field, i, v) for i, v in enumerate(value)]
    return out


def _field_value(config, field: str, position: Optional[int]) -> int:
    value = getattr(config, field)
    return value if position is None else value[position]


def _with_field(config, field: str, position: Optional[int], value: int):
    config = copy.deepcopy(config)
    if position is None:
        setattr(config, field, value)
    else:
        values = list(getattr(config, field))
        values[position] = value
        setattr(config, field, values)
    return config


def _tensor_shapes(model: nn.Module) -> Dict[str, Tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in named_tensors(model).items()}


def _kv_heads_divide(config) -> bool:
    """Grouped-query attention needs the kv head count to divide the query
    head count; some configs do not check it themselves."""
    heads, kv = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    return not (isinstance(heads, int) and isinstance(kv, int) and kv > 0 and heads % kv)


def _try_build(model_class, config, validate: bool = True) -> Optional[nn.Module]:
    """The model ``config`` builds, or None where the model or (with
    ``validate``) the config's own checks, which ``save_pretrained`` runs,
    refuse these sizes."""
    if validate and not _kv_heads_divide(config):
        return None
    try:
        if validate and callable(getattr(config, "validate", None)):
            config.validate()
        return _build_on_meta(model_class, config)
    except Exception:  # e.g. a width that the head count does not divide
        return None


def _field_candidate(model_class, config, field, position, base, pruned) -> Optional[int]:
    """The new value of one config field, when every tensor it sizes asks
    for the same one; else None.

    The field is probed: the model is built (on the meta device) with the
    field changed, and every tensor dimension that moves is taken as
    ``per_unit * field + offset``; each pruned size then gives the value it
    asks for. A field that sizes no tensor, or adds or removes tensors (a
    layer count), gives none.
    """
    value = _field_value(config, field, position)
    for candidate in (2 * value, value + 1):
        # A probe only has to build: the config's checks (a width the head
        # count divides ...) would refuse most probe values.
        probe = _try_build(model_class, _with_field(config, field, position, candidate), validate=False)
        if probe is not None:
            break
    else:
        return None
    probe_shapes = _tensor_shapes(probe)
    if probe_shapes.keys() != base.keys():
        return None
    step = candidate - value
    asked = set()
    for name, shape in base.items():
        for dim, (before, after) in enumerate(zip(shape, probe_shapes[name])):
            if before != after:
                asked.add((pruned[name][dim] - before) / ((after - before) / step) + value)
    if len(asked) != 1:
        return None
    wanted = asked.pop()
    if abs(wanted - round(wanted)) > 1e-9 or round(wanted) < 1 or round(wanted) == value:
        return None
    return int(round(wanted))


def _mismatches(target, reference: nn.Module) -> Optional[set]:
    """The (module, tensor or attribute) entries where ``reference`` differs
    from ``target`` (a ``_structure``), or None when its tensors differ."""
    built = _structure(reference)
    try:
        _check_same_tensors(target, built)
    except ValueError:
        return None
    return {(name, key) for name, entry in _differences(target, built).items()
            for part in entry.values() for key in part}


# Fields giving the size of one head: regkern cuts whole heads, so these never
# change. A width such as q_proj's rows (num_heads * head_dim) could otherwise
# be matched by changing the head size, which computes something else.
_UNIT_SIZE_FIELDS = ("head_dim", "d_kv", "kv_channels", "attention_head_size")


def update_config(model: nn.Module) -> ConfigUpdate:
    """Write a sliced Hugging Face model's new sizes into ``model.config``.

    The size fields of the config (every positive int, and every int in a
    list such as ResNet's ``hidden_sizes``) move to the value every tensor
    they size asks for: ``hidden_size``, ``intermediate_size``,
    ``num_attention_heads``, ``num_key_value_heads`` when all layers agree,
    ``hidden_sizes`` of a CNN stage, and so on; a change is taken only where
    the config's own checks accept it and it leaves fewer differences
    between ``model`` and the model the config builds, breaking none.
    Head sizes (``head_dim``) never move: regkern cuts whole heads. What
    still differs (widths that differ between layers, head counts a config
    cannot express, e.g. BERT's, whose head size is ``hidden_size /
    num_attention_heads``) is returned as ``layers``, the per-layer config
    :func:`save_pruned` writes: the tensor shapes, and the module attributes
    the cut changed (head counts, ``in_features`` ...). Attributes the cut
    left alone take the config's values. A model whose modules or tensors
    are not the ones its config builds raises ``ValueError`` and the config
    is left as it was. ``model.config`` is changed in place (a config object
    shared with another model changes there too).
    """
    _check_hf_model(model, "update_config")
    model_class, config = type(model), model.config
    try:
        reference = _build_on_meta(model_class, config)
    except Exception as exc:
        raise ValueError(f"{model_class.__name__} cannot be built from its own config ({type(exc).__name__}: "
                         f"{exc}); update_config needs a config that builds the model") from exc
    mine, theirs = _structure(model), _structure(reference)
    _check_same_tensors(mine, theirs)
    # Attributes that still have the config's value were not changed by the cut
    # (some are bookkeeping the forward never reads, e.g. LlamaMLP.hidden_size):
    # the config decides them.
    target = {name: (shapes, {k: v for k, v in attributes.items()
                              if k in theirs[name][1] and _as_json(v) != _as_json(theirs[name][1][k])})
              for name, (shapes, attributes) in mine.items()}
    pruned, base = _tensor_shapes(model), _tensor_shapes(reference)
    current, differing = copy.deepcopy(config), _mismatches(target, reference)
    # Each round takes the single-field change that fixes the most and breaks
    # nothing that already matches.
    fields = [f for f in _size_fields(config) if f[0] not in _UNIT_SIZE_FIELDS]
    while differing:
        best = None
        for field, position, _ in fields:
            candidate = _field_candidate(model_class, current, field, position, base, pruned)
            if candidate is None:
                continue
            trial = _with_field(current, field, position, candidate)
            built = _try_build(model_class, trial)
            left = None if built is None else _mismatches(target, built)
            if left is not None and left < differing and (best is None or len(left) < len(best[0])):
                best = (left, trial, _tensor_shapes(built))
        if best is None:
            break
        differing, current, base = best
    written = {}
    for field, position, old in fields:
        new = _field_value(current, field, position)
        if new != old:
            written[field if position is None else f"{field}[{position}]"] = (old, new)
    layers = _differences(target, _structure(_build_on_meta(model_class, current)))
    for field in {label.partition("[")[0] for label in written}:
        setattr(config, field, copy.deepcopy(getattr(current, field)))
    return ConfigUpdate(written, layers)


# --------------------------------------------------------------------------- save / load

def save_pruned(model: nn.Module, path: Union[str, os.PathLike], **save_kwargs) -> ConfigUpdate:
    """Save a sliced Hugging Face model so that :func:`load_pruned` rebuilds it exactly.

    Runs :func:`update_config`, then ``model.save_pretrained(path,
    **save_kwargs)``, then writes the per-layer config to
    ``path/regkern_layers.json`` (its ``"modules"`` empty when the config alone
    is exact; then plain ``from_pretrained`` works too). Returns the
    :class:`ConfigUpdate`. A model that cannot be exported raises
    ``ValueError`` before anything is written.
    """
    update = update_config(model)
    model.save_pretrained(path, **save_kwargs)
    record = {"format": LAYERS_FORMAT, "version": FORMAT_VERSION, "model_class": type(model).__name__,
              "modules": update.layers}
    with open(os.path.join(path, LAYERS_FILE), "w") as f:
        json.dump(record, f, indent=1)
    return update


def _read_json(path: str, what: str, expected_format: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            record = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); it is not a {what} written by regkern") from exc
    if not isinstance(record, dict) or record.get("format") != expected_format:
        raise ValueError(f"{path} is not a {what} written by regkern (its \"format\" is not {expected_format!r})")
    if record.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} has {what} version {record.get('version')!r}; this regkern reads version "
                         f"{FORMAT_VERSION}")
    return record


def load_pruned(path: Union[str, os.PathLike], model_class=None, **from_pretrained_kwargs) -> nn.Module:
    """Rebuild a model saved by :func:`save_pruned`.

    The model is built from ``path/config.json`` by ``model_class`` (default:
    the class the model was saved as), its modules take the
    widths and attributes of ``path/regkern_layers.json``, and then
    ``from_pretrained`` loads the weights as usual (``from_pretrained_kwargs``
    pass through: ``dtype``, ``device_map``, ...). The result is a plain
    ``model_class`` instance whose outputs equal the saved model's.
    """
    path = os.fspath(path)
    layers_path = os.path.join(path, LAYERS_FILE)
    if not os.path.isfile(layers_path):
        raise ValueError(f"{path} has no {LAYERS_FILE}; it was not saved by regkern.export.save_pruned (a model "
                         f"saved by save_pretrained alone loads with from_pretrained)")
    record = _read_json(layers_path, "per-layer config", LAYERS_FORMAT)
    layers = record.get("modules")
    if not isinstance(layers, dict):
        raise ValueError(f"{layers_path} has no \"modules\" table; the file is damaged, save the model again")
    saved_class = record.get("model_class")
    if model_class is None:
        import transformers

        model_class = getattr(transformers, str(saved_class), None)
        if model_class is None:
            raise ValueError(f"{layers_path} names the model class {saved_class!r}, which this transformers does "
                             f"not have; pass model_class=")
    from transformers import PreTrainedModel

    if not (isinstance(model_class, type) and issubclass(model_class, PreTrainedModel)):
        raise ValueError(f"model_class must be a transformers model class such as {saved_class}, not an Auto class "
                         f"or {model_class!r}; the per-layer config reshapes that class's modules")
    if layers and model_class.__name__ != saved_class:
        raise ValueError(f"{path} holds a {saved_class} whose per-layer config names that class's modules; load it "
                         f"with model_class={saved_class}, not {model_class.__name__}")

    def __init__(self, config, *args, **kwargs):
        model_class.__init__(self, config, *args, **kwargs)
        _apply_layers(self, layers, layers_path)

    # A subclass whose constructor reshapes the layers lets from_pretrained do
    # the loading (shards, dtypes, tied weights, devices) on the right shapes.
    reshaped = type(model_class.__name__, (model_class,), {"__init__": __init__, "__module__": model_class.__module__,
                                                           "__qualname__": model_class.__qualname__})
    model = reshaped.from_pretrained(path, **from_pretrained_kwargs)
    model.__class__ = model_class
    return model


# --------------------------------------------------------------------------- uniform widths

def _layer_kind(group: Group) -> Tuple:
    """Groups of the same kind are the same layer in different blocks: their
    members' names agree once the block numbers are left out."""
    def generic(name: str) -> str:
        return ".".join("#" if part.isdigit() else part for part in name.split("."))
    return tuple((generic(m.name), m.dim, m.index.shape[1], m.role) for m in group.members)


def uniform_removals(model: nn.Module, removals: Removals, scores: Optional[Sequence[torch.Tensor]] = None
                     ) -> List[Tuple[Group, List[int]]]:
    """The same number of kept units in every group of a kind, close to ``removals``.

    Groups of one kind are one layer repeated over the blocks (the attention
    of every decoder layer, the MLP of every decoder layer). Each kind keeps
    the rounded mean of what ``removals`` keeps in its groups, and each group
    removes its lowest-scoring units (``scores``: one tensor per group of
    ``removals``, in its order, as ``regkern.group_scores`` returns; default
    the L2 scores of the model's weights). With attention groups the units
    are heads or whole key/value groups, so every layer then has the same
    head counts and the stock config describes the sliced model exactly.
    Only the groups in ``removals`` are considered: list the untouched ones
    with no units to have them cut too.
    """
    items = list(removals.items()) if isinstance(removals, Mapping) else list(removals)
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], Group)):
            raise ValueError("removals must be {group: units} or a list of (group, units) pairs with regkern Groups")
    groups = [g for g, _ in items]
    kept_indices(model, items)  # checks the removals as slice_model does
    if scores is None:
        scores = group_scores(model, groups, kind="l2")
    scores = list(scores)
    if len(scores) != len(groups):
        raise ValueError(f"scores has {len(scores)} entries for {len(groups)} groups; give one tensor per group of "
                         f"removals, in its order")
    kinds: Dict[Tuple, List[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        if scores[i].shape != (g.units,):
            raise ValueError(f"the scores of group {g.name!r} have shape {tuple(scores[i].shape)}, not ({g.units},)")
        kinds[_layer_kind(g)].append(i)
    out: List[Tuple[Group, List[int]]] = [None] * len(items)
    for members in kinds.values():
        kept = [groups[i].units - torch.as_tensor(items[i][1]).numel() for i in members]
        target = max(1, min(round(sum(kept) / len(kept)), min(groups[i].units for i in members)))
        for i in members:
            order = torch.argsort(scores[i].detach().cpu().float(), stable=True)
            out[i] = (groups[i], sorted(order[:groups[i].units - target].tolist()))
    return out


# --------------------------------------------------------------------------- pruning plans

def _removal_count(units) -> int:
    return torch.as_tensor(units).numel()


def make_plan(model: nn.Module, removals: Removals, previous: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The plan of a cut: which entries of each tensor ``removals`` keep.

    Call it before ``slice_model(model, removals, ...)``. ``previous``: the
    plan of the cut that made ``model`` (a second pruning round); the result
    is then relative to the model before the first round. The plan is a
    JSON-ready dict (format in ``docs/export.md``): per tensor its shape
    before the cut and the kept indices per cut dimension, and the new
    values of the module attributes the groups count (head counts).
    """
    kept = kept_indices(model, removals)  # checks the removals as slice_model does
    items = list(removals.items()) if isinstance(removals, Mapping) else list(removals)
    modules = dict(model.named_modules())
    attributes: Dict[str, Dict[str, int]] = defaultdict(dict)
    for group, units in items:
        for module_name, attr, per_unit in group.attributes:
            current = attributes[module_name].get(attr, getattr(modules[module_name], attr))
            attributes[module_name][attr] = current - _removal_count(units) * per_unit
    shapes = _tensor_shapes(model)
    tensors = {name: {"shape": list(shapes[name]), "kept": {str(d): k.tolist() for d, k in dims.items()}}
               for name, dims in kept.items()}
    plan = {"format": PLAN_FORMAT, "version": FORMAT_VERSION, "model_class": user_class(model).__name__,
            "tensors": tensors, "attributes": dict(attributes)}
    if previous is None:
        return plan
    _check_plan(previous, "previous")
    if previous["model_class"] != plan["model_class"]:
        raise ValueError(f"previous was made for a {previous['model_class']}, not a {plan['model_class']}")
    merged = copy.deepcopy(previous)
    for name, entry in tensors.items():
        before = merged["tensors"].setdefault(name, {"shape": entry["shape"], "kept": {}})
        for dim, now in entry["kept"].items():
            earlier = before["kept"].get(dim)
            size_now = entry["shape"][int(dim)]
            if (len(earlier) if earlier is not None else before["shape"][int(dim)]) != size_now:
                raise ValueError(f"previous is not the plan of the cut that made this model: it leaves {name} "
                                 f"{len(earlier) if earlier is not None else before['shape'][int(dim)]} entries along "
                                 f"dim {dim}, the model has {size_now}")
            # Indices of this round count the entries the earlier round kept.
            before["kept"][dim] = now if earlier is None else [earlier[i] for i in now]
    for module_name, values in plan["attributes"].items():
        merged["attributes"].setdefault(module_name, {}).update(values)
    return merged


def _check_plan(plan, where: str) -> None:
    if not (isinstance(plan, dict) and plan.get("format") == PLAN_FORMAT and isinstance(plan.get("tensors"), dict)
            and isinstance(plan.get("attributes"), dict) and isinstance(plan.get("model_class"), str)):
        raise ValueError(f"{where} is not a regkern pruning plan (make one with regkern.export.make_plan)")
    if plan.get("version") != FORMAT_VERSION:
        raise ValueError(f"{where} has plan version {plan.get('version')!r}; this regkern reads version "
                         f"{FORMAT_VERSION}")


def save_plan(plan: Dict[str, Any], path: Union[str, os.PathLike]) -> None:
    """Write a plan from :func:`make_plan` as JSON."""
    _check_plan(plan, "plan")
    with open(path, "w") as f:
        json.dump(plan, f)


def apply_plan(model: nn.Module, plan: Union[Dict[str, Any], str, os.PathLike],
               optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Cut ``model`` (a fresh or pretrained copy of the one the plan was made
    on) as the plan says: each tensor keeps the recorded entries, module
    shapes and head counts follow, through ``slice_model`` (so ``optimizer``,
    if given, is cut along), and each recorded expansion (a sharded model's
    cut with ``residual="expand"``) gets its ``ChannelExpand``. A plan that
    does not fit the model raises ``ValueError`` and nothing changes. For a Hugging Face model, follow with
    :func:`update_config` or :func:`save_pruned`.
    """
    where = "plan"
    if isinstance(plan, (str, os.PathLike)):
        where = os.fspath(plan)
        plan = _read_json(where, "pruning plan", PLAN_FORMAT)
    _check_plan(plan, where)
    if plan["model_class"] != user_class(model).__name__:
        raise ValueError(f"{where} was made for a {plan['model_class']}, not a {user_class(model).__name__}; apply it to "
                         f"the model it was made on")
    tensors = named_tensors(model)
    parameters = dict(model.named_parameters())
    removals = []
    for name, entry in plan["tensors"].items():
        if name not in tensors or list(tensors[name].shape) != entry["shape"]:
            found = "no such tensor" if name not in tensors else f"shape {list(tensors[name].shape)}"
            raise ValueError(f"{where} cuts {name} of shape {entry['shape']}, but the model has {found}; the plan was "
                             f"made for another configuration of {plan['model_class']}")
        for dim, keep in entry["kept"].items():
            if not (dim.isdigit() and int(dim) < len(entry["shape"])):
                raise ValueError(f"{where} cuts {name} along dim {dim!r}, which a tensor of shape {entry['shape']} "
                                 f"does not have; the plan is damaged")
            size = entry["shape"][int(dim)]
            if not (isinstance(keep, list) and keep and keep == sorted(set(keep))
                    and all(isinstance(i, int) and 0 <= i < size for i in keep)):
                raise ValueError(f"{where} keeps {keep!r} of {name} along dim {dim}; kept entries must be increasing "
                                 f"indices in [0, {size}), at least one; the plan is damaged")
            drop = sorted(set(range(size)) - set(keep))
            member = Member(name, int(dim), torch.arange(size).view(-1, 1), "producer" if dim == "0" else "column")
            group = (Group(f"{name}[{dim}]", size, [member]) if name in parameters
                     else Group(f"{name}[{dim}]", size, [], buffers=[member]))
            removals.append((group, drop))
    modules = dict(model.named_modules())
    for module_name, values in plan["attributes"].items():
        for attr in values:
            if module_name not in modules or not hasattr(modules[module_name], attr):
                raise ValueError(f"{where} sets {module_name}.{attr}, which the model does not have; the plan was "
                                 f"made for another model")
            value = values[attr]
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"{where} sets {module_name}.{attr} to {value!r}; it must be a positive integer; "
                                 f"the plan is damaged")
    expansions = plan.get("expansions", {})
    if not isinstance(expansions, dict):
        raise ValueError(f"{where} has expansions of type {type(expansions).__name__}, not a mapping from "
                         "BatchNorm names; the plan is damaged")
    for norm, entry in expansions.items():
        cut = plan["tensors"].get(f"{norm}.weight", {}).get("kept", {}).get("0")
        if not (isinstance(modules.get(norm), nn.modules.batchnorm._BatchNorm) and isinstance(entry, dict)
                and entry.get("kept") == cut and isinstance(entry.get("width"), int)
                and entry["width"] == modules[norm].num_features):
            raise ValueError(f"{where} re-expands {norm}, which is not a BatchNorm of the recorded width whose "
                             "channels the plan cuts; the plan is damaged or made for another model")
    slice_model(model, removals, optimizer)
    for module_name, values in plan["attributes"].items():
        for attr, value in values.items():
            setattr(modules[module_name], attr, value)
    if expansions:
        from regkern.prune.expand import attach_expand  # the prune package imports this module

        for norm, entry in expansions.items():
            attach_expand(modules[norm], torch.tensor(entry["kept"]), entry["width"])
