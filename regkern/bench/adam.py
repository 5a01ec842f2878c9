"""Benchmark table of ``regkern.AdamW`` with ``RowL2`` (``python -m regkern bench --regularizers adam``).

One AdamW step (docs/adam.md) with torch's defaults ``lr = 1e-3``, ``betas =
(0.9, 0.999)``, ``eps = 1e-8``, ``weight_decay = 1e-2`` on every parameter,
and, on the conv/linear weights, the per-row lambdas of the ``rowl2`` table
(``Case.lams``, fp32, in [1e-5, 1e-3]). Moments are in the parameter's dtype,
as torch keeps them. Rows, each from copies of the same tensors:

- ``regkern``: ``regkern.AdamW`` with ``RowL2`` (default ``coupling="decoupled"``:
  ``W -= lr * lam[r] * W`` beside the adaptive update) on the conv/linear
  weights, the rest in a plain group; the baseline of the ratios;
- ``regkern-coupled``: the same with ``coupling="coupled"`` (``lam * W`` added
  to the gradient before the moments: the math of rows a, b and c);
- ``regkern-noreg``: ``regkern.AdamW`` without a regularizer;
- ``a``: the official-style loop ``grad += lam[:, None, ...] * W`` then
  ``torch.optim.AdamW(foreach=True)``; ``b``: the same loop, ``fused=True``;
- ``c``: ``torch.compile`` of the same math (the loop and the AdamW update as
  torch ops over the tensor lists, fp32 math, step count a 0-d tensor);
- ``d``: ``torch.optim.AdamW(fused=True)`` without a regularizer;
- ``floor``, ``floor-rmw``: the bytes of the fused step (read W, grad, m, v and
  the fp32 lam rows; write W, m, v: 28 bytes per fp32 element, 14 in bf16) at
  the bandwidth of a copy and of an in-place ``x += y`` measured in the same run.

The decoupled baseline and rows a-c apply the penalty differently (beside the
update, or through the moments) but move the same bytes and do the same
amount of work per element; ``regkern-coupled`` is the like-for-like row.
Default shape sets: resnet56, resnet50 and the 16M tensor.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from regkern.bench.harness import (Case, Context, Prepared, RegularizerCase, Unavailable, backend_note, greg_loop,
                                   memory_floor, memory_floor_in_place, prepare_compiled, row, suite)

ADAM_LR = 1e-3
BETAS = (0.9, 0.999)
EPS = 1e-8
ADAM_WD = 1e-2                     # torch.optim.AdamW's default
DEFAULT_SHAPES = ("resnet56", "resnet50", "tensor16m")
HYPER = dict(lr=ADAM_LR, betas=BETAS, eps=EPS, weight_decay=ADAM_WD)


class AdamCase(RegularizerCase):
    """The shape set as the AdamW table sees it: the ``rowl2`` lambdas on the
    conv/linear weights, fused-step bytes of an Adam step."""

    @property
    def floor_bytes(self) -> int:
        """Read W, grad, m, v; write W, m, v (all in the parameter's dtype); read lam (fp32 rows)."""
        return 7 * sum(w.numel() * w.element_size() for w in self.weights) + self.extra_bytes

    @property
    def working_set_bytes(self) -> int:
        """W, grad, m, v."""
        return 4 * sum(w.numel() * w.element_size() for w in self.weights)


def _case(case: Case) -> Optional[Case]:
    if not case.reg:
        return None
    what = (f"AdamW(lr={ADAM_LR:g}, betas={BETAS}, eps={EPS:g}, wd={ADAM_WD:g}) + RowL2 "
            "(per-row lam in [1e-5, 1e-3])")
    lam_bytes = 4 * sum(case.weights[i].shape[0] for i in case.reg)
    return AdamCase(case, "adam", what, list(case.reg), "conv/linear weights", lam_bytes)


suite("adam", "AdamW with per-row L2 (RowL2, decoupled) on conv/linear weights", _case, DEFAULT_SHAPES)


# --------------------------------------------------------------------------- regkern rows

def _regkern_adamw(regularized: bool, coupling: str = "decoupled"):
    def prepare(case: Case, ctx: Context) -> Prepared:
        try:
            import regkern
            adamw, row_l2 = regkern.AdamW, regkern.RowL2
        except (ImportError, AttributeError) as e:
            raise Unavailable(f"regkern.AdamW not importable ({e})") from None
        params = case.fresh_params()
        if regularized:
            groups = [{"params": [params[i] for i in case.reg], "regularizer": row_l2(), "coupling": coupling}]
            if case.plain:
                groups.append({"params": [params[i] for i in case.plain]})
        else:
            groups = [{"params": params}]
        opt = adamw(groups, **HYPER, backend=ctx.backend)
        if regularized:
            for i in case.reg:
                opt.state[params[i]]["lam"].copy_(case.lams[i])
        try:
            opt.step()  # creates the moments; the note can then say where the tensors went
        except AttributeError as e:  # regkern._C built without the adam family
            raise Unavailable(f"C++ Adam kernel missing ({e}); try --backend reference") from None
        return Prepared(step=opt.step, note=backend_note(case, ctx, opt, []), keep=(params, opt))
    return prepare


regkern_adamw = row("regkern", "regkern.AdamW + RowL2 (fused, decoupled)", per_backend=True,
                    regularizer="adam")(_regkern_adamw(True))
regkern_adamw_coupled = row("regkern-coupled", "regkern.AdamW + RowL2 (fused, coupled)", per_backend=True,
                            regularizer="adam")(_regkern_adamw(True, "coupled"))
regkern_adamw_plain = row("regkern-noreg", "regkern.AdamW, no regularizer", per_backend=True,
                          regularizer="adam")(_regkern_adamw(False))


# --------------------------------------------------------------------------- torch rows

def _loop_then(fused: bool):
    def prepare(case: Case, ctx: Context) -> Prepared:
        params = case.fresh_params()
        flag = {"fused": True} if fused else {"foreach": True}
        opt = torch.optim.AdamW(params, **HYPER, **flag)
        add_penalty = greg_loop(case, params)

        def step() -> None:
            add_penalty()
            opt.step()
        step()  # creates the moments
        return Prepared(step=step, keep=(params, opt))
    return prepare


loop_foreach = row("a", "(a) loop grad+=lam*W, AdamW foreach", regularizer="adam")(_loop_then(fused=False))
loop_fused = row("b", "(b) loop grad+=lam*W, AdamW fused", regularizer="adam")(_loop_then(fused=True))


def adamw_step_math(params: List[Tensor], grads: List[Tensor], bufs: List[Tensor], state: tuple,
                    lr: float, momentum: float, weight_decay: float) -> None:
    """The GReg loop and the AdamW step in plain torch ops, fp32 math, for
    ``torch.compile``: ``h = g + lam * W``, ``W *= 1 - lr * wd``, the moments
    and the bias-corrected update of torch's AdamW. ``bufs`` (zeros in W's
    dtype) are the first moments; ``state = (exp_avg_sqs, lams, t)`` with ``t``
    a 0-d fp32 tensor counting steps (a tensor, so that the graph does not
    specialize on it). ``lr``, ``momentum`` and ``weight_decay``
    (``prepare_compiled``'s SGD arguments) are unused: the step uses ``HYPER``."""
    exp_avg_sqs, lams, t = state
    beta1, beta2 = BETAS
    t.add_(1)
    step_size = ADAM_LR / (1 - torch.pow(beta1, t))
    bc2_sqrt = (1 - torch.pow(beta2, t)).sqrt()
    for w, g, m, v, lam in zip(params, grads, bufs, exp_avg_sqs, lams):
        w32 = w.float()
        h = g.float()
        if lam is not None:
            h = h + lam * w32
        w32 = w32 * (1 - ADAM_LR * ADAM_WD)
        m32 = m.float().lerp(h, 1 - beta1)
        v32 = v.float() * beta2 + (1 - beta2) * h * h
        m.copy_(m32)
        v.copy_(v32)
        w.copy_(w32 - step_size * m32 / (v32.sqrt() / bc2_sqrt + EPS))


@row("c", "(c) torch.compile loop + AdamW step", regularizer="adam")
def compiled_adamw(case: Case, ctx: Context) -> Prepared:
    exp_avg_sqs = [torch.zeros_like(w) for w in case.weights]
    t = torch.zeros((), dtype=torch.float32, device=case.device)
    return prepare_compiled(case, ctx, adamw_step_math, (exp_avg_sqs, case.lam_views(), t))


@row("d", "(d) AdamW fused, no regularizer", regularizer="adam")
def torch_fused(case: Case, ctx: Context) -> Prepared:
    params = case.fresh_params()
    opt = torch.optim.AdamW(params, **HYPER, fused=True)
    opt.step()  # creates the moments
    return Prepared(step=opt.step, keep=(params, opt))


row("floor", "(e) memory floor, copy", regularizer="adam")(memory_floor)
row("floor-rmw", "(e2) memory floor, x += y", regularizer="adam")(memory_floor_in_place)
