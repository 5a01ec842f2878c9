"""Benchmark tables of the regularizers beyond RowL2 (``python -m regkern bench
--regularizers ...``).

One table per regularizer and shape set, timed by the same runner as the GReg
table (``harness.run_case``). Every row starts from copies of the same master
tensors and does the same work: the regularized set below gets the
regularizer, every other parameter is in a plain group (plain SGD with
momentum and weight decay) in every row.

- ``prox-l1``, ``group-lasso`` (conv/linear weights, docs/regularizers.md): regkern
  ``ProxL1(lam)`` / ``GroupLasso(lam)`` against (a) ``torch.optim.SGD(foreach)``
  then the proximal map as separate torch ops per tensor, and (c)
  ``torch.compile`` of the same math (SGD step and proximal map);
- ``l1`` (BatchNorm scales, network slimming): regkern ``L1(lam)`` against
  (a) the official loop ``p.grad.add_(lam * torch.sign(p.data))`` then
  ``torch.optim.SGD(foreach)``;
- ``polarization`` (BatchNorm scales, docs/regularizers.md): regkern
  ``Polarization(lam, t, a)`` against (a) the official form: the regularizer
  as an autograd loss term over all BN scales concatenated (``backward`` adds
  its gradient), ``torch.optim.SGD(foreach)``, then ``p.data.clamp_(0, a)``
  per BN scale;
- ``admm`` (conv/linear weights, docs/admm.md, the W-step): regkern ``ADMM(rho)``
  against (a) ``grad += rho * (W - Z + U)`` per tensor then
  ``torch.optim.SGD(foreach)``;
- ``admm-zu`` (classic ADMM's Z/U update) and ``sas-admm`` (one SAS-ADMM
  step) are not SGD steps: their rows are described at the end of this file.

Each table also has (d) ``torch.optim.SGD(fused=True)`` without any
regularizer and the two memory floors, at the bytes the fused step of that
regularizer must move (``RegularizerCase.floor_bytes``). BatchNorm scales are
the ``bn_scale`` entries of the shape sets (``shapes.bn_scales``); they start
at 0.5 as in the official recipes. The regkern row's note says which backend
stepped which tensors: a term the fast kernel lacks
(``Backend.terms``, ``regkern.backends.backend``) sends those tensors to the pure-torch
reference.
"""
from __future__ import annotations

import math
import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

import regkern
from regkern.bench.harness import (LR, MOMENTUM, WEIGHT_DECAY, Alarm, Case, Context, Prepared, RegularizerCase,
                                   Unavailable, backend_note, memory_floor, memory_floor_in_place, prepare_compiled,
                                   row, sgd_fused, suite, synchronize)
from regkern.bench.shapes import bn_scales

# Settings (official defaults where there are some).
PROX_LAM = 1e-4                    # prox-SGD lambda: threshold lr * lam
L1_LAM = 1e-4                      # network slimming s (CIFAR and ImageNet)
POLAR = {"resnet50": (8e-5, 1.2)}  # (lam, t) per shape set; ResNet-56/CIFAR otherwise
POLAR_CIFAR, POLAR_A = (5e-5, 1.4), 1.0
ADMM_RHO = 1e-3


def _rows_bytes(case: Case, index: Sequence[int]) -> int:
    """An fp32 per-row vector for each tensor of ``index``."""
    return 4 * sum(case.weights[i].shape[0] for i in index)


def _bytes(case: Case, index: Sequence[int]) -> int:
    return sum(case.weights[i].numel() * case.weights[i].element_size() for i in index)


def _conv_linear(key: str, what: Callable[[Case], str], extra: Callable[[Case], int]):
    def make(case: Case) -> Optional[Case]:
        if not case.reg:
            return None
        return RegularizerCase(case, key, what(case), list(case.reg), "conv/linear weights", extra(case))
    return make


def _batchnorm(key: str, what: Callable[[Case], str], extra: Callable[[Case], int]):
    def make(case: Case) -> Optional[Case]:
        bn = bn_scales(case.shapes)
        if not bn:
            return None  # ViT (LayerNorm) and the single tensors have no BatchNorm scales
        return RegularizerCase(case, key, what(case), bn, "BatchNorm scales", extra(case), bn=True)
    return make


def polar_settings(case: Case) -> Tuple[float, float, float]:
    lam, t = POLAR.get(case.name, POLAR_CIFAR)
    return lam, t, POLAR_A


DEFAULT_SHAPES = ("resnet56", "resnet50")
suite("prox-l1", "proximal L1 on conv/linear weights",
      _conv_linear("prox-l1", lambda c: f"ProxL1(lam={PROX_LAM:g})", lambda c: _rows_bytes(c, c.reg)),
      DEFAULT_SHAPES)
suite("group-lasso", "group lasso (rows) on conv/linear weights",
      _conv_linear("group-lasso", lambda c: f"GroupLasso(lam={PROX_LAM:g})", lambda c: _rows_bytes(c, c.reg)),
      DEFAULT_SHAPES)
suite("l1", "L1 subgradient on BatchNorm scales (network slimming)",
      _batchnorm("l1", lambda c: f"L1(lam={L1_LAM:g})", lambda c: _rows_bytes(c, bn_scales(c.shapes))),
      DEFAULT_SHAPES)
suite("polarization", "polarization on BatchNorm scales, clamp [0, a]",
      # the mean and sign-mean reduction reads the set once more before the step
      _batchnorm("polarization", lambda c: "Polarization(lam={:g}, t={:g}, a={:g})".format(*polar_settings(c)),
                 lambda c: _bytes(c, bn_scales(c.shapes)) + 16),
      DEFAULT_SHAPES)
suite("admm", "ADMM W-step pull rho * (W - Z + U) on conv/linear weights",
      _conv_linear("admm", lambda c: f"ADMM(rho={ADMM_RHO:g})", lambda c: _bytes(c, c.reg)),  # reads Z - U
      DEFAULT_SHAPES)


# --------------------------------------------------------------------------- regkern rows

def _regkern(regularizer: Callable[[Case], object], terms: Sequence[str],
             setup: Callable[[Case, object, List[Tensor]], None] = lambda case, opt, params: None):
    """``regkern.SGD``: the regularized set with ``regularizer(case)``, the rest plain."""
    def prepare(case: Case, ctx: Context) -> Prepared:
        try:
            import regkern
            sgd_class = regkern.SGD
            reg = regularizer(case)
        except (ImportError, AttributeError) as e:
            raise Unavailable(f"regkern regularizer not importable ({e})") from None
        params = case.fresh_params()
        groups = [{"params": [params[i] for i in case.reg], "regularizer": reg}]
        if case.plain:
            groups.append({"params": [params[i] for i in case.plain]})
        opt = sgd_class(groups, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, backend=ctx.backend)
        setup(case, opt, params)
        opt.step()  # one extra warm-up step, so that the note can say where the tensors went
        return Prepared(step=opt.step, note=backend_note(case, ctx, opt, terms), keep=(params, opt))
    return prepare


def _admm_setup(case: Case, opt, params: List[Tensor]) -> None:
    """Z and U as the loop row sees them; regkern reads ``Z - U`` (``admm_target``)."""
    z, u = _admm_zu(case)
    for i in case.reg:
        state = opt.state[params[i]]
        state["admm_z"].copy_(z[i])
        state["admm_u"].copy_(u[i])
        state["admm_target"].copy_(z[i].float() - u[i].float())


def _admm_zu(case: Case):
    """ADMM's Z (W with its smallest half zeroed, as a projection leaves it) and U
    (small), in W's dtype, for the regularized tensors; made once per case."""
    if not hasattr(case, "_admm"):
        gen = torch.Generator().manual_seed(2)
        z, u = {}, {}
        for i in case.reg:
            w = case.weights[i].float()
            z[i] = torch.where(w.abs() >= w.abs().median(), w, torch.zeros_like(w)).to(case.weights[i])
            u[i] = (torch.randn(w.shape, generator=gen) * 1e-3).to(case.weights[i])
        case._admm = (z, u)
    return case._admm


row("regkern", "regkern.SGD + ProxL1 (fused)", per_backend=True, regularizer="prox-l1")(
    _regkern(lambda c: regkern.ProxL1(PROX_LAM), ["prox"]))
row("regkern", "regkern.SGD + GroupLasso (fused)", per_backend=True, regularizer="group-lasso")(
    _regkern(lambda c: regkern.GroupLasso(PROX_LAM), ["prox"]))
row("regkern", "regkern.SGD + L1 (fused)", per_backend=True, regularizer="l1")(
    _regkern(lambda c: regkern.L1(L1_LAM), ["l1"]))
row("regkern", "regkern.SGD + Polarization (fused)", per_backend=True, regularizer="polarization")(
    _regkern(lambda c: regkern.Polarization(*polar_settings(c)), ["polar", "clamp"]))
row("regkern", "regkern.SGD + ADMM (fused)", per_backend=True, regularizer="admm")(
    _regkern(lambda c: regkern.ADMM(ADMM_RHO), ["admm"], _admm_setup))


# --------------------------------------------------------------------------- what users run today

def _foreach_with(build: Callable[[Case, List[Tensor]], Tuple[Optional[Callable], Optional[Callable]]]):
    """``before(); torch.optim.SGD(foreach=True).step(); after()`` with
    ``(before, after) = build(case, params)``."""
    def prepare(case: Case, ctx: Context) -> Prepared:
        params = case.fresh_params()
        opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, foreach=True)
        before, after = build(case, params)

        def step() -> None:
            if before is not None:
                before()
            opt.step()
            if after is not None:
                after()
        return Prepared(step=step, keep=(params, opt))
    return prepare


def _prox_l1_ops(case: Case, params: List[Tensor]):
    weights, threshold = [params[i] for i in case.reg], LR * PROX_LAM

    @torch.no_grad()
    def prox() -> None:
        for p in weights:
            p.copy_(p.sign() * (p.abs() - threshold).clamp_min(0))
    return None, prox


def _group_lasso_ops(case: Case, params: List[Tensor]):
    weights = [(params[i], LR * PROX_LAM * math.sqrt(params[i][0].numel())) for i in case.reg]

    @torch.no_grad()
    def prox() -> None:
        for p, threshold in weights:
            norms = torch.linalg.vector_norm(p.flatten(1), dim=1)
            scale = (1 - threshold / norms).clamp_min(0)
            p.mul_(scale.view(-1, *([1] * (p.dim() - 1))))
    return None, prox


def _slimming_loop(case: Case, params: List[Tensor]):
    scales = [params[i] for i in case.reg]

    def add_l1() -> None:  # official network slimming updateBN()
        for p in scales:
            p.grad.data.add_(L1_LAM * torch.sign(p.data))
    return add_l1, None


def _polarization_official(case: Case, params: List[Tensor]):
    scales = [params[i] for i in case.reg]
    lam, t, a = polar_settings(case)

    def add_loss_gradient() -> None:  # the regularizer as a loss term; backward adds its gradient
        gamma = torch.cat([p.view(-1) for p in scales])
        loss = lam * (t * gamma.abs() - (gamma - gamma.mean()).abs()).sum()
        loss.backward()

    def clamp() -> None:  # official clamp after the step
        for p in scales:
            p.data.clamp_(0, a)
    return add_loss_gradient, clamp


def _admm_loop(case: Case, params: List[Tensor]):
    z, u = _admm_zu(case)
    triples = [(params[i], z[i], u[i]) for i in case.reg]

    def add_pull() -> None:
        for p, zi, ui in triples:
            p.grad.add_(ADMM_RHO * (p.data - zi + ui))
    return add_pull, None


row("a", "(a) SGD foreach, then prox L1 ops", regularizer="prox-l1")(_foreach_with(_prox_l1_ops))
row("a", "(a) SGD foreach, then group-lasso ops", regularizer="group-lasso")(_foreach_with(_group_lasso_ops))
row("a", "(a) loop grad+=lam*sign(W), SGD foreach", regularizer="l1")(_foreach_with(_slimming_loop))
row("a", "(a) loss term+backward, SGD foreach, clamp loop",
    regularizer="polarization")(_foreach_with(_polarization_official))
row("a", "(a) loop grad+=rho*(W-Z+U), SGD foreach", regularizer="admm")(_foreach_with(_admm_loop))


# --------------------------------------------------------------------------- torch.compile

def prox_l1_step_math(params: List[Tensor], grads: List[Tensor], bufs: List[Tensor],
                      thresholds: List[Optional[float]], lr: float, momentum: float, weight_decay: float) -> None:
    """SGD with momentum, then the element proximal map: plain torch ops, fp32 math."""
    for w, g, buf, threshold in zip(params, grads, bufs, thresholds):
        w32 = w.float()
        b = momentum * buf.float() + (g.float() + weight_decay * w32)
        buf.copy_(b)
        new = w32 - lr * b
        if threshold is not None:
            new = new.sign() * (new.abs() - threshold).clamp_min(0)
        w.copy_(new)


def group_lasso_step_math(params: List[Tensor], grads: List[Tensor], bufs: List[Tensor],
                          thresholds: List[Optional[float]], lr: float, momentum: float, weight_decay: float) -> None:
    """SGD with momentum, then the row-wise group-lasso map: plain torch ops, fp32 math.

    The SGD part runs on flat views: with ``[R, n]`` views throughout,
    Inductor's CPU outer-loop fusion crashes at compile time (torch 2.13,
    ``KeyError: 'bufN'``, pytorch/pytorch#196570); the math is the same."""
    for w, g, buf, threshold in zip(params, grads, bufs, thresholds):
        w32 = w.float().view(-1)
        b = momentum * buf.float().view(-1) + (g.float().view(-1) + weight_decay * w32)
        buf.view(-1).copy_(b)
        new = w32 - lr * b
        if threshold is not None:
            rows = new.view(w.shape[0], -1)
            norms = rows.square().sum(dim=1, keepdim=True).sqrt()
            scale = (1 - threshold * math.sqrt(rows.shape[1]) / norms).clamp_min(0)
            new = torch.where(norms > 0, rows * scale, torch.zeros_like(rows))
        w.copy_(new.view(w.shape))


def _compiled(math_fn):
    def prepare(case: Case, ctx: Context) -> Prepared:
        chosen = set(case.reg)
        thresholds = [LR * PROX_LAM if i in chosen else None for i in range(len(case.weights))]
        return prepare_compiled(case, ctx, math_fn, thresholds)
    return prepare


row("c", "(c) torch.compile SGD + prox L1", regularizer="prox-l1")(_compiled(prox_l1_step_math))
row("c", "(c) torch.compile SGD + group lasso", regularizer="group-lasso")(_compiled(group_lasso_step_math))


# --------------------------------------------------------------------------- shared rows

for _key in ("prox-l1", "group-lasso", "l1", "polarization", "admm"):
    row("d", "(d) SGD fused, no regularizer", regularizer=_key)(sgd_fused)
    row("floor", "(e) memory floor, copy", regularizer=_key)(memory_floor)
    row("floor-rmw", "(e2) memory floor, x += y", regularizer=_key)(memory_floor_in_place)


# =========================================================================== ADMM Z/U update and SAS-ADMM
#
# Two more tables, not SGD steps:
#
# - ``admm-zu``: classic ADMM's Z/U update (docs/admm.md, every K steps) on the
#   conv/linear weights, each layer pruned at ``ZU_RATIO`` (top-k magnitudes of
#   W + U): regkern ``regkern.admm.admm_update_all`` (a score pass, the
#   per-tensor selection with torch.kthvalue, one fused pass writing Z, U and
#   the target) against (a) the same math as torch ops per tensor, (b) the
#   official loop (``np.percentile`` of |W + U| per layer on the host, as the
#   ADMM pruning code does), (c) torch.compile of (a). The floors count the one
#   update pass (read W, U; write Z, U, target); the selection is extra work
#   every row does.
# - ``sas-admm``: one ``regkern.SASADMM`` step (official defaults, M = 50: the
#   outer update every 50th step) on every parameter, against (a) the official
#   sasPrun loop body as torch ops per tensor, (b) the same in torch._foreach
#   ops (regkern's earlier implementation), (c) torch.compile of (a) (inner step
#   and outer step compiled separately, coefficients as device tensors). The
#   floors count an inner step (read grad, W_breve, W, anchor; write W_breve,
#   W, the parameter).

ZU_RATIO = 0.85   # fraction of each layer pruned (the official per-layer percentile)
SAS_HYPER = dict(beta=0.04, lam=1e-4, r=0.9, s=1.09, M=50, k0=50, q=1.1, v=25.0)  # official defaults


class ZUCase(RegularizerCase):
    """The conv/linear weights as the Z/U table sees them: fp32 Z and U, a target in W's dtype."""

    @property
    def floor_bytes(self) -> int:
        """Read W, U; write Z, U, target."""
        return sum(self.weights[i].numel() * (12 + 2 * self.weights[i].element_size()) for i in self.reg)

    @property
    def working_set_bytes(self) -> int:
        """W, Z, U, target."""
        return sum(self.weights[i].numel() * (8 + 2 * self.weights[i].element_size()) for i in self.reg)

    def zu_state(self):
        """Fresh ``(ws, zs, us, targets, keeps)`` of the regularized tensors (the same values for every row)."""
        gen = torch.Generator().manual_seed(3)
        ws = [self.weights[i].clone() for i in self.reg]
        us = [(torch.randn(w.shape, generator=gen) * 1e-2).to(w.device) for w in ws]
        zs = [torch.zeros_like(u) for u in us]
        targets = [torch.zeros_like(w) for w in ws]
        from regkern.admm import kept_count
        keeps = [kept_count(w.numel(), ratio=ZU_RATIO) for w in ws]
        return ws, zs, us, targets, keeps


class SASCase(RegularizerCase):
    """Every parameter in SAS-ADMM; fused-step bytes are an inner step's."""

    @property
    def floor_bytes(self) -> int:
        """Read grad, W_breve, W, anchor; write W_breve, W, the parameter."""
        return sum(w.numel() * (20 + 2 * w.element_size()) for w in self.weights)

    @property
    def working_set_bytes(self) -> int:
        """Parameter, grad, W, W_breve, anchor, Z, U."""
        return sum(w.numel() * (20 + 2 * w.element_size()) for w in self.weights)


def _zu_case(case: Case) -> Optional[Case]:
    if not case.reg:
        return None
    return ZUCase(case, "admm-zu", f"ADMM Z/U update, top-k per layer (ratio {ZU_RATIO:g})", list(case.reg),
                  "conv/linear weights", 0)


def _sas_case(case: Case) -> Optional[Case]:
    return SASCase(case, "sas-admm", "SAS-ADMM step ({})".format(", ".join(f"{k}={v:g}" for k, v in SAS_HYPER.items())),
                   list(range(len(case.shapes))), "all parameters", 0)


suite("admm-zu", "ADMM Z/U update (top-k projection of W + U per layer, U and Z - U) on conv/linear weights",
      _zu_case, DEFAULT_SHAPES)
suite("sas-admm", "one SAS-ADMM step (W_breve, W, W_hat; outer update every M steps) on every parameter",
      _sas_case, DEFAULT_SHAPES)


# --------------------------------------------------------------------------- ADMM Z/U rows

@row("regkern", "regkern.admm.admm_update_all (fused)", per_backend=True, regularizer="admm-zu")
def regkern_zu(case: Case, ctx: Context) -> Prepared:
    try:
        from regkern.admm import admm_update_all
        from regkern.backends.backend import choose_backend
    except ImportError as e:
        raise Unavailable(f"regkern.admm not importable ({e})") from None
    ws, zs, us, targets, keeps = case.zu_state()

    def step() -> None:
        admm_update_all(ws, zs, us, targets, k=keeps, backend=ctx.backend)
    return Prepared(step=step, note=f"backend {choose_backend(case.device, ctx.backend)}",
                    keep=(ws, zs, us, targets))


def zu_step_math(ws: List[Tensor], zs: List[Tensor], us: List[Tensor], targets: List[Tensor],
                 keeps: List[int]) -> None:
    """The Z/U update as users write it with torch ops per tensor (ties at the
    threshold all kept), fp32 math."""
    for w, z, u, target, keep in zip(ws, zs, us, targets, keeps):
        w32 = w.float()
        v = w32 + u
        score = v.abs()
        threshold = score.flatten().kthvalue(v.numel() - keep + 1).values
        z.copy_(torch.where(score >= threshold, v, torch.zeros_like(v)))
        u.add_(w32 - z)
        target.copy_(z - u)


@row("a", "(a) Z/U update as torch ops per tensor", regularizer="admm-zu")
def loop_zu(case: Case, ctx: Context) -> Prepared:
    ws, zs, us, targets, keeps = case.zu_state()

    @torch.no_grad()
    def step() -> None:
        zu_step_math(ws, zs, us, targets, keeps)
    return Prepared(step=step, keep=(ws, zs, us, targets))


@row("b", "(b) official loop: np.percentile per layer", regularizer="admm-zu")
def official_zu(case: Case, ctx: Context) -> Prepared:
    """ADMM pruning code's update_Z / update_U: Z = W + U moved to the host,
    ``np.percentile(|Z|, 100 * ratio)``, entries below it zeroed, back to the
    device; U = U + W - Z; the W-step's Z - U."""
    import numpy as np
    ws, zs, us, targets, _ = case.zu_state()
    percent = 100 * ZU_RATIO

    @torch.no_grad()
    def step() -> None:
        for w, z, u, target in zip(ws, zs, us, targets):
            v = (w.float() + u).cpu().numpy()
            magnitude = np.abs(v)
            v[magnitude < np.percentile(magnitude, percent)] = 0
            z.copy_(torch.from_numpy(v))
            u.add_(w.float() - z)
            target.copy_(z - u)
    return Prepared(step=step, keep=(ws, zs, us, targets))


@row("c", "(c) torch.compile Z/U update", regularizer="admm-zu")
def compiled_zu(case: Case, ctx: Context) -> Prepared:
    ws, zs, us, targets, keeps = case.zu_state()
    return _compiled_call(case, ctx, torch.compile(zu_step_math, fullgraph=True, dynamic=False),
                          (ws, zs, us, targets, keeps))


def _compiled_call(case: Case, ctx: Context, fn, args, extra: Callable[[], None] = lambda: None) -> Prepared:
    """A row timing ``fn(*args)`` (a torch.compile'd function), compiled here
    within the compile timeout; ``extra()`` compiles whatever else the row calls."""
    t0 = time.perf_counter()
    try:
        with Alarm(ctx.compile_timeout_s):
            with torch.no_grad():
                fn(*args)
                extra()
            synchronize(case.device)
    except TimeoutError as e:
        torch._dynamo.reset()
        raise Unavailable(str(e)) from None
    except Exception as e:  # noqa: BLE001  (any compiler failure becomes a table note)
        torch._dynamo.reset()
        raise Unavailable(f"compile failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}") from None

    @torch.no_grad()
    def step() -> None:
        fn(*args)
    return Prepared(step=step, note=f"compile {time.perf_counter() - t0:.1f} s", keep=(args, fn))


row("floor", "(e) memory floor, copy", regularizer="admm-zu")(memory_floor)
row("floor-rmw", "(e2) memory floor, x += y", regularizer="admm-zu")(memory_floor_in_place)


# --------------------------------------------------------------------------- SAS-ADMM rows

@row("regkern", "regkern.SASADMM (fused)", per_backend=True, regularizer="sas-admm")
def regkern_sas(case: Case, ctx: Context) -> Prepared:
    try:
        sas_class = regkern.SASADMM
    except AttributeError as e:
        raise Unavailable(f"regkern.SASADMM not importable ({e})") from None
    params = case.fresh_params()
    opt = sas_class(params, backend=ctx.backend, **SAS_HYPER)
    opt.step()  # creates the state; the note can then say where the tensors went
    return Prepared(step=opt.step, note=backend_note(case, ctx, opt, []), keep=(params, opt))


class _SASLoop:
    """The state and schedule of SAS-ADMM for the rows that are not regkern:
    fp32 W, W_breve, Z, U, anchor per parameter, (k, t) counters, the official
    schedule; ``coefficients()`` gives this step's and advances the counters."""

    def __init__(self, case: Case, params: List[Tensor]) -> None:
        from regkern.optim.sas_admm import sas_schedule
        self.schedule = sas_schedule
        self.params = params
        self.grads = [p.grad for p in params]
        self.w = [p.detach().float().clone() for p in params]
        self.wb = [w.clone() for w in self.w]
        self.z = [w.clone() for w in self.w]
        self.u = [torch.zeros_like(w) for w in self.w]
        self.rho = SAS_HYPER["beta"]
        self.anchor = [w * self.rho for w in self.w]
        self.k, self.t = 1, 1

    def coefficients(self):
        """``(c, c + rho, b, b_next, outer)`` of this step (then advance k, t)."""
        h = SAS_HYPER
        m_k, eta_k = self.schedule(self.k, h["M"], h["k0"], h["q"], h["v"])
        c, b = 2.0 / (eta_k * self.t), 2.0 / (self.t + 1)
        outer = self.t >= m_k
        self.k, self.t = (self.k + 1, 1) if outer else (self.k, self.t + 1)
        return c, c + self.rho, b, 2.0 / (self.t + 1), outer


def _sas_outer_ops(w, z, u, anchor) -> None:
    """The official outer update of one tensor (in place on z, u, anchor)."""
    beta, lam, rho = SAS_HYPER["beta"], SAS_HYPER["lam"], SAS_HYPER["beta"]
    u_mid = u - SAS_HYPER["r"] * beta * (w - z)
    x = w - u_mid / beta
    tmp = x.abs() - lam / beta
    z.copy_(torch.sign(x) * (tmp + tmp.abs()) / 2)
    diff = w - z
    u.copy_(u_mid - SAS_HYPER["s"] * beta * diff)
    anchor.copy_(rho * w + (u - beta * diff))


@row("a", "(a) sasPrun loop as torch ops per tensor", regularizer="sas-admm")
def loop_sas(case: Case, ctx: Context) -> Prepared:
    params = case.fresh_params()
    s = _SASLoop(case, params)
    items = list(zip(params, s.grads, s.w, s.wb, s.anchor, s.z, s.u))

    @torch.no_grad()
    def step() -> None:
        c, cr, b, bn, outer = s.coefficients()
        for p, g, w, wb, anchor, z, u in items:
            wb.copy_((c * wb + anchor - g.float()) / cr)
            w.copy_(b * wb + (1 - b) * w)
            if outer:
                _sas_outer_ops(w, z, u, anchor)
            p.copy_(bn * wb + (1 - bn) * w)
    return Prepared(step=step, keep=(params, s))


@row("b", "(b) the same in torch._foreach ops", regularizer="sas-admm")
def foreach_sas(case: Case, ctx: Context) -> Prepared:
    params = case.fresh_params()
    s = _SASLoop(case, params)
    beta, lam, rho = SAS_HYPER["beta"], SAS_HYPER["lam"], s.rho
    low_precision = params[0].dtype != torch.float32

    @torch.no_grad()
    def step() -> None:
        c, cr, b, bn, outer = s.coefficients()
        gs = [g.float() for g in s.grads] if low_precision else s.grads
        torch._foreach_mul_(s.wb, c / cr)
        torch._foreach_add_(s.wb, s.anchor, alpha=1.0 / cr)
        torch._foreach_add_(s.wb, gs, alpha=-1.0 / cr)
        torch._foreach_lerp_(s.w, s.wb, b)
        if outer:
            diff = torch._foreach_sub(s.w, s.z)
            torch._foreach_add_(s.u, diff, alpha=-SAS_HYPER["r"] * beta)
            torch._foreach_copy_(s.z, s.w)
            torch._foreach_add_(s.z, s.u, alpha=-1.0 / beta)
            torch._foreach_copy_(diff, s.z)
            torch._foreach_clamp_min_(diff, -lam / beta)
            torch._foreach_clamp_max_(diff, lam / beta)
            torch._foreach_sub_(s.z, diff)
            torch._foreach_copy_(diff, s.w)
            torch._foreach_sub_(diff, s.z)
            torch._foreach_add_(s.u, diff, alpha=-SAS_HYPER["s"] * beta)
            torch._foreach_copy_(s.anchor, s.u)
            torch._foreach_add_(s.anchor, s.w, alpha=rho)
            torch._foreach_add_(s.anchor, diff, alpha=-beta)
        if low_precision:
            torch._foreach_copy_(params, torch._foreach_lerp(s.w, s.wb, bn))
        else:
            torch._foreach_copy_(params, s.w)
            torch._foreach_lerp_(params, s.wb, bn)
    return Prepared(step=step, keep=(params, s))


def sas_inner_math(params, grads, ws, wbs, anchors, coef) -> None:
    """The inner step in torch ops, for torch.compile; ``coef`` = (c, c + rho,
    b, b_next) as an fp32 device tensor (no recompile per step)."""
    c, cr, b, bn = coef[0], coef[1], coef[2], coef[3]
    for p, g, w, wb, anchor in zip(params, grads, ws, wbs, anchors):
        new_wb = (c * wb + anchor - g.float()) / cr
        new_w = b * new_wb + (1 - b) * w
        wb.copy_(new_wb)
        w.copy_(new_w)
        p.copy_(bn * new_wb + (1 - bn) * new_w)


def sas_outer_math(ws, zs, us, anchors) -> None:
    """The outer step in torch ops, for torch.compile."""
    for w, z, u, anchor in zip(ws, zs, us, anchors):
        _sas_outer_ops(w, z, u, anchor)


@row("c", "(c) torch.compile SAS-ADMM step", regularizer="sas-admm")
def compiled_sas(case: Case, ctx: Context) -> Prepared:
    params = [p.detach() for p in case.fresh_params()]
    s = _SASLoop(case, params)
    s.grads = [g.clone() for g in case.grads]
    coef = torch.zeros(4, dtype=torch.float32, device=case.device)
    inner = torch.compile(sas_inner_math, fullgraph=True, dynamic=False)
    outer = torch.compile(sas_outer_math, fullgraph=True, dynamic=False)
    prepared = _compiled_call(case, ctx, inner, (params, s.grads, s.w, s.wb, s.anchor, coef),
                              extra=lambda: outer(s.w, s.z, s.u, s.anchor))

    def step() -> None:
        c, cr, b, bn, is_outer = s.coefficients()
        coef.copy_(torch.tensor([c, cr, b, bn]), non_blocking=True)
        prepared.step()
        if is_outer:
            with torch.no_grad():
                outer(s.w, s.z, s.u, s.anchor)
    return Prepared(step=step, note=prepared.note, keep=(prepared, s, coef))


row("floor", "(e) memory floor, copy", regularizer="sas-admm")(memory_floor)
row("floor-rmw", "(e2) memory floor, x += y", regularizer="sas-admm")(memory_floor_in_place)
