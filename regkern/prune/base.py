"""What every pruning schedule shares: the step / done / prune protocol, the
summary it returns, its state_dict, the construction checks (an optimizer
that acts on what the schedule writes, something to prune), and small helpers
that add optimizer state. The timetables are derived in ``docs/schedules.md``.

A schedule owns no kernel. It writes optimizer state (lambda vectors, masks,
L1 coefficients, ADMM targets) on its timetable; the fused optimizer step reads
that state. Call ``step()`` after every optimizer step; when ``done`` is true,
``prune()`` cuts the model (structured: :func:`regkern.slicing.slice_model`,
the same optimizer keeps training) or freezes masks (unstructured).
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import gc
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from regkern.masks import check_mask_cut, mask_cut
from regkern.optim.features import require_reads
from regkern.sharding import is_sharded
from regkern.slicing import slice_model

PHASE_FINETUNE = "finetune"


@dataclasses.dataclass
class PruneSummary:
    """What ``prune()`` did.

    ``layers``: ``{layer: (kept, total)}`` (rows for structured pruning,
    weights for unstructured); ``slice``: the :class:`regkern.slicing.SliceSummary`
    of a structured cut (None otherwise); ``notes``: fallbacks and other
    remarks, one sentence each.
    """

    method: str
    structured: bool
    layers: Dict[str, Tuple[int, int]]
    slice: Any = None
    notes: List[str] = dataclasses.field(default_factory=list)
    thresholds: Dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """Fraction of the listed units (rows or weights) removed."""
        total = sum(t for _, t in self.layers.values())
        return 1.0 - sum(k for k, _ in self.layers.values()) / total if total else 0.0

    @property
    def flops_reduction(self) -> Optional[float]:
        """``1 - MACs after / MACs before`` of a structured cut (0.0 when it
        removed nothing; None for unstructured pruning): what
        :func:`regkern.prune.polarization_search`'s ``train`` returns."""
        s = self.slice
        if s is None or not getattr(s, "macs_before", None):
            return 0.0 if self.structured else None
        return 1.0 - s.macs_after / s.macs_before

    def __str__(self) -> str:
        kind = "rows" if self.structured else "weights"
        lines = [f"{self.method}: kept {kind} per layer ({100 * self.sparsity:.1f}% of the listed {kind} removed)"]
        width = max((len(n) for n in self.layers), default=0)
        for name, (kept, total) in self.layers.items():
            extra = f"  threshold {self.thresholds[name]:.4g}" if name in self.thresholds else ""
            lines.append(f"  {name:<{width}}  {kept:>7} / {total:<7}{extra}")
        if self.slice is not None:
            lines.extend("  " + line for line in str(self.slice).splitlines())
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def nothing_to_prune(method: str, ratios: Dict[str, float], mode: Optional[str] = None) -> str:
    """The one-sentence reason a schedule with no unit to prune is refused;
    ``ratios``: ``{layer: ratio}`` after ``skip`` and ``ignore``."""
    active = [name for name, ratio in ratios.items() if ratio > 0]
    if not active:
        return (f"{method} has nothing to prune: every layer has ratio 0 once ratios, skip and ignore are applied "
                "(ignore defaults to the output layer); give some layer a ratio above 0")
    shown = ", ".join(active[:4]) + (" ..." if len(active) > 4 else "")
    why = ("in weight mode each of them holds a single weight" if mode == "weight" else
           "their rows feed a residual add (residual_rule=True) or an ignored layer, or they have a single row")
    return f"{method} has nothing to prune: the layer(s) with a ratio above 0 ({shown}) have no unit it can remove ({why})"


class _Checked(abc.ABCMeta):
    """Hands the constructor the module inside a ``DistributedDataParallel``
    wrapper, and runs ``Schedule._check_built`` once the whole constructor has run."""

    def __call__(cls, *args, **kwargs):
        from regkern.distributed import unwrap

        if args:
            args = (unwrap(args[0]),) + args[1:]
        elif "model" in kwargs:
            kwargs["model"] = unwrap(kwargs["model"])
        schedule = super().__call__(*args, **kwargs)
        schedule._check_built()
        return schedule


class Schedule(abc.ABC, metaclass=_Checked):
    """Base class: an iteration counter, a phase, ``done`` / ``pruned`` and
    the state_dict round trip. Subclasses implement ``_advance`` (after each
    step), ``_prune`` and optionally ``_extra_state`` / ``_load_extra`` /
    ``_reapply`` (redo a saved structured cut on a fresh model).

    Two checks refuse a schedule that would run for nothing (ValueError, one
    sentence; nothing is written): before the subclass touches the optimizer,
    its step must act on one of the features in ``drives`` (e.g. GReg's
    ``state["lam"]`` is read by regkern.SGD only, so ``torch.optim.SGD`` is
    refused); once built, a schedule that found no unit to prune (every
    ratio 0, every layer skipped or ignored, no prunable group) says why.

    Data-parallel runs: build the schedule on every rank, with the
    ``DistributedDataParallel`` wrapper or the module inside it (the schedule
    keeps the module as ``model``), and call ``step()`` and ``prune()`` on
    every rank. ``prune()`` first checks that the ranks remove the same units
    (``RuntimeError`` on every rank otherwise, nothing changed); a
    structured cut then rebuilds the wrapper in place
    (:func:`regkern.distributed.rebuild_ddp`), so the loop goes on with the
    same wrapper and optimizer. A model sharded by FSDP2 (``fully_shard``)
    is taken as it is: decisions are made on whole (gathered) tensors, state
    is written into its shards, and a structured cut is made with masks
    (:func:`regkern.masks.mask_cut`); ``plan`` then cuts a plain copy.
    """

    method = "schedule"
    #: The features (keys of ``regkern.optim.features.FEATURES``) the
    #: schedule works through; the optimizer's step must act on at least
    #: one. ``()``: any optimizer.
    drives: Tuple[str, ...] = ()

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer such as regkern.SGD, got {type(optimizer).__name__}")
        require_reads(optimizer, self.drives, self.method)
        self.model = model
        self.optimizer = optimizer
        self.iteration = 0
        self._phase = ""
        self._done = False
        self.pruned = False
        #: A sharded (FSDP2) model's structured cut, made by masks: the plan
        #: that cuts a plain copy (regkern.export.apply_plan); None otherwise.
        self.plan: Optional[Dict[str, Any]] = None

    # -- protocol -----------------------------------------------------------
    @property
    def phase(self) -> str:
        return PHASE_FINETUNE if self.pruned else self._phase

    @property
    def done(self) -> bool:
        """True once the regularization phase is over: time to call ``prune()``."""
        return self._done or self.pruned

    def step(self) -> None:
        """Advance by one optimizer step (call it after ``optimizer.step()``)."""
        self.iteration += 1
        if not self.pruned:
            self._advance()

    def prune(self, force: bool = False, **options) -> PruneSummary:
        """Cut the model (structured) or freeze masks (unstructured) and switch
        to fine-tuning. ``force=True`` prunes before ``done`` with the current
        picks; ``options`` are the subclass's (e.g. ``finetune_optimizer``)."""
        if self.pruned:
            raise ValueError(f"{self.method} has already pruned the model")
        if not self._done and not force:
            raise ValueError(f"{self.method} is not done yet (phase {self._phase!r}, iteration {self.iteration}); "
                             "keep calling step() after each optimizer step, or pass force=True to prune now")
        from regkern.distributed import agreement, distributed_group

        with agreement(distributed_group(self.model)):
            summary = self._prune(**options)
        self.pruned = True
        self.plan = getattr(summary.slice, "plan", None)
        return summary

    # -- checkpointing ------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Plain data (tensors, numbers, strings, lists, dicts)."""
        return {"method": self.method, "iteration": self.iteration, "phase": self._phase, "done": self._done,
                "pruned": self.pruned, "plan": self.plan, **self._extra_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a saved schedule. Load it BEFORE the model and optimizer
        state: a saved structured cut is redone on this model first, so their
        shapes match."""
        if not isinstance(state, dict) or state.get("method") != self.method:
            got = state.get("method") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"this state_dict is from {got!r}, not from {self.method}")
        self._check_extra(state)
        if state["pruned"] and not self.pruned:
            from regkern.distributed import agreement, distributed_group

            with agreement(distributed_group(self.model)):
                self._reapply(state)
            self.pruned = True
        elif self.pruned and not state["pruned"]:
            raise ValueError(f"this {self.method} has already pruned the model; a state saved before pruning "
                             "cannot be loaded into it (build a fresh model, optimizer and schedule)")
        self.iteration = int(state["iteration"])
        self._phase = str(state["phase"])
        self._done = bool(state["done"])
        self.plan = state.get("plan")
        self._load_extra(state)

    # -- construction checks --------------------------------------------------
    def _check_built(self) -> None:
        """After the constructor: the optimizer must act on ``_late_drives()``
        and there must be something to prune (``_idle_reason``)."""
        require_reads(self.optimizer, self._late_drives(), self.method)
        reason = self._idle_reason()
        if reason:
            raise ValueError(reason)

    def _check_cut_groups(self, groups) -> None:
        """Before the constructor writes anything: on a sharded (FSDP2) model,
        refuse now what would refuse the cut of these groups by masks at
        ``prune()`` (:func:`regkern.masks.check_mask_cut`), not after training."""
        if is_sharded(self.model):
            check_mask_cut(self.model, groups, self.optimizer, f"{self.method}'s cut of a sharded model")

    def _late_drives(self) -> Tuple[str, ...]:
        """Features needed according to the constructor's options: a schedule
        in ``mode="weight"`` freezes element masks into ``state["mask"]``."""
        return ("mask",) if getattr(self, "mode", None) == "weight" else ()

    def _idle_reason(self) -> Optional[str]:
        """Why the schedule has no unit to prune, or None. The default reads
        ``self.units`` (a list) with ``self.ratios`` (``{layer: ratio}``) and
        ``self.mode`` when a subclass keeps them."""
        units = getattr(self, "units", None)
        if units is None or len(units):
            return None
        return nothing_to_prune(self.method, getattr(self, "ratios", None) or {}, getattr(self, "mode", None))

    # -- hooks ----------------------------------------------------------------
    def _advance(self) -> None:
        pass

    @abc.abstractmethod
    def _prune(self, **options) -> PruneSummary:
        """The cut itself; every schedule defines it."""

    def _extra_state(self) -> Dict[str, Any]:
        return {}

    def _check_extra(self, state: Dict[str, Any]) -> None:
        pass

    def _load_extra(self, state: Dict[str, Any]) -> None:
        pass

    def _reapply(self, state: Dict[str, Any]) -> None:
        pass


# -- helpers --------------------------------------------------------------------

def param_names(model: nn.Module) -> Dict[Tensor, str]:
    """Parameter -> its first qualified name."""
    out: Dict[Tensor, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(p, name)
    return out


def named_params(model: nn.Module) -> Dict[str, nn.Parameter]:
    return dict(model.named_parameters(remove_duplicate=False))


def optimizer_params(optimizer: torch.optim.Optimizer) -> Dict[Tensor, int]:
    """Parameter -> index of its param group."""
    return {p: i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}


def check_in_optimizer(optimizer: torch.optim.Optimizer, params: Iterable[Tuple[str, Tensor]]) -> None:
    """Every parameter is held by the optimizer."""
    params = list(params)
    owned = optimizer_params(optimizer)
    missing = [name for name, p in params if p not in owned]
    if missing:
        raise ValueError(f"the optimizer does not hold parameter(s) {', '.join(missing[:4])}"
                         f"{' ...' if len(missing) > 4 else ''}; build it over model.parameters()")


def module_of(param_name: str) -> str:
    """``"layer1.0.conv1.weight"`` -> ``"layer1.0.conv1"``."""
    return param_name.rsplit(".", 1)[0] if "." in param_name else ""


def cut(model: nn.Module, removals, optimizer, example_inputs):
    """:func:`regkern.slicing.slice_model` after a garbage collection: the
    tracer's graph from ``find_groups`` sits in reference cycles, and a graph
    still alive when shapes change makes the next backward fail (so does a
    ``loss`` of the last step still referenced by the caller: drop it first).
    A sharded (FSDP2) model is cut by masks instead (:func:`regkern.masks.mask_cut`)."""
    if is_sharded(model):
        return mask_cut(model, removals, optimizer)
    gc.collect()
    return slice_model(model, removals, optimizer=optimizer, example_inputs=example_inputs)


def regularizers_of(group: Dict[str, Any]) -> list:
    from regkern.regularizers import regularizer_list

    return regularizer_list(group.get("regularizer"))


def group_of(optimizer: torch.optim.Optimizer, param: Tensor) -> Dict[str, Any]:
    """The param group holding ``param`` (looked up each time: ``load_state_dict``
    replaces the group dicts)."""
    for g in optimizer.param_groups:
        if any(p is param for p in g["params"]):
            return g
    raise ValueError("the optimizer no longer holds the parameter this schedule regularizes")


def drop_regularizer(group: Dict[str, Any], kind: type) -> None:
    """Take the regularizers of type ``kind`` off a param group (for fine-tuning)."""
    regs = [r for r in regularizers_of(group) if not isinstance(r, kind)]
    group["regularizer"] = None if not regs else regs[0] if len(regs) == 1 else regs


@contextlib.contextmanager
def groups_restored_on_error(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """On an exception inside, put the optimizer's param groups (which
    parameters, regularizers and options each holds) and its state keys
    back as they were: several ``ensure_group`` calls refuse as one."""
    groups = list(optimizer.param_groups)
    contents = [dict(g) for g in groups]
    keys = {p: set(optimizer.state[p]) for g in groups for p in g["params"] if p in optimizer.state}
    try:
        yield
    except BaseException:
        for g, content in zip(groups, contents):
            g.clear()
            g.update(content)
        optimizer.param_groups[:] = groups
        for g in groups:
            for p in g["params"]:
                if p in optimizer.state and p not in keys:
                    del optimizer.state[p]
                elif p in optimizer.state:
                    for key in set(optimizer.state[p]) - keys[p]:
                        del optimizer.state[p][key]
        raise


def ensure_group(optimizer: torch.optim.Optimizer, params: Sequence[Tuple[str, Tensor]], kind: type,
                 make: Callable[[], Any], what: str, **options: Any) -> Dict[str, Any]:
    """The param group whose regularizer is a ``kind`` holding every one of
    ``params``. When the optimizer has none: a group holding exactly
    ``params`` gets ``make()`` added to its regularizers; otherwise the params
    move out of their groups into a new group with ``make()`` as regularizer
    and the hyper-parameters of the group of the first one. ``options``
    (e.g. ``weight_decay=0.0``) are set on the group it returns. (Create LR
    schedulers after this: a scheduler made before does not know a new group.)"""
    if not hasattr(optimizer, "param_groups") or "regularizer" not in optimizer.defaults:
        raise ValueError(f"{what} needs a regkern optimizer with regularizer param groups (regkern.SGD, regkern.Adam, regkern.AdamW), "
                         f"got {type(optimizer).__name__}")
    check_in_optimizer(optimizer, params)
    holders = [g for g in optimizer.param_groups if any(isinstance(r, kind) for r in regularizers_of(g))]
    wanted = [p for _, p in params]
    if holders:
        for g in holders:
            inside = set(map(id, g["params"]))
            if all(id(p) in inside for p in wanted):
                g.update(options)
                return g
        raise ValueError(f"the optimizer has a {kind.__name__} param group, but it does not hold every parameter "
                         f"{what} regularizes; put them all in one group (or leave the optimizer without one and "
                         "the schedule creates it)")
    owned = optimizer_params(optimizer)
    source = optimizer.param_groups[owned[wanted[0]]]
    ids = set(map(id, wanted))
    if set(map(id, source["params"])) == ids:  # the group is exactly these: give it the regularizer
        from regkern.regularizers import as_regularizer

        reg = make()
        source["regularizer"] = as_regularizer(regularizers_of(source) + [reg]) if regularizers_of(source) else reg
        reg.init_group(source["params"], [optimizer.state[p] for p in source["params"]])
        source.update(options)
        return source
    for g in optimizer.param_groups:
        g["params"] = [p for p in g["params"] if id(p) not in ids]
    new = {k: v for k, v in source.items() if k not in ("params", "regularizer")}
    new.update(params=list(wanted), regularizer=make(), **options)
    optimizer.add_param_group(new)
    return optimizer.param_groups[-1]
