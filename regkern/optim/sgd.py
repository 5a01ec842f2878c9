"""``regkern.SGD``: ``torch.optim.SGD`` with regularizers fused into its step."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from regkern.backends.sgd import SGDPlan
from regkern.regularizers import step_options
from regkern.optim.fused import check_number, group_states, scalar_lr
from regkern.optim.regularized import RegularizedOptimizer
from regkern.optim.plan_cache import CachedPlan, prepare_group
from regkern.optim.torch_path import check_sgd_with_torch_ops, sgd_with_torch_ops
from regkern.sharding import local_tensor
from regkern.terms import FIXED_DTYPE_STATE, STEP_OPTIONS, STEP_STATE

# Optimizer-state entries whose dtype does not follow the parameter's: torch's
# load_state_dict would cast them to the parameter dtype (a bool mask to
# float, an fp32 lambda to bf16), so they are restored as saved (regkern.terms).


class SGD(RegularizedOptimizer):
    r"""Stochastic gradient descent with fused regularization.

    Same arguments and behaviour as :class:`torch.optim.SGD` (momentum,
    dampening, weight decay, Nesterov, ``maximize``, float or tensor ``lr``,
    LR schedulers, closures, ``state_dict``, ``torch.amp.GradScaler``), and
    every parameter group may carry a ``regularizer`` key, e.g.
    ``regkern.RowL2()``. For each parameter with a gradient, one fused pass
    computes (docs/sgd.md)::

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

    fixed_dtype_state = FIXED_DTYPE_STATE
    # what torch.optim.SGD assumes for options an older checkpoint lacks
    legacy_options = dict(nesterov=False, maximize=False, foreach=None, differentiable=False, fused=False,
                          regularizer=None)

    def __init__(self, params, lr: float | Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float | Tensor = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, differentiable: bool = False,
                 fused: Optional[bool] = None, regularizer=None, backend: Optional[str] = None) -> None:
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach,
                        differentiable=differentiable, fused=fused, regularizer=regularizer)
        self._check_group(defaults, "")
        super().__init__(params, defaults, backend)

    def _check_group(self, group: Dict[str, Any], where: str) -> None:
        check_number(group["lr"], "learning rate", where)
        momentum = check_number(group["momentum"], "momentum", where)
        dampening = check_number(group["dampening"], "dampening", where)
        check_number(group["weight_decay"], "weight_decay", where)
        if group["nesterov"] and ((momentum is not None and momentum <= 0) or (dampening is not None and dampening != 0)):
            raise ValueError(f"Nesterov momentum requires a momentum and zero dampening{where}")
        self._check_regularizer(group)

    def _prepare(self, index: int, group: Dict[str, Any]):
        """The group's plan and checked local gradients; the plan is reused
        while the parameters with gradients, their storage and the state are
        the same, so a step does little Python work per tensor."""
        cached, grads = prepare_group(self._plans, index, group["params"],
                                      lambda cached, ps: cached.fits(ps, group, self.state.clock.value, self.backend),
                                      lambda ps: _GroupPlan(self, group, ps))
        cached.plan.check_coefficients(group["momentum"])
        if cached.torch_params:
            check_sgd_with_torch_ops(cached.torch_params, group_states(self, cached.torch_params), group)
        return cached, grads

    def _apply(self, prepared: List[Any], grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        self._before_step()
        for group, (cached, grads) in zip(self.param_groups, prepared):
            cached.plan.run(grads, cached.firsts, lr=scalar_lr(group["lr"]), momentum=group["momentum"],
                            dampening=group["dampening"], nesterov=group["nesterov"],
                            weight_decay=group["weight_decay"], maximize=group["maximize"],
                            grad_scale=grad_scale, found_inf=found_inf)
            for p, buf in cached.new_bufs:
                self.state[p]["momentum_buffer"] = buf
            if cached.torch_params:
                sgd_with_torch_ops(cached.torch_params, [self.state[p] for p in cached.torch_params], group,
                                   grad_scale)
            self._group_written(cached, found_inf)


class _GroupPlan(CachedPlan):
    """A param group's SGDPlan with what it was built from (see CachedPlan)
    and the momentum buffers (new ones are created here and saved after the
    first step). Parameters the fused kernels do not take by design (complex
    ones, sparse gradients, a differentiable group) are stepped with torch
    ops instead (``regkern.optim.torch_path``)."""

    def __init__(self, optimizer: SGD, group: Dict[str, Any], params) -> None:
        self._remember(optimizer, params)
        differentiable = bool(group["differentiable"])
        by_torch = [differentiable or p.is_complex() or (p.grad is not None and p.grad.is_sparse) for p in params]
        self._route_torch(by_torch)
        self.norm_params = [local_tensor(p) for p in params
                            if p in optimizer.state and optimizer.state[p].get("row_norms") is not None]
        self.norm_versions = self.norm_current = None
        params = self.fast_params
        states = group_states(optimizer, params)
        self.momentum = group["momentum"] != 0
        bufs = [st.get("momentum_buffer") for st in states] if self.momentum else [None] * len(params)
        self.firsts = [self.momentum and b is None for b in bufs]
        self.bufs = [torch.empty_like(p) if first else b for p, b, first in zip(params, bufs, self.firsts)]
        self.new_bufs = [(p, b) for p, b, first in zip(params, self.bufs, self.firsts) if first]  # saved after the step
        self.differentiable = differentiable
        self.regularizer = group["regularizer"]
        options = step_options(group["regularizer"])
        # every state entry and group option the step reads, by its keyword (regkern.terms)
        inputs = {keyword: [local_tensor(st.get(key)) for st in states] for key, keyword in STEP_STATE.items()}
        inputs.update({keyword: [options.get(option, absent)] * len(params)
                       for option, (keyword, absent) in STEP_OPTIONS.items()})
        self.plan = SGDPlan([local_tensor(p) for p in params], [local_tensor(b) for b in self.bufs],
                            backend=optimizer.backend, warn=lambda i, why: optimizer.warn_once(params[i], why),
                            **inputs)

    def step_fills_state(self) -> bool:
        return any(self.firsts)  # new momentum buffers are empty until the first step writes them

    def fits(self, params, group: Dict[str, Any], clock: int, backend) -> bool:
        return (not any(self.firsts) and self.momentum == (group["momentum"] != 0)
                and self.differentiable == bool(group["differentiable"]) and self.regularizer == group["regularizer"]
                and self.same_inputs(params, clock, backend))
