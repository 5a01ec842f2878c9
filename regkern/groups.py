"""Coupled groups: the rows of several layers that are pruned together.

Removing output channel ``c`` of a conv also removes channel ``c`` of the
BatchNorm after it, input column ``c`` of every consumer, the same channel of
every other branch of a residual add, a slice of a concatenation, and so on.
A :class:`Group` lists every (parameter, dim, indices) such a cut touches,
split into ``units``: unit ``u`` of a channel group is one channel (the
same position in every group of a grouped conv or GroupNorm it crosses); of
an attention group, one head (or one key/value group of heads, with
grouped-query attention). ``docs/groups.md`` states the rules.

:func:`find_groups` traces a model with Torch-Pruning's ``DependencyGraph``
and turns its groups into :class:`Group` objects; :func:`group_scores` and
:func:`set_group_lambda` read and write a group's weights and optimizer state
unit by unit; ``regkern.slicing.slice_model`` removes units physically.
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from regkern.attention import AttentionFinder, as_specs, claimed_modules, discovered_heads, head_groups
from regkern.group import (Group, Member, canonical_names, check_group, is_conv1d, named_tensors,  # noqa: F401
                           param_index)
from regkern.model_calls import modes_kept
from regkern.sharding import edited, is_dtensor, on_every_rank, unsharded, whole

SCORE_KINDS = ("l1", "l2", "mean_abs")


_ADD_NAMES = frozenset({"add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__",
                        "__isub__", "subtract", "subtract_", "rsub"})
_ADD_GRAD_FN = re.compile(r"(Add|Sub|Rsub)Backward\d+")
_INPUT = "<input>"  # marks what the example inputs reach


class _TraceRecorder(TorchFunctionMode):
    """Watches the traced forward.

    ``cats``: every ``torch.cat``'s output grad_fn -> (dim, ndim, input sizes
    along dim), so concatenations Torch-Pruning could not map (e.g. concat ->
    pool -> flatten -> Linear) get their channel offsets.

    ``joins``: every tensor add or subtract's output grad_fn -> whether it is
    a residual join: both operands are computed from the example inputs
    (through parameters, or the inputs themselves at the other operand's full
    shape) and they differ in the parameters they went through (``x +
    block(x)``, also on the raw input, ``branch_a(h) + branch_b(h)``). An
    operand that is a parameter, buffer, constant or scalar (a bias add, a
    positional table, an offset), or a tensor the inputs give without a
    parameter and broadcast against the other (a mask), never joins, nor
    does ``x + f(x)`` where ``f`` has no parameters. Each tensor the forward computes carries whether it
    depends on the inputs and the parameters it went through.

    ``attention``: a :class:`regkern.attention.AttentionFinder` fed every call.
    """

    def __init__(self, example_inputs) -> None:
        super().__init__()
        from torch.utils.weak import WeakIdKeyDictionary

        self.cats: Dict[Any, Tuple[int, int, List[int]]] = {}
        self.joins: Dict[Any, bool] = {}
        self.attention = AttentionFinder()
        self._origin = WeakIdKeyDictionary()  # tensor -> (depends on the inputs, frozenset of parameter ids)
        for t in _tensors_in(example_inputs):
            self._origin[t] = (True, frozenset((_INPUT,)))

    def _of(self, t: Tensor) -> Tuple[bool, frozenset]:
        if isinstance(t, nn.Parameter):
            return False, frozenset((id(t),))
        return self._origin.get(t, (False, frozenset()))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        operands = _tensors_in((args, kwargs))
        origins = [self._of(t) for t in operands]  # before the call: an in-place op rewrites its operand
        name = getattr(func, "__name__", "")
        computed = []
        if name in _ADD_NAMES:
            # an operand computed through parameters (it requires grad), or one the inputs give
            # without a parameter but of the other operand's full shape (x + block(x) on the raw
            # input: the input's channels are coupled to the block's; a broadcast mask is not)
            same_shape = len(operands) == 2 and operands[0].shape == operands[1].shape
            computed = [d and (t.requires_grad or same_shape) for t, (d, _) in zip(operands, origins)]
        out = func(*args, **kwargs)
        if func in _CATS:
            out = _copy_if_single(args, kwargs, out)
        self.attention.observe(func, args, kwargs, operands, [d for d, _ in origins], out)
        if origins:
            data = any(d for d, _ in origins)
            sets = {r for _, r in origins}
            through = next(iter(sets)) if len(sets) == 1 else frozenset().union(*sets)
            if data or through:
                for t in _tensors_in(out):
                    if not isinstance(t, nn.Parameter):
                        self._origin[t] = (data, through)
        if not isinstance(out, Tensor) or out.grad_fn is None:
            return out
        if name in _ADD_NAMES and _ADD_GRAD_FN.fullmatch(out.grad_fn.name()):
            self.joins[out.grad_fn] = computed == [True, True] and origins[0][1] != origins[1][1]
        elif func in _CATS and out.grad_fn.name().startswith("Cat"):
            tensors = args[0] if args else kwargs.get("tensors", ())
            dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
            dim = dim % out.dim()
            joined = [t for t in tensors if t.dim() == out.dim()]  # torch.cat skips empty 1-D tensors
            self.cats[out.grad_fn] = (dim, out.dim(), [t.shape[dim] for t in joined])
        return out


_CATS = (torch.cat, torch.concat, torch.concatenate)


def _copy_if_single(args, kwargs, out):
    """A concatenation of one tensor with empty ones (a key/value cache's
    first update) is a copy of that tensor: traced as one (the tracer cannot
    follow a concatenation whose other inputs hold no channels)."""
    tensors = args[0] if args else kwargs.get("tensors", ())
    filled = [t for t in tensors if isinstance(t, Tensor) and t.numel()]
    if len(filled) != 1 or len(filled) == len(tensors) or filled[0].shape != out.shape:
        return out
    return filled[0].to(out.dtype, copy=True)


def _output_tensors(out) -> List[Tensor]:
    """The tensors of a model's output that the trace starts from: those in
    nested tuples, lists and dicts (a Hugging Face ``ModelOutput`` is one)
    that autograd records; other objects (a key/value cache) are passed over."""
    if isinstance(out, Tensor):
        return [out] if out.grad_fn is not None else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _output_tensors(item)]
    return []


def _tensors_in(tree) -> List[Tensor]:
    """The tensors in nested tuples, lists and dicts."""
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(tree) if isinstance(t, Tensor)]


def _conv1d_pruner():
    """Torch-Pruning's handler for Hugging Face's ``Conv1D`` (a Linear with
    its weight stored transposed, ``[in, out]``), so the tracer treats it as
    the layer it is."""
    from torch_pruning.pruner.function import BasePruningFunc

    class Conv1DPruner(BasePruningFunc):
        def prune_out_channels(self, layer, idxs):
            drop = set(idxs)
            keep = [i for i in range(layer.nf) if i not in drop]
            layer.weight = nn.Parameter(layer.weight.data[:, keep])
            layer.bias = nn.Parameter(layer.bias.data[keep])
            layer.nf = len(keep)
            return layer

        def prune_in_channels(self, layer, idxs):
            drop = set(idxs)
            keep = [i for i in range(layer.nx) if i not in drop]
            layer.weight = nn.Parameter(layer.weight.data[keep])
            layer.nx = len(keep)
            return layer

        def get_out_channels(self, layer):
            return layer.nf

        def get_in_channels(self, layer):
            return layer.nx

    return Conv1DPruner()


def _trace(model: nn.Module, example_inputs):
    """Torch-Pruning's dependency graph of ``model``, the residual joins of
    its adds (``_TraceRecorder.joins``) and the attentions the forward
    computed (``regkern.attention.FoundAttention``, ``o`` empty for one whose
    output meets no weight); the model's train/eval
    flags are restored (the tracer leaves it in eval mode)."""
    import torch_pruning as tp

    recorder = _TraceRecorder(example_inputs)
    conv1d_types = {type(m) for m in model.modules() if is_conv1d(m)}
    pruner = _conv1d_pruner() if conv1d_types else None
    try:
        with modes_kept(model), torch.enable_grad(), recorder, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dg = tp.DependencyGraph().build_dependency(model, example_inputs, verbose=False,
                                                       customized_pruners={t: pruner for t in conv1d_types},
                                                       output_transform=_output_tensors)
    except Exception as err:  # the tracer's failures are of every type
        raise ValueError(f"torch-pruning could not trace the model ({type(err).__name__}: {err}); "
                         "check example_inputs, or rewrite the operation it cannot follow") from err
    _fix_concat_offsets(dg, recorder.cats)
    recorder.cats.clear()
    return dg, recorder.joins, recorder.attention.found + recorder.attention.unprojected


def _release(dg) -> None:
    """Drop the dependency graph's references to the traced autograd graph (memory)."""
    for node in dg.module2node.values():
        node.grad_fn = None
        node.dependencies = []
        node.inputs, node.outputs = [], []
    dg.module2node = {}


def _fix_concat_offsets(dg, cats) -> None:
    """Give channel concatenations Torch-Pruning left unmapped their offsets
    (only when the recorded sizes confirm a channel concatenation)."""
    import torch_pruning as tp
    from torch_pruning.dependency.index_mapping import _ConcatIndexMapping

    for node in dg.module2node.values():
        if node.type != tp.ops.OPTYPE.CONCAT or getattr(node.module, "offsets", None) is not None:
            continue
        info = cats.get(node.grad_fn)
        node.module.unmapped = True
        if info is None:
            continue
        dim, ndim, sizes = info
        channels = node.module.concat_sizes
        if sizes != channels and channels and None not in channels and len(set(channels)) == 1:
            # every input carries all the channels: the concatenation runs along another dim (ViT's
            # class token before the patches), and each input's channels map one to one, as traced
            node.module.unmapped = False
            continue
        channel_dim = dim == 1 or (ndim == 3 and dim == 2)
        if not channel_dim or len(sizes) != len(node.inputs) or channels != sizes:
            continue
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        node.module.offsets = offsets
        node.module.unmapped = False
        for i, source in enumerate(node.inputs):
            for dep in node.dependencies:
                if dep.target is source:
                    dep.index_mapping[1] = _ConcatIndexMapping(offset=offsets[i:i + 2], reverse=True)
            for dep in source.dependencies:
                if dep.target is node:
                    dep.index_mapping[1] = _ConcatIndexMapping(offset=offsets[i:i + 2], reverse=False)


def _resolve_modules(model: nn.Module, items, what: str) -> List[nn.Module]:
    modules = dict(model.named_modules())
    ids = {id(m) for m in modules.values()}
    if isinstance(items, (nn.Module, str)):
        items = [items]
    resolved = []
    for item in items:
        if isinstance(item, str):
            if item not in modules:
                raise ValueError(f"{what}: the model has no module named {item!r}")
            resolved.append(modules[item])
        elif isinstance(item, nn.Module):
            if id(item) not in ids:
                raise ValueError(f"{what}: module {type(item).__name__} is not part of the model")
            resolved.append(item)
        else:
            raise ValueError(f"{what}: expected modules or module names, got {type(item).__name__}")
    return resolved


# --------------------------------------------------------------------------- TP group -> Group

class _Unsupported(Exception):
    """A TP group regkern cannot slice (the message says why)."""


# How a layer split into ``count`` equal groups of ``width`` channels (a grouped conv, GroupNorm) is
# cut: channel ``c`` sits at position ``c % width`` of group ``c // width``, and a unit removes the
# same position from every group so the groups stay equal. ``modulo``: the tensor is indexed by the
# position (a grouped conv's input columns, shared by its groups), not by the channel.
Stripe = Tuple[int, int, bool]  # (width, count, modulo)


def _slices_of(module: nn.Module, name: str, is_out: bool) -> List[Tuple[str, str, int, str, Optional[Stripe]]]:
    """What a TP pruning step on ``module`` touches: (kind, tensor name, dim, role, stripe)."""
    prefix = f"{name}." if name else ""
    out: List[Tuple[str, str, int, str, Optional[Stripe]]] = []

    def add(kind, attr, dim, role, stripe=None):
        if getattr(module, attr, None) is not None:
            out.append((kind, prefix + attr, dim, role, stripe))

    if isinstance(module, nn.modules.conv._ConvNd):
        groups = module.groups
        if module.transposed and groups != 1:
            raise _Unsupported(f"grouped transposed convolution {name!r} (groups={groups})")
        depthwise = groups > 1 and groups == module.in_channels == module.out_channels
        out_dim, in_dim = (1, 0) if module.transposed else (0, 1)  # transposed: weight [in, out, k...]
        if depthwise:
            add("param", "weight", 0, "row")
            add("param", "bias", 0, "row")
        elif is_out:
            stripe = (module.out_channels // groups, groups, False) if groups > 1 else None
            add("param", "weight", out_dim, "producer", stripe)
            add("param", "bias", 0, "row", stripe)
        else:
            stripe = (module.in_channels // groups, groups, True) if groups > 1 else None
            add("param", "weight", in_dim, "column", stripe)
    elif isinstance(module, nn.Linear):
        if is_out:
            add("param", "weight", 0, "producer")
            add("param", "bias", 0, "row")
        else:
            add("param", "weight", 1, "column")
    elif is_conv1d(module):  # weight [in, out]
        if is_out:
            add("param", "weight", 1, "producer")
            add("param", "bias", 0, "row")
        else:
            add("param", "weight", 0, "column")
    elif isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        add("param", "weight", 0, "row")
        add("param", "bias", 0, "row")
        add("buffer", "running_mean", 0, "row")
        add("buffer", "running_var", 0, "row")
    elif isinstance(module, nn.GroupNorm):
        stripe = (module.num_channels // module.num_groups, module.num_groups, False)
        add("param", "weight", 0, "row", stripe)
        add("param", "bias", 0, "row", stripe)
    elif isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1:
            raise _Unsupported(f"LayerNorm {name!r} over {tuple(module.normalized_shape)}")
        add("param", "weight", 0, "row")
        add("param", "bias", 0, "row")
    elif isinstance(module, nn.PReLU):
        if module.num_parameters > 1:
            add("param", "weight", 0, "row")
    elif isinstance(module, nn.Embedding):
        add("param", "weight", 1, "producer")
    else:
        raise _Unsupported(f"{type(module).__name__} {name!r}")
    return out


def _stripe_units(slices, units: int) -> Tuple[List[int], int]:
    """Units after striping: channels at the same position of every group of
    a grouped conv or GroupNorm in the group become one unit. Returns the new
    unit of each channel unit and the new unit count."""
    parent = list(range(units))

    def root(u: int) -> int:
        while parent[u] != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    for (_, tname, _), entry in slices.items():
        if entry["stripe"] is None:
            continue
        width, count, _ = entry["stripe"]
        positions: Dict[int, List[Tuple[int, int]]] = {}
        for idx, unit in entry["pairs"]:
            positions.setdefault(idx % width, []).append((idx, unit))
        for pairs in positions.values():
            if len({idx for idx, _ in pairs}) != count:
                raise _Unsupported(f"{tname} ({count} groups of {width} channels) would lose a channel from only "
                                   "some of its groups")
            for _, unit in pairs[1:]:
                parent[root(unit)] = root(pairs[0][1])
    renumber: Dict[int, int] = {}
    unit_of = [renumber.setdefault(root(u), len(renumber)) for u in range(units)]
    return unit_of, len(renumber)


def _convert(model: nn.Module, dg, tp_group, module_names, param_names, unwrapped,
             order: Dict[str, int], joins: Dict[Any, bool], canonical: Dict[str, str]) -> Tuple[Group, bool]:
    """A TP group as a Group (members in model order, each tensor under its
    first name: ``canonical``), and whether it is joined by a residual add
    (``joins``: from ``_trace``)."""
    import torch_pruning as tp

    root = tp_group[0]
    units = len(root.idxs)
    root_name = module_names.get(root.dep.target.module, str(root.dep.target.name))
    slices: Dict[Tuple[str, str, int], Dict[str, Any]] = {}
    joined = False
    for item in tp_group.items:
        node, handler = item.dep.target, item.dep.handler
        module = node.module
        # an add is an elementwise node, or the output node when it makes the model's output
        if node.type in (tp.ops.OPTYPE.ELEMENTWISE, tp.ops.OPTYPE.OUTPUT) and node.grad_fn is not None:
            joined |= _is_join(node, joins)
        if node.type == tp.ops.OPTYPE.CONCAT and getattr(module, "unmapped", False):
            raise _Unsupported(f"a concatenation whose channel offsets torch-pruning could not map ({node.name})")
        if isinstance(module, nn.Parameter):
            name = param_names.get(id(module))
            if name is None or id(module) not in unwrapped:
                raise _Unsupported(f"a parameter outside the model's modules ({node.name})")
            dim = unwrapped[id(module)] % module.dim()
            touched = [("param", name, dim, "row" if dim == 0 else "column", None)]
        elif module in module_names:
            if not any(True for _ in module.parameters(recurse=False)) and \
                    not any(True for _ in module.buffers(recurse=False)):
                continue
            is_out = dg.is_out_channel_pruning_fn(handler)
            if not is_out and not dg.is_in_channel_pruning_fn(handler):
                raise _Unsupported(f"an unknown pruning step on {module_names[module]!r}")
            touched = _slices_of(module, module_names[module], is_out)
        else:
            continue  # a tracer op (add, concat, reshape ...): no tensors of its own
        if any(i is None for i in item.root_idxs):
            raise _Unsupported(f"indices torch-pruning could not map back to the group's channels ({node.name})")
        for kind, tname, dim, role, stripe in touched:
            tname = canonical.get(tname, tname)  # a tied weight is reached through each of its layers
            entry = slices.setdefault((kind, tname, dim), {"role": role, "pairs": set(), "stripe": stripe})
            if role == "producer":
                entry["role"] = role
            entry["pairs"].update(zip(item.idxs, item.root_idxs))
    for (_, tname, _), entry in slices.items():
        if any(not 0 <= unit < units for _, unit in entry["pairs"]):
            raise _Unsupported(f"{tname}: a channel maps to a unit outside the group's {units}")
    unit_of, units = _stripe_units(slices, units)
    members, buffers = [], []
    for (kind, tname, dim), entry in sorted(slices.items(), key=lambda kv: (order.get(kv[0][1], len(order)), kv[0][2])):
        per_unit: List[set] = [set() for _ in range(units)]
        width, modulo = (entry["stripe"][0], entry["stripe"][2]) if entry["stripe"] else (0, False)
        for idx, unit in entry["pairs"]:
            per_unit[unit_of[unit]].add(idx % width if modulo else idx)
        widths = {len(p) for p in per_unit}
        if len(widths) != 1 or 0 in widths:
            raise _Unsupported(f"{tname} is cut unevenly by the group's channels (split or partial concatenation)")
        index = torch.tensor([sorted(p) for p in per_unit], dtype=torch.int64)
        member = Member(tname, dim, index, entry["role"])
        (members if kind == "param" else buffers).append(member)
    producers = [m for m in members if m.role == "producer"]
    name = producers[0].name.rsplit(".", 1)[0] if producers else root_name
    return Group(name, units, members, buffers=buffers), joined


_COVERED = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm,
            nn.modules.instancenorm._InstanceNorm, nn.LayerNorm, nn.GroupNorm, nn.PReLU, nn.Embedding)


def _untraced(model: nn.Module, dg, ignored: Sequence[nn.Module]) -> List[str]:
    """Names of the conv / linear / norm / embedding modules with parameters
    that the trace did not reach (neither they nor a module containing them,
    such as ``nn.MultiheadAttention``), outside the ignored modules."""
    traced = {id(m) for m in dg.module2node}
    names = {id(m): n for n, m in model.named_modules()}
    skipped = [names[id(m)] for m in ignored]
    reached = [names[i] for i in traced if i in names]
    left_out = []
    for name, module in model.named_modules():
        if not isinstance(module, _COVERED) or id(module) in traced \
                or not any(True for _ in module.parameters(recurse=False)):
            continue
        if any(name == n or name.startswith(n + ".") or not n for n in skipped) \
                or any(name.startswith(n + ".") or not n for n in reached):
            continue
        left_out.append(name)
    return left_out


def _is_join(node, joins: Dict[Any, bool]) -> bool:
    """Whether a traced elementwise node is a residual add. Adds the recorder
    did not see (inside another torch function) join when two of their
    inputs are computed tensors rather than parameters."""
    import torch_pruning as tp

    if node.grad_fn in joins:
        return joins[node.grad_fn]
    if not _ADD_GRAD_FN.fullmatch(node.grad_fn.name()):
        return False
    return sum(1 for i in node.inputs if i.type != tp.ops.OPTYPE.PARAMETER) >= 2


# Torch-Pruning's walk from one root visits each dependency a few times when it ends; on some graphs
# (grouped-query attention with rotary embeddings, heads not given) it never does.
GROUPING_STEPS_PER_DEPENDENCY = 50


class _WalkTooLong(Exception):
    pass


def _bounded_groups(dg, module_names, **kwargs) -> List[Any]:
    """``dg.get_all_groups(**kwargs)``, stopped with a ValueError naming the
    root layer once one root's walk takes more than
    ``GROUPING_STEPS_PER_DEPENDENCY`` steps per dependency of the graph."""
    deps = [dep for node in dg.module2node.values() for dep in node.dependencies]
    limit = GROUPING_STEPS_PER_DEPENDENCY * max(len(deps), 1)
    walk = {"root": None, "steps": 0}

    def counted(check):
        def is_triggered_by(fn):
            walk["steps"] += 1
            if walk["steps"] > limit:
                raise _WalkTooLong
            return check(fn)
        return is_triggered_by

    def rooted(get_group):
        def get_pruning_group(module, *args, **kw):
            walk["root"], walk["steps"] = module, 0
            return get_group(module, *args, **kw)
        return get_pruning_group

    for dep in deps:
        dep.is_triggered_by = counted(dep.is_triggered_by)
    dg.get_pruning_group = rooted(dg.get_pruning_group)
    try:
        return list(dg.get_all_groups(**kwargs))
    except _WalkTooLong:
        root = module_names.get(walk["root"], type(walk["root"]).__name__)
        raise ValueError(f"find_groups stopped grouping the channels of {root!r}: torch-pruning's dependency walk from "
                         f"it passed {limit} steps without ending (it loops on some attention layouts); give the "
                         f"attention's heads with heads=[regkern.Heads(...)], or name {root!r} in ignore=") from None
    except Exception as err:
        raise ValueError(f"torch-pruning could not group the model's channels ({type(err).__name__}: {err})") from err
    finally:
        for dep in deps:
            del dep.is_triggered_by
        del dg.get_pruning_group


def find_groups(model: nn.Module, example_inputs, *, ignore=(), residual_rule: bool = False,
                heads: Optional[Sequence[Any]] = None) -> List[Group]:
    """The model's prunable coupled groups, traced with Torch-Pruning.

    Each channel group holds every tensor slice removing one channel touches:
    producer conv/linear rows (``"producer"``) and biases, BatchNorm /
    LayerNorm channels and depthwise conv rows (``"row"``, BN running stats
    in ``Group.buffers``), consumer input columns (``"column"``; a channel
    that reaches a Linear through a flatten owns several columns), all
    producers of a residual add, and the right offsets of concatenations.
    Where channels pass a grouped convolution or a GroupNorm, a unit is the
    same position in every one of its groups (so the groups stay equal);
    transposed convolutions, Hugging Face's ``Conv1D`` and tied weights
    (under their first name) are members like any other layer.

    ``ignore``: modules or module names whose outputs are never pruned (the
    classifier); their inputs may still be. ``residual_rule=True`` drops the
    groups joined by a residual add (GReg: the last conv of every residual
    block and the downsample convs keep their channels; in a transformer,
    the width of the residual stream). A residual add sums two tensors that
    both depend on the inputs and went through different parameters
    (``x + block(x)``, ``conv(x) + downsample(x)``); adding a bias, a
    parameter, a buffer, a constant or a mask computed from the inputs
    alone is none, so a Linear on ``(batch, seq, features)`` inputs keeps
    its neurons.

    Attention is never cut channel by channel. ``heads``: a
    ``regkern.attention.Heads`` spec or a sequence of them; every other
    attention the forward computes (a product of two tensors computed from
    the inputs whose result meets a weight) gets its heads found
    (``regkern.attention.discovered_heads``: projections from the trace, the
    head size from the attention module or the Hugging Face config). An
    attention whose heads cannot be found is refused in one sentence unless
    its q, k and v projections are all in ``ignore``. The head groups
    (``regkern.attention.head_groups``) come after the channel groups, and
    the output channels of the projections they own
    (``regkern.attention.claimed_modules``) leave the channel groups.

    Groups that cross what regkern cannot slice (splits, grouped transposed
    convs, unknown modules) are left out with a warning. Conv, linear, norm
    and embedding modules the trace did not reach (the forward went through
    numpy, or a Python branch skipped them on ``example_inputs``) are in no
    group: a warning names them unless they are in ``ignore``. Torch-Pruning's
    walk from each layer is bounded (``GROUPING_STEPS_PER_DEPENDENCY``): one
    that does not end is refused naming the layer. Every returned group is
    bound to ``model``; the model is left as it was.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"find_groups needs an nn.Module, got {type(model).__name__}")
    ignored = _resolve_modules(model, ignore, "ignore")
    given = as_specs(heads) if heads else []
    if given:
        claimed_modules(model, given)  # checks the specs before tracing
    with unsharded(model):  # one tensor per parameter from the trace to the groups
        groups, extra, skipped, order = _grouped(model, example_inputs, ignored, given, residual_rule)
    groups.sort(key=lambda g: order.get(g.members[0].name, len(order)))
    if skipped:
        warnings.warn("find_groups left out the groups that cross what regkern cannot slice: "
                      + "; ".join(sorted(set(skipped))), stacklevel=2)
    result = groups + extra
    for group in result:
        group.bind(model)
    _check_disjoint(model, result)
    return result


def _grouped(model: nn.Module, example_inputs, ignored, given, residual_rule: bool):
    """find_groups' trace and grouping: the channel groups, the head groups,
    the reasons of the groups left out and the parameter order (unbound)."""
    dg, joins, found = _trace(model, example_inputs)
    try:
        specs = given + _found_heads(model, found, given, ignored)
        claimed = claimed_modules(model, specs) if specs else []
        _warn_untraced(model, dg, ignored)
        extra = head_groups(model, specs, example_inputs, graph=dg) if specs else []
        module_names = {m: n for n, m in model.named_modules()}
        param_names = {id(p): n for n, p in model.named_parameters()}
        unwrapped = {id(u.parameters): u.pruning_dim for u in dg.unwrapped_parameters}
        order = {name: i for i, name in enumerate([n for n, _ in model.named_parameters()]
                                                  + [n for n, _ in model.named_buffers()])}
        canonical = canonical_names(model)
        roots = (nn.modules.conv._ConvNd, nn.Linear) + tuple({type(m) for m in model.modules() if is_conv1d(m)})
        groups, skipped = [], []
        for tp_group in _bounded_groups(dg, module_names, ignored_layers=ignored + claimed, root_module_types=roots):
            try:
                group, joined = _convert(model, dg, tp_group, module_names, param_names, unwrapped, order, joins,
                                         canonical)
            except _Unsupported as why:
                skipped.append(str(why))
                continue
            if not group.members or (residual_rule and joined):
                continue
            groups.append(group)
    finally:
        _release(dg)
        joins.clear()
    return groups, extra, skipped, order


def _found_heads(model: nn.Module, found, given, ignored: Sequence[nn.Module]):
    """Specs for the traced attentions ``given`` does not cover; ValueError
    naming every one whose heads cannot be found (attentions whose q, k and
    v projections are all ignored are left alone)."""
    ignored_weights = {id(p) for m in ignored for p in m.parameters()}
    found = [a for a in found if not (a.q | a.k | a.v) <= ignored_weights]
    specs, problems = discovered_heads(model, found, given)
    if problems:
        raise ValueError("find_groups does not cut attention channel by channel (that scrambles its heads) and "
                         f"could not find the heads of {'; '.join(problems)}; give them with "
                         "heads=[regkern.Heads(...)], or name the q, k and v projections in ignore=")
    return specs


def _warn_untraced(model: nn.Module, dg, ignored: Sequence[nn.Module]) -> None:
    left_out = _untraced(model, dg, ignored)
    if left_out:
        listed = ", ".join(repr(n) for n in left_out[:10])
        if len(left_out) > 10:
            listed += f" and {len(left_out) - 10} more"
        # stacklevel: the caller of find_groups (find_groups -> _grouped -> here)
        warnings.warn(f"find_groups' trace did not reach {listed}, so they are in no group (the forward left torch, "
                      "e.g. through numpy, or a branch skipped them on these inputs); give example_inputs that reach "
                      "them, or name them in ignore= to keep them as they are", stacklevel=4)


def _check_disjoint(model: nn.Module, groups: Sequence[Group]) -> None:
    """``ValueError`` when two groups claim the same slice of a tensor."""
    owner: Dict[Tuple[str, int], Tensor] = {}
    names: Dict[Tuple[str, int], List[str]] = {}
    tensors = named_tensors(model)
    canonical = canonical_names(model)
    for gi, group in enumerate(groups):
        for m in group.members + group.buffers:
            key = (canonical.get(m.name, m.name), m.dim)
            if key not in owner:
                owner[key] = torch.full((tensors[m.name].shape[m.dim],), -1, dtype=torch.int64)
                names[key] = []
            taken = owner[key][m.index.reshape(-1)]
            clash = taken[(taken >= 0) & (taken != gi)]
            if clash.numel():
                other = groups[int(clash[0])].name
                raise ValueError(f"groups {other!r} and {group.name!r} both claim slices of {m.name} (dim {m.dim}); "
                                 "the tracer coupled them inconsistently")
            owner[key][m.index.reshape(-1)] = gi


# --------------------------------------------------------------------------- scores and lambdas

def _unit_sums(t: Tensor, dim: int, index: Tensor) -> Tuple[Tensor, Tensor, int]:
    """Per unit: sum |W|, sum W^2 (fp64) and the element count of ``t``'s slices."""
    w = whole(t).detach().movedim(dim, 0)
    units, width = index.shape
    picked = w.index_select(0, index.reshape(-1).to(w.device)).reshape(units, -1).double()
    return picked.abs().sum(1), picked.square().sum(1), picked.shape[1]


def _row_norm_sums(norms: Tensor, index: Tensor, row_len: int) -> Tuple[Tensor, Tensor, int]:
    """The same sums from ``state["row_norms"]`` (columns: L1, L2, mean |W| per row)."""
    units, width = index.shape
    picked = norms.index_select(0, index.reshape(-1).to(norms.device)).reshape(units, width, 3).double()
    return picked[..., 0].sum(1), picked[..., 1].square().sum(1), width * row_len


def _fresh_row_norms(optimizer, param: Tensor) -> Optional[Tensor]:
    """The row norms the optimizer's last step wrote for ``param``, while
    ``param`` still holds the weights that step wrote; else None (score W)."""
    current = getattr(optimizer, "current_row_norms", None)
    norms = current(param) if current is not None else None
    usable = norms is not None and param.dim() > 0 and tuple(norms.shape) == (param.shape[0], 3)
    if is_dtensor(param):
        # whether they are current is known per rank: the ranks agree before gathering
        # them (rows x 3 values, where scoring W would gather the whole parameter)
        return whole(norms) if on_every_rank(usable, param) else None
    return norms if usable else None


def group_scores(model: nn.Module, groups: Sequence[Group], kind: str = "l1", scope: str = "producer",
                 optimizer: Optional[torch.optim.Optimizer] = None) -> List[Tensor]:
    """One fp32 score per unit of each group: ``"l1"`` (sum |W| over the
    unit's slices), ``"l2"`` (sqrt of the summed squares) or ``"mean_abs"``
    (l1 / element count), over the producer members (``scope="producer"``;
    GReg and one-shot L1 score filters only; a group without producers falls
    back to all members) or all members (``"group"``).

    With ``optimizer`` (a ``regkern.SGD``), a dim-0 member is scored from
    the row norms its last step wrote (``docs/sgd.md``, row norms) without a
    pass over W, but only while the weights are still the ones that step
    wrote (``SGD.current_row_norms``): after ``model.load_state_dict``, an
    in-place edit, a mask applied by hand or a slice, W is read.
    """
    if kind not in SCORE_KINDS:
        raise ValueError(f"kind must be one of {SCORE_KINDS}, got {kind!r}")
    if scope not in ("producer", "group"):
        raise ValueError(f"scope must be 'producer' or 'group', got {scope!r}")
    if isinstance(groups, Group):
        groups = [groups]
    for group in groups:
        check_group(model, group)
    params = param_index(model)
    scores = []
    for group in groups:
        members = group.by_role("producer") if scope == "producer" else group.members
        members = members or group.members
        l1 = l2sq = None
        count = 0
        for m in members:
            p = params[m.name]
            norms = _fresh_row_norms(optimizer, p) if m.dim == 0 else None
            if norms is not None:
                a, b, c = _row_norm_sums(norms, m.index, p[0].numel() if p.dim() > 1 else 1)
            else:
                a, b, c = _unit_sums(p, m.dim, m.index)
            if l1 is None:
                l1, l2sq = a, b
            else:
                l1, l2sq = l1 + a.to(l1.device), l2sq + b.to(l1.device)
            count += c
        if kind == "l1":
            score = l1
        elif kind == "l2":
            score = l2sq.sqrt()
        else:
            score = l1 / count
        scores.append(score.float())
    return scores


def _unit_values(values, units: int) -> Tensor:
    v = torch.as_tensor(values, dtype=torch.float32) if not isinstance(values, Tensor) else values.detach()
    if v.dim() == 0:
        v = v.expand(units)
    if v.shape != (units,):
        raise ValueError(f"values must be a scalar or hold one value per unit ({units}), got shape {tuple(v.shape)}")
    if not v.is_floating_point() or not bool(torch.isfinite(v).all()):
        raise ValueError("values must be finite floating-point numbers")
    return v.float()


def set_group_lambda(optimizer: torch.optim.Optimizer, group: Group, values, scope: str = "producer") -> None:
    """Write ``values[u]`` (one per unit, or a scalar) as the L2 coefficient of
    every slice of unit ``u``, in place: into ``state["lam"]`` (per row, or
    per element when lam has W's shape) of the producer members
    (``scope="producer"``), of every dim-0 member (``"rows"``), or of every
    dim-0 member and into ``state["lam_cols"]`` of every dim-1 member
    (``"group"``). Members of other dims are not written. The group must be
    bound (``find_groups`` binds its groups); the state is created by
    ``regkern.RowL2()`` (``RowL2(columns=True)`` for ``lam_cols``).
    """
    if scope not in ("producer", "rows", "group"):
        raise ValueError(f"scope must be 'producer', 'rows' or 'group', got {scope!r}")
    if not isinstance(group, Group):
        raise ValueError(f"expected a regkern.groups.Group, got {type(group).__name__}")
    if not group.tensors:
        raise ValueError(f"group {group.name!r} is not bound to a model; use groups from find_groups or call group.bind(model)")
    v = _unit_values(values, group.units)
    if scope == "producer":
        members = group.by_role("producer")
    elif scope == "rows":
        members = [m for m in group.members if m.dim == 0]
    else:
        members = [m for m in group.members if m.dim in (0, 1)]
    writes = []
    for m in members:
        p = group.tensors[m.name]
        if tuple(p.shape) != group.shapes[m.name]:
            raise ValueError(f"{m.name} has shape {tuple(p.shape)}, not {group.shapes[m.name]} as when group {group.name!r} was found; call find_groups again")
        key = "lam" if m.dim == 0 else "lam_cols"
        state = optimizer.state.get(p) if p in optimizer.state else None
        target = state.get(key) if state else None
        if not isinstance(target, Tensor):
            maker = "regkern.RowL2()" if key == "lam" else "regkern.RowL2(columns=True)"
            raise ValueError(f"{m.name} has no state[{key!r}] in this optimizer; give its param group the regularizer {maker}")
        size = p.shape[m.dim]
        if key == "lam" and tuple(target.shape) not in ((size,), tuple(p.shape)):
            raise ValueError(f"{m.name}: state['lam'] of shape {tuple(target.shape)} is neither per row ({size},) nor per element {tuple(p.shape)}")
        if key == "lam_cols" and tuple(target.shape) != (size,):
            raise ValueError(f"{m.name}: state['lam_cols'] of shape {tuple(target.shape)} must be ({size},)")
        writes.append((target, m.index))
    for state, index in writes:  # everything checked: now write (sharded state: by global row)
        with edited(state) as target:
            rows = index.to(target.device)
            per_row = v.to(target.device, target.dtype)[:, None].expand(rows.shape)
            if target.dim() == 1:
                target[rows.reshape(-1)] = per_row.reshape(-1)
            else:
                shape = (-1,) + (1,) * (target.dim() - 1)
                target[rows.reshape(-1)] = per_row.reshape(shape).expand((rows.numel(),) + tuple(target.shape[1:])).to(target.dtype)
