"""What regkern's optimizers with regularizer param groups share (``regkern.SGD``,
``regkern.Adam``, ``regkern.AdamW``): the ``regularizer`` group option, the
state each regularizer creates, its per-step hook, its checkpoint form, and
the row norms the step writes for the schedules."""
from __future__ import annotations

from operator import attrgetter
from typing import Any, Dict, Optional

from torch import Tensor

from regkern.optim.fused import FusedOptimizer, group_states
from regkern.regularizers import Regularizer, as_regularizer, regularizer_list, step_options, to_saved
from regkern.sharding import local_tensor

VERSION = attrgetter("_version")


class RegularizedOptimizer(FusedOptimizer):
    """A fused optimizer whose param groups carry a ``regularizer`` key.

    The group plans of a subclass keep ``norm_params`` (the local tensors
    whose ``row_norms`` the step writes) and, after a step, ``norm_versions``
    (their version counters then), which ``current_row_norms`` compares.
    """

    def _check_regularizer(self, group: Dict[str, Any]) -> None:
        """Convert a group's ``regularizer`` to its object form; ``ValueError`` on one that cannot be."""
        if not _is_regularizer(group["regularizer"]):
            group["regularizer"] = as_regularizer(group["regularizer"])
        elif isinstance(group["regularizer"], list):
            step_options(group["regularizer"])  # refuses a list whose members disagree

    def _sync_group(self, group: Dict[str, Any]) -> None:
        """A regularizer set on a group by hand since the last step gets its
        state now (missing entries only). The state of a regularizer taken off
        stays: per-parameter vectors (``lam``, ``lam_cols``, ``l1``, masks)
        act whenever present, so delete them to stop them."""
        if self.__dict__.get("_initialized", {}).get(id(group)) is not group["regularizer"]:
            self._init_group(group)

    def _init_group(self, group: Dict[str, Any]) -> None:
        for reg in regularizer_list(group["regularizer"]):
            reg.init_group(group["params"], [self.state[p] for p in group["params"]])
        # which regularizer each group's state was made for (by the group dict's identity)
        self.__dict__.setdefault("_initialized", {})[id(group)] = group["regularizer"]

    def _saved_group(self, group: Dict[str, Any]) -> None:
        group["regularizer"] = to_saved(group.get("regularizer"))

    def _loaded_group(self, group: Dict[str, Any]) -> Dict[str, Any]:
        group["regularizer"] = as_regularizer(group.get("regularizer"))
        return group

    def _before_step(self) -> None:
        """Each regularizer's per-step hook (e.g. polarization's set mean), before any group is stepped."""
        for group in self.param_groups:
            regs = _with_hook(group)
            if regs:  # most regularizers have none: the group's state list is not built for them
                states = group_states(self, group["params"])
                for reg in regs:
                    reg.before_step(group["params"], states)

    def _kernels_skip(self, prepared) -> bool:
        """Every group with parameters is stepped by kernels alone that read
        ``found_inf`` on the device (``Backend.reads_stall``): no tensor on the
        reference or torch-ops path, no new state that only a taken step fills
        (``CachedPlan.step_fills_state``) and no regularizer hook that writes
        state before the step."""
        def kernels_alone(group, cached):
            return (cached.plan.backend.reads_stall and not cached.plan.slow_index and not cached.torch_params
                    and not cached.step_fills_state()
                    and not _with_hook(group))
        return all(kernels_alone(group, cached) for group, (cached, _) in zip(self.param_groups, prepared)
                   if cached.params)

    def _group_written(self, cached, found_inf: Optional[Tensor] = None) -> None:
        """After a group's step: the version counters of the parameters the
        kernels wrote through raw pointers advance (as after an in-place torch
        op), and the row norms the step wrote are recorded as describing them.
        With ``found_inf`` left to the kernels the host does not know whether
        the step was taken: ``norm_current`` then keeps, on the device,
        whether the norms describe the weights (the step was taken, or they
        did before it), for ``current_row_norms`` to read when asked."""
        # only a step the host may not know was taken reads the versions before it (rarely: norms and AMP on GPU)
        described = (found_inf is not None and cached.norm_params
                     and cached.norm_versions == list(map(VERSION, cached.norm_params)))
        cached.mark_written(cached.fast_params)
        if not cached.norm_params:
            return
        if found_inf is None or (described and cached.norm_current is None):
            cached.norm_current = None  # known: written by this step, or current before and after it
        else:
            taken = found_inf == 0
            cached.norm_current = taken | cached.norm_current if described else taken
        cached.norm_versions = list(map(VERSION, cached.norm_params))

    def current_row_norms(self, param: Tensor) -> Optional[Tensor]:
        """``state[param]["row_norms"]`` while it describes the current weights:
        the last step wrote them and nothing has written the parameter since
        (``model.load_state_dict``, an in-place edit, a new ``.data`` such as
        a slice); else None, and scores must be computed from ``W``. Writes
        are seen through the parameter's version counter, which torch ops on
        the parameter advance; a write that bypasses it (in place on
        ``param.data`` or through numpy) is not seen. After steps whose
        GradScaler overflow flag only the kernels read, this reads it (one
        wait for the device)."""
        norms = self.state[param].get("row_norms") if param in self.state else None
        if norms is None:
            return None
        for cached in self._plans.values():
            if cached.norm_versions is None:
                continue
            for i, p in enumerate(cached.params):
                if p is param:
                    local = local_tensor(param)
                    # by storage: a DTensor's local tensor is a new object each time it is asked for
                    versions = dict(zip(map(Tensor.data_ptr, cached.norm_params), cached.norm_versions))
                    fresh = (versions.get(local.data_ptr()) == local._version
                             and cached._pointers([param]) == [cached.pointers[i]]
                             and (cached.norm_current is None or bool(cached.norm_current)))
                    return norms if fresh else None
        return None


def _with_hook(group: Dict[str, Any]) -> list:
    """The group's regularizers that have a per-step hook (``Regularizer.before_step``)."""
    return [r for r in regularizer_list(group["regularizer"]) if type(r).before_step is not Regularizer.before_step]


def _is_regularizer(value: Any) -> bool:
    """Already in the form ``as_regularizer`` returns (no conversion needed)."""
    return value is None or isinstance(value, Regularizer) or (
        isinstance(value, list) and all(isinstance(r, Regularizer) for r in value))
