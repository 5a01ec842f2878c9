"""Dispatch of the `adam` kernel family (regkern.Adam / regkern.AdamW).

The family is the sgd family's plan with another update rule: the same
metadata table (``regkern.layouts.ADAM_FIELDS``: the sgd columns, then the
moments and the step count), the same regularizer terms, checks, routing of
slower tensors to the reference and per-step gradient patching
(``regkern.backends.sgd.SGDPlan``). The math is ``regkern.reference.adam``
(docs/adam.md).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from regkern.backends.dispatch import _describe
from regkern.backends.sgd import SGDPlan, _ptr, build_sgd_table
from regkern.layouts import ADAM_FIELDS, SGD_FIELDS
from regkern.reference.adam import adam_step as reference_adam_step

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def build_adam_table(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lams, masks, norms,
                     **terms) -> Tensor:
    """The int64 ``[T, len(ADAM_FIELDS)]`` table of the `adam` family (on the
    CPU): the sgd table of the same tensors and terms (no momentum buffer) with
    the moment and step pointers after it (``max_exp_avg_sqs`` entries None
    without amsgrad)."""
    count = len(params)
    head = build_sgd_table(params, grads, [None] * count, lams, masks, norms, [False] * count, **terms)
    tail = torch.tensor([[_ptr(m), _ptr(v), _ptr(vmax), _ptr(step)]
                         for m, v, vmax, step in zip(exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)],
                        dtype=torch.int64).reshape(count, len(ADAM_FIELDS) - len(SGD_FIELDS))
    return torch.cat([head, tail], dim=1)


def check_adam_state(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps) -> None:
    """Raise ``ValueError`` (one sentence) on moments or step counts the step cannot take."""
    for i, (w, m, v, vmax, step) in enumerate(zip(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)):
        for name, t in (("exp_avg", m), ("exp_avg_sq", v), ("max_exp_avg_sq", vmax)):
            if t is None and name == "max_exp_avg_sq":
                continue
            if t is None or t.shape != w.shape or t.dtype != w.dtype or t.device != w.device:
                got = "nothing" if t is None else _describe(t)
                raise ValueError(f"parameter {i} ({_describe(w)}) has state['{name}'] of {got}; it must match the parameter")
        if not isinstance(step, Tensor) or step.shape != () or step.dtype != torch.float32 or step.device != w.device:
            got = _describe(step) if isinstance(step, Tensor) else repr(step)
            raise ValueError(f"parameter {i} ({_describe(w)}) has state['step'] of {got}; it must be a float32 0-d tensor on {w.device}")


class AdamPlan(SGDPlan):
    """The validated, static part of an ``adam`` step over tensors on one
    device (see ``SGDPlan``): ``exp_avgs``, ``exp_avg_sqs`` (and with amsgrad
    ``max_exp_avg_sqs``) are the moments, ``steps`` the fp32 0-d step counts
    the step advances; ``lams``, ``masks``, ``norms`` and ``terms`` as for
    ``SGDPlan``."""

    family = "adam"

    def __init__(self, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lams=None, masks=None, norms=None,
                 backend=None, warn=None, **terms):
        count = len(params)
        max_exp_avg_sqs = list(max_exp_avg_sqs) if max_exp_avg_sqs is not None else [None] * count
        if not all(len(x) == count for x in (exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)):
            raise ValueError("params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs and steps must have one entry per parameter")
        check_adam_state(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
        self.moments = list(zip(exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps))
        self.amsgrad = all(vmax is not None for vmax in max_exp_avg_sqs) and count > 0
        super().__init__(params, None, lams, masks, norms, backend, warn, **terms)

    def _check_args(self, momentum: float) -> tuple:
        return (self.amsgrad,)

    def _state_tensors(self, i: int) -> tuple:
        return tuple(self.moments[i][:3])

    def _table(self, index: List[int]) -> Tensor:
        pick = lambda values: [values[i] for i in index]  # noqa: E731
        cols = pick(self.columns)
        moments = pick(self.moments)
        return build_adam_table([c[0] for c in cols], [c[0] for c in cols], [m[0] for m in moments],
                                [m[1] for m in moments], [m[2] for m in moments], [m[3] for m in moments],
                                [c[2] for c in cols], [c[3] for c in cols], [c[4] for c in cols],
                                **{k: pick(v) for k, v in self.terms.items()})

    def run(self, grads: Sequence[Tensor], *, lr, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
            weight_decay: float = 0.0, decay: float = 0.0, amsgrad: bool = False, maximize: bool = False,
            coupled: bool = False, grad_scale: Optional[Tensor] = None,
            found_inf: Optional[Tensor] = None) -> None:
        """Apply the step with gradients from ``checked_grads``."""
        if amsgrad and not self.amsgrad:
            raise ValueError("amsgrad needs a max_exp_avg_sq for every parameter; build the plan with max_exp_avg_sqs")
        if not self.params or self.backend.skips(found_inf):  # (no tensors: nothing to read)
            return
        options = dict(beta1=float(beta1), beta2=float(beta2), eps=float(eps), weight_decay=float(weight_decay),
                       decay=float(decay), amsgrad=bool(amsgrad), maximize=bool(maximize), coupled=bool(coupled))
        for launch in self.launches:  # first: a kernel refuses its table before writing anything
            launch.patch_grads(grads, self.grad_column)
            self.backend.run(self.family, launch, lr=lr, **options, grad_scale=grad_scale, found_inf=found_inf)
        if self.slow_index:
            pick = lambda values: [values[i] for i in self.slow_index]  # noqa: E731
            cols = pick(self.columns)
            moments = pick(self.moments)
            reference_adam_step([c[0] for c in cols], pick(grads), [m[0] for m in moments], [m[1] for m in moments],
                                [m[2] for m in moments], [m[3] for m in moments], lr=lr,
                                lams=[c[2] for c in cols], masks=[c[3] for c in cols], norms=[c[4] for c in cols],
                                grad_scale=grad_scale, found_inf=found_inf,
                                **{k: pick(v) for k, v in self.terms.items()}, **options)


def adam_step(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *,
              lr, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
              decay: float = 0.0, amsgrad: bool = False, maximize: bool = False, coupled: bool = False,
              lams=None, masks=None, norms=None, grad_scale: Optional[Tensor] = None,
              found_inf: Optional[Tensor] = None, backend: Optional[str] = None, **terms) -> None:
    """Functional fused step: same contract as ``regkern.reference.adam_step``,
    on the backend chosen for the tensors' device."""
    plan = AdamPlan(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None, steps, lams, masks, norms,
                    backend, **terms)
    plan.run(plan.checked_grads(grads), lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
             decay=decay, amsgrad=amsgrad, maximize=maximize, coupled=coupled, grad_scale=grad_scale,
             found_inf=found_inf)
