"""The Triton `adam` kernel against the reference (docs/adam.md, regkern.reference.adam).

Without a GPU the kernels run on CPU tensors under ``TRITON_INTERPRET=1``
(set by tests/conftest.py before triton is imported, which also makes the
interpreter round bf16 like a GPU); with one they run on CUDA tensors.

Tolerances: fp32 W within 1e-6 of the step size ``lr`` (plus 1e-6 relative),
the moments within 1e-6 relative; in practice the interpreter (a true fma,
IEEE division and square root) matches the reference bit for bit, and a GPU
differs only where the float64 powers of the bias corrections round apart.
bf16 / fp16: one rounding of the same fp32 value, so a stored value may be
one ulp apart, rarely.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import random
from typing import List, Optional

import pytest
import torch

triton = pytest.importorskip("triton")

from regkern.backends.adam import build_adam_table
from regkern.layouts import ADAM_COLUMN  # noqa: E402
from regkern.reference import adam_step as reference_step  # noqa: E402
from regkern.reference.sgd import as_rows, num_rows  # noqa: E402
from sgd_cases import DTYPES, TERMS, make_case  # noqa: E402

from regkern.kernels import adam as triton_adam  # noqa: E402
from regkern.kernels import sgd as triton_sgd  # noqa: E402
from regkern.kernels.table_checks import TableError  # noqa: E402

INTERPRET = triton.knobs.runtime.interpret
DEVICE = "cpu" if INTERPRET else "cuda"
# The interpreter runs the norms' and group lasso's segmented scans one element
# at a time over the whole block: small blocks keep it quick.
BLOCK = 32 if INTERPRET else triton_adam.DEFAULT_BLOCK
if INTERPRET and type(triton_adam._adam_kernel).__name__ != "InterpretedFunction":
    triton_adam = importlib.reload(triton_adam)  # imported before TRITON_INTERPRET was set

# Shapes: 0-d, empty, vectors, 1-element rows, rows shorter and longer than a block.
SHAPES = [(), (0,), (7,), (5, 1), (3, 17), (4, 2, 3), (2, 45), (3, 0)]
ADAM_OPTIONS = ("lr", "beta1", "beta2", "eps", "weight_decay", "decay", "amsgrad", "maximize", "coupled",
                "grad_scale", "found_inf")


@dataclasses.dataclass
class AdamCase:
    params: List[torch.Tensor]
    grads: List[torch.Tensor]
    exp_avgs: List[torch.Tensor]
    exp_avg_sqs: List[torch.Tensor]
    max_exp_avg_sqs: List[Optional[torch.Tensor]]
    steps: List[torch.Tensor]
    lams: List[Optional[torch.Tensor]]
    masks: List[Optional[torch.Tensor]]
    norms: List[Optional[torch.Tensor]]
    options: dict
    terms: dict

    def clone(self) -> "AdamCase":
        return copy.deepcopy(self)

    def tensors(self):
        """Every tensor the step may write (grads too: it must not)."""
        for name in ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps", "norms"):
            for i, t in enumerate(getattr(self, name)):
                if t is not None:
                    yield f"{name}[{i}]", t


def make_adam_case(rng: random.Random, shapes, dtype, *, with_terms=False, variant="adamw", **forced) -> AdamCase:
    """The sgd cases' tensors and terms (``sgd_cases.make_case``) with Adam
    moments and step counts; ``variant``: "adam" (weight_decay), "adamw"
    (decay) or "both"; ``forced`` overrides the drawn options and the
    ``with_lam`` / ``with_mask`` / ``with_norms`` / ``lam_kinds`` /
    ``with_lam_cols`` choices of make_case."""
    case_keys = ("with_lam", "with_mask", "with_norms", "lam_kinds", "with_lam_cols")
    sgd = make_case(rng, shapes, dtype, DEVICE, momentum=0.0, with_terms=with_terms,
                    **{k: forced.pop(k) for k in case_keys if k in forced})
    gen = torch.Generator().manual_seed(rng.randrange(2**31))

    def rand(shape, scale=1.0):
        return (torch.randn(shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)

    amsgrad = forced.get("amsgrad", rng.random() < 0.3)
    options = dict(lr=sgd.options["lr"] * 0.1, beta1=rng.choice([0.9, 0.5, 0.0]), beta2=rng.choice([0.999, 0.99]),
                   eps=rng.choice([1e-8, 1e-3]), weight_decay=0.0, decay=0.0, amsgrad=amsgrad,
                   maximize=sgd.options["maximize"], coupled=rng.random() < 0.5)
    if variant in ("adam", "both"):
        options["weight_decay"] = rng.choice([5e-4, 0.1])
    if variant in ("adamw", "both"):
        options["decay"] = rng.choice([1e-2, 0.1])
    if "grad_scale" in sgd.options:
        options["grad_scale"] = sgd.options["grad_scale"]
    options.update(forced)
    m = [rand(w.shape, 0.1) for w in sgd.params]
    v = [rand(w.shape, 0.1).square() for w in sgd.params]
    vmax = [(t.float() + rand(t.shape, 0.1).float().square()).to(dtype) if amsgrad else None for t in v]
    steps = [torch.tensor(float(rng.choice([0, 1, 9, 999])), device=DEVICE) for _ in sgd.params]
    return AdamCase(sgd.params, sgd.grads, m, v, vmax, steps, sgd.lams, sgd.masks, sgd.norms, options,
                    dict(sgd.terms))


def run(step, case: AdamCase, steps: int = 1) -> AdamCase:
    """Apply ``step`` (reference.adam_step's signature) to a copy, ``steps``
    times (fresh gradients after the first)."""
    out = case.clone()
    for k in range(steps):
        if k:
            gen = torch.Generator().manual_seed(k)
            out.grads = [torch.randn(g.shape, generator=gen).to(g) for g in out.grads]
        step(out.params, out.grads, out.exp_avgs, out.exp_avg_sqs, out.max_exp_avg_sqs, out.steps,
             lams=out.lams, masks=out.masks, norms=out.norms, **out.options, **out.terms)
    return out


def triton_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1=0.9, beta2=0.999,
                eps=1e-8, weight_decay=0.0, decay=0.0, amsgrad=False, maximize=False, coupled=False, lams=None,
                masks=None, norms=None, grad_scale=None, found_inf=None, block=BLOCK,
                chunk=triton_adam.DEFAULT_CHUNK, **terms):
    """reference.adam_step's signature (``terms``: its regularizer keyword lists): one step per dtype."""
    count = len(params)
    lams, masks, norms = (x if x is not None else [None] * count for x in (lams, masks, norms))
    terms = {k: v for k, v in terms.items() if v is not None}
    for dtype in DTYPES:
        index = [i for i, w in enumerate(params) if w.dtype == dtype]
        if not index:
            continue
        pick = lambda values: [values[i] for i in index]  # noqa: E731
        table = build_adam_table(pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs),
                                 pick(max_exp_avg_sqs) if amsgrad else [None] * len(index), pick(steps),
                                 pick(lams), pick(masks), pick(norms), **{k: pick(v) for k, v in terms.items()})
        units = triton_adam.build_units(table, chunk)
        triton_adam.adam_step(table.to(DEVICE), dtype, units=units.to(DEVICE), block=block, lr=lr, beta1=beta1,
                              beta2=beta2, eps=eps, weight_decay=weight_decay, decay=decay, amsgrad=amsgrad,
                              maximize=maximize, coupled=coupled, grad_scale=grad_scale, found_inf=found_inf)


def _close_ulps(a, e, what):
    """bf16 / fp16: the same fp32 value rounded once; a one-ulp difference is allowed, rarely."""
    rtol = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[e.dtype]
    torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * 1e-2, msg=lambda m: f"{what}: {m}")
    if e.numel():
        differ = int((a != e).sum())
        assert differ <= max(2, 0.02 * e.numel()), f"{what}: {differ} of {e.numel()} rounding differences"


def assert_same(actual: AdamCase, expected: AdamCase, before: AdamCase) -> None:
    params_before = dict((w, t) for w, t in before.tensors() if w.startswith("params"))
    for (what, a), (_, e) in zip(actual.tensors(), expected.tensors()):
        if what.startswith("grads"):
            assert torch.equal(a, e), f"{what} was modified"
        elif what.startswith("steps"):
            assert torch.equal(a, e), f"{what}: {a} != {e}"
        elif what.startswith("norms"):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")
        elif e.dtype == torch.float32 and what.startswith("params"):
            # within 1e-6 of the step's size: torch's CPU sqrt (the reference) is not always
            # correctly rounded, an IEEE sqrt moves the update by an ulp now and then
            w0 = params_before[what]
            bound = 1e-6 * (w0.abs() + (e - w0).abs())
            excess = ((a - e).abs() - bound).nan_to_num(nan=0.0)
            assert torch.equal(a.isnan(), e.isnan()) and not bool((excess > 0).any()), \
                f"{what}: {int((excess > 0).sum())} elements beyond 1e-6 of the step, max |a - e| = " \
                f"{float((a - e).abs().nan_to_num().max())}"
        elif e.dtype == torch.float32:
            # the moments: within 1e-6 of the tensor's scale (an ulp of W from an earlier step's
            # sqrt reaches h through the decay and the terms)
            scale = float(e.abs().nan_to_num().max()) if e.numel() else 0.0
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6 * scale, msg=lambda m: f"{what}: {m}")
        else:
            _close_ulps(a, e, what)
    for i, (a, e) in enumerate(zip(actual.params, expected.params)):
        # exact zeros (masks, proximal maps) are the point: the same ones, not 1e-12
        assert torch.equal(a == 0, e == 0), f"param {i}: {int((a == 0).sum())} zeros, expected {int((e == 0).sum())}"


def check(case: AdamCase, steps: int = 1, **launch) -> AdamCase:
    expected = run(reference_step, case, steps)
    actual = run(lambda *a, **k: triton_step(*a, **k, **launch), case, steps)
    assert_same(actual, expected, case)
    return expected


VARIANTS = {
    # torch.optim.AdamW / Adam without extras
    "adamw": dict(variant="adamw", with_lam=False, with_mask=False, with_norms=False, amsgrad=False),
    "adam": dict(variant="adam", with_lam=False, with_mask=False, with_norms=False, amsgrad=False),
    # amsgrad, maximize, grad_scale, lam per row or element, masks and norms at random
    "amsgrad": dict(variant="both", amsgrad=True, maximize=True, grad_scale=torch.tensor(1024.0),
                    with_lam=None, with_mask=None, with_norms=None, lam_kinds=("row", "element")),
}


@pytest.mark.parametrize("coupled", [False, True], ids=["decoupled", "coupled"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype, variant, coupled):
    options = dict(VARIANTS[variant], coupled=coupled)
    if "grad_scale" in options:
        options["grad_scale"] = options["grad_scale"].to(DEVICE)
    case = make_adam_case(random.Random(f"{dtype}-{variant}-{coupled}"), SHAPES, dtype, **options)
    if "grad_scale" in options:
        case.grads = [g * 1024 for g in case.grads]
    expected = check(case, steps=2)
    assert [float(s) for s in expected.steps] == [float(s) + 2 for s in case.steps]


TERM_CASES = ["l1", "polar", "admm", "prox_l1", "prox_group", "clamp", "lam_cols"]


@pytest.mark.parametrize("coupled", [False, True], ids=["decoupled", "coupled"])
@pytest.mark.parametrize("term", TERM_CASES)
def test_term_alone(term, coupled):
    dtype = torch.float32
    rng = random.Random(f"{term}-{coupled}")
    name = term.split("_")[0]
    case = make_adam_case(rng, [(), (7,), (3, 17), (4, 2, 3), (2, 45)], dtype, coupled=coupled, lr=0.05,
                          with_terms=(name,) if name in TERMS else False, with_lam=False, with_mask=False,
                          with_norms=False, with_lam_cols=term == "lam_cols")
    if term.startswith("prox"):
        case.terms["prox_kinds"] = [1 if term == "prox_l1" else 2] * len(case.params)
    expected = check(case)
    plain = run(reference_step, dataclasses.replace(case.clone(), terms={}))
    assert any(not torch.equal(e, p) for e, p in zip(expected.params, plain.params)), "the term changed nothing"
    if term.startswith("prox"):
        assert any(bool((e == 0).any()) for e in expected.params), "no exact zeros to compare"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_terms(dtype):
    # every term, lam, lam_cols, masks, norms, grad_scale, amsgrad, maximize; coupled and decoupled tensors
    for coupled in (False, True):
        case = make_adam_case(random.Random(f"{dtype}-all-{coupled}"), SHAPES, dtype, with_terms=TERMS,
                              variant="both", coupled=coupled, amsgrad=True, maximize=True, with_lam=True,
                              with_mask=True, with_norms=True, with_lam_cols=True,
                              grad_scale=torch.tensor(0.5, device=DEVICE))
        check(case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_group_lasso_and_norms_rows_longer_than_a_block(dtype):
    # rows of 33 to 100 elements in blocks of 32 (two passes), rows that fit a block, units of one row
    # and of many; masks and norms
    shapes = [(3, 100), (2, 70), (4, 33), (1, 64), (16, 3), (6,), (2, 32)]
    for chunk in (32, 4096):
        case = make_adam_case(random.Random(f"{dtype}-group-{chunk}"), shapes, dtype, with_terms=("prox",),
                              with_mask=True, with_norms=True, with_lam=True, lr=0.1)
        case.terms["prox_kinds"] = [2] * len(shapes)
        expected = check(case, chunk=chunk)
        rows = [r for e in expected.params for r in as_rows(e)]
        zero = [bool((r == 0).all()) for r in rows]
        assert any(zero) and not all(zero), "want rows shrunk to 0 and rows kept"


def test_mixed_dtypes_small_units():
    # one table per dtype, units of 8 elements starting mid-row
    cases = [make_adam_case(random.Random(f"mixed-{d}"), [(3, 17), (8,), ()], d, lr=0.01, beta1=0.9,
                            amsgrad=True, with_norms=False) for d in DTYPES]
    mixed = cases[0].clone()
    for c in cases[1:]:
        for f in ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps", "lams", "masks",
                  "norms"):
            getattr(mixed, f).extend(getattr(c, f))
    check(mixed, chunk=8, block=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_found_inf_writes_nothing(dtype):
    case = make_adam_case(random.Random(f"found-inf-{dtype}"), [(4, 3, 3), (7,), (2, 45), ()], dtype,
                          amsgrad=True, with_norms=True, with_mask=True, with_terms=TERMS,
                          grad_scale=torch.tensor(2.0, device=DEVICE))
    case.options["found_inf"] = torch.tensor(1.0, device=DEVICE)
    skipped = run(triton_step, case)
    for (what, a), (_, e) in zip(skipped.tensors(), case.tensors()):
        assert torch.equal(a.isnan(), e.isnan()) and torch.equal(a.nan_to_num(), e.nan_to_num()), what
    case.options["found_inf"] = torch.tensor(0.0, device=DEVICE)
    check(case)


def test_tensor_lr_and_several_steps():
    case = make_adam_case(random.Random("tensor-lr"), [(5, 40), (7,), ()], torch.float32, amsgrad=True,
                          variant="both")
    for s in case.steps:
        s.zero_()  # torch's first step: t = 1, the bias corrections matter most
    case.options["lr"] = torch.tensor(0.05, device=DEVICE)
    expected = check(case, steps=3)
    assert [float(s) for s in expected.steps] == [3.0, 3.0, 3.0]
    case.options["lr"] = torch.tensor(0.05, dtype=torch.float64)  # a CPU scalar
    check(case)


def test_empty_tables_and_tensors():
    # only empty and 0-d tensors; an empty table
    case = make_adam_case(random.Random("empty"), [(0,), (3, 0), ()], torch.float32, with_norms=True)
    expected = check(case)
    assert float(expected.steps[0]) == float(case.steps[0]) + 1  # empty tensors count their steps too
    # a tensor of empty rows without a step count still has its norms zeroed
    w = torch.zeros(3, 0, device=DEVICE)
    norms = torch.full((3, 3), float("nan"), device=DEVICE)
    table = build_adam_table([w], [w], [w], [w], [None], [torch.zeros((), device=DEVICE)], [None], [None], [norms])
    table[0, ADAM_COLUMN["STEP"]] = 0
    triton_adam.adam_step(table.to(DEVICE), torch.float32, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8,
                          weight_decay=0.0, decay=0.0, amsgrad=False, maximize=False, coupled=False)
    assert torch.equal(norms, torch.zeros(3, 3, device=DEVICE))
    table = build_adam_table([], [], [], [], [], [], [], [], [])
    assert triton_adam.build_units(table).shape == (0, triton_adam.UNIT_FIELDS)
    triton_adam.adam_step(table.to(DEVICE), torch.float32, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8,
                          weight_decay=0.0, decay=0.0, amsgrad=False, maximize=False, coupled=False)


def test_units_are_the_sgd_kernels():
    tensors = [torch.zeros(s) for s in [(), (0,), (7,), (33, 129), (2, 1000), (3, 0)]]
    count = len(tensors)
    norms = [torch.zeros(num_rows(t), 3) if i % 2 else None for i, t in enumerate(tensors)]
    terms = dict(prox_kinds=[2 if i % 3 == 0 else 0 for i in range(count)],
                 prox_lams=[torch.zeros(num_rows(t)) if i % 3 == 0 else None for i, t in enumerate(tensors)])
    adam = build_adam_table(tensors, tensors, tensors, tensors, [None] * count, [torch.zeros(())] * count,
                            [None] * count, [None] * count, norms, **terms)
    for chunk in (1, 100, 4096):
        assert torch.equal(triton_adam.build_units(adam, chunk),
                           triton_sgd.work_units(adam[:, :len(triton_sgd.SGD_FIELDS)], chunk))


# Refusals: a table the kernel cannot step is refused before anything is written.

def _refusal_case(amsgrad=True):
    return make_adam_case(random.Random("refuse"), [(3, 5), (4,)], torch.float32, amsgrad=amsgrad,
                          with_mask=True, with_lam=True, with_norms=True)


def _table(case, amsgrad=True):
    return build_adam_table(case.params, case.grads, case.exp_avgs, case.exp_avg_sqs,
                            case.max_exp_avg_sqs if amsgrad else [None] * len(case.params), case.steps,
                            case.lams, case.masks, case.norms, **case.terms)


def _other_step(table, case):
    table[1, ADAM_COLUMN["STEP"]] = table[0, ADAM_COLUMN["STEP"]]


BAD_TABLES = {
    # name: (edit of the table, refused column, amsgrad of the launch)
    "prox kind": (lambda t, c: t.__setitem__((0, ADAM_COLUMN["PROX"]), 3), "PROX", True),
    "mask kind": (lambda t, c: t.__setitem__((1, ADAM_COLUMN["MASK_KIND"]), 7), "MASK_KIND", True),
    "first flag": (lambda t, c: t.__setitem__((0, ADAM_COLUMN["FIRST"]), 1), "FIRST", True),
    "momentum buffer": (lambda t, c: t.__setitem__((1, ADAM_COLUMN["BUF"]), c.exp_avgs[1].data_ptr()), "BUF",
                        True),
    "no exp_avg": (lambda t, c: t.__setitem__((1, ADAM_COLUMN["EXP_AVG"]), 0), "EXP_AVG", True),
    "no exp_avg_sq": (lambda t, c: t.__setitem__((0, ADAM_COLUMN["EXP_AVG_SQ"]), 0), "EXP_AVG_SQ", True),
    "amsgrad without max": (lambda t, c: t.__setitem__((1, ADAM_COLUMN["MAX_EXP_AVG_SQ"]), 0), "MAX_EXP_AVG_SQ",
                            True),
    "no step": (lambda t, c: t.__setitem__((0, ADAM_COLUMN["STEP"]), 0), "STEP", True),
    "shared step": (_other_step, "STEP", True),
    "sizes": (lambda t, c: t.__setitem__((0, ADAM_COLUMN["NUMEL"]), 16), "NUMEL", True),
    "dtype": (lambda t, c: t.__setitem__((1, ADAM_COLUMN["DTYPE"]), 1), "DTYPE", True),
}


@pytest.mark.parametrize("bad", BAD_TABLES)
def test_bad_table_is_refused_before_anything_is_written(bad):
    edit, column, amsgrad = BAD_TABLES[bad]
    case = _refusal_case()
    before = case.clone()
    table = _table(case)
    edit(table, case)
    with pytest.raises(TableError) as refused:
        triton_adam.adam_step(table.to(DEVICE), torch.float32, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8,
                              weight_decay=0.0, decay=0.01, amsgrad=amsgrad, maximize=False, coupled=False)
    assert refused.value.column == column and "adam table row" in str(refused.value)
    for (what, a), (_, e) in zip(case.tensors(), before.tensors()):
        assert torch.equal(a.nan_to_num(), e.nan_to_num()), f"{what} changed"


def test_bad_table_refused_by_build_units_and_wrong_dtype():
    case = _refusal_case()
    table = _table(case)
    table[0, ADAM_COLUMN["PROX"]] = 5
    with pytest.raises(TableError):
        triton_adam.build_units(table)
    with pytest.raises(TypeError):
        triton_adam.adam_step(_table(case), torch.float64, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8,
                              weight_decay=0.0, decay=0.0, amsgrad=True, maximize=False, coupled=False)
    with pytest.raises(ValueError, match="int64 of shape"):
        triton_adam.check_table(_table(case)[:, :-1])
    # a table without amsgrad's moment is fine for a step without amsgrad
    triton_adam.check_table(_table(case, amsgrad=False), torch.float32, amsgrad=False)


def test_adam_terms_are_those_tested():
    assert set(triton_adam.ADAM_TERMS) == set(TERMS)
