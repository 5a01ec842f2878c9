"""Optimizer state that counts its changes, so a step can reuse its plan.

A fused step caches, per param group, the validated metadata of every
parameter and state tensor (see ``regkern.backends.sgd.SGDPlan``). Writing into a
state tensor in place (``state[p]["lam"][rows] += 1e-4``) keeps the plan
valid; putting a new tensor in the state (``state[p]["mask"] = m``) ticks the
clock and the next step rebuilds and re-checks the plan.
"""
from __future__ import annotations

from typing import Any, Iterable


class Clock:
    """A counter of state changes."""

    def __init__(self) -> None:
        self.value = 0

    def tick(self) -> None:
        self.value += 1


class ParamState(dict):
    """One parameter's state: a dict that ticks ``clock`` on every change."""

    clock = None  # set per instance; None while unpickling

    def _changed(self) -> None:
        if self.clock is not None:
            self.clock.tick()

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self._changed()

    def __delitem__(self, key) -> None:
        super().__delitem__(key)
        self._changed()

    def pop(self, *args):
        self._changed()
        return super().pop(*args)

    def popitem(self):
        self._changed()
        return super().popitem()

    def clear(self) -> None:
        super().clear()
        self._changed()

    def update(self, *args, **kwargs) -> None:
        super().update(*args, **kwargs)
        self._changed()

    def setdefault(self, key, default=None):
        if key not in self:
            self._changed()
        return super().setdefault(key, default)


class TrackedState(dict):
    """``optimizer.state``: parameter -> ParamState, created on first access.

    Its truth value is torch's "has a step made state yet": False until a
    step was taken (``stepped``), though regularizers create their entries
    (``lam``, masks) at construction. torch.distributed.checkpoint relies on
    it: on a fresh optimizer it takes one step at lr 0 on zero gradients to
    make the state a checkpoint is loaded into (momentum buffers, moments).
    """

    def __init__(self, items: Iterable = (), clock: Clock = None, stepped: bool = False) -> None:
        super().__init__()
        self.clock = clock if clock is not None else Clock()
        self.stepped = stepped
        for key, value in dict(items).items():
            self[key] = value

    def __bool__(self) -> bool:
        return self.stepped and len(self) > 0

    def _wrap(self, value: Any) -> Any:
        """A parameter's dict becomes a ParamState; any other value (torch's
        state accepts any key and value, e.g. a counter a hook keeps) is kept as is."""
        if not isinstance(value, dict):
            return value
        state = value if isinstance(value, ParamState) else ParamState(value)
        state.clock = self.clock
        return state

    def __missing__(self, key) -> ParamState:
        state = ParamState()
        state.clock = self.clock
        super().__setitem__(key, state)
        return state

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, self._wrap(value))
        self.clock.tick()

    def __delitem__(self, key) -> None:
        super().__delitem__(key)
        self.clock.tick()

    def pop(self, *args):
        self.clock.tick()
        return super().pop(*args)

    def clear(self) -> None:
        super().clear()
        self.clock.tick()

    def __reduce__(self):
        return (TrackedState, (dict(self), self.clock))
