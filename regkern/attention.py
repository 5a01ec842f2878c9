"""Attention heads as prunable units.

A channel group (``regkern.groups.find_groups``) removes one channel at a
time; an attention head is ``head_dim`` rows of the q, k and v projections
and the matching ``head_dim`` input columns of the output projection, and the
module's head count must drop with it. :class:`Heads` names the projections
of one attention module; :func:`head_groups` turns it into a
:class:`~regkern.groups.Group` whose units are heads, or, with grouped-query
attention, key/value groups (one kv head and the ``num_heads / num_kv_heads``
query heads that read it), so that the sliced model stays valid. With one
key/value head (multi-query attention, or grouped-query attention pruned
down to one kv group) the units are the query heads: the shared k and v rows
stay. :class:`AttentionFinder` watches a traced forward for attention (a
product of two computed tensors) and :func:`discovered_heads` writes the
specs of what it saw, so ``find_groups`` needs no specs on common models.

Layout assumed (the usual one, LLaMA/timm/HF): q rows ``[h * head_dim,
(h + 1) * head_dim)`` are query head ``h``; k and v rows likewise per kv
head; query head ``h`` reads kv head ``h // (num_heads / num_kv_heads)``
(``repeat_kv``, ``repeat_interleave``, SDPA's ``enable_gqa``); o's input
columns follow the query heads. A fused ``qkv`` Linear holds ``[q; k; v]``
rows in that order. A projection is an ``nn.Linear`` or Hugging Face's
``Conv1D`` (GPT-2: the weight transposed, outputs along dim 1).
:func:`head_groups` checks a spec against the model: shapes and head-count
attributes always; with a Torch-Pruning dependency graph, that o's input
comes from exactly q, k and v; with example inputs, the layout itself
(perturbing one unit's rows must change o's input in that unit's columns
only), which a dependency graph cannot see.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regkern import hf
from regkern.group import Group, Member, projection_dims
from regkern.model_calls import call_model, modes_kept

ModuleRef = Union[str, nn.Module, None]


@dataclasses.dataclass(frozen=True, eq=False)
class Heads:
    """The projections of one attention module, by qualified name or module.

    Give either ``q``, ``k``, ``v`` (separate Linears) or ``qkv`` (one Linear
    whose rows are ``[q; k; v]``), and always ``o`` (the output projection).
    ``num_heads`` / ``num_kv_heads`` default to the module's attributes
    ``heads_attr`` / ``kv_heads_attr``; ``num_kv_heads=None`` with no such
    attribute means plain multi-head attention. ``head_dim`` defaults to
    ``q rows / num_heads``. ``module`` is the attention module whose forward
    reads the head counts (default: the common parent of the projections);
    slicing ``n`` units subtracts ``n * num_heads / num_kv_heads`` from
    ``heads_attr`` and ``n`` from ``kv_heads_attr`` (set either to ``None``
    when the forward does not read it), and ``n * per_unit`` from each
    ``(attribute, per_unit)`` of ``extra_attributes`` (e.g.
    ``("all_head_size", 64)``). ``kv_groups_attr``, when the module has it,
    counts the query heads per kv head (Hugging Face's
    ``num_key_value_groups``): it stays while whole kv groups go, and drops
    by one per query head removed with one kv head (multi-query attention,
    whose units are query heads). ``trace_check=False`` skips the dependency
    graph and layout checks of :func:`head_groups` (shapes and attributes
    are always checked).
    """

    q: ModuleRef = None
    k: ModuleRef = None
    v: ModuleRef = None
    o: ModuleRef = None
    qkv: ModuleRef = None
    num_heads: Optional[int] = None
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    module: ModuleRef = None
    heads_attr: Optional[str] = "num_heads"
    kv_heads_attr: Optional[str] = "num_kv_heads"
    kv_groups_attr: Optional[str] = "num_key_value_groups"
    extra_attributes: Tuple[Tuple[str, int], ...] = ()
    trace_check: bool = True


@dataclasses.dataclass
class _Resolved:
    """A validated spec: modules, names, sizes."""

    spec: Heads
    label: str
    projections: Dict[str, Tuple[str, nn.Module]]  # role ("q", "k", "v", "qkv", "o") -> (name, module)
    module_name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    attributes: List[Tuple[str, str, int]]

    @property
    def n_rep(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def single_kv(self) -> bool:
        """One kv head shared by every query head: the units are query heads."""
        return self.num_kv_heads == 1 and self.num_heads > 1

    @property
    def units(self) -> int:
        return self.num_heads if self.single_kv else self.num_kv_heads

    def producers(self) -> List[Tuple[str, nn.Module]]:
        return [self.projections[r] for r in ("qkv", "q", "k", "v") if r in self.projections]

    def unit_producers(self) -> List[Tuple[str, str, nn.Module]]:
        """(role, name, module) of the projections whose rows the units own
        (not the shared k and v of a single kv head)."""
        return [(r, *self.projections[r]) for r in ("qkv", "q", "k", "v")
                if r in self.projections and not (self.single_kv and r in ("k", "v"))]

    def row_index(self, role: str) -> torch.Tensor:
        """A producer's rows (or, for "o", columns) per unit: int64 ``[units, width]``."""
        d, rep, kv = self.head_dim, self.n_rep, self.num_kv_heads
        per_unit = d if self.single_kv else rep * d  # unit u: query heads u*rep .. u*rep+rep-1
        q_rows = torch.arange(kv * rep * d).view(-1, per_unit)
        kv_rows = torch.arange(kv * d).view(kv, d)
        if role in ("q", "o"):
            return q_rows
        if role in ("k", "v"):
            return kv_rows
        if self.single_kv:  # fused qkv: the query rows only
            return q_rows
        q_size = kv * rep * d
        return torch.cat([q_rows, kv_rows + q_size, kv_rows + q_size + kv * d], dim=1)


def as_specs(heads) -> List[Heads]:
    """``heads`` (a :class:`Heads` or a sequence of them) as a list, checked."""
    if isinstance(heads, Heads):
        return [heads]
    if isinstance(heads, (str, bytes, nn.Module)) or not isinstance(heads, Sequence):
        raise ValueError(f"heads must be a Heads spec or a sequence of them, got {type(heads).__name__}")
    for h in heads:
        if not isinstance(h, Heads):
            raise ValueError(f"heads must hold Heads specs, got {type(h).__name__}")
    return list(heads)


def _lookup(model: nn.Module, ref, what: str, label: str, names: Dict[int, str]) -> Tuple[str, nn.Module]:
    """A (qualified name, module) pair from a name or a module of ``model``."""
    if isinstance(ref, str):
        try:
            return ref, model.get_submodule(ref)
        except AttributeError:
            raise ValueError(f"{label}: {what}={ref!r} names no module of the model") from None
    if isinstance(ref, nn.Module):
        if id(ref) not in names:
            raise ValueError(f"{label}: {what} is a {type(ref).__name__} that is not a submodule of the model")
        return names[id(ref)], ref
    raise ValueError(f"{label}: {what} must be a module name or an nn.Module, got {type(ref).__name__}")


def _positive_int(value, what: str, label: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{label}: {what} must be a positive int, got {value!r}")
    return value


def _resolve(model: nn.Module, spec: Heads, names: Dict[int, str]) -> _Resolved:
    """Validate one spec against the model (nothing is modified)."""
    label = f"Heads(o={spec.o if isinstance(spec.o, str) else type(spec.o).__name__})"
    separate = [r for r in ("q", "k", "v") if getattr(spec, r) is not None]
    if spec.qkv is not None and separate:
        raise ValueError(f"{label}: give either qkv or q/k/v, not both")
    if spec.qkv is None and len(separate) != 3:
        raise ValueError(f"{label}: give q, k and v (or a fused qkv); missing "
                         f"{[r for r in ('q', 'k', 'v') if r not in separate]}")
    if spec.o is None:
        raise ValueError("Heads: o (the output projection) is required")
    roles = ["qkv", "o"] if spec.qkv is not None else ["q", "k", "v", "o"]
    projections = {}
    for role in roles:
        name, mod = _lookup(model, getattr(spec, role), role, label, names)
        if projection_dims(mod) is None:
            raise ValueError(f"{label}: {role}={name!r} is a {type(mod).__name__}; projections must be nn.Linear "
                             f"or transformers' Conv1D")
        projections[role] = (name, mod)
    label = f"Heads(o={projections['o'][0]!r})"
    mods = [m for _, m in projections.values()]
    if len({id(m) for m in mods}) != len(mods):
        raise ValueError(f"{label}: the same Linear is given for two projections")

    if spec.module is None:
        parts = [n.split(".") for n, _ in projections.values()]
        common = []
        for level in zip(*[p[:-1] for p in parts]):
            if len(set(level)) != 1:
                break
            common.append(level[0])
        module_name, attn = ".".join(common), model.get_submodule(".".join(common))
    else:
        module_name, attn = _lookup(model, spec.module, "module", label, names)

    def attr_value(attr: Optional[str], what: str) -> Optional[int]:
        if attr is None or not hasattr(attn, attr):
            return None
        value = getattr(attn, attr)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{label}: {module_name or 'model'}.{attr} is {value!r}, not an int ({what})")
        return value

    heads_now = attr_value(spec.heads_attr, "heads_attr")
    kv_now = attr_value(spec.kv_heads_attr, "kv_heads_attr")
    if spec.heads_attr is not None and heads_now is None:
        raise ValueError(f"{label}: module {module_name or 'model'!r} ({type(attn).__name__}) has no attribute "
                         f"{spec.heads_attr!r}; name the attribute its forward reads (heads_attr=...), or "
                         f"heads_attr=None if it reads none")
    num_heads = spec.num_heads if spec.num_heads is not None else heads_now
    if num_heads is None:
        raise ValueError(f"{label}: num_heads is not given and heads_attr is None")
    num_heads = _positive_int(num_heads, "num_heads", label)
    if heads_now is not None and heads_now != num_heads:
        raise ValueError(f"{label}: num_heads={num_heads} but {module_name or 'model'}.{spec.heads_attr} "
                         f"is {heads_now}")
    num_kv = spec.num_kv_heads if spec.num_kv_heads is not None else kv_now
    num_kv = num_heads if num_kv is None else _positive_int(num_kv, "num_kv_heads", label)
    if kv_now is not None and kv_now != num_kv:
        raise ValueError(f"{label}: num_kv_heads={num_kv} but {module_name or 'model'}.{spec.kv_heads_attr} "
                         f"is {kv_now}")
    if num_heads % num_kv:
        raise ValueError(f"{label}: num_kv_heads={num_kv} does not divide num_heads={num_heads}")
    if num_kv != num_heads and spec.kv_heads_attr is not None and kv_now is None:
        raise ValueError(f"{label}: grouped-query attention but module {module_name or 'model'!r} has no "
                         f"attribute {spec.kv_heads_attr!r}; name the one its forward reads "
                         f"(kv_heads_attr=...), or kv_heads_attr=None if it reads none")

    q_rows = _outputs(projections["qkv" if "qkv" in projections else "q"][1])
    if "qkv" in projections:
        per_head_total = num_heads + 2 * num_kv
        if q_rows % per_head_total:
            raise ValueError(f"{label}: qkv has {q_rows} rows, not a multiple of num_heads + 2 * num_kv_heads = "
                             f"{per_head_total}")
        head_dim = q_rows // per_head_total
    else:
        if q_rows % num_heads:
            raise ValueError(f"{label}: q has {q_rows} rows, not a multiple of num_heads={num_heads}")
        head_dim = q_rows // num_heads
    if spec.head_dim is not None and _positive_int(spec.head_dim, "head_dim", label) != head_dim:
        raise ValueError(f"{label}: head_dim={spec.head_dim} but the projections give {head_dim}")
    expected = {"q": num_heads * head_dim, "k": num_kv * head_dim, "v": num_kv * head_dim}
    for role in ("k", "v"):
        if role in projections and _outputs(projections[role][1]) != expected[role]:
            raise ValueError(f"{label}: {role} has {_outputs(projections[role][1])} rows, expected "
                             f"num_kv_heads * head_dim = {num_kv} * {head_dim}")
    if _inputs(projections["o"][1]) != expected["q"]:
        raise ValueError(f"{label}: o has {_inputs(projections['o'][1])} input columns, expected "
                         f"num_heads * head_dim = {num_heads} * {head_dim}")
    if num_heads < 2:
        raise ValueError(f"{label}: only one head; nothing can be pruned")

    n_rep = num_heads // num_kv
    single_kv = num_kv == 1  # multi-query: the units are query heads, the kv head stays
    groups_now = attr_value(spec.kv_groups_attr, "kv_groups_attr")
    if groups_now is not None and groups_now != n_rep:
        raise ValueError(f"{label}: {module_name or 'model'}.{spec.kv_groups_attr} is {groups_now}, but "
                         f"num_heads / num_kv_heads = {num_heads} / {num_kv}")
    attributes = []
    if spec.heads_attr is not None:
        attributes.append((module_name, spec.heads_attr, 1 if single_kv else n_rep))
    if spec.kv_heads_attr is not None and kv_now is not None and not single_kv:
        attributes.append((module_name, spec.kv_heads_attr, 1))
    if groups_now is not None and single_kv:
        attributes.append((module_name, spec.kv_groups_attr, 1))
    for entry in spec.extra_attributes:
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)):
            raise ValueError(f"{label}: extra_attributes entries must be (attribute, per_unit), got {entry!r}")
        attr, per_unit = entry
        _positive_int(per_unit, f"per_unit of {attr!r}", label)
        if attr_value(attr, "extra_attributes") is None:
            raise ValueError(f"{label}: module {module_name or 'model'!r} has no int attribute {attr!r}")
        attributes.append((module_name, attr, per_unit))
    if len({a[1] for a in attributes}) != len(attributes):
        raise ValueError(f"{label}: an attribute is named twice in heads_attr/kv_heads_attr/extra_attributes")
    return _Resolved(spec, label, projections, module_name, num_heads, num_kv, head_dim, attributes)


def _resolve_all(model: nn.Module, heads) -> List[_Resolved]:
    specs = as_specs(heads)
    names: Dict[int, str] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), n)
    resolved = [_resolve(model, s, names) for s in specs]
    seen: Dict[int, str] = {}
    for r in resolved:
        for name, mod in r.projections.values():
            if id(mod) in seen:
                raise ValueError(f"{r.label}: projection {name!r} is also in {seen[id(mod)]}")
            seen[id(mod)] = r.label
    return resolved


def _outputs(projection: nn.Module) -> int:
    return projection.weight.shape[projection_dims(projection)[0]]


def _inputs(projection: nn.Module) -> int:
    return projection.weight.shape[projection_dims(projection)[1]]


def _is_producer(module) -> bool:
    return isinstance(module, (nn.modules.conv._ConvNd, nn.Embedding)) or \
        (isinstance(module, nn.Module) and projection_dims(module) is not None)


def _check_graph(r: _Resolved, graph, names: Dict[int, str], param_names: Dict[int, str]) -> None:
    """With Torch-Pruning's graph: o's input must come from exactly the spec's q, k, v (or qkv).

    Walks back from o through everything that is not a Linear, conv or
    embedding (reshapes, matmuls, softmax, rotary, norms) and collects the
    layers it stops at. A missing projection means a wrong name; an extra
    layer (an output gate, a per-head position bias) would be left unsliced,
    and so would a parameter on the way that spans the heads' channels (a
    norm over all heads before o); norms over ``head_dim`` alone (QK-norm)
    are shared by the heads and fine.
    This is a plain walk over TP's nodes: TP's own index propagation
    (``get_pruning_group``) does not terminate on some grouped-query graphs
    with rotary embeddings.
    """
    o_name, o = r.projections["o"]
    for name, mod in r.projections.values():
        if mod not in graph.module2node:
            raise ValueError(f"{r.label}: {name!r} is not in the dependency graph (not used by the traced "
                             f"forward?)")
    widths = {r.num_heads * r.head_dim, r.num_kv_heads * r.head_dim} - {r.head_dim}
    if "qkv" in r.projections:
        widths.add(_outputs(r.projections["qkv"][1]))
    reached, spanning, seen = [], [], set()
    stack = list(graph.module2node[o].inputs)
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if _is_producer(node.module):
            reached.append(node.module)
            continue
        if isinstance(node.module, nn.Parameter):
            tensors = [(param_names.get(id(node.module), "a parameter"), node.module)]
        elif isinstance(node.module, nn.Module):
            prefix = names.get(id(node.module), type(node.module).__name__)
            tensors = [(f"{prefix}.{n}", t) for n, t in node.module.named_parameters(recurse=False)]
        else:
            tensors = []
        spanning += [name for name, t in tensors if widths & set(t.shape)]
        stack.extend(node.inputs)
    wanted = [mod for _, mod in r.producers()]
    missing = [name for name, mod in r.producers() if not any(m is mod for m in reached)]
    if missing:
        raise ValueError(f"{r.label}: the dependency graph does not feed {missing} into {o_name!r}; is o the output "
                         f"projection of this attention? (trace_check=False skips this check)")
    extra = [names.get(id(m), type(m).__name__) for m in reached if not any(m is w for w in wanted)]
    if extra:
        raise ValueError(f"{r.label}: {o_name!r}'s input also depends on {sorted(set(extra))}, which the spec does "
                         f"not name; slicing heads would leave them unsliced (trace_check=False skips this check)")
    if spanning:
        raise ValueError(f"{r.label}: {o_name!r}'s input passes through {sorted(set(spanning))}, sized by the heads' "
                         f"channels; head groups cannot slice them (trace_check=False skips this check)")


@torch.no_grad()
def _check_layout(model: nn.Module, resolved: List[_Resolved], example_inputs) -> None:
    """Numerically: changing one unit's q/k/v rows must change o's input in that unit's columns only.

    This checks the assumed layout (head order, kv grouping ``h // n_rep``,
    ``[q; k; v]`` order of a fused qkv) where a dependency graph cannot: one
    forward pass in eval mode, plus one per spec with the rows of its middle
    unit perturbed (noise from a private generator). Weights and training
    flags are restored.
    """
    captured: Dict[int, torch.Tensor] = {}

    def hook(key):
        def save(_module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            captured[key] = x.detach().reshape(-1, x.shape[-1]).float().clone()
        return save

    handles = [r.projections["o"][1].register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, r in enumerate(resolved)]
    gen = torch.Generator().manual_seed(0)
    with modes_kept(model):
        try:
            model.eval()
            call_model(model, example_inputs)
            base = dict(captured)
            for i, r in enumerate(resolved):
                if i not in base:
                    raise ValueError(f"{r.label}: {r.projections['o'][0]!r} is not called by the model's forward")
                unit = r.units // 2
                saved = []
                for role, _, mod in r.unit_producers():
                    w = mod.weight.movedim(projection_dims(mod)[0], 0)  # a view: rows are outputs
                    rows = r.row_index(role)[unit].to(w.device)
                    saved.append((w, rows, w[rows].clone()))
                    noise = torch.randn(len(rows), w.shape[1], generator=gen).to(w.device, w.dtype)
                    w[rows] = w[rows] + noise * (w.float().std() + 1e-3).to(w.dtype)
                try:
                    call_model(model, example_inputs)
                finally:
                    for w, rows, old in saved:
                        w[rows] = old
                delta = (captured[i] - base[i]).abs()
                inside = torch.zeros(delta.shape[1], dtype=torch.bool)
                inside[r.row_index("o")[unit]] = True
                inside = inside.to(delta.device)
                moved, leaked = delta[:, inside].max(), delta[:, ~inside].max()
                if not moved > 0 or leaked > 1e-3 * moved:
                    kind = "head" if r.n_rep == 1 or r.single_kv else "kv group"
                    raise ValueError(
                        f"{r.label}: changing the q/k/v rows of {kind} {unit} changed {r.projections['o'][0]!r}'s input "
                        f"{'outside' if moved > 0 else 'nowhere in'} that {kind}'s columns; the projections do not follow "
                        f"the assumed layout (query head h reads kv head h // (num_heads / num_kv_heads), a fused qkv "
                        f"is [q; k; v]) or num_heads/num_kv_heads are wrong (trace_check=False skips this check)")
        finally:
            for handle in handles:
                handle.remove()


def claimed_modules(model: nn.Module, heads) -> List[nn.Module]:
    """The projections whose output channels the head groups own (q, k, v or the fused qkv).

    Channel grouping must leave these outputs (and o's input columns) to the
    head groups; their input columns stay in the residual-stream channel group.
    """
    return [mod for r in _resolve_all(model, heads) for _, mod in r.producers()]


def head_groups(model: nn.Module, heads, example_inputs=None, *, graph=None) -> List[Group]:
    """One :class:`Group` per attention module in ``heads`` (a :class:`Heads` or a sequence).

    Units are heads, or kv groups with grouped-query attention. Members: the
    q/k/v (or qkv) weight rows ("producer") and bias rows ("row") and o's
    weight columns ("column"). ``attributes`` subtract the removed heads from
    the module's head counts. Checks (specs with ``trace_check=True``): with
    ``graph`` (a built ``torch_pruning.DependencyGraph``; built from
    ``example_inputs`` when not given) that o's input comes from exactly
    q, k and v; with ``example_inputs``, that the heads are laid out as
    assumed (one perturbed forward pass per spec). Bad specs raise
    ValueError; nothing is modified.
    """
    resolved = _resolve_all(model, heads)
    checked = [r for r in resolved if r.spec.trace_check]
    if checked and graph is None and example_inputs is not None:
        import torch_pruning as tp

        modes = [(m, m.training) for m in model.modules()]  # TP's tracing leaves the model in eval mode
        try:
            with torch.enable_grad():
                graph = tp.DependencyGraph().build_dependency(model, example_inputs, verbose=False)
        except Exception as exc:  # TP fails in many ways on graphs it cannot follow
            raise ValueError(f"Torch-Pruning could not trace the model ({type(exc).__name__}: {exc}); pass "
                             f"Heads(..., trace_check=False) to skip the coupling checks") from exc
        finally:
            for m, mode in modes:
                m.training = mode
    names: Dict[int, str] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), n)
    params: Dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        params.setdefault(id(p), n)
    if graph is not None:
        for r in checked:
            _check_graph(r, graph, names, params)
    if checked and example_inputs is not None:
        _check_layout(model, checked, example_inputs)

    groups = []
    for r in resolved:
        members = []
        for role, _, mod in r.unit_producers():
            index = r.row_index(role)
            members.append(Member(params[id(mod.weight)], projection_dims(mod)[0], index.clone(), "producer"))
            if mod.bias is not None:
                members.append(Member(params[id(mod.bias)], 0, index.clone(), "row"))
        o = r.projections["o"][1]
        members.append(Member(params[id(o.weight)], projection_dims(o)[1], r.row_index("o"), "column"))
        groups.append(Group(r.module_name, r.units, members, list(r.attributes)).bind(model))
    return groups


# --------------------------------------------------------------------------- attention found in a traced forward

# Products: a weight (a parameter of two or more dims) times a tensor, or two computed tensors.
_PRODUCTS = frozenset({F.linear, F.bilinear, F.embedding, F.conv1d, F.conv2d, F.conv3d, torch.addmm, torch.matmul,
                       Tensor.matmul, Tensor.__matmul__, Tensor.__rmatmul__, torch.mm, Tensor.mm, torch.bmm,
                       Tensor.bmm, torch.baddbmm, Tensor.baddbmm, torch.einsum})


@dataclasses.dataclass(frozen=True)
class _InAttention:
    """What a tensor computed inside attention came from: the weights nearest
    to its query and key operands, and to its value once the probabilities
    have met it (``v`` is None for the scores ``q k^T``)."""

    q: frozenset
    k: frozenset
    v: Optional[frozenset] = None

    def weights(self) -> frozenset:
        return self.q | self.k | (self.v or frozenset())


@dataclasses.dataclass(frozen=True)
class FoundAttention:
    """One attention seen by :class:`AttentionFinder`: the ids of the weights
    that made its queries, keys and values and of the weight its output
    met first (the output projection; empty when it met none)."""

    q: frozenset
    k: frozenset
    v: frozenset
    o: frozenset


class AttentionFinder:
    """Follows, tensor by tensor, the weights nearest to what the forward
    computes, and records every attention: a product of two tensors computed
    from the inputs (``q @ k^T``, then ``p @ v``, or one
    ``scaled_dot_product_attention``) whose result meets a weight.
    ``find_groups`` calls :meth:`observe` from its trace recorder; ``found``
    lists each attention once, in forward order; ``unprojected`` the
    attentions whose output met no weight (``o`` is empty)."""

    def __init__(self) -> None:
        from torch.utils.weak import WeakIdKeyDictionary

        self._near = WeakIdKeyDictionary()  # tensor -> frozenset of weight ids, or _InAttention
        self.found: List[FoundAttention] = []
        self._outputs: List[_InAttention] = []

    @property
    def unprojected(self) -> List[FoundAttention]:
        met = {(a.q, a.k, a.v) for a in self.found}
        return [FoundAttention(c.q, c.k, c.v, frozenset()) for c in self._outputs if (c.q, c.k, c.v) not in met]

    def _of(self, t: Tensor):
        return self._near.get(t, frozenset())

    def observe(self, func, args, kwargs, operands: Sequence[Tensor], computed: Sequence[bool], out) -> None:
        """Record what ``out = func(*args, **kwargs)`` came from; ``computed[i]``
        says whether ``operands[i]`` depends on the model's inputs."""
        weights = frozenset(id(t) for t in operands if isinstance(t, nn.Parameter) and t.dim() >= 2)
        data = [t for t, c in zip(operands, computed) if c and not isinstance(t, nn.Parameter)]
        came = [self._of(t) for t in data]
        if func in _PRODUCTS and weights:
            for c in came:
                if isinstance(c, _InAttention) and c.v is not None:
                    found = FoundAttention(c.q, c.k, c.v, weights)
                    if found not in self.found:
                        self.found.append(found)
            near: Any = weights
        elif func is F.scaled_dot_product_attention:
            q = args[0] if args else kwargs.get("query")
            k = args[1] if len(args) > 1 else kwargs.get("key")
            v = args[2] if len(args) > 2 else kwargs.get("value")
            near = _InAttention(_flat(self._of(q)), _flat(self._of(k)), _flat(self._of(v)))
        elif func in _PRODUCTS and len(data) >= 2:
            first, second = came[0], came[1]
            if isinstance(first, _InAttention) and first.v is None:  # probabilities times values
                near = _InAttention(first.q, first.k, _flat(second))
            else:  # queries times keys
                near = _InAttention(_flat(first), _flat(second))
        else:
            inside = {c for c in came if isinstance(c, _InAttention)}
            if len(inside) == 1 and all(isinstance(c, _InAttention) or not c for c in came):
                near = inside.pop()  # a mask, scale, softmax or reshape keeps the attention's origin
            else:
                near = frozenset().union(*[_flat(c) for c in came])
        if isinstance(near, _InAttention) and near.v is not None and near not in self._outputs:
            self._outputs.append(near)
        if not near:
            return
        from torch.utils._pytree import tree_leaves

        for t in tree_leaves(out):
            if isinstance(t, Tensor) and not isinstance(t, nn.Parameter):
                self._near[t] = near


def _flat(came) -> frozenset:
    return came.weights() if isinstance(came, _InAttention) else came


def discovered_heads(model: nn.Module, found: Sequence[FoundAttention], given: Sequence[Heads] = ()
                     ) -> Tuple[List[Heads], List[str]]:
    """Specs for the attentions ``AttentionFinder`` saw that ``given`` does not
    cover, and one line per attention whose heads cannot be told (the
    projections are not Linear / Conv1D layers, or no head size is known:
    ``regkern.hf.head_dim``). Head counts come from the projections' widths
    and the head size, so they hold after a pruning round; the head-count
    attributes (``regkern.hf``'s lists) of the module holding the
    projections are updated by slicing."""
    owners: Dict[int, Tuple[str, nn.Module]] = {}
    for name, module in model.named_modules():
        if projection_dims(module) is not None:
            owners.setdefault(id(module.weight), (name, module))
    covered = {id(mod) for r in _resolve_all(model, given) for _, mod in r.projections.values()} if given else set()
    specs, problems = [], []
    for att in found:
        if not att.o:
            problems.append(f"an attention whose output meets no weight (its values come from "
                            f"{_describe(att.v, owners)})")
            continue
        roles = {"q": att.q, "k": att.k, "v": att.v, "o": att.o}
        if any(len(ids) != 1 or next(iter(ids)) not in owners for ids in roles.values()):
            problems.append(f"an attention whose projections are not single Linear or Conv1D layers (its output "
                            f"meets {_describe(att.o, owners)})")
            continue
        (q_name, q), (k_name, k), (v_name, v), (o_name, o) = (owners[next(iter(ids))] for ids in roles.values())
        if id(o) in covered or any(id(m) in covered for m in (q, k, v)):
            continue
        fused = q is k is v
        producers = [q_name] if fused else [q_name, k_name, v_name]
        if not fused and len({id(q), id(k), id(v)}) < 3:
            problems.append(f"an attention with two of q, k, v from one layer ({', '.join(producers)} -> {o_name})")
            continue
        parts = [n.split(".")[:-1] for n in producers]
        common = []
        for level in zip(*parts):
            if len(set(level)) != 1:
                break
            common.append(level[0])
        module_name = ".".join(common)
        attention = model.get_submodule(module_name)
        label = f"the attention in {module_name or 'the model'!r} ({', '.join(producers)} -> {o_name})"
        rep = hf.int_attr(attention, hf.KV_GROUPS_ATTRS)
        size = hf.head_dim(model, attention) or _size_from_counts(attention, _outputs(q), fused)
        if size is None:
            problems.append(f"{label}: its head size is unknown (no head_dim or head-count attribute, no config)")
            continue
        if fused:  # [q; k; v]: num_kv * (n_rep + 2) heads in all
            total, n_rep = _outputs(q), rep[1] if rep else 1
            if total % (size * (n_rep + 2)):
                problems.append(f"{label}: {total} fused rows are not whole heads of {size} channels")
                continue
            num_kv = total // (size * (n_rep + 2))
            num_heads = num_kv * n_rep
        else:
            try:
                num_heads, num_kv = hf.head_counts(_outputs(q), _outputs(k), size)
            except ValueError as err:
                problems.append(f"{label}: {err}")
                continue
        if num_kv < 1 or num_heads % num_kv:
            problems.append(f"{label}: {num_heads} query heads do not share {num_kv} key/value heads evenly")
            continue
        heads_attr, kv_attr, groups_attr = (hf.int_attr(attention, a) for a in
                                           (hf.HEADS_ATTRS, hf.KV_HEADS_ATTRS, hf.KV_GROUPS_ATTRS))
        per_unit = size * (1 if num_kv == 1 else num_heads // num_kv)
        widths = tuple((attr, per_unit) for attr, value in
                       (hf.int_attr(attention, (a,)) or (a, None) for a in hf.WIDTH_ATTRS) if value == num_heads * size)
        expected = ((heads_attr, num_heads), (kv_attr, num_kv), (groups_attr, num_heads // num_kv))
        stale = [f"{attr[0]}={attr[1]}" for attr, want in expected if attr is not None and attr[1] != want]
        if stale:
            problems.append(f"{label}: its attributes {', '.join(stale)} disagree with the projections' "
                            f"{num_heads} query and {num_kv} key/value heads of {size} channels")
            continue
        roles_given = {"qkv": q_name} if fused else {"q": q_name, "k": k_name, "v": v_name}
        specs.append(Heads(**roles_given, o=o_name, module=module_name, num_heads=num_heads, num_kv_heads=num_kv,
                           head_dim=size, heads_attr=heads_attr[0] if heads_attr else None,
                           kv_heads_attr=kv_attr[0] if kv_attr else None,
                           kv_groups_attr=groups_attr[0] if groups_attr else None, extra_attributes=widths))
    return specs, problems


def _size_from_counts(attention: nn.Module, rows: int, fused: bool) -> Optional[int]:
    """The head size from the module's head-count attributes and the query
    (or fused qkv) rows, when they divide."""
    heads = hf.int_attr(attention, hf.HEADS_ATTRS)
    if heads is None or heads[1] < 1:
        return None
    kv = hf.int_attr(attention, hf.KV_HEADS_ATTRS)
    count = heads[1] + 2 * (kv[1] if kv else heads[1]) if fused else heads[1]
    return rows // count if rows % count == 0 else None


def _describe(ids: frozenset, owners: Dict[int, Tuple[str, nn.Module]]) -> str:
    return ", ".join(sorted(owners[i][0] if i in owners else "a parameter outside any layer" for i in ids)) or "nothing"
