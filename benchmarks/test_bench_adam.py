"""Quick checks of the AdamW table of ``python -m regkern bench`` (``--regularizers adam``,
``regkern/bench/adam.py``) on tiny shapes: every row prepares and times, the
ratios to regkern are finite, and the rows that do the same math land on the
same weights after a step. They never assert a time. Run::

    pytest benchmarks/test_bench_adam.py

(the micro-benchmarks of ``test_bench_sgd.py`` include the adam table's
regkern and loop rows on resnet56 and resnet50, via ``harness.SUITES``).
"""
from __future__ import annotations

import math

import pytest
import torch

from regkern.bench import adam
from regkern.bench import harness as bench
from regkern.bench.shapes import ParamShape

TINY = [ParamShape("conv.weight", (8, 4, 3, 3), True),
        ParamShape("bn.weight", (8,), False, True),
        ParamShape("bn.bias", (8,), False),
        ParamShape("fc.weight", (10, 8), True),
        ParamShape("fc.bias", (10,), False)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FAST_ROWS = ["regkern", "regkern-coupled", "regkern-noreg", "a", "b", "d", "floor", "floor-rmw"]


def _case(dtype: str = "fp32") -> bench.Case:
    case = bench.SUITES["adam"].case(bench.Case("tiny", TINY, DTYPES[dtype], torch.device("cpu")))
    assert case is not None
    return case


def _check(table: bench.Table, keys) -> None:
    got = {r.key for r in table.results}
    assert set(keys) <= got, f"missing rows {set(keys) - got}"
    base = table.baseline()
    assert base is not None, "no regkern row ran: " + "; ".join(f"{r.label}: {r.note}" for r in table.results)
    text = bench.format_table(table)
    for r in table.results:
        if r.stats is None:
            assert r.key in ("regkern", "regkern-coupled", "regkern-noreg", "c"), f"{r.label} did not run: {r.note}"
            continue
        ratio = r.stats.median / base.stats.median
        assert math.isfinite(ratio) and ratio > 0, (r.label, ratio)
        assert r.label in text


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_adam_table(dtype):
    """All rows but torch.compile, on the default backend and the reference (which
    is the baseline when the C++ Adam kernel is not built)."""
    case = _case(dtype)
    ctx = bench.Context(repeat=2, rounds=1, target_s=0.01)
    table = bench.run_case(case, ctx, FAST_ROWS, backends=(None, "reference"), regularizer="adam")
    _check(table, FAST_ROWS)
    auto = next(r for r in table.results if r.key == "regkern")  # the C++ kernel is part of the install
    assert auto.stats is not None, auto.note
    if dtype == "fp32":
        assert 28 * case.numel < case.floor_bytes < 29 * case.numel
    assert "AdamW" in case.describe()


def test_adam_table_compiled():
    """Row (c): torch.compile of the loop and the AdamW step (skipped where the
    compiler cannot run)."""
    case = _case()
    ctx = bench.Context(repeat=1, rounds=1, target_s=0.01)
    table = bench.run_case(case, ctx, ["regkern", "c"], backends=("reference",), regularizer="adam")
    compiled = next(r for r in table.results if r.key == "c")
    if compiled.stats is None:
        pytest.skip(compiled.note)
    _check(table, ["regkern", "c"])


def _step_with(prepared: bench.Prepared, grads, compiled: bool = False) -> None:
    """One more step of a prepared row with these gradients."""
    if compiled:  # keep = (params, grads, bufs, state, fn)
        targets = prepared.keep[1]
    else:
        targets = [p.grad for p in prepared.keep[0]]
    for t, g in zip(targets, grads):
        t.copy_(g)
    prepared.step()


ROWS = {"a": adam.loop_foreach, "b": adam.loop_fused, "c": adam.compiled_adamw}


def _run_rows(case, steps, makers):
    """The weights of each prepared row after its first step and ``steps``."""
    rows = {key: make() for key, make in makers.items()}
    for grads in steps:
        for key, prepared in rows.items():
            _step_with(prepared, grads, compiled=key == "c")
    return {key: [p.detach().float() for p in prepared.keep[0]] for key, prepared in rows.items()}


@pytest.mark.parametrize("row", sorted(ROWS))
@pytest.mark.parametrize("backend", ["reference", None])
def test_adam_rows_match(backend, row):
    """Rows (a), (b) and (c) do the math of regkern's coupled row: after three
    steps (each prepare takes the first) with new gradients before each of the
    next two, they land on the same weights, and the decoupled row does not.
    The lambdas are raised to about 1-10 so that the penalty outweighs the
    gradients and the two couplings differ."""
    case = _case()
    gen = torch.Generator().manual_seed(3)
    case.lams = [None if lam is None else 1 + 9 * torch.rand(lam.shape, generator=gen) for lam in case.lams]
    steps = [[torch.randn(w.shape, generator=gen) * 0.01 for w in case.weights] for _ in range(2)]
    ctx = bench.Context(backend=backend)
    try:  # row (c) needs a working torch.compile
        weights = _run_rows(case, steps, {"coupled": lambda: adam.regkern_adamw_coupled(case, ctx),
                                          "decoupled": lambda: adam.regkern_adamw(case, ctx),
                                          row: lambda: ROWS[row](case, bench.Context() if row == "c" else ctx)})
    except bench.Unavailable as why:
        pytest.skip(f"row {row} is unavailable here: {why}")
    for p, q in zip(weights["coupled"], weights[row]):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=lambda m: f"row {row}: {m}")
    assert any(not torch.allclose(p, q, rtol=1e-5, atol=1e-6) for p, q in zip(weights["coupled"], weights["decoupled"]))
