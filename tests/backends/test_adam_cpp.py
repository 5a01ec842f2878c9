"""The C++ CPU `adam` kernel (regkern._C.adam_step) against the reference
(regkern.reference.adam_step, docs/adam.md).

Every instruction-set variant the CPU can run is forced in turn. W, the
moments (exp_avg, exp_avg_sq, max_exp_avg_sq) and the step counts must equal
the reference bit for bit, for fp32, bf16 and fp16 storage, with every
regularizer term of the sgd family alone and together, coupled and
decoupled, Adam (weight_decay) and AdamW (decay), amsgrad, maximize,
grad_scale, both forms of torch's lerp (beta1 above and below 0.5), over
several steps and 1, 2 or 3 threads (cuts inside rows). The row norms are
summed in another order (within tolerance, of the W actually stored), and W
under the group-lasso prox may differ by an ulp or two of its row's scale
(its row norm is summed in another order), as for the sgd kernel
(tests/test_sgd_cpp.py): there W must agree within 4e-6 * max_j |x_rj| +
2 eps(dtype) |W| (x: the updated row before the prox), the exact zeros must
be the same, and the moments are still bit-identical.

A refused table (TableError, naming the row and the column) changes nothing.
"""
import random

import pytest
import torch

from regkern.layouts import DTYPE_CODE
from regkern.backends.adam import build_adam_table
from regkern.layouts import ADAM_COLUMN, ADAM_FIELDS
from regkern.reference import adam_step as reference_step
from regkern.reference.sgd import as_rows

_C = pytest.importorskip("regkern._C", reason="the C++ extension is not built (pip install -e .)")

ISAS = _C._available_isas()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(), (0,), (0, 3), (1,), (7,), (5, 1), (3, 17), (33, 129), (8, 5, 3, 3), (2, 1100), (1, 300)]
# what a case can carry (make_case's `terms`)
TERMS = ("lam_row", "lam_elem", "lam_cols", "l1", "polar", "admm", "prox1", "prox2", "clamp",
         "mask_row", "mask_elem", "norms")
STATE = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps")


@pytest.fixture(params=ISAS)
def isa(request):
    before = _C.isa()
    _C._set_isa(request.param)
    yield request.param
    _C._set_isa(before)


def make_case(shapes, dtype, seed, terms=(), amsgrad=False):
    """Tensors of every shape with the given terms (a dict of the reference's keyword lists)."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)

    def rand(shape, scale=1.0):
        return (torch.randn(shape, generator=gen) * scale).to(dtype)

    case = {k: [] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps", "lams",
                            "lam_cols", "masks", "norms", "l1s", "polars", "admm_targets", "admm_rhos",
                            "prox_kinds", "prox_lams", "clamps")}
    for shape in shapes:
        w = rand(shape)
        rows = w.shape[0] if w.dim() else 1
        case["params"].append(w)
        case["grads"].append(rand(shape, rng.choice([1e-3, 1.0])))
        case["exp_avgs"].append(rand(shape, 0.1))
        case["exp_avg_sqs"].append((torch.rand(shape, generator=gen) * 0.01).to(dtype))
        case["max_exp_avg_sqs"].append((torch.rand(shape, generator=gen) * 0.02).to(dtype) if amsgrad else None)
        case["steps"].append(torch.tensor(float(rng.randint(0, 5))))
        lam = None
        if "lam_row" in terms:
            lam = torch.rand(rows, generator=gen) * 2
        if "lam_elem" in terms:
            lam = torch.rand(shape, generator=gen) * 2
        case["lams"].append(lam)
        case["lam_cols"].append(torch.rand(shape[1], generator=gen) * 2 if "lam_cols" in terms and len(shape) >= 2
                                else None)
        mask = None
        if "mask_row" in terms:
            mask = torch.rand(rows, generator=gen) > 0.3
        if "mask_elem" in terms:
            mask = torch.rand(shape, generator=gen) > 0.3
        case["masks"].append(mask)
        case["norms"].append(torch.full((rows, 3), -1.0) if "norms" in terms else None)
        case["l1s"].append(torch.rand(rows, generator=gen) if "l1" in terms else None)
        case["polars"].append(torch.tensor([rng.choice([0.05, 0.5]), rng.uniform(1.0, 1.5), rng.uniform(0.0, 0.5),
                                            rng.uniform(-0.2, 0.2)]) if "polar" in terms else None)
        case["admm_targets"].append(rand(shape) if "admm" in terms else None)
        case["admm_rhos"].append(rng.choice([0.3, 1.7]) if "admm" in terms else 0.0)
        kind = 1 if "prox1" in terms else 2 if "prox2" in terms else 0
        case["prox_kinds"].append(kind)
        # strong enough to zero some elements (rows) in one step
        scale = 60.0 if kind == 1 else 150.0
        case["prox_lams"].append(torch.rand(rows, generator=gen) * scale if kind else None)
        case["clamps"].append((rng.uniform(-1.5, -0.2), rng.uniform(0.2, 1.5)) if "clamp" in terms else None)
    return case


def clone(case):
    return {k: [t.clone() if isinstance(t, torch.Tensor) else t for t in v] for k, v in case.items()}


def ref_step(case, **opts):
    c = case
    opts = dict(opts)
    opts.setdefault("lr", 0.01)
    reference_step(c["params"], c["grads"], c["exp_avgs"], c["exp_avg_sqs"], c["max_exp_avg_sqs"], c["steps"],
                   lams=c["lams"], lam_cols=c["lam_cols"], masks=c["masks"], norms=c["norms"], l1s=c["l1s"],
                   polars=c["polars"], admm_targets=c["admm_targets"], admm_rhos=c["admm_rhos"],
                   prox_kinds=c["prox_kinds"], prox_lams=c["prox_lams"], clamps=c["clamps"],
                   grad_scale=None if opts.get("grad_scale") is None else torch.tensor(opts["grad_scale"]),
                   **{k: v for k, v in opts.items() if k != "grad_scale"})


def table_of(case, amsgrad):
    c = case
    return build_adam_table(c["params"], c["grads"], c["exp_avgs"], c["exp_avg_sqs"],
                            c["max_exp_avg_sqs"] if amsgrad else [None] * len(c["params"]), c["steps"], c["lams"],
                            c["masks"], c["norms"], l1s=c["l1s"], polars=c["polars"],
                            admm_targets=c["admm_targets"], admm_rhos=c["admm_rhos"], prox_kinds=c["prox_kinds"],
                            prox_lams=c["prox_lams"], clamps=c["clamps"], lam_cols=c["lam_cols"])


def cpp_step(case, num_threads=2, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decay=0.0,
             amsgrad=False, maximize=False, coupled=False, grad_scale=None):
    table = table_of(case, amsgrad)
    # `table` and the tensors stay referenced until the call returns
    _C.adam_step(table.data_ptr(), *table.shape, float(lr), beta1, beta2, eps, weight_decay, decay,
                 amsgrad, maximize, coupled, 1.0 if grad_scale is None else float(grad_scale), num_threads)


def _bits(t):
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def check(case, steps=1, num_threads=2, **opts):
    """Step copies of `case` with both backends `steps` times and compare; return the C++ result."""
    expected, actual = clone(case), clone(case)
    group = {i for i, k in enumerate(case["prox_kinds"]) if k == 2}
    for _ in range(steps):
        before = clone(expected)
        ref_step(expected, **opts)
        cpp_step(actual, num_threads=num_threads, **opts)
        for i, (a, e) in enumerate(zip(actual["params"], expected["params"])):
            assert torch.equal(a == 0, e == 0), f"param {i}: {int((a == 0).sum())} zeros, expected {int((e == 0).sum())}"
            if i not in group:
                assert _bits(a) == _bits(e), f"param {i} ({e.dtype} {tuple(e.shape)}) differs from the reference"
        for what in STATE[1:]:
            for i, (a, e) in enumerate(zip(actual[what], expected[what])):
                if e is not None and (what != "max_exp_avg_sqs" or opts.get("amsgrad")):
                    assert _bits(a) == _bits(e), f"{what} {i} ({e.dtype} {tuple(e.shape)}) differs from the reference"
        assert all(torch.equal(a, e) for a, e in zip(actual["grads"], expected["grads"]))
        if group:
            _check_group_lasso(before, actual, expected, group, opts)
        for i, (a, e) in enumerate(zip(actual["norms"], expected["norms"])):
            if e is not None:
                stored = as_rows(actual["params"][i].to(torch.float32)).abs()
                want = torch.stack([stored.sum(1), stored.square().sum(1).sqrt(),
                                    stored.sum(1) / max(1, stored.shape[1])], dim=1) if stored.numel() else e
                torch.testing.assert_close(a, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"norms {i}: {m}")
        if group:  # group-lasso W may differ by ulps: carry on from the reference's state
            actual = clone(expected)
    return actual


def _check_group_lasso(before, actual, expected, group, opts):
    unscaled = clone(before)
    for i in group:  # the updated rows before the prox (and the clamp, which only shrinks differences)
        unscaled["prox_kinds"][i] = 0
        unscaled["clamps"][i] = None
    ref_step(unscaled, **opts)
    for i in sorted(group):
        a, e = (as_rows(t.to(torch.float64)) for t in (actual["params"][i], expected["params"][i]))
        if not e.numel():
            continue
        x = as_rows(unscaled["params"][i].to(torch.float64)).abs().amax(dim=1, keepdim=True)
        bound = 4e-6 * x + 2 * torch.finfo(expected["params"][i].dtype).eps * e.abs()
        worst = float(((a - e).abs() - bound).max())
        assert worst <= 0, f"param {i} {tuple(e.shape)}: group lasso off the reference by {worst} beyond the bound"


# --------------------------------------------------------------------------
# Module surface


def test_table_columns_mirror_layouts():
    assert tuple(_C.ADAM_FIELDS) == ADAM_FIELDS
    assert len(ADAM_FIELDS) == 29 and ADAM_FIELDS[:25] == tuple(_C.SGD_FIELDS)


def test_terms_are_exported():
    assert set(_C.ADAM_TERMS) == {"l1", "polar", "admm", "prox", "clamp"}
    assert _C._adam_sqrt() in ("mkl", "ieee")


def test_no_tensors_is_a_no_op():
    table = torch.empty(0, len(ADAM_FIELDS), dtype=torch.int64)
    _C.adam_step(table.data_ptr(), 0, len(ADAM_FIELDS), 0.1, 0.9, 0.999, 1e-8, 0.0, 0.0, False, False, False, 1.0, 2)


# --------------------------------------------------------------------------
# Bit identity


@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_adam_and_adamw(isa, dtype):
    case = make_case(SHAPES, dtype, 1)
    check(case, decay=0.01)                         # AdamW
    check(case, weight_decay=0.05)                  # Adam's L2 decay
    check(case, steps=3, beta1=0.3, eps=1e-3)       # torch's other lerp form, several steps


@pytest.mark.parametrize("term", TERMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_term_alone(isa, dtype, term):
    case = make_case(SHAPES, dtype, 2 + TERMS.index(term), terms=(term,))
    check(case, decay=0.01, coupled=False)
    check(case, weight_decay=0.01, coupled=True)


@pytest.mark.parametrize("prox", ["prox1", "prox2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_terms_together(isa, dtype, prox):
    for seed, lam, mask in ((20, "lam_row", "mask_row"), (21, "lam_elem", "mask_elem")):
        case = make_case(SHAPES, dtype, seed, amsgrad=True,
                         terms=(lam, "lam_cols", "l1", "polar", "admm", prox, "clamp", mask, "norms"))
        for coupled in (False, True):
            check(case, amsgrad=True, coupled=coupled, decay=0.01, weight_decay=0.02, grad_scale=4.0, maximize=True)


OPTIONS = [
    dict(decay=0.01),
    dict(weight_decay=0.1, amsgrad=True),
    dict(decay=0.1, maximize=True, grad_scale=1024.0),
    dict(beta1=0.2, beta2=0.5, eps=1e-6, amsgrad=True, coupled=True),
    dict(beta1=0.0, lr=0.3, weight_decay=0.01, decay=0.01, grad_scale=0.5),
]


@pytest.mark.parametrize("options", OPTIONS, ids=[",".join(o) for o in OPTIONS])
@pytest.mark.parametrize("dtype", DTYPES)
def test_options_over_steps(isa, dtype, options):
    terms = ("lam_row", "mask_row", "l1", "clamp", "norms")
    case = make_case(SHAPES, dtype, 40, terms=terms, amsgrad=options.get("amsgrad", False))
    out = check(case, steps=3, **options)
    assert all(float(s) == float(s0) + 3 for s, s0 in zip(out["steps"], case["steps"]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_cases(dtype):
    rng = random.Random(7 + DTYPES.index(dtype))
    for trial in range(12):
        _C._set_isa(rng.choice(ISAS))
        try:
            terms = tuple(t for t in TERMS if rng.random() < 0.3)
            if "prox1" in terms and "prox2" in terms:
                terms = tuple(t for t in terms if t != "prox2")
            if "lam_row" in terms and "lam_elem" in terms:
                terms = tuple(t for t in terms if t != "lam_elem")
            if "mask_row" in terms and "mask_elem" in terms:
                terms = tuple(t for t in terms if t != "mask_elem")
            shapes = rng.sample(SHAPES, 5) + [(rng.randint(1, 40), rng.randint(1, 3000))]
            amsgrad = rng.random() < 0.5
            opts = dict(amsgrad=amsgrad, coupled=rng.random() < 0.5, maximize=rng.random() < 0.3,
                        beta1=rng.choice([0.9, 0.4]), decay=rng.choice([0.0, 0.01]),
                        weight_decay=rng.choice([0.0, 0.02]), grad_scale=rng.choice([None, 8.0]))
            check(make_case(shapes, dtype, 100 + trial, terms=terms, amsgrad=amsgrad),
                  steps=rng.choice([1, 2]), num_threads=rng.randint(1, 3), **opts)
        finally:
            _C._set_isa(ISAS[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_thread_count_does_not_change_results(dtype):
    """Shares are cut mid-tensor and mid-row (row-aligned with norms or the group lasso)."""
    for seed, terms in ((50, ("lam_row", "lam_cols", "l1", "mask_elem")), (51, ("lam_row", "prox2", "norms")),
                        (52, ("prox1", "clamp", "norms", "mask_row"))):
        case = make_case([(40, 1500), (3, 7, 1000), (5,)], dtype, seed, terms=terms, amsgrad=True)
        outs = []
        for n in (1, 2, 3):
            out = clone(case)
            cpp_step(out, num_threads=n, amsgrad=True, decay=0.01)
            outs.append(out)
        for out in outs[1:]:
            for what in STATE + ("norms",):
                for a, e in zip(out[what], outs[0][what]):
                    assert e is None or _bits(a) == _bits(e), what
        check(case, num_threads=3, amsgrad=True, decay=0.01)


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_lasso_rows_longer_than_the_buffer(dtype):
    case = make_case([(2, 70000), (3, 2000), (1, 65536)], dtype, 60, terms=("prox2", "lam_row", "norms", "clamp"))
    check(case, num_threads=2, decay=0.01)
    check(case, num_threads=1, coupled=True, amsgrad=False, beta1=0.3)


def test_square_roots_off_the_fast_path():
    """Second moments that are zero, subnormal or near FLT_MAX take MKL's own
    special cases (the kernel hands them to vmsSqrt): still torch's bits."""
    case = make_case([(4, 300), (37,)], torch.float32, 70)
    for v in case["exp_avg_sqs"]:
        flat = v.view(-1)
        flat[::3] = 0.0
        flat[1::7] = 1e-41
        flat[2::11] = 3.0e38
    for g in case["grads"]:
        g.view(-1)[::2] = 0.0
    check(case, decay=0.01)
    check(case, amsgrad=False, beta2=0.5)


def test_masked_rows_stay_zero_over_steps():
    case = make_case([(6, 50), (4, 3, 3, 3)], torch.float32, 80, terms=("mask_row", "lam_row"))
    out = check(case, steps=2, decay=0.01)
    for w, m, v, mask in zip(out["params"], out["exp_avgs"], out["exp_avg_sqs"], case["masks"]):
        for t in (w, m, v):
            assert not as_rows(t)[~mask].any()


# --------------------------------------------------------------------------
# Refusals: TableError, nothing written


def _two_rows(amsgrad=True):
    case = make_case([(3, 17), (5, 4)], torch.float32, 90, terms=("lam_row",), amsgrad=amsgrad)
    return case, table_of(case, amsgrad)


@pytest.mark.parametrize("column, value, amsgrad, refused", [
    ("BUF", 1, False, "BUF"), ("FIRST", 1, False, "FIRST"), ("EXP_AVG", 0, False, "EXP_AVG"),
    ("EXP_AVG_SQ", 0, False, "EXP_AVG_SQ"), ("STEP", 0, False, "STEP"), ("MAX_EXP_AVG_SQ", 0, True, "MAX_EXP_AVG_SQ"),
    ("DTYPE", 7, False, "DTYPE"), ("LAM_KIND", 0, False, "LAM"), ("PROX", 5, False, "PROX"),
    ("NUMEL", 21, False, "NUMEL"),
])
def test_bad_table_raises_and_writes_nothing(column, value, amsgrad, refused):
    case, table = _two_rows(amsgrad)
    if column == "BUF":
        value = case["params"][1].data_ptr()
    before = clone(case)
    table[1, ADAM_COLUMN[column]] = value
    with pytest.raises(_C.TableError) as err:
        _C.adam_step(table.data_ptr(), *table.shape, 0.1, 0.9, 0.999, 1e-8, 0.0, 0.01, amsgrad, False, False, 1.0, 2)
    assert err.value.row == 1 and err.value.column == refused
    with pytest.raises(_C.TableError) as err2:
        _C.check_adam_table(table.data_ptr(), *table.shape, amsgrad)
    assert (err2.value.row, err2.value.column) == (1, refused)
    assert "adam table row 1" in str(err.value)
    for what in STATE + ("grads",):
        for a, e in zip(case[what], before[what]):
            assert e is None or _bits(a) == _bits(e), f"{what} was written"


def test_check_table_accepts_good_tables_and_empty_tensors():
    case, table = _two_rows(True)
    _C.check_adam_table(table.data_ptr(), *table.shape, True)
    _C.check_adam_table(table.data_ptr(), *table.shape, False)
    # a tensor without elements needs no moments and no step count
    empty = torch.empty(0, 3)
    t = build_adam_table([empty], [empty], [None], [None], [None], [None], [None], [None], [None])
    _C.check_adam_table(t.data_ptr(), *t.shape, True)
    _C.adam_step(t.data_ptr(), *t.shape, 0.1, 0.9, 0.999, 1e-8, 0.0, 0.01, True, False, False, 1.0, 2)
    assert int(t[0, ADAM_COLUMN["DTYPE"]]) == DTYPE_CODE[torch.float32]
