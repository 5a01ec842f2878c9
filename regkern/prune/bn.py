"""Channel pruning by BatchNorm scales: network slimming (L1 on the scales, Liu
et al. 2017) and polarization pruning (Zhuang et al., NeurIPS 2020); the math
is in docs/schedules.md ("Network slimming", "Polarization") and
docs/regularizers.md.

The units are the channels of coupled groups (:func:`regkern.groups.find_groups`)
that hold a BatchNorm scale vector; the scales are regularized during training
and, once ``done``, channels are removed through their groups with
:func:`regkern.slicing.slice_model` so the same optimizer keeps training.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from regkern.flops import count_flops
from regkern.prune.base import (PruneSummary, Schedule, check_in_optimizer, cut, drop_regularizer, ensure_group,
                                group_of, groups_restored_on_error, module_of, named_params, optimizer_params,
                                regularizers_of)
from regkern.prune.expand import attach_expand, branch_ends
from regkern.sharding import is_sharded, row_state, whole
from regkern.slicing import kept_indices
from regkern.prune.greg import _check_int, _check_pos, smallest
from regkern.prune.ratios import _resolve_layers, ignored_layers, prunable_layers, pruned_count

NO_VALLEY = ("keep", "fixed", "error")
RESIDUAL = ("expand", "keep")


def search_threshold(values: Tensor, bins: int = 100) -> Optional[float]:
    """The valley threshold of the polarized scales (docs/schedules.md,
    "Polarization"), as the official histogram search does it: a
    ``bins``-bin histogram ``h`` of ``values`` over ``[0, 1]``; the first bin
    ``j >= 1`` that is a local minimum (``h[j] - h[j-1] <= 0 <= h[j+1] - h[j]``)
    is the valley, and the threshold is its LEFT edge ``edges[j]``. Channels
    with a value strictly above the threshold are kept, so the valley bin's
    own channels stay. Returns None when the histogram has no valley (the
    official code then fails later; :class:`PolarizationPruner` applies its
    ``no_valley`` choice instead).
    """
    array = values.detach().float().cpu().numpy().reshape(-1)
    hist, edges = np.histogram(array, bins=bins, range=(0, 1))
    diff = np.diff(hist)
    for i in range(len(diff) - 1):
        if diff[i] <= 0 <= diff[i + 1]:
            return float(edges[i + 1])
    return None


class _BNUnit:
    def __init__(self, name: str, group, scales: List[Tuple[str, nn.Parameter]],
                 expand: Optional[str] = None):
        self.name = name            # the producer layer
        self.group = group
        self.scales = scales        # (BN weight name, parameter): the group's BatchNorm scale vectors
        self.expand = expand        # the BatchNorm that re-expands a residual branch's last channels (or None)

    def gamma(self) -> Tensor:
        """|gamma| per channel (the largest over the group's BatchNorm layers)."""
        values = torch.stack([whole(p).detach().float().abs().reshape(-1) for _, p in self.scales])
        return values.max(dim=0).values


def _apply_cut(model: nn.Module, removals: List[Tuple[_BNUnit, Tensor]], optimizer, example_inputs):
    """Slice the units' removed channels out of ``model`` (and ``optimizer``,
    which may be None) with :func:`regkern.prune.base.cut`, then give the
    BatchNorm of every cut residual branch end its :class:`ChannelExpand`.
    Returns the slice summary with the MACs of the whole model before and
    after (counted here: the model only runs again once the expansions are in)."""
    modules = dict(model.named_modules())
    kept = kept_indices(model, [(u.group, idx) for u, idx in removals])
    widths = {u.expand: int(modules[u.expand].num_features) for u, _ in removals if u.expand}
    if is_sharded(model):
        # masks keep every width, so no expansion here (a masked channel of the branch end adds
        # zero); the plan carries it, for the plain copy it cuts
        summary = cut(model, [(u.group, idx) for u, idx in removals], optimizer, None)
        if widths:
            summary.plan["expansions"] = {norm: {"kept": kept[f"{norm}.weight"][0].tolist(), "width": width}
                                          for norm, width in widths.items()}
        return summary
    macs_before = count_flops(model, example_inputs)
    summary = cut(model, [(u.group, idx) for u, idx in removals], optimizer, None)
    for u, _ in removals:
        if u.expand:
            attach_expand(modules[u.expand], kept[f"{u.expand}.weight"][0], widths[u.expand])
    summary.macs_before, summary.macs_after = macs_before, count_flops(model, example_inputs)
    return summary


def _check_copyable(model: nn.Module) -> None:
    """``ValueError`` for a sharded model: ``target_flops`` and ``remaining_flops``
    measure cuts on copies of the model."""
    if is_sharded(model):
        raise ValueError("target_flops and remaining_flops measure cuts on copies of the model, which a sharded "
                         "(FSDP2) model cannot give; pass target_flops=None and prune after a fixed number of steps")


class _BNPruner(Schedule):
    """Shared: the BatchNorm-scale units of the chosen layers, a step count, the cut."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, example_inputs: Any, *, steps: int,
                 layers: Optional[Sequence] = None, skip: Sequence = (), ignore: Optional[Sequence] = None,
                 residual_rule: bool = True, residual: str = "keep") -> None:
        super().__init__(model, optimizer)
        _check_int(steps, "steps (training steps with the regularizer before pruning)", 0)
        if example_inputs is None:
            raise ValueError(f"{self.method} needs example_inputs (a batch the model accepts) to trace its coupled layers")
        if residual not in RESIDUAL:
            raise ValueError(f"residual must be one of {RESIDUAL} (what happens to the last BatchNorm of a residual "
                             f"branch), got {residual!r}")
        if residual == "expand" and not residual_rule:
            raise ValueError("residual='expand' prunes each residual branch on its own and needs residual_rule=True; "
                             "with residual_rule=False the residual groups are pruned whole, so pass residual='keep'")
        self.residual = residual
        self.steps = steps
        self.example_inputs = example_inputs
        names = [n for n, _ in prunable_layers(model)]
        chosen = set(names if layers is None else _resolve_layers(layers, names, "layers"))
        chosen -= set(_resolve_layers(skip, names, "skip"))
        from regkern.groups import find_groups

        ignored = ignored_layers(model, ignore)
        groups = find_groups(model, example_inputs, ignore=ignored, residual_rule=residual_rule)
        modules = dict(model.named_modules())
        params = named_params(model)
        self.units: List[_BNUnit] = []
        for g in groups:
            producers = g.by_role("producer")
            if not producers or module_of(producers[0].name) not in chosen or g.units < 2:
                continue
            scales = [(m.name, params[m.name]) for m in g.members
                      if m.dim == 0 and m.name.endswith(".weight") and m.index.shape[1] == 1
                      and isinstance(modules.get(module_of(m.name)), nn.modules.batchnorm._BatchNorm)]
            if scales:
                self.units.append(_BNUnit(module_of(producers[0].name), g, scales))
        if residual == "expand":
            inner = {g.name for g in groups}
            joined = [g for g in find_groups(model, example_inputs, ignore=ignored, residual_rule=False)
                      if g.name not in inner]
            for g, norm, _ in branch_ends(model, example_inputs, joined, groups):
                if g.name in chosen and g.name not in ignored and g.units >= 2:
                    self.units.append(_BNUnit(g.name, g, [(f"{norm}.weight", params[f"{norm}.weight"])], norm))
            order = {name: i for i, name in enumerate(names)}
            self.units.sort(key=lambda u: order.get(u.name, len(order)))
        if not self.units:
            raise ValueError(f"{self.method} found no prunable conv/linear layer followed by a BatchNorm among the "
                             "chosen layers (BatchNorm scales are what it regularizes)")
        check_in_optimizer(optimizer, [s for u in self.units for s in u.scales])
        self._check_cut_groups([u.group for u in self.units])
        self._removals: Optional[List[List[Any]]] = None
        self._phase = "train"
        self._done = steps == 0

    def scale_params(self) -> List[nn.Parameter]:
        """The regularized BatchNorm scale vectors (one per layer, in model order)."""
        seen, out = set(), []
        for u in self.units:
            for _, p in u.scales:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def _advance(self) -> None:
        if self.iteration >= self.steps:
            self._done = True

    def _cut(self, pruned: Dict[str, Tensor], notes: List[str], thresholds: Dict[str, float]) -> PruneSummary:
        """Remove the channels marked in ``pruned`` (bool per unit) through their groups."""
        removals = [(u, torch.nonzero(pruned[u.name].cpu()).flatten()) for u in self.units
                    if bool(pruned[u.name].any())]
        layers = {u.name: (u.group.units - int(pruned[u.name].sum()), u.group.units) for u in self.units}
        done = _apply_cut(self.model, removals, self.optimizer, self.example_inputs) if removals else None
        self._removals = [[u.group.name, idx.tolist()] for u, idx in removals]
        self._finetune_setup()
        return PruneSummary(self.method, True, layers, done, notes, thresholds)

    def _finetune_setup(self) -> None:
        pass

    def _extra_state(self) -> Dict[str, Any]:
        return {"layers": [u.name for u in self.units], "removals": self._removals}

    def _check_extra(self, state: Dict[str, Any]) -> None:
        if state.get("layers") != [u.name for u in self.units]:
            raise ValueError(f"this {self.method} state_dict was saved for other layers ({state.get('layers')}); "
                             "build the schedule with the same model and arguments")

    def _load_extra(self, state: Dict[str, Any]) -> None:
        self._removals = state.get("removals")

    def _reapply(self, state: Dict[str, Any]) -> None:
        by_name = {u.group.name: u for u in self.units}
        removals = []
        for name, idx in state.get("removals") or []:
            if name not in by_name:
                raise ValueError(f"the saved cut removed channels of group {name!r}, which this model does not have")
            removals.append((by_name[name], torch.tensor(idx, dtype=torch.long)))
        if removals:
            _apply_cut(self.model, removals, self.optimizer, self.example_inputs)
        self._finetune_setup()


class Slimming(_BNPruner):
    """Network slimming: the L1 subgradient ``lam * sign(gamma)`` on the
    BatchNorm scales of the chosen layers (``state["l1"]``, read by
    regkern.SGD's fused step) for ``steps`` optimizer steps (phase
    ``"train"``), then ``prune()`` removes the channels with the smallest
    |gamma| (docs/schedules.md, "Network slimming"): ``scope="global"`` is the
    official cut over all chosen layers together: with the ``N`` scales
    sorted ascending, the threshold is ``sorted[int(N * percent)]`` and every
    channel at or below it goes (so at least ``int(N * percent) + 1``
    channels, more on ties; ``summary.thresholds`` gives it per layer);
    ``"layer"`` (a regkern option) removes the ``min(ceil(percent * R), R - 1)``
    smallest of each layer. At least one channel of a layer is kept (its
    largest; ``summary.notes`` says where; the official code would leave the
    layer empty and fail). After pruning the L1 coefficients are zeroed for
    fine-tuning.

    ``layers``: the conv/linear layers whose output channels may go (default:
    every one with a BatchNorm after it, except ``ignore``, by default the
    output layer); ``skip`` removes some of them. On residual networks the
    default ``residual="keep"`` prunes the channels inside each block and
    leaves the block's last BatchNorm whole, as the official slimming code
    does; ``residual="expand"`` also prunes that BatchNorm and re-expands its
    kept channels into the residual width (see :class:`PolarizationPruner`).
    """

    method = "Slimming"
    drives = ("l1",)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, example_inputs: Any, *,
                 lam: float = 1e-4, steps: int, percent: float = 0.5, scope: str = "global",
                 layers: Optional[Sequence] = None, skip: Sequence = (), ignore: Optional[Sequence] = None,
                 residual_rule: bool = True, residual: str = "keep") -> None:
        _check_pos(lam, "lam (the L1 strength on BatchNorm scales)", allow_zero=True)
        if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 < percent < 1:
            raise ValueError(f"percent is the fraction of channels to prune, in (0, 1) (0 would train the L1 "
                             f"penalty for nothing); got {percent!r}")
        if scope not in ("global", "layer"):
            raise ValueError(f"scope must be 'global' (one percentile over all layers) or 'layer', got {scope!r}")
        super().__init__(model, optimizer, example_inputs, steps=steps, layers=layers, skip=skip, ignore=ignore,
                         residual_rule=residual_rule, residual=residual)
        self.lam, self.percent, self.scope = float(lam), float(percent), scope
        for p in self.scale_params():
            st = optimizer.state[p]
            if st.get("l1") is None or st["l1"].shape != (p.shape[0],):
                st["l1"] = row_state(p, fill=self.lam)
            else:
                st["l1"].fill_(self.lam)

    def _prune(self) -> PruneSummary:
        gammas = {u.name: u.gamma() for u in self.units}
        notes: List[str] = []
        thresholds: Dict[str, float] = {}
        if self.scope == "layer":
            pruned = {u.name: smallest(gammas[u.name], pruned_count(u.group.units, self.percent)) for u in self.units}
        else:
            flat = torch.cat([gammas[u.name] for u in self.units])
            # the official cut: thre = sorted[int(N * percent)], keep |gamma| > thre
            threshold = float(torch.sort(flat).values[int(flat.numel() * self.percent)])
            mask = flat <= threshold
            thresholds = {u.name: threshold for u in self.units}
            pruned, start = {}, 0
            for u in self.units:
                n = gammas[u.name].numel()
                pruned[u.name] = mask[start:start + n].clone()
                start += n
                if bool(pruned[u.name].all()):
                    pruned[u.name][int(torch.argmax(gammas[u.name]))] = False
                    notes.append(f"{u.name}: every channel fell under the global percentile; its largest is kept")
        return self._cut(pruned, notes, thresholds)

    def _finetune_setup(self) -> None:
        for p in self.scale_params():
            l1 = self.optimizer.state[p].get("l1")
            if l1 is not None:
                l1.zero_()


class PolarizationPruner(_BNPruner):
    """Polarization pruning (docs/schedules.md, "Polarization";
    docs/regularizers.md): ``regkern.Polarization(lam, t, a)`` on the
    BatchNorm scales of the chosen layers for ``steps`` optimizer steps (phase
    ``"train"``), then per layer the valley threshold of
    :func:`search_threshold` (channels with |gamma| strictly above it are
    kept) and the cut.

    Scope, as in the official code: the scales of every conv/linear layer
    followed by a BatchNorm, which on a residual network means every
    BatchNorm inside each block. ``residual="expand"`` (default) includes the
    block's last BatchNorm (``bn2`` of a BasicBlock, ``bn3`` of a
    Bottleneck): the last conv's rows and that BatchNorm's channels are cut
    on their own and a :class:`regkern.prune.expand.ChannelExpand` after the
    BatchNorm puts the kept channels back into the full residual width
    (zeros elsewhere), so the residual path keeps its width.
    ``residual="keep"`` leaves those BatchNorms unregularized and whole (only
    the channels inside blocks are pruned). Stem and downsample BatchNorms,
    which write the residual stream itself, are never in the set. A stem
    whose output enters no residual add (a bottleneck ResNet's, whose first
    block has a downsample) is an ordinary prunable layer here; pass it in
    ``skip`` to keep it whole as the official ImageNet code does. (With
    ``residual_rule=False`` the residual groups are pruned whole instead,
    every coupled channel together; that needs ``residual="keep"``.)

    The scales must be one polarization set: a param group of the optimizer
    whose regularizer is a ``regkern.Polarization``. When the optimizer has
    none, the constructor moves the chosen scales into a new group with
    ``Polarization(lam, t, a)`` and the hyper-parameters of the group they came
    from (create LR schedulers after the schedule). ``lam``/``t``: default
    5e-5 / 1.4 (ResNet-56 CIFAR; VGG-16 3e-5 / 1.5; ResNet-50 ImageNet 8e-5 /
    1.2), or the existing group's. ``clamp_all`` (default True, official):
    every other BatchNorm scale held by the optimizer is clamped to
    ``[0, a]`` after each step too, through a param group whose regularizer
    is ``regkern.Clamp(0, a)`` (moved out like the set; an existing Clamp
    group that holds them all is used and must clamp to ``[0, a]``).
    ``bn_init``: fill every BatchNorm scale of the model with this value now
    (official: 0.5, when training from scratch). ``bn_weight_decay``: the
    weight decay of those param groups, 0 by default as in the official
    code (its BatchNorm weight decay is off unless asked for), set also on a
    Polarization or Clamp group the optimizer already had; None keeps each
    group's own.

    FLOPs control, two ways with two meanings of "target":
    ``target_flops`` here is the official gate: a fraction of the model's
    MACs that should REMAIN (e.g. 0.5). Every ``gate_every`` steps (official:
    once per epoch) the remaining fraction of a cut made now is measured on a
    copy of the model (:meth:`remaining_flops`); once it is at or below
    ``target_flops`` the penalty stops (``lam`` becomes 0; the clamp goes
    on) and training goes on to ``steps``. ``gated_at`` is that step
    (None before). The official gate works on separate gate layers, which it
    then freezes; regkern has none, so the BatchNorm scales keep training
    without the penalty and the cut at ``prune()`` can differ a little from
    the one measured at the gate (``flops_ratio`` keeps the last
    measurement; call :meth:`remaining_flops` to measure again).
    :func:`polarization_search` (the paper's Algorithm 1)
    instead searches ``(lam, t)`` over whole runs for a FLOPs REDUCTION
    target (``1 - remaining``).

    ``no_valley``: what a layer without a valley gets: ``"keep"`` (not pruned),
    ``"fixed"`` (the official "fixed" threshold, the first bin edge 0.01) or
    ``"error"`` (ValueError, nothing cut; the gate's estimate treats such a
    layer as kept). ``summary.notes`` names those layers and the fallback, and
    layers whose every channel falls under the threshold (kept whole, where
    the official code removes the whole block or fails). After pruning the
    polarization regularizer (and the Clamp this schedule added) is taken
    off its param group for fine-tuning, as the official fine-tuning runs
    without either.
    """

    method = "PolarizationPruner"
    drives = ("polar",)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, example_inputs: Any, *,
                 steps: int, lam: Optional[float] = None, t: Optional[float] = None, a: float = 1.0,
                 layers: Optional[Sequence] = None, skip: Sequence = (), ignore: Optional[Sequence] = None,
                 residual_rule: bool = True, residual: str = "expand", clamp_all: bool = True,
                 no_valley: str = "keep", bn_init: Optional[float] = None, target_flops: Optional[float] = None,
                 gate_every: int = 100, bn_weight_decay: Optional[float] = 0.0) -> None:
        from regkern.regularizers import Clamp, Polarization

        if lam is not None:
            _check_pos(lam, "lam", allow_zero=True)
        if t is not None:
            _check_pos(t, "t", allow_zero=True, allow_neg=True)
        _check_pos(a, "a (the clamp bound of the scales)")
        if no_valley not in NO_VALLEY:
            raise ValueError(f"no_valley must be one of {NO_VALLEY}, got {no_valley!r}")
        if bn_init is not None:
            _check_pos(bn_init, "bn_init", allow_zero=True)
        if target_flops is not None:
            _check_pos(target_flops, "target_flops (the fraction of MACs to remain)")
            _check_copyable(model)
            if not target_flops < 1:
                raise ValueError(f"target_flops is the fraction of the model's MACs that should remain, in (0, 1); "
                                 f"got {target_flops}")
        _check_int(gate_every, "gate_every (steps between FLOPs checks)", 1)
        if bn_weight_decay is not None:
            _check_pos(bn_weight_decay, "bn_weight_decay", allow_zero=True)
        decay = {} if bn_weight_decay is None else {"weight_decay": float(bn_weight_decay)}
        if not isinstance(clamp_all, bool):
            raise ValueError(f"clamp_all must be True or False, got {clamp_all!r}")
        super().__init__(model, optimizer, example_inputs, steps=steps, layers=layers, skip=skip, ignore=ignore,
                         residual_rule=residual_rule, residual=residual)
        self.no_valley = no_valley
        self.target_flops = None if target_flops is None else float(target_flops)
        self.gate_every = gate_every
        self.gated_at: Optional[int] = None
        self.flops_ratio: Optional[float] = None  # the remaining fraction at the last gate check
        scales = [(n, p) for u in self.units for n, p in u.scales]
        scales = list({id(p): (n, p) for n, p in scales}.values())
        existing = [r for g in optimizer.param_groups for r in regularizers_of(g) if isinstance(r, Polarization)]
        if existing:
            reg = existing[0]
            for name, value in (("lam", lam), ("t", t)):
                if value is not None and float(value) != getattr(reg, name):
                    raise ValueError(f"the optimizer's Polarization group has {name}={getattr(reg, name)}, "
                                     f"but {name}={value} was given; give one or the other")
        make = lambda: Polarization(lam=5e-5 if lam is None else float(lam), t=1.4 if t is None else float(t),  # noqa: E731
                                    a=float(a))
        with groups_restored_on_error(optimizer):  # the two groups are made together or not at all
            ensure_group(optimizer, scales, Polarization, make, self.method, **decay)
            self._anchor = scales[0][1]
            self._clamp_anchor: Optional[Tensor] = None
            self._clamp_added = False
            owned = optimizer_params(optimizer)
            in_set = {id(p) for _, p in scales}
            norms = [(f"{n}.weight" if n else "weight", m.weight) for n, m in model.named_modules()
                     if isinstance(m, nn.modules.batchnorm._BatchNorm) and isinstance(m.weight, Tensor)]
            others = [(n, p) for n, p in norms if id(p) not in in_set and p in owned]
            if clamp_all and others:
                holders = [r for g in optimizer.param_groups for r in regularizers_of(g) if isinstance(r, Clamp)]
                for r in holders:
                    if (r.lo, r.hi) != (0.0, float(a)):
                        raise ValueError(f"the optimizer's Clamp group clamps to [{r.lo}, {r.hi}], but the BatchNorm "
                                         f"scales outside the polarization set are clamped to [0, {float(a)}]; "
                                         "make them agree or pass clamp_all=False")
                ensure_group(optimizer, others, Clamp, lambda: Clamp(0.0, float(a)),
                             f"{self.method} (the clamp of the other BatchNorm scales)", **decay)
                self._clamp_anchor, self._clamp_added = others[0][1], not holders
        if bn_init is not None:
            with torch.no_grad():
                for _, p in norms:
                    p.fill_(float(bn_init))

    @property
    def group(self) -> Dict[str, Any]:
        """The optimizer's param group of the polarization set."""
        return group_of(self.optimizer, self._anchor)

    @property
    def clamp_group(self) -> Optional[Dict[str, Any]]:
        """The param group that clamps the other BatchNorm scales (None when there is none)."""
        return None if self._clamp_anchor is None else group_of(self.optimizer, self._clamp_anchor)

    @property
    def regularizer(self):
        from regkern.regularizers import Polarization

        return next((r for r in regularizers_of(self.group) if isinstance(r, Polarization)), None)

    def thresholds(self, gammas: Optional[Dict[str, Tensor]] = None) -> Dict[str, Optional[float]]:
        """The valley threshold of each layer now (None: no valley); ``gammas``:
        the layers' scales when already at hand (each is a gather when sharded)."""
        gammas = gammas or {u.name: u.gamma() for u in self.units}
        return {u.name: search_threshold(gammas[u.name]) for u in self.units}

    def _plan(self, strict: bool = True):
        """``(pruned, notes, thresholds used)`` of a cut made now."""
        notes: List[str] = []
        gammas = {u.name: u.gamma() for u in self.units}
        thresholds = self.thresholds(gammas)
        missing = [n for n, thr in thresholds.items() if thr is None]
        policy = "keep" if self.no_valley == "error" and not strict else self.no_valley
        if missing and policy == "error":
            raise ValueError(f"no valley in the BatchNorm scale histogram of layer(s) {', '.join(missing)}; "
                             "train longer, or choose no_valley='keep' or 'fixed'")
        if missing:
            fallback = ("kept whole (no_valley='keep')" if policy == "keep"
                        else "pruned at the official fixed threshold 0.01 (no_valley='fixed')")
            notes.append(f"no valley in the scale histogram of {', '.join(missing)}: {fallback}")
        pruned, used = {}, {}
        for u in self.units:
            gamma = gammas[u.name]
            thr = thresholds[u.name]
            if thr is None:
                if policy == "keep":
                    pruned[u.name] = torch.zeros_like(gamma, dtype=torch.bool)
                    continue
                thr = 0.01
            used[u.name] = thr
            keep = gamma > thr
            if not bool(keep.any()):
                notes.append(f"{u.name}: every scale is at or below the threshold {thr:.4g}; the layer is kept whole")
                keep = torch.ones_like(keep)
            elif thr > 0.2:
                notes.append(f"{u.name}: threshold {thr:.4g} is above 0.2 (the official code warns: may be too large)")
            pruned[u.name] = ~keep
        return pruned, notes, used

    def _prune(self) -> PruneSummary:
        return self._cut(*self._plan())

    def remaining_flops(self) -> float:
        """The fraction of the model's MACs (on ``example_inputs``) that would
        remain after a cut made now with the current thresholds, measured by
        cutting a copy of the model (the model and optimizer are untouched)."""
        if self.pruned:
            raise ValueError("the model is already pruned; remaining_flops measures a cut before it is made "
                             "(the prune() summary's flops_reduction gives the cut that was made)")
        _check_copyable(self.model)
        pruned, _, _ = self._plan(strict=False)
        clone = copy.deepcopy(self.model)
        removals = [(_BNUnit(u.name, dataclasses.replace(u.group, tensors={}, shapes={}), [], u.expand),
                     torch.nonzero(pruned[u.name].cpu()).flatten())
                    for u in self.units if bool(pruned[u.name].any())]
        if not removals:
            return 1.0
        summary = _apply_cut(clone, removals, None, self.example_inputs)
        return summary.macs_after / summary.macs_before if summary.macs_before else 1.0

    def _advance(self) -> None:
        super()._advance()
        if self.target_flops is None or self.gated_at is not None or self.iteration % self.gate_every:
            return
        self.flops_ratio = self.remaining_flops()
        if self.flops_ratio <= self.target_flops:
            self.gated_at = self.iteration
            self._stop_penalty()

    def _stop_penalty(self) -> None:
        """The gate: the polarization group's ``lam`` becomes 0 (the clamp stays)."""
        from regkern.regularizers import Polarization, as_regularizer

        group = self.group
        regs = [dataclasses.replace(r, lam=0.0) if isinstance(r, Polarization) else r for r in regularizers_of(group)]
        group["regularizer"] = as_regularizer(regs if len(regs) > 1 else regs[0])
        for r in regs:
            if isinstance(r, Polarization):
                r.init_group(group["params"], [self.optimizer.state[p] for p in group["params"]])

    def _extra_state(self) -> Dict[str, Any]:
        return {**super()._extra_state(), "gated_at": self.gated_at, "flops_ratio": self.flops_ratio}

    def _load_extra(self, state: Dict[str, Any]) -> None:
        super()._load_extra(state)
        self.gated_at = state.get("gated_at")
        self.flops_ratio = state.get("flops_ratio")

    def _finetune_setup(self) -> None:
        from regkern.regularizers import Clamp, Polarization

        group = self.group
        drop_regularizer(group, Polarization)
        for p in group["params"]:
            st = self.optimizer.state.get(p)
            if st is not None and "polar" in st:
                del st["polar"]
        if self._clamp_added:
            drop_regularizer(self.clamp_group, Clamp)


@dataclasses.dataclass
class SearchResult:
    """Outcome of :func:`polarization_search`: the last ``(lam, t)`` tried, its
    FLOPs reduction, whether it is within ``delta`` of the target, every trial
    as ``(lam, t, reduction)``, and a sentence on how it ended."""

    lam: float
    t: float
    flops_reduction: float
    converged: bool
    trials: List[Tuple[float, float, float]]
    message: str


def polarization_search(train: Callable[[float, float], float], target: float, *, delta: float = 0.05,
                        lam_range: Tuple[float, float] = (0.0, 2e-4), t: float = 1.2, t_step: float = 0.1,
                        max_trials: int = 20) -> SearchResult:
    """Algorithm 1 of the polarization paper: find ``(lam, t)`` whose FLOPs
    reduction ``F`` is within ``delta`` of ``target`` (fractions, e.g. 0.5).

    Here ``target`` is a FLOPs REDUCTION, ``1 - MACs after / MACs before``
    (0.6: remove 60%). The official training code controls FLOPs another way,
    within one run: :class:`PolarizationPruner`'s ``target_flops`` gate, whose
    target is the fraction that REMAINS (0.4 for the same model), stops the
    penalty once a cut made then would reach it.

    ``train(lam, t)`` runs a short training with those hyper-parameters (e.g.
    a fresh model with :class:`PolarizationPruner`, pruned at the end) and
    returns its FLOPs reduction ``1 - flops_after / flops_before``. First a
    binary search on ``lam`` in ``lam_range`` with ``t`` fixed until
    ``|F - target| < 2 delta``; then ``t -= t_step`` while ``F`` is more than
    ``delta`` too high and ``t += t_step`` while it is too low. The paper notes
    the second loop may not end: it stops after ``max_trials`` runs or when a
    ``t`` repeats, and reports ``converged=False``.
    """
    if not callable(train):
        raise ValueError("train must be a callable train(lam, t) -> FLOPs reduction")
    _check_pos(target, "target")
    if not target < 1:
        raise ValueError(f"target is a FLOPs reduction fraction in (0, 1), got {target}")
    _check_pos(delta, "delta")
    _check_pos(t_step, "t_step")
    _check_int(max_trials, "max_trials", 1)
    lo, hi = (float(x) for x in lam_range)
    if not 0 <= lo < hi:
        raise ValueError(f"lam_range must be (low, high) with 0 <= low < high, got {lam_range}")
    trials: List[Tuple[float, float, float]] = []

    def run(lam: float, t_: float) -> float:
        value = float(train(lam, t_))
        if not math.isfinite(value):
            raise ValueError(f"train({lam}, {t_}) returned {value}; it must return the FLOPs reduction as a number")
        trials.append((lam, t_, value))
        return value

    def result(lam, t_, f, converged, message):
        return SearchResult(lam, t_, f, converged, trials, message)

    while True:  # coarse: binary search on lam, t fixed
        lam = (lo + hi) / 2
        f = run(lam, t)
        if f - target >= 2 * delta:
            hi = lam
        elif f - target <= -2 * delta:
            lo = lam
        if abs(f - target) < 2 * delta:
            break
        if len(trials) >= max_trials:
            return result(lam, t, f, False, f"stopped after {max_trials} runs in the search on lam "
                                            f"(F = {f:.3f}, target {target:.3f})")
    seen = {round(t, 9)}
    while abs(f - target) >= delta:  # fine: line search on t, lam fixed
        if len(trials) >= max_trials:
            return result(lam, t, f, False, f"stopped after {max_trials} runs in the search on t "
                                            f"(F = {f:.3f}, target {target:.3f})")
        t = round(t - t_step if f - target > delta else t + t_step, 9)
        if t in seen:  # the line search would revisit a t: it cannot end
            best = min((x for x in trials if x[0] == lam), key=lambda x: abs(x[2] - target))
            return result(*best, False, f"t oscillates around {t:.3f} without reaching the target band; "
                                        "returned the closest trial")
        seen.add(t)
        f = run(lam, t)
    return result(lam, t, f, True, f"F = {f:.3f} is within {delta} of the target {target:.3f} "
                                   f"after {len(trials)} runs")
