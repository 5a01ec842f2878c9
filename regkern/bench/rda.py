"""Benchmark table of ``regkern.RDA`` (``python -m regkern bench --regularizers rda``).

L1 regularized dual averaging (docs/rda.md), element variant: at step ``t``::

    gbar = gbar * (t - 1) / t + g / t
    W    = S_tau(W0 - (sqrt(t) / gamma) * gbar),   tau = lam * sqrt(t) / gamma

with ``gamma = 1 / RDA_LR``, ``lam = RDA_LAM`` on the conv/linear weights and
``lam = 0`` (plain dual averaging) on every other parameter, in every row.
``gbar`` and ``W0`` are fp32, W is rounded once to its dtype. Rows:

- ``regkern``: ``regkern.RDA`` with two groups (the weights with ``lam``, the
  rest with ``lam = 0``);
- ``a``: the same math as separate torch ops per tensor (a user's loop);
- ``c``: ``torch.compile`` of that math over the tensor lists;
- ``floor``, ``floor-rmw``: RDA's own bytes (read W0, gbar, grad; write gbar,
  W: W itself is not read) at copy and ``x += y`` bandwidth.

There is no SGD row: RDA does other work than an SGD step.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor

from regkern.bench.harness import (Case, Context, Prepared, RegularizerCase, Unavailable, backend_note, memory_floor,
                                   memory_floor_in_place, prepare_compiled, row, suite)

RDA_LR = 0.1      # lr = 1 / gamma
RDA_LAM = 1e-4    # L1 strength on the conv/linear weights (0 on the rest)
DEFAULT_SHAPES = ("resnet56", "resnet50")  # as the other regularizers' tables


class RDACase(RegularizerCase):
    """The shape set as the RDA table sees it; fused-step bytes are RDA's own."""

    def _state_numel(self) -> int:
        return sum(w.numel() for w in self.weights)

    @property
    def floor_bytes(self) -> int:
        """Read W0 (fp32), gbar (fp32), grad; write gbar (fp32), W."""
        return sum(w.numel() * (12 + 2 * w.element_size()) for w in self.weights)

    @property
    def working_set_bytes(self) -> int:
        """W, grad, gbar, W0."""
        return sum(w.numel() * (8 + 2 * w.element_size()) for w in self.weights)


def _case(case: Case) -> Optional[Case]:
    if not case.reg:
        return None
    return RDACase(case, "rda", f"RDA(lr={RDA_LR:g}, lam={RDA_LAM:g}, element), lam=0 on the rest",
                   list(case.reg), "conv/linear weights", 0)


suite("rda", "L1 regularized dual averaging (RDA, element) on conv/linear weights, lam=0 on the rest",
      _case, DEFAULT_SHAPES)


def _lams(case: Case) -> List[float]:
    chosen = set(case.reg)
    return [RDA_LAM if i in chosen else 0.0 for i in range(len(case.weights))]


@row("regkern", "regkern.RDA (fused)", per_backend=True, regularizer="rda")
def regkern_rda(case: Case, ctx: Context) -> Prepared:
    try:
        import regkern
        rda_class = regkern.RDA
    except (ImportError, AttributeError) as e:
        raise Unavailable(f"regkern.RDA not importable ({e})") from None
    params = case.fresh_params()
    groups = [{"params": [params[i] for i in case.reg], "lam": RDA_LAM}]
    if case.plain:
        groups.append({"params": [params[i] for i in case.plain], "lam": 0.0})
    opt = rda_class(groups, lr=RDA_LR, group=False, backend=ctx.backend)
    opt.step()  # first step creates the state (W0 = W); the note can then say where tensors went
    return Prepared(step=opt.step, note=backend_note(case, ctx, opt, []), keep=(params, opt))


def _rda_state(params: List[Tensor]):
    gbars = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    w0s = [p.detach().float().clone() for p in params]
    return gbars, w0s


@row("a", "(a) RDA as torch ops per tensor", regularizer="rda")
def loop_rda(case: Case, ctx: Context) -> Prepared:
    params = case.fresh_params()
    gbars, w0s = _rda_state(params)
    items = list(zip(params, gbars, w0s, _lams(case)))
    counter = [0]

    @torch.no_grad()
    def step() -> None:
        counter[0] += 1
        t = counter[0]
        scale = math.sqrt(t) * RDA_LR  # sqrt(t) / gamma
        for p, gbar, w0, lam in items:
            gbar.mul_((t - 1) / t).add_(p.grad.float(), alpha=1 / t)
            v = w0 - scale * gbar
            if lam:
                v = v.sign() * (v.abs() - lam * scale).clamp_min(0)
            p.copy_(v)
    return Prepared(step=step, keep=(params, gbars, w0s))


def rda_step_math(params: List[Tensor], grads: List[Tensor], bufs: List[Tensor], state: tuple,
                  lr: float, momentum: float, weight_decay: float) -> None:
    """The RDA step in plain torch ops, fp32 math, for ``torch.compile``.
    ``state = (gbars, w0s, lams, t)``: ``t`` a 0-d fp32 tensor counting steps
    (a tensor, so that the compiled graph does not specialize on it); ``bufs``,
    ``lr``, ``momentum`` and ``weight_decay`` (``prepare_compiled``'s SGD
    arguments) are unused: the step size is ``RDA_LR``."""
    gbars, w0s, lams, t = state
    t.add_(1)
    scale = t.sqrt() * RDA_LR
    for w, g, gbar, w0, lam in zip(params, grads, gbars, w0s, lams):
        gb = gbar * ((t - 1) / t) + g.float() / t
        gbar.copy_(gb)
        v = w0 - scale * gb
        if lam:
            v = v.sign() * (v.abs() - lam * scale).clamp_min(0)
        w.copy_(v)


@row("c", "(c) torch.compile RDA step", regularizer="rda")
def compiled_rda(case: Case, ctx: Context) -> Prepared:
    gbars = [torch.zeros_like(w, dtype=torch.float32) for w in case.weights]
    w0s = [w.float().clone() for w in case.weights]
    t = torch.zeros((), dtype=torch.float32, device=case.device)
    return prepare_compiled(case, ctx, rda_step_math, (gbars, w0s, _lams(case), t))


row("floor", "(e) memory floor, copy", regularizer="rda")(memory_floor)
row("floor-rmw", "(e2) memory floor, x += y", regularizer="rda")(memory_floor_in_place)
