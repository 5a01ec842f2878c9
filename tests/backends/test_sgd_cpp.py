"""The C++ CPU `sgd` kernel (regkern._C) against the reference (docs/sgd.md, docs/regularizers.md).

Every instruction-set variant the CPU can run (AVX-512, AVX2, baseline) is
forced in turn, so the fallbacks are checked too. W and the momentum buffer
must equal the reference bit for bit (same fp32 operations, one rounding to
the storage dtype); the row norms, summed in another order, within tolerance.

Regularizer terms (L1 subgradient, polarization, ADMM pull, proximal maps,
clamp) are bit-identical too, except W under the group-lasso prox: its row
norm ||W_r|| is summed in another order than torch's, so the row's scale
1 - thr sqrt(n_r) / ||W_r|| may differ by an ulp or two. There W must agree
within 4e-6 * max_j |x_rj| + 2 eps(dtype) |W| per element (x: the updated
row before the prox, so the bound holds even where the scale is near 0), the
exact zeros (whole rows) must be the same, the momentum buffer is still
bit-identical, and the row norms must be those of the W actually stored.
"""
import ast
import math
import os
import random
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

from regkern.layouts import DTYPE_CODE, SGD_FIELDS
from regkern.backends.sgd import build_sgd_table
from regkern.reference import sgd_step as reference_step
from regkern.reference.sgd import as_rows
from sgd_cases import DTYPES, SHAPES, TERMS, Case, assert_same, make_case, run

_C = pytest.importorskip("regkern._C", reason="the C++ extension is not built (pip install -e .)")

ISAS = _C._available_isas()


def cpp_step(params, grads, momentum_buffers, *, lr, momentum=0.0, dampening=0.0, nesterov=False,
             weight_decay=0.0, maximize=False, first_step=False, lams=None, masks=None, norms=None,
             grad_scale=None, found_inf=None, num_threads=2, l1s=None, polars=None, admm_targets=None,
             admm_rhos=None, prox_kinds=None, prox_lams=None, clamps=None, lam_cols=None):
    """reference.sgd_step's signature, stepped by one regkern._C.sgd_step call."""
    if found_inf is not None and bool(found_inf.item()):
        return
    count = len(params)
    firsts = [first_step] * count if isinstance(first_step, bool) else list(first_step)
    none = [None] * count
    table = build_sgd_table(params, grads, momentum_buffers, lams or none, masks or none,
                            norms or none, firsts, l1s=l1s, polars=polars, admm_targets=admm_targets,
                            admm_rhos=admm_rhos, prox_kinds=prox_kinds, prox_lams=prox_lams,
                            clamps=clamps, lam_cols=lam_cols)
    scale = 1.0 if grad_scale is None else float(grad_scale)
    # `table` and the tensors stay referenced until the call returns
    _C.sgd_step(table.data_ptr(), count, table.shape[1], float(lr), float(momentum), float(dampening),
                bool(nesterov), float(weight_decay), bool(maximize), scale, num_threads)


def check(case: Case, **step_options) -> Case:
    """Step `case` with both backends and compare; return the C++ result.
    Bit for bit, except W under the group-lasso prox (see the module docstring)."""
    expected = run(reference_step, case)
    actual = run(lambda *a, **k: cpp_step(*a, **k, **step_options), case)
    group = _group_lasso(case)
    exact = [i for i in range(len(case.params)) if i not in group]
    assert_same(_subset(actual, exact), _subset(expected, exact))
    for what, got, want in (("param", actual.params, expected.params), ("buf", actual.bufs, expected.bufs)):
        for i, (a, e) in enumerate(zip(got, want)):
            if e is not None and (what == "buf" or i not in group):
                assert _bits(a) == _bits(e), f"{what} {i} ({e.dtype} {tuple(e.shape)}) differs from the reference"
    for i, (a, e) in enumerate(zip(actual.params, expected.params)):
        # exact zeros (masks, proximal maps) are the point: the same ones, not 1e-12
        assert torch.equal(a == 0, e == 0), f"param {i}: {int((a == 0).sum())} zeros, expected {int((e == 0).sum())}"
    if group:
        _check_group_lasso(case, actual, expected, group)
    return actual


def _group_lasso(case: Case) -> set:
    return {i for i, kind in enumerate(case.terms.get("prox_kinds") or []) if kind == 2}


def _subset(case: Case, index) -> Case:
    pick = lambda values: [values[i] for i in index]  # noqa: E731
    return Case(pick(case.params), pick(case.grads), pick(case.bufs), pick(case.lams), pick(case.masks),
                pick(case.norms), pick(case.first_step), case.options)


def _check_group_lasso(case: Case, actual: Case, expected: Case, group) -> None:
    """W of group-lasso tensors within the documented bound, norms of the stored W."""
    unscaled = case.clone()
    for i in group:  # the updated rows before the prox (and the clamp, which only shrinks differences)
        unscaled.terms["prox_kinds"][i] = 0
        if unscaled.terms.get("clamps"):
            unscaled.terms["clamps"][i] = None
    x_all = run(reference_step, unscaled).params
    for i in sorted(group):
        a, e = (as_rows(t.to(torch.float64)) for t in (actual.params[i], expected.params[i]))
        if not e.numel():
            continue
        x = as_rows(x_all[i].to(torch.float64)).abs().amax(dim=1, keepdim=True)
        bound = 4e-6 * x + 2 * torch.finfo(expected.params[i].dtype).eps * e.abs()
        worst = float(((a - e).abs() - bound).max())
        assert worst <= 0, f"param {i} {tuple(e.shape)}: group lasso off the reference by {worst} beyond the bound"
        assert torch.equal(actual.grads[i], expected.grads[i]), f"grad {i} was modified"
        if actual.norms[i] is not None:
            stored = a.abs()
            l1 = stored.sum(dim=1)
            want = torch.stack([l1, stored.square().sum(dim=1).sqrt(), l1 / stored.shape[1]], dim=1)
            torch.testing.assert_close(actual.norms[i], want.to(torch.float32), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"norms {i}: {m}")


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture(params=ISAS)
def isa(request):
    before = _C.isa()
    _C._set_isa(request.param)
    yield request.param
    _C._set_isa(before)


# --------------------------------------------------------------------------
# Module surface


def test_table_columns_mirror_backend():
    assert tuple(_C.SGD_FIELDS) == SGD_FIELDS


def test_isa_is_the_best_supported_variant():
    assert ISAS and ISAS[-1] == "default"
    assert _C.isa() == ISAS[0]
    assert set(ISAS) <= {"avx512f", "avx2", "default"}
    with pytest.raises(ValueError):
        _C._set_isa("sse9")


_MAPS_SCRIPT = """
import torch, regkern._C
print(sorted({line.split()[-1] for line in open('/proc/self/maps') if 'libgomp' in line}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
def test_one_openmp_runtime_shared_with_torch():
    """regkern._C links libgomp.so.1; torch has already loaded its own copy with
    that SONAME, so the loader must reuse it: one runtime, one thread pool.
    Checked in a fresh interpreter (other test modules may load other things)."""
    out = subprocess.run([sys.executable, "-c", _MAPS_SCRIPT], capture_output=True, text=True, check=True)
    gomp = ast.literal_eval(out.stdout.strip())
    assert len(gomp) == 1, f"several OpenMP runtimes loaded: {gomp}"
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    if os.path.exists(os.path.join(torch_lib, "libgomp.so.1")):
        assert os.path.dirname(gomp[0]) == torch_lib, gomp


def test_no_tensors_is_a_no_op():
    _C.sgd_step(0, 0, len(SGD_FIELDS), 0.1, 0.9, 0.0, False, 0.0, False, 1.0, 2)


# --------------------------------------------------------------------------
# Against the reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_each_shape(isa, shape, dtype):
    for seed in range(4):
        check(make_case(random.Random(f"{shape}-{dtype}-{seed}"), [shape], dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", range(4))
def test_all_shapes_in_one_call(isa, dtype, seed):
    check(make_case(random.Random(seed), SHAPES, dtype))


OPTION_SETS = [
    dict(momentum=0.0),
    dict(momentum=0.9, dampening=0.0, nesterov=False),
    dict(momentum=0.9, dampening=0.0, nesterov=True),
    dict(momentum=0.9, dampening=0.3, nesterov=False),
    dict(momentum=0.5, dampening=0.0, nesterov=True, maximize=True),
    dict(momentum=0.9, weight_decay=0.0, maximize=True, grad_scale=torch.tensor(1024.0)),
    dict(momentum=0.0, weight_decay=0.1, grad_scale=torch.tensor(0.5)),
]


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_options(options, dtype):
    for first in (False, True):
        rng = random.Random(f"{options}-{first}")
        case = make_case(rng, SHAPES, dtype, with_lam=True, with_mask=True, with_norms=True, **options)
        case.first_step = [first] * len(case.params)
        check(case)


def test_mixed_dtypes_in_one_table():
    options = dict(momentum=0.9, lr=0.1, dampening=0.0, weight_decay=5e-4, maximize=False, nesterov=True)
    parts = [make_case(random.Random(i), SHAPES, dtype, **options) for i, dtype in enumerate(DTYPES)]
    merged = Case(*[sum((getattr(p, f) for p in parts), []) for f in
                    ("params", "grads", "bufs", "lams", "masks", "norms", "first_step")], options)
    check(merged)


def test_found_inf_skips_everything():
    case = make_case(random.Random(0), SHAPES, torch.float32, momentum=0.9, with_norms=True,
                     found_inf=torch.tensor(1.0))
    out = run(cpp_step, case)
    for a, e in zip(out.params + out.bufs, case.params + case.bufs):
        assert torch.equal(a, e)


def test_empty_tensors_and_rows_without_elements():
    shapes = [(0,), (0, 3), (3, 0), (2, 0, 4), (5,)]
    for dtype in DTYPES:
        case = make_case(random.Random(1), shapes, dtype, momentum=0.9, with_norms=True, with_lam=True)
        out = check(case)
        assert torch.equal(out.norms[2], torch.zeros(3, 3))
        assert torch.equal(out.norms[3], torch.zeros(2, 3))


def resnet56_shapes():
    """Parameter shapes of a CIFAR ResNet-56: ~170 tensors, 0.85M elements."""
    shapes = [(16, 3, 3, 3), (16,), (16,)]
    for c_in, c in ((16, 16), (16, 32), (32, 64)):
        for block in range(9):
            shapes += [(c, c_in if block == 0 else c, 3, 3), (c,), (c,), (c, c, 3, 3), (c,), (c,)]
    return shapes + [(10, 64), (10,)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_many_small_tensors_and_one_huge_row(dtype):
    """Many small tensors in one call, plus one row longer than any chunk, with norms."""
    shapes = resnet56_shapes() + [(1, 300000)]
    case = make_case(random.Random(5), shapes, dtype, momentum=0.9, with_norms=True)
    check(case, num_threads=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_thread_count_does_not_change_results(dtype):
    """Shares are cut mid-tensor (row-aligned where norms are written): the
    result, norms included, must not depend on the number of threads."""
    shapes = [(1, 70000), (300, 1000), (64, 64, 3, 3), (33, 129), (5000, 9), (20001,), (7,), (3, 40000)]
    rng = random.Random(7)
    for with_norms in (True, False, None):
        case = make_case(rng, shapes, dtype, momentum=0.9, with_lam=True, with_mask=True,
                         with_norms=with_norms)
        outs = [run(lambda *a, **k: cpp_step(*a, **k, num_threads=n), case) for n in (1, 2, 3)]
        for out in outs[1:]:
            for a, b in zip(outs[0].params + outs[0].bufs + outs[0].norms, out.params + out.bufs + out.norms):
                assert (a is None and b is None) or torch.equal(a, b)
    check(case, num_threads=2)


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4),
    big=st.sampled_from([None, (1, 1500), (37, 41), (2100,)]),
    dtype=st.sampled_from(DTYPES),
    isa_name=st.sampled_from(ISAS),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    nesterov=st.booleans(),
    dampening=st.sampled_from([0.0, 0.25]),
    weight_decay=st.sampled_from([0.0, 1e-4, 0.05]),
    maximize=st.booleans(),
    grad_scale=st.sampled_from([None, 2.0, 1024.0, 0.125]),  # fp16 grads * scale stay finite
    with_lam=st.booleans(), with_mask=st.booleans(), with_norms=st.booleans(),
    seed=st.integers(0, 2**16),
    num_threads=st.integers(1, 3),
)
def test_random_cases(shapes, big, dtype, isa_name, momentum, nesterov, dampening, weight_decay,
                      maximize, grad_scale, with_lam, with_mask, with_norms, seed, num_threads):
    nesterov = nesterov and momentum != 0 and dampening == 0
    options = dict(momentum=momentum, nesterov=nesterov, dampening=dampening if momentum else 0.0,
                   weight_decay=weight_decay, maximize=maximize)
    if grad_scale is not None:
        options["grad_scale"] = torch.tensor(grad_scale)
    case = make_case(random.Random(seed), shapes + ([big] if big else []), dtype, with_lam=with_lam,
                     with_mask=with_mask, with_norms=with_norms, **options)
    before = _C.isa()
    _C._set_isa(isa_name)
    try:
        check(case, num_threads=num_threads)
    finally:
        _C._set_isa(before)


# --------------------------------------------------------------------------
# Regularizer terms (docs/regularizers.md): L1 subgradient, polarization, ADMM pull,
# proximal maps (1 element L1, 2 group lasso), clamp


def with_prox_kind(case: Case, kind: int) -> Case:
    case.terms["prox_kinds"] = [kind] * len(case.params)
    return case


TERM_CASES = ["l1", "polar", "admm", "prox_l1", "prox_group", "clamp"]


def test_terms_are_exported():
    # the names regkern.backends.sgd routes to this kernel (the rest go to the reference)
    assert tuple(_C.SGD_TERMS) == ("l1", "polar", "admm", "prox", "clamp")
    assert set(_C.SGD_TERMS) == set(TERMS)


@pytest.mark.parametrize("term", TERM_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_each_term_alone(isa, dtype, term):
    for seed in range(2):
        case = make_case(random.Random(f"{term}-{dtype}-{seed}"), SHAPES, dtype, with_terms=(term.split("_")[0],))
        if term.startswith("prox"):
            with_prox_kind(case, 1 if term == "prox_l1" else 2)
        out = check(case)
        plain = run(reference_step, Case(**{**vars(case), "terms": {}}))
        assert any(not torch.equal(o, p) for o, p in zip(out.params, plain.params)), "the term changed nothing"


@pytest.mark.parametrize("kind", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_terms_together(isa, dtype, kind):
    for seed in range(2):
        rng = random.Random(f"all-{dtype}-{kind}-{seed}")
        check(with_prox_kind(make_case(rng, SHAPES, dtype, with_lam=True, with_mask=True, with_norms=True,
                                       with_terms=TERMS), kind))
    # each term on about half of the tensors
    check(make_case(random.Random(f"some-{dtype}-{kind}"), SHAPES, dtype, with_terms=True))


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_terms_with_options(options):
    for first in (False, True):
        for dtype in DTYPES:
            rng = random.Random(f"terms-{options}-{first}-{dtype}")
            case = make_case(rng, SHAPES, dtype, with_lam=True, with_mask=True, with_norms=True, with_terms=True,
                             **options)
            case.first_step = [first] * len(case.params)
            check(case)


@pytest.mark.parametrize("kind", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prox_exact_zeros(dtype, kind):
    """The proximal maps write true zeros: as many as the reference, in the same places."""
    shapes = [(64, 3, 3, 3), (33, 129), (300,), (5, 1), (2, 1000), (40, 40)]
    case = make_case(random.Random(f"zeros-{dtype}-{kind}"), shapes, dtype, momentum=0.9, with_mask=False,
                     with_terms=("prox",))
    with_prox_kind(case, kind)
    out = check(case)  # asserts the same zeros as the reference
    zeros = sum(int((w == 0).sum()) for w in out.params)
    numel = sum(w.numel() for w in out.params)
    assert 0 < zeros < numel
    if kind == 2:  # whole rows
        rows = [r for w in out.params if w.dim() > 1 for r in as_rows(w)]
        zero = [bool((r == 0).all()) for r in rows]
        assert any(zero) and not all(zero), "want rows shrunk to 0 and rows kept"
        assert all(z or bool((r != 0).all()) for z, r in zip(zero, rows)), "a row partly zeroed"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_lasso_rows_longer_than_the_buffer(dtype):
    """Rows up to 64K elements are updated into a per-thread buffer, reduced and
    stored once; longer rows take a second pass (fp32: the unscaled row waits in
    W; bf16/fp16: the row is computed twice). Both, with any thread count."""
    shapes = [(2, 70000), (1, 65536), (1, 65537), (3, 5000), (2, 3, 3000), (4097, 1)]
    case = make_case(random.Random(f"long-{dtype}"), shapes, dtype, momentum=0.9, with_lam=True, with_mask=True,
                     with_norms=True, with_terms=("prox", "l1", "clamp"))
    with_prox_kind(case, 2)
    case.terms["clamps"] = [(-0.75, 0.75)] * len(shapes)  # keeps zero rows zero
    lr = float(case.options["lr"])
    shrunk = [w.shape != (1, 65537) for w in case.params]
    for i, w in enumerate(case.params):  # row 0 shrinks to 0 (but in one tensor), the others are kept
        lam = torch.full((w.shape[0],), 0.02 / lr)
        lam[0] = 10.0 / lr if shrunk[i] else 0.02 / lr
        case.terms["prox_lams"][i] = lam
        case.masks[i] = torch.ones(w.shape, dtype=torch.bool) if case.masks[i].shape == w.shape else \
            torch.ones(w.shape[0], dtype=torch.bool)
        case.masks[i].view(-1)[1::7] = False  # element masks: every 7th; row masks: every 7th row
    outs = [check(case, num_threads=2)] + [run(lambda *a, **k: cpp_step(*a, **k, num_threads=n), case)
                                           for n in (1, 3)]
    for out in outs[1:]:
        for a, b in zip(outs[0].params + outs[0].bufs + outs[0].norms, out.params + out.bufs + out.norms):
            assert torch.equal(a, b)
    for w, mask, zero in zip(outs[0].params[:-1], case.masks, shrunk):  # not the rows of 1 element
        rows = as_rows(w)
        kept = mask.reshape(rows.shape[0], -1).any(dim=1)  # rows not pruned by a row mask
        kept[0] = not zero
        assert torch.equal((rows != 0).any(dim=1), kept)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masks_and_clamp(isa, dtype):
    """A clamp to [0.1, 0.8] after the prox must not revive a pruned weight."""
    case = make_case(random.Random(f"clamp-{dtype}"), SHAPES, dtype, momentum=0.9, with_mask=True,
                     with_terms=("clamp", "prox"))
    case.terms["clamps"] = [(0.1, 0.8)] * len(case.params)
    out = check(case)
    lo, hi = (float(torch.tensor(v).to(dtype)) for v in (0.1, 0.8))  # the bounds as stored
    for w, mask in zip(out.params, case.masks):
        if not w.numel():
            continue
        w = as_rows(w.to(torch.float32))
        keep = mask.reshape(w.shape[0], -1).expand_as(w)  # a row or an element mask
        assert bool((w[~keep] == 0).all()) and bool(((w[keep] >= lo) & (w[keep] <= hi)).all())
        assert not bool(torch.signbit(w[~keep]).any()), "pruned weights are +0, like the reference's"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_thread_count_does_not_change_results_with_terms(dtype):
    shapes = [(1, 70000), (300, 1000), (64, 64, 3, 3), (33, 129), (5000, 9), (20001,), (7,), (3, 40000)]
    rng = random.Random(f"threads-terms-{dtype}")
    for kind in (1, 2):
        for with_norms in (True, None):
            case = with_prox_kind(make_case(rng, shapes, dtype, momentum=0.9, with_lam=True, with_mask=True,
                                            with_norms=with_norms, with_terms=TERMS), kind)
            outs = [run(lambda *a, **k: cpp_step(*a, **k, num_threads=n), case) for n in (1, 2, 3)]
            for out in outs[1:]:
                for a, b in zip(outs[0].params + outs[0].bufs + outs[0].norms, out.params + out.bufs + out.norms):
                    assert (a is None and b is None) or torch.equal(a, b)
        check(case, num_threads=3)


@settings(max_examples=30, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4),
    big=st.sampled_from([None, (1, 1500), (37, 41), (2100,), (1, 66000)]),
    dtype=st.sampled_from(DTYPES),
    isa_name=st.sampled_from(ISAS),
    momentum=st.sampled_from([0.0, 0.9]),
    nesterov=st.booleans(),
    weight_decay=st.sampled_from([0.0, 0.05]),
    maximize=st.booleans(),
    grad_scale=st.sampled_from([None, 1024.0]),
    with_lam=st.booleans(), with_mask=st.booleans(), with_norms=st.booleans(),
    terms=st.sets(st.sampled_from(TERMS), min_size=1),
    prox_kind=st.sampled_from([None, 1, 2]),
    seed=st.integers(0, 2**16),
    num_threads=st.integers(1, 3),
)
def test_random_cases_with_terms(shapes, big, dtype, isa_name, momentum, nesterov, weight_decay, maximize,
                                 grad_scale, with_lam, with_mask, with_norms, terms, prox_kind, seed, num_threads):
    options = dict(momentum=momentum, nesterov=nesterov and momentum != 0, dampening=0.0,
                   weight_decay=weight_decay, maximize=maximize)
    if grad_scale is not None:
        options["grad_scale"] = torch.tensor(grad_scale)
    case = make_case(random.Random(seed), shapes + ([big] if big else []), dtype, with_lam=with_lam,
                     with_mask=with_mask, with_norms=with_norms, with_terms=tuple(sorted(terms)), **options)
    if prox_kind is not None and "prox" in terms:
        with_prox_kind(case, prox_kind)
    before = _C.isa()
    _C._set_isa(isa_name)
    try:
        check(case, num_threads=num_threads)
    finally:
        _C._set_isa(before)


# --------------------------------------------------------------------------
# Lambdas along other dimensions: per-element lam (W's shape) and per-column
# lam_cols (dim 1), alone (the plain path for element lam) and with the terms

LAMBDA_SHAPES = [(), (7,), (1, 1), (5, 1), (3, 17), (33, 129), (16, 3, 3, 3), (8, 5, 3, 3), (4, 3, 5),
                 (2, 7, 1000), (1, 4099), (3, 0), (0, 3), (2, 1, 3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_terms", [False, True], ids=["alone", "terms"])
def test_lambda_kinds_and_columns(isa, dtype, with_terms):
    for seed in range(3):
        rng = random.Random(f"lam-dims-{dtype}-{with_terms}-{seed}")
        case = make_case(rng, LAMBDA_SHAPES, dtype, with_lam=True, lam_kinds=("row", "element"),
                         with_lam_cols=True if seed == 0 else None, with_terms=with_terms)
        out = check(case)
        kinds = {lam.shape == w.shape for lam, w in zip(case.lams, case.params) if w.dim() >= 2}
        assert seed or kinds == {True, False}, "want both kinds of lambda"
        # the column lambdas act: zeroing them changes the result
        plain = case.clone()
        plain.terms["lam_cols"] = [None] * len(case.params)
        without = run(reference_step, plain)
        assert any(not torch.equal(o, p) for o, p, c in zip(out.params, without.params, case.terms["lam_cols"])
                   if c is not None and o.numel())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lambda_columns_with_every_term_and_prox(dtype):
    for kind in (1, 2):
        rng = random.Random(f"lam-cols-all-{dtype}-{kind}")
        check(with_prox_kind(make_case(rng, LAMBDA_SHAPES, dtype, momentum=0.9, with_lam=True, with_mask=True,
                                       with_norms=True, with_terms=TERMS, lam_kinds=("row", "element"),
                                       with_lam_cols=True), kind))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lambda_columns_thread_count_does_not_change_results(dtype):
    """Thread cuts fall mid-row and mid-column: the column of the first element
    of a share comes from its position, not from where the row started."""
    shapes = [(3, 40000), (64, 64, 3, 3), (2, 7, 9000), (5000, 9), (33, 129)]
    rng = random.Random(f"lam-cols-threads-{dtype}")
    for with_norms in (False, None):
        case = make_case(rng, shapes, dtype, momentum=0.9, with_lam=True, with_mask=True, with_norms=with_norms,
                         lam_kinds=("row", "element"), with_lam_cols=True, with_terms=("l1",) if with_norms else False)
        outs = [run(lambda *a, **k: cpp_step(*a, **k, num_threads=n), case) for n in (1, 2, 3)]
        for out in outs[1:]:
            for a, b in zip(outs[0].params + outs[0].bufs, out.params + out.bufs):
                assert torch.equal(a, b)
        check(case, num_threads=3)


@settings(max_examples=30, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=4).map(tuple), min_size=1, max_size=4),
    big=st.sampled_from([None, (2, 1500), (37, 41), (3, 5, 300)]),
    dtype=st.sampled_from(DTYPES),
    isa_name=st.sampled_from(ISAS),
    momentum=st.sampled_from([0.0, 0.9]),
    weight_decay=st.sampled_from([0.0, 0.05]),
    maximize=st.booleans(),
    grad_scale=st.sampled_from([None, 1024.0]),
    with_mask=st.booleans(), with_norms=st.booleans(),
    terms=st.sets(st.sampled_from(TERMS)),
    prox_kind=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
    num_threads=st.integers(1, 3),
)
def test_random_cases_with_lambda_dims(shapes, big, dtype, isa_name, momentum, weight_decay, maximize, grad_scale,
                                       with_mask, with_norms, terms, prox_kind, seed, num_threads):
    options = dict(momentum=momentum, nesterov=False, dampening=0.0, weight_decay=weight_decay, maximize=maximize)
    if grad_scale is not None:
        options["grad_scale"] = torch.tensor(grad_scale)
    case = make_case(random.Random(seed), shapes + ([big] if big else []), dtype, with_lam=None,
                     with_mask=with_mask, with_norms=with_norms, with_terms=tuple(sorted(terms)),
                     lam_kinds=("row", "element"), with_lam_cols=None, **options)
    if "prox" in terms:
        with_prox_kind(case, prox_kind)
    before = _C.isa()
    _C._set_isa(isa_name)
    try:
        check(case, num_threads=num_threads)
    finally:
        _C._set_isa(before)


# --------------------------------------------------------------------------
# Storage conversions, against torch's `.to()`


def _to_f32(bits16: torch.Tensor, dtype, chunk=None) -> torch.Tensor:
    out = torch.empty(bits16.numel(), dtype=torch.float32)
    n, step = bits16.numel(), chunk or bits16.numel()
    for i in range(0, n, step):  # chunks of odd length exercise the tail code
        m = min(step, n - i)
        _C._to_f32(DTYPE_CODE[dtype], bits16[i:].data_ptr(), out[i:].data_ptr(), m)
    return out


def _from_f32(x: torch.Tensor, dtype, chunk=None) -> torch.Tensor:
    out = torch.empty(x.numel(), dtype=torch.int16)
    n, step = x.numel(), chunk or x.numel()
    for i in range(0, n, step):
        m = min(step, n - i)
        _C._from_f32(DTYPE_CODE[dtype], x[i:].data_ptr(), out[i:].data_ptr(), m)
    return out


def _assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, inputs: torch.Tensor):
    """Bit-exact, except that a NaN only has to stay a NaN (torch itself writes
    different NaN payloads on its vectorized and scalar paths)."""
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan), f"NaN mismatch at inputs {inputs[actual.isnan() != nan][:8].tolist()}"
    a_bits = actual[~nan].view(torch.int16 if actual.element_size() == 2 else torch.int32)
    e_bits = expected[~nan].view(torch.int16 if expected.element_size() == 2 else torch.int32)
    bad = a_bits != e_bits
    assert not bad.any(), (f"{int(bad.sum())} values differ, e.g. inputs {inputs[~nan][bad][:6].tolist()} -> "
                           f"{actual[~nan][bad][:6].tolist()} instead of {expected[~nan][bad][:6].tolist()}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_to_f32_all_patterns(isa, dtype):
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    expected = bits.view(dtype).to(torch.float32)
    for chunk in (None, 13):
        _assert_same_bits(_to_f32(bits, dtype, chunk), expected, bits)


def _f32_edge_values(dtype) -> torch.Tensor:
    """Every value of `dtype`, the midpoints between neighbours (ties), one fp32
    ulp either side of them, specials, fp32 subnormals and overflow edges."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).to(torch.float64)
    finite = every[every.isfinite()].unique()  # sorted; -0 and +0 merge
    mids = ((finite[1:] + finite[:-1]) / 2).to(torch.float32)  # exact in fp32
    big = torch.finfo(dtype).max
    ulp = 2.0 ** math.floor(math.log2(big)) * torch.finfo(dtype).eps / 2  # half an ulp at the top
    special = torch.tensor([
        0.0, -0.0, float("inf"), -float("inf"), big, -big, big + ulp, -(big + ulp),
        big + ulp * 0.999, 3.4028234663852886e38, -3.4028234663852886e38, 1.4e-45, -1.4e-45,
        1.1754942e-38, 1.1754944e-38, 2.0 ** -14, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -26,
        2.0 ** -133, 2.0 ** -134, 65504.0, 65519.996, 65520.0, 65536.0, 1e10,
    ], dtype=torch.float32)
    nans = torch.tensor([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0x7FA00000, 0x7F802000],
                        dtype=torch.int64).to(torch.int32).view(torch.float32)
    values = torch.cat([finite.to(torch.float32), mids, special, nans])
    up = torch.nextafter(values, torch.tensor(float("inf")))
    down = torch.nextafter(values, torch.tensor(-float("inf")))
    return torch.cat([values, up, down, -values])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_f32_to_16bit_edges_and_random(isa, dtype):
    edges = _f32_edge_values(dtype)
    rand_bits = torch.randint(-2**31, 2**31, (1 << 20,), generator=torch.Generator().manual_seed(3),
                              dtype=torch.int64).to(torch.int32)
    for values, chunk in ((edges, None), (edges, 13), (rand_bits.view(torch.float32), None)):
        expected = values.to(dtype)
        _assert_same_bits(_from_f32(values, dtype, chunk).view(dtype), expected, values)
