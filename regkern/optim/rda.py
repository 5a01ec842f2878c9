"""``regkern.RDA``: L1 regularized dual averaging (SPEC 4) as a drop-in optimizer."""
from __future__ import annotations

import math
import operator
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from torch import Tensor

from regkern.backend_rda import RDAPlan
from regkern.optim.checkpoint import load_keeping_dtypes, plain_state
from regkern.optim.plan_cache import prepare_group
from regkern.optim.tracked_state import TrackedState
from regkern.sharding import is_dtensor, local_tensor

# Optimizer-state entries whose dtype does not follow the parameter's: torch's
# load_state_dict would cast them to the parameter dtype (fp32 gbar / w0 of a
# bf16 parameter to bf16, a bool mask to float), so they are restored as saved.
# "step" stays a float32 CPU tensor, copied so the loaded dict is not shared.
FIXED_DTYPE_STATE = ("gbar", "w0", "mask", "step")


def _gamma(lr) -> float:
    """gamma = 1 / lr (lr = 0: gamma = inf, W stays at W0)."""
    lr = float(lr)
    return math.inf if lr == 0 else 1.0 / lr


def _check_options(lr, lam, group, where: str = "") -> None:
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"Tensor lr must be 1-element{where}")
    if not 0.0 <= float(lr) < math.inf:
        raise ValueError(f"Invalid learning rate: {float(lr)}{where}; RDA's lr is 1 / gamma and must be finite and >= 0")
    if isinstance(lam, Tensor) and lam.numel() != 1:
        raise ValueError(f"Tensor lam must be 1-element{where}")
    if not 0.0 <= float(lam) < math.inf:
        raise ValueError(f"Invalid lam value: {float(lam)}{where}; the L1 strength must be finite and >= 0")
    if not isinstance(group, bool):
        raise ValueError(f"Invalid group value: {group!r}{where}; it must be True (shrink whole rows) or False (elements)")


class RDA(torch.optim.Optimizer):
    r"""L1 regularized dual averaging (Xiao 2010) with the proximal centre at
    the initial weights (He et al., "Make L1 regularization effective in
    training sparse CNN", arXiv 1807.04222), fused into one pass over memory.

    For each parameter with a gradient, at its step ``t`` (1 at its first
    step), with ``gamma = 1 / lr`` (SPEC.md section 4)::

        gbar = gbar * (t - 1) / t + g / t            # running mean of the gradients
        v    = W0 - (sqrt(t) / gamma) * gbar         # W0: W at the parameter's first step
        W    = sign(v) * max(|v| - tau, 0)           # group=False, tau = lam * sqrt(t) / gamma
        W_r  = v_r * max(0, 1 - tau * sqrt(n_r) / ||v_r||)   # group=True: row r = W[r], n_r elements

    ``lam = 0`` gives plain dual averaging (``W = v``). The weights are not
    accumulated: every step recomputes W from W0 and the mean gradient, and
    the shrinkage sets weights (or whole rows) to exact zeros.

    ``lr`` is the inverse of the paper's ``gamma`` and lives in each param
    group like any learning rate, so every torch LR scheduler drives it: a
    ``StepLR`` that divides ``lr`` by 10 at the stage boundaries is the paper's
    stage-wise increase of ``gamma``. ``lam`` (the L1 strength) and ``group``
    (shrink rows ``W[r]``, the first dimension indexing rows, instead of
    elements; for a vector every entry is a row) are per param group, and read
    at every step. ``maximize`` ascends instead. Under a
    ``torch.amp.GradScaler`` the step sees the unscaled gradient and a step
    with inf/NaN gradients changes nothing (not even the step count).

    State per parameter: ``step`` (a 0-d float32 CPU tensor, like torch's
    optimizers; the counts of a param group are views of one vector, so a
    step reads and advances them at once), ``gbar`` and ``w0`` (fp32 for
    fp32 / bf16 / fp16 parameters, float64 for float64 ones; all math is
    fp32, W is rounded once to its dtype). An optional ``state[p]["mask"]``
    (bool, ``[R]`` rows or ``W``'s shape) is applied before the shrinkage to
    v, gbar and W0, so pruned weights stay exactly 0. All of it round-trips through ``state_dict``.
    Write state tensors in place, or assign new ones (the next step then
    re-checks them). ``backend`` ("cpp", "triton", "reference"; default: by
    device, or the ``REGKERN_BACKEND`` variable) forces a kernel backend.
    """

    def __init__(self, params, lr: float | Tensor = 1e-3, lam: float = 0.0, group: bool = False, *,
                 maximize: bool = False, backend: Optional[str] = None) -> None:
        _check_options(lr, lam, group)
        defaults = dict(lr=lr, lam=lam, group=group, maximize=maximize)
        self.backend = backend
        self._plans: Dict[int, _GroupPlan] = {}
        super().__init__(params, defaults)
        self.state = TrackedState(self.state)
        # GradScaler hands us grad_scale / found_inf instead of unscaling itself.
        self._step_supports_amp_scaling = True

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_options(group["lr"], group["lam"], group["group"])
        except ValueError:
            self.param_groups.pop()
            raise

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("backend", None)
        self.state = TrackedState(self.state)  # load_state_dict hands back a plain dict
        self._plans = {}

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
        for group, (cached, grads) in zip(self.param_groups, prepared):
            if not cached.params:
                continue
            cached.plan.run(grads, cached.next_steps(), gamma=_gamma(group["lr"]), lams=float(group["lam"]),
                            maximize=group["maximize"], grad_scale=grad_scale)
            cached.commit(self.state)
        return loss

    def _prepare(self, index: int, group: Dict[str, Any]):
        """The group's plan and checked local gradients (see regkern.SGD)."""
        _check_options(group["lr"], group["lam"], group["group"], f" in param group {index}")
        return prepare_group(self._plans, index, group["params"],
                             lambda cached, ps: cached.fits(ps, group["group"], self.state.clock.value, self.backend),
                             lambda ps: _GroupPlan(self, group, ps))

    def state_dict(self) -> Dict[str, Any]:
        return plain_state(super().state_dict())

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        load_keeping_dtypes(self, state_dict, FIXED_DTYPE_STATE, super().load_state_dict, _restore)


class _GroupPlan:
    """A param group's RDAPlan with what it was built from: the parameters
    that had gradients, their storage, the row/element choice and the state
    clock. State for parameters stepped for the first time (step 0, gbar 0,
    w0 = W) is created here and saved only after the step ran.

    The group's step counts live in one fp32 CPU tensor ``counts``: each
    ``state[p]["step"]`` is a 0-d view of its element (still a float32 CPU
    tensor, written in place like torch's), so a step reads and advances all
    of them with one numpy operation each."""

    def __init__(self, optimizer: RDA, group: Dict[str, Any], params) -> None:
        states = [optimizer.state[p] for p in params]
        self.firsts = [st.get("step") is None for st in states]
        self.new_state = {}
        for p, st, first in zip(params, states, self.firsts):
            if first:
                dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
                self.new_state[p] = {
                    "step": torch.tensor(0.0, dtype=torch.float32),
                    "gbar": torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format),
                    "w0": p.detach().to(dtype=dtype, memory_format=torch.contiguous_format, copy=True),
                }

        def entry(p, st, name):
            return self.new_state[p][name] if p in self.new_state else st.get(name)

        self.params = list(params)
        steps = [entry(p, st, "step") for p, st in zip(params, states)]
        gbars = [entry(p, st, "gbar") for p, st in zip(params, states)]
        w0s = [entry(p, st, "w0") for p, st in zip(params, states)]
        for i, (p, s) in enumerate(zip(params, steps)):
            if not isinstance(s, Tensor) or s.dim() != 0 or s.device.type != "cpu":
                raise ValueError(f"parameter {i} of its group has a step count of {s!r}; it must be a 0-d CPU tensor such as torch.tensor(10.0)")
        self.group = group["group"]
        self.sharded = any(is_dtensor(p) for p in params)
        self.pointers = self._pointers(params)
        self.backend = optimizer.backend
        self.plan = RDAPlan([local_tensor(p) for p in params], [local_tensor(g) for g in gbars],
                            [local_tensor(w) for w in w0s], [local_tensor(st.get("mask")) for st in states],
                            self.group, optimizer.backend)
        # Everything is checked: now the step counts may move into one tensor.
        self.counts, views = _shared_counts(steps)
        for p, st, view in zip(params, states, views):
            if p in self.new_state:
                self.new_state[p]["step"] = view
            elif st["step"] is not view:
                dict.__setitem__(st, "step", view)  # same value, same plan: the clock stays
        self.count_values = self.counts.numpy()  # a view
        self.clock = optimizer.state.clock.value

    def _pointers(self, params):
        return [local_tensor(p).data_ptr() for p in params] if self.sharded else list(map(Tensor.data_ptr, params))

    def fits(self, params, group: bool, clock: int, backend) -> bool:
        return (clock == self.clock and backend == self.backend and group == self.group
                and len(params) == len(self.params) and not any(self.firsts)
                and all(map(operator.is_, params, self.params)) and self._pointers(params) == self.pointers)

    def next_steps(self) -> np.ndarray:
        """The step t each parameter is about to take (float64)."""
        t = self.count_values.astype(np.float64)
        t += 1.0
        return t

    def commit(self, state) -> None:
        """Count the step and keep the state of first-stepped parameters."""
        self.count_values += 1.0
        for p, entries in self.new_state.items():
            state[p].update(entries)
        self.new_state = {}


def _shared_counts(steps):
    """``(counts, views)``: an fp32 vector holding the step counts ``steps``
    (0-d CPU tensors) and its elements as 0-d views. When ``steps`` already
    are the elements of one such vector, in order, that vector and ``steps``."""
    base = steps[0]._base if steps else None
    if (base is not None and base.dtype == torch.float32 and base.dim() == 1 and base.is_contiguous()
            and base.numel() == len(steps)
            and all(s._base is base and s.storage_offset() == base.storage_offset() + i
                    for i, s in enumerate(steps))):
        return base, steps
    counts = torch.tensor([float(s) for s in steps], dtype=torch.float32)
    return counts, counts.unbind()


def _restore(name: str, value, param):
    """Fixed-dtype state as saved: ``step`` a 0-d fp32 CPU tensor, the rest on the parameter's device."""
    if name == "step":
        return torch.as_tensor(value, dtype=torch.float32, device="cpu").reshape(()).clone()
    return value.to(device=param.device).clone()
