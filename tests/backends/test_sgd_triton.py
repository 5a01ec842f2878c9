"""The Triton `sgd` kernel against the reference (docs/sgd.md, docs/regularizers.md).

Without a GPU the kernel runs on CPU tensors under ``TRITON_INTERPRET=1``
(set by tests/conftest.py before triton is imported, which also makes the
interpreter round bf16 like a GPU);
with one it runs on CUDA tensors.
"""
import importlib
import math
import os
import random

import torch

import pytest

triton = pytest.importorskip("triton")
from hypothesis import given, settings, strategies as st

from regkern.backends.sgd import build_sgd_table
from regkern.reference import sgd_step as reference_step
from regkern.reference.sgd import as_rows
from sgd_cases import DTYPES, SHAPES, TERMS, Case, assert_same, make_case, run

from regkern.kernels import sgd as triton_sgd

INTERPRET = triton.knobs.runtime.interpret
DEVICE = "cpu" if INTERPRET else "cuda"
# The interpreter runs the norms' segmented scan one element at a time over the
# whole block: small blocks keep it quick.
BLOCK = 128 if INTERPRET else triton_sgd.DEFAULT_BLOCK
SMALL_SHAPES = [s for s in SHAPES if math.prod(s) <= 500]
if INTERPRET and type(triton_sgd._sgd_kernel).__name__ != "InterpretedFunction":
    triton_sgd = importlib.reload(triton_sgd)  # imported before TRITON_INTERPRET was set


def triton_step(params, grads, momentum_buffers, *, lr, momentum=0.0, dampening=0.0, nesterov=False,
                weight_decay=0.0, maximize=False, first_step=False, lams=None, masks=None, norms=None,
                grad_scale=None, found_inf=None, block=BLOCK, chunk=triton_sgd.DEFAULT_CHUNK, **terms):
    """reference.sgd_step's signature (``terms``: its regularizer keyword lists): one launch per dtype."""
    count = len(params)
    firsts = [first_step] * count if isinstance(first_step, bool) else first_step
    lams, masks, norms = (x if x is not None else [None] * count for x in (lams, masks, norms))
    terms = {k: v for k, v in terms.items() if v is not None}
    for dtype in DTYPES:
        index = [i for i, w in enumerate(params) if w.dtype == dtype]
        if not index:
            continue
        pick = lambda values: [values[i] for i in index]  # noqa: E731
        table = build_sgd_table(pick(params), pick(grads), pick(momentum_buffers), pick(lams), pick(masks),
                                pick(norms), pick(firsts), **{k: pick(v) for k, v in terms.items()})
        units = triton_sgd.build_units(table, chunk)
        triton_sgd.sgd_step(table.to(DEVICE), dtype, units=units.to(DEVICE), block=block, lr=lr,
                            momentum=momentum, dampening=dampening, nesterov=nesterov,
                            weight_decay=weight_decay, maximize=maximize,
                            grad_scale=grad_scale, found_inf=found_inf)


def check(case, **launch):
    expected = run(reference_step, case)
    actual = run(lambda *a, **k: triton_step(*a, **k, **launch), case)
    assert_same(actual, expected)
    for i, (a, e) in enumerate(zip(actual.params, expected.params)):
        # exact zeros (masks, proximal maps) are the point: the same ones, not 1e-12
        assert torch.equal(a == 0, e == 0), f"param {i}: {int((a == 0).sum())} zeros, expected {int((e == 0).sum())}"
    return expected


CONFIGS = {
    # torch.optim.SGD without extras
    "plain": dict(momentum=0.0, with_lam=False, with_mask=False, with_norms=False),
    # momentum with random nesterov / dampening / maximize / grad_scale / lam / mask / norms
    "momentum": dict(momentum=0.9),
    # everything at once
    "all": dict(momentum=0.9, dampening=0.0, nesterov=True, maximize=True, weight_decay=0.1,
                with_lam=True, with_mask=True, with_norms=True, grad_scale=torch.tensor(1024.0)),
}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype, config):
    options = dict(CONFIGS[config])
    if "grad_scale" in options:
        options["grad_scale"] = options["grad_scale"].to(DEVICE)
    rng = random.Random(f"{dtype}-{config}")
    check(make_case(rng, SHAPES + [(3, 0)], dtype, DEVICE, **options))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_small_blocks_and_chunks(dtype):
    # units that start mid-row, rows spread over many pieces and units
    case = make_case(random.Random(1), [(33, 129), (257, 9), (5, 1), (2, 100)], dtype, DEVICE, momentum=0.9)
    check(case, block=32, chunk=64)


def _in_guarded_storage(t, offset, guard=8):
    """``t`` copied into a view at element ``offset`` of a larger buffer whose
    other elements hold a guard value (7), to see what a kernel writes outside."""
    if t is None:
        return None
    storage = torch.full((offset + t.numel() + guard,), 7, dtype=t.dtype, device=t.device)
    view = storage[offset:offset + t.numel()].view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.parametrize("offset", [0, 1, 4], ids=lambda o: f"offset{o}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_whole_pieces_tails_and_misaligned_tensors(dtype, offset):
    # Whole, 16-byte aligned pieces take the kernel's vector path (pointers and
    # mask declared to the compiler), the tail and misaligned tensors (views at
    # an element offset: 4 or 8 bytes for 16-bit storage is not 16) the masked
    # one; both equal the reference and write nothing outside their tensors.
    case = make_case(random.Random(6), [(5, 300), (1000,), (3, 128)], dtype, DEVICE, momentum=0.9,
                     with_norms=True, with_mask=False)
    for name in ("params", "grads", "bufs"):
        setattr(case, name, [_in_guarded_storage(t, offset) for t in getattr(case, name)])
    expected = check(case)
    actual = run(triton_step, case)
    for name in ("params", "grads", "bufs"):
        for t in getattr(actual, name):
            storage = torch.tensor(t.untyped_storage(), dtype=torch.uint8).view(t.dtype)
            outside = torch.cat([storage[:offset], storage[offset + t.numel():]])
            assert bool((outside == 7).all()), f"{name}: written outside the tensor"
    assert expected.params[0].storage_offset() == offset  # the case's copies kept their place in the storage


def test_mixed_dtypes():
    cases = [make_case(random.Random(2), [(3, 17), (8,)], dtype, DEVICE, momentum=0.9) for dtype in DTYPES]
    mixed = Case(*[sum((getattr(c, f) for c in cases), []) for f in
                   ("params", "grads", "bufs", "lams", "masks", "norms", "first_step")],
                 options=dict(lr=0.1, momentum=0.9, weight_decay=5e-4))
    check(mixed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_found_inf_skips_the_step(dtype):
    case = make_case(random.Random(3), [(16, 3, 3, 3), (7,), (2, 1000)], dtype, DEVICE,
                     momentum=0.9, with_norms=True, with_mask=True)
    case.options["found_inf"] = torch.tensor(1.0, device=DEVICE)
    skipped = run(triton_step, case)
    for name in ("params", "grads", "bufs", "norms"):
        for a, e in zip(getattr(skipped, name), getattr(case, name)):
            assert torch.equal(a.isnan(), e.isnan()) and torch.equal(a.nan_to_num(), e.nan_to_num()), name
    case.options["found_inf"] = torch.tensor(0.0, device=DEVICE)
    check(case)


def test_tensor_lr():
    case = make_case(random.Random(4), [(5, 40), (7,)], torch.float32, DEVICE, momentum=0.9)
    case.options["lr"] = torch.tensor(0.05, device=DEVICE)
    check(case)
    case.options["lr"] = torch.tensor(0.05, dtype=torch.float64)  # a CPU scalar
    check(case)


@pytest.mark.skipif(INTERPRET, reason="the interpreter compiles nothing")
def test_new_lr_does_not_recompile():
    case = make_case(random.Random(5), [(7, 3)], torch.float32, DEVICE, momentum=0.0, grad_scale=None)
    run(triton_step, case)
    compiled = triton_sgd._sgd_kernel.device_caches[torch.cuda.current_device()][0]  # triton 3.x
    count = len(compiled)
    for lr in (0.3, 0.01, 1e-5):
        case.options["lr"] = lr
        check(case)
    assert len(compiled) == count


# Shapes for the regularizer terms: 0-d, vectors, 1-element rows, rows shorter and
# longer than the 32-element blocks the term tests use.
TERM_SHAPES = [(), (7,), (5, 1), (3, 17), (4, 2, 3), (2, 45)]
TERM_CASES = ["l1", "polar", "admm", "prox_l1", "prox_group", "clamp"]


def with_prox_kind(case, kind):
    case.terms["prox_kinds"] = [kind] * len(case.params)
    return case


@pytest.mark.parametrize("term", TERM_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_term_alone(dtype, term):
    rng = random.Random(f"{dtype}-{term}")
    case = make_case(rng, TERM_SHAPES, dtype, DEVICE, with_terms=(term.split("_")[0],),
                     with_lam=False, with_mask=False, with_norms=False)
    if term.startswith("prox"):
        with_prox_kind(case, 1 if term == "prox_l1" else 2)
    expected = check(case, block=32)
    plain = run(reference_step, Case(**{**vars(case), "terms": {}}))
    assert any(not torch.equal(e, p) for e, p in zip(expected.params, plain.params)), "the term changed nothing"
    if term.startswith("prox"):
        assert any(bool((e == 0).any()) for e in expected.params), "no exact zeros to compare"


@pytest.mark.parametrize("terms", ["every", "random"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_terms(dtype, terms):
    # every term with momentum, lam, masks, norms, grad_scale; rows within and beyond a block
    options = dict(CONFIGS["all"], grad_scale=CONFIGS["all"]["grad_scale"].to(DEVICE))
    if terms == "random":
        options.update(with_lam=None, with_mask=None, with_norms=None, nesterov=False, dampening=0.3)
    rng = random.Random(f"{dtype}-terms-{terms}")
    shapes = SMALL_SHAPES + [(3, 0), (2, 45)]
    check(make_case(rng, shapes, dtype, DEVICE, with_terms=TERMS if terms == "every" else True, **options),
          block=32)


@pytest.mark.parametrize("chunk", [32, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_lasso_rows_longer_than_a_block(dtype, chunk):
    # rows of 33 to 100 elements in blocks of 32 (two passes), a unit per row or many rows
    # per unit; rows that fit a block (several per piece); masks, norms, momentum
    shapes = [(3, 100), (2, 70), (4, 33), (1, 64), (16, 3), (6,), (2, 32)]
    case = with_prox_kind(make_case(random.Random(f"{dtype}-{chunk}"), shapes, dtype, DEVICE, momentum=0.9,
                                    with_mask=True, with_norms=True, with_terms=("prox",)), 2)
    expected = check(case, block=32, chunk=chunk)
    rows = [r for e in expected.params for r in e.reshape(e.shape[0], -1)]
    zero = [bool((r == 0).all()) for r in rows]
    assert any(zero) and not all(zero), "want rows shrunk to 0 and rows kept"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masks_and_clamp(dtype):
    # a clamp to [0.1, 0.8] after the prox must not revive a pruned weight
    case = make_case(random.Random(f"{dtype}-clamp"), TERM_SHAPES, dtype, DEVICE, momentum=0.9,
                     with_mask=True, with_terms=("clamp", "prox"))
    case.terms["clamps"] = [(0.1, 0.8)] * len(case.params)
    expected = check(case, block=32)
    for w, mask in zip(expected.params, case.masks):
        w = as_rows(w)
        keep = mask.reshape(w.shape[0], -1).expand_as(w)  # a row or an element mask
        assert bool((w[~keep] == 0).all()) and bool(((w[keep] >= 0.1) & (w[keep] <= 0.8)).all())


@pytest.mark.skipif(INTERPRET, reason="the interpreter compiles nothing")
def test_new_term_values_do_not_recompile():
    case = make_case(random.Random(6), [(7, 3), (4, 40)], torch.float32, DEVICE, momentum=0.9,
                     with_terms=TERMS)
    check(case)
    compiled = triton_sgd._sgd_kernel.device_caches[torch.cuda.current_device()][0]  # triton 3.x
    count = len(compiled)
    for step in range(3):
        for polar in case.terms["polars"]:
            polar[2:] += 0.1  # m and s move on the device every step
        case.terms["admm_rhos"] = [0.1 * step] * 2
        case.terms["clamps"] = [None, (-0.1 * step, 0.5)]
        case.terms["prox_kinds"] = [step % 3, (step + 1) % 3]
        check(case)
    assert len(compiled) == count


@pytest.mark.parametrize("chunk", [1, 64, 4096])
def test_units_cover_every_element_once(chunk):
    tensors = [torch.zeros(s) for s in SHAPES + [(3, 0)]]
    norms = [torch.zeros(t.shape[0] if t.dim() else 1, 3) if i % 2 else None for i, t in enumerate(tensors)]
    group = [i % 3 == 0 for i in range(len(tensors))]  # group lasso: whole rows too
    table = build_sgd_table(tensors, tensors, [None] * len(tensors), [None] * len(tensors),
                            [None] * len(tensors), norms, [False] * len(tensors),
                            prox_kinds=[2 if g else 0 for g in group])
    units = triton_sgd.build_units(table, chunk)
    assert units.dtype == torch.int64 and units.shape[1] == triton_sgd.UNIT_FIELDS
    for i, t in enumerate(tensors):
        mine = units[units[:, 0] == i]
        row_len = t.numel() // (t.shape[0] if t.dim() else 1) if t.numel() else 0
        if t.numel() == 0:
            empty_rows = norms[i] is not None and norms[i].shape[0] > 0
            assert mine[:, 1:].tolist() == ([[0, 0]] if empty_rows else [])
            continue
        assert mine[0, 1] == 0 and mine[-1, 2] == t.numel()
        assert torch.equal(mine[1:, 1], mine[:-1, 2]) and bool((mine[:, 2] > mine[:, 1]).all())
        by_rows = norms[i] is not None or group[i]
        longest = max(chunk, row_len) if by_rows else chunk
        assert int((mine[:, 2] - mine[:, 1]).max()) <= longest
        if by_rows:
            assert bool((mine[:, 1:] % row_len == 0).all())


@settings(deadline=None, max_examples=8, derandomize=True)
@given(
    shapes=st.lists(st.sampled_from(SMALL_SHAPES), min_size=1, max_size=4),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    block=st.sampled_from([32, 256]),
    chunk=st.sampled_from([32, 100, 4096]),
    terms=st.booleans(),
)
def test_hypothesis(shapes, dtype, seed, block, chunk, terms):
    check(make_case(random.Random(seed), shapes, dtype, DEVICE, with_terms=terms), block=block, chunk=chunk)


@pytest.mark.parametrize("terms", [False, True], ids=["alone", "terms"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lambda_kinds_and_columns(dtype, terms):
    # per-element lam and per-column lam_cols; units of 32 elements start mid-row and mid-column
    shapes = [(), (7,), (5, 1), (3, 17), (4, 3, 5), (4, 3, 2, 2), (2, 45), (3, 0)]
    case = make_case(random.Random(f"{dtype}-lam-dims-{terms}"), shapes, dtype, DEVICE, momentum=0.9,
                     with_lam=True, with_mask=None, with_norms=None, lam_kinds=("row", "element"),
                     with_lam_cols=True, with_terms=terms)
    gen = torch.Generator().manual_seed(0)
    for i, w in enumerate(case.params):  # both kinds on the tensors with columns
        if w.dim() >= 2 and i % 2:
            case.lams[i] = torch.randn(w.shape, generator=gen).to(DEVICE)
    expected = check(case, block=32, chunk=32)
    without = case.clone()
    without.terms["lam_cols"] = [None] * len(case.params)
    plain = run(reference_step, without)
    assert any(not torch.equal(e, p) for e, p in zip(expected.params, plain.params)), "lam_cols changed nothing"
