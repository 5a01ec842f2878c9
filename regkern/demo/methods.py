"""One runner per pruning method, all from the same trained baseline and
all through :mod:`regkern.prune` schedules that write the state of the fused
optimizers (:class:`regkern.SGD`, :class:`regkern.RDA`,
:class:`regkern.SASADMM`).

Every runner: copy the baseline, build the optimizer and the schedule, train
the regularization phase (its own length per method, at most
``prune_epochs``; one-shot L1 has none), prune, measure the accuracy right
away, fine-tune for the same budget as every other method (``finetune_epochs``,
cosine learning rate, masks keep unstructured zeros exact) and measure again.
Filter methods (GReg-1/2, one-shot L1, slimming, polarization) remove rows of
coupled layers physically; weight methods (RDA, ADMM, SAS-ADMM) zero single
weights, matched layer by layer to the weight count the filter methods keep.

The hyper-parameters are the papers' with the timetables compressed so that
a method runs in seconds on the digits: GReg's penalty grows by ``5e-2``
every iteration (official: ``1e-4`` every 10) and so on; :class:`Settings`
says where and why each one departs from the official recipe.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import Tensor, nn

import regkern
from regkern import prune as rp
from regkern.demo import report
from regkern.demo.data import Dataset
from regkern.demo.train import cosine_lr, evaluate, steps_per_epoch, train

METHODS = ("greg1", "greg2", "l1", "slimming", "polarization", "rda", "admm", "sas-admm")
LABELS = {"greg1": "GReg-1", "greg2": "GReg-2", "l1": "L1 one-shot", "slimming": "Slimming (L1 on BN)",
          "polarization": "Polarization", "rda": "RDA (L1)", "admm": "ADMM", "sas-admm": "SAS-ADMM"}


@dataclasses.dataclass
class Settings:
    """Everything a run depends on (the command line fills it)."""

    ratio: float = 0.75              # filters removed per prunable layer
    epochs: float = 30               # baseline training
    prune_epochs: float = 10         # longest regularization phase
    finetune_epochs: float = 10      # same fine-tuning budget for every method
    batch_size: int = 64
    lr: float = 0.1                  # baseline (cosine); fine-tuning uses finetune_lr (cosine)
    reg_lr: float = 0.01             # fixed during regularization (GReg: fixed, as the official code)
    finetune_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    device: str = "cpu"
    backend: Optional[str] = None    # regkern kernel backend (None: by device)
    quiet: bool = False
    # GReg (official: delta 1e-4 every Ku = 10 iterations up to tau = 1, then Ks = 5000 iterations,
    # penalty on the conv rows only). Compressed: delta 5e-2 every iteration up to tau = 5, Ks = 2
    # epochs, and the penalty also on the BatchNorm rows of the pruned channels (scope "rows"): a
    # conv followed by BatchNorm is scale invariant, so in a short run a penalty on the conv rows
    # alone shrinks them without silencing the channel (BN rescales it); with the BN rows
    # penalized too the channel's output goes to zero and removing it costs almost nothing.
    greg_ku: int = 1
    greg_delta: float = 5e-2
    greg_tau: float = 5.0
    greg_ks_epochs: float = 2.0
    greg_scope: str = "rows"
    greg2_delta_pick: float = 1e-3
    greg2_pick_ceiling: float = 5e-2
    # network slimming and polarization (official: lam 1e-4, and 5e-5 with t = 1.4 for ResNet-56, over
    # 160+ epochs at lr 0.1); the same total push in ~200 steps at lr 0.01 needs lam ~1000x larger.
    # Slimming cuts each layer at --ratio (official: one global percentile, which at high ratios
    # empties whole layers of a small net) so that its widths match GReg's and one-shot L1's.
    slimming_lam: float = 5e-2
    slimming_scope: str = "layer"
    polar_lam: float = 1e-1
    polar_t: float = 1.2
    # RDA: the L1 strength lam of f(W) + lam |W|_1 and lr = 1/gamma (W = S(W0 - sqrt(t) lr gbar,
    # lam sqrt(t) lr)); the SGD + L1-subgradient comparison minimizes the same objective
    rda_lam: float = 0.2
    rda_lr: float = 0.05
    # ADMM: rho of the W-step pull, Z/U update every admm_k_epochs (official rho grows from 1.5e-3
    # over many epochs; a short run needs the pull strong from the start). SAS-ADMM: beta and the L1
    # strength lam (official 0.04 and 1e-4 for 85% sparsity after many epochs)
    admm_rho: float = 1.0
    admm_k_epochs: float = 1.0
    sas_beta: float = 0.04
    sas_lam: float = 1e-4
    sas_v: float = 25.0


@dataclasses.dataclass
class Outcome:
    """A method's table row plus what the figures need."""

    row: report.Row
    norm_trace: Optional[dict] = None      # GReg: filter norms over iterations
    bn_scales: Optional[dict] = None       # slimming / polarization: scales and pruned flags
    sparsity_trace: Optional[dict] = None  # RDA: exact zeros over iterations


class Context:
    """The shared pieces: data, baseline, its measurements and the settings."""

    def __init__(self, data: Dataset, baseline: nn.Module, settings: Settings, baseline_acc: float) -> None:
        self.data = data
        self.baseline = baseline
        self.s = settings
        self.device = torch.device(settings.device)
        self.example = data.x_test[:2].to(self.device)
        self.baseline_acc = baseline_acc
        self.base_params = report.param_count(baseline)
        self.base_macs = report.count_macs(baseline, self.example)
        self.base_weights = report.weight_count(baseline)
        self.steps_per_epoch = steps_per_epoch(data, settings.batch_size)
        self.trace_layer = ""  # the layer of the GReg figure, set by the first GReg run
        self._weight_ratios: Optional[Dict[str, float]] = None

    def weight_ratios(self) -> Dict[str, float]:
        """Per-layer weight fractions of the filter cut at ``ratio`` (computed once)."""
        if self._weight_ratios is None:
            self._weight_ratios = matched_weight_ratios(self)
        return self._weight_ratios

    # -- building blocks ----------------------------------------------------
    def fresh(self, index: int) -> nn.Module:
        """A copy of the baseline; the global RNG reseeded per method."""
        torch.manual_seed(self.s.seed * 1000 + index)
        return copy.deepcopy(self.baseline)

    def generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.s.seed * 1000 + index)

    def sgd(self, params, lr: float) -> regkern.SGD:
        return regkern.SGD(params, lr=lr, momentum=self.s.momentum, weight_decay=self.s.weight_decay,
                           backend=self.s.backend)

    def steps(self, epochs: float) -> int:
        return int(round(epochs * self.steps_per_epoch))

    def regularize(self, model, optimizer, gen, desc: str, *, schedule=None, epochs: Optional[float] = None,
                   on_step: Optional[Callable[[int], None]] = None, lr: Optional[Callable[[int], float]] = None) -> int:
        """The regularization phase: fixed ``reg_lr`` unless ``lr`` is given;
        ends when the schedule is done or after ``epochs`` (default ``prune_epochs``)."""
        def after(step: int) -> None:
            if schedule is not None:
                schedule.step()
            if on_step is not None:
                on_step(step)

        return train(model, optimizer, self.data, epochs=self.s.prune_epochs if epochs is None else epochs,
                     batch_size=self.s.batch_size, generator=gen, device=self.device, desc=desc,
                     lr=lr or (lambda _: self.s.reg_lr), on_step=after,
                     stop=None if schedule is None else (lambda: schedule.done), quiet=self.s.quiet)

    def finetune(self, model, optimizer, gen, desc: str) -> None:
        total = self.steps(self.s.finetune_epochs)
        train(model, optimizer, self.data, epochs=self.s.finetune_epochs, batch_size=self.s.batch_size,
              generator=gen, device=self.device, desc=desc, lr=cosine_lr(self.s.finetune_lr, total),
              quiet=self.s.quiet)

    def row(self, key: str, structure: str, model: nn.Module, acc_pruned: float, acc_final: float,
            started: float, note: str = "") -> report.Row:
        sparse = structure == "weights"
        params = report.param_count(model, nonzero=sparse)
        macs = report.count_macs(model, self.example, nonzero=sparse)
        left = report.weight_count(model, nonzero=True)
        return report.Row(LABELS[key], structure, params, macs, self.base_macs / max(macs, 1), acc_pruned, acc_final,
                          1.0 - left / self.base_weights, time.perf_counter() - started, note)


def _module(model: nn.Module, name: str) -> nn.Module:
    return dict(model.named_modules())[name]


def exact_zero_fraction(params: List[Tensor]) -> float:
    total = sum(p.numel() for p in params)
    return 1.0 - sum(int(torch.count_nonzero(p)) for p in params) / max(total, 1)


def conv_linear_weights(model: nn.Module) -> List[nn.Parameter]:
    return [m.weight for m in report.prunable_layers(model)]


def kept_positions(before: Tensor, after: Tensor) -> Tensor:
    """Which entries of ``before`` survive as ``after`` (slicing keeps order):
    a bool mask found by matching values in order."""
    before, after = before.tolist(), after.tolist()
    keep = torch.zeros(len(before), dtype=torch.bool)
    j = 0
    for i, v in enumerate(before):
        if j < len(after) and v == after[j]:
            keep[i] = True
            j += 1
    if j != len(after):
        raise RuntimeError("the sliced BatchNorm scales are not a subsequence of the ones before slicing")
    return keep


def bn_margin(scales: dict) -> float:
    """Separation of pruned and kept BatchNorm scales: per layer
    ``(min |kept| - max |pruned|) / max |gamma|``, averaged over the layers
    that lost channels (negative when the two sets overlap)."""
    margins = []
    for values, pruned in zip(scales["layers"], scales["layer_pruned"]):
        values = values.abs()
        if pruned.any() and (~pruned).any():
            margins.append(float((values[~pruned].min() - values[pruned].max()) / values.max().clamp_min(1e-12)))
    return float(np.mean(margins)) if margins else float("nan")


# -- structured (filter) methods ---------------------------------------------------

class NormTracer:
    """Records the L1 norm of every filter of one conv (and the largest
    penalty on it) after each step, for the GReg figure."""

    def __init__(self, model: nn.Module, schedule, layer: str, every: int = 1) -> None:
        self.unit = next((u for u in schedule.units if u.name == layer), None)
        self.weight = _module(model, layer).weight if self.unit is not None else None
        self.schedule, self.layer, self.every = schedule, layer, every
        self.iters, self.norms, self.lam = [], [], []
        self.record(0)

    def record(self, step: int) -> None:
        if self.unit is None or step % self.every:
            return
        with torch.no_grad():
            self.norms.append(self.weight.detach().abs().flatten(1).sum(1).float().cpu().numpy())
        self.iters.append(step)
        self.lam.append(0.0 if self.unit is None else float(self.unit.lam.max()))

    def trace(self) -> Optional[dict]:
        if self.unit is None or self.unit.pruned is None:
            return None
        return {"iters": self.iters, "norms": np.stack(self.norms), "pruned": self.unit.pruned.cpu().numpy(),
                "lam": self.lam}


def _greg(ctx: Context, key: str, index: int) -> Outcome:
    started = time.perf_counter()
    model, s = ctx.fresh(index), ctx.s
    opt = ctx.sgd(model.parameters(), s.reg_lr)
    common = dict(ratios=s.ratio, Ku=s.greg_ku, Ks=ctx.steps(s.greg_ks_epochs), delta=s.greg_delta,
                  tau=s.greg_tau, scope=s.greg_scope)
    if key == "greg1":
        sched = rp.GReg1(model, opt, ctx.example, **common)
    else:
        sched = rp.GReg2(model, opt, ctx.example, delta_pick=s.greg2_delta_pick,
                         pick_ceiling=s.greg2_pick_ceiling, **common)
    if not ctx.trace_layer and sched.units:  # the figure follows the middle pruned layer
        ctx.trace_layer = sched.units[len(sched.units) // 2].name
    tracer = NormTracer(model, sched, ctx.trace_layer)
    gen = ctx.generator(index)
    ctx.regularize(model, opt, gen, f"{LABELS[key]}: growing penalty", schedule=sched, on_step=tracer.record)
    note = "" if sched.done else f"penalty still growing after {s.prune_epochs:g} epochs: pruned early"
    trace = tracer.trace() if sched.done else None
    sched.prune(force=not sched.done)
    if trace is None:
        trace = tracer.trace()
    acc_pruned = evaluate(model, ctx.data, ctx.device)
    ctx.finetune(model, opt, gen, f"{LABELS[key]}: fine-tune")
    row = ctx.row(key, "filters", model, acc_pruned, evaluate(model, ctx.data, ctx.device), started, note)
    return Outcome(row, norm_trace=trace)


def run_greg1(ctx: Context, index: int) -> Outcome:
    """GReg-1: rows fixed by magnitude at the start, their L2 penalty grows."""
    return _greg(ctx, "greg1", index)


def run_greg2(ctx: Context, index: int) -> Outcome:
    """GReg-2: a uniformly rising penalty picks the rows, then grows on them."""
    return _greg(ctx, "greg2", index)


def run_l1(ctx: Context, index: int) -> Outcome:
    """One-shot L1-norm filter pruning (Li et al. 2017), the same rows count as GReg."""
    started = time.perf_counter()
    model = ctx.fresh(index)
    opt = ctx.sgd(model.parameters(), ctx.s.finetune_lr)
    sched = rp.OneShotL1(model, opt, ctx.example, ratios=ctx.s.ratio)
    sched.prune()
    acc_pruned = evaluate(model, ctx.data, ctx.device)
    ctx.finetune(model, opt, ctx.generator(index), f"{LABELS['l1']}: fine-tune")
    row = ctx.row("l1", "filters", model, acc_pruned, evaluate(model, ctx.data, ctx.device), started)
    return Outcome(row)


def _bn_method(ctx: Context, key: str, index: int) -> Outcome:
    started = time.perf_counter()
    model, s = ctx.fresh(index), ctx.s
    opt = ctx.sgd(model.parameters(), s.reg_lr)
    steps = ctx.steps(s.prune_epochs)
    if key == "slimming":
        sched = rp.Slimming(model, opt, ctx.example, lam=s.slimming_lam, steps=steps, percent=s.ratio,
                             scope=s.slimming_scope)
    else:
        sched = rp.PolarizationPruner(model, opt, ctx.example, lam=s.polar_lam, t=s.polar_t, steps=steps)
    gen = ctx.generator(index)
    ctx.regularize(model, opt, gen, f"{LABELS[key]}: sparsity training", schedule=sched)
    # the regularized scale vectors (one per BatchNorm of the prunable groups), before and after the cut
    regularized = list({name: p for u in sched.units for name, p in u.scales})
    params = dict(model.named_parameters())
    before = {name: params[name].detach().float().cpu().clone() for name in regularized}
    summary = sched.prune(force=not sched.done)
    layers, pruned = [], []
    for name, values in before.items():
        layers.append(values)
        pruned.append(~kept_positions(values, params[name].detach().float().cpu()))
    scales = {"layers": layers, "layer_pruned": pruned,
              "values": torch.cat(layers).numpy() if layers else np.zeros(0),
              "pruned": torch.cat(pruned).numpy() if pruned else np.zeros(0, dtype=bool)}
    scales["margin"] = bn_margin(scales)
    acc_pruned = evaluate(model, ctx.data, ctx.device)
    ctx.finetune(model, opt, gen, f"{LABELS[key]}: fine-tune")
    notes = [f"BN scale margin {scales['margin']:.3f}"] + list(summary.notes)
    row = ctx.row(key, "filters", model, acc_pruned, evaluate(model, ctx.data, ctx.device), started, "; ".join(notes))
    return Outcome(row, bn_scales=scales)


def run_slimming(ctx: Context, index: int) -> Outcome:
    """Network slimming: L1 on BatchNorm scales, then each layer's smallest
    ``ratio`` of channels (``slimming_scope="global"``: one percentile over all)."""
    return _bn_method(ctx, "slimming", index)


def run_polarization(ctx: Context, index: int) -> Outcome:
    """Polarization on BatchNorm scales, then each layer's histogram valley."""
    return _bn_method(ctx, "polarization", index)


# -- unstructured (weight) methods ---------------------------------------------------

def matched_weight_ratios(ctx: Context) -> Dict[str, float]:
    """Per conv/linear layer, the fraction of its weights that filter pruning
    at ``ratio`` removes (a dry one-shot cut on a copy): the weight methods
    prune each layer to the same weight count."""
    model = copy.deepcopy(ctx.baseline)
    before = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    opt = ctx.sgd(model.parameters(), 0.0)
    rp.OneShotL1(model, opt, ctx.example, ratios=ctx.s.ratio).prune()
    after = {n: m.weight.numel() for n, m in model.named_modules() if n in before}
    return {n: 1.0 - after[n] / before[n] for n in before if after[n] < before[n]}


def small_fraction(params: List[Tensor], below: float) -> float:
    total = sum(p.numel() for p in params)
    return sum(int((p.detach().abs() < below).sum()) for p in params) / max(total, 1)


class SparsityTracer:
    """Fraction of exactly-zero weights (and of weights below ``NEAR_ZERO``
    in magnitude) after each step."""

    NEAR_ZERO = 1e-3

    def __init__(self, params: List[Tensor], every: int = 1) -> None:
        self.params, self.every = params, every
        self.iters, self.sparsity, self.near_zero = [], [], []
        self.record(0)

    def record(self, step: int) -> None:
        if step % self.every == 0:
            self.iters.append(step)
            self.sparsity.append(exact_zero_fraction(self.params))
            self.near_zero.append(small_fraction(self.params, self.NEAR_ZERO))

    def trace(self) -> dict:
        return {"iters": self.iters, "sparsity": self.sparsity, "near_zero": self.near_zero,
                "near_zero_below": self.NEAR_ZERO}


def _split_weights(model: nn.Module):
    weights = conv_linear_weights(model)
    ids = {id(p) for p in weights}
    return weights, [p for p in model.parameters() if id(p) not in ids]


def run_rda(ctx: Context, index: int) -> Outcome:
    """L1-regularized dual averaging (Xiao 2010, He et al. 2018) on conv/linear
    weights: exact zeros during training, frozen as masks for fine-tuning."""
    started = time.perf_counter()
    model, s = ctx.fresh(index), ctx.s
    weights, others = _split_weights(model)
    opt = regkern.RDA([{"params": weights, "lam": s.rda_lam}, {"params": others, "lam": 0.0}], lr=s.rda_lr,
                      backend=s.backend)
    sched = rp.SparseTraining(model, opt, steps=ctx.steps(s.prune_epochs))
    tracer = SparsityTracer(weights)
    gen = ctx.generator(index)
    ctx.regularize(model, opt, gen, f"{LABELS['rda']}: RDA training", schedule=sched, on_step=tracer.record,
                   lr=lambda _: s.rda_lr)
    ft_opt = ctx.sgd(model.parameters(), s.finetune_lr)
    sched.prune(force=not sched.done, finetune_optimizer=ft_opt)
    acc_pruned = evaluate(model, ctx.data, ctx.device)
    ctx.finetune(model, ft_opt, gen, f"{LABELS['rda']}: fine-tune")
    row = ctx.row("rda", "weights", model, acc_pruned, evaluate(model, ctx.data, ctx.device), started)
    return Outcome(row, sparsity_trace=tracer.trace())


def sgd_l1_sparsity(ctx: Context, index: int) -> dict:
    """The comparison of the RDA figure: plain SGD with the L1 subgradient
    (``d += lam sign(W)``) of the same strength on the same weights, for the
    same number of steps; exact zeros over iterations."""
    model, s = ctx.fresh(index), ctx.s
    weights, others = _split_weights(model)
    opt = regkern.SGD([{"params": weights, "regularizer": regkern.L1(s.rda_lam)},
                       {"params": others}], lr=s.reg_lr, momentum=s.momentum, weight_decay=s.weight_decay,
                      backend=s.backend)
    tracer = SparsityTracer(weights)
    ctx.regularize(model, opt, ctx.generator(index), "SGD + L1 subgradient (comparison)", on_step=tracer.record)
    return {**tracer.trace(), "accuracy": evaluate(model, ctx.data, ctx.device)}


def run_admm(ctx: Context, index: int) -> Outcome:
    """Classic ADMM weight pruning (Zhang et al. 2018): W-step in the fused SGD,
    Z/U projection every K steps, then masks and masked retraining."""
    started = time.perf_counter()
    model, s = ctx.fresh(index), ctx.s
    opt = ctx.sgd(model.parameters(), s.reg_lr)
    sched = rp.ADMMPruner(model, opt, ctx.weight_ratios(), steps=ctx.steps(s.prune_epochs),
                          K=max(1, ctx.steps(s.admm_k_epochs)), rho=s.admm_rho, ignore=())
    gen = ctx.generator(index)
    ctx.regularize(model, opt, gen, f"{LABELS['admm']}: ADMM", schedule=sched)
    sched.prune(force=not sched.done)
    acc_pruned = evaluate(model, ctx.data, ctx.device)
    ctx.finetune(model, opt, gen, f"{LABELS['admm']}: masked retraining")
    row = ctx.row("admm", "weights", model, acc_pruned, evaluate(model, ctx.data, ctx.device), started)
    return Outcome(row)


def run_sas_admm(ctx: Context, index: int) -> Outcome:
    """SAS-ADMM (Yuan et al. 2024) on conv/linear weights, then per-layer
    magnitude pruning to the same counts and masked retraining."""
    started = time.perf_counter()
    model, s = ctx.fresh(index), ctx.s
    weights, _ = _split_weights(model)  # official: ADMM on the conv/linear weights, the rest frozen
    # one outer iteration per epoch (official: M = 50 inner iterations, growing after k0 = 50 outer ones)
    m_inner = max(1, ctx.steps_per_epoch)
    outer = max(1, int(round(ctx.steps(s.prune_epochs) / m_inner)))
    opt = regkern.SASADMM(weights, beta=s.sas_beta, lam=s.sas_lam, M=m_inner, k0=outer + 1, v=s.sas_v)
    sched = rp.ADMMPruner(model, opt, ctx.weight_ratios(), outer_iterations=outer, ignore=())
    gen = ctx.generator(index)
    ctx.regularize(model, opt, gen, f"{LABELS['sas-admm']}: SAS-ADMM", schedule=sched)
    z_sparsity = exact_zero_fraction([opt.state[p]["z"] for p in weights if "z" in opt.state[p]])
    ft_opt = ctx.sgd(model.parameters(), s.finetune_lr)
    sched.prune(force=not sched.done, finetune_optimizer=ft_opt)
    acc_pruned = evaluate(model, ctx.data, ctx.device)
    ctx.finetune(model, ft_opt, gen, f"{LABELS['sas-admm']}: masked retraining")
    note = f"Z was {100 * z_sparsity:.1f}% zeros before the per-layer magnitude cut"
    row = ctx.row("sas-admm", "weights", model, acc_pruned, evaluate(model, ctx.data, ctx.device), started, note)
    return Outcome(row)


RUNNERS = {"greg1": run_greg1, "greg2": run_greg2, "l1": run_l1, "slimming": run_slimming,
           "polarization": run_polarization, "rda": run_rda, "admm": run_admm, "sas-admm": run_sas_admm}
