"""Growing regularization (GReg-1, GReg-2; Wang, Qin, Zhang, Fu, ICLR 2021) and
one-shot L1-norm pruning, with the timetable of the official code
(MingSun-Tse/Regularization-Pruning, ``pruner/reg_pruner.py``; the math is in
``docs/schedules.md``, section "GReg").

The unit of a layer is a row (``mode="filter"``: the output channels of a
coupled group, scored on the producer conv/linear rows by mean |W|) or a single
weight (``mode="weight"``). The penalty ``lam`` lives in the optimizer state
(``state["lam"]``: per row, or W-shaped in weight mode) and the fused step adds
``lam * W`` to the gradient; this module only decides its values.

Timetable (iterations count optimizer steps from 0; the update for iteration
``i`` is written before step ``i`` runs, i.e. by the constructor for ``i = 0``
and by ``step()`` after step ``i - 1``): every ``Ku`` iterations each unfinished
layer is updated, one after the other in model order; when all have finished at
iteration ``T`` training goes on with the penalty until step ``T + Ks`` has run,
then ``done``.

Magnitude ratio (filter mode only, as in the official code): after each update of
a layer, ``mean|kept| / mean|pruned|`` of its mean-|W| row scores enters an EMA
(first value as is, then ``0.9 * old + 0.1 * new``, in fp32); a layer that has
finished keeps its last EMA.
"""
from __future__ import annotations

import abc
import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from regkern.masks import apply_mask
from regkern.prune.base import PruneSummary, Schedule, check_in_optimizer, cut, module_of, named_params
from regkern.prune.ratios import RatioSpec, ignored_layers, layer_ratios, prunable_layers, pruned_count
from regkern.regularizers import new_state
from regkern.sharding import is_dtensor, whole, write_whole

MODES = ("filter", "weight")
SCOPES = ("producer", "rows", "group")


class _Unit:
    """One pruned layer: a coupled group of rows (filter mode) or a weight tensor (weight mode)."""

    def __init__(self, name: str, ratio: float, total: int, group=None, param: Optional[Tensor] = None):
        self.name = name
        self.ratio = ratio
        self.total = total
        self.n_prune = pruned_count(total, ratio)
        self.group = group
        self.param = param
        self.lam: Optional[Tensor] = None      # filter: own fp32 [units]; weight: the optimizer's W-shaped lam
        self.pruned: Optional[Tensor] = None   # bool, [units] or W-shaped: True = pruned
        self.ema: Optional[float] = None       # magnitude ratio mean|kept| / mean|pruned|, EMA 0.9 / 0.1
        self.finished: Optional[int] = None    # iteration at which its penalty stopped growing
        self.picked: Optional[int] = None      # GReg-2: iteration at which it picked its pruned units


def smallest(scores: Tensor, n: int) -> Tensor:
    """Bool mask (scores' shape) of the ``n`` smallest scores; ties: lower index first."""
    flat = scores.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if n > 0:
        mask[torch.sort(flat, stable=True).indices[:n]] = True
    return mask.view(scores.shape)


def _check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _check_pos(value, name: str, allow_zero: bool = False, allow_neg: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not allow_neg and (value < 0 or (value == 0 and not allow_zero)):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


class _RowPruner(Schedule):
    """Shared by GReg and one-shot L1: the layers and their units, picking the
    smallest, the structured cut or the element masks, and their state."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, example_inputs: Any,
                 ratios: RatioSpec, *, mode: str = "filter", skip: Sequence = (), ignore: Optional[Sequence] = None,
                 residual_rule: bool = True, heads: Sequence = ()) -> None:
        super().__init__(model, optimizer)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} ('filter': structured rows, 'weight': single weights), got {mode!r}")
        if mode == "filter" and example_inputs is None:
            raise ValueError("mode='filter' needs example_inputs (a batch the model accepts) to trace its coupled layers")
        self.mode = mode
        self.example_inputs = example_inputs
        by_layer = layer_ratios(model, ratios, skip=skip, ignore=ignore)
        self.ratios = by_layer
        self.units: List[_Unit] = []
        params = named_params(model)
        if mode == "filter":
            from regkern.groups import find_groups

            groups = find_groups(model, example_inputs, ignore=ignored_layers(model, ignore),
                                 residual_rule=residual_rule, heads=heads)
            covered = set()
            for g in groups:
                producers = g.by_role("producer")
                if not producers:
                    continue
                layer = module_of(producers[0].name)
                covered.add(layer)
                ratio = by_layer.get(layer, 0.0)
                if ratio > 0 and g.units > 1:
                    self.units.append(_Unit(layer, ratio, g.units, group=g))
            if isinstance(ratios, Mapping):
                bad = [n for n, r in by_layer.items() if r > 0 and n not in covered]
                if bad:
                    raise ValueError(f"layer(s) {', '.join(bad)} cannot lose output rows (classifier, a residual add "
                                     "under residual_rule, or an ignored layer); give them ratio 0 or leave them out")
            check_in_optimizer(optimizer, [(m.name, params[m.name]) for u in self.units for m in u.group.members])
            self._check_cut_groups([u.group for u in self.units])
        else:
            if heads:
                raise ValueError("heads= (attention heads as units) is for mode='filter'")
            for lname, module in prunable_layers(model):
                ratio = by_layer[lname]
                if ratio > 0 and module.weight.numel() > 1:
                    self.units.append(_Unit(lname, ratio, module.weight.numel(), param=module.weight))
            check_in_optimizer(optimizer, [(u.name + ".weight", u.param) for u in self.units])
        names = [u.name for u in self.units]
        if len(set(names)) != len(names):  # two groups produced by one module (should not happen): keep apart
            for i, u in enumerate(self.units):
                u.name = f"{u.name}#{i}"
        self._removals: Optional[List[List[Any]]] = None

    # -- scoring and picking ------------------------------------------------
    def _scores(self, units: Sequence[_Unit], kind: str) -> Iterable[Tensor]:
        """Per-unit scores: rows of the producer (``kind``: "mean_abs", "l1") or |W|."""
        if not units:
            return []
        if self.mode == "filter":
            from regkern.groups import group_scores

            return group_scores(self.model, [u.group for u in units], kind=kind, scope="producer",
                                optimizer=self.optimizer)
        return (whole(u.param).detach().abs().float() for u in units)  # one gathered tensor at a time

    def _pick(self, u: _Unit, scores: Tensor) -> Tensor:
        return smallest(scores, u.n_prune)

    # -- pruning ------------------------------------------------------------
    def _prune(self) -> PruneSummary:
        missing = [u for u in self.units if u.pruned is None]
        for u, s in zip(missing, self._scores(missing, "mean_abs")):  # force=True before picking
            u.pruned = self._pick(u, s)
        notes = [f"{u.name}: pruned units picked at prune time by magnitude (forced before its picking finished)"
                 for u in missing]
        layers = {u.name: (u.total - int(u.pruned.sum()), u.total) for u in self.units}
        cut = None
        if self.mode == "filter":
            removals = [(u.group, torch.nonzero(u.pruned.cpu()).flatten()) for u in self.units if bool(u.pruned.any())]
            cut = self._slice(removals)
        else:
            for u in self.units:
                apply_mask(self.optimizer, u.param, ~u.pruned.to(u.param.device))
        self._finetune_setup()
        return PruneSummary(self.method, self.mode == "filter", layers, cut, notes)

    def _slice(self, removals):
        summary = cut(self.model, removals, self.optimizer, self.example_inputs)
        self._removals = [[g.name, idx.tolist()] for g, idx in removals]
        return summary

    def _finetune_setup(self) -> None:
        pass

    def _reapply(self, state: Dict[str, Any]) -> None:
        if self.mode != "filter":
            return  # masks and zeros come back with the optimizer and model state
        by_name = {u.group.name: u.group for u in self.units}
        removals = []
        for name, idx in state.get("removals") or []:
            if name not in by_name:
                raise ValueError(f"the saved cut removed rows of group {name!r}, which this model does not have")
            removals.append((by_name[name], torch.tensor(idx, dtype=torch.long)))
        self._slice(removals)
        self._finetune_setup()

    # -- state ----------------------------------------------------------------
    def _unit_state(self, u: _Unit) -> Dict[str, Any]:
        return {"name": u.name, "total": u.total, "n_prune": u.n_prune,
                "pruned": None if u.pruned is None else u.pruned.detach().cpu().clone(),
                "ema": u.ema, "finished": u.finished, "picked": u.picked}

    def _extra_state(self) -> Dict[str, Any]:
        return {"mode": self.mode, "units": [self._unit_state(u) for u in self.units], "removals": self._removals}

    def _check_extra(self, state: Dict[str, Any]) -> None:
        saved = [(s["name"], s["total"], s["n_prune"]) for s in state.get("units", [])]
        here = [(u.name, u.total, u.n_prune) for u in self.units]
        if state.get("mode") != self.mode or saved != here:
            raise ValueError(f"this {self.method} state_dict was saved for other layers or ratios "
                             f"(saved {len(saved)} layers in mode {state.get('mode')!r}, here {len(here)} in mode "
                             f"{self.mode!r}); build the schedule with the same model and arguments")

    def _load_extra(self, state: Dict[str, Any]) -> None:
        for u, s in zip(self.units, state["units"]):
            device = (u.param if u.param is not None else u.lam if u.lam is not None else torch.empty(0)).device
            u.pruned = None if s["pruned"] is None else s["pruned"].to(device=device, dtype=torch.bool).clone()
            u.ema = s["ema"]
            u.finished = s["finished"]
            u.picked = s["picked"]
        self._removals = state.get("removals")


class OneShotL1(_RowPruner):
    """One-shot L1-norm pruning (Li et al. 2017; the "L1" baseline of the GReg
    code): the ``min(ceil(ratio * R), R - 1)`` rows with the smallest L1 norm
    of each layer (the same rows count as GReg-1) are removed at once, then the
    model is fine-tuned. Done as soon as it is built (phase ``"ready"``).
    ``mode="weight"`` removes the smallest-magnitude weights instead (masks).

    Arguments as :class:`GReg1` (no timetable).
    """

    method = "OneShotL1"
    # removes rows from the model and the optimizer state at the end and writes
    # nothing a step must read: any optimizer (weight mode freezes masks: _late_drives)
    drives = ()

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, example_inputs: Any = None,
                 ratios: RatioSpec = 0.5, *, mode: str = "filter", skip: Sequence = (),
                 ignore: Optional[Sequence] = None, residual_rule: bool = True, heads: Sequence = ()) -> None:
        super().__init__(model, optimizer, example_inputs, ratios, mode=mode, skip=skip, ignore=ignore,
                         residual_rule=residual_rule, heads=heads)
        self._pick_all()
        self._phase = "ready"
        self._done = True

    def _pick_all(self) -> None:
        for u, s in zip(self.units, self._scores(self.units, "l1")):
            u.pruned = self._pick(u, s)

    def _prune(self) -> PruneSummary:
        self._pick_all()  # by the weights at prune time (training may have run since construction)
        return super()._prune()


class _GReg(_RowPruner):
    """The growing-penalty timetable shared by GReg-1 and GReg-2."""

    drives = ("lam",)  # state["lam"], read by regkern.SGD

    def __init__(self, model, optimizer, example_inputs, ratios, *, mode, Ku, Ks, delta, tau, mag_ratio_limit,
                 skip, ignore, residual_rule, scope, heads) -> None:
        _check_int(Ku, "Ku (iterations between penalty updates)", 1)
        _check_int(Ks, "Ks (stabilization iterations)", 0)
        _check_pos(delta, "delta")
        _check_pos(tau, "tau (the penalty ceiling)")
        _check_pos(mag_ratio_limit, "mag_ratio_limit")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        super().__init__(model, optimizer, example_inputs, ratios, mode=mode, skip=skip, ignore=ignore,
                         residual_rule=residual_rule, heads=heads)
        self.Ku, self.Ks, self.delta, self.tau, self.mag_ratio_limit = Ku, Ks, float(delta), float(tau), float(mag_ratio_limit)
        self.scope = scope
        self.stabilize_start: Optional[int] = None
        self._lam_entries = self._create_state()

    def _scope_members(self, group):
        if self.scope == "producer":
            return group.by_role("producer")
        if self.scope == "rows":
            return [m for m in group.members if m.dim == 0]
        return list(group.members)

    def _create_state(self):
        """Add ``lam`` (and ``lam_cols``, ``row_norms``) where missing; check
        every entry first so a refused schedule writes nothing."""
        params = named_params(self.model)
        plan = []  # (param, key, shape to create, other accepted shapes, replace a zero tensor of another shape)
        if self.mode == "filter":
            for u in self.units:
                for m in self._scope_members(u.group):
                    p = params[m.name]
                    if m.dim == 0:  # set_group_lambda also writes a per-element lam (ElementL2)
                        plan.append((p, "lam", (p.shape[0],), {tuple(p.shape)}, False))
                    elif m.dim == 1:
                        plan.append((p, "lam_cols", (p.shape[1],), set(), False))
                for m in u.group.by_role("producer"):
                    plan.append((params[m.name], "row_norms", (params[m.name].shape[0], 3), set(), False))
        else:
            for u in self.units:
                plan.append((u.param, "lam", tuple(u.param.shape), set(), True))
        for p, key, shape, accepted, replace in plan:
            old = self.optimizer.state[p].get(key) if p in self.optimizer.state else None
            if old is None or tuple(old.shape) == shape or tuple(old.shape) in accepted:
                continue
            if not (replace and not bool(whole(old).any())):
                raise ValueError(f"optimizer state {key!r} of a parameter of shape {tuple(p.shape)} has shape "
                                 f"{tuple(old.shape)}{' with non-zero values' if replace else ''}, but {self.method} "
                                 f"in mode {self.mode!r} needs shape {shape}; remove that regularizer from the "
                                 "parameter's group")
        entries, seen = [], set()
        for p, key, shape, accepted, _ in plan:
            st = self.optimizer.state[p]
            old = st.get(key)
            if old is None or (tuple(old.shape) != shape and tuple(old.shape) not in accepted):
                layout = {"lam_cols": "column", "row_norms": "row3"}.get(key, "row" if len(shape) == 1 else "element")
                st[key] = new_state(key, layout, p)  # sharded parameters: sharded like them
            if key != "row_norms" and (id(p), key) not in seen:
                seen.add((id(p), key))
                entries.append((p, key))
        for u in self.units:
            if self.mode == "filter":
                u.lam = torch.zeros(u.total, dtype=torch.float32, device=params[u.group.by_role("producer")[0].name].device)
            else:
                u.lam = self.optimizer.state[u.param]["lam"]
        return entries

    # -- timetable ------------------------------------------------------------
    def _advance(self) -> None:
        if self._phase == "stabilize":
            if self.iteration - 1 - self.stabilize_start >= self.Ks:
                self._done = True
        elif self.iteration % self.Ku == 0:
            self._update()

    def _update(self) -> None:
        """One penalty update of every unfinished layer (official ``_update_reg``)."""
        active = [u for u in self.units if u.finished is None]
        scores = self._scores(active, "mean_abs") if self._needs_scores() else [None] * len(active)
        for u, w_abs in zip(active, scores):
            if self.mode == "weight":  # the optimizer's tensor (a loaded state_dict brings a new one);
                # a sharded one's whole value, stored back by _write_lam
                u.lam = whole(self.optimizer.state[u.param]["lam"])
            if self._update_unit(u, w_abs):
                u.finished = self.iteration
            self._write_lam(u)
        self._after_update()
        if all(u.finished is not None for u in self.units):
            self._phase = "stabilize"
            self.stabilize_start = self.iteration

    def _after_update(self) -> None:
        pass

    def _needs_scores(self) -> bool:
        """Whether an update reads the current magnitudes (GReg-1 in weight mode does not)."""
        return True

    @abc.abstractmethod
    def _update_unit(self, u: _Unit, w_abs: Tensor) -> bool:
        """One penalty update of a layer (GReg-1 and GReg-2 differ here)."""

    def _track_ratio(self, u: _Unit, w_abs: Tensor, pruned: Tensor) -> None:
        """EMA (0.9 old, 0.1 new; the first value as is) of mean|kept| / mean|pruned|
        (official ``_update_mag_ratio``), in fp32 arithmetic like the official tensors.
        Filter mode only: in weight mode no ratio is kept and ``u.ema`` stays None."""
        if not bool(pruned.any()):
            u.ema = math.inf
            return
        ratio = (w_abs[~pruned].mean() / w_abs[pruned].mean()).float()
        if u.ema is not None:
            ratio = torch.tensor(u.ema, dtype=torch.float32, device=ratio.device) * 0.9 + ratio * 0.1
        u.ema = float(ratio)

    def _write_lam(self, u: _Unit) -> None:
        if self.mode == "filter":
            from regkern.groups import set_group_lambda

            set_group_lambda(self.optimizer, u.group, u.lam, scope=self.scope)
        elif is_dtensor(self.optimizer.state[u.param]["lam"]):
            write_whole(self.optimizer.state[u.param]["lam"], u.lam)
            u.lam = self.optimizer.state[u.param]["lam"]  # the gathered copy goes
        # plain weight mode: u.lam is the optimizer's own tensor, already written

    def _finetune_setup(self) -> None:
        """Fine-tuning runs without the penalty: zero every lam this schedule wrote."""
        for p, key in self._lam_entries:
            value = self.optimizer.state[p].get(key)
            if value is not None:
                value.zero_()
        for u in self.units:
            if u.lam is not None and self.mode == "filter":
                u.lam.zero_()

    # -- state ----------------------------------------------------------------
    def _unit_state(self, u: _Unit) -> Dict[str, Any]:
        out = super()._unit_state(u)
        if self.mode == "filter":
            out["lam"] = u.lam.detach().cpu().clone()
        return out

    def _extra_state(self) -> Dict[str, Any]:
        return {**super()._extra_state(), "stabilize_start": self.stabilize_start}

    def _load_extra(self, state: Dict[str, Any]) -> None:
        super()._load_extra(state)
        self.stabilize_start = state["stabilize_start"]
        if self.mode == "filter" and not self.pruned:
            for u, s in zip(self.units, state["units"]):
                u.lam.copy_(s["lam"])
                self._write_lam(u)


class GReg1(_GReg):
    """GReg-1: growing L2 penalty on rows fixed at the start (docs/schedules.md, "GReg").

    The pruned rows of each layer are the ``min(ceil(ratio * R), R - 1)`` with
    the smallest mean |W| at construction (``ratio * R`` in floating point, as
    the official code: 0.07 of 100 rows prunes 8); every ``Ku`` iterations
    ``lam[pruned] += delta`` (kept rows keep 0). A layer finishes when its own
    ``max(lam) > tau``, or (filter mode) when the magnitude ratio EMA of EVERY
    layer has reached ``mag_ratio_limit``: a layer at the limit goes on growing
    its penalty until all the others are there too. The check runs right after
    the layer's own update and looks at the EMAs tracked so far, so in the first
    update a layer sees only itself and the layers before it, as in the official
    code; a layer that finished at ``tau`` below the limit keeps that EMA, and
    from then on the others finish at ``tau`` as well. In weight mode no ratio
    is computed and layers finish at ``tau`` only. When all have finished,
    ``Ks`` more iterations with the penalty (phase ``"stabilize"``), then
    ``done``: ``prune()`` removes the rows (slicing the model and the optimizer
    state, ``mode="filter"``) or masks the weights (``mode="weight"``) and
    zeroes every lam for fine-tuning.

    Deliberate departures from the official code (GReg-1 and GReg-2):

    - ties between equal scores are broken by the lower index (a stable sort),
      where the official ``torch.sort`` leaves their order to the device, so
      the same rows are picked on every device and backend;
    - a unit is a coupled group: rows joined through concatenations, depthwise
      convs or attention heads are scored together (mean |W| over all producer
      layers of the group) and pruned together, where the official code treats
      one conv at a time; a group with one producer (plain conv chains, the
      first convs of ResNet blocks) is scored as the official code does;
    - ``state_dict()`` keeps the picked rows, the EMAs and the finishing and
      picking iterations, so a resumed run is the uninterrupted run; the
      official resume picks the pruned rows again from the resumed weights and
      forgets which layers had finished;
    - the output layer is never pruned unless ``ignore`` says otherwise, in
      weight mode too (the official weight mode prunes it when its stage ratio
      is above 0), and a single float ``ratios`` also applies to the stem conv
      when its rows join no residual add (the official scripts give per-stage
      lists with the stem stage at 0: pass such a list for the same layers).

    Args:
        model, optimizer: the network and its regkern.SGD (``lam`` and
            ``row_norms`` state is added where missing).
        example_inputs: a batch the model accepts (traces the coupled layers;
            only needed in filter mode).
        ratios: per-layer pruning ratios (float, per-stage list, index-range
            string or dict; see :mod:`regkern.prune.ratios`).
        mode: ``"filter"`` (rows of coupled groups) or ``"weight"`` (elements).
        Ku, Ks: update interval and stabilization length (CIFAR: 10 and
            5000-10000; ImageNet: 5 and 40000).
        delta, tau, mag_ratio_limit: official 1e-4, 1.0, 1000.
        skip, ignore: layers given ratio 0 / never pruned (default ignore:
            the output layer).
        residual_rule: drop groups joined by residual adds (official rule:
            last conv of each block and downsample convs are not pruned).
        scope: where the penalty goes: ``"producer"`` (the conv/linear rows,
            official), ``"rows"`` (also BN and bias rows), ``"group"`` (also the
            consumers' input columns, ``lam_cols``).
        heads: ``regkern.attention.Heads`` specs: attention heads become units
            (filter mode; a head group takes the ratio of its first producer
            layer, the q projection).

    Phases: ``"update"`` -> ``"stabilize"`` -> (done) -> ``"finetune"``.
    """

    method = "GReg1"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, example_inputs: Any = None,
                 ratios: RatioSpec = 0.5, *, mode: str = "filter", Ku: int = 10, Ks: int = 5000,
                 delta: float = 1e-4, tau: float = 1.0, mag_ratio_limit: float = 1000.0, skip: Sequence = (),
                 ignore: Optional[Sequence] = None, residual_rule: bool = True, scope: str = "producer",
                 heads: Sequence = ()) -> None:
        super().__init__(model, optimizer, example_inputs, ratios, mode=mode, Ku=Ku, Ks=Ks, delta=delta, tau=tau,
                         mag_ratio_limit=mag_ratio_limit, skip=skip, ignore=ignore, residual_rule=residual_rule,
                         scope=scope, heads=heads)
        for u, s in zip(self.units, self._scores(self.units, "mean_abs")):
            u.pruned = self._pick(u, s)
        self._phase = "update"
        self._update()  # the update of iteration 0, before the first step

    def _needs_scores(self) -> bool:
        return self.mode == "filter"

    def _update_unit(self, u: _Unit, w_abs: Optional[Tensor]) -> bool:
        if self.mode == "weight":  # no magnitude ratio in weight mode: tau only
            u.lam[u.pruned] += self.delta
            return float(u.lam.max()) > self.tau
        self._track_ratio(u, w_abs, u.pruned)
        u.lam[u.pruned] += self.delta
        # layers are updated in order; the ratios are those of every layer tracked so far (the layers
        # finished earlier keep their last one), this layer's just updated
        every_layer = all(v.ema >= self.mag_ratio_limit for v in self.units if v.ema is not None)
        return every_layer or float(u.lam.max()) > self.tau


class GReg2(_GReg):
    """GReg-2: the penalty itself picks the pruned rows (docs/schedules.md, "GReg").

    Picking phase: every ``Ku`` iterations ``lam += delta_pick`` on every unit
    of each layer with ratio > 0; when a layer's ``max(lam) >= pick_ceiling``
    it picks its ``min(ceil(ratio * R), R - 1)`` smallest units by current
    mean |W|. Afterwards each update does ``lam[pruned] += delta`` and
    ``lam[kept] = recover`` (assigned). A layer finishes once it has picked
    (in the update that picks, too) and its own ``max(lam) > tau`` or its own
    magnitude ratio EMA has reached ``mag_ratio_limit``, whatever the other
    layers' ratios (the EMA also runs during picking on the would-be pruned
    units, as the official code does); in weight mode no ratio is computed and
    a picked layer finishes at ``tau`` only. Then ``Ks`` stabilization
    iterations and ``done``. The deliberate departures from the official code
    are those listed under :class:`GReg1`.

    Arguments as :class:`GReg1`, plus ``delta_pick`` (1e-5), ``pick_ceiling``
    (1e-2) and ``recover`` (-1e-4). ``picked``: ``{layer: pruned unit mask}``.
    Phases: ``"picking"`` -> ``"update"`` -> ``"stabilize"`` -> ``"finetune"``.
    """

    method = "GReg2"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, example_inputs: Any = None,
                 ratios: RatioSpec = 0.5, *, mode: str = "filter", Ku: int = 10, Ks: int = 5000,
                 delta: float = 1e-4, delta_pick: float = 1e-5, pick_ceiling: float = 1e-2, recover: float = -1e-4,
                 tau: float = 1.0, mag_ratio_limit: float = 1000.0, skip: Sequence = (),
                 ignore: Optional[Sequence] = None, residual_rule: bool = True, scope: str = "producer",
                 heads: Sequence = ()) -> None:
        _check_pos(delta_pick, "delta_pick")
        _check_pos(pick_ceiling, "pick_ceiling")
        _check_pos(recover, "recover", allow_zero=True, allow_neg=True)
        super().__init__(model, optimizer, example_inputs, ratios, mode=mode, Ku=Ku, Ks=Ks, delta=delta, tau=tau,
                         mag_ratio_limit=mag_ratio_limit, skip=skip, ignore=ignore, residual_rule=residual_rule,
                         scope=scope, heads=heads)
        self.delta_pick, self.pick_ceiling, self.recover = float(delta_pick), float(pick_ceiling), float(recover)
        self._phase = "picking"
        self._update()

    @property
    def picked(self) -> Dict[str, Tensor]:
        return {u.name: u.pruned for u in self.units if u.picked is not None}

    def _needs_scores(self) -> bool:
        # weight mode reads magnitudes only while picking (filter mode: the ratio too)
        return self.mode == "filter" or any(u.picked is None for u in self.units)

    def _update_unit(self, u: _Unit, w_abs: Tensor) -> bool:
        if u.picked is not None:
            u.lam[u.pruned] += self.delta
            u.lam[~u.pruned] = self.recover
            if self.mode == "filter":
                self._track_ratio(u, w_abs, u.pruned)
        else:
            u.lam += self.delta_pick
            candidates = self._pick(u, w_abs)
            if self.mode == "filter":
                self._track_ratio(u, w_abs, candidates)
            if float(u.lam.max()) >= self.pick_ceiling:
                u.picked = self.iteration
                u.pruned = candidates
        if u.picked is None:
            return False
        at_limit = self.mode == "filter" and u.ema >= self.mag_ratio_limit  # weight mode: no ratio, tau only
        return at_limit or float(u.lam.max()) > self.tau

    def _after_update(self) -> None:
        if self._phase == "picking" and all(u.picked is not None for u in self.units):
            self._phase = "update"
