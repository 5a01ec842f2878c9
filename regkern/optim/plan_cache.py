"""The per-group plan cache shared by regkern's fused optimizers.

A plan (validated metadata of a group's parameters and state) is reused
while the parameters that have gradients, their storage and the state are the
same; each step then only checks the gradients. The plan's step reader
(``regkern.backends.step_reader``) makes those checks, and writes the
gradients' addresses into the plan's tables, in one C++ call; whatever it
does not accept goes through the checks here in Python.
"""
from __future__ import annotations

import operator
from itertools import repeat
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from torch import Tensor
from torch.autograd.graph import increment_version

from regkern.backends.dispatch import GRADS_IN_TABLES
from regkern.backends.step_reader import make_reader
from regkern.sharding import is_dtensor, local_tensor


class CachedPlan:
    """A param group's kernel plan (``self.plan``) with what it was built
    from: the parameters that had gradients, their storage, the state clock
    and the backend asked for. Subclasses build ``self.plan`` and call
    ``_remember``; ``fast_index`` lists the parameters the plan steps when
    it does not step all of them (None: all)."""

    fast_index: Optional[List[int]] = None
    #: the plan's step reader (``regkern.backends.step_reader``) and the group
    #: members it checks, kept alive here; set by ``prepare_group``
    reader: Any = None
    reader_group: Optional[List[Tensor]] = None

    def _remember(self, optimizer, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        self.sharded = any(map(is_dtensor, self.params))
        self.pointers = self._pointers(self.params)
        self.clock = optimizer.state.clock.value
        self.backend = optimizer.backend

    def _pointers(self, params: Sequence[Tensor]) -> List[int]:
        return [local_tensor(p).data_ptr() for p in params] if self.sharded else list(map(Tensor.data_ptr, params))

    def _route_torch(self, by_torch: Sequence[bool]) -> None:
        """Split ``self.params`` into ``torch_params`` (``by_torch[i]``: stepped
        with torch ops) and ``fast_params`` (the plan's; ``self.params`` itself
        when that is all of them), with ``fast_index`` their indices (None: all)."""
        self.torch_params = [p for p, t in zip(self.params, by_torch) if t]
        if self.torch_params:
            self.fast_params = [p for p, t in zip(self.params, by_torch) if not t]
            self.fast_index = [i for i, t in enumerate(by_torch) if not t]
        else:
            self.fast_params, self.fast_index = self.params, None

    def same_inputs(self, params: Sequence[Tensor], clock: int, backend) -> bool:
        """Whether ``params`` (those with gradients now), the state clock and
        the backend are what the plan was built from."""
        if clock != self.clock or backend != self.backend:
            return False
        if params is self.params:  # checked by the step reader: same objects, same storage
            return True
        return (len(params) == len(self.params) and all(map(operator.is_, params, self.params))
                and self._pointers(params) == self.pointers)

    def release_grads(self) -> None:
        """Drop the step reader's hold on the gradients it read (once the step
        ran or stopped): until then a gradient replaced after the read stays
        alive for the kernels."""
        if self.reader is not None:
            self.reader.release()

    def step_fills_state(self) -> bool:
        """Whether this plan created state that only a step taken fills (a
        skipped step would leave it undefined)."""
        return False

    def checked_grads(self, grads: Sequence[Tensor]) -> List[Tensor]:
        """The gradients of ``self.params`` ready for the plan; ``ValueError`` if they cannot be stepped."""
        if self.fast_index is not None:
            grads = [grads[i] for i in self.fast_index]
        return self.plan.checked_grads(grads)

    def mark_written(self, params: Optional[Sequence[Tensor]] = None) -> None:
        """Advance the version counters of the parameters the kernels wrote
        through raw pointers (default: all of ``self.params``), as an in-place
        torch op would: autograd then refuses a backward through a graph that
        saved the old weights, as it does after a torch.optim step."""
        if self.reader is not None and (params is None or params is self.params):
            self.reader.bump_versions()
            return
        params = self.params if params is None else params
        increment_version([local_tensor(p) for p in params] if self.sharded else params)


def prepare_group(plans: Dict[int, Any], index: int, group_params: List[Tensor],
                  fits: Callable[[Any, List[Tensor]], bool],
                  build: Callable[[List[Tensor]], Any]) -> Tuple[Any, Any]:
    """The group's cached plan (rebuilt with ``build`` unless ``fits``) and its
    checked local gradients; parameters without a gradient are left out.
    Where the plan's step reader finds the group as the plan saw it, the
    gradients' addresses are already in the plan's tables and
    ``GRADS_IN_TABLES`` stands for them."""
    cached = plans.get(index)
    if cached is not None and cached.reader is not None and cached.reader.read(group_params) \
            and fits(cached, cached.params):
        return cached, GRADS_IN_TABLES
    params = group_params
    grads = [p.grad for p in params]
    if not all(map(operator.is_not, grads, repeat(None))):
        params = [p for p, g in zip(params, grads) if g is not None]
        grads = [g for g in grads if g is not None]
    fresh = cached is None or not fits(cached, params)
    if fresh:
        cached = plans[index] = build(params)
    if cached.sharded:
        grads = [local_tensor(g) for g in grads]
    try:
        checked = cached.checked_grads(grads)
    except ValueError:
        if fresh:
            raise
        # e.g. a parameter resized in place through .data, or a gradient that
        # turned sparse: check against a new plan
        cached = plans[index] = build(params)
        fresh = True
        checked = cached.checked_grads(grads)
    if (fresh or _members_changed(cached, group_params)) and not cached.sharded and cached.fast_index is None:
        members = list(group_params)
        cached.reader = make_reader(group_params, params, cached.plan)
        cached.reader_group = members if cached.reader is not None else None
    return cached, checked


def _members_changed(cached: CachedPlan, group_params) -> bool:
    """Whether a plan that still fits was read for another group list than
    ``group_params`` (its members or the list's type changed): its reader
    would refuse every step, so it is made again."""
    members = cached.reader_group
    return members is not None and (type(group_params) is not list or len(group_params) != len(members)
                                    or not all(map(operator.is_, group_params, members)))
