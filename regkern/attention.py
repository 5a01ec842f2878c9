"""Attention heads as prunable units.

A channel group (``regkern.groups.find_groups``) removes one channel at a
time; an attention head is ``head_dim`` rows of the q, k and v projections
and the matching ``head_dim`` input columns of the output projection, and the
module's head count must drop with it. :class:`Heads` names the projections
of one attention module; :func:`head_groups` turns it into a
:class:`~regkern.groups.Group` whose units are heads, or, with grouped-query
attention, key/value groups (one kv head and the ``num_heads / num_kv_heads``
query heads that read it), so that the sliced model stays valid.

Layout assumed (the usual one, LLaMA/timm/HF): q rows ``[h * head_dim,
(h + 1) * head_dim)`` are query head ``h``; k and v rows likewise per kv
head; query head ``h`` reads kv head ``h // (num_heads / num_kv_heads)``
(``repeat_kv``, ``repeat_interleave``, SDPA's ``enable_gqa``); o's input
columns follow the query heads. A fused ``qkv`` Linear holds ``[q; k; v]``
rows in that order. :func:`head_groups` checks a spec against the model:
shapes and head-count attributes always; with a Torch-Pruning dependency
graph, that o's input comes from exactly q, k and v; with example inputs,
the layout itself (perturbing one unit's rows must change o's input in that
unit's columns only), which a dependency graph cannot see.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from regkern.group import Group, Member
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
    ``("all_head_size", 64)``). ``trace_check=False`` skips the dependency
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
    extra_attributes: Tuple[Tuple[str, int], ...] = ()
    trace_check: bool = True


@dataclasses.dataclass
class _Resolved:
    """A validated spec: modules, names, sizes."""

    spec: Heads
    label: str
    projections: Dict[str, Tuple[str, nn.Linear]]  # role ("q", "k", "v", "qkv", "o") -> (name, module)
    module_name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    attributes: List[Tuple[str, str, int]]

    @property
    def n_rep(self) -> int:
        return self.num_heads // self.num_kv_heads

    def producers(self) -> List[Tuple[str, nn.Linear]]:
        return [self.projections[r] for r in ("qkv", "q", "k", "v") if r in self.projections]

    def row_index(self, role: str) -> torch.Tensor:
        """A producer's rows (or, for "o", columns) per unit: int64 ``[units, width]``."""
        d, rep, kv = self.head_dim, self.n_rep, self.num_kv_heads
        q_rows = torch.arange(kv * rep * d).view(kv, rep * d)  # unit u: query heads u*rep .. u*rep+rep-1
        kv_rows = torch.arange(kv * d).view(kv, d)
        if role in ("q", "o"):
            return q_rows
        if role in ("k", "v"):
            return kv_rows
        q_size = kv * rep * d
        return torch.cat([q_rows, kv_rows + q_size, kv_rows + q_size + kv * d], dim=1)


def _as_specs(heads) -> List[Heads]:
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
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"{label}: {role}={name!r} is a {type(mod).__name__}; only nn.Linear projections "
                             f"are supported")
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

    q_rows = projections["qkv" if "qkv" in projections else "q"][1].out_features
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
        if role in projections and projections[role][1].out_features != expected[role]:
            raise ValueError(f"{label}: {role} has {projections[role][1].out_features} rows, expected "
                             f"num_kv_heads * head_dim = {num_kv} * {head_dim}")
    if projections["o"][1].in_features != expected["q"]:
        raise ValueError(f"{label}: o has {projections['o'][1].in_features} input columns, expected "
                         f"num_heads * head_dim = {num_heads} * {head_dim}")
    if num_kv < 2:
        raise ValueError(f"{label}: only {num_kv} {'kv group' if num_kv != num_heads else 'head'}; nothing "
                         f"can be pruned")

    n_rep = num_heads // num_kv
    attributes = []
    if spec.heads_attr is not None:
        attributes.append((module_name, spec.heads_attr, n_rep))
    if spec.kv_heads_attr is not None and kv_now is not None:
        attributes.append((module_name, spec.kv_heads_attr, 1))
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
    specs = _as_specs(heads)
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


_PRODUCERS = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)


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
        widths.add(r.projections["qkv"][1].out_features)
    reached, spanning, seen = [], [], set()
    stack = list(graph.module2node[o].inputs)
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node.module, _PRODUCERS):
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
                unit = r.num_kv_heads // 2
                saved = []
                for role, (_, mod) in ((k, v) for k, v in r.projections.items() if k != "o"):
                    w = mod.weight
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
                    kind = "head" if r.n_rep == 1 else "kv group"
                    raise ValueError(
                        f"{r.label}: changing the q/k/v rows of {kind} {unit} changed {r.projections['o'][0]!r}'s input "
                        f"{'outside' if moved > 0 else 'nowhere in'} that {kind}'s columns; the projections do not follow "
                        f"the assumed layout (query head h reads kv head h // (num_heads / num_kv_heads), a fused qkv "
                        f"is [q; k; v]) or num_heads/num_kv_heads are wrong (trace_check=False skips this check)")
        finally:
            for handle in handles:
                handle.remove()


def claimed_modules(model: nn.Module, heads) -> List[nn.Module]:
    """The Linears whose output channels the head groups own (q, k, v or the fused qkv).

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
        for role in ("qkv", "q", "k", "v"):
            if role not in r.projections:
                continue
            _, mod = r.projections[role]
            index = r.row_index(role)
            members.append(Member(params[id(mod.weight)], 0, index.clone(), "producer"))
            if mod.bias is not None:
                members.append(Member(params[id(mod.bias)], 0, index.clone(), "row"))
        o = r.projections["o"][1]
        members.append(Member(params[id(o.weight)], 1, r.row_index("o"), "column"))
        groups.append(Group(r.module_name, r.num_kv_heads, members, list(r.attributes)).bind(model))
    return groups
