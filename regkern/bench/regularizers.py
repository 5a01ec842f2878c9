"""Benchmark tables of the regularizers beyond RowL2 (``python -m regkern bench
--regularizers ...``).

One table per regularizer and shape set, timed by the same runner as the GReg
table (``sgd.run_case``). Every row starts from copies of the same master
tensors and does the same work: the regularized set below gets the
regularizer, every other parameter is in a plain group (plain SGD with
momentum and weight decay) in every row.

- ``prox-l1``, ``group-lasso`` (conv/linear weights, SPEC 3): regkern
  ``ProxL1(lam)`` / ``GroupLasso(lam)`` against (a) ``torch.optim.SGD(foreach)``
  then the proximal map as separate torch ops per tensor, and (c)
  ``torch.compile`` of the same math (SGD step and proximal map);
- ``l1`` (BatchNorm scales, network slimming): regkern ``L1(lam)`` against
  (a) the official loop ``p.grad.add_(lam * torch.sign(p.data))`` then
  ``torch.optim.SGD(foreach)``;
- ``polarization`` (BatchNorm scales, SPEC 5): regkern
  ``Polarization(lam, t, a)`` against (a) the official form: the regularizer
  as an autograd loss term over all BN scales concatenated (``backward`` adds
  its gradient), ``torch.optim.SGD(foreach)``, then ``p.data.clamp_(0, a)``
  per BN scale;
- ``admm`` (conv/linear weights, SPEC 6, the W-step): regkern ``ADMM(rho)``
  against (a) ``grad += rho * (W - Z + U)`` per tensor then
  ``torch.optim.SGD(foreach)``.

Each table also has (d) ``torch.optim.SGD(fused=True)`` without any
regularizer and the two memory floors, at the bytes the fused step of that
regularizer must move (``RegularizerCase.floor_bytes``). BatchNorm scales are
the ``bn_scale`` entries of the shape sets (``shapes.bn_scales``); they start
at 0.5 as in the official recipes. The regkern row's note says which backend
stepped which tensors: a term the fast kernel lacks
(``regkern.backend.kernel_terms``) sends those tensors to the pure-torch
reference.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

import regkern
from regkern.bench import sgd
from regkern.bench.sgd import LR, MOMENTUM, WEIGHT_DECAY, Case, Context, Prepared, Unavailable, row
from regkern.bench.shapes import bn_scales

# Settings (official defaults where there are some).
PROX_LAM = 1e-4                    # prox-SGD lambda: threshold lr * lam
L1_LAM = 1e-4                      # network slimming s (CIFAR and ImageNet)
POLAR = {"resnet50": (8e-5, 1.2)}  # (lam, t) per shape set; ResNet-56/CIFAR otherwise
POLAR_CIFAR, POLAR_A = (5e-5, 1.4), 1.0
ADMM_RHO = 1e-3
BN_INIT = 0.5                      # BN scales start at 0.5 (slimming and polarization recipes)


class RegularizerCase(Case):
    """A shape set's ``Case`` as one regularizer's table sees it: the same
    master tensors (BN scales reset to about 0.5 for the BN regularizers),
    ``reg`` the indices of the regularized set, ``plain`` the rest, and
    ``floor_bytes`` the traffic of its fused step."""

    def __init__(self, base: Case, regularizer: str, what: str, reg: List[int], set_name: str,
                 extra_bytes: int, bn: bool = False) -> None:
        self.__dict__.update(base.__dict__)  # shares the masters, allocates nothing
        self.regularizer, self.what, self.set_name = regularizer, what, set_name
        self.reg = reg
        chosen = set(reg)
        self.plain = [i for i in range(len(self.shapes)) if i not in chosen]
        self.extra_bytes = extra_bytes
        if bn:
            gen = torch.Generator().manual_seed(1)
            self.weights = list(self.weights)
            for i in reg:
                w = self.weights[i]
                self.weights[i] = (BN_INIT + 0.1 * torch.randn(w.shape, generator=gen)).to(w)

    @property
    def floor_bytes(self) -> int:
        """Read W, grad, buf; write W, buf; plus the regularizer's own reads."""
        return 5 * sum(w.numel() * w.element_size() for w in self.weights) + self.extra_bytes

    def describe(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        values = sum(self.weights[i].numel() for i in self.reg)
        return (f"{self.name}, {self.what} ({self.device.type}, {dt}): {len(self.weights)} tensors, "
                f"{self.numel / 1e6:.2f}M params; regularized: {len(self.reg)} {self.set_name} "
                f"({values:,} values), {len(self.plain)} tensors plain; "
                f"a fused step moves {self.floor_bytes / 1e6:.1f} MB")


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
sgd.suite("prox-l1", "proximal L1 on conv/linear weights",
          _conv_linear("prox-l1", lambda c: f"ProxL1(lam={PROX_LAM:g})", lambda c: _rows_bytes(c, c.reg)),
          DEFAULT_SHAPES)
sgd.suite("group-lasso", "group lasso (rows) on conv/linear weights",
          _conv_linear("group-lasso", lambda c: f"GroupLasso(lam={PROX_LAM:g})", lambda c: _rows_bytes(c, c.reg)),
          DEFAULT_SHAPES)
sgd.suite("l1", "L1 subgradient on BatchNorm scales (network slimming)",
          _batchnorm("l1", lambda c: f"L1(lam={L1_LAM:g})", lambda c: _rows_bytes(c, bn_scales(c.shapes))),
          DEFAULT_SHAPES)
sgd.suite("polarization", "polarization on BatchNorm scales, clamp [0, a]",
          # the mean and sign-mean reduction reads the set once more before the step
          _batchnorm("polarization", lambda c: "Polarization(lam={:g}, t={:g}, a={:g})".format(*polar_settings(c)),
                     lambda c: _bytes(c, bn_scales(c.shapes)) + 16),
          DEFAULT_SHAPES)
sgd.suite("admm", "ADMM W-step pull rho * (W - Z + U) on conv/linear weights",
          _conv_linear("admm", lambda c: f"ADMM(rho={ADMM_RHO:g})", lambda c: _bytes(c, c.reg)),  # reads Z - U
          DEFAULT_SHAPES)


# --------------------------------------------------------------------------- regkern rows

def _routing(opt) -> Optional[str]:
    """Which backend stepped how many tensors, from the optimizer's plans
    (after a step; None when regkern's internals differ from what this expects)."""
    try:
        counts = {}
        for cached in opt._plans.values():
            plan = cached.plan
            slow = len(plan.slow_index)
            if slow:
                counts["reference"] = counts.get("reference", 0) + slow
            if len(plan.params) > slow:
                counts[plan.backend] = counts.get(plan.backend, 0) + len(plan.params) - slow
        return ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    except Exception:  # noqa: BLE001
        return None


def _backend_note(case: Case, ctx: Context, opt, terms: Sequence[str]) -> str:
    from regkern.backend import choose_backend, kernel_terms
    chosen = choose_backend(case.device, ctx.backend)
    missing = sorted(set(terms) - kernel_terms(chosen)) if chosen != "reference" else []
    note = f"backend {chosen}"
    if missing:
        note += f" (lacks {', '.join(missing)}: {case.set_name} on reference)"
    routed = _routing(opt)
    return f"{note}; tensors: {routed}" if routed else note


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
        return Prepared(step=opt.step, note=_backend_note(case, ctx, opt, terms), keep=(params, opt))
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
        return sgd.prepare_compiled(case, ctx, math_fn, thresholds)
    return prepare


row("c", "(c) torch.compile SGD + prox L1", regularizer="prox-l1")(_compiled(prox_l1_step_math))
row("c", "(c) torch.compile SGD + group lasso", regularizer="group-lasso")(_compiled(group_lasso_step_math))


# --------------------------------------------------------------------------- shared rows

for _key in ("prox-l1", "group-lasso", "l1", "polarization", "admm"):
    row("d", "(d) SGD fused, no regularizer", regularizer=_key)(sgd.torch_fused)
    row("floor", "(e) memory floor, copy", regularizer=_key)(sgd.memory_floor)
    row("floor-rmw", "(e2) memory floor, x += y", regularizer=_key)(sgd.memory_floor_in_place)
