"""``regkern.SGD``: ``torch.optim.SGD`` with regularizers fused into its step."""
from __future__ import annotations

import operator
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor

from regkern.backend import SGDPlan
from regkern.regularizers import as_regularizer, regularizer_list, step_options, to_saved
from regkern.optim.checkpoint import load_keeping_dtypes, plain_state
from regkern.optim.plan_cache import prepare_group
from regkern.optim.tracked_state import TrackedState
from regkern.sharding import is_dtensor, local_tensor

# Optimizer-state entries whose dtype does not follow the parameter's: torch's
# load_state_dict would cast them to the parameter dtype (a bool mask to
# float, an fp32 lambda to bf16), so they are restored as saved.
FIXED_DTYPE_STATE = ("lam", "lam_cols", "mask", "row_norms", "l1", "prox_lam", "polar", "admm_z", "admm_u")


class SGD(torch.optim.Optimizer):
    r"""Stochastic gradient descent with fused regularization.

    Same arguments and behaviour as :class:`torch.optim.SGD` (momentum,
    dampening, weight decay, Nesterov, ``maximize``, float or tensor ``lr``,
    LR schedulers, closures, ``state_dict``, ``torch.amp.GradScaler``), and
    every parameter group may carry a ``regularizer`` key, e.g.
    ``regkern.RowL2()``. For each parameter with a gradient, one fused pass
    computes (SPEC.md sections 1, 2 and 7)::

        d   = g + weight_decay * W + lam[r] * W        # lam: state["lam"], per row (or per weight)
              + lam_cols[c] * W[:, c]               # state["lam_cols"]: per input column
        buf = d (first step) or momentum * buf + (1 - dampening) * d
        W   = W - lr * (d + momentum * buf if nesterov else buf)
        W  *= mask; buf *= mask                        # state["mask"], if present
        state["row_norms"][r] = L1, L2, mean |W| of the updated row r

    The optimizer state is the interface: ``state[p]["lam"]`` (fp32, one
    entry per row ``W[r]`` or W's shape, any sign), ``state[p]["lam_cols"]``
    (fp32, one entry per index of dim 1), ``state[p]["mask"]`` (bool, ``[R]`` or
    ``W``'s shape) and ``state[p]["row_norms"]`` (fp32 ``[R, 3]``) are read
    when present, whatever the group's regularizer; regularizers create them,
    schedules and users write them in place, and ``state_dict`` saves them.

    ``foreach`` and ``fused`` are accepted for compatibility and have no
    effect: the step is always fused. ``backend`` ("cpp", "triton",
    "reference"; default: by device, or the ``REGKERN_BACKEND`` variable)
    forces a kernel backend. Under a GradScaler the regularizer acts on the
    unscaled gradient and a step with inf/NaN gradients changes nothing.
    """

    def __init__(self, params, lr: float | Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float | Tensor = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, differentiable: bool = False,
                 fused: Optional[bool] = None, backend: Optional[str] = None) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if differentiable:
            raise ValueError("regkern.SGD steps with fused kernels and does not support differentiable=True")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach,
                        differentiable=False, fused=fused, regularizer=None)
        self.backend = backend
        self._plans: Dict[int, _GroupPlan] = {}
        super().__init__(params, defaults)
        self.state = TrackedState(self.state)
        # GradScaler hands us grad_scale / found_inf instead of unscaling itself.
        self._step_supports_amp_scaling = True

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["regularizer"] = as_regularizer(group["regularizer"])
        for reg in regularizer_list(group["regularizer"]):
            reg.init_group(group["params"], [self.state[p] for p in group["params"]])

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("backend", None)
        self.state = TrackedState(self.state)  # load_state_dict hands back a plain dict
        self._plans = {}
        for group in self.param_groups:
            group.setdefault("regularizer", None)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """Perform one optimization step; returns the closure's loss, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf.item()):
            return loss  # an overflow step: parameters and state stay as they are
        grad_scale = getattr(self, "grad_scale", None)
        # Check every group before touching anything: a rejected step is a no-op.
        prepared = [self._prepare(i, group) for i, group in enumerate(self.param_groups)]
        for group in self.param_groups:
            for reg in regularizer_list(group["regularizer"]):
                reg.before_step(group["params"], [self.state[p] for p in group["params"]])
        for group, (cached, grads) in zip(self.param_groups, prepared):
            cached.plan.run(grads, cached.firsts, lr=group["lr"], momentum=group["momentum"],
                            dampening=group["dampening"], nesterov=group["nesterov"],
                            weight_decay=group["weight_decay"], maximize=group["maximize"],
                            grad_scale=grad_scale)
            for p, buf, first in zip(cached.params, cached.bufs, cached.firsts):
                if first:
                    self.state[p]["momentum_buffer"] = buf
        return loss

    def _prepare(self, index: int, group: Dict[str, Any]):
        """The group's plan and checked local gradients; the plan is reused
        while the parameters with gradients, their storage and the state are
        the same, so a step does little Python work per tensor."""
        return prepare_group(self._plans, index, group["params"],
                             lambda cached, ps: cached.fits(ps, self.state.clock.value, self.backend),
                             lambda ps: _GroupPlan(self, group, ps))

    def state_dict(self) -> Dict[str, Any]:
        saved = plain_state(super().state_dict())
        for group in saved["param_groups"]:
            group["regularizer"] = to_saved(group.get("regularizer"))
        return saved

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        state_dict["param_groups"] = [
            {**g, "regularizer": as_regularizer(g.get("regularizer"))} for g in state_dict["param_groups"]
        ]
        load_keeping_dtypes(self, state_dict, FIXED_DTYPE_STATE, super().load_state_dict)
        for group in self.param_groups:
            for reg in regularizer_list(group["regularizer"]):
                reg.init_group(group["params"], [self.state[p] for p in group["params"]])


class _GroupPlan:
    """A param group's SGDPlan with what it was built from: the parameters
    that had gradients, their storage, the state clock and the momentum
    buffers (new ones are created here and saved after the first step)."""

    def __init__(self, optimizer: SGD, group: Dict[str, Any], params) -> None:
        states = [optimizer.state[p] for p in params]
        with_momentum = group["momentum"] != 0
        bufs = [st.get("momentum_buffer") for st in states] if with_momentum else [None] * len(params)
        self.firsts = [with_momentum and b is None for b in bufs]
        self.bufs = [torch.empty_like(p) if first else b for p, b, first in zip(params, bufs, self.firsts)]
        self.params = list(params)
        self.sharded = any(is_dtensor(p) for p in params)
        self.pointers = self._pointers(params)
        self.clock = optimizer.state.clock.value
        self.backend = optimizer.backend
        state_of = lambda key: [local_tensor(st.get(key)) for st in states]  # noqa: E731
        options = step_options(group["regularizer"])
        self.plan = SGDPlan([local_tensor(p) for p in params], [local_tensor(b) for b in self.bufs],
                            state_of("lam"), state_of("mask"), state_of("row_norms"), optimizer.backend,
                            l1s=state_of("l1"), polars=state_of("polar"),
                            admm_targets=state_of("admm_target"),
                            admm_rhos=[options.get("admm_rho", 0.0)] * len(params),
                            prox_kinds=[options.get("prox_kind", 0)] * len(params),
                            prox_lams=state_of("prox_lam"),
                            clamps=[options.get("clamp")] * len(params),
                            lam_cols=state_of("lam_cols"))

    def _pointers(self, params):
        return [local_tensor(p).data_ptr() for p in params] if self.sharded else list(map(Tensor.data_ptr, params))

    def fits(self, params, clock: int, backend) -> bool:
        return (clock == self.clock and backend == self.backend and len(params) == len(self.params)
                and not any(self.firsts) and all(map(operator.is_, params, self.params))
                and self._pointers(params) == self.pointers)
