"""The ``rowl2`` table of ``python -m regkern bench``: the fused GReg SGD step
against plain PyTorch.

For each shape set (see ``shapes.py``), the parameters of a real network with
random gradients and per-row lambdas, one optimizer step per row:

- ``regkern``: ``regkern.SGD`` with ``RowL2`` on every conv/linear weight;
- ``a``: the official GReg loop ``grad += lam[:, None, ...] * W``, then
  ``torch.optim.SGD(foreach=True)``; ``b``: the same loop, ``fused=True``;
- ``c``: ``torch.compile`` of the whole GReg step over the tensor lists;
- ``d``: ``torch.optim.SGD(fused=True)`` without the regularizer;
- ``floor``: the bytes the regkern step must move (read W, grad, buf, lam;
  write W, buf) at the bandwidth of ``dst.copy_(src)`` measured in the same
  run; ``floor-rmw``: the same bytes at the bandwidth of an in-place
  ``x += y``, which, like the step, writes lines it has just read (a copy
  into another buffer pays for write-allocate, so on CPUs it can be slower
  per byte than the step itself).

The timing, the registries and the runner are in ``harness.py``; the other
tables in ``regularizers.py`` (ProxL1, GroupLasso, L1, Polarization, ADMM),
``rda.py`` (the RDA optimizer) and ``adam.py`` (AdamW with RowL2).
"""
from __future__ import annotations

import contextlib
from typing import List, Optional

import torch
from torch import Tensor

from regkern.bench.harness import (LR, MOMENTUM, WEIGHT_DECAY, Case, Context, Prepared, Unavailable, greg_loop,
                                   memory_floor, memory_floor_in_place, prepare_compiled, row, sgd_fused, suite)

suite("rowl2", "per-row L2 penalty (GReg) on conv/linear weights")


@row("regkern", "regkern.SGD + RowL2 (fused)", per_backend=True)
def regkern_sgd(case: Case, ctx: Context) -> Prepared:
    try:
        import regkern
        sgd, row_l2 = regkern.SGD, regkern.RowL2
    except (ImportError, AttributeError) as e:
        raise Unavailable(f"regkern.SGD not importable ({e})") from None
    params = case.fresh_params()
    groups = [{"params": [params[i] for i in case.reg], "regularizer": row_l2()}]
    if case.plain:
        groups.append({"params": [params[i] for i in case.plain]})
    opt = sgd(groups, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, backend=ctx.backend)
    for i in case.reg:
        opt.state[params[i]]["lam"].copy_(case.lams[i])
    note = ""
    with contextlib.suppress(Exception):  # which kernel actually ran (auto picks by device)
        from regkern.backends.backend import choose_backend
        note = f"backend {choose_backend(case.device, ctx.backend)}"
    return Prepared(step=opt.step, note=note, keep=(params, opt))


def _loop_then(fused: bool):
    def prepare(case: Case, ctx: Context) -> Prepared:
        params = case.fresh_params()
        flag = {"fused": True} if fused else {"foreach": True}
        opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, **flag)
        add_penalty = greg_loop(case, params)

        def step() -> None:
            add_penalty()
            opt.step()
        return Prepared(step=step, keep=(params, opt))
    return prepare


loop_foreach = row("a", "(a) loop grad+=lam*W, SGD foreach")(_loop_then(fused=False))
loop_fused = row("b", "(b) loop grad+=lam*W, SGD fused")(_loop_then(fused=True))


def greg_step_math(params: List[Tensor], grads: List[Tensor], bufs: List[Tensor],
                   lams: List[Optional[Tensor]], lr: float, momentum: float, weight_decay: float) -> None:
    """The whole GReg step in plain torch ops (fp32 math), for ``torch.compile``."""
    for w, g, buf, lam in zip(params, grads, bufs, lams):
        w32 = w.float()
        d = g.float() + weight_decay * w32
        if lam is not None:
            d = d + lam * w32
        b = momentum * buf.float() + d
        buf.copy_(b)
        w.copy_(w32 - lr * b)


@row("c", "(c) torch.compile GReg step")
def compiled_step(case: Case, ctx: Context) -> Prepared:
    return prepare_compiled(case, ctx, greg_step_math, case.lam_views())


torch_fused = row("d", "(d) SGD fused, no regularizer")(sgd_fused)
row("floor", "(e) memory floor, copy")(memory_floor)
row("floor-rmw", "(e2) memory floor, x += y")(memory_floor_in_place)
