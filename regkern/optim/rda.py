"""``regkern.RDA``: L1 regularized dual averaging (docs/rda.md) as a drop-in optimizer."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import Tensor

from regkern.backends.rda import RDAPlan
from regkern.optim.fused import FusedOptimizer, check_number, group_states
from regkern.optim.plan_cache import CachedPlan, prepare_group
from regkern.sharding import local_tensor
from regkern.terms import fixed_dtype_state

# Optimizer-state entries whose dtype does not follow the parameter's (fp32
# gbar / w0 of a bf16 parameter, the bool mask, the fp32 step; regkern.terms):
# torch's load_state_dict would cast them, so they are restored as saved.
FIXED_DTYPE_STATE = ("mask",) + fixed_dtype_state("rda", regularized=False)


def _gamma(lr) -> float:
    """gamma = 1 / lr (lr = 0: gamma = inf, W stays at W0)."""
    lr = float(lr)
    return math.inf if lr == 0 else 1.0 / lr


def _check_options(group: Dict[str, Any], where: str = "") -> None:
    check_number(group["lr"], "learning rate", where, what="; RDA's lr is 1 / gamma")
    check_number(group["lam"], "lam", where, what="; it is the L1 strength")
    if not isinstance(group["group"], bool):
        raise ValueError(f"Invalid group value: {group['group']!r}{where}; it must be True (shrink whole rows) or False (elements)")
    if not isinstance(group["maximize"], bool):
        raise ValueError(f"Invalid maximize value: {group['maximize']!r}{where}; it must be True or False")


class RDA(FusedOptimizer):
    r"""L1 regularized dual averaging (Xiao 2010) with the proximal centre at
    the initial weights (He et al., "Make L1 regularization effective in
    training sparse CNN", arXiv 1807.04222), fused into one pass over memory.

    For each parameter with a gradient, at its step ``t`` (1 at its first
    step), with ``gamma = 1 / lr`` (docs/rda.md)::

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

    fixed_dtype_state = FIXED_DTYPE_STATE
    legacy_options = dict(maximize=False)

    def __init__(self, params, lr: float | Tensor = 1e-3, lam: float = 0.0, group: bool = False, *,
                 maximize: bool = False, backend: Optional[str] = None) -> None:
        defaults = dict(lr=lr, lam=lam, group=group, maximize=maximize)
        _check_options(defaults)
        super().__init__(params, defaults, backend)

    def _check_group(self, group: Dict[str, Any], where: str) -> None:
        _check_options(group, where)

    def _prepare(self, index: int, group: Dict[str, Any]):
        """The group's plan and checked local gradients (see regkern.SGD)."""
        return prepare_group(self._plans, index, group["params"],
                             lambda cached, ps: cached.fits(ps, group["group"], self.state.clock.value, self.backend),
                             lambda ps: _GroupPlan(self, group, ps))

    def _apply(self, prepared: List[Any], grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        for group, (cached, grads) in zip(self.param_groups, prepared):
            if not cached.params:
                continue
            cached.plan.run(grads, cached.next_steps(), gamma=_gamma(group["lr"]), lams=float(group["lam"]),
                            maximize=group["maximize"], grad_scale=grad_scale)
            cached.mark_written()
            cached.commit(self.state)

    def _restore(self, name: str, value, param):
        """Fixed-dtype state as saved: ``step`` a 0-d fp32 CPU tensor, the rest on the parameter's device."""
        if name == "step":
            return torch.as_tensor(value, dtype=torch.float32, device="cpu").reshape(()).clone()
        return super()._restore(name, value, param)


class _GroupPlan(CachedPlan):
    """A param group's RDAPlan with what it was built from: the parameters
    that had gradients, their storage, the row/element choice and the state
    clock. State for parameters stepped for the first time (step 0, gbar 0,
    w0 = W) is created here and saved only after the step ran.

    The group's step counts live in one fp32 CPU tensor ``counts``: each
    ``state[p]["step"]`` is a 0-d view of its element (still a float32 CPU
    tensor, written in place like torch's), so a step reads and advances all
    of them with one numpy operation each."""

    def __init__(self, optimizer: RDA, group: Dict[str, Any], params) -> None:
        states = group_states(optimizer, params)
        self.firsts = [st.get("step") is None for st in states]
        self.new_state = {}
        for p, st, first in zip(params, states, self.firsts):
            if first:
                dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
                self.new_state[p] = {
                    "step": torch.tensor(0.0, dtype=torch.float32),
                    # laid out like the parameter (e.g. channels_last), which the kernels read in memory order
                    "gbar": torch.zeros_like(p, dtype=dtype),
                    "w0": p.detach().to(dtype=dtype, copy=True),
                }

        def entry(p, st, name):
            return self.new_state[p][name] if p in self.new_state else st.get(name)

        self._remember(optimizer, params)
        steps = [entry(p, st, "step") for p, st in zip(params, states)]
        gbars = [entry(p, st, "gbar") for p, st in zip(params, states)]
        w0s = [entry(p, st, "w0") for p, st in zip(params, states)]
        for i, (p, s) in enumerate(zip(params, steps)):
            if not isinstance(s, Tensor) or s.dim() != 0 or s.device.type != "cpu":
                raise ValueError(f"parameter {i} of its group has a step count of {s!r}; it must be a 0-d CPU tensor such as torch.tensor(10.0)")
        self.group = group["group"]
        self.plan = RDAPlan([local_tensor(p) for p in params], [local_tensor(g) for g in gbars],
                            [local_tensor(w) for w in w0s], [local_tensor(st.get("mask")) for st in states],
                            self.group, optimizer.backend, warn=lambda i, why: optimizer.warn_once(params[i], why))
        # Everything is checked: now the step counts may move into one tensor.
        self.counts, views = _shared_counts(steps)
        for p, st, view in zip(params, states, views):
            if p in self.new_state:
                self.new_state[p]["step"] = view
            elif st["step"] is not view:
                dict.__setitem__(st, "step", view)  # same value, same plan: the clock stays
        self.count_values = self.counts.numpy()  # a view
        self.clock = optimizer.state.clock.value  # after the step counts moved

    def fits(self, params, group: bool, clock: int, backend) -> bool:
        return group == self.group and not any(self.firsts) and self.same_inputs(params, clock, backend)

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

