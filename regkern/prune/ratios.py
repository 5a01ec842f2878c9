"""Per-layer pruning ratios in the forms the papers give them.

The layers are the conv and linear modules of a model in ``named_modules()``
order. A ratio spec is one of:

- a float: every layer;
- a list of floats, one per *stage* (official GReg ``--stage_pr`` for ResNets):
  a layer nested in a container whose name ends in a number (``layer3.1.conv1``)
  is in that stage; top-level layers before the first stage are stage 0 (the
  stem), after the last one ``last + 1`` (the classifier);
- a string ``"[0:0, 1-9:0.3, 10-15:0.5]"``: by layer index (official GReg for
  VGG; unlisted layers get 0); a string without ``:`` such as
  ``"[0, 0.3, 0.3, 0]"`` is a per-stage list;
- a dict ``{module name: ratio}`` (unlisted layers get 0).

``skip`` sets layers to 0 by name (a name also matches every layer under it as
a module prefix) or index; ``ignore`` names layers that are never pruned (by
default the model's output layer, the last conv/linear).
"""
from __future__ import annotations

import math
import numbers
import re
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from torch import nn

RatioSpec = Union[float, Sequence[float], str, Mapping[str, float]]
LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


def prunable_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of every conv / linear layer, in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]


def _check_ratio(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{where}: a pruning ratio must be a number in [0, 1), got {value!r}")
    value = float(value)
    if not (0.0 <= value < 1.0):
        raise ValueError(f"{where}: pruning ratio {value} is out of range; it is the fraction of rows to prune, in [0, 1)")
    return value


def layer_stages(names: Sequence[str]) -> List[int]:
    """The stage of each layer name (see the module docstring)."""
    staged = []
    for name in names:
        parts = name.split(".")
        match = re.search(r"(\d+)$", parts[0]) if len(parts) > 1 else None
        staged.append(int(match.group(1)) if match else None)
    known = [s for s in staged if s is not None]
    last = max(known) if known else 0
    out, seen = [], False
    for s in staged:
        if s is not None:
            seen = True
            out.append(s)
        else:
            out.append(last + 1 if seen else 0)
    return out


def _parse_float(text: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"malformed ratio string {spec!r}: {text!r} is not a number") from None


def parse_ratio_string(spec: str, n_layers: int) -> Union[List[float], Dict[int, float]]:
    """``"[0:0, 1-9:0.3]"`` -> {index: ratio}; ``"[0, 0.3, 0.3]"`` -> per-stage list."""
    body = spec.strip()
    if body.startswith("[") != body.endswith("]"):
        raise ValueError(f"malformed ratio string {spec!r}: unbalanced brackets")
    if body.startswith("["):
        body = body[1:-1]
    items = [x.strip() for x in body.split(",")]
    items = [x for x in items if x]
    if not items:
        raise ValueError(f"malformed ratio string {spec!r}: it lists no ratios")
    if not any(":" in x for x in items):
        return [_parse_float(x, spec) for x in items]
    out: Dict[int, float] = {}
    for item in items:
        if item.count(":") != 1:
            raise ValueError(f"malformed ratio string {spec!r}: {item!r} is not 'index:ratio' or 'first-last:ratio'")
        key, value = (x.strip() for x in item.split(":"))
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", key)
        if not match:
            raise ValueError(f"malformed ratio string {spec!r}: {key!r} is not a layer index or a range 'first-last'")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise ValueError(f"malformed ratio string {spec!r}: range {key!r} ends before it starts")
        if last >= n_layers:
            raise ValueError(f"ratio string {spec!r} names layer {last}, but the model has {n_layers} conv/linear "
                             f"layers (indices 0 to {n_layers - 1})")
        ratio = _check_ratio(_parse_float(value, spec), f"ratio string {spec!r}")
        for i in range(first, last + 1):
            out[i] = ratio
    return out


def _resolve_layers(refs: Iterable, names: Sequence[str], what: str) -> List[str]:
    """Layer names matched by ``refs`` (names, module prefixes or indices)."""
    out = []
    for ref in refs:
        if isinstance(ref, nn.Module):
            raise ValueError(f"{what}: give layers by name or index, got a module object {type(ref).__name__}")
        if isinstance(ref, numbers.Integral) and not isinstance(ref, bool):
            if not 0 <= int(ref) < len(names):
                raise ValueError(f"{what}: layer index {ref} is out of range (the model has {len(names)} conv/linear layers)")
            out.append(names[int(ref)])
            continue
        if not isinstance(ref, str):
            raise ValueError(f"{what}: layers are given by name or index, got {ref!r}")
        hits = [n for n in names if n == ref or n.startswith(ref + ".")]
        if not hits:
            raise ValueError(f"{what}: no conv/linear layer is named {ref!r} (or lies under it); "
                             f"layers: {_preview(names)}")
        out.extend(hits)
    return out


def _preview(names: Sequence[str], k: int = 8) -> str:
    shown = ", ".join(names[:k])
    return shown + (f", ... ({len(names)} in all)" if len(names) > k else "")


def layer_ratios(model: nn.Module, ratios: RatioSpec, *, skip: Iterable = (),
                 ignore: Optional[Iterable] = None) -> Dict[str, float]:
    """``{layer name: ratio}`` for every conv/linear layer of ``model``.

    ``ignore=None`` ignores the output layer (the last conv/linear); ignored
    and skipped layers get ratio 0. Raises ValueError on a ratio out of
    [0, 1), an unknown layer, a malformed string or a stage list too short.
    """
    layers = prunable_layers(model)
    names = [n for n, _ in layers]
    if not names:
        raise ValueError("the model has no conv or linear layer to prune")
    explicit = dict(ratios) if isinstance(ratios, Mapping) else None
    if isinstance(ratios, str):
        ratios = parse_ratio_string(ratios, len(names))
        if isinstance(ratios, dict):
            out = {n: ratios.get(i, 0.0) for i, n in enumerate(names)}
        else:
            out = None
    elif isinstance(ratios, Mapping):
        out = {n: 0.0 for n in names}
        for key, value in ratios.items():
            if key not in out:
                raise ValueError(f"ratios name {key!r}, which is not a conv/linear layer of the model; "
                                 f"layers: {_preview(names)}")
            out[key] = _check_ratio(value, f"ratio of layer {key!r}")
    elif isinstance(ratios, numbers.Real) and not isinstance(ratios, bool):
        value = _check_ratio(ratios, "ratios")
        out = {n: value for n in names}
    elif isinstance(ratios, (list, tuple)):
        out = None
    else:
        raise ValueError(f"ratios must be a float, a per-stage list, an index-range string or a dict by layer name, "
                         f"got {type(ratios).__name__}")
    if out is None:  # per-stage list
        stage_ratios = [_check_ratio(r, f"stage {i} ratio") for i, r in enumerate(ratios)]
        stages = layer_stages(names)
        if max(stages) >= len(stage_ratios):
            missing = sorted({(s, n) for s, n in zip(stages, names) if s >= len(stage_ratios)})[0]
            raise ValueError(f"the per-stage ratio list has {len(stage_ratios)} entries, but layer {missing[1]!r} "
                             f"is in stage {missing[0]}; give one ratio per stage 0..{max(stages)}")
        out = {n: stage_ratios[s] for n, s in zip(names, stages)}
    for name in _resolve_layers(skip, names, "skip"):
        out[name] = 0.0
    ignored = [names[-1]] if ignore is None else _resolve_layers(ignore, names, "ignore")
    for name in ignored:
        if explicit and explicit.get(name, 0) > 0:
            raise ValueError(f"layer {name!r} is ignored (never pruned; by default the output layer), but its ratio is "
                             f"{explicit[name]}; pass ignore=() (or other layers) to prune it")
        out[name] = 0.0
    return out


def ignored_layers(model: nn.Module, ignore: Optional[Iterable]) -> List[str]:
    """Names of the layers whose output rows are never pruned."""
    names = [n for n, _ in prunable_layers(model)]
    if not names:
        return []
    return [names[-1]] if ignore is None else _resolve_layers(ignore, names, "ignore")


def pruned_count(n: int, ratio: float) -> int:
    """Rows pruned of ``n`` at ``ratio``: ``min(ceil(ratio * n), n - 1)`` (never all), with
    ``ratio * n`` in floating point as the official GReg code computes it: 0.07 * 100 is
    7.000000000000001, so 8 of 100 rows, while 0.3 * 10 is exactly 3.0, so 3 of 10."""
    if ratio <= 0 or n <= 1:
        return 0
    return min(math.ceil(ratio * n), n - 1)
