"""What regkern's fused optimizers share with each other and with torch.optim.

``FusedOptimizer`` is a ``torch.optim.Optimizer`` whose step checks every
param group first and writes only once all of them passed (a refused step
changes nothing), reads GradScaler's ``grad_scale`` / ``found_inf``, keeps its
state in a ``TrackedState`` (so a step reuses its cached plan until the state
changes), saves state entries of fixed dtype as they are, and runs torch's
step / ``state_dict`` / ``load_state_dict`` hooks exactly where torch runs them.
A subclass says what its groups hold and how one group is prepared and run.
"""
from __future__ import annotations

import abc
import contextlib
import math
import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.optim.optimizer as _torch_optimizer
from torch import Tensor

from regkern.optim.checkpoint import load_keeping_dtypes, plain_state, to_param_device
from regkern.optim.tracked_state import TrackedState


class FusedOptimizer(torch.optim.Optimizer, metaclass=abc.ABCMeta):
    """Base of ``regkern.SGD``, ``regkern.RDA`` and ``regkern.SASADMM``.

    Subclasses set ``fixed_dtype_state`` (state entries loaded with their
    saved dtype) and ``legacy_options`` (group options an older checkpoint may
    lack, with the value it implies), and implement ``_check_group`` (raise
    ``ValueError`` on a group that cannot be stepped; called when the group is
    added and before every step, so a value changed by hand or by a scheduler
    is caught), ``_prepare`` (checks, no writes) and ``_apply`` (writes).
    """

    fixed_dtype_state: Tuple[str, ...] = ()
    legacy_options: Dict[str, Any] = {}
    # GradScaler hands the step grad_scale / found_inf instead of unscaling the
    # gradients itself (a subclass whose kernels take unscaled gradients says False).
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: Dict[str, Any], backend: Optional[str]) -> None:
        self.backend = backend
        self._plans: Dict[int, Any] = {}
        self._warned = set()
        super().__init__(params, defaults)
        self.state = TrackedState(self.state)

    # -- param groups -----------------------------------------------------------------
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """torch's ``add_param_group``, atomic: a refused group is not added and
        no state is created for it."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        index = len(self.param_groups) - 1
        saved = {p: dict(self.state[p]) if p in self.state else None for p in group["params"]}
        try:
            self._check_params(group, f" (param group {index})")
            self._check_group(group, f" (param group {index})")
            self._init_group(group)
        except Exception:
            self.param_groups.pop()
            for p, entries in saved.items():
                if entries is None:
                    self.state.pop(p, None)
                else:
                    self.state[p] = entries
            raise

    def _check_group(self, group: Dict[str, Any], where: str) -> None:
        """Raise ``ValueError`` (one sentence ending in ``where``) on options that cannot be stepped."""

    def _check_params(self, group: Dict[str, Any], where: str) -> None:
        """Raise ``ValueError`` on parameters the optimizer cannot step (checked when they are added)."""

    def _init_group(self, group: Dict[str, Any]) -> None:
        """Create the state a new (or reloaded) group asks for."""

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("backend", None)
        self.__dict__.setdefault("_warned", set())
        # load_state_dict hands back a plain dict; loaded state counts as a step's
        self.state = TrackedState(self.state, stepped=len(self.state) > 0)
        self._plans = {}
        for group in self.param_groups:
            for key, value in self.legacy_options.items():
                group.setdefault(key, value)

    # -- the step ---------------------------------------------------------------------
    def step(self, *args, **kwargs):
        """Perform one optimization step (``step(closure=None)``); returns the closure's loss, if any.

        torch wraps an optimizer's ``step`` in a profiler range and its step
        hooks; this one runs the hooks itself, exactly where torch runs them,
        and opens the range only while a profiler records (torch's wrapper
        with its range cost about 20 us per step on a 2-core CPU). A
        subclass that defines its own ``step`` is wrapped by torch as usual,
        and this one then only steps.
        """
        if type(self).step is not FusedOptimizer.step:
            return self._step(*args, **kwargs)
        if not torch._C._autograd._profiler_enabled():
            return self._hooked_step(args, kwargs)
        with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
            return self._hooked_step(args, kwargs)

    step.hooked = True  # torch.optim.Optimizer then leaves it unwrapped

    def _hooked_step(self, args: tuple, kwargs: Dict[str, Any]):
        """The step between torch's step pre- and post-hooks, global ones included
        (a pre-hook may return new ``(args, kwargs)``, as in torch)."""
        pre_hooks = self._optimizer_step_pre_hooks
        post_hooks = self._optimizer_step_post_hooks
        global_pre, global_post = _global_step_hooks()
        args = (self, *args)
        if pre_hooks or global_pre:
            for hook in (*global_pre.values(), *pre_hooks.values()):
                result = hook(self, args, kwargs)
                if result is not None:
                    if not (isinstance(result, tuple) and len(result) == 2):
                        raise RuntimeError(f"a step pre-hook of regkern.{type(self).__name__} must return None or "
                                           f"a tuple (new_args, new_kwargs), got {result!r}")
                    args, kwargs = result
        loss = type(self)._step(*args, **kwargs)
        self._optimizer_step_code()
        if post_hooks or global_post:
            for hook in (*post_hooks.values(), *global_post.values()):
                hook(self, args, kwargs)
        return loss

    def _step(self, closure: Optional[Callable[[], float]] = None):
        """The step itself, between the hooks."""
        with torch.set_grad_enabled(bool(self.defaults.get("differentiable", False))):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            found_inf = getattr(self, "found_inf", None)
            grad_scale = getattr(self, "grad_scale", None)
            for index, group in enumerate(self.param_groups):  # check everything, write nothing
                self._check_group(group, f" (param group {index})")
            for group in self.param_groups:
                self._sync_group(group)
            try:
                prepared = [self._prepare(index, group) for index, group in enumerate(self.param_groups)]
                if found_inf is not None and not self._kernels_skip(prepared):
                    if bool(found_inf.item()):
                        return loss  # an overflow step: parameters and state stay as they are
                    found_inf = None
                self._apply(prepared, grad_scale, found_inf)
            finally:
                for cached in self._plans.values():
                    cached.release_grads()
            self.state.stepped = True
            return loss

    step.__wrapped__ = _step  # inspect.signature(opt.step): (closure=None), as torch's

    def _kernels_skip(self, prepared: List[Any]) -> bool:
        """Whether the step of these prepared groups may leave GradScaler's
        ``found_inf`` (a device tensor) to the kernels, which skip the step
        on the device without the host reading it; False (the default): the
        host reads it first, as a step whose host-side state (step counts,
        first steps) depends on it must."""
        return False

    def _sync_group(self, group: Dict[str, Any]) -> None:
        """Bring a group's state up to options changed by hand since the last
        step (e.g. create the state of a new regularizer); adds, never removes."""

    @abc.abstractmethod
    def _prepare(self, index: int, group: Dict[str, Any]) -> Any:
        """Check a param group and its gradients and return what ``_apply`` needs; writes nothing."""

    @abc.abstractmethod
    def _apply(self, prepared: List[Any], grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        """Step every group from what ``_prepare`` returned; ``found_inf``
        (None unless ``_kernels_skip``) is for the kernels to read."""

    def warn_once(self, param: Tensor, reason: str) -> None:
        """One warning per parameter and reason: ``param`` is stepped on a slower path."""
        key = (id(param), reason)
        if key in self._warned:
            return
        self._warned.add(key)
        warnings.warn(f"regkern.{type(self).__name__}: {self.param_name(param)} is stepped by the pure-torch "
                      f"reference (slower) because {reason}.", stacklevel=4)

    def param_name(self, param: Tensor) -> str:
        """The parameter's name when its group has ``param_names`` (torch's
        named-parameter groups), else its group, index and shape."""
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p is param:
                    names = group.get("param_names")
                    if names:
                        return f"parameter {names[i]!r}"
                    return (f"parameter {i} of param group {g} ({str(p.dtype).replace('torch.', '')} "
                            f"{tuple(p.shape)})")
        return f"a parameter of shape {tuple(param.shape)}"

    # -- checkpoints ------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """torch's ``state_dict`` in plain data (``torch.load(weights_only=True)``
        reads it); post-hooks see the final form, as in torch."""
        with _hooks_held(self, "_optimizer_state_dict_post_hooks") as post_hooks:
            saved = plain_state(super().state_dict())
        for group in saved["param_groups"]:
            self._saved_group(group)
        for hook in post_hooks.values():
            result = hook(self, saved)
            if result is not None:
                saved = result
        return saved

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """torch's ``load_state_dict``, keeping the saved dtype of
        ``fixed_dtype_state`` entries; hooks run where torch runs them."""
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        state_dict["param_groups"] = [self._loaded_group(dict(g)) for g in state_dict["param_groups"]]
        for index, group in enumerate(state_dict["param_groups"]):  # refuse before anything is loaded
            self._check_group({**self.legacy_options, **group}, f" (param group {index} of the state_dict)")
        with _hooks_held(self, "_optimizer_load_state_dict_pre_hooks"), \
                _hooks_held(self, "_optimizer_load_state_dict_post_hooks") as post_hooks:
            load_keeping_dtypes(self, state_dict, self.fixed_dtype_state, super().load_state_dict, self._restore)
        for group in self.param_groups:
            self._init_group(group)
        for hook in post_hooks.values():
            hook(self)

    def _saved_group(self, group: Dict[str, Any]) -> None:
        """Turn a group's options into plain data for ``state_dict`` (in place)."""

    def _loaded_group(self, group: Dict[str, Any]) -> Dict[str, Any]:
        """The inverse of ``_saved_group``."""
        return group

    def _restore(self, name: str, value: Any, param: Tensor) -> Any:
        """A fixed-dtype entry as saved, on the parameter's device."""
        return to_param_device(name, value, param)


def _global_step_hooks():
    """torch's global step pre- and post-hooks (``register_optimizer_step_pre_hook``)."""
    return _torch_optimizer._global_optimizer_pre_hooks, _torch_optimizer._global_optimizer_post_hooks


@contextlib.contextmanager
def _hooks_held(optimizer: torch.optim.Optimizer, name: str) -> Iterator["OrderedDict"]:
    """Keep the hooks of ``name`` out of torch's implementation (they are run
    by the caller around regkern's own conversions) and hand them over."""
    hooks = getattr(optimizer, name)
    setattr(optimizer, name, OrderedDict())
    try:
        yield hooks
    finally:
        setattr(optimizer, name, hooks)


def check_number(value: Any, name: str, where: str, *, minimum: float = 0.0, what: str = "") -> Optional[float]:
    """``value`` as a float; ``ValueError`` unless it is finite and ``>= minimum``.
    A 1-element tensor counts as its value; a tensor on an accelerator is not
    read (that would synchronize the device): it passes and None is returned."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)}{where}")
        if value.device.type != "cpu":
            return None
        number = float(value.detach())
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name} value: {value!r}{where}; it must be a number{what}")
    else:
        number = float(value)
    if not (math.isfinite(number) and number >= minimum):
        raise ValueError(f"Invalid {name} value: {number}{where}; it must be finite and >= {minimum:g}{what}")
    return number


def scalar_lr(lr: Any) -> Any:
    """``lr`` as the kernels take it: a float, or a 0-d tensor (torch accepts
    any 1-element shape, e.g. ``[1, 1]``, which would broadcast the update)."""
    return lr.reshape(()) if isinstance(lr, Tensor) and lr.dim() else lr


def group_states(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> List[Dict[str, Any]]:
    """Each parameter's state without creating an entry for parameters that have none."""
    empty: Dict[str, Any] = {}
    state = optimizer.state
    return [state[p] if p in state else empty for p in params]
