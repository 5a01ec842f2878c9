"""Random cases for the `sgd` kernel family, shared by the backend tests.

A case is a set of tensors plus options; `run` applies one backend to a deep
copy, so the same case can be stepped by the reference and a fast backend and
compared with `assert_same`. `make_case(..., with_terms=...)` adds the
regularizer terms of the contract (L1 subgradient, polarization, ADMM pull,
proximal map, clamp) as `Case.terms`, the reference's keyword lists;
`lam_kinds` draws per-element lambdas besides per-row ones and
`with_lam_cols` adds per-column lambdas (`Case.terms["lam_cols"]`).
"""
from __future__ import annotations

import copy
import dataclasses
import random
from typing import Callable, Collection, List, Optional, Union

import torch

from regkern.reference.sgd import num_rows

# Shapes that stress the chunking: empty, 0-d, 1-element rows, odd and
# non-power-of-two rows, BatchNorm vectors, linear and conv weights.
SHAPES = [
    (), (0,), (0, 3), (1,), (7,), (64,), (1, 1), (5, 1), (3, 17), (33, 129),
    (16, 3, 3, 3), (8, 5, 3, 3), (2, 1000), (1, 4099), (257, 9),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The regularizer terms `make_case` can add (names as regkern.terms.TERM_KEYWORDS).
TERMS = ("l1", "polar", "admm", "prox", "clamp")
# (rtol, atol) for a fast backend against the reference: fp32 differs by
# operation order only; bf16 / fp16 may round one ulp apart.
TOLERANCE = {
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (1.6e-2, 1e-3),
    torch.float16: (2e-3, 1e-4),
}


@dataclasses.dataclass
class Case:
    params: List[torch.Tensor]
    grads: List[torch.Tensor]
    bufs: List[Optional[torch.Tensor]]
    lams: List[Optional[torch.Tensor]]
    masks: List[Optional[torch.Tensor]]
    norms: List[Optional[torch.Tensor]]
    first_step: List[bool]
    options: dict
    # regularizer terms: reference.sgd_step keyword -> one entry per tensor
    terms: dict = dataclasses.field(default_factory=dict)

    def clone(self) -> "Case":
        return copy.deepcopy(self)


def make_case(
    rng: random.Random,
    shapes,
    dtype: torch.dtype,
    device: str = "cpu",
    *,
    momentum: Optional[float] = None,
    with_lam: Optional[bool] = None,
    with_mask: Optional[bool] = None,
    with_norms: Optional[bool] = None,
    with_terms: Union[bool, Collection[str]] = False,
    lam_kinds: Collection[str] = ("row",),
    with_lam_cols: Optional[bool] = False,
    **forced_options,
) -> Case:
    """A random case over `shapes`; unspecified options are drawn from `rng`.

    `with_terms`: False, no regularizer term (the default: draws nothing from
    `rng`); names from `TERMS`, those terms on every tensor; True, each term
    on about half of the tensors.
    `lam_kinds`: the kinds of lambda to draw from, "row" ([R]) and
    "element" (W's shape). `with_lam_cols`: False, none (draws nothing); True,
    on every tensor with 2 or more dimensions; None, on about half of them.
    """
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    momentum = rng.choice([0.0, 0.9]) if momentum is None else momentum
    options = dict(
        lr=rng.choice([0.1, 0.01, 1.0]),
        momentum=momentum,
        dampening=rng.choice([0.0, 0.3]) if momentum else 0.0,
        weight_decay=rng.choice([0.0, 5e-4, 0.1]),
        maximize=rng.random() < 0.3,
    )
    options["nesterov"] = bool(momentum) and options["dampening"] == 0 and rng.random() < 0.5
    if rng.random() < 0.3:
        options["grad_scale"] = torch.tensor(rng.choice([2.0, 1024.0, 0.5]), device=device)
    options.update(forced_options)

    def rand(shape, dt=dtype):
        return torch.randn(shape, generator=gen).to(device=device, dtype=dt)

    case = Case([], [], [], [], [], [], [], options)
    for shape in shapes:
        w = rand(shape)
        rows = num_rows(w)
        case.params.append(w)
        scale = options.get("grad_scale")
        case.grads.append(rand(shape) * (float(scale) if scale is not None else 1.0))
        first = rng.random() < 0.5 if momentum else False
        case.first_step.append(first)
        case.bufs.append(rand(shape) if momentum else None)
        use_lam = rng.random() < 0.7 if with_lam is None else with_lam
        kind = "row" if tuple(lam_kinds) == ("row",) else rng.choice(sorted(lam_kinds))
        case.lams.append(None if not use_lam else rand((rows,), torch.float32) if kind == "row"
                         else rand(tuple(w.shape), torch.float32))
        use_mask = rng.random() < 0.4 if with_mask is None else with_mask
        if use_mask:
            mask_shape = rng.choice([(rows,), tuple(w.shape)])
            case.masks.append((torch.rand(mask_shape, generator=gen) < 0.6).to(device))
        else:
            case.masks.append(None)
        use_norms = rng.random() < 0.5 if with_norms is None else with_norms
        case.norms.append(torch.full((rows, 3), float("nan"), device=device) if use_norms else None)
        if with_terms:
            _add_terms(case, rng, w, rows, with_terms, rand)
        if with_lam_cols is not False:
            use_cols = w.dim() >= 2 and (with_lam_cols or rng.random() < 0.5)
            case.terms.setdefault("lam_cols", [None] * (len(case.params) - 1)).append(
                rand((w.shape[1],), torch.float32) if use_cols else None)
    return case


def _add_terms(case: Case, rng: random.Random, w, rows: int, with_terms, rand) -> None:
    """Append one tensor's regularizer terms to `case.terms` (every list stays one per tensor)."""
    count = len(case.params) - 1  # tensors before this one
    for key, absent in (("l1s", None), ("polars", None), ("admm_targets", None), ("admm_rhos", 0.0),
                        ("prox_kinds", 0), ("prox_lams", None), ("clamps", None)):
        case.terms.setdefault(key, [absent] * count).append(absent)
    used = {t for t in TERMS if rng.random() < 0.5} if with_terms is True else set(with_terms)
    lr = float(case.options["lr"])
    if "l1" in used:
        case.terms["l1s"][-1] = rand((rows,), torch.float32).abs() * rng.choice([0.1, 1.0])
    if "polar" in used:  # (lam, t, m, s); strong enough to matter in one step
        case.terms["polars"][-1] = torch.tensor([rng.choice([0.05, 0.5]), rng.uniform(1.0, 1.5),
                                                 rng.uniform(-0.5, 0.5), rng.uniform(-0.3, 0.3)], device=w.device)
    if "admm" in used:
        case.terms["admm_targets"][-1] = rand(tuple(w.shape))
        case.terms["admm_rhos"][-1] = rng.choice([1e-3, 0.5, 2.0])
    if "prox" in used:  # thresholds lr * prox_lam up to ~1.5: many exact zeros
        case.terms["prox_kinds"][-1] = rng.choice([1, 2])
        case.terms["prox_lams"][-1] = rand((rows,), torch.float32).abs() * (rng.choice([0.3, 1.5]) / lr)
    if "clamp" in used:  # (0.1, ...) lifts pruned zeros: the mask must be applied again
        case.terms["clamps"][-1] = rng.choice([(0.0, 1.0), (-0.5, 0.3), (0.1, 0.8)])


def run(step: Callable, case: Case) -> Case:
    """Apply `step` (a function with reference.sgd_step's signature) to a copy."""
    out = case.clone()
    step(out.params, out.grads, out.bufs, lams=out.lams, masks=out.masks,
         norms=out.norms, first_step=out.first_step, **out.options, **out.terms)
    return out


def assert_same(actual: Case, expected: Case) -> None:
    for i, (a, e) in enumerate(zip(actual.params, expected.params)):
        rtol, atol = TOLERANCE[e.dtype]
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"param {i}: {m}")
        if e.dtype is not torch.float32 and e.numel():
            # one-ulp rounding differences are allowed, but only rarely
            differ = int((a != e).sum())
            assert differ <= max(2, 0.02 * e.numel()), f"param {i}: {differ} rounding differences"
    for i, (a, e) in enumerate(zip(actual.bufs, expected.bufs)):
        if e is not None:
            rtol, atol = TOLERANCE[e.dtype]
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"buf {i}: {m}")
    for i, (a, e) in enumerate(zip(actual.norms, expected.norms)):
        if e is not None:
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=lambda m: f"norms {i}: {m}")
    for i, (a, e) in enumerate(zip(actual.grads, expected.grads)):
        assert torch.equal(a, e), f"grad {i} was modified"
